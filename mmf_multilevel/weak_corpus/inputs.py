"""Inputs of the builder: the text corpus, the images' object tags, and the tag queries (paper §3.2).

The corpus (``.txt``: one sentence a line; ``.jsonl``: one object a line with a text field and,
for ``--exclude-self``, the ``image_id`` the sentence belongs to) is cleaned once into the work
directory as ``corpus/text.txt`` + ``corpus/offsets.npy`` (byte offsets, random access by row).
Row numbers of that file are the corpus ids used everywhere after.

The images come from a tags jsonl (``{"image_id": ..., "tags": [...], "boxes": [...], "conf": [...]}``)
or from a region feature cache (LMDB, :class:`mmf_multilevel.features.FeatureCacheReader`),
whose records hold class *ids*; their names come from ``--object-vocab FILE`` (one class name a
line, line i = id i, VG-1600 style) or from the cache header field ``info.object_names``.
"""
import array
import json
import os
import re

import numpy as np

from mmf_multilevel.weak_corpus._util import (
    AtomicFile,
    RetrievalError,
    atomic_write_bytes,
    atomic_write_json,
    progress,
    read_json,
)

TEXT_FIELDS = ("text", "caption", "sentence")
_SPACES = re.compile(r"\s+")

# Official query filter (not in the paper): keep a detection with conf >= 0.3 and box area >= 1% of the image.
DEFAULT_MIN_CONF = 0.3
DEFAULT_MIN_AREA = 0.01
QUERY_MODES = ("ranked", "unique", "all")


def _clean(text, lowercase):
    text = _SPACES.sub(" ", text).strip()
    return text.lower() if lowercase else text


