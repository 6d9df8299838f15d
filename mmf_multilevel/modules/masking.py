"""Token and region masking for masked-modelling pre-training objectives.

All randomness comes from an optional ``torch.Generator`` so that a seeded generator reproduces the same
masks. Inputs are never modified in place: the originals stay available as prediction targets.
"""

from typing import Iterable, NamedTuple, Optional, Tuple, Union

import torch

__all__ = ["IGNORE_INDEX", "mask_tokens", "RegionMasking", "draw_region_masking", "apply_region_masking", "mask_regions"]

IGNORE_INDEX = -100

Prob = Union[float, torch.Tensor]


def _uniform(shape, generator: Optional[torch.Generator], device: torch.device) -> torch.Tensor:
    """U[0, 1) samples drawn on the generator's device, returned on ``device``."""
    gen_device = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=gen_device).to(device)


def _probabilities(prob: Prob, shape: torch.Size, device: torch.device, name: str) -> torch.Tensor:
    p = torch.as_tensor(prob, dtype=torch.float32, device=device)
    if p.dim() and p.shape != shape:
        raise ValueError(f"{name} must be a number or a tensor of shape {tuple(shape)}; got {tuple(p.shape)}")
    if not torch.isfinite(p).all() or (p < 0).any() or (p > 1).any():
        raise ValueError(f"{name} must lie in [0, 1]")
    return p.expand(shape)


def _select(
    candidates: torch.Tensor, prob: torch.Tensor, ensure_one: bool, generator: Optional[torch.Generator]
) -> torch.Tensor:
    """Bernoulli(prob) over ``candidates`` (B, L); with ``ensure_one``, rows whose draw is empty but
    that have a candidate with non-zero probability get one such candidate, chosen uniformly."""
    draw = _uniform(candidates.shape, generator, candidates.device)
    selected = candidates & (draw < prob)
    if ensure_one:
        eligible = candidates & (prob > 0)
        empty = ~selected.any(dim=1) & eligible.any(dim=1)
        if empty.any():
            # a uniform random eligible position per row: argmax of random scores over eligible positions
            scores = _uniform(candidates.shape, generator, candidates.device).masked_fill(~eligible, -1.0)
            pick = torch.zeros_like(selected)
            pick[torch.arange(candidates.size(0), device=candidates.device), scores.argmax(dim=1)] = True
            selected = selected | (pick & empty.unsqueeze(1))
    return selected


