"""Image-text retrieval on raw inputs: :meth:`Predictor.retrieve_images
<mmf_multilevel.predict.predictor.Predictor.retrieve_images>` ranks a gallery of images (a folder, or a list) for
one text, :meth:`Predictor.retrieve_texts <mmf_multilevel.predict.predictor.Predictor.retrieve_texts>` a list of
captions (or a ``.txt`` file, one a line) for one image. Every input goes through the dataset's own processors, as
in the predictor's other calls, and the gallery is ranked the way the method's retrieval evaluation ranks; the
model says which way (:meth:`MethodModel.retrieval_encoders
<mmf_multilevel.methods.base.MethodModel.retrieval_encoders>`):

* **matching head** (SemVLP, SOHO and the other single-stream methods: no dual encoder; and pre-training models
  without one): every (query, gallery item) pair goes through the model as a gallery pair of the retrieval
  datasets and is scored by :func:`~mmf_multilevel.metrics.pair_match_scores` of :meth:`MethodModel.match_logits
  <mmf_multilevel.methods.base.MethodModel.match_logits>`, the score :meth:`Predictor.match` gives the pair and,
  for a ``retrieval`` model, what ``mmf_run``'s ``eval_pairs: all`` evaluation ranks by. ``batch_size`` pairs a forward pass; only the scores are
  kept, never the gallery's inputs. Images of different processed sizes (SOHO's aspect-preserving resize) run in
  separate passes instead of being padded into one, so an image scores as it does alone.
* **dual encoder** (SIMLA, MVPTR: a :class:`~mmf_multilevel.methods.dual_encoder.DualEncoder`): each gallery item
  through its uni-modal encoder once, the query through the other; the similarity ranks every item, and when the
  method's evaluation re-ranks (:attr:`DualEncoder.rerank <mmf_multilevel.methods.dual_encoder.DualEncoder.rerank>`:
  SIMLA's ITC top ``k_test`` by ITM, paper §3.6; MVPTR's VSC top ``k_i`` images / ``k_c`` captions by ITM, paper
  §4.2) the query's top k by similarity are re-scored by the matching head, ``batch_size`` pairs at a time, and
  listed first; the others follow by similarity with ``score`` None (ranked last, as
  :func:`~mmf_multilevel.evaluation.retrieval.two_stage_scores` leaves them). MVPTR-Uni (``retrieval.uni``,
  ``projects/mvptr/retrieval_uni.yaml``) ranks by the similarity alone. Only the current top-k candidates'
  embeddings are held in memory.

**Embedding cache** (``cache=`` a folder; dual encoders only): one file per gallery item,
``<folder>/<fingerprint>/<images|texts>/<key[:2]>/<key>.pt``. ``key``: the SHA-256 of the image's encoded bytes
(of the caption's UTF-8; of ``image_id:<id>`` for a region cache's image id); ``fingerprint``: a SHA-256 of the
model's weights, its ``model_config``, the dataset's settings (processors, decoding options) and, for region
methods, the region source, so a different checkpoint or setting never reads another's embeddings
(``<fingerprint>/fingerprint.json`` says what it was computed from). Entries are written through a temporary file
and a rename; one that does not read back as this cache's entry for its key (corrupt, or another file put there)
is an :class:`EmbeddingCacheError` naming the file. A second query over the same gallery computes no gallery
embedding.

**Gallery.** A folder: its files (not sub-folders, not hidden files) sorted by name. A file without one of the
dataset's ``image_extensions``, an image that does not decode, or (region methods) one the region source has no
regions for is reported by name in ``skipped`` (and as a warning) and left out; ``gallery_size`` counts the
items ranked. Equal scores keep the gallery's order.
"""
import hashlib
import json
import os
import warnings
import weakref
from typing import Dict, List, NamedTuple, Optional, Sequence

import torch

from mmf_multilevel.predict.inputs import PredictInputError, checked_text, optional_id, positive_int

__all__ = ["retrieve_images", "retrieve_texts", "EmbeddingCache", "EmbeddingCacheError", "model_fingerprint",
           "weights_digest", "gallery_images", "gallery_texts", "add_retrieval_arguments", "run_cli",
           "DEFAULT_BATCH_SIZE"]

