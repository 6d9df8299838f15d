"""The extraction run: images -> detector -> region feature cache, batched and resumable.

Resumption comes from the cache writer: records are committed in whole transactions together
with the header, so after kill -9 the cache holds exactly the committed images; a rerun lists
the images again, skips the ids already present and extracts the rest. Images that fail
(unreadable, too small, too large, or a model error on that image alone) are written to the
errors file (``<output>.errors.tsv``: ``image_id<TAB>path<TAB>reason``; temp file + rename)
and the run goes on; they are retried on the next run.
"""
import json
import os
import sys
import time

import torch

from mmf_multilevel.extraction import data as image_data
from mmf_multilevel.files import write_lines_atomically

EXTRACTOR_VERSION = 1


class RunSummary:
    def __init__(self):
        self.total = 0
        self.skipped = 0
        self.written = 0
        self.failed = []  # (image_id, path, reason)
        self.seconds = 0.0

    @property
    def images_per_second(self):
        return self.written / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self):
        return {
            "images": self.total,
            "already_present": self.skipped,
            "written": self.written,
            "failed": len(self.failed),
            "seconds": round(self.seconds, 3),
            "images_per_second": round(self.images_per_second, 4),
        }


def errors_path_for(output):
    return os.fspath(output).rstrip("/") + ".errors.tsv"


def write_errors(path, failures):
    """Write the failures (image_id, path, reason) atomically; remove a stale file when there are none."""
    rows = (f"{image_id}\t{image_path}\t{' '.join(str(reason).split())}" for image_id, image_path, reason in failures)
    write_lines_atomically(path, rows, header="image_id\tpath\treason", remove_when_empty=True)


def build_info(model_name, cfg, extractor, object_names=None, attribute_names=None, weights_layout=None):
    """Header ``info``: what produced the cache (settings that must not change on resume)."""
    num_classes = int(cfg.MODEL.ROI_HEADS.NUM_CLASSES)
    num_attrs = int(cfg.MODEL.ROI_ATTRIBUTE_HEAD.NUM_CLASSES) - 1 if cfg.MODEL.ATTRIBUTE_ON else 0
    if object_names is not None and len(object_names) != num_classes:
        raise ValueError(f"object vocabulary has {len(object_names)} names, the model has {num_classes} object classes")
    if attribute_names is not None and len(attribute_names) != num_attrs:
        raise ValueError(f"attribute vocabulary has {len(attribute_names)} names, the model has {num_attrs} attributes")
    return {
        "extractor": "mmf_multilevel.extraction",
        "extractor_version": EXTRACTOR_VERSION,
        "model": model_name,
        "architecture": {
            "depth": int(cfg.MODEL.RESNETS.DEPTH),
            "num_groups": int(cfg.MODEL.RESNETS.NUM_GROUPS),
            "width_per_group": int(cfg.MODEL.RESNETS.WIDTH_PER_GROUP),
            "pooler": cfg.MODEL.ROI_BOX_HEAD.POOLER_TYPE,
            "rpn_post_nms_topk": int(cfg.MODEL.RPN.POST_NMS_TOPK_TEST),
            "num_classes": num_classes,
            "num_attributes": num_attrs,
        },
        "input": {"min_size": int(cfg.INPUT.MIN_SIZE_TEST), "max_size": int(cfg.INPUT.MAX_SIZE_TEST), "format": "BGR"},
        "selection": {
            "min_boxes": extractor.min_boxes,
            "max_boxes": extractor.max_boxes,
            "conf_thresh": extractor.conf_thresh,
            "nms_thresh": extractor.nms_thresh,
            "boxes": "RPN proposals kept by per-class NMS, in original image pixels (x1 y1 x2 y2)",
        },
        "precision": extractor.precision,
        "weights_layout": weights_layout,
        "fields": {
            "cls_prob": "column 0 = background, column k = object_names[k - 1]",
            "objects": "0-based index into object_names (argmax of cls_prob[:, 1:])",
            "attr_prob": "column 0 = no attribute, column k = attribute_names[k - 1]",
            "attrs": "0-based index into attribute_names (argmax of attr_prob[:, 1:])",
        },
        "object_names": list(object_names) if object_names is not None else None,
        "attribute_names": list(attribute_names) if attribute_names is not None else None,
    }


