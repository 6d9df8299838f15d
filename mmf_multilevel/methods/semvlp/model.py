"""The registered MMF model ``semvlp``: SemVLP's network and heads on the adapter base.

* ``training_head_type: pretraining`` - MLM, masked object prediction (``mrfr`` feature regression +
  ``mrc`` detected label), ITM and image QA with equal weights (paper §3.3.1-§3.3.2); each optimizer update
  runs one mode, picked by ``mode_schedule`` from the update index the trainer pushes
  (:meth:`on_update_start`), so every rank and a resumed run pick the same modes. Losses are named
  ``<split>/<dataset>/<mode>/<loss>`` so the log shows each mode's losses.
* ``classification`` (VQA, GQA, SNLI-VE), ``nlvr2`` (paired head) and ``retrieval`` (the ITM head's
  2-way scores): the fine-tuning mode is ``mode: single | two`` (paper §3.3.3, Table 5).

:meth:`SemVLP.alignment` (the predictor's alignment pictures): single-stream mode, the text's attention to the
objects in the last shared block; two-stream mode, the last block's object -> text cross-attention read backwards
(the text never attends to the objects there, paper §3.1).

Checkpoints written before the one-folder layout (backbone ``semvlp.*``, heads ``object_feature`` /
``object_label``, the ``schedule_step`` counter) load through :attr:`SemVLP.state_key_map`.
"""
from mmf_multilevel.methods.base import MethodModel, register_method
from mmf_multilevel.methods.batch import detector_labels, region_inputs, text_inputs
from mmf_multilevel.methods.config import build_text_encoder
from mmf_multilevel.methods.progress import TrainingProgress
from mmf_multilevel.methods.semvlp.config import SemVLPConfig
from mmf_multilevel.methods.semvlp.network import SINGLE, TWO, SemVLPNetwork, check_mode, describe_cross_layout
from mmf_multilevel.methods.semvlp.pretraining import ModeSchedule, SemVLPPretrainingHeads, pretraining_losses
from mmf_multilevel.modules.heads import ITMHead, VQAHead, bert_pretraining_head_state
from mmf_multilevel.modules.masking import IGNORE_INDEX
from mmf_multilevel.modules.task_heads import NLVR2PairedHead