#: pairs (single-stream) or gallery items (dual encoder) a forward pass
DEFAULT_BATCH_SIZE = 32
CACHE_FORMAT = "mmf_multilevel.retrieval_embeddings"
CACHE_VERSION = 1
IMAGES, TEXTS = "images", "texts"


class EmbeddingCacheError(PredictInputError):
    """An embedding cache entry that cannot be read as this cache's entry for its key; the message names the file."""


class Item(NamedTuple):
    """One gallery item: ``index`` (its position in the gallery as given), ``name`` (how results name it: a path,
    ``images[3]``, an image id or the caption), ``value`` (what is read: a path, bytes, a PIL image, an image id or
    the caption), ``kind`` (``path``, ``data``, ``image_id`` or ``text``) and ``line`` (a captions file's line)."""

    index: int
    name: str
    value: object
    kind: str
    line: Optional[int] = None


# ------------------------------------------------------------------ galleries
def image_extensions(predictor) -> tuple:
    """The dataset's ``image_extensions`` (lower case, with the dot), which a gallery folder's images have."""
    from mmf_multilevel.datasets.images import IMAGE_DEFAULTS

    extensions = predictor.dataset_config.get("image_extensions", IMAGE_DEFAULTS["image_extensions"])
    extensions = extensions or IMAGE_DEFAULTS["image_extensions"]
    return tuple(str(e).lower() if str(e).startswith(".") else f".{str(e).lower()}" for e in extensions)


def gallery_images(predictor, images=None, image_ids=None):
    """``(items, skipped)`` of an image gallery: ``images`` a folder (every file with an image extension, sorted by
    name; the other files in ``skipped``) or a list of paths, encoded bytes or PIL images; or ``image_ids`` (region
    methods), images of the region source by id."""
    from PIL import Image

    if (images is None) == (image_ids is None):
        raise PredictInputError("give images (a folder, or a list of image paths, encoded bytes or PIL images) or, "
                                "for a region method, image_ids (images of the region cache), not both")
    if image_ids is not None:
        if predictor.visual != "regions":
            raise PredictInputError(f"image_ids: {predictor.method} reads pixels; give images (a folder or a list)")
        if isinstance(image_ids, (str, bytes)) or not isinstance(image_ids, Sequence):
            raise PredictInputError(f"image_ids: expected a list of image ids, got {type(image_ids).__name__}")
        items = [Item(i, str(optional_id(v)), str(optional_id(v)), "image_id") for i, v in enumerate(image_ids)]
        if not items:
            raise PredictInputError("image_ids: the gallery is empty")
        return items, []
    if isinstance(images, (str, os.PathLike)):
        folder = os.fspath(images)
        if not os.path.isdir(folder):
            raise PredictInputError(f"images {folder!r}: " + ("a file, not a folder" if os.path.exists(folder) else
                                    "no such folder") + " (expected a folder of images or a list of images)")
        extensions = image_extensions(predictor)
        items, skipped = [], []
        for name in sorted(os.listdir(folder)):
            path = os.path.join(folder, name)
            if name.startswith(".") or not os.path.isfile(path):
                continue
            if os.path.splitext(name)[1].lower() in extensions:
                items.append(Item(len(items), path, path, "path"))
            else:
                reads = ", ".join(extensions)
                skipped.append({"image": path, "error": f"not an image file (the dataset reads {reads})"})
        if not items:
            raise PredictInputError(f"images {folder}: no image files ({', '.join(extensions)})"
                                    + (f"; {len(skipped)} other file(s)" if skipped else ""))
        return items, skipped
    if not isinstance(images, Sequence) or isinstance(images, (bytes, bytearray)):
        raise PredictInputError(f"images: expected a folder or a list of image paths, encoded bytes or PIL images, got "
                                f"{type(images).__name__}")
    items = []
    for index, image in enumerate(images):
        if isinstance(image, (str, os.PathLike)):
            items.append(Item(index, os.fspath(image), os.fspath(image), "path"))
        elif isinstance(image, (bytes, bytearray, memoryview, Image.Image)):
            items.append(Item(index, f"images[{index}]", image, "data"))
        else:
            raise PredictInputError(f"images[{index}]: expected an image path, encoded image bytes or a PIL.Image, got "
                                    f"{type(image).__name__}")
    if not items:
        raise PredictInputError("images: the gallery is empty")
    return items, []


