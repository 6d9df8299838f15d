"""Batched region feature extraction with a detectron2 C4 detector, BUTD/VinVL box selection."""
import contextlib

import torch
from torchvision.ops import box_iou, nms


def _max_conf_loop(boxes, scores, nms_thresh):
    """Per-class NMS, one torchvision call per class (fast on CPU)."""
    max_conf = torch.zeros(scores.shape[0], dtype=scores.dtype, device=scores.device)
    for c in range(1, scores.shape[1]):
        column = scores[:, c]
        keep = nms(boxes, column, nms_thresh)
        max_conf[keep] = torch.maximum(max_conf[keep], column[keep])
    return max_conf


def _max_conf_vectorised(boxes, scores, nms_thresh):
    """The same greedy per-class NMS, all classes at once (fast on GPU: no per-class host sync).

    All classes share the proposal boxes, hence one IoU matrix; the greedy scan runs over
    score ranks, every class in parallel: the box at rank k of class c is kept unless a kept
    box of higher rank in c overlaps it by more than ``nms_thresh`` (torchvision's rule).
    """
    fg = scores[:, 1:]
    num, classes = fg.shape
    overlaps = box_iou(boxes, boxes) > nms_thresh
    order = torch.argsort(fg, dim=0, descending=True, stable=True).t().contiguous()  # (C, R): box at rank k
    kept = torch.zeros(classes, num, dtype=torch.bool, device=boxes.device)
    kept[:, 0] = True
    for k in range(1, num):
        candidates = order[:, k]
        suppressed = overlaps[candidates[:, None], order[:, :k]] & kept[:, :k]
        kept[:, k] = ~suppressed.any(dim=1)
    ranked = fg.t().gather(1, order)  # (C, R) score of the box at each rank
    kept_scores = torch.where(kept, ranked, torch.zeros_like(ranked))
    max_conf = torch.zeros(num, dtype=scores.dtype, device=scores.device)
    return max_conf.scatter_reduce(0, order.reshape(-1), kept_scores.reshape(-1), reduce="amax", include_self=True)


def select_regions(boxes, cls_prob, min_boxes, max_boxes, conf_thresh, nms_thresh, method="auto"):
    """Bottom-up attention's region selection.

    For every object class (column 1.. of ``cls_prob``; column 0 is the background), NMS at
    ``nms_thresh`` over the proposal boxes scored by that class; a box's confidence is the
    highest class score with which it survived. Boxes with confidence >= ``conf_thresh`` are
    kept, at least ``min_boxes`` and at most ``max_boxes`` of them (the most confident; fewer
    when the image has fewer proposals). -> (indices sorted by confidence, descending; confidences).
    ``method``: ``loop`` (one NMS per class), ``vectorised`` (all classes at once) or ``auto``
    (vectorised on GPU); both give the same result.
    """
    num = boxes.shape[0]
    if num == 0:
        empty = torch.zeros(0, dtype=torch.long, device=boxes.device)
        return empty, torch.zeros(0, dtype=cls_prob.dtype, device=boxes.device)
    boxes = boxes.float()
    scores = cls_prob.float()
    if method == "auto":
        method = "vectorised" if boxes.device.type == "cuda" else "loop"
    if method == "loop":
        max_conf = _max_conf_loop(boxes, scores, nms_thresh)
    elif method == "vectorised":
        max_conf = _max_conf_vectorised(boxes, scores, nms_thresh)
    else:
        raise ValueError(f"method must be auto, loop or vectorised, got {method!r}")
    order = torch.argsort(max_conf, descending=True, stable=True)
    passing = int((max_conf >= conf_thresh).sum())
    count = min(max(passing, min_boxes), max_boxes, num)
    chosen = order[:count]
    return chosen, max_conf[chosen]


class RegionFeatureExtractor:
    """Runs a detectron2 model built by :mod:`.models` on batches of preprocessed images.

    ``__call__(images, sizes)`` takes a list of 3 x H x W float tensors (BGR 0-255, already
    resized, sizes may differ: the batch is padded) and each image's original ``(width, height)``,
    and returns one dict per image: ``features`` (N x D float32),
    ``boxes`` (N x 4 in original pixels), ``cls_prob`` (N x C+1, background first),
    ``objects`` (N, 0-based object class), ``attr_prob`` (N x A+1, "no attribute" first),
    ``attrs`` (N, 0-based attribute), ``scores`` (N, selection confidence, descending).
    """

    def __init__(self, model, min_boxes=10, max_boxes=100, conf_thresh=0.2, nms_thresh=0.3, precision="fp32"):
        if min_boxes < 1 or max_boxes < min_boxes:
            raise ValueError(f"need 1 <= min_boxes <= max_boxes, got min_boxes={min_boxes}, max_boxes={max_boxes}")
        if not 0.0 <= conf_thresh <= 1.0:
            raise ValueError(f"conf_thresh must be in [0, 1], got {conf_thresh}")
        if not 0.0 < nms_thresh <= 1.0:
            raise ValueError(f"nms_thresh must be in (0, 1], got {nms_thresh}")
        if precision not in ("fp32", "fp16", "bf16"):
            raise ValueError(f"precision must be fp32, fp16 or bf16, got {precision!r}")
        self.model = model
        self.min_boxes, self.max_boxes = int(min_boxes), int(max_boxes)
        self.conf_thresh, self.nms_thresh = float(conf_thresh), float(nms_thresh)
        self.precision = precision

    @property
    def device(self):
        return self.model.device

    def _autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.float16 if self.precision == "fp16" else torch.bfloat16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    @torch.no_grad()
    def __call__(self, images, sizes):
        model = self.model
        inputs = [{"image": image.to(model.device, non_blocking=True)} for image in images]
        with self._autocast():
            batch = model.preprocess_image(inputs)  # normalise + pad to one tensor
            features = model.backbone(batch.tensor)
            proposals, _ = model.proposal_generator(batch, features, None)
            boxes = [p.proposal_boxes for p in proposals]
            pooled, cls_prob = model.roi_heads.region_outputs(features, boxes)
        counts = [len(p) for p in proposals]
        outputs = []
        for image, pooled_i, prob_i, boxes_i, (width, height) in zip(images, pooled.split(counts), cls_prob.split(counts), boxes, sizes):
            sx, sy = image.shape[2] / float(width), image.shape[1] / float(height)
            box_tensor = boxes_i.tensor.float()
            chosen, conf = select_regions(box_tensor, prob_i, self.min_boxes, self.max_boxes, self.conf_thresh, self.nms_thresh)
            feats = pooled_i[chosen]
            probs = prob_i[chosen]
            objects = probs[:, 1:].argmax(dim=1)
            with self._autocast():
                attr_prob = model.roi_heads.attribute_probs(feats, objects)
            scale = box_tensor.new_tensor([sx, sy, sx, sy])
            limit = box_tensor.new_tensor([width, height, width, height])
            kept_boxes = torch.minimum((box_tensor[chosen] / scale).clamp_min(0.0), limit)
            out = {
                "features": feats.float().cpu(),
                "boxes": kept_boxes.cpu(),
                "cls_prob": probs.float().cpu(),
                "objects": objects.cpu(),
                "scores": conf.float().cpu(),
            }
            if attr_prob is not None:
                out["attr_prob"] = attr_prob.float().cpu()
                out["attrs"] = attr_prob[:, 1:].argmax(dim=1).cpu()
            outputs.append(out)
        return outputs
