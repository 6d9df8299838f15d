"""MVPTR's five pre-training losses as functions of tensors (paper §3.2-§3.3, Eq. 1-5); no MMF.

* :func:`masked_token_loss` - MCR (paper §3.2, the mean cross-entropy over the masked tags) and MLM
  (paper §3.3, Eq. 3, over the masked word-pieces): cross-entropy at the positions whose label is not
  ``IGNORE_INDEX``;
* :func:`vsc_loss` - the visual-semantic contrastive loss (paper §3.3, Eq. 1): symmetric InfoNCE over
  the in-batch similarity of the two uni-modal [CLS] projections, the logits scaled by ``exp(logit_scale)``;
  the scale is clamped at 100 (``ln 100``), as CLIP does; the official code leaves it unclamped;
* :func:`hard_negatives` - ITM's in-batch hard negatives (paper §3.3, "Image-Text Matching"): a hard
  image for every text and a hard text for every image, **sampled** from the softmax of the scaled VSC
  similarities (the paper, Eq. 1's distributions) or the **hardest** one (the official code's default),
  or uniformly drawn (``random``, a control); pairs of the same image are never a negative;
* :func:`split_negatives` - the official layout of the ``n`` negative pairs: a random half of the texts
  with their hard image, the other half of the images with their hard text;
* :func:`wpg_scores` / :func:`wpg_loss` - weakly-supervised phrase grounding (paper §3.3, Eq. 2): the
  score of a text-image pair is the mean over its phrases of the best cosine similarity with a region
  (``agg="max"``, the paper; ``"rand_top3"``, the official code, picks one of the three best at random);
  the loss is the hinge ``max(0, 0.2 + S(V', S) - S(V, S))`` (the paper prints ``min``; a hinge is
  ``max``, as the code computes it) averaged over the texts that have a phrase;
* :func:`itm_loss` - cross-entropy over matched (label 1) and negative (label 0) pairs (Eq. 4).

The total is their unweighted sum (Eq. 5).
"""
import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from mmf_multilevel.modules.masking import IGNORE_INDEX

__all__ = ["LOGIT_SCALE_MAX", "masked_token_loss", "vsc_loss", "hard_negatives", "split_negatives", "wpg_scores",
           "wpg_loss", "itm_loss"]

LOGIT_SCALE_MAX = math.log(100.0)


