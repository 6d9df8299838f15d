"""Command line of the region feature extractor.

    python feature_extraction/extract.py --model vinvl_x152c4 --weights vinvl_vg_x152c4.pth \\
        --images DIR --output feats.lmdb [--min-boxes 10 --max-boxes 100 | --num-boxes 36] \\
        [--conf-thresh 0.2] [--nms 0.3] [--batch-size N] [--device cuda|cpu] [--workers N] \\
        [--fp16-store] [--shard I/N] [--mmf-compat]
    python feature_extraction/extract.py merge --output feats.lmdb feats.shard0of2.lmdb feats.shard1of2.lmdb

Exit status: 0 all images written, 1 some images failed (listed in ``<output>.errors.tsv``),
2 bad arguments or setup (weights, config, cache mismatch).
"""
import argparse
import os
import re
import sys

from mmf_multilevel.extraction import data as image_data

MODEL_NAMES = ("butd_r101", "vinvl_x152c4")


def _shard(text):
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"--shard expects I/N (e.g. 0/4), got {text!r}")
    index, count = int(m.group(1)), int(m.group(2))
    if count < 1 or index >= count:
        raise argparse.ArgumentTypeError(f"--shard {text}: need 0 <= I < N")
    return index, count


def build_parser():
    p = argparse.ArgumentParser(
        prog="extract.py",
        description="Extract bottom-up region features (BUTD R101-C4 or VinVL X152-C4) into an LMDB region feature cache. "
        "Use `extract.py merge --output OUT SHARD...` to merge shard caches.",
    )
    p.add_argument("--model", required=True, choices=MODEL_NAMES)
    p.add_argument("--weights", help="checkpoint path or URL (BUTD caffe-converted .pkl/.pth, VinVL vinvl_vg_x152c4.pth)")
    p.add_argument("--random-init", type=int, metavar="SEED", default=None,
                   help="use random weights (normalisation calibrated, seeded) instead of --weights: for tests, benchmarks and demos")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", help="folder of images (searched recursively); id = path relative to it without extension")
    src.add_argument("--image-list", help="file with one 'path' or 'image_id<TAB>path' per line")
    p.add_argument("--output", required=True, help="LMDB cache to write (a folder, e.g. feats.lmdb); resumed if it exists")
    p.add_argument("--min-boxes", type=int, default=None, help="at least this many regions per image (default: config, 10)")
    p.add_argument("--max-boxes", type=int, default=None, help="at most this many regions per image (default: config, 100)")
    p.add_argument("--num-boxes", type=int, default=None, help="exactly this many regions (sets min and max), e.g. 36")
    p.add_argument("--conf-thresh", type=float, default=None, help="keep regions with confidence >= this (default 0.2)")
    p.add_argument("--nms", type=float, default=None, help="per-class NMS IoU threshold (default 0.3)")
    p.add_argument("--batch-size", type=int, default=1, help="images per forward pass (padded to the largest)")
    p.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda if available; torchrun: cuda:LOCAL_RANK)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader worker processes decoding images (0 = in the main process)")
    p.add_argument("--precision", choices=("fp32", "fp16", "bf16"), default="fp32", help="autocast precision of the detector (GPU)")
    p.add_argument("--fp16-store", action="store_true", help="store features/probabilities as float16 (half the size)")
    p.add_argument("--shard", type=_shard, default=None, metavar="I/N",
                   help="process every N-th image from the I-th; writes OUTPUT with .shardIofN before .lmdb (default under torchrun: RANK/WORLD_SIZE)")
    p.add_argument("--mmf-compat", action="store_true", help="write MMF's pickled LMDB layout (readable by stock MMF; no attribute fields)")
    p.add_argument("--object-vocab", help="object class names, one per line (stored in the header for object tags)")
    p.add_argument("--attribute-vocab", help="attribute names, one per line")
    p.add_argument("--errors", default=None, help="errors file (default: OUTPUT.errors.tsv)")
    p.add_argument("--commit-every", type=int, default=64, help="records per LMDB transaction")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--opts", nargs=argparse.REMAINDER, default=[], help="detectron2 config overrides: KEY VALUE ... (last argument)")
    return p


def build_merge_parser():
    p = argparse.ArgumentParser(prog="extract.py merge", description="Merge shard caches into one region feature cache.")
    p.add_argument("--output", required=True)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("sources", nargs="+", help="shard caches (e.g. feats.shard*.lmdb)")
    return p


def shard_output(output, index, count):
    base = os.fspath(output).rstrip("/")
    stem, ext = (base[:-5], ".lmdb") if base.endswith(".lmdb") else (base, "")
    return f"{stem}.shard{index}of{count}{ext}"


def _torchrun_rank():
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        world = int(os.environ["WORLD_SIZE"])
        if world > 1:
            return int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", 0))
    return None


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "merge":
        from mmf_multilevel.extraction.merge import main_merge

        return main_merge(build_merge_parser().parse_args(argv[1:]))
    args = build_parser().parse_args(argv)
    try:
        return _extract(args)
    except _SetupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


class _SetupError(Exception):
    pass