def _file_signature(path):
    st = os.stat(path)
    return {"path": os.path.abspath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _iter_lines(path, desc):
    """Yield (line_number, raw bytes without the newline) with a byte progress bar."""
    size = os.path.getsize(path)
    with open(path, "rb") as f, progress(total=size, desc=desc, unit="B") as bar:
        for lineno, raw in enumerate(f, 1):
            bar.update(len(raw))
            if raw.endswith(b"\n"):
                raw = raw[:-1]
            if raw.endswith(b"\r"):
                raw = raw[:-1]
            yield lineno, raw


# --------------------------------------------------------------------------- corpus
def _jsonl_text(line, where, fields, seen_ids, local):
    """``(text, owner image id or None)`` of one jsonl corpus line, or None if it is skipped (counted in ``local``)."""
    if not line.strip():
        local.problem("corpus_empty_line", f"{where}: empty line skipped")
        return None
    try:
        item = json.loads(line)
    except ValueError as exc:
        local.problem("corpus_bad_json", f"{where}: not valid JSON ({exc}); line skipped")
        return None
    if not isinstance(item, dict):
        local.problem("corpus_bad_json", f"{where}: expected a JSON object, got {type(item).__name__}; line skipped")
        return None
    field = next((k for k in fields if k in item), None)
    if field is None:
        local.problem("corpus_missing_text", f"{where}: no text field (expected one of {list(fields)}); line skipped")
        return None
    text = item[field]
    if not isinstance(text, str):
        local.problem("corpus_missing_text", f"{where}: field {field!r} must be a string, got {type(text).__name__}; line skipped")
        return None
    if "id" in item:
        key = str(item["id"])
        if key in seen_ids:
            local.problem("corpus_duplicate_id", f"{where}: id {item['id']!r} already seen; line skipped (first one kept)")
            return None
        seen_ids.add(key)
    owner = str(item["image_id"]) if item.get("image_id") is not None else None
    return text, owner


def prepare_corpus(corpus_path, out_dir, report, lowercase=False, text_field=None):
    """Clean ``corpus_path`` into ``out_dir`` (text.txt, offsets.npy, owners.json, info.json); returns info.

    Skipped (and counted in ``report``): empty lines, lines that are not UTF-8, jsonl lines that
    are not a JSON object or lack a text, repeated jsonl ``id`` values. Re-running with the same
    file (size and mtime) and options reuses the prepared copy.
    """
    if not os.path.isfile(corpus_path):
        raise RetrievalError(f"--corpus {corpus_path}: no such file")
    signature = {**_file_signature(corpus_path), "lowercase": bool(lowercase), "text_field": text_field}
    info_path = os.path.join(out_dir, "info.json")
    if os.path.exists(info_path):
        info = read_json(info_path)
        if info.get("signature") == signature:
            report.merge_counts(info.get("problems", {}), info.get("examples"))
            return info
    os.makedirs(out_dir, exist_ok=True)
    is_jsonl = corpus_path.endswith((".jsonl", ".json"))
    fields = (text_field,) if text_field else TEXT_FIELDS
    from mmf_multilevel.weak_corpus._util import Report

    local = Report(stream=report.stream, quiet=report.quiet)
    offsets = array.array("q", [0])  # 8 bytes a row (a 14M-line corpus: 112 MB)
    owners = []
    any_owner = False
    seen_ids = set()
    position = 0
    with AtomicFile(os.path.join(out_dir, "text.txt"), "wb") as out:
        for lineno, raw in _iter_lines(corpus_path, "read corpus"):
            where = f"{corpus_path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                local.problem("corpus_not_utf8", f"{where}: not UTF-8 (byte {exc.start}: {raw[exc.start:exc.start + 1]!r}); line skipped")
                continue
            owner = None
            if is_jsonl:
                parsed = _jsonl_text(line, where, fields, seen_ids, local)
                if parsed is None:
                    continue
                text, owner = parsed
                any_owner = any_owner or owner is not None
            else:
                text = line
            text = _clean(text, lowercase)
            if not text:
                local.problem("corpus_empty_line", f"{where}: empty {'text' if is_jsonl else 'line'} skipped")
                continue
            data = text.encode("utf-8") + b"\n"
            out.write(data)
            position += len(data)
            offsets.append(position)
            owners.append(owner)
    rows = len(offsets) - 1
    atomic_write_bytes(os.path.join(out_dir, "offsets.npy"), _npy_bytes(np.frombuffer(offsets, dtype=np.int64)))
    atomic_write_json(os.path.join(out_dir, "owners.json"), owners if any_owner else None)
    info = {"signature": signature, "rows": rows, "has_owners": any_owner, "problems": dict(local.counts), "examples": local.examples}
    atomic_write_json(info_path, info)
    report.merge_counts(local.counts, local.examples)
    return info


def _npy_bytes(array):
    import io

    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


class CorpusText:
    """Random access to the prepared corpus by row (``texts(a, b)``, ``text(i)``)."""

    def __init__(self, corpus_dir):
        self.dir = corpus_dir
        self.offsets = np.load(os.path.join(corpus_dir, "offsets.npy"), mmap_mode="r")
        self.path = os.path.join(corpus_dir, "text.txt")
        self._f = open(self.path, "rb")

    def __len__(self):
        return len(self.offsets) - 1

    def texts(self, start, stop):
        a, b = int(self.offsets[start]), int(self.offsets[stop])
        self._f.seek(a)
        return self._f.read(b - a).decode("utf-8").split("\n")[: stop - start]

    def text(self, i):
        return self.texts(i, i + 1)[0]

    def owners(self):
        return read_json(os.path.join(self.dir, "owners.json"))

    def close(self):
        self._f.close()


# --------------------------------------------------------------------------- queries
def build_query(tags, conf=None, boxes=None, image_w=None, image_h=None, mode="ranked", min_conf=DEFAULT_MIN_CONF, min_area=DEFAULT_MIN_AREA):
    """The pseudo-sentence of one image's tags; returns ``(query, used_fallback)``.

    ``ranked`` (default, the official builder's ``sort_objects``; not in the paper): keep a detection
    if ``conf >= min_conf`` and ``area / (W*H) >= min_area`` (a test whose data are missing is not
    applied), score each class ``10*count/total + 10*max_area_ratio`` over the kept detections,
    and join the distinct classes by score, highest first (ties: first appearance). If the filter
    keeps nothing, all detections are used (``used_fallback`` is then True).
    ``unique``: distinct tags in first-appearance order (the paper's Fig. 4 shows such lists).
    ``all``: every tag with repeats, in region order (the R-T input's tag sequence).
    """
    if mode == "all":
        return " ".join(tags), False
    if mode == "unique":
        return " ".join(dict.fromkeys(tags)), False
    if mode != "ranked":
        raise RetrievalError(f"query mode must be one of {QUERY_MODES}, got {mode!r}")
    n = len(tags)
    ratio = [None] * n
    if boxes is not None and image_w and image_h:
        for i, box in enumerate(boxes):
            ratio[i] = max(0.0, float(box[2]) - float(box[0])) * max(0.0, float(box[3]) - float(box[1])) / (float(image_w) * float(image_h))

    def keep(i):
        if conf is not None and float(conf[i]) < min_conf:
            return False
        if ratio[i] is not None and ratio[i] < min_area:
            return False
        return True

    kept = [i for i in range(n) if keep(i)]
    fallback = not kept
    if fallback:
        kept = list(range(n))
    counts, max_ratio, first = {}, {}, {}
    for i in kept:
        tag = tags[i]
        counts[tag] = counts.get(tag, 0) + 1
        max_ratio[tag] = max(max_ratio.get(tag, 0.0), ratio[i] or 0.0)
        first.setdefault(tag, len(first))
    total = len(kept)
    score = {tag: 10.0 * counts[tag] / total + 10.0 * max_ratio[tag] for tag in counts}
    order = sorted(counts, key=lambda t: (-score[t], first[t]))
    return " ".join(order), fallback


# --------------------------------------------------------------------------- images
def read_object_vocab(path):
    """Class names, one a line (line i = class id i); blank lines are an error (ids would shift)."""
    if not os.path.isfile(path):
        raise RetrievalError(f"--object-vocab {path}: no such file")
    names = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                name = raw.decode("utf-8").strip()
            except UnicodeDecodeError:
                raise RetrievalError(f"{path}:{lineno}: the object vocabulary is not UTF-8") from None
            if not name:
                raise RetrievalError(f"{path}:{lineno}: empty class name (line i must hold the name of class id i)")
            # VG vocabularies sometimes list synonyms "name,alias": the first is the class name
            names.append(name.split(",")[0].strip())
    if not names:
        raise RetrievalError(f"{path}: the object vocabulary is empty")
    return names


def _data_file(path):
    """The file whose size/mtime identify an input (an LMDB folder: its data.mdb)."""
    if os.path.isdir(path) and os.path.exists(os.path.join(path, "data.mdb")):
        return os.path.join(path, "data.mdb")
    return path


def _is_feature_cache(path):
    return os.path.isdir(path) or path.endswith((".lmdb", ".mdb"))


def _image_id_of(value):
    return value if isinstance(value, (int, str)) and not isinstance(value, bool) else None


def _iter_tags_jsonl(path, report):
    for lineno, raw in _iter_lines(path, "read image tags"):
        where = f"{path}:{lineno}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            report.problem("images_not_utf8", f"{where}: not UTF-8 (byte {exc.start}); image skipped")
            continue
        if not line.strip():
            report.problem("images_empty_line", f"{where}: empty line skipped")
            continue
        try:
            item = json.loads(line)
        except ValueError as exc:
            report.problem("images_bad_json", f"{where}: not valid JSON ({exc}); line skipped")
            continue
        if not isinstance(item, dict):
            report.problem("images_bad_json", f"{where}: expected a JSON object, got {type(item).__name__}; line skipped")
            continue
        image_id = _image_id_of(item.get("image_id"))
        if image_id is None:
            report.problem("images_missing_id", f"{where}: 'image_id' must be a string or an int, got {item.get('image_id')!r}; line skipped")
            continue
        tags = item.get("tags", item.get("objects"))
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            report.problem("images_bad_tags", f"{where}: image {image_id!r}: 'tags' must be a list of strings, got {tags!r:.80}; image skipped")
            continue
        tags = [_SPACES.sub(" ", t).strip() for t in tags]
        if any(not t for t in tags):
            report.problem("images_bad_tags", f"{where}: image {image_id!r}: empty tag string in 'tags'; image skipped")
            continue
        n = len(tags)
        rec = {"image_id": image_id, "tags": tags, "where": where}
        for field, alias in (("boxes", "bbox"), ("conf", "scores")):
            value = item.get(field, item.get(alias))
            if value is None:
                continue
            try:
                arr = np.asarray(value, dtype=np.float64)
            except (TypeError, ValueError):
                arr = None
            expected = (n, 4) if field == "boxes" else (n,)
            if arr is None or arr.shape != expected:
                shape = None if arr is None else arr.shape
                report.problem("images_bad_field", f"{where}: image {image_id!r}: {field!r} has shape {shape}, expected {expected}; field ignored")
                continue
            rec[field] = arr
        for field in ("image_w", "image_h"):
            value = item.get(field, item.get({"image_w": "image_width", "image_h": "image_height"}[field]))
            if value is not None:
                if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
                    rec[field] = float(value)
                else:
                    report.problem("images_bad_field", f"{where}: image {image_id!r}: {field!r} must be a positive number, got {value!r}; field ignored")
        ids = item.get("objects_ids")
        if ids is not None:
            if isinstance(ids, list) and len(ids) == n and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in ids):
                rec["objects_ids"] = ids
            else:
                report.problem("images_bad_field", f"{where}: image {image_id!r}: 'objects_ids' must be {n} non-negative ints; field ignored")
        yield rec


