"""The batch contract: the one place where an MMF ``SampleList`` becomes model tensors.

Every method's adapter reads its inputs through these functions and nothing else, so a method sees
the same tensors whatever dataset produced them:

* :func:`text_inputs` -> :class:`TextInputs` ``(input_ids, mask, segment_ids)``;
* :func:`region_inputs` -> :class:`RegionInputs`: float features checked against the model's
  ``feature_dim``, the region mask from ``max_features`` / ``num_boxes``, boxes normalised **once**
  here (``"4d"`` ``x1/W y1/H x2/W y2/H`` or ``"5d"`` with the relative area), zero on padding, the
  detector's labels when the cache has them, and - when the dataset drew masked regions - the
  regions to predict (``selected``) and the features the network reads (``corrupted``);
* :func:`pixel_inputs` -> :class:`PixelInputs`: the image batch with its valid-pixel mask (from the
  ``image_size`` the raw-image processors record, so padding never counts as picture).

NLVR2's paired layout puts each image under ``img0`` / ``img1``; ``side`` selects it. Datasets and
processors emit model-ready inputs and targets (see ``docs/ARCHITECTURE.md``, the masking rule); the
contract draws no masks, it only applies the decisions a dataset drew. It imports no MMF: a ``SampleList`` is read as a mapping.
"""
from dataclasses import dataclass
from typing import Optional

import torch

from mmf_multilevel.modules.masking import RegionMasking, apply_region_masking
from mmf_multilevel.modules.visual import normalize_boxes, num_boxes_to_mask

__all__ = ["TextInputs", "RegionInputs", "PixelInputs", "text_inputs", "region_inputs", "pixel_inputs", "detector_labels"]

PAIRED_SIDES = ("img0", "img1")


@dataclass
class TextInputs:
    input_ids: torch.Tensor  # (B, T) long
    mask: torch.Tensor  # (B, T), 1 = real token
    segment_ids: Optional[torch.Tensor] = None  # (B, T) or None


@dataclass
class RegionInputs:
    features: torch.Tensor  # (B, N, D) float: the originals (the masked-region regression target)
    boxes: torch.Tensor  # (B, N, 4 | 5) normalised, zero on padding
    mask: torch.Tensor  # (B, N) long, 1 = real region
    info: dict  # MMF's image_info_0 (detector labels, sizes) as the dataset gave it
    #: (B, N, D) what the network reads: ``features`` with the dataset's masked-region decisions applied
    #: (zeroed / replaced regions); ``features`` itself when the batch has none
    corrupted: Optional[torch.Tensor] = None
    #: (B, N) bool, the regions a masked-region objective predicts (the dataset's ``region_selected``); or None
    selected: Optional[torch.Tensor] = None

    def __post_init__(self):
        if self.corrupted is None:
            self.corrupted = self.features


@dataclass
class PixelInputs:
    pixels: torch.Tensor  # (B, 3, H, W) float
    mask: torch.Tensor  # (B, H, W) bool, True = inside the picture (not padding)


def _has(sample_list, key) -> bool:
    return key in sample_list and sample_list[key] is not None


def _side(sample_list, side: Optional[str], model: str):
    if side is None:
        return sample_list
    if side not in PAIRED_SIDES:
        raise ValueError(f"side must be one of {list(PAIRED_SIDES)} or None, got {side!r}")
    if side not in sample_list:
        raise KeyError(f"{model} needs the paired layout ('{side}' missing from the batch): set "
                       "dataset_config.nlvr2.input_layout: paired")
    return sample_list[side]


def text_inputs(sample_list, model: str) -> TextInputs:
    """The text of a batch; the mask defaults to the non-zero ids. ``model`` names the model in errors."""
    if not _has(sample_list, "input_ids"):
        raise KeyError(f"{model} needs 'input_ids' (the text processor's output) in the sample list")
    input_ids = sample_list["input_ids"]
    mask = sample_list["input_mask"] if _has(sample_list, "input_mask") else (input_ids != 0).long()
    segment = sample_list["segment_ids"] if _has(sample_list, "segment_ids") else None
    return TextInputs(input_ids, mask, segment)


