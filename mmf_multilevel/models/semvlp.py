"""SemVLP: one shared transformer pre-trained in single-stream and two-stream modes.

The network (:class:`SemVLPNetwork`, a plain ``nn.Module``) holds one stack of ``L`` BERT blocks
(self-attention + FFN). Both ways of running it use these same module instances:

* **single-stream**: ``[IMG] o_1 .. o_N [CLS] w_1 .. [SEP]`` (objects first, then text, as the paper
  writes ``S^0 = {o', e}``) goes through the ``L`` blocks with full attention;
* **two-stream**: the text goes through the ``L`` blocks alone, giving ``H^L``; the objects go
  through the same ``L`` blocks alone, and in blocks ``l > L_s`` (``cross_layer_start``) an extra
  cross-attention module attends from the object states to the text's **last-layer** states ``H^L``
  (text -> image only). Those cross-attention modules are the only mode-specific parameters.

Objects are ``Linear([f ; x1/W, y1/H, x2/W, y2/H])`` (2048 + 4 -> H), a learned ``[IMG]`` vector
prepended, then LayerNorm and dropout (:class:`~mmf_multilevel.modules.visual.RegionEmbedding`,
``style="concat"``). The summary token read by ITM / QA / the task heads is ``h_CLS`` in
single-stream mode (sequence index ``1 + N``, not 0) and ``o_IMG`` in two-stream mode, both through
one shared BERT pooler (dense + tanh).

Parameter counts at BERT-base size (``python -m mmf_multilevel.models.semvlp --counts``):
the network used by the single-stream mode has 111,061,248 parameters (BERT-base 109,482,240 with its
pooler + the 2,052 -> 768 object projection, its LayerNorm and [IMG]: the paper's "110M"); each
cross-attention module adds 2,363,904, so the two-stream mode with the modules of blocks 7-12 only
(``cross_attention_layers: upper``, the default) has 125,244,672 and with a module in all 12 blocks
(``cross_attention_layers: all``; only those above ``L_s`` are run) 139,428,096 (the paper's "140M").

The registered MMF model ``semvlp`` (:class:`SemVLP`) turns a SampleList into tensors and back:

* ``training_head_type: pretraining`` - MLM, masked object prediction (feature regression + detected
  label), ITM and image QA with equal weights; each training mini-batch runs one mode, picked by
  ``mode_schedule`` (``random`` with ``single_stream_ratio``, ``alternate``, ``single``, ``two``) from
  the optimizer-update count, so every rank and a resumed run pick the same modes. Losses are named
  ``<split>/<dataset>/<mode>/<loss>`` so the log shows each mode's losses.
* ``classification`` (VQA, GQA, SNLI-VE), ``nlvr2`` (paired head) and ``retrieval`` (the ITM head's
  2-way scores): the fine-tuning mode is ``mode: single | two``.
"""
import argparse
import math
import random
from fractions import Fraction
from typing import Dict, Iterable, List, Optional

import torch
from torch import nn
from transformers import BertConfig
from transformers.models.bert.modeling_bert import BertAttention

from mmf_multilevel.models.common import (
    MMFMissingBaseModel, bert_config_from, head_type_of, model_config_path, register_model, registry_value, sample_regions,
    sample_text, text_encoder_from, training_setting,
)
from mmf_multilevel.models.common import config_get as _get
from mmf_multilevel.modules.attention import use_fast_attention
from mmf_multilevel.modules.heads import (
    ITMHead,
    MLMHead,
    RegionClassificationHead,
    RegionFeatureRegressionHead,
    VQAHead,
    bert_pretraining_head_state,
    init_bert_weights,
    itm_loss,
    mlm_loss,
    region_classification_loss,
    region_feature_regression_loss,
    vqa_loss,
)
from mmf_multilevel.modules.masking import IGNORE_INDEX, mask_regions, mask_tokens
from mmf_multilevel.modules.task_heads import NLVR2PairedHead
from mmf_multilevel.modules.text import BertTextEncoder, extended_attention_mask, mask_compute_dtype
from mmf_multilevel.modules.visual import RegionEmbedding

__all__ = [
    "MODES",
    "SINGLE",
    "TWO",
    "SemVLPNetwork",
    "SemVLPPretrainingHeads",
    "ModeSchedule",
    "pretraining_losses",
    "bert_config_from",
    "SemVLP",
]

SINGLE, TWO = "single", "two"
MODES = (SINGLE, TWO)
CROSS_LAYOUTS = ("upper", "all")
BOX_DIM = 4  # (x1/W, y1/H, x2/W, y2/H)

