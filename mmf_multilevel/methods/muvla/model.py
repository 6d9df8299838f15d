"""The registered MMF model ``muvla``: μ-VLA's network and heads on the adapter base.

``training_head_type``: ``pretraining`` (the task of a batch is the ``muvla_task`` field the μ-VLA
datasets set: R-T, R-P, I-S, §3.2-§3.3; the ITM re-weighting of §3.4 starts after
``itm_weight_start_epoch`` epochs or ``itm_weight_start_update`` updates, read from the progress the
trainer pushes), ``classification`` (VQA, SNLI-VE), ``nlvr2`` and ``refcoco``. The backbone is
``backbone.*`` so that fine-tuning loads only it from a pre-training checkpoint
(``pretrained_state_mapping: backbone: backbone``). :meth:`MuVLA.alignment`: the text's attention to the regions
in the last layer of the single stream (the predictor's alignment pictures).
"""
import torch

from mmf_multilevel.methods.base import MethodModel, register_method
from mmf_multilevel.methods.batch import RegionInputs, region_inputs, text_inputs
from mmf_multilevel.methods.config import build_text_encoder
from mmf_multilevel.methods.muvla.checkpoints import (
    convert_uvlp_state,
    load_converted,
    load_visual_bert,
    read_state,
    read_visual_bert_checkpoint,
)
from mmf_multilevel.methods.muvla.config import MuVLAConfig
from mmf_multilevel.methods.muvla.network import TASK_IDS, TASKS, MuVLANetwork
from mmf_multilevel.methods.muvla.pretraining import (
    ITM_WEIGHTINGS,
    MRM_NORMALIZATIONS,
    MuVLAPretrainingHeads,
    itm_pair_weights,
    pretraining_losses,
)
from mmf_multilevel.modules.heads import VQAHead, bert_pretraining_head_state
from mmf_multilevel.modules.masking import IGNORE_INDEX
from mmf_multilevel.modules.task_heads import NLVR2PairedHead, RegionScoringHead

POOLINGS = ("last_text", "cls")


def _choice(value, allowed, key):
    if value not in allowed:
        raise ValueError(f"model_config.muvla.{key} must be one of {list(allowed)}, got {value!r}")
    return value