def cache_object_names(reader, path, names=None):
    """The class names of a region cache's ``objects`` ids: ``names`` (from ``--object-vocab``) when given, else
    the header's ``info.object_names``; an error says how to give them."""
    if names is None:
        names = reader.object_names or (reader.header or {}).get("object_names")
        if not names:
            raise RetrievalError(
                f"--features {path}: the records hold class ids but no class names: pass --object-vocab FILE "
                f"(one class name a line, line i = class id i), or write 'info.object_names' into the cache header"
            )
    return [str(x) for x in names]


def cache_image(reader, key, names, where):
    """One region-cache image as the builder reads it: ``{"image_id", "tags", "objects_ids", "boxes"?, "conf"?,
    "image_w", "image_h"}`` (a tag per region, feature-row order: the class ids of ``objects``, or the argmax of
    ``cls_prob``), or None when the record has neither (or 0 regions). A class id outside ``names`` is an error."""
    record = reader.get(key, fields=("boxes", "objects", "cls_prob"))
    cls_prob = record.get("cls_prob")
    objects = record.get("objects")
    offset = 0
    if cls_prob is not None and cls_prob.ndim == 2 and cls_prob.shape[1] == len(names) + 1:
        offset = 1  # column 0 is the background class
    if objects is None and cls_prob is not None and cls_prob.size:
        objects = np.argmax(cls_prob[:, offset:], axis=1)
    if objects is None or len(objects) == 0:
        return None
    objects = np.asarray(objects, dtype=np.int64)
    bad = np.nonzero((objects < 0) | (objects >= len(names)))[0]
    if bad.size:
        raise RetrievalError(
            f"{where}: field 'objects' row {int(bad[0])} holds class id {int(objects[bad[0]])}, outside the object vocabulary "
            f"(0..{len(names) - 1}); is --object-vocab the detector's class list?"
        )
    rec = {"image_id": key, "tags": [names[i] for i in objects], "objects_ids": objects.tolist(), "where": where}
    if record.get("boxes") is not None and len(record["boxes"]) == len(objects):
        rec["boxes"] = record["boxes"]
    if cls_prob is not None and cls_prob.shape[0] == len(objects):
        rec["conf"] = cls_prob[np.arange(len(objects)), objects + offset]
    rec["image_w"], rec["image_h"] = record.get("image_w"), record.get("image_h")
    return rec