def gallery_texts(texts) -> List[Item]:
    """The captions of ``texts``: a list of strings, or a ``.txt`` file (UTF-8, one caption a line; blank lines are
    not captions)."""
    if isinstance(texts, (str, os.PathLike)):
        path = os.fspath(texts)
        if not os.path.isfile(path):
            raise PredictInputError(f"texts {path!r}: no such file (expected a .txt file, one caption a line, or a "
                                    "list of captions)")
        try:
            with open(path, encoding="utf-8") as handle:
                lines = handle.read().splitlines()
        except UnicodeDecodeError as error:
            raise PredictInputError(f"texts {path}: not UTF-8 text ({error})") from None
        items = []
        for number, line in enumerate(lines, 1):
            if line.strip():
                text = checked_text(line.strip(), f"texts {path} line {number}")
                items.append(Item(len(items), text, text, "text", number))
        if not items:
            raise PredictInputError(f"texts {path}: no captions (one a line)")
        return items
    if not isinstance(texts, Sequence) or isinstance(texts, (bytes, bytearray)):
        raise PredictInputError(f"texts: expected a list of captions or a .txt file, got {type(texts).__name__}")
    items = [Item(i, checked_text(t, f"texts[{i}]"), t, "text") for i, t in enumerate(texts)]
    if not items:
        raise PredictInputError("texts: the gallery is empty")
    return items


# ------------------------------------------------------------------ fingerprint and cache
_DIGESTS = weakref.WeakKeyDictionary()


