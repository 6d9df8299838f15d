"""Images/s of raw-image decoding + augmentation per source kind, against a plain reference in the same run.

Images are generated (``mmf_multilevel.datasets.generate``: JPEGs of 320-640 x 240-480 px, COCO-like
sizes), then stored three ways: a folder, a zip (stored, as image zips usually are) and an image LMDB
(``build_image_lmdb``). For each resolution and for 0 and ``--workers`` DataLoader workers:

* ``folder`` / ``zip`` / ``lmdb`` - ``open_image_source(...).get(id)`` (decode, RGB) + the
  ``image_transform`` processor's *training* pipeline, batched by ``torch.stack``:
  ``224``: SIMLA's pre-training pipeline at 224 (RandomResizedCrop scale 0.2-1 bicubic, flip,
  ALBEF's RandAugment 2 x p 0.5, CLIP normalisation); ``256``: the same at SIMLA's own 256;
  ``soho``: shorter side 600 / longer <= 1000, ImageNet normalisation, padded to 1000 x 1000
  (what MMF's collator needs); ``soho-unpadded``: the same without the canvas (batches are lists,
  as for the reference, or ``collate_images`` pads per batch);
* ``reference`` - ``PIL.Image.open(path).convert("RGB")`` from the folder + torchvision
  ``Resize`` to the same size (224 x 224, 256 x 256, or shorter 600 / longer <= 1000) +
  ``ToTensor``: no augmentation, no normalisation, no padding (SOHO batches stay lists).

    python benchmarks/bench_image_loader.py [--images 160] [--batch-size 32] [--workers 2] [--repeats 3]
"""
import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
import zipfile

import mmf  # noqa: F401  (compatibility layer + our registrations)
import torch
from torch.utils.data import DataLoader, Dataset

from mmf_multilevel.datasets.generate import generate
from mmf_multilevel.images import build_image_lmdb, open_image_source
from mmf_multilevel.processors.images import ImageTransformProcessor

RESOLUTIONS = {
    "224": {"preset": "simla_pretrain", "train": {"size": 224}},
    "256": {"preset": "simla_pretrain"},
    "soho": {"preset": "soho"},
    "soho-unpadded": {"preset": "soho", "train": {"pad_to": None}},
}


class SourceImages(Dataset):
    """``source.get(id)`` + the training pipeline of ``image_transform``."""

    def __init__(self, path, ids, params):
        self.path, self.ids = path, ids
        self.processor = ImageTransformProcessor(params)
        self.source = None

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, index):
        if self.source is None:
            self.source = open_image_source(self.path)
        return self.processor({"image": self.source.get(self.ids[index]), "train": True})["image"]


class ReferenceImages(Dataset):
    """Plain PIL open + torchvision Resize + ToTensor, no augmentation."""

    def __init__(self, folder, ids, resolution):
        from torchvision import transforms

        self.paths = [os.path.join(folder, f"{i}.jpg") for i in ids]
        resize = transforms.Resize(600, max_size=1000) if resolution.startswith("soho") else transforms.Resize((int(resolution),) * 2)
        self.transform = transforms.Compose([resize, transforms.ToTensor()])

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        from PIL import Image

        with Image.open(self.paths[index]) as image:
            return self.transform(image.convert("RGB"))


def collate(batch):
    if all(t.shape == batch[0].shape for t in batch):
        return torch.stack(batch)
    return batch


def rate(dataset, batch_size, workers, repeats):
    """Median images/s over ``repeats`` passes, after one warm-up pass (worker start-up, page cache)."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers, collate_fn=collate,
                        persistent_workers=workers > 0)
    rates = []
    for attempt in range(repeats + 1):
        start = time.perf_counter()
        count = 0
        for batch in loader:
            count += len(batch)
        if attempt:
            rates.append(count / (time.perf_counter() - start))
    del loader
    return statistics.median(rates)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=160, help="generated images (default 160)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers of the second setting (default 2)")
    p.add_argument("--repeats", type=int, default=3, help="passes per measurement; the median is reported")
    p.add_argument("--resolutions", nargs="+", default=list(RESOLUTIONS), choices=list(RESOLUTIONS))
    p.add_argument("--work-dir", default=None, help="where to generate the data (default: a temporary folder)")
    args = p.parse_args(argv)

    torch.set_num_threads(1)  # one thread per loader process, as in DataLoader workers
    work = args.work_dir or tempfile.mkdtemp(prefix="bench_images_")
    data = os.path.join(work, "demo")
    generate(data, num_images=args.images, feature_dim=8, progress=False)
    folder = os.path.join(data, "images")
    zip_path = os.path.join(work, "images.zip")
    if not os.path.exists(zip_path):
        with zipfile.ZipFile(zip_path + ".tmp", "w", compression=zipfile.ZIP_STORED) as archive:
            for name in sorted(os.listdir(folder)):
                archive.write(os.path.join(folder, name), f"images/{name}")
        os.replace(zip_path + ".tmp", zip_path)
    lmdb_path = os.path.join(work, "images.lmdb")
    build_image_lmdb(folder, lmdb_path, progress=False)
    ids = open_image_source(folder).keys()
    sources = {"folder": folder, "zip": zip_path, "lmdb": lmdb_path}

    cores = os.cpu_count()
    print(f"# {time.strftime('%Y-%m-%d')} {platform.machine()} {cores} cores, python {platform.python_version()}, "
          f"torch {torch.__version__}; {len(ids)} JPEGs 320-640 x 240-480 px, batch {args.batch_size}, "
          f"median of {args.repeats} passes after a warm-up pass")
    print(f"{'resolution':<13} {'workers':>7} {'source':<10} {'images/s':>9} {'vs ref':>7}  pipeline")
    for resolution in args.resolutions:
        params = RESOLUTIONS[resolution]
        for workers in (0, args.workers):
            reference = rate(ReferenceImages(folder, ids, resolution), args.batch_size, workers, args.repeats)
            print(f"{resolution:<13} {workers:>7} {'reference':<10} {reference:>9.1f} {1.0:>6.2f}x  "
                  f"PIL open + Resize + ToTensor (no augmentation)")
            for kind, path in sources.items():
                ours = rate(SourceImages(path, ids, params), args.batch_size, workers, args.repeats)
                print(f"{resolution:<13} {workers:>7} {kind:<10} {ours:>9.1f} {ours / reference:>6.2f}x  "
                      f"decode + image_transform train ({params['preset']})")
            sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
