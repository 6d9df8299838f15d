"""SOHO's network: a CNN over the whole image, the visual dictionary, one single-stream BERT
(Huang et al., "Seeing Out of tHe bOx", CVPR 2021, §3).

* :class:`GridEncoder` - the trainable visual encoder ``E(I, θ)`` of §3.1: a timm ResNet up to its
  last stage (C5, stride 32) with frozen BatchNorm, a 1x1 convolution to the transformer's width
  ``c`` and a 2x2 max-pool (``ceil_mode``), so an ``H x W`` image gives ``⌈H/64⌉·⌈W/64⌉`` grid
  features (the count §4.5 uses: 160 for 600 x 1000). Padding pixels (images of a batch padded
  bottom/right to a common size) are carried down to a grid mask: a cell is real when any of its
  pixels is.
* :class:`VisualDictionary` - the visual dictionary (VD) of §3.2: ``k`` embeddings held as a buffer
  (never a parameter), each grid feature replaced by its nearest entry (Eq. 2-3) with a
  straight-through gradient (Eq. 5), and the entries moved by the moving average of Eq. 4 once per
  optimizer update, from per-update sums and counts that are all-reduced across ranks.
* :func:`sine_position_embedding` - the 2-D sine position embedding of §3.3, added after the
  dictionary (so a dictionary id never encodes position).
* :class:`SOHONetwork` - the above, BERT's text embeddings and one BERT encoder run over
  ``[CLS] w_1 .. w_n [SEP] v_1 .. v_l`` (§3.3). The CNN runs once per image; each text of a pair
  layout reads its image's grid (§A.2: one image, four texts).

The network imports no MMF; the registered adapter is :mod:`mmf_multilevel.methods.soho.model`.
"""
import math
from typing import Dict, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from mmf_multilevel.modules.text import BertTextEncoder

__all__ = ["GRID_STRIDE", "GridEncoder", "VisualDictionary", "sine_position_embedding", "SOHONetwork",
           "VISUAL_SOURCES", "VD_INITS"]

#: pixels per grid cell along each side: the ResNet's stride 32 then the 2x2 max-pool
GRID_STRIDE = 64
#: what the transformer reads for the image: the dictionary embeddings f(V) or the features V
VISUAL_SOURCES = ("dictionary", "features")
#: ``feature_statistics``: entries drawn at the first training forward from the per-channel mean and
#: spread of its features; ``standard_normal``: the N(0, 1) draw of construction kept
VD_INITS = ("feature_statistics", "standard_normal")


