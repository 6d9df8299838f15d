"""``python -m mmf_multilevel.images build-lmdb | check | info``."""
import argparse
import json
import os
import sys

from mmf_multilevel.images.pack import build_image_lmdb, check_source
from mmf_multilevel.images.sources import (
    BAD_IMAGES_FILE,
    ImageSourceError,
    LmdbImageSource,
    MissingImageError,
    open_image_source,
)


def build_parser():
    p = argparse.ArgumentParser(prog="python -m mmf_multilevel.images",
                                description="Image sources for raw-image datasets: build an LMDB, check, info.")
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build-lmdb", help="copy a folder's or zip's encoded images into an LMDB (resumable)")
    b.add_argument("source", help="a folder of images, a .zip, or an LMDB")
    b.add_argument("out", help="the LMDB folder to write (a rerun resumes)")
    b.add_argument("--batch-size", type=int, default=256, help="images per write transaction (default 256)")
    b.add_argument("--no-verify", action="store_true", help="store bytes without decoding them first")
    b.add_argument("--stop-on-error", action="store_true", help="stop at the first bad image (default: list and skip)")
    b.add_argument("--extensions", nargs="+", default=None, help="image extensions to take (default: common ones)")
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    c = sub.add_parser("check", help="decode every image of a source and list the bad ones")
    c.add_argument("source")
    c.add_argument("--quiet", action="store_true")
    i = sub.add_parser("info", help="kind, image count and header of a source")
    i.add_argument("source")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        if args.command == "build-lmdb":
            summary = build_image_lmdb(args.source, args.out, batch_size=args.batch_size, verify=not args.no_verify,
                                       on_error="raise" if args.stop_on_error else "skip", progress=not args.quiet,
                                       extensions=args.extensions)
            print(f"{args.out}: {summary['written']} written, {summary['skipped_existing']} already there, "
                  f"{summary['bad']} bad of {summary['total']}"
                  + (f" (listed in {os.path.join(args.out, BAD_IMAGES_FILE)})" if summary["bad"] else ""))
            return 1 if summary["bad"] else 0
        if args.command == "check":
            bad = check_source(args.source, progress=not args.quiet)
            for image_id, error in sorted(bad.items()):
                print(json.dumps({"image_id": image_id, "error": error}, ensure_ascii=False))
            print(f"{args.source}: {len(bad)} bad image(s)", file=sys.stderr)
            return 1 if bad else 0
        src = open_image_source(args.source)
        info = {"path": src.path, "kind": src.kind, "images": len(src)}
        if isinstance(src, LmdbImageSource):
            info["header"] = src.header
        print(json.dumps(info, indent=2))
        return 0
    except (FileNotFoundError, FileExistsError, ImageSourceError, MissingImageError, ValueError) as exc:
        print(f"images: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
