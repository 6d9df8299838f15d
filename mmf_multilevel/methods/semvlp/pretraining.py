"""SemVLP's pre-training (paper §3.3): the heads, their losses and the per-update mode schedule.

* heads (:class:`SemVLPPretrainingHeads`), named as in every method: ``mlm`` (masked language
  modelling, decoder tied to the word embeddings), ``mrfr`` / ``mrc`` (masked object prediction:
  regression of the object's original feature and classification against the detector's label,
  LXMERT's transform + linear), ``itm`` (image-text matching on the pooled summary) and ``qa``
  (image question answering);
* :func:`pretraining_losses`: the four losses with equal weights; none but ITM on mismatched pairs;
* :class:`ModeSchedule`: which mode (single- or two-stream, §3.3.2) each optimizer update runs in.
"""
import math
import random
from fractions import Fraction
from typing import Dict, List, Optional

import torch
from torch import nn

from mmf_multilevel.methods.semvlp.network import MODES, SINGLE, TWO, SemVLPNetwork
from mmf_multilevel.modules.heads import (
    ITMHead,
    MLMHead,
    RegionClassificationHead,
    RegionFeatureRegressionHead,
    VQAHead,
    itm_loss,
    mlm_loss,
    region_classification_loss,
    region_feature_regression_loss,
    vqa_loss,
)
from mmf_multilevel.modules.masking import IGNORE_INDEX

__all__ = ["SemVLPPretrainingHeads", "pretraining_losses", "ModeSchedule"]


class SemVLPPretrainingHeads(nn.Module):
    """MLM (decoder tied to the word embeddings), masked-object feature regression and detected-label
    classification (LXMERT's transform + linear), ITM on the pooled summary, and optionally image QA."""

    def __init__(self, network: SemVLPNetwork, num_object_labels: int, num_qa_answers: int = 0):
        super().__init__()
        config = network.config
        hidden = config.hidden_size
        self.mlm = MLMHead.from_config(config).tie_to(network.text.word_embeddings)
        self.mrfr = RegionFeatureRegressionHead(hidden, network.feature_dim, hidden_act=config.hidden_act,
                                                layer_norm_eps=config.layer_norm_eps,
                                                initializer_range=config.initializer_range)
        self.num_object_labels = int(num_object_labels)
        self.mrc = (
            RegionClassificationHead(hidden, self.num_object_labels, hidden_act=config.hidden_act,
                                     layer_norm_eps=config.layer_norm_eps, initializer_range=config.initializer_range)
            if self.num_object_labels > 0 else None
        )
        self.itm = ITMHead(hidden, 2, initializer_range=config.initializer_range)
        self.num_qa_answers = int(num_qa_answers or 0)
        self.qa = (VQAHead(hidden, self.num_qa_answers, layer_norm_eps=config.layer_norm_eps,
                           initializer_range=config.initializer_range) if self.num_qa_answers > 0 else None)


