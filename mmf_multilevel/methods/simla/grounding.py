"""Weakly supervised referring-expression grounding with Grad-CAM (paper §3.1 "Visual Grounding", §3.5).

Training uses no box: the model is fine-tuned "in a manner similar to image-text retrieval" (ITC + ITM on
(image, expression) pairs; :meth:`SIMLA.retrieval_losses`). Inference grounds an expression with Grad-CAM
"on the cross-attention maps in the 8th layer of the multimodal encoder, using the gradients of the
image-text matching score" (§3.5):

1. :func:`itm_gradcam`: the expression through the multimodal encoder reading the image tokens; the ITM
   head's match logit ``itm_head(h_cls)[:, 1]`` is differentiated with respect to the cross-attention
   probabilities ``A`` ``(B, heads, L, 1 + N)`` of layer ``layer`` (0-indexed; the official ``--block_num
   8`` is the 9th layer);
2. :func:`gradcam_from_attention`: over the patch columns (the image [CLS] column dropped),
   ``A · max(∂s/∂A, 0)`` averaged over the heads gives one ``grid`` map per text token (the per-word maps of
   the pictures); averaged over the expression's real tokens (the text mask: [CLS], the word pieces,
   [SEP]) it gives the expression's map (24x24 at 384²);
3. :func:`image_heatmap`: the map upsampled bicubically to the original image (the coordinates of the
   proposals' boxes), undoing the resize of the evaluation pipeline;
4. :func:`box_scores`: each proposal scored by ``Σ map over the box / area^0.5``; the best one is the
   prediction (``refcoco_accuracy`` takes the argmax of the per-proposal ``scores``).

The official ``Grounding.py`` / ``grounding_eval`` settle the details; the differences are listed in the
README beside this file (section "Weakly supervised grounding").
"""
import math
from typing import NamedTuple, Sequence, Tuple

import torch
import torch.nn.functional as F

from mmf_multilevel.methods.simla.losses import ITM_MATCH

__all__ = ["GradCAM", "itm_gradcam", "gradcam_from_attention", "image_heatmap", "box_scores", "proposal_scores",
           "grounding_scores", "check_gradcam_layer"]

#: the official ``grounding_eval`` divides a box's sum by ``area ** 0.5``
BOX_AREA_EXPONENT = 0.5


class GradCAM(NamedTuple):
    """``maps`` ``(B, gh, gw)``: each expression's map; ``token_maps`` ``(B, L, gh, gw)``: each text position's
    own row (zero at padding); ``match_logits`` ``(B,)``: the ITM match logit that was differentiated."""
    maps: torch.Tensor
    token_maps: torch.Tensor
    match_logits: torch.Tensor


def check_gradcam_layer(layer: int, num_layers: int) -> int:
    """``layer`` as an index of the multimodal encoder's ``num_layers`` layers, or a ValueError naming the key."""
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < num_layers:
        raise ValueError(f"model_config.simla.gradcam_layer must be a 0-based layer index in [0, {num_layers - 1}] "
                         f"(the multimodal encoder has {num_layers} layers; the official --block_num 8 is the 9th of "
                         f"12), got {layer!r}")
    return layer


