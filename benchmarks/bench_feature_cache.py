"""Random-read throughput of the region feature cache against references in the same run.

For each dtype (float32, float16) three LMDBs with the same records (N x D features,
boxes, object ids) are written:

* ``ours``     - FeatureCacheWriter (safetensors records), read with FeatureCacheReader.get
* ``raw``      - the feature bytes alone; read with txn.get + numpy.frombuffer (the floor)
* ``mmf``      - MMF's pickled layout (FeatureCacheWriter(mmf_compat=True)); read the way MMF
                 reads it (pickle.loads) and through our reader's restricted unpickler

Reads are uniformly random over all records with a warm page cache, in 1 and 2 processes
(forked; aggregate records/s). Ratios are against ``raw`` in the same configuration.

    python benchmarks/bench_feature_cache.py [--num-records 2000] [--boxes 100] [--dim 2048]
"""
import argparse
import multiprocessing as mp
import os
import pickle
import platform
import shutil
import statistics
import sys
import tempfile
import time

import lmdb
import numpy as np

from mmf_multilevel.features import FeatureCacheReader, FeatureCacheWriter


def build(root, dtype, args):
    rng = np.random.default_rng(0)
    pool = [rng.standard_normal((args.boxes, args.dim)).astype(dtype) for _ in range(8)]
    boxes = np.tile(np.array([10, 20, 110, 220], np.float32), (args.boxes, 1))
    objects = np.arange(args.boxes) % 1600
    ids = [f"COCO_train2014_{i:012d}" for i in range(args.num_records)]
    paths = {name: os.path.join(root, f"{name}_{dtype}.lmdb") for name in ("ours", "raw", "mmf")}
    timings = {}

    for name, compat in (("ours", False), ("mmf", True)):
        start = time.perf_counter()
        with FeatureCacheWriter(paths[name], detector="bench", dtype=dtype, batch_size=256, mmf_compat=compat) as writer:
            for i, image_id in enumerate(ids):
                writer.write(image_id, {"features": pool[i % 8], "boxes": boxes, "objects": objects, "image_w": 640, "image_h": 480})
        timings[name] = time.perf_counter() - start

    start = time.perf_counter()
    env = lmdb.open(paths["raw"], map_size=1 << 40)
    for offset in range(0, len(ids), 256):
        with env.begin(write=True) as txn:
            for i in range(offset, min(offset + 256, len(ids))):
                txn.put(ids[i].encode(), pool[i % 8].tobytes())
    env.close()
    timings["raw"] = time.perf_counter() - start
    return ids, paths, timings


def warm(path):
    """Pull the data file into the page cache."""
    data = os.path.join(path, "data.mdb")
    with open(data, "rb") as f:
        while f.read(1 << 24):
            pass


def make_reader(method, path, dtype, dim):
    """A function key(bytes) -> features array for ``method``; opened in the calling process."""
    if method in ("ours", "ours_restricted_mmf"):
        reader = FeatureCacheReader(path)
        return lambda key: reader.get(key)["features"]
    env = lmdb.open(path, readonly=True, lock=False, readahead=False, meminit=False)
    if method == "raw":
        np_dtype = np.dtype(dtype)

        def read(key):
            with env.begin() as txn:
                return np.frombuffer(txn.get(key), dtype=np_dtype).reshape(-1, dim)

        return read
    if method == "mmf_pickle":

        def read(key):
            with env.begin(write=False, buffers=True) as txn:  # as MMF's LMDBFeatureReader
                return pickle.loads(txn.get(key))["features"]

        return read
    raise ValueError(method)


def _worker(method, path, dtype, dim, keys, seed, reads, start_event, queue):
    read = make_reader(method, path, dtype, dim)
    order = np.random.default_rng(seed).integers(0, len(keys), size=reads)
    read(keys[0])  # open the environment before the clock starts
    start_event.wait()
    begin = time.perf_counter()
    checksum = 0.0
    for idx in order:
        checksum += float(read(keys[idx])[0, 0])
    queue.put((begin, time.perf_counter(), checksum))


