"""Region-feature inputs: box normalisation, padding masks and region embeddings.

Boxes arrive as ``(x1, y1, x2, y2)`` in pixels of the original image (the feature-cache format);
:func:`normalize_boxes` turns them into the location vectors the methods use, and
:class:`RegionEmbedding` maps (feature, location) pairs into the transformer's hidden size.
"""

from typing import Optional, Tuple, Union

import torch
from torch import nn

__all__ = ["BOX_DIMS", "normalize_boxes", "num_boxes_to_mask", "RegionEmbedding"]

#: location-vector size of each :func:`normalize_boxes` mode
BOX_DIMS = {"4d": 4, "5d": 5, "6d": 6, "7d": 7}

Size = Union[int, float, torch.Tensor]


def _image_size(value: Size, name: str, boxes: torch.Tensor) -> torch.Tensor:
    batch_shape = boxes.shape[:-1]
    size = torch.as_tensor(value, dtype=boxes.dtype, device=boxes.device)
    if size.dim() > 0:
        if size.shape == boxes.shape[:-2]:
            size = size.unsqueeze(-1)  # one size per image, broadcast over its boxes
        try:
            size = size.expand(batch_shape) if len(batch_shape) else size.reshape(())
        except RuntimeError:
            raise ValueError(
                f"{name} of shape {tuple(size.shape)} does not broadcast to boxes of shape {tuple(boxes.shape)}; "
                "give a number, one value per image, or one value per box"
            ) from None
    if not torch.isfinite(size).all() or (size <= 0).any():
        raise ValueError(f"{name} must be positive and finite, got {value!r}")
    return size


def normalize_boxes(
    boxes: torch.Tensor, image_w: Size, image_h: Size, mode: str = "5d", clamp: bool = True
) -> torch.Tensor:
    """Pixel ``(x1, y1, x2, y2)`` boxes ``(..., 4)`` -> normalised location vectors ``(..., d)``.

    ``image_w`` / ``image_h``: a number, a tensor with one value per image (shape ``boxes.shape[:-2]``),
    or one per box (``boxes.shape[:-1]``). Modes (``w = x2 - x1``, ``h = y2 - y1``):

    - ``"4d"``: ``[x1/W, y1/H, x2/W, y2/H]`` (SemVLP / LXMERT)
    - ``"5d"``: 4d + ``w*h/(W*H)`` (VisualBERT / μ-VLA)
    - ``"6d"``: 4d + ``[w/W, h/H]`` (Oscar / VinVL / MVPTR)
    - ``"7d"``: 4d + ``[w/W, h/H, w*h/(W*H)]`` (UNITER)

    Coordinates are clamped to ``[0, 1]`` when ``clamp`` (detector boxes can overshoot the border by
    rounding). Boxes with ``x2 < x1`` or ``y2 < y1`` are rejected; all-zero padding boxes are fine.
    """
    if mode not in BOX_DIMS:
        raise ValueError(f"unknown box mode {mode!r}; expected one of {sorted(BOX_DIMS)}")
    if boxes.dim() < 1 or boxes.shape[-1] != 4:
        raise ValueError(f"boxes must have shape (..., 4) as x1, y1, x2, y2; got {tuple(boxes.shape)}")
    if not boxes.is_floating_point():
        boxes = boxes.float()
    if not torch.isfinite(boxes).all():
        raise ValueError("boxes contain NaN or infinite coordinates")
    x1, y1, x2, y2 = boxes.unbind(-1)
    bad = (x2 < x1) | (y2 < y1)
    if bad.any():
        where = tuple(bad.nonzero()[0].tolist())
        raise ValueError(f"box at index {where} has x2 < x1 or y2 < y1: {boxes[where].tolist()}")
    width = _image_size(image_w, "image_w", boxes)
    height = _image_size(image_h, "image_h", boxes)
    nx1, ny1, nx2, ny2 = x1 / width, y1 / height, x2 / width, y2 / height
    if clamp:
        nx1, ny1, nx2, ny2 = (t.clamp(0.0, 1.0) for t in (nx1, ny1, nx2, ny2))
    parts = [nx1, ny1, nx2, ny2]
    rel_w, rel_h = nx2 - nx1, ny2 - ny1
    if mode == "5d":
        parts.append(rel_w * rel_h)
    elif mode == "6d":
        parts += [rel_w, rel_h]
    elif mode == "7d":
        parts += [rel_w, rel_h, rel_w * rel_h]
    return torch.stack(parts, dim=-1)


def num_boxes_to_mask(num_boxes: torch.Tensor, max_boxes: int) -> torch.Tensor:
    """``(B,)`` real-box counts -> ``(B, max_boxes)`` long mask, 1 for real regions, 0 for padding."""
    num_boxes = torch.as_tensor(num_boxes)
    if num_boxes.dim() != 1:
        raise ValueError(f"num_boxes must be a 1-d tensor (one count per image); got shape {tuple(num_boxes.shape)}")
    if (num_boxes < 0).any() or (num_boxes > max_boxes).any():
        raise ValueError(f"num_boxes must lie in [0, {max_boxes}]; got {num_boxes.tolist()}")
    positions = torch.arange(max_boxes, device=num_boxes.device)
    return (positions.unsqueeze(0) < num_boxes.unsqueeze(1)).long()


