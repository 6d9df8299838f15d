"""Throughput of the MVPTR phrase-concept tool (mmf_multilevel.methods.mvptr.concepts), captions/s.

Generates N caption-like sentences from templates (objects, attributes, verbs, prepositions), writes a
small BERT-style vocab file from their words, then runs the whole tool with 1 and with 2 parser
processes into fresh folders and prints the parse throughput (spaCy + rules, captions/s) and the
end-to-end time (reading, parsing, counting, vocabulary, word-piece map).

    OMP_NUM_THREADS=1 python benchmarks/bench_mvptr_concepts.py [--captions 6000] [--workers 1 2]
"""
import argparse
import json
import os
import platform
import random
import shutil
import tempfile

from mmf_multilevel.methods.mvptr import concepts
from mmf_multilevel.weak_corpus._util import Report

OBJECTS = ["man", "woman", "dog", "cat", "horse", "kitchen", "table", "street", "car", "boy", "girl", "field", "plate", "bus",
           "train", "bench", "tree", "beach", "umbrella", "pizza", "bed", "giraffe", "elephant", "frisbee", "skateboard"]
ATTRS = ["young", "old", "red", "white", "small", "large", "wooden", "black", "green", "tall", "busy", "empty"]
VERBS = ["riding", "holding", "sitting on", "standing next to", "walking down", "looking at", "eating", "lying on"]
PREPS = ["on", "in", "near", "under", "behind", "on top of", "in front of"]


def sentence(rng):
    a, b, c = rng.sample(OBJECTS, 3)
    form = rng.randrange(4)
    if form == 0:
        return f"A {rng.choice(ATTRS)} {a} {rng.choice(VERBS)} a {b} {rng.choice(PREPS)} the {c}."
    if form == 1:
        return f"Two {a}s are {rng.choice(VERBS)} a {rng.choice(ATTRS)} {b}."
    if form == 2:
        return f"The {a} is {rng.choice(ATTRS)} and {rng.choice(ATTRS)}."
    return f"A {a} {rng.choice(PREPS)} a {rng.choice(ATTRS)} {b} with {c}s."


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--captions", type=int, default=6000)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--min-count", type=int, default=50)
    args = ap.parse_args()
    rng = random.Random(0)
    work = tempfile.mkdtemp(prefix="bench_mvptr_")
    try:
        caps = os.path.join(work, "caps.jsonl")
        words = set()
        with open(caps, "w", encoding="utf-8") as f:
            for i in range(args.captions):
                text = sentence(rng)
                words.update(text.lower().replace(".", " .").split())
                f.write(json.dumps({"id": i, "caption": text}) + "\n")
        vocab = os.path.join(work, "vocab.txt")
        with open(vocab, "w", encoding="utf-8") as f:
            f.write("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted(words)) + "\n")
        concepts._load_nlp("en_core_web_sm")  # load time is not part of the figures (the workers fork it)
        print(f"# {platform.machine()} {os.cpu_count()} cores, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, "
              f"{args.captions} generated captions, min-count {args.min_count}")
        for w in args.workers:
            s = concepts.build(caps, vocab, os.path.join(work, f"out{w}"), min_count=args.min_count, workers=w,
                               report=Report(quiet=True), chunk_size=500)
            print(f"workers {w}: parse {s['captions_per_second']} captions/s ({s['parse_seconds']} s), "
                  f"end to end {s['seconds']} s = {args.captions / s['seconds']:.0f} captions/s; "
                  f"{s['distinct_tuples']} distinct tuples, vocabulary {s['vocabulary']}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