def masked_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of ``logits (..., V)`` against ``labels (...)`` where the label is not
    ``IGNORE_INDEX``; zero (connected to the graph) when nothing is masked."""
    logits = logits.reshape(-1, logits.size(-1)).float()
    labels = labels.reshape(-1)
    if not bool((labels != IGNORE_INDEX).any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX)


def vsc_scale(logit_scale: torch.Tensor, max_log: Optional[float] = LOGIT_SCALE_MAX) -> torch.Tensor:
    """``exp(logit_scale)``, the log clamped at ``max_log`` (None: unclamped, the official code)."""
    value = logit_scale.float()
    if max_log is not None:
        value = value.clamp(max=max_log)
    return value.exp()


def vsc_loss(text: torch.Tensor, image: torch.Tensor, logit_scale: torch.Tensor,
             max_log: Optional[float] = LOGIT_SCALE_MAX) -> Tuple[torch.Tensor, torch.Tensor]:
    """``text (n, d)`` and ``image (n, d)`` L2-normalised global embeddings (pair ``i`` matched) ->
    ``(loss, sim (n, n))`` with ``sim[i, k] = cos(text_i, image_k)`` unscaled. The loss is
    ``(CE(s·sim, diag) + CE(s·simᵀ, diag)) / 2``, ``s = exp(logit_scale)`` clamped."""
    sim = text.float() @ image.float().t()
    logits = sim * vsc_scale(logit_scale, max_log)
    target = torch.arange(sim.size(0), device=sim.device)
    loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2
    return loss, sim


def _same_image(image_ids: Optional[torch.Tensor], n: int, device) -> torch.Tensor:
    if image_ids is None:
        return torch.eye(n, dtype=torch.bool, device=device)
    ids = image_ids.to(device).view(-1)
    return ids.view(-1, 1) == ids.view(1, -1)


def hard_negatives(sim: torch.Tensor, mode: str = "sampled", scale: Optional[torch.Tensor] = None,
                   image_ids: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None
                   ) -> Tuple[torch.Tensor, torch.Tensor]:
    """In-batch hard negatives from the VSC similarities ``sim (n, n)`` (rows texts, columns images).

    Returns ``(hard_image (n,), hard_text (n,))``: ``hard_image[i]`` an image for text ``i``,
    ``hard_text[k]`` a text for image ``k``; ``-1`` where none exists (every other pair shows the same
    image). Pairs of one image (``image_ids``, default: only the diagonal) are never chosen.
    ``mode="sampled"``: drawn from ``softmax(scale · sim)`` over the allowed entries of the row / column
    (the paper); ``"hardest"``: the most similar allowed one (the official code's default); ``"random"``:
    uniform over the allowed ones (UNITER / LXMERT-style negatives, a control)."""
    if mode not in ("sampled", "hardest", "random"):
        raise ValueError(f"itm_negatives must be 'sampled', 'hardest' or 'random', got {mode!r}")
    sim = sim.detach().float()
    n = sim.size(0)
    forbidden = _same_image(image_ids, n, sim.device)
    if mode == "random":
        logits = torch.zeros_like(sim)
        mode = "sampled"
    else:
        logits = sim * (scale.detach().float() if scale is not None else 1.0)
    logits = logits.masked_fill(forbidden, float("-inf"))

    def pick(rows: torch.Tensor) -> torch.Tensor:
        valid = torch.isfinite(rows).any(1)
        out = torch.full((rows.size(0),), -1, dtype=torch.long, device=rows.device)
        if not bool(valid.any()):
            return out
        if mode == "hardest":
            out[valid] = rows[valid].argmax(1)
        else:
            probs = torch.softmax(rows[valid], dim=1)
            out[valid] = torch.multinomial(probs, 1, generator=generator).view(-1)
        return out

    return pick(logits), pick(logits.t())


def split_negatives(hard_image: torch.Tensor, hard_text: torch.Tensor,
                    generator: Optional[torch.Generator] = None
                    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``n`` negative pairs of the official code: a random permutation's first ``n // 2`` texts with
    their hard image, its other entries' images with their hard text. Returns ``(text_index, image_index,
    text_anchored)`` of the negatives (pairs whose partner is ``-1`` left out); ``text_anchored`` marks
    the (text, hard image) ones."""
    n = hard_image.numel()
    order = torch.randperm(n, generator=generator).to(hard_image.device)
    first, second = order[: n // 2], order[n // 2:]
    text_index = torch.cat([first, hard_text[second]])
    image_index = torch.cat([hard_image[first], second])
    anchored = torch.arange(n, device=hard_image.device) < first.numel()
    keep = (text_index >= 0) & (image_index >= 0)
    return text_index[keep], image_index[keep], anchored[keep]


def wpg_scores(phrase_states: torch.Tensor, phrase_mask: torch.Tensor, region_states: torch.Tensor,
               region_mask: torch.Tensor, agg: str = "max", generator: Optional[torch.Generator] = None
               ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Eq. 2's phrase-to-region score of ``P`` pairs: ``phrase_states (P, T, H)`` with ``phrase_mask (P, T)``
    (the phrase slots), ``region_states (P, K, H)`` with ``region_mask (P, K)``. Each phrase's cosine
    similarity with each real region, aggregated over regions (``"max"``, or ``"rand_top3"``: one of the
    min(3, regions) best at random), then averaged over the pair's phrases. Returns ``(scores (P,),
    has_phrase (P,) bool)``; a pair without phrases (or regions) scores 0."""
    if agg not in ("max", "rand_top3"):
        raise ValueError(f"model_config.mvptr.pretraining.wpg_aggregation must be 'max' or 'rand_top3', got {agg!r}")
    phrases = F.normalize(phrase_states.float(), dim=-1)
    regions = F.normalize(region_states.float(), dim=-1)
    sims = phrases @ regions.transpose(1, 2)  # (P, T, K)
    real_regions = region_mask.bool()
    sims = sims.masked_fill(~real_regions[:, None, :], float("-inf"))
    if agg == "max":
        best = sims.max(-1).values
    else:
        k = min(3, sims.size(-1))
        top = sims.topk(k, dim=-1).values  # (P, T, k), -inf beyond a pair's region count
        count = real_regions.sum(-1).clamp(min=1, max=k)  # (P,)
        draw = torch.rand(top.shape[:2], generator=generator).to(top.device)
        choice = (draw * count[:, None]).long().clamp(max=k - 1)
        best = top.gather(-1, choice.unsqueeze(-1)).squeeze(-1)
    used = phrase_mask.bool() & real_regions.any(-1, keepdim=True)
    best = best.masked_fill(~used, 0.0)
    count = used.sum(-1)
    scores = best.sum(-1) / count.clamp(min=1)
    return scores, count > 0


def wpg_loss(positive: torch.Tensor, negative: torch.Tensor, valid: torch.Tensor,
             margin: float = 0.2) -> torch.Tensor:
    """``mean over valid of max(0, margin + negative - positive)``; zero (graph-connected) when no pair
    is valid."""
    hinge = (margin + negative - positive).clamp(min=0)
    if not bool(valid.any()):
        return hinge.sum() * 0.0
    return hinge[valid].mean()


def itm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Eq. 4: cross-entropy over the matched (1) and hard-negative (0) pairs."""
    return F.cross_entropy(logits.float(), labels.long())