def _check_mode(mode: str, key: str = "mode") -> str:
    if mode not in MODES:
        raise ValueError(f"{key} must be one of {list(MODES)}, got {mode!r}")
    return mode


# ================================================================================== the network
class SemVLPNetwork(nn.Module):
    """Embeddings, the shared block stack, the cross-attention modules and the summary pooler.

    ``text``: a :class:`BertTextEncoder` (with its pooler); its ``layers`` are the shared blocks,
    used by both modes and both streams. ``cross_layer_start`` is ``L_s``: blocks with 1-based index
    ``l > L_s`` (0-based ``i >= L_s``) get text -> image cross-attention in two-stream mode.
    ``cross_attention_layers``: ``"upper"`` builds modules only for those blocks, ``"all"`` one per block
    (the paper's 140M; ``L_s`` can then change at run time without new parameters).
    """

    def __init__(
        self,
        text: BertTextEncoder,
        feature_dim: int = 2048,
        cross_layer_start: int = 6,
        cross_attention_layers: str = "upper",
    ):
        super().__init__()
        if text.pooler is None:
            raise ValueError("SemVLPNetwork needs a BertTextEncoder built with its pooler (add_pooling_layer=True)")
        config = text.config
        num_layers = config.num_hidden_layers
        if cross_attention_layers not in CROSS_LAYOUTS:
            raise ValueError(f"cross_attention_layers must be one of {list(CROSS_LAYOUTS)}, got {cross_attention_layers!r}")
        if not 0 <= int(cross_layer_start) <= num_layers:
            raise ValueError(f"cross_layer_start (L_s) must lie in [0, {num_layers}] (num_hidden_layers), got {cross_layer_start}")
        self.text = text
        self.num_layers = num_layers
        self.cross_attention_layers = cross_attention_layers
        self._cross_layer_start = int(cross_layer_start)
        self.objects = RegionEmbedding(
            feature_dim=feature_dim,
            hidden_size=config.hidden_size,
            box_dim=BOX_DIM,
            style="concat",
            dropout=config.hidden_dropout_prob,
            layer_norm=True,
            img_token=True,
            layer_norm_eps=config.layer_norm_eps,
            initializer_range=config.initializer_range,
        )
        first = 0 if cross_attention_layers == "all" else self._cross_layer_start
        # key = 0-based block index; BertAttention fed encoder_hidden_states = multi-head cross-attention
        # with its own output dense + residual + LayerNorm (LXMERT's cross-attention layer)
        self.cross_attention = nn.ModuleDict({str(i): BertAttention(config) for i in range(first, num_layers)})
        init_bert_weights(self.cross_attention, config.initializer_range)
        use_fast_attention(self.cross_attention)

    # ------------------------------------------------------------------ structure
    @property
    def config(self) -> BertConfig:
        return self.text.config

    @property
    def hidden_size(self) -> int:
        return self.text.hidden_size

    @property
    def feature_dim(self) -> int:
        return self.objects.feature_dim

    @property
    def blocks(self) -> nn.ModuleList:
        """The ``L`` shared blocks (``BertLayer``: ``attention`` = φ_S, ``intermediate``/``output`` = φ_F)."""
        return self.text.layers

    @property
    def cross_layer_start(self) -> int:
        return self._cross_layer_start

    @cross_layer_start.setter
    def cross_layer_start(self, value: int) -> None:
        value = int(value)
        if not 0 <= value <= self.num_layers:
            raise ValueError(f"cross_layer_start (L_s) must lie in [0, {self.num_layers}], got {value}")
        missing = [i for i in range(value, self.num_layers) if str(i) not in self.cross_attention]
        if missing:
            raise ValueError(
                f"L_s={value} needs cross-attention in blocks {[i + 1 for i in missing]}, which this network was built "
                "without; build it with cross_attention_layers='all' to change L_s after construction"
            )
        self._cross_layer_start = value

    def cross_module(self, index: int) -> Optional[nn.Module]:
        """φ_C of 0-based block ``index`` when two-stream mode uses one there, else None."""
        if index < self._cross_layer_start:
            return None
        return self.cross_attention[str(index)]

    def mode_parameters(self, mode: str) -> List[nn.Parameter]:
        """The parameters a forward pass in ``mode`` uses (each once)."""
        _check_mode(mode)
        unused = set()
        for key, module in self.cross_attention.items():
            if mode == SINGLE or int(key) < self._cross_layer_start:
                unused.update(id(p) for p in module.parameters())
        return [p for p in self.parameters() if id(p) not in unused]

    def num_parameters(self, mode: str) -> int:
        return sum(p.numel() for p in self.mode_parameters(mode))

    # ------------------------------------------------------------------ inputs
    def embed_text(self, input_ids: torch.Tensor, segment_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """BERT word + segment + position embeddings (positions count from the text's [CLS])."""
        return self.text.embed(input_ids, token_type_ids=segment_ids)

    def embed_objects(self, features: torch.Tensor, boxes: torch.Tensor, region_mask: Optional[torch.Tensor] = None):
        """``(B, N, D)`` features + ``(B, N, 4)`` normalised boxes -> ``(B, 1 + N, H)`` with [IMG] first, and its mask."""
        return self.objects(features, boxes, region_mask)

    # ------------------------------------------------------------------ blocks
    def run_block(
        self,
        index: int,
        hidden: torch.Tensor,
        extended_mask: torch.Tensor,
        memory: Optional[torch.Tensor] = None,
        memory_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Shared block ``index``: φ_F(φ_S(x)), or φ_F(φ_C(φ_S(x), memory)) when ``memory`` is given."""
        block = self.blocks[index]
        attended = block.attention(hidden, attention_mask=extended_mask)[0]
        if memory is not None:
            cross = self.cross_module(index)
            if cross is None:
                raise RuntimeError(f"block {index + 1} has no cross-attention (L_s = {self._cross_layer_start})")
            attended = cross(attended, attention_mask=memory_mask, encoder_hidden_states=memory)[0]
        return block.output(block.intermediate(attended), attended)

    def _stack(self, hidden, mask, memory=None, memory_mask=None, output_hidden_states=False):
        dtype = mask_compute_dtype(hidden)
        extended = extended_attention_mask(mask, dtype)
        memory_extended = extended_attention_mask(memory_mask, dtype) if memory is not None else None
        states = [hidden] if output_hidden_states else None
        for index in range(self.num_layers):
            use_memory = memory is not None and index >= self._cross_layer_start
            hidden = self.run_block(
                index, hidden, extended, memory if use_memory else None, memory_extended if use_memory else None
            )
            if output_hidden_states:
                states.append(hidden)
        return hidden, states

    # ------------------------------------------------------------------ modes
    def single_stream(self, text_embeddings, text_mask, object_embeddings, object_mask, output_hidden_states=False):
        """``[objects ; text]`` through the shared blocks. Returns ``objects (B, 1+N, H)``, ``text (B, T, H)``."""
        num_objects = object_embeddings.size(1)
        hidden = torch.cat([object_embeddings, text_embeddings], dim=1)
        mask = torch.cat([object_mask.long(), text_mask.long()], dim=1)
        hidden, states = self._stack(hidden, mask, output_hidden_states=output_hidden_states)
        out = {"objects": hidden[:, :num_objects], "text": hidden[:, num_objects:], "sequence": hidden,
               "summary_index": num_objects}
        if output_hidden_states:
            out["hidden_states"] = states
        return out

    def two_stream(self, text_embeddings, text_mask, object_embeddings, object_mask, output_hidden_states=False):
        """Text alone through the shared blocks (H^L), then objects through the same blocks with
        cross-attention to H^L in blocks above L_s."""
        text, text_states = self._stack(text_embeddings, text_mask.long(), output_hidden_states=output_hidden_states)
        objects, object_states = self._stack(
            object_embeddings, object_mask.long(), memory=text, memory_mask=text_mask.long(),
            output_hidden_states=output_hidden_states,
        )
        out = {"objects": objects, "text": text, "summary_index": 0}
        if output_hidden_states:
            out["text_hidden_states"], out["object_hidden_states"] = text_states, object_states
        return out

    def pool(self, summary: torch.Tensor) -> torch.Tensor:
        pooler = self.text.pooler
        return pooler.activation(pooler.dense(summary))

    def forward(
        self,
        input_ids: torch.Tensor,
        text_mask: torch.Tensor,
        features: torch.Tensor,
        boxes: torch.Tensor,
        region_mask: Optional[torch.Tensor] = None,
        segment_ids: Optional[torch.Tensor] = None,
        mode: str = SINGLE,
        output_hidden_states: bool = False,
    ) -> Dict[str, torch.Tensor]:
        """Run one mode. Returns ``text (B, T, H)``, ``objects (B, 1+N, H)`` ([IMG] at 0), ``object_mask
        (B, 1+N)``, ``summary`` (h_CLS single / o_IMG two, ``(B, H)``) and ``pooled`` (pooler(summary))."""
        _check_mode(mode)
        text_embeddings = self.embed_text(input_ids, segment_ids)
        object_embeddings, object_mask = self.embed_objects(features, boxes, region_mask)
        run = self.single_stream if mode == SINGLE else self.two_stream
        out = run(text_embeddings, text_mask, object_embeddings, object_mask, output_hidden_states)
        out["summary"] = out["text"][:, 0] if mode == SINGLE else out["objects"][:, 0]
        out["pooled"] = self.pool(out["summary"])
        out["object_mask"] = object_mask
        out["mode"] = mode
        return out


# ================================================================================== pre-training
class SemVLPPretrainingHeads(nn.Module):
    """MLM (decoder tied to the word embeddings), masked-object feature regression and detected-label
    classification (LXMERT's transform + linear), ITM on the pooled summary, and optionally image QA."""

    def __init__(self, network: SemVLPNetwork, num_object_labels: int, num_qa_answers: int = 0):
        super().__init__()
        config = network.config
        hidden = config.hidden_size
        self.mlm = MLMHead.from_config(config).tie_to(network.text.word_embeddings)
        self.object_feature = RegionFeatureRegressionHead(hidden, network.feature_dim, hidden_act=config.hidden_act,
                                                          layer_norm_eps=config.layer_norm_eps,
                                                          initializer_range=config.initializer_range)
        self.num_object_labels = int(num_object_labels)
        self.object_label = (
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
    * ``object_feature`` / ``object_label``: regression of the original features ``object_targets
      (B, N, D)`` and CE against the detector's ``object_labels (B, N)`` at ``object_selected`` objects
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
            predictions = heads.object_feature(objects)
            losses["object_feature"] = region_feature_regression_loss(predictions, object_targets, selected, kind=feature_loss)
        if object_labels is not None and heads.object_label is not None:
            logits = heads.object_label(objects)
            bad = selected & ((object_labels < 0) | (object_labels >= heads.num_object_labels))
            if bad.any():
                raise ValueError(
                    f"masked objects have detector labels outside [0, {heads.num_object_labels}) "
                    f"({sorted(set(object_labels[bad].tolist()))[:5]}); set model_config.semvlp.num_object_labels to the "
                    "detector's number of classes"
                )
            losses["object_label"] = region_classification_loss(logits, object_labels, selected)
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


# ================================================================================== MMF adapter
try:  # the plain networks above work without MMF; the adapter below needs it
    from mmf.models.base_model import BaseModel
except ImportError:  # pragma: no cover - exercised only without MMF
    BaseModel = MMFMissingBaseModel

HEAD_TYPES = ("pretraining", "classification", "nlvr2", "retrieval")


@register_model("semvlp")
class SemVLP(BaseModel):
    """The registered MMF model ``semvlp`` (see the module docstring and its ``defaults.yaml``)."""

    def __init__(self, config, *args, **kwargs):
        super().__init__(config)
        self.config = config

    @classmethod
    def config_path(cls):
        return model_config_path("semvlp")

    # ------------------------------------------------------------------ build
    def build(self):
        config = self.config
        self.head_type = head_type_of(config, "semvlp", HEAD_TYPES)
        self.mode = _check_mode(str(_get(config, "mode", SINGLE)), "model_config.semvlp.mode")
        name = config.get("bert_model_name")
        text = text_encoder_from(config)
        self.semvlp = SemVLPNetwork(
            text,
            feature_dim=int(_get(config, "feature_dim", 2048)),
            cross_layer_start=int(_get(config, "cross_layer_start", 6)),
            cross_attention_layers=str(_get(config, "cross_attention_layers", "upper")),
        )
        hidden = self.semvlp.hidden_size
        bert = self.semvlp.config
        writer = registry_value("writer")
        if writer is not None:
            writer.write(
                f"semvlp network parameters: single-stream mode {self.semvlp.num_parameters(SINGLE):,}, two-stream mode "
                f"{self.semvlp.num_parameters(TWO):,} (L_s = {self.semvlp.cross_layer_start}, cross_attention_layers: "
                f"{self.semvlp.cross_attention_layers}, stored {sum(p.numel() for p in self.semvlp.parameters()):,})"
            )
        pretraining = _get(config, "pretraining", {})
        if self.head_type == "pretraining":
            self.schedule = ModeSchedule(
                str(_get(config, "mode_schedule", "random")), float(_get(config, "single_stream_ratio", 0.5)),
                int(_get(config, "schedule_seed", 0)),
            )
            self.heads = SemVLPPretrainingHeads(
                self.semvlp, int(_get(pretraining, "num_object_labels", 1600)), int(_get(pretraining, "num_qa_answers", 0))
            )
            if name and bool(_get(pretraining, "init_mlm_from_bert", True)):
                self.heads.mlm.load_bert_state_dict(bert_pretraining_head_state(str(name)))
            self.mlm_probability = float(_get(pretraining, "mlm_probability", 0.15))
            self.object_mask_probability = float(_get(pretraining, "object_mask_probability", 0.15))
            self.object_zero_ratio = float(_get(pretraining, "object_zero_ratio", 1.0))
            self.object_random_ratio = float(_get(pretraining, "object_random_ratio", 0.0))
            self.feature_loss = str(_get(pretraining, "feature_loss", "mse"))
            self.mask_token_id = int(_get(pretraining, "mask_token_id", 103))
            self.special_token_ids = [int(i) for i in _get(pretraining, "special_token_ids", [101, 102])]
            # update counter (a buffer: saved in checkpoints, so a resumed run continues the schedule)
            self.register_buffer("schedule_step", torch.zeros((), dtype=torch.long))
            self.mode_counts = {SINGLE: 0, TWO: 0}
        elif self.head_type == "classification":
            num_labels = self._num_labels()
            self.classifier = VQAHead(hidden, num_labels, dropout=bert.hidden_dropout_prob,
                                      layer_norm_eps=bert.layer_norm_eps, initializer_range=bert.initializer_range)
        elif self.head_type == "nlvr2":
            self.classifier = NLVR2PairedHead(hidden, 2, dropout=bert.hidden_dropout_prob, layer_norm_eps=bert.layer_norm_eps)
        else:  # retrieval: the pre-training ITM head, so a pre-trained checkpoint brings its matching head
            self.itm_head = ITMHead(hidden, 2, dropout=bert.hidden_dropout_prob, initializer_range=bert.initializer_range)

    def _num_labels(self) -> int:
        value = self.config.get("num_labels")
        if value is None:
            raise ValueError("model_config.semvlp.num_labels must be set for training_head_type: classification "
                             "(the answer vocabulary's / label set's size)")
        return int(value)

    def update_frequency(self) -> int:
        return training_setting("update_frequency", 1)

    def _log_mode(self, mode: str, micro_step: int) -> None:
        """Every ``training.log_interval`` updates, write the schedule's tally to MMF's log."""
        frequency = self.update_frequency()
        if (micro_step + 1) % frequency:
            return
        update = (micro_step + 1) // frequency
        if update % training_setting("log_interval", 100):
            return
        writer = registry_value("writer")
        message = (
            f"semvlp modes: update {update} ran {mode}-stream; updates so far: single {self.mode_counts[SINGLE] // frequency}, "
            f"two {self.mode_counts[TWO] // frequency} (mode_schedule: {self.schedule.kind})"
        )
        if writer is not None:
            writer.write(message)

    def next_mode(self) -> str:
        """The mode of this training forward: the schedule at the current optimizer-update index."""
        step = int(self.schedule_step.item()) // self.update_frequency()
        return self.schedule(step)

    # ------------------------------------------------------------------ inputs
    def _regions(self, features, info):
        return sample_regions(features, info, self.semvlp.feature_dim, "4d", "semvlp")

    @staticmethod
    def _text(sample_list):
        return sample_text(sample_list, "semvlp")

    def _encode(self, sample_list, features, info, mode, text=None):
        input_ids, mask, segment = text if text is not None else self._text(sample_list)
        feats, boxes, region_mask = self._regions(features, info)
        return self.semvlp(input_ids, mask, feats, boxes, region_mask, segment, mode=mode)

    # ------------------------------------------------------------------ forward
    def forward(self, sample_list):
        if self.head_type == "pretraining":
            return self._pretraining_forward(sample_list)
        if self.head_type == "nlvr2":
            return self._nlvr2_forward(sample_list)
        out = self._encode(sample_list, sample_list.get("image_feature_0"), sample_list.get("image_info_0"), self.mode)
        if self.head_type == "classification":
            return {"scores": self.classifier(out["pooled"])}
        return {"scores": self.itm_head(out["pooled"])}

    def _nlvr2_forward(self, sample_list):
        for side in ("img0", "img1"):
            if side not in sample_list:
                raise KeyError(f"training_head_type: nlvr2 needs the paired layout ('{side}' missing): set "
                               "dataset_config.nlvr2.input_layout: paired")
        text = self._text(sample_list)
        pooled = [
            self._encode(sample_list, sample_list[s]["image_feature_0"], sample_list[s]["image_info_0"], self.mode, text)["pooled"]
            for s in ("img0", "img1")
        ]
        return {"scores": self.classifier(*pooled)}

    def _pretraining_forward(self, sample_list):
        if self.training:
            mode = self.next_mode()
            micro_step = int(self.schedule_step.item())
            self.schedule_step += 1
            self.mode_counts[mode] += 1
            self._log_mode(mode, micro_step)
        else:
            mode = self.mode
        input_ids, text_mask, segment = self._text(sample_list)
        # MLM: the dataset's masked_token processor (lm_label_ids, -1 = not masked), else masked here
        if "lm_label_ids" in sample_list:
            labels = sample_list["lm_label_ids"].long()
            labels = labels.masked_fill(labels < 0, IGNORE_INDEX)
        else:
            input_ids, labels = mask_tokens(
                input_ids, attention_mask=text_mask, vocab_size=self.semvlp.config.vocab_size,
                mask_token_id=self.mask_token_id, prob=self.mlm_probability, special_token_ids=self.special_token_ids,
            )
        features, boxes, region_mask = self._regions(sample_list.get("image_feature_0"), sample_list.get("image_info_0"))
        masked, selected = mask_regions(
            features, region_mask, self.object_mask_probability, zero_ratio=self.object_zero_ratio,
            random_ratio=self.object_random_ratio,
        )
        object_labels = None
        if self.heads.object_label is not None:
            object_labels = self._object_labels(sample_list["image_info_0"], features)
        is_matched = sample_list["is_correct"] if "is_correct" in sample_list else None
        qa_targets = sample_list["targets"].float() if ("targets" in sample_list and self.heads.qa is not None) else None
        out = self.semvlp(input_ids, text_mask, masked, boxes, region_mask, segment, mode=mode)
        losses = pretraining_losses(
            self.heads, out, mlm_labels=labels, object_targets=features, object_selected=selected,
            object_labels=object_labels, is_matched=is_matched, qa_targets=qa_targets, feature_loss=self.feature_loss,
        )
        prefix = f"{sample_list.dataset_type}/{sample_list.dataset_name}/{mode}"
        output = {"losses": {f"{prefix}/{name}": value for name, value in losses.items()}, "mode": mode}
        if is_matched is not None:
            output["scores"] = self.heads.itm(out["pooled"])
        return output

    @staticmethod
    def _object_labels(info, features):
        num = features.size(1)
        if "objects" in info:
            labels = info["objects"].to(features.device).long()[:, :num]
        elif "cls_prob" in info:
            labels = info["cls_prob"].to(features.device)[:, :num].argmax(-1)
        else:
            raise KeyError(
                "masked object label prediction needs the detector's labels: image_info_0.objects (or cls_prob) from the "
                "region feature cache; set model_config.semvlp.pretraining.num_object_labels: 0 to train without it"
            )
        return labels


# ================================================================================== counts CLI
def base_counts(cross_attention_layers: Iterable[str] = CROSS_LAYOUTS, cross_layer_start: int = 6) -> Dict[str, int]:
    """Parameter counts of the BERT-base network per mode, built on the meta device (no memory used)."""
    counts = {}
    for layout in cross_attention_layers:
        with torch.device("meta"):
            network = SemVLPNetwork(BertTextEncoder.from_config(BertConfig()), 2048, cross_layer_start, layout)
        counts[f"{layout}/single"] = network.num_parameters(SINGLE)
        counts[f"{layout}/two"] = network.num_parameters(TWO)
        counts[f"{layout}/stored"] = sum(p.numel() for p in network.parameters())
    return counts


def main(argv=None):
    parser = argparse.ArgumentParser(description="SemVLP at BERT-base size: parameters used by each mode")
    parser.add_argument("--counts", action="store_true", help="print the parameter counts (default action)")
    parser.add_argument("--cross-layer-start", type=int, default=6, help="L_s (default 6)")
    args = parser.parse_args(argv)
    for key, value in base_counts(cross_layer_start=args.cross_layer_start).items():
        layout, what = key.split("/")
        print(f"cross_attention_layers={layout:5s} {what:6s}: {value:,}")


if __name__ == "__main__":
    main()