@register_method
class MuVLA(MethodModel):
    """The registered MMF model ``muvla`` (see the module docstring and ``defaults.yaml`` beside it)."""

    name = "muvla"
    no_signal_hint = ("μ-VLA's own tag-phrase links are the weak corpus's (paper §3.3.2): python -m "
                      "mmf_multilevel.weak_corpus picture --weak weak.jsonl --image-id ID --features <its region cache> "
                      "--out links.png")
    config_class = MuVLAConfig
    head_types = ("pretraining", "classification", "nlvr2", "refcoco")
    state_key_map = (("train_steps", None),)

    # ------------------------------------------------------------------ build
    def build_backbone(self):
        s = self.settings
        backbone = MuVLANetwork(build_text_encoder(s), s.feature_dim, s.embedding_style)
        if s.visual_bert_checkpoint:
            path = str(s.visual_bert_checkpoint)
            load_visual_bert(backbone, read_visual_bert_checkpoint(path),
                             log=lambda line: self.write(f"muvla: visual_bert_checkpoint={path}: {line}"))
        return backbone

    def build_head(self, head_type):
        s, hidden, bert = self.settings, self.backbone.hidden_size, self.backbone.config
        if head_type == "pretraining":
            pre = s.pretraining
            self.heads = MuVLAPretrainingHeads(self.backbone, pre.num_tags)
            if s.bert_model_name and pre.init_heads_from_bert:
                self.heads.load_bert_heads(bert_pretraining_head_state(str(s.bert_model_name)))
            _choice(pre.mrm_normalization, MRM_NORMALIZATIONS, "pretraining.mrm_normalization")
            _choice(pre.itm_weighting, ITM_WEIGHTINGS, "pretraining.itm_weighting")
            _choice(pre.itm_weight_source, ("masked", "clean"), "pretraining.itm_weight_source")
            _choice(pre.default_task, TASKS + (None,), "pretraining.default_task")
            self.extra_losses = {
                "region_phrase": {"use_mrfr": pre.rp_mrfr},
                "image_sentence": {"use_mrc": pre.is_mrm, "use_mrfr": pre.is_mrm},
                "region_tag": {},
                "text": {},
            }
        elif head_type == "classification":
            _choice(s.pooling, POOLINGS, "pooling")
            if s.num_labels is None:
                raise ValueError("model_config.muvla.num_labels must be set for training_head_type: classification "
                                 "(the answer vocabulary's size for VQA, 3 for SNLI-VE)")
            self.classifier = VQAHead(hidden, s.num_labels, intermediate_size=hidden, dropout=s.classifier_dropout,
                                      layer_norm_eps=bert.layer_norm_eps, initializer_range=bert.initializer_range)
        elif head_type == "nlvr2":
            self.classifier = NLVR2PairedHead(hidden, 2, dropout=bert.hidden_dropout_prob, layer_norm_eps=bert.layer_norm_eps,
                                              initializer_range=bert.initializer_range)
        else:
            self.classifier = RegionScoringHead(hidden, bert.layer_norm_eps, bert.initializer_range)

    def after_build(self):
        if self.settings.released_checkpoint:
            self._load_released(str(self.settings.released_checkpoint))

    def _load_released(self, path: str) -> None:
        """The official μ-VLA (UVLP) checkpoint at ``path``, or its weights-only conversion: backbone,
        plus the pre-training heads when this model has them (see :mod:`.checkpoints`)."""
        if self.backbone.embedding_style != "released":
            raise ValueError("model_config.muvla.released_checkpoint needs embedding_style: released (the official "
                             f"code's embedding), got {self.backbone.embedding_style!r}")
        state = read_state(path)
        if any(k.startswith("backbone.") for k in state):  # already converted (python -m ...muvla.checkpoints)
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

    # ------------------------------------------------------------------ forward
    def _regions(self, sample_list, side=None) -> RegionInputs:
        return region_inputs(sample_list, self.name, self.backbone.feature_dim, "5d", side)

    def encode(self, sample_list, side=None):
        text = text_inputs(sample_list, self.name)
        regions = self._regions(sample_list, side)
        out = self.backbone(text.input_ids, text.mask, regions.features, regions.boxes, regions.mask, text.segment_ids)
        out["text_mask"], out["region_mask"] = text.mask, regions.mask
        return out

    def alignment(self, sample_list):
        """The first sample's text-to-region attention (see :mod:`mmf_multilevel.methods.alignment` for the dict):
        the single stream ``[text (T) ; regions (N)]`` (paper §3.1), the last layer's self-attention, rows the text
        positions, columns the regions (at ``T + k``)."""
        from mmf_multilevel.methods.alignment import attention_alignment, first_mask, recorded_attention

        layers = self.backbone.text.layers
        record, out = recorded_attention(self, layers[-1].attention.self, lambda: self.encode(sample_list))
        return attention_alignment(record, first_mask(out["text_mask"]), 0, first_mask(out["region_mask"]),
                                   out["text"].size(1),
                                   f"single-stream self-attention, text to regions, layer {len(layers)} of "
                                   f"{len(layers)}")

    def task_forward(self, sample_list):
        out = self.encode(sample_list)
        if self.head_type == "refcoco":
            return {"scores": self.classifier(out["regions"], out["region_mask"])}
        if self.settings.pooling == "cls":
            pooled = out["pooled"]
        else:  # the last text token before [SEP] (the official VQA pooling)
            last = (out["text_mask"].long().sum(1) - 2).clamp(min=0)
            pooled = out["text"][torch.arange(last.size(0), device=last.device), last]
        return {"scores": self.classifier(pooled)}

    # ------------------------------------------------------------------ pre-training
    def itm_weighting_active(self) -> bool:
        """Whether the ITM re-weighting is on for this batch: once ``itm_weight_start_update`` optimizer
        updates are done when set, else after ``itm_weight_start_epoch`` epochs (m = 1: from epoch 2);
        both read from the progress the trainer pushes (:meth:`on_update_start`)."""
        pre = self.settings.pretraining
        if pre.itm_weighting == "off" or not self.training:
            return False
        if pre.itm_weight_start_update is not None:
            return self.progress.update >= pre.itm_weight_start_update
        return self.progress.epoch > pre.itm_weight_start_epoch

    def _task_of(self, sample_list) -> str:
        default = self.settings.pretraining.default_task
        if "muvla_task" not in sample_list:
            if default is not None:
                return default
            raise KeyError("training_head_type: pretraining needs a μ-VLA pre-training dataset (muvla_region_tag, "
                           "muvla_region_phrase, muvla_image_sentence, ...): the batch has no 'muvla_task' field")
        ids = sample_list["muvla_task"].view(-1)
        if (ids != ids[0]).any():
            raise ValueError("a pre-training batch mixes μ-VLA tasks; each batch must come from one dataset")
        index = int(ids[0])
        if not 0 <= index < len(TASKS):
            raise ValueError(f"muvla_task {index} is not one of {TASK_IDS}")
        return TASKS[index]

    def pretraining_match_logits(self, sample_list):
        """The ITM head (paper §3.2: region-phrase and image-sentence matching, on the pooled [CLS]) over the
        clean pair: the text unmasked, every region kept."""
        return self.heads.itm(self.encode(sample_list)["pooled"])

    def pretraining_forward(self, sample_list):
        task = self._task_of(sample_list)
        pre = self.settings.pretraining
        text = text_inputs(sample_list, self.name)
        input_ids, text_mask, segment = text.input_ids, text.mask, text.segment_ids
        if task == "text":  # unpaired text: no region positions at all
            batch = input_ids.size(0)
            features = input_ids.new_zeros((batch, 0, self.backbone.feature_dim), dtype=torch.float32)
            boxes = features.new_zeros((batch, 0, 5))
            region_mask = input_ids.new_zeros((batch, 0))
            selected, masked_features = None, features
        else:
            # the dataset drew the masked regions; the batch contract applied them (corrupted), features stay original
            regions = self._regions(sample_list)
            features, boxes, region_mask = regions.features, regions.boxes, regions.mask
            selected, masked_features = regions.selected, regions.corrupted
        tag_boxes = sample_list["tag_boxes"].float() if "tag_boxes" in sample_list else None
        out = self.backbone(input_ids, text_mask, masked_features, boxes, region_mask, segment, tag_boxes=tag_boxes)
        mlm_labels = sample_list["lm_label_ids"] if "lm_label_ids" in sample_list else None
        itm_labels = sample_list["is_correct"].long() if "is_correct" in sample_list else None
        if "muvla_task" not in sample_list and mlm_labels is not None and itm_labels is not None:
            # a paired caption dataset masks every caption: MLM only where the caption is the image's own
            mlm_labels = mlm_labels.masked_fill((itm_labels == 0).unsqueeze(1).to(mlm_labels.device), IGNORE_INDEX)
        weights = None
        if self.itm_weighting_active() and task != "text" and (task != "region_tag" or pre.itm_weighting == "batch_mean"):
            if pre.itm_weight_source == "clean":
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
            itm_weighting=pre.itm_weighting,
            mrm_normalization=pre.mrm_normalization,
            feature_loss=pre.feature_loss,
            **self.extra_losses[task],
        )
        if not losses:
            raise ValueError(f"the {task} batch of {sample_list.dataset_name} carries no pre-training target "
                             "(lm_label_ids, region_selected, mrtc_labels or is_correct)")
        output = {"losses": self.named_losses(sample_list, losses)}
        if itm_labels is not None:
            output["scores"] = self.heads.itm(out["pooled"])
        return output