class RegionEmbedding(nn.Module):
    """Region feature + location -> hidden vectors.

    ``style="sum"`` (VisualBERT / μ-VLA): ``LN_v(W_v f) + LN_b(W_b loc)``, optionally followed by a
    final LayerNorm over the sum (``final_layer_norm``), then dropout.

    ``style="concat"`` (SemVLP, Oscar/MVPTR): ``W [f; loc]`` (one linear over the concatenation), then
    LayerNorm (``layer_norm``; MVPTR pre-training runs without it) and dropout.

    With ``img_token=True`` a learned ``[IMG]`` vector (init N(0, 0.02)) is prepended to each image's
    regions before the final normalisation; ``forward`` then returns ``1 + N`` positions.
    ``box_dim=0`` uses the features alone.
    """

    def __init__(
        self,
        feature_dim: int = 2048,
        hidden_size: int = 768,
        box_dim: int = 5,
        style: str = "sum",
        dropout: float = 0.1,
        layer_norm: bool = True,
        final_layer_norm: bool = False,
        img_token: bool = False,
        layer_norm_eps: float = 1e-12,
        initializer_range: float = 0.02,
    ):
        super().__init__()
        if style not in ("sum", "concat"):
            raise ValueError(f"style must be 'sum' or 'concat', got {style!r}")
        if box_dim < 0 or feature_dim <= 0 or hidden_size <= 0:
            raise ValueError("feature_dim and hidden_size must be positive and box_dim non-negative")
        self.feature_dim, self.hidden_size, self.box_dim, self.style = feature_dim, hidden_size, box_dim, style
        if style == "sum":
            self.feature_proj = nn.Linear(feature_dim, hidden_size)
            self.feature_norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
            if box_dim:
                self.box_proj = nn.Linear(box_dim, hidden_size)
                self.box_norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
            use_norm = final_layer_norm
        else:
            self.proj = nn.Linear(feature_dim + box_dim, hidden_size)
            use_norm = layer_norm
        self.norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps) if use_norm else None
        self.img_embedding = nn.Parameter(torch.zeros(hidden_size)) if img_token else None
        self.dropout = nn.Dropout(dropout)
        self.initializer_range = initializer_range
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """BERT initialisation: N(0, initializer_range) weights, zero biases, unit LayerNorms."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=self.initializer_range)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        if self.img_embedding is not None:
            nn.init.normal_(self.img_embedding, std=self.initializer_range)

    def embed_boxes(self, boxes: torch.Tensor) -> torch.Tensor:
        """``LN_b(W_b loc)`` alone (``style="sum"``), e.g. for tag tokens that carry their region's box."""
        if self.style != "sum" or not self.box_dim:
            raise RuntimeError("embed_boxes needs style='sum' with box_dim > 0")
        return self.box_norm(self.box_proj(boxes.to(self.box_proj.weight.dtype)))

    def forward(
        self,
        features: torch.Tensor,
        boxes: Optional[torch.Tensor] = None,
        region_mask: Optional[torch.Tensor] = None,
        extra: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Embed ``features (B, N, D)`` with normalised ``boxes (B, N, box_dim)``.

        ``region_mask (B, N)`` marks real regions (1) vs padding (0); ``extra`` (broadcastable to
        ``(B, N, H)``, e.g. a modality/token-type embedding) is added before the final normalisation.
        Returns ``(embeddings, mask)``: ``(B, N', H)`` and the long 0/1 attention mask ``(B, N')``, with
        ``N' = N + 1`` when the ``[IMG]`` token is on (its mask entry is 1).
        """
        if features.dim() != 3 or features.size(-1) != self.feature_dim:
            raise ValueError(
                f"features must be (batch, regions, {self.feature_dim}); got shape {tuple(features.shape)}"
            )
        batch, num_regions, _ = features.shape
        if self.box_dim:
            if boxes is None:
                raise ValueError(f"this embedding expects {self.box_dim}-d normalised boxes; got none")
            if boxes.shape != (batch, num_regions, self.box_dim):
                raise ValueError(
                    f"boxes must be (batch, regions, {self.box_dim}) = {(batch, num_regions, self.box_dim)}; got "
                    f"{tuple(boxes.shape)} (see normalize_boxes for the {self.box_dim}-d layout)"
                )
        if region_mask is None:
            region_mask = torch.ones(batch, num_regions, dtype=torch.long, device=features.device)
        elif region_mask.shape != (batch, num_regions):
            raise ValueError(f"region_mask must be {(batch, num_regions)}; got {tuple(region_mask.shape)}")
        region_mask = region_mask.long()

        if self.style == "sum":
            dtype = self.feature_proj.weight.dtype
            out = self.feature_norm(self.feature_proj(features.to(dtype)))
            if self.box_dim:
                out = out + self.box_norm(self.box_proj(boxes.to(dtype)))
        else:
            dtype = self.proj.weight.dtype
            inputs = features.to(dtype)
            if self.box_dim:
                inputs = torch.cat([inputs, boxes.to(dtype)], dim=-1)
            out = self.proj(inputs)
        if extra is not None:
            out = out + extra
        if self.img_embedding is not None:
            img = self.img_embedding.to(out.dtype).expand(batch, 1, self.hidden_size)
            out = torch.cat([img, out], dim=1)
            region_mask = torch.cat([region_mask.new_ones(batch, 1), region_mask], dim=1)
        if self.norm is not None:
            out = self.norm(out)
        return self.dropout(out), region_mask