def _check_options(args):
    """Reject contradictory or out-of-range options before anything is loaded."""
    if (args.weights is None) == (args.random_init is None):
        raise _SetupError("give exactly one of --weights PATH_OR_URL and --random-init SEED")
    if args.num_boxes is not None and (args.min_boxes is not None or args.max_boxes is not None):
        raise _SetupError("--num-boxes sets both --min-boxes and --max-boxes; give either --num-boxes or --min-boxes/--max-boxes")
    if args.batch_size < 1 or args.workers < 0 or args.commit_every < 1:
        raise _SetupError("--batch-size and --commit-every must be >= 1 and --workers >= 0")


def _select_device(requested, rank):
    """The torch device: ``--device``, else this torchrun rank's GPU, else ``cuda`` when there is one, else ``cpu``."""
    import torch

    device = requested
    if device is None:
        device = f"cuda:{rank[2]}" if rank and torch.cuda.is_available() else ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise _SetupError(f"--device {device}: CUDA is not available on this machine")
    return device


def _select_images(args, shard):
    """The images to extract and the cache to write them to (a shard's own ``.shardIofN`` cache under ``--shard``)."""
    try:
        items = image_data.list_images(args.images, args.image_list)
    except image_data.ImageListError as exc:
        raise _SetupError(str(exc)) from None
    output = args.output
    if shard is not None:
        items = image_data.shard_items(items, *shard)
        output = shard_output(args.output, *shard)
    return items, output


def _load_detector(args, device):
    """The detector's config and model (evaluation mode, on ``device``), its weights layout and weights hash."""
    from mmf_multilevel.extraction import detectors

    try:
        return detectors.load_detector(args.model, args.weights, args.random_init, args.opts, device)
    except detectors.DetectorSetupError as exc:
        raise _SetupError(str(exc)) from None


def _box_limits(args, ex_cfg):
    """Regions per image ``(min, max)``: ``--num-boxes``, else ``--min-boxes``/``--max-boxes``, else the config's."""
    min_boxes = args.num_boxes if args.num_boxes is not None else (args.min_boxes if args.min_boxes is not None else ex_cfg.MIN_BOXES)
    max_boxes = args.num_boxes if args.num_boxes is not None else (args.max_boxes if args.max_boxes is not None else ex_cfg.MAX_BOXES)
    return min_boxes, max_boxes


def _extract(args):
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    _check_options(args)

    rank = _torchrun_rank()
    shard = args.shard or (rank[:2] if rank else None)
    device = _select_device(args.device, rank)
    items, output = _select_images(args, shard)
    errors_path = args.errors or _default_errors(output)

    from mmf_multilevel.compat.detectron2 import INSTALL_HINT, detectron2_available

    if not detectron2_available():
        raise _SetupError(INSTALL_HINT)
    from mmf_multilevel.extraction import runner
    from mmf_multilevel.extraction.extractor import RegionFeatureExtractor
    from mmf_multilevel.features import FeatureCacheError, FeatureCacheWriter

    cfg, model, layout, weights_sha = _load_detector(args, device)
    ex_cfg = cfg.EXTRACT
    min_boxes, max_boxes = _box_limits(args, ex_cfg)
    try:
        extractor = RegionFeatureExtractor(
            model,
            min_boxes=min_boxes,
            max_boxes=max_boxes,
            conf_thresh=args.conf_thresh if args.conf_thresh is not None else ex_cfg.CONF_THRESH,
            nms_thresh=args.nms if args.nms is not None else ex_cfg.NMS_THRESH,
            precision=args.precision,
        )
        info = runner.build_info(
            args.model,
            cfg,
            extractor,
            runner.read_vocab(args.object_vocab, "object"),
            runner.read_vocab(args.attribute_vocab, "attribute"),
            weights_layout=layout,
        )
    except (ValueError, FileNotFoundError) as exc:
        raise _SetupError(str(exc)) from None

    try:
        writer = FeatureCacheWriter(
            output,
            detector=args.model,
            weights_sha256=weights_sha,
            dtype="float16" if args.fp16_store else "float32",
            batch_size=args.commit_every,
            mmf_compat=args.mmf_compat,
            feature_dim=int(cfg.MODEL.RESNETS.RES2_OUT_CHANNELS) * 8,
            info=info,
        )
    except (FeatureCacheError, ValueError) as exc:
        raise _SetupError(str(exc)) from None
    with writer:
        summary = runner.run_extraction(
            extractor,
            items,
            writer,
            batch_size=args.batch_size,
            workers=args.workers,
            min_size=int(cfg.INPUT.MIN_SIZE_TEST),
            max_size=int(cfg.INPUT.MAX_SIZE_TEST),
            errors_path=errors_path,
            progress=not args.no_progress,
            mmf_compat=args.mmf_compat,
        )
    runner.print_summary(summary, output, errors_path)
    return 1 if summary.failed else 0


def _default_errors(output):
    from mmf_multilevel.extraction.runner import errors_path_for

    return errors_path_for(output)


def run():
    """Console-script entry point."""
    sys.exit(main())


if __name__ == "__main__":
    run()
