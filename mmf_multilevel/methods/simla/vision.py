"""SIMLA's image side: the ViT image encoder E_v with its MIM mask token, BEiT block masking and the
frozen DALL·E dVAE tokenizer that gives the MIM targets (paper §2.3, Eq. 6; the official ``models/vit.py``,
``masking_generator.py`` and ``models/discrete_vae.py``).

- :class:`SIMLAImageEncoder`: a timm ViT-B/16 (DeiT-base/16-224 weights: the official ``SIMLA.__init__``;
  appendix §4 "BERT and DeiT") built at the run's resolution (256² in pre-training, 384² in fine-tuning),
  whose 14×14 position embeddings timm resamples when it loads the pretrained weights; a learned mask token
  replaces the masked patch embeddings before the position embedding is added (BEiT).
- :func:`resize_position_embeddings`: the same resampling for a checkpoint of another resolution (a 256²
  pre-training checkpoint into a 384² fine-tuning model, the official ``interpolate_pos_embed``); loading a
  state dict into :class:`SIMLAImageEncoder` applies it by itself.
- :func:`block_mask` / :func:`draw_mask_blocks`: BEiT block-wise masking (75 of 16×16 patches, blocks of
  at least 16 patches, aspect ratio in [0.3, 1/0.3], the official ``masking_generator.py``).
- :class:`DALLEEncoder` and :class:`DVAETokenizer`: the DALL·E dVAE encoder (module names and shapes
  of the ``dall-e`` package, so the released ``encoder.pkl`` loads) wrapped as a frozen tokenizer that
  lives outside the model's module tree (no state-dict entries, no parameters for the optimizer).
- ``python -m mmf_multilevel.methods.simla.vision convert-dvae encoder.pkl out.pth [--allow-pickle]``:
  the pickled module -> a weights-only file, once.
"""
import argparse
import math
import os
import pickle
import random
import sys
import types
from collections import OrderedDict
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "MIM_MASKED_PATCHES",
    "MIM_MIN_BLOCK",
    "MIM_MIN_ASPECT",
    "LOGIT_LAPLACE_EPS",
    "SIMLAImageEncoder",
    "resize_position_embeddings",
    "draw_mask_blocks",
    "block_mask",
    "DALLEEncoder",
    "DVAETokenizer",
    "map_pixels",
    "convert_dvae",
    "main",
]

#: the official ``dataset/caption_dataset.py``:
#: ``MaskingGenerator((16, 16), num_masking_patches=75, min_num_patches=16, min_aspect=0.3)``
MIM_MASKED_PATCHES = 75
MIM_MIN_BLOCK = 16
MIM_MIN_ASPECT = 0.3
#: DALL·E's ``logit_laplace_eps``: ``map_pixels(x) = (1 - 2 eps) x + eps``
LOGIT_LAPLACE_EPS = 0.1


# --------------------------------------------------------------------------------------------------
# The ViT image encoder
# --------------------------------------------------------------------------------------------------


def resize_position_embeddings(state_dict: Mapping[str, torch.Tensor], new_grid: Sequence[int],
                               key: str = "pos_embed", num_prefix_tokens: int = 1) -> Dict[str, torch.Tensor]:
    """A copy of ``state_dict`` whose ``key`` (``(1, prefix + h·w, d)``, a square old grid) is resampled
    to ``new_grid`` = ``(h', w')`` with timm's :func:`~timm.layers.resample_abs_pos_embed` (bicubic, the
    [CLS] entry kept), the interpolation timm applies to pretrained weights and the official code applies
    between resolutions (14×14 -> 16×16 at 256², 16×16 -> 24×24 at 384²; the official
    ``interpolate_pos_embed``). Unchanged if the grid already matches."""
    from timm.layers import resample_abs_pos_embed

    if key not in state_dict:
        raise KeyError(f"resize_position_embeddings: the state dict has no {key!r} (expected a ViT's position "
                       f"embeddings; keys start with {list(state_dict)[:3]})")
    state = dict(state_dict)
    pos = state[key]
    new_grid = (int(new_grid[0]), int(new_grid[1]))
    old_tokens = pos.shape[1] - num_prefix_tokens
    side = int(round(math.sqrt(old_tokens)))
    if side * side != old_tokens:
        raise ValueError(f"{key}: {old_tokens} patch positions are not a square grid; "
                         "resize_position_embeddings expects a square source grid")
    if (side, side) != new_grid:
        state[key] = resample_abs_pos_embed(pos, new_size=list(new_grid), old_size=[side, side],
                                            num_prefix_tokens=num_prefix_tokens)
    return state


