"""μ-VLA weakly aligned corpus builder (paper §3.2, §3.3.2): SBERT retrieval, spaCy noun phrases, tag-phrase links.

    python -m mmf_multilevel.retrieval build --features feats.lmdb --corpus captions.txt --out weak.jsonl

Library use::

    from mmf_multilevel.retrieval import build
    summary = build("tags.jsonl", "captions.txt", "weak.jsonl", sbert="all-MiniLM-L6-v2", top_k=5)

Importing this package is cheap: numpy, torch, faiss, spaCy and sentence-transformers are
imported inside the functions that use them.
"""

_LAZY = {
    "build": "mmf_multilevel.retrieval.pipeline",
    "Builder": "mmf_multilevel.retrieval.pipeline",
    "Settings": "mmf_multilevel.retrieval.pipeline",
    "DEFAULTS": "mmf_multilevel.retrieval.pipeline",
    "build_query": "mmf_multilevel.retrieval.inputs",
    "link_tags": "mmf_multilevel.retrieval.link",
    "exact_search": "mmf_multilevel.retrieval.search",
    "load_sbert": "mmf_multilevel.retrieval.models",
    "load_spacy": "mmf_multilevel.retrieval.models",
    "RetrievalError": "mmf_multilevel.retrieval._util",
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'mmf_multilevel.retrieval' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