def _iter_feature_cache(path, names, report):
    from mmf_multilevel.features import FeatureCacheReader

    reader = FeatureCacheReader(path)
    try:
        names = cache_object_names(reader, path, names)
        keys = reader.keys()
        for key in progress(keys, desc="read region cache", unit="img"):
            where = f"{path}[{key}]"
            rec = cache_image(reader, key, names, where)
            if rec is None:
                report.problem("images_no_tags", f"{where}: no 'objects' (class ids) nor 'cls_prob' in the record, or 0 regions; image skipped")
                continue
            yield rec
    finally:
        reader.close()


def prepare_images(features_path, out_dir, report, object_vocab=None, query_mode="ranked", min_conf=DEFAULT_MIN_CONF, min_area=DEFAULT_MIN_AREA):
    """Read the images' tags into ``out_dir/images.jsonl`` (one valid image a line, with its query) + ``tag_vocab.json``.

    Skipped and counted: images with no tags, repeated image ids (the first is kept), malformed lines.
    ``objects_ids`` (the MRC label per region) are the detector's class ids for a feature cache,
    the given ``objects_ids`` or ids in ``--object-vocab`` for a tags jsonl, else ids of a vocabulary
    built from the data (tags in order of first appearance), written to ``tag_vocab.json``.
    Images are streamed to disk (with byte offsets, ``images_offsets.npy``): memory does not grow with their number.
    """
    if not os.path.exists(features_path):
        raise RetrievalError(f"--features {features_path}: no such file or directory")
    signature = {
        **_file_signature(_data_file(features_path)),
        "object_vocab": _file_signature(object_vocab) if object_vocab else None,
        "query_mode": query_mode,
        "min_conf": min_conf,
        "min_area": min_area,
    }
    info_path = os.path.join(out_dir, "images_info.json")
    if os.path.exists(info_path):
        info = read_json(info_path)
        if info.get("signature") == signature:
            report.merge_counts(info.get("problems", {}), info.get("examples"))
            return info
    from mmf_multilevel.weak_corpus._util import Report

    local = Report(stream=report.stream, quiet=report.quiet)
    names = read_object_vocab(object_vocab) if object_vocab else None
    if _is_feature_cache(features_path):
        if names is None:  # the header's class names: what objects_ids index, so the tag vocabulary too
            from mmf_multilevel.features import FeatureCacheReader

            with FeatureCacheReader(features_path) as reader:
                names = cache_object_names(reader, features_path)
        source = _iter_feature_cache(features_path, names, local)
        kind = "feature_cache"
    else:
        source = _iter_tags_jsonl(features_path, local)
        kind = "tags_jsonl"
    os.makedirs(out_dir, exist_ok=True)
    seen = {}
    offsets = array.array("q", [0])
    fallbacks = 0
    vocab = list(names) if names is not None else []
    index = {}
    for i, t in enumerate(vocab):
        index.setdefault(t, i)
    with AtomicFile(os.path.join(out_dir, "images.jsonl"), "wb") as f:
        for rec in source:  # streamed: nothing per image is kept but its id
            key = str(rec["image_id"])
            if key in seen:
                local.problem("images_duplicate_id", f"{rec['where']}: image id {rec['image_id']!r} already seen at {seen[key]}; skipped (first one kept)")
                continue
            seen[key] = rec["where"]
            if not rec["tags"]:
                local.problem("images_no_tags", f"{rec['where']}: image {rec['image_id']!r} has no tags; it cannot form a query and is skipped")
                continue
            query, fallback = build_query(
                rec["tags"], rec.get("conf"), rec.get("boxes"), rec.get("image_w"), rec.get("image_h"), query_mode, min_conf, min_area
            )
            fallbacks += fallback
            ids = rec.get("objects_ids")
            if ids is None:  # MRC label ids: --object-vocab ids, else first-seen order of the data's tags
                ids = []
                for t in rec["tags"]:
                    if t not in index:
                        index[t] = len(vocab)
                        vocab.append(t)
                    ids.append(index[t])
            line = json.dumps({"image_id": rec["image_id"], "objects": rec["tags"], "objects_ids": ids, "query": query}, ensure_ascii=False)
            data = line.encode("utf-8") + b"\n"
            f.write(data)
            offsets.append(offsets[-1] + len(data))
    atomic_write_bytes(os.path.join(out_dir, "images_offsets.npy"), _npy_bytes(np.frombuffer(offsets, dtype=np.int64)))
    atomic_write_json(os.path.join(out_dir, "tag_vocab.json"), {"tags": vocab})
    info = {
        "signature": signature, "images": len(offsets) - 1, "kind": kind, "query_filter_fallbacks": fallbacks,
        "problems": dict(local.counts), "examples": local.examples,
    }
    atomic_write_json(info_path, info)
    report.merge_counts(local.counts, local.examples)
    return info