def mask_tokens(
    input_ids: torch.Tensor,
    special_tokens_mask: Optional[torch.Tensor] = None,
    attention_mask: Optional[torch.Tensor] = None,
    *,
    vocab_size: int,
    mask_token_id: int,
    prob: Prob = 0.15,
    generator: Optional[torch.Generator] = None,
    special_token_ids: Optional[Iterable[int]] = None,
    ensure_one: bool = False,
    mask_ratio: float = 0.8,
    random_ratio: float = 0.1,
    ignore_index: int = IGNORE_INDEX,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """BERT masked-LM corruption of ``input_ids`` ``(B, T)`` (or ``(T,)``).

    Each maskable token is selected with probability ``prob`` (a number, or a per-token ``(B, T)``
    tensor, e.g. for phrase-linked masking). Of the selected tokens ``mask_ratio`` become
    ``mask_token_id``, ``random_ratio`` a uniform random id in ``[0, vocab_size)`` and the rest stay
    unchanged (BERT's 80/10/10). Tokens flagged by ``special_tokens_mask`` (1 = special), those whose
    id is in ``special_token_ids`` and padding (``attention_mask == 0``) are never selected; at least
    one of the three must be given. With ``ensure_one`` every sequence that has a maskable token gets
    at least one selected.

    Returns ``(masked_ids, labels)``: ``labels`` holds the original id at selected positions and
    ``ignore_index`` elsewhere.
    """
    if special_tokens_mask is None and attention_mask is None and special_token_ids is None:
        raise ValueError(
            "mask_tokens needs special_tokens_mask, attention_mask or special_token_ids so that [CLS]/[SEP]/padding "
            "are never masked"
        )
    if mask_ratio < 0 or random_ratio < 0 or mask_ratio + random_ratio > 1:
        raise ValueError("mask_ratio and random_ratio must be non-negative and sum to at most 1")
    if not 0 <= mask_token_id < vocab_size:
        raise ValueError(f"mask_token_id {mask_token_id} is outside the vocabulary [0, {vocab_size})")
    squeeze = input_ids.dim() == 1
    ids = input_ids.unsqueeze(0) if squeeze else input_ids
    if ids.dim() != 2:
        raise ValueError(f"input_ids must be (batch, seq_len) or (seq_len,); got shape {tuple(input_ids.shape)}")

    def as_2d(t: Optional[torch.Tensor], name: str) -> Optional[torch.Tensor]:
        if t is None:
            return None
        t = t.unsqueeze(0) if squeeze else t
        if t.shape != ids.shape:
            raise ValueError(f"{name} must have the shape of input_ids {tuple(input_ids.shape)}; got {tuple(t.shape)}")
        return t.to(device=ids.device, dtype=torch.bool)

    candidates = torch.ones_like(ids, dtype=torch.bool)
    special = as_2d(special_tokens_mask, "special_tokens_mask")
    if special is not None:
        candidates &= ~special
    keep = as_2d(attention_mask, "attention_mask")
    if keep is not None:
        candidates &= keep
    if special_token_ids is not None:
        specials = torch.as_tensor(list(special_token_ids), dtype=ids.dtype, device=ids.device)
        candidates &= ~torch.isin(ids, specials)

    p = prob.unsqueeze(0) if squeeze and isinstance(prob, torch.Tensor) and prob.dim() == 1 else prob
    p = _probabilities(p, ids.shape, ids.device, "prob")
    selected = _select(candidates, p, ensure_one, generator)

    labels = torch.full_like(ids, ignore_index)
    labels[selected] = ids[selected]
    action = _uniform(ids.shape, generator, ids.device)
    random_ids = torch.randint(
        vocab_size, ids.shape, generator=generator, device=generator.device if generator is not None else ids.device
    ).to(device=ids.device, dtype=ids.dtype)
    to_mask = selected & (action < mask_ratio)
    to_random = selected & (action >= mask_ratio) & (action < mask_ratio + random_ratio)
    masked = ids.clone()
    masked[to_mask] = mask_token_id
    masked[to_random] = random_ids[to_random]
    if squeeze:
        return masked.squeeze(0), labels.squeeze(0)
    return masked, labels


class RegionMasking(NamedTuple):
    """Which regions a masked-region objective corrupts and predicts (all ``(B, N)``)."""

    selected: torch.Tensor  # bool: the regions to predict
    zeroed: torch.Tensor  # bool: selected regions whose input feature is set to zero
    source: torch.Tensor  # long: for a randomly replaced region, the index (same row) of the region whose
    # feature replaces it; -1 elsewhere


def draw_region_masking(
    region_mask: torch.Tensor,
    prob: Prob = 0.15,
    generator: Optional[torch.Generator] = None,
    *,
    zero_ratio: float = 1.0,
    random_ratio: float = 0.0,
    ensure_one: bool = False,
) -> RegionMasking:
    """Draw a masked-region corruption over ``region_mask`` ``(B, N)`` (1 = real region).

    Each real region (padding is never selected) is selected with probability ``prob``: a number, or a
    per-region ``(B, N)`` tensor (μ-VLA's phrase-linked masking uses ``0.15 * link_score``, 0 for unlinked
    regions). Of the selected regions ``zero_ratio`` get a zero feature, ``random_ratio`` the feature of
    another real region of the same row (image), chosen uniformly, and the rest stay unchanged. The defaults
    zero every selected region (SemVLP); μ-VLA's released recipe is ``zero_ratio=0.9``; LXMERT's is
    ``zero_ratio=0.8, random_ratio=0.1``.

    Only decisions are returned (apply them with :func:`apply_region_masking`): a dataset draws them per
    sample and the features stay intact as the regression target.
    """
    if region_mask.dim() != 2:
        raise ValueError(f"region_mask must be (batch, regions); got shape {tuple(region_mask.shape)}")
    if zero_ratio < 0 or random_ratio < 0 or zero_ratio + random_ratio > 1:
        raise ValueError("zero_ratio and random_ratio must be non-negative and sum to at most 1")
    shape, device = region_mask.shape, region_mask.device
    candidates = region_mask.to(dtype=torch.bool)
    p = _probabilities(prob, shape, device, "prob")
    selected = _select(candidates, p, ensure_one, generator)
    action = _uniform(shape, generator, device)
    zeroed = selected & (action < zero_ratio)
    to_random = selected & (action >= zero_ratio) & (action < zero_ratio + random_ratio)
    source = torch.full(shape, -1, dtype=torch.long, device=device)
    if to_random.any():
        # a uniform real region of the same row: argmax of random scores over the row's real regions
        scores = _uniform(shape + (shape[1],), generator, device).masked_fill(~candidates.unsqueeze(1), -1.0)
        source = torch.where(to_random, scores.argmax(-1), source)
    return RegionMasking(selected, zeroed, source)


def apply_region_masking(features: torch.Tensor, masking: RegionMasking) -> torch.Tensor:
    """``features`` ``(B, N, D)`` as the network sees them under ``masking``: replaced regions take their
    source's original feature, zeroed ones are zero. ``features`` itself is left untouched."""
    if features.dim() != 3 or features.shape[:2] != masking.selected.shape:
        raise ValueError(f"features must be (batch, regions, dim) matching the masking's "
                         f"{tuple(masking.selected.shape)}; got shape {tuple(features.shape)}")
    masked = features.clone()
    source = masking.source.to(features.device)
    replaced = source >= 0
    if replaced.any():
        rows, cols = replaced.nonzero(as_tuple=True)
        masked[rows, cols] = features[rows, source[rows, cols]]
    return masked.masked_fill(masking.zeroed.to(features.device).bool().unsqueeze(-1), 0.0)


def mask_regions(
    features: torch.Tensor,
    region_mask: Optional[torch.Tensor] = None,
    prob: Prob = 0.15,
    generator: Optional[torch.Generator] = None,
    *,
    zero_ratio: float = 1.0,
    random_ratio: float = 0.0,
    ensure_one: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`draw_region_masking` applied to ``features`` ``(B, N, D)`` at once: ``(masked_features,
    selected)``; ``features`` is left untouched and serves as the regression target."""
    if features.dim() != 3:
        raise ValueError(f"features must be (batch, regions, dim); got shape {tuple(features.shape)}")
    shape = features.shape[:2]
    if region_mask is None:
        region_mask = torch.ones(shape, dtype=torch.bool, device=features.device)
    elif region_mask.shape != shape:
        raise ValueError(f"region_mask must be {tuple(shape)}; got {tuple(region_mask.shape)}")
    masking = draw_region_masking(region_mask.to(features.device), prob, generator, zero_ratio=zero_ratio,
                                  random_ratio=random_ratio, ensure_one=ensure_one)
    return apply_region_masking(features, masking), masking.selected