def gradcam_from_attention(attention: torch.Tensor, gradient: torch.Tensor, text_mask: torch.Tensor,
                           grid: Tuple[int, int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Grad-CAM of cross-attention probabilities ``attention`` ``(B, heads, L, 1 + N)`` with the gradient of the
    score with respect to them (same shape): over the N = gh·gw patch columns, ``attention · max(gradient, 0)``
    averaged over the heads -> the token maps ``(B, L, gh, gw)`` (padding rows zero); averaged over the
    ``text_mask`` tokens -> the expression maps ``(B, gh, gw)``."""
    batch, _, length, keys = attention.shape
    height, width = int(grid[0]), int(grid[1])
    if tuple(gradient.shape) != tuple(attention.shape):
        raise ValueError(f"Grad-CAM: the gradient {tuple(gradient.shape)} must match the attention "
                         f"{tuple(attention.shape)}")
    if keys != 1 + height * width:
        raise ValueError(f"Grad-CAM: the attention has {keys} image positions, expected 1 + {height}x{width} "
                         "(the image [CLS] and the patch grid)")
    if tuple(text_mask.shape) != (batch, length):
        raise ValueError(f"Grad-CAM: the text mask {tuple(text_mask.shape)} must be {(batch, length)}")
    mask = text_mask.to(attention.dtype)
    cam = attention[..., 1:] * gradient[..., 1:].clamp(min=0)
    tokens = cam.mean(dim=1) * mask.unsqueeze(-1)
    maps = tokens.sum(dim=1) / mask.sum(dim=1, keepdim=True).clamp(min=1)
    return maps.view(batch, height, width), tokens.view(batch, length, height, width)


def itm_gradcam(text_encoder, itm_head, image_embeds: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor, layer: int, grid: Tuple[int, int]) -> GradCAM:
    """Grad-CAM of the ITM match logit on the cross-attention of ``layer`` (see the module docstring). Gradients
    are taken with ``torch.autograd.grad`` (no parameter's ``.grad`` is touched) under ``torch.enable_grad()``,
    so it runs inside MMF's ``no_grad`` evaluation; the image tokens are detached (only the attention's
    gradient is read). Each expression's logit depends on its own pair only, so differentiating their sum
    gives every pair's gradient at once (the official ``itm_logit[:, 1].sum()``)."""
    check_gradcam_layer(int(layer), text_encoder.num_layers)
    with torch.enable_grad():
        image = image_embeds.detach().requires_grad_(True)
        hidden, cross = text_encoder.fuse(input_ids, attention_mask, image, output_cross_attentions=True)
        logits = itm_head(hidden[:, 0])[:, ITM_MATCH]
        attention = cross[layer]
        if attention is None:
            raise ValueError(f"model_config.simla.gradcam_layer: layer {layer} has no cross-attention (the ALBEF "
                             "layout's text layers); choose a fusion layer")
        (gradient,) = torch.autograd.grad(logits.sum(), attention)
    maps, tokens = gradcam_from_attention(attention.detach().float(), gradient.float(), attention_mask, grid)
    return GradCAM(maps, tokens, logits.detach())


def image_heatmap(grid_map: torch.Tensor, pixel_size: Sequence[int], content_size: Sequence[int],
                  original_size: Sequence[int]) -> torch.Tensor:
    """A ``(gh, gw)`` map over the model's input (the batch tensor, ``pixel_size`` = (H, W)) as a map over the
    original image (``original_size`` = (height, width), the coordinates of the boxes), bicubic. The picture
    occupies the top-left ``content_size`` = (h, w) of the input (the rest is batch padding) and is the whole
    original image resized (the evaluation pipeline's ``crop: resize``). Without padding this is the official
    ``F.interpolate(map, size=(height, width), mode='bicubic')``; with padding the map is upsampled to the
    input's extent at the original's scale, then cropped to the picture."""
    padded_h, padded_w = int(pixel_size[0]), int(pixel_size[1])
    content_h, content_w = int(content_size[0]), int(content_size[1])
    height, width = int(original_size[0]), int(original_size[1])
    if min(content_h, content_w, height, width) <= 0:
        raise ValueError(f"image_heatmap: empty picture (content {content_h}x{content_w}, original {height}x{width})")
    if content_h == padded_h and content_w == padded_w:
        target = (height, width)
    else:
        target = (max(height, round(padded_h * height / content_h)), max(width, round(padded_w * width / content_w)))
    resized = F.interpolate(grid_map.float().view(1, 1, *grid_map.shape[-2:]), size=target, mode="bicubic",
                            align_corners=False)
    return resized[0, 0, :height, :width]


def box_scores(heatmap: torch.Tensor, boxes: torch.Tensor, exponent: float = BOX_AREA_EXPONENT) -> torch.Tensor:
    """Each box's ``Σ heatmap[rows, cols] / area ** exponent`` (official ``grounding_eval``): ``boxes`` ``(R, 4)``
    ``x1 y1 x2 y2`` in the heatmap's pixels; the summed pixels are rows ``floor(y1) .. floor(y2) - 1`` and
    columns ``floor(x1) .. floor(x2) - 1`` (the official ``mask[int(y):int(y+h), int(x):int(x+w)]``), clipped to
    the map; ``area = (x2 - x1)(y2 - y1)`` from the box itself. A box without area scores -inf (never chosen).
    Sums come from an integral image (one pass for all boxes)."""
    height, width = heatmap.shape
    integral = F.pad(heatmap.double().cumsum(0).cumsum(1), (1, 0, 1, 0))
    boxes = boxes.to(heatmap.device).double().view(-1, 4)
    cols = boxes[:, 0::2].floor().clamp(0, width).long()
    rows = boxes[:, 1::2].floor().clamp(0, height).long()
    c0, c1 = cols[:, 0], torch.maximum(cols[:, 0], cols[:, 1])
    r0, r1 = rows[:, 0], torch.maximum(rows[:, 0], rows[:, 1])
    sums = integral[r1, c1] - integral[r0, c1] - integral[r1, c0] + integral[r0, c0]
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    scores = sums / area.clamp(min=1e-12) ** float(exponent)
    return torch.where(area > 0, scores, torch.full_like(scores, -math.inf)).float()


def proposal_scores(maps: torch.Tensor, pixel_size: Sequence[int], content_sizes: torch.Tensor,
                    original_sizes: torch.Tensor, boxes: torch.Tensor,
                    exponent: float = BOX_AREA_EXPONENT) -> torch.Tensor:
    """``(B, R)`` scores of every proposal ``boxes`` ``(B, R, 4)`` (original pixels, xyxy) under each
    expression's map ``maps`` ``(B, gh, gw)``; ``content_sizes`` / ``original_sizes`` ``(B, 2)`` as (h, w)."""
    rows = []
    for b in range(maps.size(0)):
        heat = image_heatmap(maps[b], pixel_size, content_sizes[b].tolist(), original_sizes[b].tolist())
        rows.append(box_scores(heat, boxes[b], exponent))
    return torch.stack(rows)


def _field(sample_list, key: str):
    if key not in sample_list or sample_list[key] is None:
        raise KeyError(f"simla grounding needs '{key}' in the batch (dataset_config.{sample_list.dataset_name}: "
                       "refcoco_plus_images gives the proposals' boxes, the gold box and the original image size)")
    return sample_list[key]


def grounding_scores(model, sample_list) -> torch.Tensor:
    """The per-proposal scores ``(B, R)`` of a ``refcoco_plus_images`` batch by ``model`` (a ``simla`` model):
    :func:`itm_gradcam` on ``model_config.simla.gradcam_layer``, then :func:`proposal_scores` on the boxes in
    original-image pixels (``image_info_0.image_height`` / ``image_width``)."""
    from mmf_multilevel.methods.batch import pixel_inputs, text_inputs

    text = text_inputs(sample_list, model.name)
    pixels = pixel_inputs(sample_list, model.name).pixels
    boxes = _field(sample_list, "proposal_boxes")
    info = _field(sample_list, "image_info_0")
    if "image_height" not in info or "image_width" not in info:
        raise KeyError("simla grounding needs 'image_info_0.image_height' and 'image_info_0.image_width' (the "
                       "original image size: the boxes' coordinates) in the batch")
    original = torch.stack([torch.as_tensor(info["image_height"]), torch.as_tensor(info["image_width"])], dim=1)
    batch = pixels.size(0)
    content = sample_list["image_size"] if "image_size" in sample_list else None
    content = (torch.as_tensor(content).view(batch, 2) if content is not None
               else torch.tensor([list(pixels.shape[-2:])] * batch))
    encoder = model.backbone.image_encoder
    cam = itm_gradcam(model.backbone.text_encoder, model.heads.itm_head, encoder(pixels), text.input_ids, text.mask,
                      int(model.settings.gradcam_layer), encoder.grid_size)
    scores = proposal_scores(cam.maps, pixels.shape[-2:], content.cpu(), original.cpu(), boxes.float().cpu(),
                             float(model.settings.grounding_box_exponent))
    return scores.to(pixels.device)
