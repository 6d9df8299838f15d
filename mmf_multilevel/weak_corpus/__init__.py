"""μ-VLA weakly aligned corpus builder (paper §3.2, §3.3.2): SBERT retrieval, spaCy noun phrases, tag-phrase links.

    python -m mmf_multilevel.weak_corpus build --features feats.lmdb --corpus captions.txt --out weak.jsonl

Library use::

    from mmf_multilevel.weak_corpus import build
    summary = build("tags.jsonl", "captions.txt", "weak.jsonl", sbert="all-MiniLM-L6-v2", top_k=5)

Importing this package is cheap: numpy, torch, faiss, spaCy and sentence-transformers are
imported inside the functions that use them.
"""

_LAZY = {
    "build": "mmf_multilevel.weak_corpus.pipeline",
    "Builder": "mmf_multilevel.weak_corpus.pipeline",
    "Settings": "mmf_multilevel.weak_corpus.pipeline",
    "DEFAULTS": "mmf_multilevel.weak_corpus.pipeline",
    "build_query": "mmf_multilevel.weak_corpus.inputs",
    "link_tags": "mmf_multilevel.weak_corpus.link",
    "exact_search": "mmf_multilevel.weak_corpus.search",
    "load_sbert": "mmf_multilevel.weak_corpus.encoders",
    "load_spacy": "mmf_multilevel.weak_corpus.encoders",
    "RetrievalError": "mmf_multilevel.weak_corpus._util",
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'mmf_multilevel.weak_corpus' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