def weights_digest(model) -> str:
    """A BLAKE2b digest of every tensor of ``model``'s state dict (names, dtypes, shapes, bytes); remembered until a
    tensor is replaced or changed in place (its version counter), so a reload of other weights gives a new one."""
    state = {name: t for name, t in model.state_dict(keep_vars=True).items() if isinstance(t, torch.Tensor)}
    stamp = tuple((name, t.data_ptr(), t._version, str(t.dtype), tuple(t.shape)) for name, t in state.items())
    remembered = _DIGESTS.get(model)
    if remembered is not None and remembered[0] == stamp:
        return remembered[1]
    digest = hashlib.blake2b(digest_size=32)
    for name, tensor in state.items():
        tensor = tensor.detach()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        if tensor.numel():
            digest.update(tensor.cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    _DIGESTS[model] = (stamp, digest.hexdigest())
    return _DIGESTS[model][1]


def _plain(config):
    from omegaconf import OmegaConf

    if not OmegaConf.is_config(config):
        return config
    try:
        return OmegaConf.to_container(config, resolve=True)
    except Exception:  # an interpolation that does not resolve here: the unresolved text identifies it as well
        return OmegaConf.to_container(config, resolve=False)


def region_source_identity(source) -> dict:
    """What a region source's records depend on: its class and path (a region cache) or its detector and weights."""
    identity = {"class": f"{type(source).__module__}.{type(source).__qualname__}"}
    path = getattr(source, "path", None)
    if isinstance(path, (str, os.PathLike)):
        identity["path"] = os.path.abspath(path) if os.path.exists(path) else str(path)
    for name in ("model_name", "weights_sha256", "info", "min_size", "max_size", "feature_dim"):
        if hasattr(source, name):
            identity[name] = getattr(source, name)
    return identity


def fingerprint_settings(predictor) -> dict:
    """What the gallery embeddings depend on besides the item itself (the weights as :func:`weights_digest`)."""
    settings = {"format": CACHE_FORMAT, "version": CACHE_VERSION, "method": predictor.method,
                "dataset": predictor.dataset_name, "dataset_config": _plain(predictor.dataset_config),
                "model_config": _plain((predictor.config.get("model_config") or {}).get(predictor.method)),
                "weights": weights_digest(predictor.model)}
    if predictor.visual == "regions":
        settings["regions"] = region_source_identity(predictor.region_source)
    return settings


def model_fingerprint(predictor) -> str:
    """The SHA-256 of :func:`fingerprint_settings`: the cache folder of this model's embeddings."""
    return _digest(fingerprint_settings(predictor))


def _digest(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode("utf-8")).hexdigest()


class EmbeddingCache:
    """Gallery embeddings of one model on disk (see the module docstring): :meth:`get` / :meth:`put` one item's
    embeddings (a dict of tensors with one row) by ``kind`` (``images`` or ``texts``) and key."""

    def __init__(self, folder, fingerprint: str, settings: Optional[dict] = None):
        folder = os.fspath(folder)
        if os.path.exists(folder) and not os.path.isdir(folder):
            raise PredictInputError(f"cache {folder}: a file, not a folder (the embedding cache is a folder)")
        self.folder, self.fingerprint = folder, fingerprint
        self.root = os.path.join(folder, fingerprint)
        os.makedirs(self.root, exist_ok=True)
        about = os.path.join(self.root, "fingerprint.json")
        if settings is not None and not os.path.exists(about):
            from mmf_multilevel.files import write_bytes_atomically

            text = json.dumps({"fingerprint": fingerprint, **settings}, indent=1, sort_keys=True, default=str)
            write_bytes_atomically(about, (text + "\n").encode("utf-8"))
        self.hits = self.written = 0

    def path(self, kind: str, key: str) -> str:
        return os.path.join(self.root, kind, key[:2], f"{key}.pt")

    def get(self, kind: str, key: str, device=None) -> Optional[Dict[str, torch.Tensor]]:
        """The entry's embeddings on ``device``, or None when there is none."""
        path = self.path(kind, key)
        if not os.path.exists(path):
            return None
        hint = "; delete the file and it is computed again"
        try:
            entry = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # a truncated or foreign file fails in pickle, zip or torch: all mean unreadable
            raise EmbeddingCacheError(f"embedding cache entry {path}: unreadable ({type(error).__name__}: "
                                      f"{error}){hint}") from None
        problem = self._problem(entry, kind, key)
        if problem:
            raise EmbeddingCacheError(f"embedding cache entry {path}: {problem}{hint}")
        self.hits += 1
        return {name: value.to(device) if device is not None else value for name, value in entry["embeddings"].items()}

    def _problem(self, entry, kind, key) -> Optional[str]:
        if not isinstance(entry, dict) or entry.get("format") != CACHE_FORMAT:
            return f"not an entry of an embedding cache (expected a dict with format {CACHE_FORMAT!r})"
        if entry.get("version") != CACHE_VERSION:
            return f"written in format version {entry.get('version')!r}, this one reads {CACHE_VERSION}"
        expected = {"fingerprint": self.fingerprint, "kind": kind, "key": key}
        for name, value in expected.items():
            if entry.get(name) != value:
                return f"holds {name} {entry.get(name)!r}, not this entry's {value!r}"
        embeddings = entry.get("embeddings")
        if not isinstance(embeddings, dict) or not embeddings:
            return "holds no embeddings"
        for name, value in embeddings.items():
            if not isinstance(value, torch.Tensor) or value.dim() < 1 or value.size(0) != 1:
                return f"embedding {name!r} is not a tensor of one row"
        return None

    def put(self, kind: str, key: str, embeddings: Dict[str, torch.Tensor]) -> None:
        from mmf_multilevel.files import save_torch_atomically

        path = self.path(kind, key)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        rows = {name: value.detach().cpu().clone() for name, value in embeddings.items()}  # the row, not the batch
        save_torch_atomically({"format": CACHE_FORMAT, "version": CACHE_VERSION, "fingerprint": self.fingerprint,
                               "kind": kind, "key": key, "embeddings": rows}, path)
        self.written += 1

    def summary(self) -> dict:
        return {"folder": self.folder, "fingerprint": self.fingerprint, "hits": self.hits, "written": self.written}


# ------------------------------------------------------------------ reading items
def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _image_input(predictor, item: Item):
    """``(key, image, image_id)`` of an image item: its cache key and what :meth:`Predictor._visual` reads."""
    if item.kind == "image_id":
        return _sha256(f"image_id:{item.value}".encode("utf-8")), None, item.value
    if item.kind == "path":
        if not os.path.isfile(item.value):
            raise PredictInputError(f"image {item.value}: no such file")
        try:
            with open(item.value, "rb") as handle:
                data = handle.read()
        except OSError as error:
            raise PredictInputError(f"image {item.value}: cannot be read ({error.strerror or error})") from None
        return _sha256(data), data, None
    if isinstance(item.value, (bytes, bytearray, memoryview)):
        data = bytes(item.value)
        return _sha256(data), data, None
    query = predictor._decode(item.value, item.name)  # a PIL image: keyed as the predictor keys one
    return query.sha256, query, None


def _image_sample(predictor, item: Item, image, image_id):
    where = f"image {item.name}" if item.kind != "image_id" else "image"
    return predictor._visual(image, image_id, where)[0]


def _shape_of(value):
    if isinstance(value, torch.Tensor):
        return tuple(value.shape)
    if isinstance(value, dict):
        return tuple((key, _shape_of(v)) for key, v in value.items())
    return None


def _same_shapes(indices, samples):
    """``indices`` grouped by the shapes of their samples' tensors (one forward pass each, nothing padded)."""
    groups = {}
    for index in indices:
        groups.setdefault(_shape_of(samples[index]), []).append(index)
    return list(groups.values())


def _chunks(items, size):
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _progress(total, unit, desc, progress):
    from tqdm import tqdm

    return tqdm(total=total, unit=unit, desc=desc, disable=None if progress is None else not progress, leave=False)


def _checked_counts(top_k, batch_size):
    positive_int(top_k, "top_k")
    positive_int(batch_size, "batch_size")


# ------------------------------------------------------------------ the two ways of ranking
class _Ranking:
    """What a retrieval call collects: the gallery's scores (and similarities), the skipped items."""

    def __init__(self, side: str, items: List[Item], skipped: list):
        self.side, self.items, self.skipped = side, items, skipped
        self.field = "image" if side == IMAGES else "text"
        self.scored = []  # gallery positions ranked, in gallery order
        self.scores = {}  # position -> score (None: not re-ranked)
        self.similarity = {}  # position -> first-stage similarity (dual encoders)

    def skip(self, item: Item, error: Exception):
        message = str(error)
        entry = {self.field: item.name, "error": message}
        if item.line is not None:
            entry["line"] = item.line
        self.skipped.append(entry)
        warnings.warn(f"retrieval: {item.name} left out of the gallery: {message}", stacklevel=3)

    def result(self, top_k: int, scoring: str, cache: Optional[EmbeddingCache]) -> dict:
        if not self.scored:
            first = self.skipped[0]["error"] if self.skipped else "nothing to rank"
            raise PredictInputError(f"{self.side}: none of the {len(self.skipped)} gallery {self.side} could be read "
                                    f"(the first: {first})")

        def order(position):
            score, similarity = self.scores[position], self.similarity.get(position, 0.0)
            return (0, -score, position) if score is not None else (1, -similarity, position)

        ranked = sorted(self.scored, key=order)[:top_k]
        results = []
        for rank, position in enumerate(ranked, 1):
            item = self.items[position]
            entry = {"rank": rank, "index": item.index, self.field: item.name, "score": self.scores[position]}
            if item.line is not None:
                entry["line"] = item.line
            if position in self.similarity:
                entry["similarity"] = self.similarity[position]
            results.append(entry)
        return {"gallery_size": len(self.scored), "scoring": scoring, "results": results, "skipped": self.skipped,
                "num_skipped": len(self.skipped), "cache": cache.summary() if cache is not None else None}


def _pair_fields(sample, image_index: int, text_index: int):
    # a gallery pair, as the retrieval datasets' evaluation samples are (and Predictor.match builds one)
    sample.pair_image_index = torch.tensor(image_index, dtype=torch.long)
    sample.pair_text_index = torch.tensor(text_index, dtype=torch.long)
    return sample


def _rank_by_matching_head(predictor, ranking: _Ranking, pair_of, batch_size, progress):
    """Single-stream: ``pair_of(position, item) -> sample`` of each (query, item) pair through the model in
    batches of ``batch_size`` pairs, scored by ``pair_match_scores``."""
    from mmf_multilevel.metrics import pair_match_scores

    positions = list(range(len(ranking.items)))
    with _progress(len(positions), ranking.field, f"{predictor.method} retrieval", progress) as bar:
        for chunk in _chunks(positions, batch_size):
            samples = {}
            for position in chunk:
                try:
                    samples[position] = pair_of(position, ranking.items[position])
                except PredictInputError as error:
                    ranking.skip(ranking.items[position], error)
            for group in _same_shapes(list(samples), samples):
                scores = predictor._run_model(predictor.model.match_logits, [samples[p] for p in group])
                for position, score in zip(group, pair_match_scores(scores.float().cpu()).tolist()):
                    ranking.scores[position] = float(score)
                    ranking.scored.append(position)
            bar.update(len(chunk))
    ranking.scored.sort()


def _rank_by_dual_encoder(predictor, encoder, ranking: _Ranking, query, key_of, sample_of, cache, batch_size, progress):
    """Dual encoder: the gallery's embeddings (from ``cache`` or encoded ``batch_size`` items a pass and written
    to it), their similarity with the ``query``'s embeddings; with re-ranking, the top k by similarity re-scored by
    the matching head."""
    from mmf_multilevel.methods.dual_encoder import concat_rows, select_rows

    images_side = ranking.side == IMAGES
    encode = encoder.encode_images if images_side else encoder.encode_texts
    k = None if encoder.rerank is None else int(encoder.rerank[1] if images_side else encoder.rerank[0])
    candidates = None  # (similarities, positions, embeddings) of the current top k
    positions = list(range(len(ranking.items)))
    with _progress(len(positions), ranking.field, f"{predictor.method} retrieval", progress) as bar:
        for chunk in _chunks(positions, batch_size):
            rows, keys, samples = {}, {}, {}
            for position in chunk:
                item = ranking.items[position]
                try:
                    key, inputs = key_of(item)
                    found = None
                    if cache is not None:
                        with predictor._stage("cache"):
                            found = cache.get(ranking.side, key, predictor.device)
                    if found is None:
                        samples[position] = sample_of(item, inputs)
                    else:
                        rows[position] = found
                    keys[position] = key
                except EmbeddingCacheError:
                    raise
                except PredictInputError as error:
                    ranking.skip(item, error)
            missing = [p for p in keys if p not in rows]
            for group in _same_shapes(missing, samples):
                embeddings = predictor._run_model(encode, [samples[p] for p in group])
                for row, position in enumerate(group):
                    rows[position] = select_rows(embeddings, torch.tensor([row]))
                    if cache is not None:
                        with predictor._stage("cache"):
                            cache.put(ranking.side, keys[position], rows[position])
            done = [p for p in chunk if p in rows]
            if done:
                gallery = concat_rows([rows[p] for p in done])
                with predictor._stage("model"):
                    similarity = (encoder.similarity(gallery, query) if images_side
                                  else encoder.similarity(query, gallery).t())
                similarity = similarity.float().reshape(-1)
                for position, value in zip(done, similarity.cpu().tolist()):
                    ranking.similarity[position] = float(value)
                    ranking.scores[position] = float(value) if k is None else None
                    ranking.scored.append(position)
                if k is not None:  # keep the k best so far, with their embeddings
                    chunk_positions = torch.tensor(done)
                    if candidates is not None:
                        similarity = torch.cat([candidates[0], similarity])
                        chunk_positions = torch.cat([candidates[1], chunk_positions])
                        gallery = concat_rows([candidates[2], gallery])
                    keep = similarity.topk(min(k, similarity.numel())).indices
                    candidates = (similarity[keep], chunk_positions[keep.cpu()], select_rows(gallery, keep))
            bar.update(len(chunk))
    ranking.scored.sort()
    if candidates is None:
        return
    similarity, chosen, gallery = candidates
    for start in range(0, chosen.numel(), batch_size):
        part = torch.arange(start, min(start + batch_size, chosen.numel()))
        rows = select_rows(gallery, part)
        repeated = select_rows(query, torch.zeros(part.numel(), dtype=torch.long))
        with predictor._stage("model"):
            scores = encoder.match(rows, repeated) if images_side else encoder.match(repeated, rows)
        for position, score in zip(chosen[part].tolist(), scores.float().cpu().tolist()):
            ranking.scores[position] = float(score)


def _setup(predictor, top_k, batch_size, cache):
    """``(the method's dual encoder or None, the cache or None)``; refuses a model its retrieval does not rank with."""
    from mmf_multilevel.predict.predictor import MATCH_HEAD_TYPES

    _checked_counts(top_k, batch_size)
    hook = getattr(predictor.model, "retrieval_encoders", None)
    encoder = hook() if hook is not None else None
    if encoder is None:
        predictor._require("retrieval", MATCH_HEAD_TYPES)
        if cache is not None:
            raise PredictInputError(f"cache: {predictor.method} scores every (image, text) pair with its matching "
                                    "head, so there are no per-item embeddings to keep; drop the embedding cache")
        return None, None
    if cache is None:
        return encoder, None
    with predictor._stage("cache"):
        settings = fingerprint_settings(predictor)
        return encoder, EmbeddingCache(cache, _digest(settings), settings)


def _scoring(predictor, encoder) -> str:
    if encoder is None:
        return (f"the {predictor.method} matching head on every pair (pair_match_scores, as Predictor.match and the "
                "retrieval evaluation score a pair)")
    return encoder.description


@torch.no_grad()
def retrieve_images(predictor, text: str, images=None, top_k: int = 5, cache=None,
                    batch_size: int = DEFAULT_BATCH_SIZE, image_ids=None, progress=None) -> dict:
    """The gallery's images ranked for ``text`` (see the module docstring); ``{"text", "gallery_size", "scoring",
    "results": [{"rank", "index", "image", "score"[, "similarity"]}] (the ``top_k`` best), "skipped",
    "num_skipped", "cache"}``."""
    predictor.profile = {}
    encoder, store = _setup(predictor, top_k, batch_size, cache)
    fields = predictor.text_fields(text, "text")
    items, skipped = gallery_images(predictor, images, image_ids)
    ranking = _Ranking(IMAGES, items, skipped)
    if encoder is None:
        def pair_of(position, item):
            _, image, image_id = _image_input(predictor, item)
            sample = _image_sample(predictor, item, image, image_id)
            sample.update(fields)
            return _pair_fields(sample, position, 0)

        _rank_by_matching_head(predictor, ranking, pair_of, batch_size, progress)
    else:
        from mmf.common.sample import Sample

        query = predictor._run_model(encoder.encode_texts, [Sample(fields)])

        def key_of(item):
            key, image, image_id = _image_input(predictor, item)
            return key, (image, image_id)

        def sample_of(item, inputs):
            return _image_sample(predictor, item, *inputs)

        _rank_by_dual_encoder(predictor, encoder, ranking, query, key_of, sample_of, store, batch_size, progress)
    return {"text": text, **ranking.result(top_k, _scoring(predictor, encoder), store)}


@torch.no_grad()
def retrieve_texts(predictor, image=None, texts=(), top_k: int = 5, cache=None, batch_size: int = DEFAULT_BATCH_SIZE,
                   image_id=None, progress=None) -> dict:
    """The captions ``texts`` (a list, or a ``.txt`` file one a line) ranked for ``image`` (region methods may name
    it by ``image_id``); ``{"gallery_size", "scoring", "results": [{"rank", "index", "text", "score"[,
    "similarity"][, "line"]}] (the ``top_k`` best), "skipped", "num_skipped", "cache"}``."""
    from mmf.common.sample import Sample

    predictor.profile = {}
    encoder, store = _setup(predictor, top_k, batch_size, cache)
    items = gallery_texts(texts)
    visual, _, _ = predictor._visual(image, image_id, "image")
    ranking = _Ranking(TEXTS, items, [])
    if encoder is None:
        def pair_of(position, item):
            sample = Sample(dict(visual))
            sample.update(predictor.text_fields(item.value, f"texts[{item.index}]"))
            return _pair_fields(sample, 0, position)

        _rank_by_matching_head(predictor, ranking, pair_of, batch_size, progress)
    else:
        query = predictor._run_model(encoder.encode_images, [visual])

        def key_of(item):
            return _sha256(item.value.encode("utf-8")), None

        def sample_of(item, _):
            return Sample(predictor.text_fields(item.value, f"texts[{item.index}]"))

        _rank_by_dual_encoder(predictor, encoder, ranking, query, key_of, sample_of, store, batch_size, progress)
    return ranking.result(top_k, _scoring(predictor, encoder), store)


# ------------------------------------------------------------------ mmf_ml_predict
def add_retrieval_arguments(parser) -> None:
    """``mmf_ml_predict``'s retrieval options (one group)."""
    group = parser.add_argument_group("image-text retrieval (top --top-k, JSON)")
    task = group.add_mutually_exclusive_group()
    task.add_argument("--retrieve-images", default=None, metavar="FOLDER",
                      help="rank the images of FOLDER for --text")
    task.add_argument("--retrieve-texts", default=None, metavar="CAPTIONS.txt",
                      help="rank the captions of a .txt file (one a line) for --image (or --image-id)")
    group.add_argument("--embedding-cache", default=None, metavar="DIR",
                       help="dual-encoder methods (SIMLA, MVPTR): keep the gallery's embeddings in DIR")
    group.add_argument("--retrieval-batch-size", type=int, default=DEFAULT_BATCH_SIZE, metavar="N",
                       help=f"pairs (matching head) or gallery items (dual encoder) a forward pass "
                            f"(default {DEFAULT_BATCH_SIZE})")


def wants_retrieval(args) -> bool:
    return args.retrieve_images is not None or args.retrieve_texts is not None


def run_cli(parser, args) -> int:
    """``--retrieve-images`` / ``--retrieve-texts``: the ranking as JSON on stdout; 2 for a configuration mistake."""
    import contextlib
    import sys

    from mmf_multilevel.compat.launcher import ConfigError
    from mmf_multilevel.predict.cli import BatchLineError, region_source
    from mmf_multilevel.predict.predictor import load_predictor

    if args.batch is not None or args.picture is not None or args.question is not None:
        parser.error("--retrieve-images / --retrieve-texts rank one query: not with --batch, --picture or --question")
    if args.retrieve_images is not None:
        if args.text is None:
            parser.error("--retrieve-images needs --text (the query)")
        if args.image is not None or args.image_id is not None:
            parser.error("--retrieve-images ranks the folder's images for --text: drop --image / --image-id")
    else:
        if args.image is None and args.image_id is None:
            parser.error("--retrieve-texts needs --image (or, for a region method, --image-id)")
        if args.text is not None:
            parser.error("--retrieve-texts ranks the file's captions for --image: drop --text")
    try:
        with contextlib.redirect_stdout(sys.stderr):  # MMF's config messages: stdout carries the JSON alone
            predictor = load_predictor(args.model or args.config, args.checkpoint, args.opts,
                                       regions=region_source(args), device=args.device)
        common = dict(top_k=args.top_k, cache=args.embedding_cache, batch_size=args.retrieval_batch_size,
                      progress=None)
        if args.retrieve_images is not None:
            result = {"task": "retrieve_images",
                      **predictor.retrieve_images(args.text, args.retrieve_images, **common)}
            result["images"] = args.retrieve_images
        else:
            result = {"task": "retrieve_texts", "image": args.image, "image_id": args.image_id,
                      **predictor.retrieve_texts(args.image, args.retrieve_texts, image_id=args.image_id, **common)}
            result["texts"] = args.retrieve_texts
    except (ConfigError, PredictInputError, BatchLineError, FileNotFoundError, KeyError, ValueError,
            NotImplementedError) as error:
        print(f"mmf_ml_predict: error: {error}", file=sys.stderr)
        return 2
    for skipped in result["skipped"]:
        name = skipped.get("image", skipped.get("text"))
        print(f"mmf_ml_predict: skipped {name}: {skipped['error']}", file=sys.stderr)
    if args.profile:
        result["profile"] = {stage: round(seconds, 6) for stage, seconds in predictor.profile.items()}
    print(json.dumps({"method": predictor.method, **result}, indent=1))
    return 0
