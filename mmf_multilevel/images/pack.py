"""Packing a folder or zip of images into an LMDB of encoded bytes (resumable, bad images listed),
and checking that every image of a source decodes."""
import json
import os

from mmf_multilevel.files import write_lines_atomically
from mmf_multilevel.images.sources import (
    BAD_IMAGES_FILE,
    HEADER_KEY,
    LMDB_FORMAT,
    LMDB_FORMAT_VERSION,
    ImageDecodeError,
    ImageSource,
    ImageSourceError,
    MissingImageError,
    _close_lmdb,
    decode_image,
    is_lmdb,
    open_image_source,
)

__all__ = ["build_image_lmdb", "check_source"]


def _write_bad_list(out, bad):
    rows = (json.dumps({"image_id": image_id, "error": bad[image_id]}, ensure_ascii=False) for image_id in sorted(bad))
    write_lines_atomically(os.path.join(out, BAD_IMAGES_FILE), rows, remove_when_empty=True)


def _read_bad_list(out):
    """The ``{image_id: error}`` listed in ``out/bad_images.jsonl`` by an earlier run (empty if none)."""
    bad = {}
    bad_path = os.path.join(out, BAD_IMAGES_FILE)
    if os.path.isfile(bad_path):  # these images are retried, and listed again if still bad
        with open(bad_path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    item = json.loads(line)
                    bad[item["image_id"]] = item["error"]
    return bad


def _read_batch(src, image_ids, verify, on_error, bad):
    """``(key, bytes)`` of the images ``image_ids`` that read (and decode); the others are recorded in ``bad``."""
    batch = []
    for image_id in image_ids:
        try:
            data = src.get_bytes(image_id)
            if verify:
                decode_image(data, src.describe(image_id), src.exif_transpose, src.alpha_background, src.min_side)
        except (ImageDecodeError, MissingImageError, OSError) as exc:
            if on_error == "raise":
                raise
            bad[image_id] = str(exc)
            continue
        bad.pop(image_id, None)
        batch.append((image_id.encode("utf-8"), data))
    return batch


def _commit_batch(env, batch, header, bad):
    """Put ``batch`` and the updated header in one write transaction, doubling the map size while it is full."""
    import lmdb

    while True:
        try:
            with env.begin(write=True) as txn:
                for key, data in batch:
                    txn.put(key, data)
                count = txn.stat()["entries"] - (1 if txn.get(HEADER_KEY) is not None else 0)
                header["count"] = count
                header["num_bad"] = len(bad)
                txn.put(HEADER_KEY, json.dumps(header, sort_keys=True).encode("utf-8"))
            break
        except lmdb.MapFullError:
            env.set_mapsize(env.info()["map_size"] * 2)


def build_image_lmdb(source, out, batch_size=256, verify=True, on_error="skip", image_ids=None,
                     progress=True, map_size=1 << 30, extensions=None):
    """Copy the encoded images of a folder or zip (or another LMDB) into an LMDB at ``out``.

    Values are the files' bytes, unchanged. One write transaction per batch (with the header), so
    an interrupted run loses at most the batch in flight; a rerun skips the ids already there.
    ``verify`` decodes each image first; an undecodable one is listed in ``out/bad_images.jsonl``
    and left out (``on_error="skip"``) or stops the run (``"raise"``). The map grows as needed.
    Returns ``{"written", "skipped_existing", "bad", "total"}``.
    """
    import lmdb
    from tqdm import tqdm

    if on_error not in ("skip", "raise"):
        raise ValueError(f"on_error must be 'skip' or 'raise', got {on_error!r}")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    src = source if isinstance(source, ImageSource) else open_image_source(source, extensions=extensions)
    out = os.fspath(out)
    if os.path.abspath(out) == os.path.abspath(src.path):
        raise ValueError(f"the output {out} is the source itself")
    if os.path.exists(out) and not is_lmdb(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise FileExistsError(f"{out} exists and is not an image LMDB; choose another output")
    ids = list(src.keys()) if image_ids is None else [str(i) for i in image_ids]
    _close_lmdb(out)  # a reader of the same path in this process would block the writer
    os.makedirs(out, exist_ok=True)
    env = lmdb.open(out, map_size=int(map_size), subdir=True, readahead=False, meminit=False, max_dbs=0)
    bad = _read_bad_list(out)
    try:
        with env.begin() as txn:
            raw = txn.get(HEADER_KEY)
            header = json.loads(raw.decode("utf-8")) if raw else {}
            todo = [i for i in ids if txn.get(i.encode("utf-8")) is None]
        if header and header.get("format") != LMDB_FORMAT:
            raise ImageSourceError(f"{out}: an LMDB of another format ({header.get('format')!r})")
        header.update({"format": LMDB_FORMAT, "version": LMDB_FORMAT_VERSION})
        header.setdefault("source", os.path.abspath(src.path))
        skipped = len(ids) - len(todo)
        written = 0
        bar = tqdm(total=len(ids), initial=skipped, desc="image LMDB", unit="img", disable=not progress)
        for start in range(0, len(todo), int(batch_size)):
            batch = _read_batch(src, todo[start:start + int(batch_size)], verify, on_error, bad)
            _commit_batch(env, batch, header, bad)
            written += len(batch)
            _write_bad_list(out, bad)
            bar.update(len(todo[start:start + int(batch_size)]))
            bar.set_postfix(bad=len(bad))
        bar.close()
        if not todo:
            with env.begin(write=True) as txn:
                header["count"] = txn.stat()["entries"] - (1 if txn.get(HEADER_KEY) is not None else 0)
                header["num_bad"] = len(bad)
                txn.put(HEADER_KEY, json.dumps(header, sort_keys=True).encode("utf-8"))
            _write_bad_list(out, bad)
        env.sync()
    finally:
        env.close()
    return {"written": written, "skipped_existing": skipped, "bad": len(bad), "total": len(ids)}


def check_source(source, progress=True, extensions=None):
    """Decode every image of a source; -> {image_id: error} for the bad ones."""
    from tqdm import tqdm

    src = source if isinstance(source, ImageSource) else open_image_source(source, extensions=extensions)
    bad = {}
    for image_id in tqdm(src.keys(), desc="check images", unit="img", disable=not progress):
        try:
            src.get(image_id)
        except (ImageDecodeError, MissingImageError, OSError) as exc:
            bad[image_id] = str(exc)
    return bad
