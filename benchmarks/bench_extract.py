"""Region feature extraction speed: batched + DataLoader workers vs the originals' per-image loop.

    python benchmarks/bench_extract.py                      # tiny detectors (seconds), both models
    python benchmarks/bench_extract.py --size full --images 4 --model butd_r101   # 600x1000, real architecture
    python benchmarks/bench_extract.py --size full --device cuda --batch-size 8 --workers 8 --precision fp16 --images 64

Both runs go through the same extractor and cache writer in the same process, on the same
generated JPEGs, with random weights (the cost does not depend on the weight values):

* reference - one image per forward pass, decoding in the main process, fp32, one LMDB
  transaction per image (how py-bottom-up-attention / VinVL's scripts run);
* batched - ``--batch-size`` images per forward pass (padded), ``--workers`` decoding processes,
  ``--precision`` autocast, records committed 64 at a time.

It prints images/s of both and their ratio, and the analytic cost per image (FLOPs of the
convolutions and linear layers for a 600 x 1000 input and 300 proposals) of R101-C4 and X152-C4.
"""
import argparse
import os
import shutil
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

TINY_OPTS = None


# --------------------------------------------------------------------------- analytic cost
def c4_flops(depth=101, groups=1, width=64, stride_in_1x1=True, res5_dilation=1, height=600, width_px=1000,
             proposals=300, num_classes=1600, anchors=12, pooler=14):
    """FLOPs (2 x multiply-adds) of a Faster R-CNN C4 forward: {backbone, rpn, res5_head, predictor, total}."""
    blocks = {50: [3, 4, 6, 3], 101: [3, 4, 23, 3], 152: [3, 8, 36, 3]}[depth]

    def conv(h, w, cin, cout, k, stride=1, g=1):
        ho, wo = -(-h // stride), -(-w // stride)
        return ho * wo * cout * (cin // g) * k * k, ho, wo

    total = {}
    macs, h, w = conv(height, width_px, 3, 64, 7, 2)
    h, w = -(-h // 2), -(-w // 2)  # pool1
    cin = 64

    def stage(h, w, cin, n, bottleneck, cout, stride, dilation=1):
        m = 0
        for i in range(n):
            s = stride if i == 0 else 1
            s1, s3 = (s, 1) if stride_in_1x1 else (1, s)
            a, h1, w1 = conv(h, w, cin, bottleneck, 1, s1)
            b, h2, w2 = conv(h1, w1, bottleneck, bottleneck, 3, s3, groups)
            c, h3, w3 = conv(h2, w2, bottleneck, cout, 1)
            m += a + b + c
            if i == 0:
                m += conv(h, w, cin, cout, 1, s)[0]
            h, w, cin = h3, w3, cout
        return m, h, w

    for idx, n in enumerate(blocks[:3]):
        bottleneck = groups * width * (2 ** idx)
        cout = 256 * (2 ** idx)
        m, h, w = stage(h, w, cin, n, bottleneck, cout, 1 if idx == 0 else 2)
        macs += m
        cin = cout
    total["backbone"] = 2 * macs
    rpn = conv(h, w, 1024, 1024, 3)[0] + conv(h, w, 1024, anchors * 5, 1)[0]
    total["rpn"] = 2 * rpn
    m, _, _ = stage(pooler, pooler, 1024, blocks[3], groups * width * 8, 2048, 2 if res5_dilation == 1 else 1)
    total["res5_head"] = 2 * m * proposals
    total["predictor"] = 2 * proposals * 2048 * (num_classes + 1 + 4 * num_classes)
    total["total"] = sum(total.values())
    return total


ANALYTIC = {
    "butd_r101": dict(depth=101, groups=1, width=64, stride_in_1x1=True, res5_dilation=2, num_classes=1600, anchors=12),
    "vinvl_x152c4": dict(depth=152, groups=32, width=8, stride_in_1x1=False, res5_dilation=1, num_classes=1594, anchors=15),
}


# --------------------------------------------------------------------------- timing
def make_jpegs(folder, count, full):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(count):
        w, h = ((int(rng.integers(560, 720)), int(rng.integers(400, 540))) if full else (int(rng.integers(100, 160)), int(rng.integers(80, 130))))
        coarse = rng.integers(0, 255, (h // 8, w // 8, 3), dtype=np.uint8)
        Image.fromarray(coarse).resize((w, h), Image.BILINEAR).save(os.path.join(folder, f"im{i:04d}.jpg"), quality=90)


def time_run(extractor, items, out, batch_size, workers, commit_every, min_size, max_size):
    from mmf_multilevel.extraction import runner
    from mmf_multilevel.features import FeatureCacheWriter

    with FeatureCacheWriter(out, detector="bench", batch_size=commit_every) as writer:
        summary = runner.run_extraction(extractor, items, writer, batch_size=batch_size, workers=workers,
                                        min_size=min_size, max_size=max_size, progress=False)
    if summary.failed:
        raise RuntimeError(f"benchmark images failed: {summary.failed[:3]}")
    return summary.written / summary.seconds


def bench_model(name, args, tmp):
    import torch
    from extract_helpers import tiny_opts

    from mmf_multilevel.extraction import data, detectors
    from mmf_multilevel.extraction.extractor import RegionFeatureExtractor

    opts = tiny_opts(name) if args.size == "tiny" else []
    cfg = detectors.load_config(name, opts)
    t0 = time.perf_counter()
    model = detectors.build_random_detector(cfg, seed=0, device=args.device)
    build_s = time.perf_counter() - t0
    params = sum(p.numel() for p in model.parameters())
    images = os.path.join(tmp, "images")
    items = data.list_images(images)
    warm = RegionFeatureExtractor(model)
    first = data.ImageDataset(items[:1], cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)[0]
    warm([first["image"]], [(first["width"], first["height"])])  # warm-up (allocator, kernels)
    results = {}
    for label, batch, workers, commit, precision in (
        ("reference", 1, 0, 1, "fp32"),
        ("batched", args.batch_size, args.workers, 64, args.precision),
    ):
        ex = RegionFeatureExtractor(model, precision=precision)
        out = os.path.join(tmp, f"{name}-{label}.lmdb")
        results[label] = time_run(ex, items, out, batch, workers, commit, cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)
        shutil.rmtree(out, ignore_errors=True)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
    ratio = results["batched"] / results["reference"]
    print(
        f"{name} [{args.size}, {params / 1e6:.2f} M params, build {build_s:.1f} s, {len(items)} images, device {args.device}]: "
        f"reference (batch 1, no workers, fp32) {results['reference']:.3f} img/s; "
        f"batched (batch {args.batch_size}, {args.workers} workers, {args.precision}) {results['batched']:.3f} img/s; "
        f"ratio {ratio:.2f}x",
        flush=True,
    )
    return results


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=("butd_r101", "vinvl_x152c4", "both"), default="both")
    p.add_argument("--size", choices=("tiny", "full"), default="tiny", help="tiny test detector, or the real architecture at 600x1000")
    p.add_argument("--images", type=int, default=None, help="images per run (default 16 tiny, 4 full)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--precision", choices=("fp32", "fp16", "bf16"), default="fp32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    count = args.images or (16 if args.size == "tiny" else 4)

    print("analytic cost per image (600x1000 input, 300 proposals; FLOPs = 2 x multiply-adds):")
    for name, spec in ANALYTIC.items():
        f = c4_flops(**spec)
        parts = ", ".join(f"{k} {v / 1e9:.0f}" for k, v in f.items() if k != "total")
        print(f"  {name}: {f['total'] / 1e9:.0f} GFLOPs ({parts})")
    names = ("butd_r101", "vinvl_x152c4") if args.model == "both" else (args.model,)
    tmp = tempfile.mkdtemp(prefix="bench_extract_")
    try:
        os.makedirs(os.path.join(tmp, "images"))
        make_jpegs(os.path.join(tmp, "images"), count, args.size == "full")
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d')}")
        for name in names:
            bench_model(name, args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
