"""Prediction heads and their standard losses.

Heads return logits; the loss helpers compute in float32 (safe under bf16/fp16 autocast) and return a
zero that is still connected to the graph when a batch has nothing to predict (no masked token, no
masked region), so that distributed training sees every parameter used and no NaN appears.
"""

from typing import Dict, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig, BertForPreTraining
from transformers.models.bert.modeling_bert import BertPredictionHeadTransform

from .masking import IGNORE_INDEX
from .text import DEFAULT_BERT, load_pretrained

__all__ = [
    "MLMHead",
    "ITMHead",
    "VQAHead",
    "RegionFeatureRegressionHead",
    "RegionClassificationHead",
    "bert_pretraining_head_state",
    "mlm_loss",
    "itm_loss",
    "vqa_loss",
    "region_feature_regression_loss",
    "region_classification_loss",
]


def _transform(hidden_size: int, hidden_act: str, layer_norm_eps: float) -> BertPredictionHeadTransform:
    """BERT's dense -> activation -> LayerNorm block (the ``transform`` of its LM head)."""
    config = BertConfig(hidden_size=hidden_size, hidden_act=hidden_act, layer_norm_eps=layer_norm_eps)
    return BertPredictionHeadTransform(config)


def init_bert_weights(module: nn.Module, std: float) -> None:
    """BERT's initialisation of the Linear and LayerNorm layers in ``module``: N(0, std) weights, zero biases."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _take(state: Mapping[str, torch.Tensor], prefix: str, names) -> Dict[str, torch.Tensor]:
    missing = [prefix + n for n in names if prefix + n not in state]
    if missing:
        raise KeyError(f"state dict lacks {missing}; available keys with this prefix: "
                       f"{sorted(k for k in state if k.startswith(prefix))}")
    return {n: state[prefix + n] for n in names}


def bert_pretraining_head_state(name_or_path: str = DEFAULT_BERT, **kwargs) -> Dict[str, torch.Tensor]:
    """The ``cls.*`` tensors (MLM and NSP heads) of a ``BertForPreTraining`` checkpoint.

    Loads ``name_or_path`` (hub id or ``save_pretrained`` directory) and returns the state entries
    under ``cls.``, keys kept (``cls.predictions.transform.dense.weight``, ``cls.seq_relationship.weight``,
    …), for :meth:`MLMHead.load_bert_state_dict` and :meth:`ITMHead.load_nsp_state_dict`. Raises if
    the checkpoint has no pre-training heads (e.g. a bare ``BertModel``).
    """
    model, info = load_pretrained(BertForPreTraining, name_or_path, output_loading_info=True, **kwargs)
    # a tied decoder is never reported missing; an untied one that is missing would be random: refused
    missing = [k for k in info["missing_keys"] if k.startswith("cls.")]
    if missing:
        raise ValueError(f"{name_or_path!r} has no BERT pre-training heads (missing {missing})")
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k.startswith("cls.")}


# ---------------------------------------------------------------------------------------------- heads
class MLMHead(nn.Module):
    """BERT LM head: ``transform`` (dense, GELU, LayerNorm) then a decoder over the vocabulary + bias.

    Parameter names follow ``BertLMPredictionHead`` (``transform.*``, ``decoder.weight``, ``bias``).
    :meth:`tie_to` shares the decoder weight with a word-embedding table; when the table has more rows
    than ``vocab_size`` (e.g. extra phrase ids appended) only its first ``vocab_size`` rows are used.
    """

    def __init__(
        self,
        hidden_size: int,
        vocab_size: int,
        hidden_act: str = "gelu",
        layer_norm_eps: float = 1e-12,
        initializer_range: float = 0.02,
    ):
        super().__init__()
        self.vocab_size = vocab_size
        self.transform = _transform(hidden_size, hidden_act, layer_norm_eps)
        self.decoder = nn.Linear(hidden_size, vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(vocab_size))
        self.tied = False
        init_bert_weights(self, initializer_range)

    @classmethod
    def from_config(cls, config: BertConfig) -> "MLMHead":
        return cls(config.hidden_size, config.vocab_size, config.hidden_act, config.layer_norm_eps,
                   config.initializer_range)

    def tie_to(self, embedding: nn.Embedding) -> "MLMHead":
        """Use ``embedding.weight`` as the decoder weight (shared parameter, not a copy)."""
        rows, dim = embedding.weight.shape
        if dim != self.decoder.in_features or rows < self.vocab_size:
            raise ValueError(
                f"cannot tie a ({self.vocab_size}, {self.decoder.in_features}) decoder to an embedding of shape "
                f"{(rows, dim)}"
            )
        self.decoder.weight = embedding.weight
        self.tied = True
        return self

    def load_bert_state_dict(self, state: Mapping[str, torch.Tensor], prefix: str = "cls.predictions.") -> None:
        """Copy BERT's pre-trained LM-head weights (keys ``{prefix}transform.*`` and ``{prefix}bias``).

        A tied head keeps its decoder (the embedding); an untied one also needs ``{prefix}decoder.weight``.
        """
        names = ["transform.dense.weight", "transform.dense.bias", "transform.LayerNorm.weight",
                 "transform.LayerNorm.bias", "bias"]
        if not self.tied:
            names.append("decoder.weight")
        values = _take(state, prefix, names)
        with torch.no_grad():
            for name, value in values.items():
                target = self.get_parameter(name)
                if name in ("bias", "decoder.weight") and value.shape[0] > self.vocab_size:
                    value = value[: self.vocab_size]
                if target.shape != value.shape:
                    raise ValueError(f"{prefix}{name}: checkpoint shape {tuple(value.shape)} != {tuple(target.shape)}")
                target.copy_(value)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """``(..., H) -> (..., vocab_size)`` logits. Gather the masked positions first to save memory."""
        weight = self.decoder.weight
        if weight.shape[0] != self.vocab_size:
            weight = weight[: self.vocab_size]
        return F.linear(self.transform(hidden_states), weight, self.bias)


class ITMHead(nn.Module):
    """Image-text matching: pooled vector ``(B, H)`` -> ``(B, num_labels)`` logits (index 1 = match)."""

    def __init__(self, hidden_size: int, num_labels: int = 2, dropout: float = 0.0, initializer_range: float = 0.02):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden_size, num_labels)
        init_bert_weights(self, initializer_range)

    def load_nsp_state_dict(
        self, state: Mapping[str, torch.Tensor], prefix: str = "cls.seq_relationship.", swap: bool = False
    ) -> None:
        """Initialise from BERT's next-sentence head. In BERT index 0 is "is next"; ``swap=True`` flips
        the rows so that index 1 (match) starts from "is next"; the default copies them as they are, as
        the released VisualBERT/μ-VLA code does."""
        values = _take(state, prefix, ["weight", "bias"])
        weight, bias = values["weight"], values["bias"]
        if weight.shape != self.classifier.weight.shape:
            raise ValueError(f"NSP head shape {tuple(weight.shape)} != ITM head {tuple(self.classifier.weight.shape)}")
        if swap:
            weight, bias = weight.flip(0), bias.flip(0)
        with torch.no_grad():
            self.classifier.weight.copy_(weight)
            self.classifier.bias.copy_(bias)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(pooled))


class VQAHead(nn.Module):
    """Answer classifier ``Linear(H, I) -> GELU -> LayerNorm -> Linear(I, num_answers)``.

    ``intermediate_size`` defaults to ``2 * H``, the LXMERT/UNITER/VisualBERT VQA head; ``I = H`` gives
    the Oscar/MVPTR-style ``BertPredictionHeadTransform + Linear`` head.
    """

    def __init__(
        self,
        hidden_size: int,
        num_answers: int,
        intermediate_size: Optional[int] = None,
        dropout: float = 0.0,
        layer_norm_eps: float = 1e-12,
        initializer_range: float = 0.02,
    ):
        super().__init__()
        inner = intermediate_size or 2 * hidden_size
        self.dropout = nn.Dropout(dropout)
        self.dense = nn.Linear(hidden_size, inner)
        self.activation = nn.GELU()
        self.LayerNorm = nn.LayerNorm(inner, eps=layer_norm_eps)
        self.classifier = nn.Linear(inner, num_answers)
        init_bert_weights(self, initializer_range)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.LayerNorm(self.activation(self.dense(self.dropout(pooled)))))


class _RegionHead(nn.Module):
    def __init__(self, hidden_size: int, out_dim: int, transform: bool, hidden_act: str, layer_norm_eps: float,
                 initializer_range: float):
        super().__init__()
        self.transform = _transform(hidden_size, hidden_act, layer_norm_eps) if transform else nn.Identity()
        self.decoder = nn.Linear(hidden_size, out_dim)
        init_bert_weights(self, initializer_range)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(hidden_states))


class RegionFeatureRegressionHead(_RegionHead):
    """Masked-region feature regression: ``(..., H) -> (..., feature_dim)``, by default through BERT's
    head transform as in LXMERT's visual-object head."""

    def __init__(self, hidden_size: int, feature_dim: int = 2048, transform: bool = True, hidden_act: str = "gelu",
                 layer_norm_eps: float = 1e-12, initializer_range: float = 0.02):
        super().__init__(hidden_size, feature_dim, transform, hidden_act, layer_norm_eps, initializer_range)


