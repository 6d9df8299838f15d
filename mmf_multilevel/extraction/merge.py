"""Merge the caches written by ``--shard I/N`` runs into one cache (resumable)."""
import os
import sys

from mmf_multilevel.features import FeatureCacheReader, FeatureCacheWriter
from mmf_multilevel.features import format as fmt

_SAME = ("layout", "detector", "weights_sha256", "dtype", "feature_dim")


class MergeError(ValueError):
    pass


def merge_caches(sources, output, batch_size=256, progress=True):
    """Copy every record of ``sources`` into ``output``; -> (written, duplicates skipped).

    The sources must come from the same run settings (layout, detector, weights, dtype,
    feature dim and ``info``). An id found in several sources is written once. Rerunning
    after an interruption continues where it stopped.
    """
    if not sources:
        raise MergeError("merge: give at least one source cache")
    out_real = os.path.realpath(output)
    headers = []
    for src in sources:
        if os.path.realpath(src) == out_real:
            raise MergeError(f"merge: the output {output} is also given as a source")
        reader = FeatureCacheReader(src)
        header = reader.header
        reader.close()
        if header is None:
            raise MergeError(f"merge: {src} has no header (written by MMF's own tools?); convert it with `python -m mmf_multilevel.features convert` first")
        headers.append(header)
    first = headers[0]
    for src, header in zip(sources[1:], headers[1:]):
        for name in _SAME + ("info",):
            if name == "feature_dim" and (header.get(name) is None or first.get(name) is None):
                continue
            if header.get(name) != first.get(name):
                raise MergeError(
                    f"merge: {src} has {name}={_brief(header.get(name))} but {sources[0]} has {name}={_brief(first.get(name))}; "
                    "shards of one cache must come from the same settings"
                )
    written = duplicates = 0
    total = sum(h["num_keys"] for h in headers)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="rec", desc="merge", dynamic_ncols=True)
    with FeatureCacheWriter(
        output,
        detector=first["detector"],
        weights_sha256=first["weights_sha256"],
        dtype=first["dtype"],
        batch_size=batch_size,
        mmf_compat=first["layout"] == fmt.LAYOUT_MMF,
        feature_dim=first["feature_dim"],
        info=first.get("info"),
    ) as writer:
        for src in sources:
            with FeatureCacheReader(src) as reader:
                for key in reader.raw_keys():
                    if writer.has(key):
                        duplicates += 1
                    else:
                        record = reader.get(key)
                        fields = {k: v for k, v in record.items() if k in fmt.RECORD_FIELDS and v is not None}
                        writer.write(key.decode("utf-8"), fields)
                        written += 1
                    if bar is not None:
                        bar.update(1)
    if bar is not None:
        bar.close()
    return written, duplicates


def _brief(value):
    text = repr(value)
    return text if len(text) < 100 else text[:97] + "..."


def main_merge(args):
    try:
        written, duplicates = merge_caches(args.sources, args.output, progress=not args.no_progress)
    except (MergeError, fmt.FeatureCacheError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{args.output}: merged {written} records from {len(args.sources)} caches ({duplicates} already present or duplicated)", file=sys.stderr)
    return 0
