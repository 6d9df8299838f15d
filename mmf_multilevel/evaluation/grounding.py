"""Referring-expression grounding (RefCOCO+): box IoU and accuracy over detector proposals."""
import torch


def xywh_to_xyxy(boxes):
    boxes = torch.as_tensor(boxes, dtype=torch.float)
    return torch.cat([boxes[..., :2], boxes[..., :2] + boxes[..., 2:]], dim=-1)


def box_iou(a, b):
    """IoU of matching rows of ``a`` and ``b`` (... x 4, x1 y1 x2 y2, pixels), as the COCO API computes it.

    Boxes are continuous coordinates (area = (x2 - x1) * (y2 - y1)); an empty box has IoU 0.
    """
    a, b = torch.as_tensor(a, dtype=torch.float), torch.as_tensor(b, dtype=torch.float)
    lt = torch.maximum(a[..., :2], b[..., :2])
    rb = torch.minimum(a[..., 2:], b[..., 2:])
    inter = (rb - lt).clamp(min=0).prod(dim=-1)
    area_a = (a[..., 2:] - a[..., :2]).clamp(min=0).prod(dim=-1)
    area_b = (b[..., 2:] - b[..., :2]).clamp(min=0).prod(dim=-1)
    union = area_a + area_b - inter
    return torch.where(union > 0, inter / union.clamp(min=1e-12), torch.zeros_like(union))


def pairwise_iou(a, b):
    """IoU of every box of ``a`` (N x 4) with every box of ``b`` (M x 4) -> N x M."""
    return box_iou(a.unsqueeze(1), b.unsqueeze(0))


def chosen_proposals(scores, num_proposals):
    """``(choice, valid)``: per expression the index of its highest-scoring *real* proposal (the first of equal
    scores; padding, index >= num_proposals, is never chosen) and the B x R mask of the real ones. ``scores``
    B x R, ``num_proposals`` B. The prediction of ``refcoco_accuracy`` (:func:`grounding_hits`) and of
    ``mmf_multilevel.predict``'s ``Predictor.ground``."""
    scores = torch.as_tensor(scores, dtype=torch.float)
    valid = torch.arange(scores.shape[1]).unsqueeze(0) < torch.as_tensor(num_proposals).view(-1, 1)
    masked = scores.masked_fill(~valid, float("-inf"))
    return masked.argmax(dim=1), valid


def grounding_hits(scores, proposals, num_proposals, gold, threshold=0.5):
    """Per expression: does the highest-scoring *real* proposal overlap the gold box with IoU > threshold?

    ``scores`` B x R, ``proposals`` B x R x 4 (xyxy), ``num_proposals`` B, ``gold`` B x 4 (xyxy).
    Padding proposals (index >= num_proposals) are never chosen; an expression with no proposal
    is a miss.
    """
    choice, valid = chosen_proposals(scores, num_proposals)
    chosen = proposals[torch.arange(len(choice)), choice]
    iou = box_iou(chosen, gold)
    return (iou > threshold) & valid.any(dim=1)