class GridEncoder(nn.Module):
    """ResNet (timm, ``features_only`` up to C5) -> 1x1 conv to ``hidden_size`` -> 2x2 max-pool.

    §3.1 writes the order "1x1 convolution, then 2x2 max pooling"; the pool uses ``ceil_mode`` so the
    grid is ``⌈H/64⌉ x ⌈W/64⌉`` as §4.5 counts it. BatchNorm layers are frozen (running statistics
    and affine kept; the paper trains with a few images per GPU). :attr:`resnet_frozen` runs the
    ResNet without gradients (the cold start of §3.2: the first pre-training epochs); the 1x1 conv always trains.

    ``channels_last`` keeps the convolution weights and activations in NHWC layout: the same values
    (to float rounding), 1.4x faster in fp32 on an AVX2 CPU and 8.7x faster under bf16 autocast (whose
    NCHW convolutions fall back to a slow path there), and the layout tensor cores prefer on a GPU
    (``benchmarks/bench_soho.py``, ``benchmarks/RESULTS.md``).
    """

    def __init__(self, backbone: str = "resnet101", hidden_size: int = 768, pretrained: bool = True,
                 frozen_batch_norm: bool = True, pool_before_conv: bool = False, channels_last: bool = True):
        super().__init__()
        #: the official code's order (pool C5, then the 1x1 conv); §3.1's is conv, then pool
        self.pool_before_conv = bool(pool_before_conv)
        import timm
        from timm.layers import freeze_batch_norm_2d

        # timm zero-initialises each residual branch's last BatchNorm scale; frozen, it would stay zero and
        # no branch of a randomly initialised ResNet would ever train
        extra = {} if pretrained else {"zero_init_last": False}
        try:
            resnet = timm.create_model(backbone, pretrained=pretrained, features_only=True, out_indices=(-1,), **extra)
        except (RuntimeError, TypeError) as error:
            raise ValueError(f"model_config.soho.backbone: timm cannot build {backbone!r} as a feature extractor "
                             f"({error}); expected a timm ResNet such as resnet101 or resnet18") from error
        reduction = resnet.feature_info.reduction()[-1]
        if reduction != 32:
            raise ValueError(f"model_config.soho.backbone: {backbone!r} ends at stride {reduction}; SOHO's grid "
                             "(⌈H/64⌉·⌈W/64⌉ cells) needs a ResNet whose last stage has stride 32")
        self.resnet = freeze_batch_norm_2d(resnet) if frozen_batch_norm else resnet
        self.channels = resnet.feature_info.channels()[-1]
        self.proj = nn.Conv2d(self.channels, hidden_size, kernel_size=1)
        self.pool = nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True)
        self.hidden_size = hidden_size
        self.resnet_frozen = False
        self.channels_last = bool(channels_last)
        if self.channels_last:  # loading a state dict copies into these tensors and keeps their layout
            self.to(memory_format=torch.channels_last)

    def forward(self, pixels: torch.Tensor, pixel_mask: Optional[torch.Tensor] = None):
        """``(B, 3, H, W)`` pixels (and ``(B, H, W)`` bool, True = picture) -> features ``(B, c, h, w)``
        and the grid mask ``(B, h, w)`` bool, ``h = ⌈H/64⌉``, ``w = ⌈W/64⌉``."""
        if self.channels_last:
            pixels = pixels.contiguous(memory_format=torch.channels_last)
        if self.resnet_frozen:
            with torch.no_grad():
                c5 = self.resnet(pixels)[-1]
        else:
            c5 = self.resnet(pixels)[-1]
        grid = self.proj(self.pool(c5)) if self.pool_before_conv else self.pool(self.proj(c5))
        batch, _, height, width = pixels.shape
        if pixel_mask is None:
            pixel_mask = torch.ones(batch, height, width, dtype=torch.bool, device=pixels.device)
        cells = F.max_pool2d(pixel_mask[:, None].float(), GRID_STRIDE, GRID_STRIDE, ceil_mode=True)[:, 0] > 0
        if cells.shape[-2:] != grid.shape[-2:]:
            raise RuntimeError(f"grid {tuple(grid.shape[-2:])} and its pixel mask {tuple(cells.shape[-2:])} differ for "
                               f"{height} x {width} images; the backbone must map h -> ⌈h/32⌉")
        return grid, cells


