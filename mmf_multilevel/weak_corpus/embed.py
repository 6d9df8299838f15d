"""Chunked, resumable SBERT encoding into a float16 ``.npy`` memmap on disk.

The array (rows x dim, float16, raw SBERT output: not normalised, so both the cosine and the
official unnormalised-L2 search can use it) is created once at full size (through a temporary
file, then renamed) and filled chunk by chunk. After each chunk the memmap is flushed and only
then is the chunk listed as done in the manifest, so after kill -9 a rerun re-encodes at most
the chunk that was in progress. Memory use is one chunk of texts and vectors, whatever the size
of the corpus (14M x 384 float16 = 10.8 GB on disk, none of it held in RAM).
"""
import os

import numpy as np

from mmf_multilevel.weak_corpus._util import Manifest, RetrievalError, progress, remove_stale_temps

DEFAULT_CHUNK_ROWS = 16384


def _create_memmap(path, rows, dim):
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, "." + os.path.basename(path) + ".creating.tmp")
    mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(rows, dim))
    mm.flush()
    del mm
    os.replace(tmp, path)


def open_embeddings(path):
    """The stored embeddings as a read-only float16 memmap (rows x dim)."""
    return np.load(path, mmap_mode="r")


def encode_to_memmap(out_dir, name, rows, get_texts, model_factory, model_id, batch_size=64, chunk_rows=DEFAULT_CHUNK_ROWS, desc=None, force=False, source=None):
    """Encode rows ``0..rows-1`` (texts from ``get_texts(start, stop)``) into ``out_dir/<name>.npy``.

    ``source`` (any JSON value) identifies the texts, so a rerun over other texts is refused.
    ``model_factory()`` is called only if some chunk still needs encoding; ``model_id`` names the
    model in the manifest (a rerun with another model is refused rather than mixed). Returns the
    path of the finished array.
    """
    os.makedirs(out_dir, exist_ok=True)
    remove_stale_temps(out_dir)
    path = os.path.join(out_dir, f"{name}.npy")
    manifest_path = os.path.join(out_dir, f"{name}.manifest.json")
    if force:
        for p in (path, manifest_path):
            if os.path.exists(p):
                os.unlink(p)
    settings = {"rows": int(rows), "model": model_id, "chunk_rows": int(chunk_rows), "dtype": "float16", "source": source}
    manifest = Manifest(manifest_path, f"encode {name}", settings)
    if manifest.complete and os.path.exists(path):
        return path
    n_chunks = (rows + chunk_rows - 1) // chunk_rows
    todo = [c for c in range(n_chunks) if not manifest.is_done(c)]
    if not todo and os.path.exists(path):
        manifest.mark_complete()
        return path
    from mmf_multilevel.weak_corpus.encoders import encode, sbert_dim

    model = model_factory()
    dim = sbert_dim(model)
    if "dim" in manifest.extra and manifest.extra["dim"] != dim:
        raise RetrievalError(f"{manifest_path}: embeddings were started with dim {manifest.extra['dim']}, the model gives {dim}")
    if not os.path.exists(path):
        if manifest.done:
            raise RetrievalError(f"{manifest_path} lists finished chunks but {path} is missing; delete {out_dir} or pass --force")
        _create_memmap(path, max(rows, 0), dim)
    mm = np.load(path, mmap_mode="r+")
    if mm.shape != (rows, dim):
        raise RetrievalError(f"{path}: shape {mm.shape}, expected ({rows}, {dim}); delete it or pass --force")
    done_rows = rows - sum(min(chunk_rows, rows - c * chunk_rows) for c in todo)
    with progress(total=rows, initial=done_rows, desc=desc or f"encode {name}", unit="sent") as bar:
        for c in todo:
            start, stop = c * chunk_rows, min(rows, (c + 1) * chunk_rows)
            texts = get_texts(start, stop)
            if len(texts) != stop - start:
                raise RetrievalError(f"{name}: rows {start}..{stop} gave {len(texts)} texts")
            vectors = encode(model, texts, batch_size).astype(np.float16)
            if not np.isfinite(vectors).all():
                raise RetrievalError(f"{name}: the encoder returned non-finite (or float16-overflowing) values for rows {start}..{stop}")
            mm[start:stop] = vectors
            mm.flush()
            manifest.mark_done(c, dim=dim)
            bar.update(stop - start)
    del mm
    manifest.mark_complete(dim=dim)
    return path