class RegionClassificationHead(_RegionHead):
    """Masked-region class prediction: ``(..., H) -> (..., num_classes)`` logits over detector classes."""

    def __init__(self, hidden_size: int, num_classes: int, transform: bool = True, hidden_act: str = "gelu",
                 layer_norm_eps: float = 1e-12, initializer_range: float = 0.02):
        super().__init__(hidden_size, num_classes, transform, hidden_act, layer_norm_eps, initializer_range)


# ---------------------------------------------------------------------------------------------- losses
def _zero(t: torch.Tensor) -> torch.Tensor:
    """A float32 zero attached to ``t``'s graph."""
    return t.float().sum() * 0.0


def _reduce(per_item: torch.Tensor, valid: torch.Tensor, reduction: str, anchor: torch.Tensor) -> torch.Tensor:
    per_item = torch.where(valid, per_item, torch.zeros_like(per_item))
    if reduction == "none":
        return per_item
    if reduction == "sum":
        return per_item.sum()
    if reduction != "mean":
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    count = valid.sum()
    if count == 0:
        return _zero(anchor)
    return per_item.sum() / count


def mlm_loss(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX, reduction: str = "mean"
) -> torch.Tensor:
    """Cross-entropy of ``logits (..., V)`` against ``labels (...)``, over positions whose label is not
    ``ignore_index``. ``mean`` averages over those positions (0 when there are none); ``none`` returns
    the per-position loss with zeros at ignored positions."""
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} do not match")
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    per_token = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), safe.reshape(-1), reduction="none")
    return _reduce(per_token.view(labels.shape), valid, reduction, logits)


