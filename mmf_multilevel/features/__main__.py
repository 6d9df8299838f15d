"""``python -m mmf_multilevel.features {check,info,convert} ...``"""
import argparse
import json
import sys

from mmf_multilevel.features import format as fmt


def _cmd_check(args):
    from mmf_multilevel.features.check import check_cache

    report = check_cache(args.path, deep=args.deep, progress=args.progress)
    print(report.summary())
    return 0 if report.ok else 1


def _cmd_info(args):
    from mmf_multilevel.features.check import cache_info

    info = cache_info(args.path)
    print(json.dumps(info, indent=2, sort_keys=True))
    return 0


def _cmd_convert(args):
    from mmf_multilevel.features.reader import FeatureCacheReader
    from mmf_multilevel.features.writer import FeatureCacheWriter

    reader = FeatureCacheReader(args.src)
    header = reader.header or {}
    detector = args.detector or header.get("detector")
    if not detector:
        print(f"error: {args.src} has no header naming its detector; pass --detector", file=sys.stderr)
        return 1
    weights = args.weights_sha256 or header.get("weights_sha256")
    dtype = args.dtype or header.get("dtype") or "float32"
    keys = reader.raw_keys()
    iterator = keys
    if args.progress:
        from tqdm import tqdm

        iterator = tqdm(keys, desc="convert", unit="rec")
    with FeatureCacheWriter(
        args.dst, detector=detector, weights_sha256=weights, dtype=dtype, batch_size=args.batch_size, mmf_compat=args.mmf_compat
    ) as writer:
        for key in iterator:
            if writer.has(key):
                continue
            record = reader.get(key)
            record.pop("image_id", None)
            writer.write(key.decode("utf-8"), record)
    written, skipped, total = writer.written, writer.skipped, len(writer)
    print(f"{args.dst}: {total} records ({written} written now)" + (f", {skipped} skipped" if skipped else ""))
    return 0


def build_parser():
    parser = argparse.ArgumentParser(prog="python -m mmf_multilevel.features", description="Region feature cache tools.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("check", help="verify header vs data and every record; exit 1 on problems")
    p.add_argument("path")
    p.add_argument("--deep", action="store_true", help="also decode every array, check finiteness and box order")
    p.add_argument("--progress", action="store_true", help="show a progress bar")
    p.set_defaults(func=_cmd_check)
    p = sub.add_parser("info", help="print the header and counts")
    p.add_argument("path")
    p.set_defaults(func=_cmd_info)
    p = sub.add_parser("convert", help="copy a cache into another layout/dtype (resumable)")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--mmf-compat", action="store_true", help="write MMF's pickled layout")
    p.add_argument("--dtype", choices=sorted(fmt.DTYPES))
    p.add_argument("--detector", help="detector name (default: from the source header)")
    p.add_argument("--weights-sha256", help="detector weights checksum (default: from the source header)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--progress", action="store_true")
    p.set_defaults(func=_cmd_convert)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except fmt.FeatureCacheError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