def region_inputs(sample_list, model: str, feature_dim: int, box_mode: str, side: Optional[str] = None) -> RegionInputs:
    """Region features ``image_feature_0`` ``(B, N, D)`` and MMF's ``image_info_0`` of a batch (or of
    its ``side`` image): features as float, checked against ``feature_dim``; the region mask; boxes
    normalised by the image size in ``box_mode`` (``"4d"`` / ``"5d"``), zero on padding."""
    source = _side(sample_list, side, model)
    features = source["image_feature_0"] if "image_feature_0" in source else None
    info = source["image_info_0"] if "image_info_0" in source else None
    if features is None or info is None:
        raise KeyError(f"{model} needs 'image_feature_0' and 'image_info_0' (region features) in the sample list")
    features = features.float()
    _, num, dim = features.shape
    if dim != feature_dim:
        raise ValueError(f"image_feature_0 has {dim}-d features but model_config.{model}.feature_dim is {feature_dim}")
    for key in ("bbox", "image_width", "image_height"):
        if key not in info:
            raise KeyError(f"{model} needs image_info_0.{key} for the {box_mode} region boxes")
    device = features.device
    count = info["max_features"] if "max_features" in info else info["num_boxes"]
    mask = num_boxes_to_mask(count.view(-1).clamp(max=num).to(device), num)
    boxes = normalize_boxes(info["bbox"].to(device).float()[:, :num], info["image_width"].to(device),
                            info["image_height"].to(device), mode=box_mode)
    boxes = boxes * mask.unsqueeze(-1).to(boxes.dtype)
    corrupted, selected = _masked_regions(source, features, mask, model)
    return RegionInputs(features, boxes, mask, info, corrupted, selected)


def _masked_regions(source, features, mask, model):
    """The dataset's masked-region decisions (``region_selected`` / ``region_zeroed`` / ``region_source``,
    ``mmf_multilevel.datasets.pretraining``) applied to ``features``: ``(corrupted, selected)``."""
    if not _has(source, "region_selected"):
        return features, None
    shape = tuple(features.shape[:2])
    fields = {}
    for key in ("region_selected", "region_zeroed", "region_source"):
        if not _has(source, key):
            raise KeyError(f"{model}: the batch has region_selected but no {key} (a dataset emits all three)")
        value = source[key].to(features.device)
        if tuple(value.shape) != shape:
            raise ValueError(f"{model}: {key} has shape {tuple(value.shape)}, expected {shape} (the regions of "
                             "image_feature_0)")
        fields[key] = value
    selected = fields["region_selected"].bool()
    if (selected & (mask == 0)).any():
        raise ValueError(f"{model}: region_selected marks padding regions (beyond image_info_0.max_features)")
    masking = RegionMasking(selected, fields["region_zeroed"].bool(), fields["region_source"].long())
    return apply_region_masking(features, masking), selected


def detector_labels(regions: RegionInputs, model: str, disable_hint: str) -> torch.Tensor:
    """The detector's class per region ``(B, N)``: ``image_info_0.objects``, else the argmax of
    ``cls_prob``. ``disable_hint`` tells the user how to train without labels."""
    info, num, device = regions.info, regions.features.size(1), regions.features.device
    if "objects" in info:
        return info["objects"].to(device).long()[:, :num]
    if "cls_prob" in info:
        return info["cls_prob"].to(device)[:, :num].argmax(-1)
    raise KeyError(f"{model}: masked region label prediction needs the detector's labels: image_info_0.objects (or "
                   f"cls_prob) from the region feature cache; {disable_hint}")


def pixel_inputs(sample_list, model: str, field: str = "image", side: Optional[str] = None) -> PixelInputs:
    """The image batch ``(B, 3, H, W)`` of a raw-image dataset and its valid-pixel mask ``(B, H, W)``
    from ``<field>_size`` (each picture's ``[h, w]`` before the batch was padded); without sizes
    every pixel is valid."""
    source = _side(sample_list, side, model)
    if field not in source or source[field] is None:
        raise KeyError(f"{model} needs '{field}' (a raw-image dataset's pixels) in the sample list")
    pixels = source[field].float()
    if pixels.dim() != 4 or pixels.size(1) != 3:
        raise ValueError(f"'{field}' must be a (batch, 3, height, width) tensor, got {tuple(pixels.shape)}")
    batch, _, height, width = pixels.shape
    size_key = f"{field}_size"
    if size_key in source and source[size_key] is not None:
        sizes = source[size_key].to(pixels.device).long().view(batch, 2)
        rows = torch.arange(height, device=pixels.device).view(1, height, 1) < sizes[:, 0].view(batch, 1, 1)
        cols = torch.arange(width, device=pixels.device).view(1, 1, width) < sizes[:, 1].view(batch, 1, 1)
        mask = rows & cols
    else:
        mask = torch.ones(batch, height, width, dtype=torch.bool, device=pixels.device)
    return PixelInputs(pixels, mask)
