"""μ-VLA: unsupervised multi-granular vision-language pre-training (spec ``muvla.md``).

The network (:class:`MuVLANetwork`, a plain ``nn.Module``) is a single-stream BERT over
``[text ; regions]``:

* text: BERT's word + position + token-type embeddings (with BERT's LayerNorm; without it when
  ``embedding_style: released``, as the official code runs);
* regions: ``LN_v(W_v f) + LN_b(W_b loc5)`` with the 5-d location ``[x1/W, y1/H, x2/W, y2/H, wh/WH]``
  (:class:`~mmf_multilevel.modules.visual.RegionEmbedding`). ``embedding_style: paper`` (default,
  spec §8 #16) adds the token-type embedding of segment 1 and a LayerNorm over the sum;
  ``released`` is the official code's plain sum;
* ``embedding_style: visual_bert``: VisualBERT's own embedding (``W_v f`` + visual token-type and
  position embeddings, one LayerNorm over ``[text ; regions]``, no boxes), so that MMF ``visual_bert``
  checkpoints and HF ``VisualBertModel`` weights load unchanged (:func:`load_visual_bert`,
  ``visual_bert_checkpoint``; no R-T tag path in this style);
* R-T tag sequences: ``LN_tag(word_emb(tag word-piece)) + LN_b(W_b loc5 of the tag's region)``, no
  position or segment embedding, ``W_b`` / ``LN_b`` shared with the regions; [CLS], [SEP] and padding
  carry an all-zero box.

Heads (:class:`MuVLAPretrainingHeads`): the BERT LM head tied to the word embeddings (MLM and
p-MRTC: masked regions predict a word-piece of their linked noun phrase), masked-region
classification over the tag vocabulary, 2048-d feature regression, and ITM on the BERT pooler
initialised from BERT's next-sentence head. Downstream heads: VQA / SNLI-VE classifiers
(``BertPredictionHeadTransform + Linear``) on the last text token (VQA, the official code) or the
pooled [CLS]; NLVR2's paired 1536-d head; RefCOCO+'s per-region scorer over the region states.

The losses (:func:`pretraining_losses`) follow the paper by default, with the official code's
choices behind switches (spec §8): MRM averaged over the masked regions (``mrm_normalization:
masked``) or the official ``Σ_masked / (B·N) × 6.67`` (``official``); MRFR against the unmasked
features with L2 (``mse``) or smooth-L1; the ITM re-weighting ``w = p_match`` (detached; 1 for
shuffled negatives) applied per pair to the R-P and I-S losses (``itm_weighting: per_pair``) or,
as the official code does, as the batch-mean weight times the batch-mean MLM / ITM loss of every
dataset, R-T included (``batch_mean``).

The registered MMF model ``muvla`` (:class:`MuVLA`) turns a SampleList into tensors and the
outputs into ``{"scores": ..., "losses": {...}}``. ``training_head_type``: ``pretraining`` (the
task of a batch is the ``muvla_task`` field the μ-VLA datasets set: R-T, R-P, I-S),
``classification`` (VQA, SNLI-VE), ``nlvr2`` and ``refcoco``. The backbone is ``backbone.*`` so that
fine-tuning loads only it from a pre-training checkpoint (``pretrained_state_mapping: backbone:
backbone``).
"""
import os
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig

from mmf_multilevel.models.common import (
    MMFMissingBaseModel, head_type_of, model_config_path, register_model, registry_value, sample_regions, sample_text,
    text_encoder_from, training_setting,
)
from mmf_multilevel.models.common import config_get as _get
from mmf_multilevel.modules.heads import (
    ITMHead,
    MLMHead,
    RegionClassificationHead,
    RegionFeatureRegressionHead,
    VQAHead,
    bert_pretraining_head_state,
    itm_loss,
    region_classification_loss,
    region_feature_regression_loss,
)
from mmf_multilevel.modules.masking import IGNORE_INDEX
from mmf_multilevel.modules.task_heads import NLVR2PairedHead, RegionScoringHead
from mmf_multilevel.modules.text import BertTextEncoder
from mmf_multilevel.modules.visual import RegionEmbedding

