"""Top-K search of the query embeddings over the corpus embeddings (paper §3.2).

Metrics:

* ``cosine`` (default, the paper): both sides L2-normalised, inner product (exact cosine).
* ``l2`` (the official builder): squared L2 distance on the raw, unnormalised SBERT vectors
  (``faiss.IndexFlatL2``); smaller is closer.

Indexes:

* ``flat`` (default): exact. The corpus is scanned in shards of ``shard_rows`` rows (float32 in
  RAM one shard at a time: a 14M corpus never needs more than one shard's memory), each shard
  is a ``faiss.IndexFlatIP``/``IndexFlatL2`` (or a torch matmul + topk, the GPU path), and a
  running top-K per query is merged after each shard. The running top-K is saved after every
  shard (temporary file + rename) and listed in the manifest, so a killed search resumes at the
  next shard.
* ``ivf``: ``IndexIVFScalarQuantizer`` (fp16 codes: lossless for our float16 embeddings,
  half the memory of IVFFlat), ``nlist`` lists, ``nprobe`` probed.
* ``hnsw``: ``IndexHNSWSQ`` (fp16 codes), ``M`` links, ``efConstruction``/``efSearch``.
  Approximate indexes are built shard by shard (the index is saved after each shard) and
  searched in query blocks whose results are saved block by block. Their recall@K against the
  exact search is measured on a sample of queries and reported.

``exclude`` drops given corpus rows per query (the image's own captions, ``--exclude-self``):
K + (rows excluded at most) neighbours are searched, the excluded ones removed, the first K kept.
"""
import os

import numpy as np

from mmf_multilevel.weak_corpus._util import (  # noqa: F401
    Manifest,
    RetrievalError,
    atomic_write_bytes,
    progress,
    remove_stale_temps,
)

METRICS = ("cosine", "l2")
INDEXES = ("flat", "ivf", "hnsw")
BACKENDS = ("faiss", "torch")
DEFAULT_SHARD_ROWS = 1_000_000
DEFAULT_QUERY_BLOCK = 65536


def _as_float32(rows, normalize):
    """A float32 copy (never a view: the caller's array or a read-only memmap is not modified)."""
    x = np.array(rows, dtype=np.float32, order="C", copy=True)
    if normalize:
        norms = np.linalg.norm(x, axis=1, keepdims=True)
        np.maximum(norms, 1e-12, out=norms)
        x /= norms
    return x