def _masked_mean(per_item: torch.Tensor, valid: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
    count = valid.sum()
    if count == 0:
        return anchor.float().sum() * 0.0
    return torch.where(valid, per_item, torch.zeros_like(per_item)).sum() / count


def pretraining_losses(
    heads: SemVLPPretrainingHeads,
    out: Dict[str, torch.Tensor],
    mlm_labels: Optional[torch.Tensor] = None,
    object_targets: Optional[torch.Tensor] = None,
    object_selected: Optional[torch.Tensor] = None,
    object_labels: Optional[torch.Tensor] = None,
    is_matched: Optional[torch.Tensor] = None,
    qa_targets: Optional[torch.Tensor] = None,
    feature_loss: str = "mse",
) -> Dict[str, torch.Tensor]:
    """SemVLP's pre-training losses for one forward pass ``out`` of :class:`SemVLPNetwork`.

    * ``mlm``: CE over the text positions whose ``mlm_labels`` are not ``IGNORE_INDEX``;
    * ``mrfr`` / ``mrc`` (masked object prediction): regression of the original features
      ``object_targets (B, N, D)`` and CE against the detector's ``object_labels (B, N)`` at ``object_selected`` objects
      (the [IMG] output is not predicted);
    * ``itm``: 2-way CE of the pooled summary against ``is_matched`` (1 = matched);
    * ``qa``: BCE over the answers (summed over answers, mean over matched questions) against soft
      ``qa_targets (B, A)``.

    On mismatched pairs (``is_matched == 0``) no MLM, object or QA loss is counted. A loss whose
    inputs are None is left out; one with nothing to predict in the batch is a graph-connected zero.
    """
    losses = {}
    batch = out["text"].size(0)
    matched = None
    if is_matched is not None:
        matched = is_matched.view(-1).to(out["text"].device).long() == 1
    if mlm_labels is not None:
        labels = mlm_labels
        if matched is not None:
            labels = labels.masked_fill(~matched.unsqueeze(1), IGNORE_INDEX)
        valid = labels != IGNORE_INDEX
        # only the masked positions go through the vocabulary projection
        logits = heads.mlm(out["text"][valid])
        losses["mlm"] = mlm_loss(logits, labels[valid]) if valid.any() else heads.mlm.bias.sum() * 0.0
    if object_selected is not None:
        selected = object_selected.bool()
        if matched is not None:
            selected = selected & matched.unsqueeze(1)
        objects = out["objects"][:, 1:]  # drop [IMG]
        if object_targets is not None:
            predictions = heads.mrfr(objects)
            losses["mrfr"] = region_feature_regression_loss(predictions, object_targets, selected, kind=feature_loss)
        if object_labels is not None and heads.mrc is not None:
            logits = heads.mrc(objects)
            bad = selected & ((object_labels < 0) | (object_labels >= heads.num_object_labels))
            if bad.any():
                raise ValueError(
                    f"masked objects have detector labels outside [0, {heads.num_object_labels}) "
                    f"({sorted(set(object_labels[bad].tolist()))[:5]}); set model_config.semvlp.pretraining.num_object_labels to the "
                    "detector's number of classes"
                )
            losses["mrc"] = region_classification_loss(logits, object_labels, selected)
    if is_matched is not None:
        losses["itm"] = itm_loss(heads.itm(out["pooled"]), is_matched.view(-1).long())
    if qa_targets is not None and heads.qa is not None:
        if qa_targets.shape != (batch, heads.num_qa_answers):
            raise ValueError(
                f"QA targets have shape {tuple(qa_targets.shape)} but the QA head has {heads.num_qa_answers} answers; set "
                "model_config.semvlp.num_qa_answers to the size of the QA answer vocabulary"
            )
        logits = heads.qa(out["pooled"])
        per_question = vqa_loss(logits, qa_targets, reduction="none")
        valid = matched if matched is not None else torch.ones(batch, dtype=torch.bool, device=logits.device)
        losses["qa"] = _masked_mean(per_question, valid, logits)
    return losses


class ModeSchedule:
    """Which mode the ``step``-th optimizer update runs in.

    * ``random``: single-stream with probability ``single_ratio``, a coin seeded by ``(seed, step)`` (no
      global RNG state, identical on every rank and after a resume);
    * ``alternate``: deterministic, exactly ``single_ratio`` of every window: update ``k`` is single-stream
      when ``ceil((k + 1) r) > ceil(k r)`` (r = 0.5: single, two, single, two, ...);
    * ``single`` / ``two``: always that mode (the paper's Table 4 baselines).
    """

    KINDS = ("random", "alternate", SINGLE, TWO)

    def __init__(self, kind: str = "random", single_ratio: float = 0.5, seed: int = 0):
        if kind not in self.KINDS:
            raise ValueError(f"model_config.semvlp.mode_schedule must be one of {list(self.KINDS)}, got {kind!r}")
        ratio = float(single_ratio)
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"model_config.semvlp.single_stream_ratio must lie in [0, 1], got {single_ratio}")
        self.kind, self.single_ratio, self.seed = kind, ratio, int(seed)
        self._fraction = Fraction(ratio).limit_denominator(10000)

    def __call__(self, step: int) -> str:
        step = int(step)
        if self.kind in MODES:
            return self.kind
        if self.kind == "random":
            return SINGLE if random.Random(self.seed * 1_000_003 + step).random() < self.single_ratio else TWO
        r = self._fraction
        before = math.ceil(step * r)
        after = math.ceil((step + 1) * r)
        return SINGLE if after > before else TWO

    def modes(self, steps: int, start: int = 0) -> List[str]:
        return [self(s) for s in range(start, start + steps)]


