"""``python -m mmf_multilevel.weak_corpus {build,encode,search,link,picture} ...``: the μ-VLA weak-corpus builder;
``picture`` draws one record's tag-phrase links over its image (:mod:`mmf_multilevel.weak_corpus.picture`).

Exit status: 0 on success, 2 for bad input or settings (the message names the file/line/option),
1 for anything unexpected.
"""
import argparse
import json
import sys

from mmf_multilevel.weak_corpus.pipeline import DEFAULTS

D = DEFAULTS


def _add_common(p):
    p.add_argument("--work", help="work directory holding every stage's files (default: <out>.work)")
    p.add_argument("--device", default=D["device"], help="cpu, cuda, cuda:N or auto (default: %(default)s: cuda if torch sees one)")
    p.add_argument("--force", action="store_true", help="rebuild the stages this command runs instead of resuming them")
    p.add_argument("--quiet", action="store_true", help="no warnings or notes on stderr (progress bars: set MMF_ML_NO_PROGRESS=1)")


def _add_sbert(p):
    p.add_argument("--sbert", default=D["sbert"], help="Sentence-BERT model: name or folder (default: %(default)s, the official builder's)")
    p.add_argument("--batch-size", type=int, default=D["batch_size"], help="SBERT encode batch size (default: %(default)s)")
    p.add_argument("--chunk-rows", type=int, default=D["chunk_rows"], help="sentences encoded per resumable chunk (default: %(default)s)")


def _add_inputs(p, required):
    p.add_argument("--features", required=required, help="region feature cache (LMDB folder / .lmdb) or a tags .jsonl")
    p.add_argument("--corpus", required=required, help="text corpus: .txt (one sentence a line) or .jsonl ({'text': ..., 'image_id': ...})")
    p.add_argument("--object-vocab", help="class names of a feature cache, one a line (line i = class id i); default: header info.object_names")
    p.add_argument("--query", dest="query_mode", default=D["query_mode"], choices=["ranked", "unique", "all"],
                   help="tag query: ranked = official sort_objects (conf>=0.3, area>=1%%, by count+area), unique = distinct tags in order, "
                        "all = every tag (default: %(default)s)")
    p.add_argument("--min-conf", type=float, default=D["min_conf"], help="ranked query: minimum detection confidence (default: %(default)s)")
    p.add_argument("--min-area", type=float, default=D["min_area"], help="ranked query: minimum box area / image area (default: %(default)s)")
    p.add_argument("--lowercase", action="store_true", help="lower-case the corpus (the official BookCorpus setting)")
    p.add_argument("--text-field", help="jsonl corpus: the text field (default: first of text, caption, sentence)")


def _add_search(p):
    p.add_argument("--top-k", type=int, default=D["top_k"], help="sentences retrieved per image, K (default: %(default)s, the paper's)")
    p.add_argument("--index", default=D["index"], choices=["flat", "ivf", "hnsw"], help="flat = exact (default), ivf / hnsw = approximate (faiss)")
    p.add_argument("--metric", default=D["metric"], choices=["cosine", "l2"],
                   help="cosine = the paper (normalised vectors, inner product; default); l2 = the official code (IndexFlatL2 on raw vectors)")
    p.add_argument("--exclude-self", action="store_true",
                   help="drop an image's own captions from its candidates (needs a jsonl corpus with image_id); default off, as the official code")
    p.add_argument("--clip-top-k", action="store_true", help="if the corpus has fewer than K sentences, retrieve as many as there are instead of failing")
    p.add_argument("--shard-rows", type=int, default=D["shard_rows"], help="corpus rows searched (or indexed) per resumable shard (default: %(default)s)")
    p.add_argument("--query-block", type=int, default=D["query_block"], help="queries per search call (default: %(default)s)")
    p.add_argument("--search-backend", default=D["search_backend"], choices=["auto", "faiss", "torch"],
                   help="exact search engine: faiss (CPU default) or torch matmul+topk (the GPU path); default: %(default)s")
    p.add_argument("--nlist", type=int, help="ivf: number of lists (default: ~sqrt(N), at least 39 vectors a list)")
    p.add_argument("--nprobe", type=int, default=D["nprobe"], help="ivf: lists probed (default: %(default)s)")
    p.add_argument("--hnsw-m", type=int, default=D["hnsw_m"], help="hnsw: links per node (default: %(default)s)")
    p.add_argument("--ef-construction", type=int, default=D["ef_construction"], help="hnsw: build beam (default: %(default)s)")
    p.add_argument("--ef-search", type=int, default=D["ef_search"], help="hnsw: search beam (default: %(default)s)")
    p.add_argument("--recall-sample", type=int, default=D["recall_sample"], help="ivf/hnsw: queries checked against exact search (default: %(default)s)")