def _merge(keys_a, ids_a, keys_b, ids_b, k):
    """Keep the k largest keys per row of two candidate lists (ties: the earlier list, then lower position)."""
    keys = np.concatenate([keys_a, keys_b], axis=1)
    ids = np.concatenate([ids_a, ids_b], axis=1)
    order = np.argsort(-keys, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(keys, order, axis=1), np.take_along_axis(ids, order, axis=1)


class _TorchShard:
    """A corpus shard on ``device`` searched with a matmul + topk (fp16 matmul on CUDA)."""

    def __init__(self, x, metric, device):
        import torch

        self.torch = torch
        self.metric = metric
        self.device = device
        dtype = torch.float16 if device.startswith("cuda") else torch.float32
        self.x = torch.from_numpy(x).to(device=device, dtype=dtype)
        self.sq = (self.x.float() ** 2).sum(1) if metric == "l2" else None
        self.dtype = dtype

    def search(self, q, k, max_elements=1 << 28):
        """Top-k per query row; the query x shard similarity block is capped at ``max_elements`` (1 GiB fp32)."""
        torch = self.torch
        step = max(1, max_elements // max(1, self.x.shape[0]))
        keys_out, ids_out = [], []
        for a in range(0, q.shape[0], step):
            qt = torch.from_numpy(q[a:a + step]).to(device=self.device, dtype=self.dtype)
            sims = (qt @ self.x.T).float()
            if self.metric == "l2":
                sims = 2 * sims - self.sq[None, :] - (qt.float() ** 2).sum(1, keepdim=True)  # = -||q - x||^2
            keys, idx = torch.topk(sims, k, dim=1)
            keys_out.append(keys.cpu().numpy())
            ids_out.append(idx.cpu().numpy().astype(np.int64))
        return np.concatenate(keys_out), np.concatenate(ids_out)


def _faiss_shard(x, metric):
    import faiss

    index = faiss.IndexFlatIP(x.shape[1]) if metric == "cosine" else faiss.IndexFlatL2(x.shape[1])
    index.add(x)

    class _Shard:
        def search(self, q, k):
            dist, idx = index.search(q, k)
            return (dist if metric == "cosine" else -dist), idx

    return _Shard()


def _to_scores(keys, metric):
    """Internal keys (larger = closer) -> reported scores: cosine, or squared L2 distance."""
    return keys if metric == "cosine" else -keys


def exact_search(base, queries, k, metric="cosine", shard_rows=DEFAULT_SHARD_ROWS, query_block=DEFAULT_QUERY_BLOCK, backend="faiss", device="cpu", state_dir=None, desc="exact search"):
    """Exact top-k of each query row over ``base`` rows (arrays or memmaps, any float dtype).

    Returns ``(scores, ids)`` of shape (Q, k): cosine similarity (descending) or squared L2
    distance (ascending). With ``state_dir`` the running result is saved after each shard and a
    rerun resumes from the last saved shard.
    """
    if metric not in METRICS:
        raise RetrievalError(f"metric must be one of {METRICS}, got {metric!r}")
    if backend not in BACKENDS:
        raise RetrievalError(f"search backend must be one of {BACKENDS}, got {backend!r}")
    n, q_rows = base.shape[0], queries.shape[0]
    if k > n:
        raise RetrievalError(f"asked for {k} neighbours but the corpus has only {n} rows")
    normalize = metric == "cosine"
    n_shards = max(1, (n + shard_rows - 1) // shard_rows)
    keys = np.full((q_rows, k), -np.inf, dtype=np.float32)
    ids = np.full((q_rows, k), -1, dtype=np.int64)
    manifest = None
    if state_dir is not None:
        os.makedirs(state_dir, exist_ok=True)
        remove_stale_temps(state_dir)
        manifest = Manifest(
            os.path.join(state_dir, "exact.manifest.json"),
            "exact search",
            {"corpus_rows": int(n), "queries": int(q_rows), "k": int(k), "metric": metric, "shard_rows": int(shard_rows)},
        )
        if manifest.done:
            last = max(manifest.done)
            state = np.load(os.path.join(state_dir, f"state_{last:05d}.npz"))
            keys, ids = state["keys"].copy(), state["ids"].copy()
    done = set(manifest.done) if manifest else set()
    todo = [s for s in range(n_shards) if s not in done]
    with progress(total=n_shards * q_rows, initial=(n_shards - len(todo)) * q_rows, desc=f"{desc} ({n_shards} shard(s))", unit="q") as bar:
        for s in todo:
            start, stop = s * shard_rows, min(n, (s + 1) * shard_rows)
            x = _as_float32(base[start:stop], normalize)
            shard = _TorchShard(x, metric, device) if backend == "torch" else _faiss_shard(x, metric)
            kk = min(k, stop - start)
            for qa in range(0, q_rows, query_block):
                qb = min(q_rows, qa + query_block)
                q = _as_float32(queries[qa:qb], normalize)
                sk, si = shard.search(q, kk)
                si = si + start
                keys[qa:qb], ids[qa:qb] = _merge(keys[qa:qb], ids[qa:qb], sk.astype(np.float32), si, k)
                bar.update(qb - qa)
            del shard, x
            if manifest is not None:
                buf = _npz_bytes(keys=keys, ids=ids)
                atomic_write_bytes(os.path.join(state_dir, f"state_{s:05d}.npz"), buf)
                previous = [d for d in manifest.done]
                manifest.mark_done(s)
                for d in previous:  # older states are superseded once the new one is listed
                    try:
                        os.unlink(os.path.join(state_dir, f"state_{d:05d}.npz"))
                    except OSError:
                        pass
    if manifest is not None and not manifest.complete:
        manifest.mark_complete()
    return _to_scores(keys, metric), ids


def _npz_bytes(**arrays):
    import io

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


# --------------------------------------------------------------------------- approximate indexes
def default_nlist(n):
    """About sqrt(n) lists (1,000 for 1M vectors), at least 39 training points per list (faiss' own minimum).

    Fewer lists than faiss' usual 4*sqrt(n) keep k-means training affordable on a CPU; each probe
    then scans more vectors, which raises recall at a given nprobe.
    """
    return int(max(1, min(int(np.sqrt(max(n, 1))), n // 39 if n >= 39 else 1)))


def build_ann_index(base, kind, metric, state_dir, shard_rows=DEFAULT_SHARD_ROWS, nlist=None, hnsw_m=32, ef_construction=80, train_rows=None, seed=0):
    """Build (or resume) an IVF/HNSW index over ``base``; returns the faiss index (saved under ``state_dir``)."""
    import faiss

    if kind not in ("ivf", "hnsw"):
        raise RetrievalError(f"approximate index must be ivf or hnsw, got {kind!r}")
    n, d = base.shape
    normalize = metric == "cosine"
    faiss_metric = faiss.METRIC_INNER_PRODUCT if metric == "cosine" else faiss.METRIC_L2
    nlist = nlist or default_nlist(n)
    settings = {"kind": kind, "metric": metric, "rows": int(n), "dim": int(d), "shard_rows": int(shard_rows)}
    settings.update({"nlist": int(nlist)} if kind == "ivf" else {"M": int(hnsw_m), "efConstruction": int(ef_construction)})
    os.makedirs(state_dir, exist_ok=True)
    remove_stale_temps(state_dir)
    manifest = Manifest(os.path.join(state_dir, "index.manifest.json"), f"{kind} index", settings)
    index_path = os.path.join(state_dir, "index.faiss")
    if manifest.done and os.path.exists(index_path):
        index = faiss.read_index(index_path)
    else:
        manifest.done.clear()
        qt = faiss.ScalarQuantizer.QT_fp16
        if kind == "ivf":
            quantizer = faiss.IndexFlatIP(d) if metric == "cosine" else faiss.IndexFlatL2(d)
            index = faiss.IndexIVFScalarQuantizer(quantizer, d, nlist, qt, faiss_metric)
            train_rows = min(n, train_rows or max(64 * nlist, 10000))
        else:
            index = faiss.IndexHNSWSQ(d, qt, hnsw_m, faiss_metric)
            index.hnsw.efConstruction = ef_construction
            train_rows = min(n, train_rows or 10000)
        rng = np.random.default_rng(seed)
        sample = np.sort(rng.choice(n, size=train_rows, replace=False))
        index.train(_as_float32(base[sample], normalize))
        if kind == "ivf":
            index.quantizer_trains_alone = 0
    n_shards = max(1, (n + shard_rows - 1) // shard_rows)
    todo = [s for s in range(n_shards) if not manifest.is_done(s)]
    with progress(total=n, initial=n - sum(min(shard_rows, n - s * shard_rows) for s in todo), desc=f"build {kind} index", unit="vec") as bar:
        for s in todo:
            start, stop = s * shard_rows, min(n, (s + 1) * shard_rows)
            if index.ntotal != start:
                raise RetrievalError(f"{index_path}: holds {index.ntotal} vectors, expected {start} before shard {s}; delete {state_dir}")
            index.add(_as_float32(base[start:stop], normalize))
            tmp = index_path + ".writing.tmp"
            faiss.write_index(index, tmp)
            os.replace(tmp, index_path)
            manifest.mark_done(s)
            bar.update(stop - start)
    if not manifest.complete:
        manifest.mark_complete()
    return index


def ann_search(index, kind, queries, k, metric, state_dir, nprobe=32, ef_search=128, query_block=DEFAULT_QUERY_BLOCK):
    """Search an IVF/HNSW index block by block (results saved per block); returns ``(scores, ids)``."""
    normalize = metric == "cosine"
    q_rows = queries.shape[0]
    if kind == "ivf":
        index.nprobe = min(nprobe, index.nlist)
    else:
        index.hnsw.efSearch = max(ef_search, k)
    manifest = Manifest(
        os.path.join(state_dir, "ann_search.manifest.json"),
        f"{kind} search",
        {"queries": int(q_rows), "k": int(k), "query_block": int(query_block), "nprobe": int(nprobe), "efSearch": int(ef_search)},
    )
    keys_path, ids_path = os.path.join(state_dir, "ann_keys.npy"), os.path.join(state_dir, "ann_ids.npy")
    for path, dtype in ((keys_path, np.float32), (ids_path, np.int64)):
        if not os.path.exists(path):
            if manifest.done:
                raise RetrievalError(f"{path} is missing but {manifest.path} lists finished blocks; delete {state_dir}")
            tmp = path + ".creating.tmp"
            np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=(q_rows, k)).flush()
            os.replace(tmp, path)
    keys_mm, ids_mm = np.load(keys_path, mmap_mode="r+"), np.load(ids_path, mmap_mode="r+")
    n_blocks = max(1, (q_rows + query_block - 1) // query_block)
    todo = [b for b in range(n_blocks) if not manifest.is_done(b)]
    with progress(total=q_rows, initial=q_rows - sum(min(query_block, q_rows - b * query_block) for b in todo), desc=f"{kind} search", unit="q") as bar:
        for b in todo:
            qa, qb = b * query_block, min(q_rows, (b + 1) * query_block)
            dist, idx = index.search(_as_float32(queries[qa:qb], normalize), k)
            keys_mm[qa:qb] = dist if metric == "cosine" else -dist
            ids_mm[qa:qb] = idx
            keys_mm.flush()
            ids_mm.flush()
            manifest.mark_done(b)
            bar.update(qb - qa)
    keys, ids = np.array(keys_mm), np.array(ids_mm)
    del keys_mm, ids_mm
    if not manifest.complete:
        manifest.mark_complete()
    keys[ids < 0] = -np.inf
    return _to_scores(keys, metric), ids


def exclude_rows(scores, ids, excluded, k, metric):
    """Drop per-query ``excluded`` rows (Q x m array, -2 padded) and keep the first k of the rest."""
    if excluded is None or excluded.shape[1] == 0:
        return scores[:, :k], ids[:, :k]
    drop = (ids[:, :, None] == excluded[:, None, :]).any(axis=2) | (ids < 0)
    order = np.argsort(drop, axis=1, kind="stable")[:, :k]
    scores = np.take_along_axis(scores, order, axis=1)
    ids = np.take_along_axis(ids, order, axis=1).copy()
    dropped = np.take_along_axis(drop, order, axis=1)
    ids[dropped] = -1
    return scores, ids


def recall_at_k(approx_ids, exact_ids):
    """Mean |approx top-k ∩ exact top-k| / k over the rows."""
    k = exact_ids.shape[1]
    hits = [len(set(a.tolist()) & set(e.tolist())) for a, e in zip(approx_ids[:, :k], exact_ids)]
    return float(np.mean(hits) / k) if hits else float("nan")
