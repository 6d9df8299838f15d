"""μ-VLA's pre-training heads and losses (paper §3.2-§3.4).

Heads (:class:`MuVLAPretrainingHeads`), named as in every method: ``mlm`` (BERT's LM head tied to the
word embeddings; also p-MRTC, where a masked region predicts a word-piece of its linked phrase),
``mrc`` (masked region classification over the tag vocabulary), ``mrfr`` (2048-d feature regression)
and ``itm`` (on the BERT pooler, initialised from BERT's next-sentence head).

The losses (:func:`pretraining_losses`) follow the paper by default, with the official code's
choices behind switches: MRM averaged over the masked regions (``mrm_normalization: masked``) or the
official ``Σ_masked / (B·N) × 6.67`` (``official``); MRFR against the unmasked features with L2
(``mse``) or smooth-L1; the ITM re-weighting ``w = p_match`` (detached; 1 for shuffled negatives,
§3.4) applied per pair to the R-P and I-S losses (``itm_weighting: per_pair``) or, as the official
code does, as the batch-mean weight times the batch-mean MLM / ITM loss of every dataset
(``batch_mean``).
"""
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from mmf_multilevel.methods.muvla.network import TASKS, MuVLANetwork
from mmf_multilevel.modules.heads import (
    ITMHead,
    MLMHead,
    RegionClassificationHead,
    RegionFeatureRegressionHead,
    itm_loss,
    region_classification_loss,
    region_feature_regression_loss,
)
from mmf_multilevel.modules.masking import IGNORE_INDEX

__all__ = ["MuVLAPretrainingHeads", "masked_region_mean", "weighted_sample_mean", "itm_pair_weights", "pretraining_losses",
           "MRM_NORMALIZATIONS", "ITM_WEIGHTINGS", "OFFICIAL_MRM_SCALE"]

MRM_NORMALIZATIONS = ("masked", "official")
ITM_WEIGHTINGS = ("per_pair", "batch_mean", "off")
#: the official code's MRM scale (≈ 1 / 0.15, LXMERT's)
OFFICIAL_MRM_SCALE = 6.67


class MuVLAPretrainingHeads(nn.Module):
    """MLM (tied; also p-MRTC), MRC over ``num_tags`` tag classes (0: none), MRFR, ITM."""

    def __init__(self, network: MuVLANetwork, num_tags: int):
        super().__init__()
        config = network.config
        hidden = config.hidden_size
        self.mlm = MLMHead.from_config(config).tie_to(network.text.word_embeddings)
        self.mrc = (
            RegionClassificationHead(hidden, num_tags, hidden_act=config.hidden_act, layer_norm_eps=config.layer_norm_eps,
                                     initializer_range=config.initializer_range)
            if num_tags > 0 else None
        )
        self.mrfr = RegionFeatureRegressionHead(hidden, network.feature_dim, hidden_act=config.hidden_act,
                                                layer_norm_eps=config.layer_norm_eps,
                                                initializer_range=config.initializer_range)
        self.itm = ITMHead(hidden, 2, initializer_range=config.initializer_range)

    def load_bert_heads(self, state) -> None:
        """BERT's LM head into ``mlm`` and its next-sentence head into ``itm`` (``cls.*`` keys)."""
        self.mlm.load_bert_state_dict(state)
        self.itm.load_nsp_state_dict(state)


def masked_region_mean(per_region: torch.Tensor, selected: torch.Tensor, normalization: str = "masked") -> torch.Tensor:
    """Reduce a ``(B, N)`` per-region loss (zeros outside ``selected``) to a scalar.

    ``masked``: mean over the selected regions (0 when none). ``official``: the released code's
    ``Σ_selected / (B·N) × 6.67``, N the padded region count.
    """
    if normalization not in MRM_NORMALIZATIONS:
        raise ValueError(f"mrm_normalization must be one of {list(MRM_NORMALIZATIONS)}, got {normalization!r}")
    selected = selected.bool()
    values = torch.where(selected, per_region.float(), torch.zeros_like(per_region, dtype=torch.float32))
    if normalization == "official":
        return values.sum() / per_region.numel() * OFFICIAL_MRM_SCALE
    count = selected.sum()
    if count == 0:
        return per_region.float().sum() * 0.0
    return values.sum() / count