class SIMLAImageEncoder(nn.Module):
    """The visual encoder E_v (paper §2.1: "weights and architecture of ViT/B-16"; §2.5; appendix §4).

    ``backbone`` is a timm ViT name (default ``deit_base_patch16_224``: the official code's DeiT-base/16
    weights, patch 16, 768-d, 12 layers, LayerNorm eps 1e-6, no drop-path). The network is built with
    ``img_size=image_size`` (256 in pre-training, 384 in fine-tuning), so with ``pretrained`` timm loads
    the 224² weights through its checkpoint filter and resamples the 14×14 position embeddings (bicubic)
    to the ``image_size / 16`` grid. ``pretrained=False`` is random initialisation (offline runs, tests).
    Extra ``timm_kwargs`` go to :func:`timm.create_model` (tests build tiny ViTs with ``embed_dim`` /
    ``depth`` / ``num_heads``).

    ``mask_token`` (pre-training; the official ``models/vit.py``): a learned ``(1, 1, d)`` token that
    replaces the patch embeddings at the MIM-masked positions *before* the position embedding is added (BEiT), so a
    masked position's input is ``mask_token + pos_embed``. Initialised to zeros as in the official code
    (``mask_token_init="zeros"``) or BEiT's truncated normal (``"trunc_normal"``, std 0.02). Fine-tuning
    models are built without it and ignore the key when loading a pre-training checkpoint (the official
    fine-tuning configs set ``vit_mask_token: false``).

    :meth:`forward` returns the token sequence ``(B, 1 + h·w, d)`` ([CLS] first) after the final
    LayerNorm. Loading a state dict whose ``vit.pos_embed`` has another grid resamples it to this grid
    (:func:`resize_position_embeddings`), for the online and momentum encoders alike.
    """

    def __init__(self, backbone: str = "deit_base_patch16_224", image_size: int = 256, pretrained: bool = True,
                 mask_token: bool = True, mask_token_init: str = "zeros", **timm_kwargs):
        super().__init__()
        import timm
        from timm.models.vision_transformer import VisionTransformer

        timm_kwargs.setdefault("num_classes", 0)
        timm_kwargs.setdefault("drop_path_rate", 0.0)
        try:
            vit = timm.create_model(backbone, pretrained=pretrained, img_size=image_size, **timm_kwargs)
        except (RuntimeError, TypeError, ValueError) as error:
            raise ValueError(f"model_config.simla.vit: timm cannot build {backbone!r} at image_size {image_size} "
                             f"({error}); expected a timm ViT such as deit_base_patch16_224") from error
        if not isinstance(vit, VisionTransformer):
            raise ValueError(f"model_config.simla.vit: {backbone!r} is a {type(vit).__name__}; expected a timm "
                             "VisionTransformer (e.g. deit_base_patch16_224)")
        if (vit.cls_token is None or vit.pos_embed is None or vit.no_embed_class or vit.reg_token is not None
                or getattr(vit, "dynamic_img_size", False)):
            raise ValueError(f"model_config.simla.vit: {backbone!r} must have a [CLS] token, learned absolute "
                             "position embeddings that include the [CLS] entry (DeiT/ViT style), no register "
                             "tokens and a fixed image size")
        grid = tuple(vit.patch_embed.grid_size)
        if any(s * p != image_size for s, p in zip(grid, vit.patch_embed.patch_size)):
            raise ValueError(f"model_config.simla.image_size: {image_size} is not a multiple of the patch size "
                             f"{tuple(vit.patch_embed.patch_size)} of {backbone!r}")
        self.vit = vit
        self.image_size = int(image_size)
        self.hidden_size = vit.embed_dim
        if mask_token:
            self.mask_token = nn.Parameter(torch.zeros(1, 1, vit.embed_dim))
            if mask_token_init == "trunc_normal":
                nn.init.trunc_normal_(self.mask_token, std=0.02)
            elif mask_token_init != "zeros":
                raise ValueError(f"model_config.simla.mask_token_init: {mask_token_init!r}; expected 'zeros' "
                                 "(the official code) or 'trunc_normal' (BEiT)")
        else:
            self.mask_token = None

    @property
    def grid_size(self) -> Tuple[int, int]:
        """The patch grid ``(h, w)``: 16×16 at 256², 24×24 at 384²."""
        return tuple(self.vit.patch_embed.grid_size)

    @property
    def num_patches(self) -> int:
        return self.vit.patch_embed.num_patches

    def forward(self, images: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``(B, 3, S, S)`` normalised pixels (and a ``(B, h·w)`` bool MIM mask, True = masked) ->
        ``(B, 1 + h·w, d)`` tokens after the final LayerNorm."""
        vit = self.vit
        x = vit.patch_embed(images)  # (B, h·w, d): timm flattens when the image size is fixed
        if mask is not None:
            if self.mask_token is None:
                raise ValueError("SIMLAImageEncoder: a MIM mask was given but the encoder was built without a mask "
                                 "token (model_config.simla.mask_token: false, as in fine-tuning)")
            if mask.dtype != torch.bool or tuple(mask.shape) != tuple(x.shape[:2]):
                raise ValueError(f"SIMLAImageEncoder: the MIM mask must be bool of shape {tuple(x.shape[:2])} "
                                 f"(batch, patches), got {mask.dtype} {tuple(mask.shape)}")
            x = torch.where(mask.unsqueeze(-1), self.mask_token.to(x.dtype), x)
        x = vit._pos_embed(x)  # [CLS] + position embeddings (+ dropout)
        x = vit.patch_drop(x)
        x = vit.norm_pre(x)
        x = vit.blocks(x)
        return vit.norm(x)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + "vit.pos_embed"
        if key in state_dict and state_dict[key].shape != self.vit.pos_embed.shape:
            state_dict[key] = resize_position_embeddings({"pos_embed": state_dict[key]}, self.grid_size)["pos_embed"]
        if self.mask_token is None:  # a fine-tuning encoder ignores the pre-training mask token
            state_dict.pop(prefix + "mask_token", None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


# --------------------------------------------------------------------------------------------------
# BEiT block masking
# --------------------------------------------------------------------------------------------------


def _rng(generator: Optional[torch.Generator]) -> random.Random:
    """A Python RNG seeded from ``generator`` (which advances), or from torch's global RNG."""
    return random.Random(int(torch.randint(0, 2**62, (1,), generator=generator).item()))


def draw_mask_blocks(grid: Tuple[int, int] = (16, 16), num_masked: int = MIM_MASKED_PATCHES,
                     min_block: int = MIM_MIN_BLOCK, max_block: Optional[int] = None,
                     min_aspect: float = MIM_MIN_ASPECT, max_aspect: Optional[float] = None,
                     rng: Optional[random.Random] = None) -> List[Tuple[int, int, int, int]]:
    """BEiT's block-wise masking for one image: rectangles ``(top, left, height, width)`` on the grid,
    whose union masks at most ``num_masked`` patches (BEiT's algorithm, the official
    ``masking_generator.py``).

    Each block draws a target area uniformly in ``[min_block, min(remaining, max_block)]`` and a
    log-uniform aspect ratio in ``[min_aspect, max_aspect or 1 / min_aspect]``, a position uniformly
    inside the grid, and is kept when it masks between 1 and ``remaining`` new patches (10 tries per
    block). Drawing stops when ``num_masked`` patches are masked or a block fails its 10 tries, so the
    count can end below ``num_masked`` (by less than one block) as in the reference.
    """
    rng = rng or random.Random()
    height, width = grid
    if not 0 < num_masked <= height * width:
        raise ValueError(f"model_config.simla.mim_masked_patches: {num_masked} must be in [1, {height * width}] "
                         f"for a {height}×{width} grid")
    max_block = num_masked if max_block is None else max_block
    log_aspect = (math.log(min_aspect), math.log(max_aspect or 1 / min_aspect))
    taken = [[False] * width for _ in range(height)]
    blocks: List[Tuple[int, int, int, int]] = []
    count = 0
    while count < num_masked:
        remaining = min(num_masked - count, max_block)
        added = 0
        for _ in range(10):
            area = rng.uniform(min_block, remaining)
            aspect = math.exp(rng.uniform(*log_aspect))
            h = int(round(math.sqrt(area * aspect)))
            w = int(round(math.sqrt(area / aspect)))
            if h < 1 or w < 1 or h >= height or w >= width:
                continue
            top = rng.randint(0, height - h)
            left = rng.randint(0, width - w)
            new = sum(not taken[i][j] for i in range(top, top + h) for j in range(left, left + w))
            if 0 < new <= remaining:
                for i in range(top, top + h):
                    for j in range(left, left + w):
                        taken[i][j] = True
                blocks.append((top, left, h, w))
                added = new
                break
        if added == 0:
            break
        count += added
    return blocks


def block_mask(batch_size: int, grid: Tuple[int, int] = (16, 16), num_masked: int = MIM_MASKED_PATCHES,
               min_block: int = MIM_MIN_BLOCK, max_block: Optional[int] = None, min_aspect: float = MIM_MIN_ASPECT,
               max_aspect: Optional[float] = None, generator: Optional[torch.Generator] = None,
               device: Optional[torch.device] = None) -> torch.Tensor:
    """``(batch_size, h·w)`` bool MIM masks (True = masked, row-major like the ViT's patches), one
    independent BEiT block mask per image (:func:`draw_mask_blocks`). A seeded ``generator`` makes the
    masks reproducible; it advances, so successive calls differ."""
    rng = _rng(generator)
    height, width = grid
    mask = torch.zeros(batch_size, height, width, dtype=torch.bool)
    for b in range(batch_size):
        for top, left, h, w in draw_mask_blocks(grid, num_masked, min_block, max_block, min_aspect, max_aspect, rng):
            mask[b, top:top + h, left:left + w] = True
    return mask.view(batch_size, height * width).to(device) if device is not None else mask.view(batch_size, -1)


# --------------------------------------------------------------------------------------------------
# The DALL·E dVAE encoder and the tokenizer
# --------------------------------------------------------------------------------------------------


class _Conv2d(nn.Module):
    """DALL·E's convolution: parameters ``w`` ``(out, in, k, k)`` and ``b``, padding ``(k - 1) / 2``.
    Always computed in float32 (the package casts to float16 on CUDA)."""

    def __init__(self, n_in: int, n_out: int, kw: int, device=None):
        super().__init__()
        if kw % 2 != 1:
            raise ValueError(f"DALL·E convolutions have odd kernel widths, got {kw}")
        self.kw = kw
        self.w = nn.Parameter(torch.empty(n_out, n_in, kw, kw, device=device))
        self.b = nn.Parameter(torch.zeros(n_out, device=device))
        if self.w.device.type != "meta":
            nn.init.normal_(self.w, std=1 / math.sqrt(n_in * kw ** 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x.float(), self.w.float(), self.b.float(), padding=(self.kw - 1) // 2)


class _EncoderBlock(nn.Module):
    """``id_path(x) + post_gain · res_path(x)`` with a bottleneck of ``n_out / 4`` and ``post_gain =
    1 / n_layers²`` (DALL·E's ``EncoderBlock``)."""

    def __init__(self, n_in: int, n_out: int, n_layers: int, device=None):
        super().__init__()
        if n_out % 4:
            raise ValueError(f"DALL·E encoder blocks need widths divisible by 4, got {n_out}")
        n_hid = n_out // 4
        self.post_gain = 1 / n_layers ** 2
        self.id_path = _Conv2d(n_in, n_out, 1, device) if n_in != n_out else nn.Identity()
        self.res_path = nn.Sequential(OrderedDict([
            ("relu_1", nn.ReLU()), ("conv_1", _Conv2d(n_in, n_hid, 3, device)),
            ("relu_2", nn.ReLU()), ("conv_2", _Conv2d(n_hid, n_hid, 3, device)),
            ("relu_3", nn.ReLU()), ("conv_3", _Conv2d(n_hid, n_hid, 3, device)),
            ("relu_4", nn.ReLU()), ("conv_4", _Conv2d(n_hid, n_out, 1, device)),
        ]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.id_path(x) + self.post_gain * self.res_path(x)


class DALLEEncoder(nn.Module):
    """The DALL·E dVAE encoder (the ``dall-e`` package's ``Encoder``: same module names, parameter names
    and shapes, so the released weights load): a 7×7 input convolution, four groups of
    ``n_blk_per_group`` residual blocks of widths ``n_hid·(1, 2, 4, 8)`` with a 2×2 max-pool after each of
    the first three (stride 8), then ReLU and a 1×1 convolution to ``vocab_size`` logits. The released
    encoder is ``n_hid=256, n_blk_per_group=2, vocab_size=8192``."""

    group_count = 4

    def __init__(self, n_hid: int = 256, n_blk_per_group: int = 2, input_channels: int = 3, vocab_size: int = 8192,
                 device=None):
        super().__init__()
        self.n_hid, self.n_blk_per_group = n_hid, n_blk_per_group
        self.input_channels, self.vocab_size = input_channels, vocab_size
        n_layers = self.group_count * n_blk_per_group
        widths = [n_hid, n_hid, 2 * n_hid, 4 * n_hid, 8 * n_hid]
        groups = [("input", _Conv2d(input_channels, n_hid, 7, device))]
        for g in range(1, self.group_count + 1):
            blocks = [(f"block_{i + 1}", _EncoderBlock(widths[g - 1] if i == 0 else widths[g], widths[g], n_layers,
                                                       device))
                      for i in range(n_blk_per_group)]
            if g < self.group_count:
                blocks.append(("pool", nn.MaxPool2d(kernel_size=2)))
            groups.append((f"group_{g}", nn.Sequential(OrderedDict(blocks))))
        groups.append(("output", nn.Sequential(OrderedDict([
            ("relu", nn.ReLU()), ("conv", _Conv2d(8 * n_hid, vocab_size, 1, device))]))))
        self.blocks = nn.Sequential(OrderedDict(groups))

    @classmethod
    def from_state_dict(cls, state: Mapping[str, torch.Tensor], source: str = "the dVAE state dict") -> "DALLEEncoder":
        """An encoder shaped after ``state`` (width, blocks per group, channels, vocabulary) with its weights."""
        try:
            n_hid, input_channels = state["blocks.input.w"].shape[:2]
            vocab_size = state["blocks.output.conv.w"].shape[0]
        except KeyError as error:
            raise ValueError(f"{source}: not a DALL·E dVAE encoder state dict (missing {error}; expected keys such as "
                             "blocks.input.w and blocks.output.conv.w)") from None
        n_blk = len({k.split(".")[2] for k in state if k.startswith("blocks.group_1.block_")})
        encoder = cls(int(n_hid), n_blk, int(input_channels), int(vocab_size), device="meta")
        try:
            encoder.load_state_dict(state, strict=True, assign=True)
        except RuntimeError as error:
            raise ValueError(f"{source}: does not match the DALL·E encoder layout ({error})") from None
        return encoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.input_channels:
            raise ValueError(f"DALLEEncoder: expected (B, {self.input_channels}, H, W) pixels, got {tuple(x.shape)}")
        return self.blocks(x)


def map_pixels(x: torch.Tensor, eps: float = LOGIT_LAPLACE_EPS) -> torch.Tensor:
    """DALL·E's pixel mapping ``[0, 1] -> [eps, 1 - eps]``: ``(1 - 2 eps) x + eps`` (0.8x + 0.1; the official
    ``dall_e/utils.py``)."""
    return (1 - 2 * eps) * x + eps


class DVAETokenizer:
    """The frozen MIM tokenizer (paper §2.3 "discrete VAE … 8192 visual tokens"; the official
    ``models/discrete_vae.py``): ``(B, 3, S, S)`` pixels in [0, 1] -> ``(B, (S/8)²)`` token ids, the argmax
    of the DALL·E encoder's logits after :func:`map_pixels`. At the official 128² view (``image_size // 2``)
    that is 16×16 = 256 tokens, one per ViT patch at 256².

    Deliberately *not* an ``nn.Module``: stored as an attribute of a model it stays outside the module
    tree, so it adds nothing to ``state_dict()`` (checkpoints), ``parameters()`` (the optimizer, the
    momentum copy's EMA) or ``.train()``. Its encoder has ``requires_grad=False``, is always in eval
    mode and runs under ``no_grad``; it moves to the images' device on first use (or :meth:`to`).
    """

    def __init__(self, encoder: DALLEEncoder):
        self.encoder = encoder.eval()
        for parameter in self.encoder.parameters():
            parameter.requires_grad_(False)

    @property
    def vocab_size(self) -> int:
        return self.encoder.vocab_size

    @classmethod
    def random(cls, n_hid: int = 256, n_blk_per_group: int = 2, vocab_size: int = 8192, seed: int = 0) -> "DVAETokenizer":
        """A randomly initialised tokenizer (tests, the offline demo)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return cls(DALLEEncoder(n_hid, n_blk_per_group, vocab_size=vocab_size))

    @classmethod
    def from_file(cls, path: str) -> "DVAETokenizer":
        """Weights from a weights-only file written by ``convert-dvae`` (never a pickled module)."""
        from mmf_multilevel.zoo.zoo import UnsafeCheckpointError, read_state

        try:
            state = read_state(path, allow_pickle=False)
        except UnsafeCheckpointError:
            raise ValueError(f"{path}: a pickled module, not a weights-only file; convert it once with "
                             f"python -m mmf_multilevel.methods.simla.vision convert-dvae {path} OUT.pth "
                             "--allow-pickle (if you trust it)") from None
        return cls(DALLEEncoder.from_state_dict(state, path))

    def to(self, device) -> "DVAETokenizer":
        self.encoder.to(device)
        return self

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return self.encoder.state_dict()

    @torch.no_grad()
    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        if pixels.dim() != 4:
            raise ValueError(f"DVAETokenizer: expected (B, 3, H, W) pixels in [0, 1], got {tuple(pixels.shape)}")
        if self.encoder.blocks.input.w.device != pixels.device:
            self.encoder.to(pixels.device)
        self.encoder.eval()
        logits = self.encoder(map_pixels(pixels.float()))
        return logits.argmax(dim=1).flatten(1)


# --------------------------------------------------------------------------------------------------
# The converter: encoder.pkl -> weights-only file
# --------------------------------------------------------------------------------------------------


class _PickledDALLEModule(nn.Module):
    """Stands in for every ``dall_e`` class while unpickling ``encoder.pkl``, so the package need not be
    installed: the pickled attributes (parameters, sub-modules) are restored and only ``state_dict()`` is
    read."""

    def forward(self, *args, **kwargs):  # pragma: no cover - never run
        raise RuntimeError("a stand-in for a pickled dall_e module; only its state_dict is used")


class _DALLEUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if module == "dall_e" or module.startswith("dall_e."):
            return _PickledDALLEModule
        return super().find_class(module, name)


_dalle_pickle = types.ModuleType("_dalle_pickle")
_dalle_pickle.Unpickler = _DALLEUnpickler
_dalle_pickle.load = pickle.load


def _allow_pickle_from_env() -> bool:
    return os.environ.get("MMF_ZOO_ALLOW_PICKLE", "") not in ("", "0")


def convert_dvae(source: str, target: str, allow_pickle: Optional[bool] = None) -> Dict[str, torch.Tensor]:
    """``source`` (the released ``encoder.pkl``: a pickled ``dall_e.encoder.Encoder``, or already a state
    dict) -> ``target``, a weights-only state dict written atomically. Unpickling a module can run
    arbitrary code, so it needs ``allow_pickle`` (``--allow-pickle`` or ``MMF_ZOO_ALLOW_PICKLE=1``, as the
    model zoo). The weights are checked against :class:`DALLEEncoder` before writing."""
    from mmf_multilevel.files import save_torch_atomically
    from mmf_multilevel.zoo.zoo import UnsafeCheckpointError, load_checkpoint

    if allow_pickle is None:
        allow_pickle = _allow_pickle_from_env()
    if not os.path.isfile(source):
        raise FileNotFoundError(f"convert-dvae: {source} not found (expected DALL·E's encoder.pkl)")
    try:
        loaded = load_checkpoint(source, allow_pickle=False)
    except UnsafeCheckpointError:
        if not allow_pickle:
            raise UnsafeCheckpointError(
                f"{source} is a pickled module; unpickling it can run arbitrary code. If you trust the file, pass "
                "--allow-pickle (or set MMF_ZOO_ALLOW_PICKLE=1, or allow_pickle=True)") from None
        loaded = torch.load(source, map_location="cpu", weights_only=False, pickle_module=_dalle_pickle)
    if isinstance(loaded, nn.Module):
        state = loaded.state_dict()
    elif isinstance(loaded, Mapping):
        state = dict(loaded)
    else:
        raise ValueError(f"{source}: expected a pickled DALL·E encoder module or its state dict, got "
                         f"{type(loaded).__name__}")
    state = {k: v.detach().float().contiguous().clone() for k, v in state.items()}
    DALLEEncoder.from_state_dict(state, source)  # the layout check
    save_torch_atomically(state, target)
    return state


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mmf_multilevel.methods.simla.vision",
                                     description="SIMLA image-side tools")
    commands = parser.add_subparsers(dest="command", required=True)
    convert = commands.add_parser("convert-dvae", help="DALL·E encoder.pkl -> a weights-only state dict")
    convert.add_argument("source", help="encoder.pkl (a pickled dall_e Encoder) or a state dict")
    convert.add_argument("target", help="the weights-only file to write (.pth)")
    convert.add_argument("--allow-pickle", action="store_true",
                         help="unpickle the module (runs code from the file; only for files you trust); "
                              "also MMF_ZOO_ALLOW_PICKLE=1")
    args = parser.parse_args(argv)
    from mmf_multilevel.zoo.zoo import UnsafeCheckpointError

    try:
        state = convert_dvae(args.source, args.target, allow_pickle=args.allow_pickle or None)
    except (UnsafeCheckpointError, ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {args.target}: {len(state)} tensors, vocabulary {state['blocks.output.conv.w'].shape[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