class VisualDictionary(nn.Module):
    """The visual dictionary ``D`` (``k x c``) of §3.2.

    ``forward(v, mask)`` assigns each feature its nearest entry ``h_i = argmin_j ||v_i - d_j||`` (Eq. 2,
    computed in float32 even under autocast) and returns ``f(v_i) = sg[d_{h_i} - v_i] + v_i`` (Eq. 3
    and 5: the value of the entry, the gradient of the identity to ``v``; ``D`` gets none).

    In training mode with :attr:`updating` on, each forward also adds the real (``mask``) cells' sums
    and counts per entry to a pending total. :meth:`step` (once per optimizer update, after the
    backward passes) all-reduces that total across ranks when ``torch.distributed`` is initialised
    and applies Eq. 4 to every entry used in the update::

        d_j <- γ d_j + (1 - γ) mean{ v_i : h_i = j }

    from the dictionary the forward passes assigned with (the loss of an update and its assignment
    see the same ``D``). Entries no feature chose stay as they are. The pending totals are plain
    tensors, not buffers (DDP would broadcast a buffer from rank 0).

    Usage statistics (buffers, so they resume): :attr:`usage` counts how often each entry was chosen
    in all updates; :meth:`usage_summary` reports the last update's distinct entries and perplexity
    and the entries never used.
    """

    def __init__(self, size: int = 2048, dim: int = 768, momentum: float = 0.99, init: str = "standard_normal",
                 init_seed: int = 0):
        super().__init__()
        if size < 1 or dim < 1:
            raise ValueError(f"model_config.soho.vd_size must be positive, got {size}")
        if not 0.0 <= float(momentum) <= 1.0:
            raise ValueError(f"model_config.soho.vd_momentum must lie in [0, 1] (γ of Eq. 4), got {momentum}")
        if init not in VD_INITS:
            raise ValueError(f"model_config.soho.vd_init must be one of {list(VD_INITS)}, got {init!r}")
        self.size, self.dim, self.momentum = int(size), int(dim), float(momentum)
        self.init, self.init_seed = init, int(init_seed)
        # "randomly initialized" (§3.2): a standard normal (the official code's), redrawn at the features'
        # scale before the first assignment with init "feature_statistics" (initialise_from)
        self.register_buffer("embedding", torch.randn(self.size, self.dim))
        self.register_buffer("usage", torch.zeros(self.size, dtype=torch.float64))
        self.register_buffer("last_counts", torch.zeros(self.size, dtype=torch.float64))
        #: whether the entries are final for training (false until initialise_from ran, with "feature_statistics")
        self.register_buffer("initialised", torch.tensor(init != "feature_statistics"))
        self.updating = True
        self._sums: Optional[torch.Tensor] = None
        self._counts: Optional[torch.Tensor] = None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # a checkpoint's dictionary without the flag (written before it existed, or converted) is a trained one
        flag = f"{prefix}initialised"
        if f"{prefix}embedding" in state_dict and flag not in state_dict:
            state_dict[flag] = torch.tensor(True)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def initialise_from(self, v: torch.Tensor, mask: Optional[torch.Tensor] = None) -> None:
        """Draw every entry from ``N(μ_c, σ_c²)`` per channel ``c`` of the real cells of ``v``
        (all-reduced over ranks; the same draw on every rank), once, before the first assignment."""
        flat = v.detach().reshape(-1, self.dim).double()
        if mask is not None:
            flat = flat[mask.reshape(-1).bool()]
        moments = torch.cat([flat.sum(0), flat.pow(2).sum(0), flat.new_tensor([flat.size(0)])])
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(moments)
        count = float(moments[-1])
        if count < 1:
            return  # no real cell anywhere: wait for a batch with some
        mean = moments[: self.dim] / count
        std = (moments[self.dim: 2 * self.dim] / count - mean.pow(2)).clamp_min(0).sqrt()
        z = torch.randn(self.size, self.dim, generator=torch.Generator().manual_seed(self.init_seed), dtype=torch.float64)
        self.embedding.copy_((mean.cpu() + std.cpu() * z).to(self.embedding.device, self.embedding.dtype))
        self.initialised.fill_(True)

    # ------------------------------------------------------------------ assignment
    def assign(self, v: torch.Tensor) -> torch.Tensor:
        """Nearest entry of every feature ``(..., c) -> (...)`` long (Eq. 2), in float32."""
        if v.size(-1) != self.dim:
            raise ValueError(f"features are {v.size(-1)}-d, the dictionary's entries {self.dim}-d")
        with torch.no_grad(), torch.autocast(v.device.type, enabled=False):
            flat = v.detach().reshape(-1, self.dim).float()
            table = self.embedding.float()
            distances = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ table.t() + table.pow(2).sum(1)[None]
            return distances.argmin(1).view(v.shape[:-1])

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embedding[ids]

    def forward(self, v: torch.Tensor, mask: Optional[torch.Tensor] = None):
        """``v (..., c)`` and ``mask (...)`` (True = real cell) -> ``(f(v) (..., c), ids (...))``."""
        if self.training and self.updating and not bool(self.initialised):
            self.initialise_from(v, mask)
        ids = self.assign(v)
        # sg[d - v] + v written as d + (v - sg[v]): the same gradient, and the forward value is d exactly
        quantised = self.lookup(ids).to(v.dtype) + (v - v.detach())
        if self.training and self.updating:
            self.accumulate(v, ids, mask)
        return quantised, ids

    # ------------------------------------------------------------------ Eq. 4
    def statistics(self, v: torch.Tensor, ids: torch.Tensor, mask: Optional[torch.Tensor] = None):
        """Per-entry sums ``(k, c)`` and counts ``(k,)`` (float64) of the real cells of ``v``."""
        with torch.no_grad():
            flat = v.detach().reshape(-1, self.dim).double()
            flat_ids = ids.reshape(-1)
            if mask is not None:
                keep = mask.reshape(-1).bool()
                flat, flat_ids = flat[keep], flat_ids[keep]
            sums = torch.zeros(self.size, self.dim, dtype=torch.float64, device=v.device).index_add_(0, flat_ids, flat)
            counts = torch.bincount(flat_ids, minlength=self.size).double()
        return sums, counts

    def accumulate(self, v: torch.Tensor, ids: torch.Tensor, mask: Optional[torch.Tensor] = None) -> None:
        sums, counts = self.statistics(v, ids, mask)
        if self._sums is None:
            self._sums, self._counts = sums, counts
        else:
            self._sums, self._counts = self._sums + sums, self._counts + counts

    @property
    def pending(self) -> bool:
        return self._sums is not None

    def step(self, world_size: Optional[int] = None) -> bool:
        """Apply Eq. 4 with the statistics gathered since the last step (all-reduced when
        ``torch.distributed`` is initialised with more than one rank). Every rank must call it, with
        or without statistics of its own. Returns whether the dictionary moved."""
        if world_size is None:
            world_size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        sums, counts = self._sums, self._counts
        self._sums = self._counts = None
        if sums is None:
            sums = torch.zeros(self.size, self.dim, dtype=torch.float64, device=self.embedding.device)
            counts = torch.zeros(self.size, dtype=torch.float64, device=self.embedding.device)
        if world_size > 1:
            stacked = torch.cat([sums, counts[:, None]], 1)
            dist.all_reduce(stacked)
            sums, counts = stacked[:, :-1], stacked[:, -1]
        self.apply_update(sums, counts)
        return bool((counts > 0).any())

    @torch.no_grad()
    def apply_update(self, sums: torch.Tensor, counts: torch.Tensor) -> None:
        """Eq. 4 for the entries with a non-zero count; the rest are left bit-identical."""
        sums, counts = sums.to(self.embedding.device), counts.to(self.embedding.device)
        used = counts > 0
        if used.any():
            mean = sums[used] / counts[used, None]
            old = self.embedding[used].double()
            self.embedding[used] = (self.momentum * old + (1.0 - self.momentum) * mean).to(self.embedding.dtype)
        self.usage += counts.to(self.usage.dtype)
        self.last_counts.copy_(counts)

    def discard_pending(self) -> None:
        self._sums = self._counts = None

    def usage_summary(self) -> Dict[str, float]:
        """The last update's distinct entries and perplexity ``exp(H(p))`` of its assignment, and the
        entries no update has used yet (Eq. 4 never moves those)."""
        counts = self.last_counts
        total = float(counts.sum())
        if total > 0:
            p = counts[counts > 0] / total
            perplexity = float(torch.exp(-(p * p.log()).sum()))
        else:
            perplexity = 0.0
        return {"distinct": int((counts > 0).sum()), "perplexity": perplexity, "never_used": int((self.usage == 0).sum())}