__all__ = [
    "TASKS",
    "TASK_IDS",
    "EMBEDDING_STYLES",
    "MuVLANetwork",
    "MuVLAPretrainingHeads",
    "masked_region_mean",
    "weighted_sample_mean",
    "itm_pair_weights",
    "pretraining_losses",
    "convert_visual_bert_state",
    "load_visual_bert",
    "read_visual_bert_checkpoint",
    "MuVLA",
]

#: pre-training tasks and the integer ids the datasets put in ``muvla_task`` ("text": text-only MLM,
#: U-VisualBERT's unpaired text)
TASKS = ("region_tag", "region_phrase", "image_sentence", "text")
TASK_IDS = {name: i for i, name in enumerate(TASKS)}
EMBEDDING_STYLES = ("paper", "released", "visual_bert")
MRM_NORMALIZATIONS = ("masked", "official")
ITM_WEIGHTINGS = ("per_pair", "batch_mean", "off")
#: the official code's MRM scale (≈ 1 / 0.15, LXMERT's)
OFFICIAL_MRM_SCALE = 6.67

# ====================================================================================== network
class MuVLANetwork(nn.Module):
    """Single-stream BERT over ``[text (or tag sequence) ; regions]``; see the module docstring."""

    def __init__(self, text: BertTextEncoder, feature_dim: int = 2048, embedding_style: str = "paper"):
        super().__init__()
        if embedding_style not in EMBEDDING_STYLES:
            raise ValueError(f"embedding_style must be one of {list(EMBEDDING_STYLES)}, got {embedding_style!r}")
        self.text = text
        self.embedding_style = embedding_style
        config = text.config
        hidden = config.hidden_size
        if embedding_style == "visual_bert":
            # VisualBERT's: W_v f + visual type + visual position(0), one LayerNorm over [text ; regions]
            self.regions = RegionEmbedding(feature_dim, hidden, box_dim=0, style="concat", dropout=0.0, layer_norm=False,
                                           initializer_range=config.initializer_range)
            self.visual_token_type = nn.Embedding(config.type_vocab_size, hidden)
            self.visual_position = nn.Embedding(config.max_position_embeddings, hidden)
            with torch.no_grad():  # as VisualBERT's special_visual_initialize
                self.visual_token_type.weight.copy_(text.token_type_embeddings.weight)
                self.visual_position.weight.copy_(text.position_embeddings.weight)
        else:
            self.regions = RegionEmbedding(
                feature_dim, hidden, box_dim=5, style="sum", dropout=config.hidden_dropout_prob,
                final_layer_norm=embedding_style == "paper", layer_norm_eps=config.layer_norm_eps,
                initializer_range=config.initializer_range,
            )
        self.tag_norm = nn.LayerNorm(hidden, eps=config.layer_norm_eps)
        self.tag_dropout = nn.Dropout(config.hidden_dropout_prob)

    @property
    def config(self) -> BertConfig:
        return self.text.config

    @property
    def hidden_size(self) -> int:
        return self.text.hidden_size

    @property
    def feature_dim(self) -> int:
        return self.regions.feature_dim

    # ------------------------------------------------------------------ embeddings
    def embed_text(self, input_ids: torch.Tensor, token_type_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.text.embed(input_ids, token_type_ids=token_type_ids, layer_norm=self.embedding_style == "paper")

    def embed_tags(self, tag_ids: torch.Tensor, tag_boxes: torch.Tensor) -> torch.Tensor:
        """R-T tag sequence ``(B, T)`` with each word-piece's region box ``(B, T, 5)`` -> ``(B, T, H)``."""
        if tag_boxes.shape != tag_ids.shape + (5,):
            raise ValueError(f"tag_boxes must be (batch, tags, 5) = {tuple(tag_ids.shape) + (5,)}; got {tuple(tag_boxes.shape)}")
        words = self.tag_norm(self.text.word_embeddings(tag_ids))
        return self.tag_dropout(words + self.regions.embed_boxes(tag_boxes))

    def embed_regions(self, features: torch.Tensor, boxes: torch.Tensor, region_mask: torch.Tensor) -> torch.Tensor:
        extra = None
        if self.embedding_style == "paper":
            segment = torch.ones(1, dtype=torch.long, device=features.device)
            extra = self.text.token_type_embeddings(segment).view(1, 1, -1)
        embeddings, _ = self.regions(features, boxes, region_mask, extra=extra)
        return embeddings

    def _visual_bert_embeddings(self, input_ids, token_type_ids, features, tag_boxes):
        if tag_boxes is not None:
            raise ValueError("embedding_style: visual_bert has no box embedding, so it cannot embed R-T tag sequences; "
                             "use embedding_style paper or released")
        emb = self.text.embeddings
        length = input_ids.size(1)
        positions = torch.arange(length, device=input_ids.device).unsqueeze(0)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        text = emb.word_embeddings(input_ids) + emb.position_embeddings(positions) + emb.token_type_embeddings(token_type_ids)
        visual = self.regions.proj(features.to(self.regions.proj.weight.dtype))
        visual = visual + self.visual_token_type.weight[1] + self.visual_position.weight[0]
        return emb.dropout(emb.LayerNorm(torch.cat([text, visual.to(text.dtype)], dim=1)))

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.Tensor,
        text_mask: torch.Tensor,
        features: torch.Tensor,
        boxes: torch.Tensor,
        region_mask: torch.Tensor,
        token_type_ids: Optional[torch.Tensor] = None,
        tag_boxes: Optional[torch.Tensor] = None,
    ) -> Dict[str, torch.Tensor]:
        """``input_ids (B, T)``, ``text_mask (B, T)``, ``features (B, N, D)``, normalised 5-d ``boxes
        (B, N, 5)``, ``region_mask (B, N)``; ``tag_boxes (B, T, 5)`` switches the text side to the R-T
        tag-sequence embedding. Returns ``sequence (B, T + N, H)``, ``text`` / ``regions`` (its two
        parts) and ``pooled`` (the BERT pooler on [CLS])."""
        if input_ids.shape != text_mask.shape:
            raise ValueError(f"input_ids {tuple(input_ids.shape)} and their mask {tuple(text_mask.shape)} differ")
        if self.embedding_style == "visual_bert":
            hidden = self._visual_bert_embeddings(input_ids, token_type_ids, features, tag_boxes)
        else:
            if tag_boxes is not None:
                text = self.embed_tags(input_ids, tag_boxes)
            else:
                text = self.embed_text(input_ids, token_type_ids)
            visual = self.embed_regions(features, boxes, region_mask)
            hidden = torch.cat([text, visual.to(text.dtype)], dim=1)
        mask = torch.cat([text_mask.long(), region_mask.long()], dim=1)
        sequence = self.text.encode(hidden, attention_mask=mask)
        length = input_ids.size(1)
        return {
            "sequence": sequence,
            "text": sequence[:, :length],
            "regions": sequence[:, length:],
            "pooled": self.text.pool(sequence, 0),
        }


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