@register_method
class SemVLP(MethodModel):
    """The registered MMF model ``semvlp`` (see the module docstring and ``defaults.yaml`` beside it)."""

    name = "semvlp"
    config_class = SemVLPConfig
    head_types = ("pretraining", "classification", "nlvr2", "retrieval")
    moved_keys = {
        "pretraining.mlm_probability": "the datasets mask the text: set the masked_token text processor's "
                                       "mask_probability (dataset_config.<dataset>.processors.text_processor.params)",
        "pretraining.mask_token_id": "the masked_token text processor masks with its tokenizer's [MASK]; remove it",
        "pretraining.special_token_ids": "the masked_token text processor never masks [CLS] / [SEP]; remove it",
        "pretraining.object_mask_probability": "the datasets draw the masked objects: set "
                                               "dataset_config.<dataset>.region_mask_probability",
        "pretraining.object_zero_ratio": "set dataset_config.<dataset>.region_zero_ratio",
        "pretraining.object_random_ratio": "set dataset_config.<dataset>.region_random_ratio",
    }
    state_key_map = (
        ("semvlp.", "backbone."),
        ("heads.object_feature.", "heads.mrfr."),
        ("heads.object_label.", "heads.mrc."),
        ("schedule_step", None),
    )

    # ------------------------------------------------------------------ build
    def build_backbone(self):
        s = self.settings
        self.mode = check_mode(s.mode, "model_config.semvlp.mode")
        backbone = SemVLPNetwork(build_text_encoder(s), feature_dim=s.feature_dim,
                                 cross_layer_start=s.cross_layer_start, cross_attention_layers=s.cross_attention_layers)
        self.write(
            f"semvlp network parameters: single-stream mode {backbone.num_parameters(SINGLE):,}, two-stream mode "
            f"{backbone.num_parameters(TWO):,} (L_s = {backbone.cross_layer_start}, cross_attention_layers: "
            f"{backbone.cross_attention_layers}, stored {sum(p.numel() for p in backbone.parameters()):,})"
        )
        return backbone

    def build_head(self, head_type):
        s, hidden, bert = self.settings, self.backbone.hidden_size, self.backbone.config
        if head_type == "pretraining":
            pre = s.pretraining
            self.schedule = ModeSchedule(s.mode_schedule, s.single_stream_ratio, s.schedule_seed)
            self.heads = SemVLPPretrainingHeads(self.backbone, pre.num_object_labels, pre.num_qa_answers)
            if s.bert_model_name and pre.init_mlm_from_bert:
                self.heads.mlm.load_bert_state_dict(bert_pretraining_head_state(str(s.bert_model_name)))
        elif head_type == "classification":
            if s.num_labels is None:
                raise ValueError("model_config.semvlp.num_labels must be set for training_head_type: classification "
                                 "(the answer vocabulary's / label set's size)")
            self.classifier = VQAHead(hidden, s.num_labels, dropout=bert.hidden_dropout_prob,
                                      layer_norm_eps=bert.layer_norm_eps, initializer_range=bert.initializer_range)
        elif head_type == "nlvr2":
            self.classifier = NLVR2PairedHead(hidden, 2, dropout=bert.hidden_dropout_prob, layer_norm_eps=bert.layer_norm_eps,
                                              initializer_range=bert.initializer_range)
        else:  # retrieval: the pre-training ITM head, so a pre-trained checkpoint brings its matching head
            self.itm_head = ITMHead(hidden, 2, dropout=bert.hidden_dropout_prob, initializer_range=bert.initializer_range)

    # ------------------------------------------------------------------ training hooks
    def current_mode(self) -> str:
        """The mode of this forward pass: in pre-training the schedule at the update the trainer
        pushed; otherwise (fine-tuning, evaluation) ``mode``."""
        if self.head_type == "pretraining" and self.training:
            return self.schedule(self.progress.update)
        return self.mode

    def log_message(self, progress: TrainingProgress):
        if self.head_type != "pretraining" or progress.update < 1:
            return None
        single, two = self._mode_tally(progress.update)
        last = self.schedule(progress.update - 1)
        return (f"semvlp modes: update {progress.update} ran {last}-stream; updates so far: single "
                f"{single}, two {two} (mode_schedule: {self.schedule.kind})")

    def _mode_tally(self, updates: int):
        """(single, two) modes of updates ``0 .. updates-1``, extended from the last call's count (derived from
        the schedule, so a resumed run counts from 0 once; each log then costs only the updates since the last)."""
        counted, single, two = getattr(self, "_tally", (0, 0, 0))
        if updates < counted:
            counted, single, two = 0, 0, 0
        new = self.schedule.modes(updates - counted, start=counted)
        single, two = single + new.count(SINGLE), two + new.count(TWO)
        self._tally = (updates, single, two)
        return single, two

    # ------------------------------------------------------------------ checkpoints
    def check_pretrained_state(self, state):
        """A checkpoint whose two-stream cross-attention sits in other blocks than this model's (another
        L_s, paper Figure 3) is an error naming both layouts: loading it would drop the checkpoint's
        cross-attention or leave this model's at random initialisation."""
        marker = "backbone.cross_attention."
        if not any(key.startswith("backbone.") for key in state):
            return
        theirs = sorted({int(key[len(marker):].split(".")[0]) for key in state if key.startswith(marker)})
        ours = sorted(int(index) for index in self.backbone.cross_attention.keys())
        if theirs != ours:
            layers = self.backbone.num_layers
            raise ValueError(
                f"the checkpoint's two-stream layout is {describe_cross_layout(theirs, layers)}, this model's is "
                f"{describe_cross_layout(ours, layers)} (model_config.semvlp.cross_layer_start "
                f"{self.backbone.cross_layer_start}, cross_attention_layers {self.backbone.cross_attention_layers}): "
                "fine-tune with the L_s the checkpoint was pre-trained with (the ablations' fine-tuning configs "
                "in projects/semvlp/ablations/ do)"
            )

    # ------------------------------------------------------------------ forward
    def encode(self, sample_list, side=None, mode=None):
        text = text_inputs(sample_list, self.name)
        regions = region_inputs(sample_list, self.name, self.backbone.feature_dim, "4d", side)
        return self.backbone(text.input_ids, text.mask, regions.features, regions.boxes, regions.mask, text.segment_ids,
                             mode=mode or self.mode)

    def alignment(self, sample_list):
        """The first sample's text-to-object attention in the fine-tuning ``mode`` (see
        :mod:`mmf_multilevel.methods.alignment` for the dict).

        Single-stream (paper §3.1: ``[IMG] o_1..o_N [CLS] w .. [SEP]`` with full attention): the last shared
        block's self-attention, rows the text positions (at ``1 + N + t``), columns the objects (at ``1 + k``;
        [IMG], no region, is left out). Two-stream (paper §3.1-§3.2): the text stream never reads the objects;
        the objects cross-attend to the text's last-layer states in the blocks above ``L_s``. So the signal is
        the last block's object -> text cross-attention of the model's own pass, transposed (rows the text
        positions, columns the objects) and each row divided by its sum over the real objects: the share of
        the objects' attention to that token each object gives. The single-stream pass through the shared
        weights is not used for a two-stream model, as it is not the pass its predictions come from."""
        from mmf_multilevel.methods.alignment import attention_alignment, first_mask, recorded_attention

        net, mode, last = self.backbone, self.mode, self.backbone.num_layers - 1
        if mode == SINGLE:
            module = net.blocks[last].attention.self
        else:
            cross = net.cross_module(last)
            if cross is None:
                raise ValueError(f"semvlp two-stream mode with L_s = {net.cross_layer_start} "
                                 "(model_config.semvlp.cross_layer_start) has no cross-attention: its text and "
                                 "objects never attend to each other, so there is no alignment to read")
            module = cross.self
        text = text_inputs(sample_list, self.name)
        record, out = recorded_attention(self, module, lambda: self.encode(sample_list, mode=mode))
        objects = first_mask(out["object_mask"])[1:]
        if mode == SINGLE:
            return attention_alignment(record, first_mask(text.mask), 1 + objects.numel(), objects, 1,
                                       f"single-stream self-attention, text to objects, block {last + 1} of "
                                       f"{net.num_layers}")
        return attention_alignment(record, first_mask(text.mask), 0, objects, 1,
                                   f"two-stream object-to-text cross-attention, block {last + 1} of {net.num_layers}, "
                                   "transposed and normalised over the objects", transpose=True, normalise=True)

    def task_forward(self, sample_list):
        out = self.encode(sample_list)
        head = self.classifier if self.head_type == "classification" else self.itm_head
        return {"scores": head(out["pooled"])}

    def pretraining_match_logits(self, sample_list):
        """The ITM head (paper §3.3.1) on the clean pair's pooled summary, in ``mode`` (the mode an evaluation
        runs; pre-training alternates modes only while training)."""
        return self.heads.itm(self.encode(sample_list)["pooled"])

    def pretraining_forward(self, sample_list):
        """One pre-training forward pass in this update's mode. The dataset masked the text
        (``lm_label_ids``) and drew the masked objects (``region_selected``; the batch contract hands the
        network the zeroed features and keeps the originals as the regression target); the model only
        routes them to the losses (paper §3.3.1)."""
        mode = self.current_mode()
        text = text_inputs(sample_list, self.name)
        where = f"dataset_config.{sample_list.dataset_name}"
        if "lm_label_ids" not in sample_list:
            raise KeyError(f"semvlp pre-training reads its MLM targets from the batch ('lm_label_ids'): give {where} a "
                           "masked_token text_processor with mask_probability > 0")
        labels = sample_list["lm_label_ids"].long()
        labels = labels.masked_fill(labels < 0, IGNORE_INDEX)
        regions = region_inputs(sample_list, self.name, self.backbone.feature_dim, "4d")
        if regions.selected is None:
            raise KeyError(f"semvlp pre-training predicts masked objects the dataset drew ('region_selected'): set "
                           f"{where}.region_mask_probability above 0 (the paper: 0.15)")
        object_labels = None
        if self.heads.mrc is not None:
            object_labels = detector_labels(regions, self.name,
                                            "set model_config.semvlp.pretraining.num_object_labels: 0 to train without it")
        is_matched = sample_list["is_correct"] if "is_correct" in sample_list else None
        qa_targets = sample_list["targets"].float() if ("targets" in sample_list and self.heads.qa is not None) else None
        out = self.backbone(text.input_ids, text.mask, regions.corrupted, regions.boxes, regions.mask, text.segment_ids,
                            mode=mode)
        losses = pretraining_losses(
            self.heads, out, mlm_labels=labels, object_targets=regions.features, object_selected=regions.selected,
            object_labels=object_labels, is_matched=is_matched, qa_targets=qa_targets,
            feature_loss=self.settings.pretraining.feature_loss,
        )
        output = {"losses": self.named_losses(sample_list, losses, mode), "mode": mode}
        if is_matched is not None:
            output["scores"] = self.heads.itm(out["pooled"])
        return output