def sine_position_embedding(mask: torch.Tensor, dim: int, temperature: float = 10000.0, normalize: bool = True,
                            scale: float = 2 * math.pi) -> torch.Tensor:
    """2-D sine position embedding (§3.3; the DETR form) of a grid ``mask (B, h, w)`` (True = real
    cell) -> ``(B, h, w, dim)``: ``dim/2`` channels for the row, then ``dim/2`` for the column, each
    interleaved sine / cosine. Positions count real cells from the top-left; with ``normalize`` they
    are scaled to ``(0, 2π]`` over each image's real extent."""
    if dim % 4:
        raise ValueError(f"the sine position embedding needs a width divisible by 4, got hidden_size {dim}")
    real = mask.float()
    rows = real.cumsum(1)
    cols = real.cumsum(2)
    if normalize:
        eps = 1e-6
        rows = rows / (rows[:, -1:, :] + eps) * scale
        cols = cols / (cols[:, :, -1:] + eps) * scale
    half = dim // 2
    freq = torch.arange(half, dtype=torch.float32, device=mask.device)
    freq = temperature ** (2 * torch.div(freq, 2, rounding_mode="floor") / half)
    pos_rows = rows[..., None] / freq
    pos_cols = cols[..., None] / freq
    pos_rows = torch.stack((pos_rows[..., 0::2].sin(), pos_rows[..., 1::2].cos()), dim=4).flatten(3)
    pos_cols = torch.stack((pos_cols[..., 0::2].sin(), pos_cols[..., 1::2].cos()), dim=4).flatten(3)
    return torch.cat((pos_rows, pos_cols), dim=3)