# ====================================================================================== checkpoints
#: source names of VisualBERT's visual embedding in MMF (``visual_bert``) and HF (``VisualBertModel``)
_VISUAL_KEYS = {
    "mmf": {"projection": "regions.proj", "token_type_embeddings_visual": "visual_token_type",
            "position_embeddings_visual": "visual_position"},
    "hf": {"visual_projection": "regions.proj", "visual_token_type_embeddings": "visual_token_type",
           "visual_position_embeddings": "visual_position"},
}


def convert_visual_bert_state(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """A VisualBERT state dict -> :class:`MuVLANetwork` (``embedding_style: visual_bert``) keys.

    Reads MMF ``visual_bert`` checkpoints (``model.bert.*``, any outer prefix) and HF transformers'
    ``VisualBertModel`` / ``VisualBertFor*`` ones (``[visual_bert.]embeddings.visual_projection``,
    ...). Heads and buffers are left out; the text embeddings, encoder layers and pooler keep BERT's names.
    """
    anchor = "embeddings.word_embeddings.weight"
    prefixes = [k[: -len(anchor)] for k in state if k.endswith(anchor)]
    if len(prefixes) != 1:
        raise KeyError(f"not a VisualBERT state dict: expected one '*{anchor}' entry, found {len(prefixes)}")
    prefix = prefixes[0]
    source = "hf" if f"{prefix}embeddings.visual_projection.weight" in state else "mmf"
    if f"{prefix}embeddings.{next(iter(_VISUAL_KEYS[source]))}.weight" not in state:
        raise KeyError(f"no VisualBERT visual embedding under '{prefix}embeddings.' (expected MMF's 'projection' or "
                       "HF's 'visual_projection')")
    out = {}
    for key, value in state.items():
        if not key.startswith(prefix) or key.endswith(("position_ids", "token_type_ids")):
            continue
        name = key[len(prefix):]
        part, _, rest = name.partition(".")
        if part == "embeddings":
            module, _, leaf = rest.partition(".")
            if module in _VISUAL_KEYS[source]:
                out[f"{_VISUAL_KEYS[source][module]}.{leaf}"] = value
            else:
                out[f"text.bert.{name}"] = value
        elif part in ("encoder", "pooler"):
            out[f"text.bert.{name}"] = value
    return out


def load_visual_bert(network: "MuVLANetwork", state: Dict[str, torch.Tensor]) -> None:
    """Load a VisualBERT state dict (MMF or HF, see :func:`convert_visual_bert_state`) into ``network``."""
    if network.embedding_style != "visual_bert":
        raise ValueError("VisualBERT weights need embedding_style: visual_bert (its visual embedding has no box input)")
    converted = convert_visual_bert_state(state)
    own = network.state_dict()
    for key, value in converted.items():
        if key not in own:
            raise KeyError(f"VisualBERT entry {key!r} has no place in this network")
        if own[key].shape != value.shape:
            raise ValueError(f"{key}: checkpoint shape {tuple(value.shape)} != network {tuple(own[key].shape)} "
                             "(hidden size, vocabulary, layers or feature_dim differ)")
    # tag_norm belongs to the R-T tag path, which VisualBERT does not have (it keeps its initialisation)
    missing = [k for k in own if k not in converted and not k.endswith(("position_ids", "token_type_ids"))
               and not k.startswith("tag_norm.")]
    if missing:
        raise KeyError(f"the VisualBERT checkpoint lacks {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    network.load_state_dict(converted, strict=False)


def read_visual_bert_checkpoint(path: str) -> Dict[str, torch.Tensor]:
    """State dict of an MMF checkpoint file (``.pth`` / ``.ckpt``, optionally under ``model``) or of an HF
    ``save_pretrained`` folder (``VisualBertModel``)."""
    if os.path.isdir(path):
        from transformers import VisualBertModel

        from mmf_multilevel.modules.text import load_pretrained

        return load_pretrained(VisualBertModel, path).state_dict()
    if not os.path.isfile(path):
        raise FileNotFoundError(f"VisualBERT checkpoint not found: {path} (model_config.muvla.visual_bert_checkpoint)")
    from mmf_multilevel.zoo.zoo import load_checkpoint

    state = load_checkpoint(path)  # weights only; a legacy pickle needs MMF_ZOO_ALLOW_PICKLE=1
    return state.get("model", state) if isinstance(state, dict) else state


# ====================================================================================== losses
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


# ====================================================================================== MMF adapter
try:  # the plain networks above work without MMF; the adapter below needs it
    from mmf.models.base_model import BaseModel
except ImportError:  # pragma: no cover - exercised only without MMF
    BaseModel = MMFMissingBaseModel

HEAD_TYPES = ("pretraining", "classification", "nlvr2", "refcoco")
POOLINGS = ("last_text", "cls")


@register_model("muvla")
class MuVLA(BaseModel):
    """The registered MMF model ``muvla`` (see the module docstring and its ``defaults.yaml``)."""

    def __init__(self, config, *args, **kwargs):
        super().__init__(config)
        self.config = config

    @classmethod
    def config_path(cls):
        return model_config_path("muvla")

    # ------------------------------------------------------------------ build
    def build(self):
        config = self.config
        self.head_type = head_type_of(config, "muvla", HEAD_TYPES)
        name = config.get("bert_model_name")
        text = text_encoder_from(config)
        self.backbone = MuVLANetwork(text, int(_get(config, "feature_dim", 2048)),
                                     str(_get(config, "embedding_style", "paper")))
        checkpoint = config.get("visual_bert_checkpoint")
        if checkpoint:
            load_visual_bert(self.backbone, read_visual_bert_checkpoint(str(checkpoint)))
        hidden, bert = self.backbone.hidden_size, self.backbone.config
        if self.head_type == "pretraining":
            pre = _get(config, "pretraining", {})
            self.heads = MuVLAPretrainingHeads(self.backbone, int(_get(pre, "num_tags", 1600)))
            if name and bool(_get(pre, "init_heads_from_bert", True)):
                self.heads.load_bert_heads(bert_pretraining_head_state(str(name)))
            self.mrm_normalization = str(_get(pre, "mrm_normalization", "masked"))
            self.feature_loss = str(_get(pre, "feature_loss", "mse"))
            self.itm_weighting = str(_get(pre, "itm_weighting", "per_pair"))
            self.itm_weight_source = str(_get(pre, "itm_weight_source", "masked"))
            if self.itm_weighting not in ITM_WEIGHTINGS:
                raise ValueError(f"model_config.muvla.pretraining.itm_weighting must be one of {list(ITM_WEIGHTINGS)}, "
                                 f"got {self.itm_weighting!r}")
            if self.itm_weight_source not in ("masked", "clean"):
                raise ValueError("model_config.muvla.pretraining.itm_weight_source must be 'masked' or 'clean', "
                                 f"got {self.itm_weight_source!r}")
            start_update = pre.get("itm_weight_start_update") if hasattr(pre, "get") else None
            self.itm_weight_start_update = None if start_update is None else int(start_update)
            self.itm_weight_start_epoch = int(_get(pre, "itm_weight_start_epoch", 1))
            default_task = pre.get("default_task") if hasattr(pre, "get") else None
            if default_task is not None and default_task not in TASKS:
                raise ValueError(f"model_config.muvla.pretraining.default_task must be one of {list(TASKS)} or null, "
                                 f"got {default_task!r}")
            self.default_task = default_task
            self.extra_losses = {
                "region_phrase": {"use_mrfr": bool(_get(pre, "rp_mrfr", False))},
                "image_sentence": {"use_mrc": bool(_get(pre, "is_mrm", False)), "use_mrfr": bool(_get(pre, "is_mrm", False))},
                "region_tag": {},
                "text": {},
            }
            # forward passes in training (a buffer: saved in checkpoints, so a resumed run keeps its place)
            self.register_buffer("train_steps", torch.zeros((), dtype=torch.long))
        elif self.head_type == "classification":
            self.pooling = str(_get(config, "pooling", "last_text"))
            if self.pooling not in POOLINGS:
                raise ValueError(f"model_config.muvla.pooling must be one of {list(POOLINGS)}, got {self.pooling!r}")
            num_labels = config.get("num_labels")
            if num_labels is None:
                raise ValueError("model_config.muvla.num_labels must be set for training_head_type: classification "
                                 "(the answer vocabulary's size for VQA, 3 for SNLI-VE)")
            self.classifier = VQAHead(hidden, int(num_labels), intermediate_size=hidden,
                                      dropout=float(_get(config, "classifier_dropout", bert.hidden_dropout_prob)),
                                      layer_norm_eps=bert.layer_norm_eps, initializer_range=bert.initializer_range)
        elif self.head_type == "nlvr2":
            self.classifier = NLVR2PairedHead(hidden, 2, dropout=bert.hidden_dropout_prob, layer_norm_eps=bert.layer_norm_eps)
        else:
            self.classifier = RegionScoringHead(hidden, bert.layer_norm_eps)
        released = config.get("released_checkpoint")
        if released:
            self._load_released(str(released))

    def _load_released(self, path: str) -> None:
        """The official μ-VLA (UVLP) checkpoint at ``path``, or its weights-only conversion: backbone,
        plus the pre-training heads when this model has them (see :mod:`mmf_multilevel.zoo.converters`)."""
        from mmf_multilevel.zoo.converters import convert_uvlp_state, load_converted, read_state

        if self.backbone.embedding_style != "released":
            raise ValueError("model_config.muvla.released_checkpoint needs embedding_style: released (the official "
                             f"code's embedding), got {self.backbone.embedding_style!r}")
        state = read_state(path)
        if any(k.startswith("backbone.") for k in state):  # already converted (python -m mmf_multilevel.zoo.converters)
            converted = state
        else:
            converted, _ = convert_uvlp_state(state)
        if self.head_type != "pretraining":
            converted = {k: v for k, v in converted.items() if not k.startswith("heads.")}
        elif self.heads.mrc is None:  # num_tags: 0 builds no region-class head
            converted = {k: v for k, v in converted.items() if not k.startswith("heads.mrc.")}
        left = load_converted(self, converted, f"model_config.muvla.released_checkpoint={path}")
        missing = [k for k in left if k.startswith("backbone.") and not k.endswith(("position_ids", "token_type_ids"))]
        if missing:
            raise KeyError(f"{path} lacks backbone entries {missing[:5]}{' ...' if len(missing) > 5 else ''}")

    # ------------------------------------------------------------------ inputs
    def _regions(self, features, info):
        return sample_regions(features, info, self.backbone.feature_dim, "5d", "muvla")

    @staticmethod
    def _text(sample_list):
        return sample_text(sample_list, "muvla")

    def _encode(self, sample_list, features, info, text=None):
        input_ids, mask, segment = text if text is not None else self._text(sample_list)
        features, boxes, region_mask = self._regions(features, info)
        out = self.backbone(input_ids, mask, features, boxes, region_mask, segment)
        out["text_mask"], out["region_mask"] = mask, region_mask
        return out

    # ------------------------------------------------------------------ forward
    def forward(self, sample_list):
        if self.head_type == "pretraining":
            return self._pretraining_forward(sample_list)
        if self.head_type == "nlvr2":
            for side in ("img0", "img1"):
                if side not in sample_list:
                    raise KeyError(f"training_head_type: nlvr2 needs the paired layout ('{side}' missing): set "
                                   "dataset_config.nlvr2.input_layout: paired")
            text = self._text(sample_list)
            pooled = [self._encode(sample_list, sample_list[s]["image_feature_0"], sample_list[s]["image_info_0"], text)["pooled"]
                      for s in ("img0", "img1")]
            return {"scores": self.classifier(*pooled)}
        out = self._encode(sample_list, sample_list.get("image_feature_0"), sample_list.get("image_info_0"))
        if self.head_type == "refcoco":
            return {"scores": self.classifier(out["regions"], out["region_mask"])}
        if self.pooling == "cls":
            pooled = out["pooled"]
        else:  # the last text token before [SEP] (the official VQA pooling)
            last = (out["text_mask"].long().sum(1) - 2).clamp(min=0)
            pooled = out["text"][torch.arange(last.size(0), device=last.device), last]
        return {"scores": self.classifier(pooled)}

    # ------------------------------------------------------------------ pre-training
    def itm_weighting_active(self) -> bool:
        """Whether the ITM re-weighting is on for this batch: from ``itm_weight_start_update`` optimizer
        updates when set, else after ``itm_weight_start_epoch`` MMF epochs (m = 1: from epoch 2)."""
        if self.itm_weighting == "off" or not self.training:
            return False
        if self.itm_weight_start_update is not None:
            return int(self.train_steps.item()) // training_setting("update_frequency", 1) >= self.itm_weight_start_update
        epoch = registry_value("current_epoch")
        return epoch is not None and int(epoch) > self.itm_weight_start_epoch

    def _task_of(self, sample_list) -> str:
        if "muvla_task" not in sample_list:
            if self.default_task is not None:
                return self.default_task
            raise KeyError("training_head_type: pretraining needs a μ-VLA pre-training dataset (muvla_region_tag, "
                           "muvla_region_phrase, muvla_image_sentence, ...): the batch has no 'muvla_task' field")
        ids = sample_list["muvla_task"].view(-1)
        if (ids != ids[0]).any():
            raise ValueError("a pre-training batch mixes μ-VLA tasks; each batch must come from one dataset")
        index = int(ids[0])
        if not 0 <= index < len(TASKS):
            raise ValueError(f"muvla_task {index} is not one of {TASK_IDS}")
        return TASKS[index]

    def _pretraining_forward(self, sample_list):
        task = self._task_of(sample_list)
        if self.training:
            self.train_steps += 1
        input_ids, text_mask, segment = self._text(sample_list)
        if task == "text":  # unpaired text: no region positions at all
            batch = input_ids.size(0)
            features = input_ids.new_zeros((batch, 0, self.backbone.feature_dim), dtype=torch.float32)
            boxes = features.new_zeros((batch, 0, 5))
            region_mask = input_ids.new_zeros((batch, 0))
        else:
            features, boxes, region_mask = self._regions(sample_list.get("image_feature_0"), sample_list.get("image_info_0"))
        selected = sample_list["region_selected"].bool() if "region_selected" in sample_list else None
        masked_features = features
        if "region_zeroed" in sample_list:
            masked_features = features.masked_fill(sample_list["region_zeroed"].bool().unsqueeze(-1), 0.0)
        tag_boxes = sample_list["tag_boxes"].float() if "tag_boxes" in sample_list else None
        out = self.backbone(input_ids, text_mask, masked_features, boxes, region_mask, segment, tag_boxes=tag_boxes)
        mlm_labels = sample_list["lm_label_ids"] if "lm_label_ids" in sample_list else None
        itm_labels = sample_list["is_correct"].long() if "is_correct" in sample_list else None
        if "muvla_task" not in sample_list and mlm_labels is not None and itm_labels is not None:
            # a paired caption dataset masks every caption: MLM only where the caption is the image's own
            mlm_labels = mlm_labels.masked_fill((itm_labels == 0).unsqueeze(1).to(mlm_labels.device), IGNORE_INDEX)
        weights = None
        if self.itm_weighting_active() and task != "text" and (task != "region_tag" or self.itm_weighting == "batch_mean"):
            if self.itm_weight_source == "clean":
                with torch.no_grad():
                    clean_ids = input_ids
                    if mlm_labels is not None:
                        clean_ids = torch.where(mlm_labels >= 0, mlm_labels.long(), input_ids)
                    clean = self.backbone(clean_ids, text_mask, features, boxes, region_mask, segment, tag_boxes=tag_boxes)
                    logits = self.heads.itm(clean["pooled"])
            else:
                logits = self.heads.itm(out["pooled"])
            weights = itm_pair_weights(logits, itm_labels)
        losses = pretraining_losses(
            self.heads, out, task,
            mlm_labels=mlm_labels,
            region_selected=selected,
            region_targets=features,
            mrc_labels=sample_list["mrc_labels"] if "mrc_labels" in sample_list else None,
            mrtc_labels=sample_list["mrtc_labels"] if "mrtc_labels" in sample_list else None,
            itm_labels=itm_labels,
            itm_weights=weights,
            itm_weighting=self.itm_weighting,
            mrm_normalization=self.mrm_normalization,
            feature_loss=self.feature_loss,
            **self.extra_losses[task],
        )
        if not losses:
            raise ValueError(f"the {task} batch of {sample_list.dataset_name} carries no pre-training target "
                             "(lm_label_ids, region_selected, mrtc_labels or is_correct)")
        prefix = f"{sample_list.dataset_type}/{sample_list.dataset_name}"
        output = {"losses": {f"{prefix}/{name}": value for name, value in losses.items()}}
        if itm_labels is not None:
            output["scores"] = self.heads.itm(out["pooled"])
        return output