def itm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    weights: Optional[torch.Tensor] = None,
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "mean",
) -> torch.Tensor:
    """Image-text matching cross-entropy (``labels`` 1 = matched, 0 = not, ``ignore_index`` skipped).
    Optional per-sample ``weights (B,)`` multiply each sample's loss before the mean over samples
    (μ-VLA's ITM-score re-weighting; pass them detached)."""
    per_sample = mlm_loss(logits, labels, ignore_index, reduction="none")
    if weights is not None:
        if weights.shape != labels.shape:
            raise ValueError(f"weights {tuple(weights.shape)} must match labels {tuple(labels.shape)}")
        per_sample = per_sample * weights.float()
    return _reduce(per_sample, labels != ignore_index, reduction, logits)


def vqa_loss(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Binary cross-entropy with logits against soft answer scores ``targets (B, A)`` in [0, 1].

    Follows the UNITER/LXMERT convention: the element-wise mean BCE multiplied by the number of answers
    ``A``, i.e. the BCE summed over answers and averaged over questions. ``none`` gives ``(B,)``.
    """
    if logits.shape != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} do not match")
    per_sample = F.binary_cross_entropy_with_logits(logits.float(), targets.float(), reduction="none").sum(-1)
    if reduction == "none":
        return per_sample
    if reduction == "sum":
        return per_sample.sum()
    if reduction != "mean":
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    return per_sample.mean() if per_sample.numel() else _zero(logits)


def _check_selected(selected: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    if selected.shape != shape:
        raise ValueError(f"selected must have shape {tuple(shape)} (batch, regions); got {tuple(selected.shape)}")
    return selected.to(torch.bool)


def region_feature_regression_loss(
    predictions: torch.Tensor,
    targets: torch.Tensor,
    selected: torch.Tensor,
    kind: str = "mse",
    reduction: str = "mean",
) -> torch.Tensor:
    """Regression of the original region features ``targets (B, N, D)`` at the masked regions.

    Per region: the mean over the D dimensions of the squared error (``kind="mse"``, the L2 loss of
    UNITER/μ-VLA's paper) or of the smooth-L1 error with beta 1 (``"smooth_l1"``, LXMERT's code).
    ``mean`` averages over the selected regions only (0 when none); ``none`` returns ``(B, N)``.
    """
    if predictions.shape != targets.shape:
        raise ValueError(f"predictions {tuple(predictions.shape)} and targets {tuple(targets.shape)} do not match")
    valid = _check_selected(selected, predictions.shape[:-1])
    pred, tgt = predictions.float(), targets.float()
    if kind == "mse":
        per_region = F.mse_loss(pred, tgt, reduction="none").mean(-1)
    elif kind == "smooth_l1":
        per_region = F.smooth_l1_loss(pred, tgt, reduction="none", beta=1.0).mean(-1)
    else:
        raise ValueError(f"kind must be 'mse' or 'smooth_l1', got {kind!r}")
    return _reduce(per_region, valid, reduction, predictions)


def region_classification_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    selected: torch.Tensor,
    weights: Optional[torch.Tensor] = None,
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "mean",
) -> torch.Tensor:
    """Masked-region classification against the detector, over the selected regions only.

    ``targets`` is either hard labels ``(B, N)`` (cross-entropy; ``ignore_index`` entries are skipped)
    or class distributions ``(B, N, C)`` (``KL(target || softmax(logits))``, UNITER's MRC-kl; drop a
    background column first if the detector has one). Optional ``weights (B, N)`` scale each region's
    loss (e.g. detector confidence). ``mean`` averages over the counted regions (0 when none).
    """
    valid = _check_selected(selected, logits.shape[:-1])
    log_probs = F.log_softmax(logits.float(), dim=-1)
    if targets.is_floating_point():
        if targets.shape != logits.shape:
            raise ValueError(f"soft targets {tuple(targets.shape)} must match logits {tuple(logits.shape)}")
        per_region = F.kl_div(log_probs, targets.float(), reduction="none").sum(-1)
    else:
        if targets.shape != logits.shape[:-1]:
            raise ValueError(
                f"labels {tuple(targets.shape)} must be logits {tuple(logits.shape)} without the class dim"
            )
        valid = valid & (targets != ignore_index)
        safe = torch.where(valid, targets, torch.zeros_like(targets))
        per_region = -log_probs.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    if weights is not None:
        if weights.shape != valid.shape:
            raise ValueError(f"weights {tuple(weights.shape)} must be {tuple(valid.shape)}")
        per_region = per_region * weights.float()
    return _reduce(per_region, valid, reduction, logits)