class SOHONetwork(nn.Module):
    """Grid encoder, visual dictionary, visual embeddings and the single-stream BERT (§3.1-§3.3).

    ``text``: a :class:`BertTextEncoder` with its pooler (its width is ``c``). The visual token of a
    cell is ``LN_v(x + pos + type_1)`` with ``x`` = ``f(v)`` (``dictionary``) or ``v`` (``features``: the
    fine-tuning input, §4.2 "input features of the VD module"), the [MASK] word embedding at MVM-masked
    cells (§3.3, Masked Visual Modeling), the 2-D sine position ``pos`` and BERT's token type 1; ``LN_v`` is its own
    LayerNorm. The sequence is ``[CLS] text [SEP] cells``; padding words and padding cells are masked
    out of attention.
    """

    def __init__(self, text: BertTextEncoder, backbone: str = "resnet101", pretrained_backbone: bool = True,
                 frozen_batch_norm: bool = True, vd_size: int = 2048, vd_momentum: float = 0.99,
                 mask_token_id: int = 103, pool_before_conv: bool = False, visual_token_type: bool = True,
                 vd_init: str = "feature_statistics", channels_last: bool = True):
        super().__init__()
        if text.pooler is None:
            raise ValueError("SOHONetwork needs a BertTextEncoder built with its pooler")
        config = text.config
        if not 0 <= mask_token_id < config.vocab_size:
            raise ValueError(f"model_config.soho.mask_token_id {mask_token_id} is outside the vocabulary "
                             f"[0, {config.vocab_size})")
        if config.type_vocab_size < 2:
            raise ValueError("model_config.soho.type_vocab_size must be at least 2 (visual tokens are type 1)")
        self.text = text
        self.encoder = GridEncoder(backbone, config.hidden_size, pretrained_backbone, frozen_batch_norm, pool_before_conv,
                                   channels_last)
        #: add BERT's token-type row 1 to the visual tokens (false: the official code's LN(x + pos))
        self.visual_token_type = bool(visual_token_type)
        self.dictionary = VisualDictionary(vd_size, config.hidden_size, vd_momentum, init=vd_init)
        self.visual_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.visual_dropout = nn.Dropout(config.hidden_dropout_prob)
        self.mask_token_id = int(mask_token_id)

    @property
    def config(self):
        return self.text.config

    @property
    def hidden_size(self) -> int:
        return self.text.hidden_size

    # ------------------------------------------------------------------ image side
    def encode_image(self, pixels: torch.Tensor, pixel_mask: Optional[torch.Tensor] = None,
                     quantise: bool = True) -> Dict[str, torch.Tensor]:
        """Each image through the CNN once: ``features`` v ``(B, l, c)``, ``mask`` ``(B, l)`` bool,
        ``grid`` ``(h, w)``; with ``quantise`` also ``quantised`` f(v) and ``ids`` ``(B, l)`` (the
        dictionary accumulates its Eq. 4 statistics over the real cells when training). ``visual`` is
        what the transformer reads: f(v) with ``quantise``, v without."""
        grid, cells = self.encoder(pixels, pixel_mask)
        batch, dim, height, width = grid.shape
        features = grid.permute(0, 2, 3, 1).flatten(1, 2)  # row-major cells (a view in channels_last)
        mask = cells.flatten(1)
        out = {"features": features, "mask": mask, "grid": (height, width)}
        if quantise:
            out["quantised"], out["ids"] = self.dictionary(features, mask)
        out["visual"] = out["quantised"] if quantise else features
        return out

    def visual_embeddings(self, visual: torch.Tensor, mask: torch.Tensor, grid, masked: Optional[torch.Tensor] = None):
        """``visual (N, l, c)`` cell inputs -> the transformer's visual tokens; ``masked (N, l)`` bool
        cells take the [MASK] word embedding instead (MVM)."""
        if masked is not None:
            mask_vector = self.text.word_embeddings.weight[self.mask_token_id].to(visual.dtype)
            visual = torch.where(masked[..., None], mask_vector.expand_as(visual), visual)
        height, width = grid
        pos = sine_position_embedding(mask.view(-1, height, width), self.hidden_size).flatten(1, 2)
        tokens = visual + pos.to(visual.dtype)
        if self.visual_token_type:
            tokens = tokens + self.text.token_type_embeddings.weight[1]
        return self.visual_dropout(self.visual_norm(tokens))

    # ------------------------------------------------------------------ joint
    def joint(self, input_ids: torch.Tensor, text_mask: torch.Tensor, visual: torch.Tensor, visual_mask: torch.Tensor,
              grid, masked: Optional[torch.Tensor] = None, segment_ids: Optional[torch.Tensor] = None):
        """One text per row with its image's cells (``visual (N, l, c)``, ``visual_mask (N, l)``) through
        the transformer: ``text (N, T, c)``, ``visual (N, l, c)`` states and ``pooled`` (BERT's pooler on [CLS])."""
        words = self.text.embed(input_ids, token_type_ids=segment_ids)
        cells = self.visual_embeddings(visual, visual_mask, grid, masked)
        sequence = torch.cat([words, cells.to(words.dtype)], 1)
        attention = torch.cat([text_mask.long(), visual_mask.long()], 1)
        hidden = self.text.encode(sequence, attention_mask=attention)
        length = input_ids.size(1)
        return {"text": hidden[:, :length], "visual": hidden[:, length:], "pooled": self.text.pool(hidden, 0),
                "sequence": hidden, "attention_mask": attention}

    def forward(self, input_ids: torch.Tensor, text_mask: torch.Tensor, pixels: torch.Tensor,
                pixel_mask: Optional[torch.Tensor] = None, pair_image_index: Optional[torch.Tensor] = None,
                source: str = "features", segment_ids: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """Texts ``(N, T)`` with images ``(B, 3, H, W)``: text row ``i`` reads image
        ``pair_image_index[i]`` (default: row ``i``). ``source``: ``features`` (v, the fine-tuning input)
        or ``dictionary`` (f(v))."""
        if source not in VISUAL_SOURCES:
            raise ValueError(f"source must be one of {list(VISUAL_SOURCES)}, got {source!r}")
        image = self.encode_image(pixels, pixel_mask, quantise=source == "dictionary")
        index = torch.arange(pixels.size(0), device=pixels.device) if pair_image_index is None else pair_image_index
        out = self.joint(input_ids, text_mask, image["visual"][index], image["mask"][index], image["grid"], segment_ids=segment_ids)
        out["image"] = image
        return out