def _add_link(p, out_required):
    p.add_argument("--out", required=out_required, help="output weak corpus .jsonl (one record per image)")
    p.add_argument("--spacy", default=D["spacy"], help="spaCy pipeline for noun chunks (default: %(default)s; known aliases are tried)")
    p.add_argument("--spacy-batch-size", type=int, default=D["spacy_batch_size"], help="nlp.pipe batch size (default: %(default)s)")
    p.add_argument("--spacy-processes", type=int, default=D["spacy_processes"], help="nlp.pipe worker processes (default: %(default)s)")
    p.add_argument("--np-chunk-rows", type=int, default=D["np_chunk_rows"], help="sentences parsed per resumable noun-phrase chunk (default: %(default)s)")
    p.add_argument("--link-sbert", help="SBERT model for tag-phrase similarity (default: the --sbert model, as the official code)")
    p.add_argument("--link-threshold", type=float, default=D["link_threshold"], help="link a tag to a phrase if cosine > t; score s/t (default: %(default)s)")
    p.add_argument("--keep-no-phrase", action="store_true", help="keep images none of whose sentences has a noun phrase (default: dropped, as the official code)")
    p.add_argument("--part-rows", type=int, default=D["part_rows"], help="images per resumable output part (default: %(default)s)")


def make_parser():
    parser = argparse.ArgumentParser(
        prog="python -m mmf_multilevel.weak_corpus",
        description="Build the μ-VLA weakly aligned corpus: tag queries -> SBERT -> top-K sentences -> spaCy noun phrases -> tag/phrase links.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("build", help="all steps: encode, search, link")
    _add_inputs(p, True)
    _add_sbert(p)
    _add_search(p)
    _add_link(p, True)
    _add_common(p)
    p = sub.add_parser("encode", help="prepare and SBERT-encode the corpus and/or the image tag queries into --work")
    _add_inputs(p, False)
    _add_sbert(p)
    _add_common(p)
    p = sub.add_parser("search", help="top-K corpus sentences for every image (needs the encode step in --work)")
    _add_search(p)
    _add_common(p)
    p = sub.add_parser("link", help="noun phrases and tag-phrase links; writes --out (needs the search step in --work)")
    p.add_argument("--sbert", default=D["sbert"], help="SBERT model for the links when --link-sbert is not given (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=D["batch_size"], help="SBERT encode batch size (default: %(default)s)")
    p.add_argument("--chunk-rows", type=int, default=D["chunk_rows"], help="phrases encoded per resumable chunk (default: %(default)s)")
    _add_link(p, True)
    _add_common(p)
    from mmf_multilevel.weak_corpus.picture import add_arguments

    p = sub.add_parser("picture", help="draw one record's tag-phrase links over its image (PNG, and --html a page)")
    add_arguments(p)
    return parser


def main(argv=None):
    args = make_parser().parse_args(argv)
    if args.command == "picture":
        from mmf_multilevel.weak_corpus.picture import run

        return run(args)
    options = {k: v for k, v in vars(args).items() if k != "command"}
    from mmf_multilevel.weak_corpus._util import RetrievalError

    try:
        from mmf_multilevel.weak_corpus.pipeline import Builder, Settings

        if args.command in ("search", "link") and not args.work:
            raise RetrievalError(f"{args.command}: pass --work DIR (the directory the encode step filled)")
        builder = Builder(Settings(**options))
        if args.command == "build":
            builder.build()
        elif args.command == "encode":
            builder.encode()
        elif args.command == "search":
            builder.search()
        else:
            builder.link()
        summary = builder.write_summary()
    except RetrievalError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"command": args.command, **summary}, indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
