"""Batches/s of the VQA v2 builder's DataLoader against a bare reference in the same run.

A VQA set is generated (``mmf_multilevel.datasets.generate``: questions with 10 human answers,
tokenizer, answer vocabulary), and its region cache is rewritten with BUTD-sized records
(``--boxes`` x ``--dim``, default 100 x 2048, float32 or float16). Then, at ``--batch-size``
(default 64), for 0 and ``--workers`` DataLoader workers:

* ``vqa2``  - the registered ``vqa2`` dataset (``VQA2Dataset`` + MMF's ``bert_tokenizer`` and our
              ``vqa_official_answer`` processors), collated by MMF's ``BatchCollator`` into a
              ``SampleList`` - what ``mmf_run`` feeds the model;
* ``floor`` - the same reads with nothing else: ``txn.get`` of the raw feature bytes,
              ``numpy.frombuffer``, zero-pad and ``torch.stack`` (no text, no answers, no boxes).

    python benchmarks/bench_vqa_loader.py [--images 600] [--batches 40] [--workers 2] [--float16]
"""
import argparse
import os
import platform
import shutil
import sys
import tempfile
import time

import mmf  # noqa: F401  (compatibility layer + our registrations)
import numpy as np
import torch
from mmf.common.batch_collator import BatchCollator
from mmf.common.registry import registry
from omegaconf import OmegaConf

from mmf_multilevel.datasets import generate as gen
from mmf_multilevel.datasets.vqa2 import VQA2Dataset
from mmf_multilevel.features import FeatureCacheReader, FeatureCacheWriter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rewrite_cache(data, boxes, dim, dtype):
    """Replace the demo cache by one with ``boxes`` x ``dim`` records; also a raw-bytes LMDB."""
    import lmdb

    path = os.path.join(data, "features", "regions.lmdb")
    ids = FeatureCacheReader(path).keys()
    shutil.rmtree(path)
    rng = np.random.default_rng(0)
    pool = [np.abs(rng.standard_normal((boxes, dim))).astype(dtype) for _ in range(8)]
    raw_path = os.path.join(data, "features", "raw.lmdb")
    env = lmdb.open(raw_path, map_size=1 << 36, subdir=True)
    with FeatureCacheWriter(path, detector="bench", dtype=np.dtype(dtype).name, batch_size=256) as writer, env.begin(write=True) as txn:
        for i, image_id in enumerate(ids):
            features = pool[i % len(pool)]
            box = np.tile(np.array([10, 20, 110, 220], np.float32), (boxes, 1))
            writer.write(image_id, {"features": features, "boxes": box, "image_w": 640, "image_h": 480,
                                    "objects": np.arange(boxes) % 1600})
            txn.put(image_id.encode(), features.tobytes())
    env.close()
    return raw_path


class Floor(torch.utils.data.Dataset):
    def __init__(self, raw_path, image_ids, boxes, dim, dtype, max_features):
        self.raw_path, self.ids, self.shape, self.dtype, self.max = raw_path, image_ids, (boxes, dim), dtype, max_features
        self.env = None

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, idx):
        import lmdb

        if self.env is None:
            self.env = lmdb.open(self.raw_path, readonly=True, lock=False, readahead=False, meminit=False, subdir=True)
        with self.env.begin(buffers=True) as txn:
            arr = np.frombuffer(txn.get(self.ids[idx].encode()), dtype=self.dtype).reshape(self.shape)
        out = np.zeros((self.max, self.shape[1]), np.float32)
        out[: self.shape[0]] = arr[: self.max]
        return torch.from_numpy(out)


def vqa_dataset(data, max_features, dim):
    config = OmegaConf.load(os.path.join(ROOT, "configs", "datasets", "vqa2", "defaults.yaml")).dataset_config.vqa2
    config.data_dir = data
    config.feature_dim = dim
    config.max_features = max_features
    config.processors.text_processor.params.tokenizer_config.type = os.path.join(data, "vocab")
    config.processors.answer_processor.params.vocab_file = "answers.txt"
    for key in config.processors:
        registry.unregister(f"vqa2_{key}")
    dataset = VQA2Dataset("vqa2", config, "train")
    dataset.init_processors()
    return dataset


def measure(dataset, collate, batch_size, workers, batches, repeats):
    rates = []
    for _ in range(repeats):
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=batch_size, shuffle=True, num_workers=workers, collate_fn=collate,
            persistent_workers=False, generator=torch.Generator().manual_seed(0),
        )
        it = iter(loader)
        next(it)  # start-up (worker spawn, first reads) is not timed
        start = time.perf_counter()
        count = 0
        for _ in range(batches):
            try:
                next(it)
            except StopIteration:
                it = iter(loader)
                next(it)
            count += 1
        rates.append(count / (time.perf_counter() - start))
        del it, loader
    return float(np.median(rates))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=600)
    p.add_argument("--boxes", type=int, default=100)
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--batches", type=int, default=40, help="timed batches per repeat")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--float16", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(1)
    dtype = np.float16 if args.float16 else np.float32
    root = tempfile.mkdtemp(prefix="bench_vqa_")
    try:
        data = os.path.join(root, "demo")
        gen.generate(data, num_images=args.images, feature_dim=args.dim, images=False, progress=False)
        raw = rewrite_cache(data, args.boxes, args.dim, dtype)
        dataset = vqa_dataset(data, args.boxes, args.dim)
        floor = Floor(raw, [str(r["image_id"]) for r in dataset.records], args.boxes, args.dim, dtype, args.boxes)
        print(f"# {time.strftime('%Y-%m-%d')} {platform.machine()} {os.cpu_count()} cores, python {platform.python_version()}, "
              f"torch {torch.__version__}; {len(dataset)} questions, {args.boxes}x{args.dim} {np.dtype(dtype).name} regions, "
              f"batch {args.batch_size}")
        print(f"{'workers':>7} {'vqa2 batches/s':>15} {'floor batches/s':>16} {'vqa2/floor':>10}")
        for workers in sorted({0, args.workers}):
            ours = measure(dataset, BatchCollator("vqa2", "train"), args.batch_size, workers, args.batches, args.repeats)
            ref = measure(floor, torch.stack, args.batch_size, workers, args.batches, args.repeats)
            print(f"{workers:>7} {ours:>15.1f} {ref:>16.1f} {ours / ref:>10.2f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