def weighted_sample_mean(per_sample: torch.Tensor, has: torch.Tensor, weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``mean_b w_b · ℓ_b`` over the samples with ``has`` (0, still in the graph, when none)."""
    values = per_sample.float()
    if weights is not None:
        values = values * weights.float()
    values = torch.where(has, values, torch.zeros_like(values))
    count = has.sum()
    if count == 0:
        return per_sample.float().sum() * 0.0
    return values.sum() / count


def itm_pair_weights(itm_logits: torch.Tensor, itm_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
    """w_ITM per pair: the detached match probability ``softmax(logits)[:, 1]``; 1 for shuffled
    negatives (``itm_labels == 0``)."""
    weights = itm_logits.detach().float().softmax(-1)[:, 1]
    if itm_labels is not None:
        weights = torch.where(itm_labels.to(weights.device) == 0, torch.ones_like(weights), weights)
    return weights


def _token_losses(head: nn.Module, states: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-position cross-entropy ``(B, L)`` of ``head(states)`` against ``labels``, computed at the
    labelled positions only (the vocabulary projection of the others is skipped); 0 elsewhere."""
    valid = labels != IGNORE_INDEX
    if not valid.any():
        return head(states[:, :1]).float().sum() * 0.0 + torch.zeros(labels.shape, device=states.device)
    per = torch.zeros(labels.shape, dtype=torch.float32, device=states.device)
    logits = head(states[valid]).float()
    return per.masked_scatter(valid, F.cross_entropy(logits, labels[valid], reduction="none"))


def _token_loss(head, states, labels, weights, weighting):
    """MLM-style loss: the mean over labelled positions, or re-weighted per pair (``per_pair``: per
    sample mean × w_b, averaged over samples with a label) or by the batch-mean weight."""
    labels = labels.long().masked_fill(labels < 0, IGNORE_INDEX)
    per_position = _token_losses(head, states, labels)
    valid = labels != IGNORE_INDEX
    if weights is not None and weighting == "per_pair":
        count = valid.sum(1)
        return weighted_sample_mean(per_position.sum(1) / count.clamp(min=1), count > 0, weights)
    total = valid.sum()
    loss = per_position.sum() / total.clamp(min=1)
    if weights is not None and weighting == "batch_mean":
        loss = loss * weights.float().mean()
    return loss


def pretraining_losses(
    heads: MuVLAPretrainingHeads,
    out: Dict[str, torch.Tensor],
    task: str,
    *,
    mlm_labels: Optional[torch.Tensor] = None,
    region_selected: Optional[torch.Tensor] = None,
    region_targets: Optional[torch.Tensor] = None,
    mrc_labels: Optional[torch.Tensor] = None,
    mrtc_labels: Optional[torch.Tensor] = None,
    itm_labels: Optional[torch.Tensor] = None,
    itm_weights: Optional[torch.Tensor] = None,
    itm_weighting: str = "per_pair",
    mrm_normalization: str = "masked",
    feature_loss: str = "mse",
    use_mrc: Optional[bool] = None,
    use_mrfr: Optional[bool] = None,
) -> Dict[str, torch.Tensor]:
    """The losses of one pre-training batch of ``task`` (one of :data:`TASKS`).

    * ``mlm`` when ``mlm_labels`` (``(B, T)``, ``IGNORE_INDEX`` = not masked) are given;
    * ``mrc`` / ``mrfr`` over ``region_selected`` (``(B, N)``) against ``mrc_labels`` (tag ids, -100
      or -1 = none) / the unmasked ``region_targets``; by default on for R-T only (``use_mrc`` /
      ``use_mrfr`` add them elsewhere, as the official code does);
    * ``mrtc`` (R-P): the tied MLM head on the region states against ``mrtc_labels`` (a word-piece of
      the linked noun phrase per masked region, ``IGNORE_INDEX`` elsewhere);
    * ``itm`` when ``itm_labels`` (``(B,)``, 1 = matched) are given.

    ``itm_weights`` (``(B,)``, from :func:`itm_pair_weights`) switch on the re-weighting:
    ``per_pair`` weights each pair's MLM / p-MRTC / ITM loss of R-P and I-S (not R-T);
    ``batch_mean`` multiplies the batch-mean MLM and ITM losses of every task by the mean weight
    (the official code; MRM and p-MRTC unweighted).
    """
    if task not in TASKS:
        raise ValueError(f"unknown μ-VLA task {task!r}; expected one of {list(TASKS)}")
    if itm_weighting not in ITM_WEIGHTINGS:
        raise ValueError(f"itm_weighting must be one of {list(ITM_WEIGHTINGS)}, got {itm_weighting!r}")
    if use_mrc is None:
        use_mrc = task == "region_tag"
    if use_mrfr is None:
        use_mrfr = task == "region_tag"
    weights = itm_weights
    if weights is not None and (task == "text" or (itm_weighting == "per_pair" and task == "region_tag")):
        weights = None  # the paper leaves R-T unweighted; unimodal text has no pair to weight
    losses = {}
    if mlm_labels is not None:
        losses["mlm"] = _token_loss(heads.mlm, out["text"], mlm_labels, weights, itm_weighting)
    regions = out["regions"]
    if region_selected is not None:
        selected = region_selected.bool()
        if use_mrc:
            if heads.mrc is None:
                raise ValueError("masked region classification needs num_tags > 0 (model_config.muvla.pretraining.num_tags)")
            if mrc_labels is None:
                raise KeyError("masked region classification needs mrc_labels (the regions' tag ids)")
            targets = mrc_labels.long().masked_fill(mrc_labels < 0, IGNORE_INDEX)
            classes = heads.mrc.decoder.out_features
            if (targets >= classes).any():
                raise ValueError(f"a region's tag id {int(targets.max())} is outside the {classes} MRC classes: set "
                                 "model_config.muvla.pretraining.num_tags to the weak corpus' tag vocabulary size")
            per_region = region_classification_loss(heads.mrc(regions), targets, selected, reduction="none")
            losses["mrc"] = masked_region_mean(per_region, selected & (targets != IGNORE_INDEX), mrm_normalization)
        if use_mrfr:
            if region_targets is None:
                raise KeyError("masked region feature regression needs region_targets (the unmasked features)")
            per_region = region_feature_regression_loss(heads.mrfr(regions), region_targets, selected, kind=feature_loss,
                                                        reduction="none")
            losses["mrfr"] = masked_region_mean(per_region, selected, mrm_normalization)
    if mrtc_labels is not None:
        # the official code leaves p-MRTC unweighted; the paper weights the whole R-P loss
        w = weights if itm_weighting == "per_pair" else None
        losses["mrtc"] = _token_loss(heads.mlm, regions, mrtc_labels, w, itm_weighting)
    if itm_labels is not None:
        logits = heads.itm(out["pooled"])
        w = weights if (weights is not None and itm_weighting != "off") else None
        if w is not None and itm_weighting == "batch_mean":
            losses["itm"] = itm_loss(logits, itm_labels.long()) * w.float().mean()
        else:
            losses["itm"] = itm_loss(logits, itm_labels.long(), weights=w)
    return losses