def read_vocab(path, what):
    """One name per line (``name,synonym,...`` keeps the first); -> list of names."""
    if path is None:
        return None
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} vocabulary not found: {path}")
    names = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            name = line.strip().split(",")[0].strip()
            if not name:
                raise ValueError(f"{path}:{lineno}: empty {what} name")
            names.append(name)
    return names


def region_record(out, width, height, mmf_compat=False):
    """The cache record of one image: the extractor's output ``out`` (tensors) as numpy arrays, with its original size."""
    record = {
        "features": out["features"].numpy(),
        "boxes": out["boxes"].numpy(),
        "cls_prob": out["cls_prob"].numpy(),
        "objects": out["objects"].numpy(),
        "image_w": int(width),
        "image_h": int(height),
    }
    if not mmf_compat and "attr_prob" in out:
        record["attr_prob"] = out["attr_prob"].numpy()
        record["attrs"] = out["attrs"].numpy()
    return record


def run_extraction(
    extractor,
    items,
    writer,
    batch_size=1,
    workers=0,
    min_size=600,
    max_size=1000,
    errors_path=None,
    progress=True,
    mmf_compat=False,
    log=None,
):
    """Extract every (image_id, path) of ``items`` not yet in ``writer``; -> :class:`RunSummary`."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    summary = RunSummary()
    summary.total = len(items)
    pending = [(i, p) for i, p in items if not writer.has(i)]
    summary.skipped = len(items) - len(pending)
    if summary.skipped:
        log(f"resuming: {summary.skipped} of {len(items)} images are already in {writer.path}")
    dataset = image_data.ImageDataset(pending, min_size, max_size)
    use_cuda = extractor.device.type == "cuda"
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=image_data.collate_list,
        pin_memory=use_cuda,
        prefetch_factor=4 if workers > 0 else None,
        persistent_workers=False,
    )
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(pending), unit="img", desc="extract", dynamic_ncols=True, smoothing=0.1)
    start = time.perf_counter()
    try:
        for batch in loader:
            good = [b for b in batch if "error" not in b]
            for b in batch:
                if "error" in b:
                    summary.failed.append((b["image_id"], b["path"], b["error"]))
            for item, out in _run_batch(extractor, good, summary):
                writer.write(item["image_id"], region_record(out, item["width"], item["height"], mmf_compat))
                summary.written += 1
            if bar is not None:
                bar.update(len(batch))
                bar.set_postfix(failed=len(summary.failed), refresh=False)
        writer.flush()
    finally:
        summary.seconds = time.perf_counter() - start
        if bar is not None:
            bar.close()
        if errors_path is not None:
            write_errors(errors_path, summary.failed)
    return summary


def _run_batch(extractor, good, summary):
    """Outputs for a batch; if the batch fails, each image is retried alone and failures recorded."""
    if not good:
        return []
    try:
        outs = extractor([b["image"] for b in good], [(b["width"], b["height"]) for b in good])
        return list(zip(good, outs))
    except Exception as exc:
        if len(good) == 1:
            b = good[0]
            summary.failed.append((b["image_id"], b["path"], f"detector failed on this image ({type(exc).__name__}: {exc})"))
            _free_cuda()
            return []
    _free_cuda()
    results = []
    for b in good:
        results.extend(_run_batch(extractor, [b], summary))
    return results


def _free_cuda():
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def print_summary(summary, output, errors_path, stream=sys.stderr):
    info = summary.as_dict()
    print(
        f"{output}: {info['written']} written, {info['already_present']} already present, {info['failed']} failed "
        f"of {info['images']} images in {info['seconds']:.1f} s ({info['images_per_second']:.3f} img/s)",
        file=stream,
    )
    if summary.failed:
        reasons = {}
        for _, _, reason in summary.failed:
            key = reason.split(" (")[0]
            reasons[key] = reasons.get(key, 0) + 1
        for reason, count in sorted(reasons.items(), key=lambda kv: -kv[1]):
            print(f"  {count} x {reason}", file=stream)
        print(f"  failed images are listed in {errors_path}", file=stream)
    print(json.dumps({"summary": info}), file=stream)