class ImageStore:
    """Random access to the prepared images (``images[i]``, ``len``, ``queries(a, b)``, ``ids()``) without loading them all."""

    def __init__(self, out_dir):
        self.offsets = np.load(os.path.join(out_dir, "images_offsets.npy"), mmap_mode="r")
        self._f = open(os.path.join(out_dir, "images.jsonl"), "rb")
        self.vocab_path = os.path.join(out_dir, "tag_vocab.json")

    def __len__(self):
        return len(self.offsets) - 1

    def slice(self, start, stop):
        a, b = int(self.offsets[start]), int(self.offsets[stop])
        self._f.seek(a)
        return [json.loads(line) for line in self._f.read(b - a).decode("utf-8").splitlines()]

    def __getitem__(self, i):
        return self.slice(i, i + 1)[0]

    def queries(self, start, stop):
        return [r["query"] for r in self.slice(start, stop)]

    def ids(self, block=65536):
        out = []
        for a in range(0, len(self), block):
            out.extend(r["image_id"] for r in self.slice(a, min(len(self), a + block)))
        return out

    def tags(self):
        """Distinct tag strings (the tag vocabulary), sorted."""
        return sorted(set(read_json(self.vocab_path)["tags"]))

    def close(self):
        self._f.close()


def load_images(out_dir):
    with open(os.path.join(out_dir, "images.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]