def measure(method, path, dtype, dim, keys, procs, reads):
    """Aggregate records/s of ``procs`` forked readers doing ``reads`` random reads each."""
    ctx = mp.get_context("fork")
    start_event, queue = ctx.Event(), ctx.Queue()
    workers = [
        ctx.Process(target=_worker, args=(method, path, dtype, dim, keys, 1000 + p, reads, start_event, queue))
        for p in range(procs)
    ]
    for w in workers:
        w.start()
    time.sleep(0.2)
    start_event.set()
    results = [queue.get() for _ in workers]
    for w in workers:
        w.join()
        if w.exitcode:
            raise RuntimeError(f"{method} reader process failed with exit code {w.exitcode}")
    begin = min(r[0] for r in results)
    end = max(r[1] for r in results)
    return procs * reads / (end - begin)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-records", type=int, default=2000)
    parser.add_argument("--boxes", type=int, default=100)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--reads", type=int, default=6000, help="random reads per process per repeat")
    parser.add_argument("--repeats", type=int, default=3, help="median over this many runs")
    parser.add_argument("--dtypes", default="float32,float16")
    parser.add_argument("--dir", default=None, help="where to build the LMDBs (default: a temp dir, removed)")
    args = parser.parse_args()

    root = args.dir or tempfile.mkdtemp(prefix="bench_feature_cache_")
    os.makedirs(root, exist_ok=True)
    print(f"# feature cache random reads: {args.num_records} records of {args.boxes}x{args.dim}, warm page cache")
    print(f"# python {platform.python_version()}, numpy {np.__version__}, lmdb {lmdb.__version__}, "
          f"{os.cpu_count()} CPUs, {platform.machine()}, {time.strftime('%Y-%m-%d')}")
    methods = [
        ("raw", "raw", "lmdb txn.get + np.frombuffer (reference)"),
        ("ours", "ours", "FeatureCacheReader.get, safetensors layout"),
        ("mmf_pickle", "mmf", "MMF layout, pickle.loads (as MMF)"),
        ("ours_restricted_mmf", "mmf", "FeatureCacheReader.get, MMF layout (restricted unpickler)"),
    ]
    try:
        for dtype in args.dtypes.split(","):
            ids, paths, write_s = build(root, dtype, args)
            sizes = {name: os.path.getsize(os.path.join(p, "data.mdb")) / 2**20 for name, p in paths.items()}
            print(f"\n## {dtype}: write {', '.join(f'{n} {args.num_records / t:,.0f} rec/s' for n, t in write_s.items())}; "
                  f"size {', '.join(f'{n} {s:,.0f} MiB' for n, s in sizes.items())}")
            keys = [i.encode() for i in ids]
            for path in paths.values():
                warm(path)
            print(f"{'method':<22}{'procs':>6}{'records/s':>13}{'MiB/s':>9}{'vs raw':>9}  description")
            record_mib = args.boxes * args.dim * np.dtype(dtype).itemsize / 2**20
            for procs in (1, 2):
                rates = {}
                for method, db, desc in methods:
                    runs = [measure(method, paths[db], dtype, args.dim, keys, procs, args.reads) for _ in range(args.repeats)]
                    rates[method] = statistics.median(runs)
                    ratio = rates[method] / rates["raw"]
                    print(f"{method:<22}{procs:>6}{rates[method]:>13,.0f}{rates[method] * record_mib:>9,.0f}{ratio:>8.2f}x  {desc}")
                print(f"  {procs} proc: ours takes {rates['raw'] / rates['ours']:.2f}x the time of raw per record (target <= 1.2x); "
                      f"ours is {rates['ours'] / rates['mmf_pickle']:.2f}x the rate of MMF's pickle.loads")
            if not args.dir:
                for path in paths.values():
                    shutil.rmtree(path)
    finally:
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
