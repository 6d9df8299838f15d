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


def grounding_hits(scores, proposals, num_proposals, gold, threshold=0.5):
    """Per expression: does the highest-scoring *real* proposal overlap the gold box with IoU > threshold?

    ``scores`` B x R, ``proposals`` B x R x 4 (xyxy), ``num_proposals`` B, ``gold`` B x 4 (xyxy).
    Padding proposals (index >= num_proposals) are never chosen; an expression with no proposal
    is a miss.
    """
    scores = torch.as_tensor(scores, dtype=torch.float)
    valid = torch.arange(scores.shape[1]).unsqueeze(0) < torch.as_tensor(num_proposals).view(-1, 1)
    masked = scores.masked_fill(~valid, float("-inf"))
    choice = masked.argmax(dim=1)
    chosen = proposals[torch.arange(len(choice)), choice]
    iou = box_iou(chosen, gold)
    return (iou > threshold) & valid.any(dim=1)
