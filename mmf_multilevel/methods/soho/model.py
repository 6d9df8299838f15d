"""The registered MMF model ``soho``: SOHO's network and heads on the adapter base.

* ``training_head_type: pretraining`` - MLM, MVM and ITM with equal weights (paper §3.3, Eq. 9). A
  batch holds ``B`` images (``image``, ``image_size``) and, under ``pairs``, ``P`` texts (``input_ids``
  masked by the dataset's ``masked_token`` processor with ``lm_label_ids``), ``pair_image_index (P,)``
  naming each text's image and ``is_correct (P,)`` whether they match (four texts per image, two
  matched, §4.1 / Appendix A.2: ``data.py``). A caption corpus with one text per image (its fields at
  the top level) is read as it is. The CNN runs once per image. By default (``itm_separate_pass``)
  image-text matching reads every pair unmasked (the dataset's masked words put back) and a second pass
  over the matched pairs, with the words masked and MVM's dictionary ids masked, feeds MLM and MVM; MLM
  and MVM never count on a mismatched pair.
* fine-tuning (§4.2; the transformer reads the features before the dictionary, ``use_vd_in_finetune:
  false``): ``vqa`` - an MLP on the pooled [CLS] over ``num_answers`` (§4.2.2; MMF's ``logit_bce`` on
  the soft VQA scores); ``nlvr2`` - the statement with each image of the pair, the two pooled [CLS]
  concatenated and classified true / false (§4.2.3); ``snli_ve`` - one fully connected layer on the
  pooled [CLS] over entailment / neutral / contradiction (§4.2.4); ``retrieval`` - the matching head
  (``itm_head``, 2-way, as the pre-training ITM head it inherits, §4.2.1) scoring image-caption pairs;
  with ``retrieval_in_batch`` trained on every image x caption pair of a batch of aligned pairs.

Training hooks (the ``mmf_multilevel`` trainer calls them; ``methods/base.py``):

* :meth:`SOHO.on_update_start` - the ResNet is frozen while the pushed progress is inside
  ``freeze_resnet_epochs`` (or ``freeze_resnet_updates``) of pre-training (§3.2, the cold start):
  derived from the progress, so a resumed run freezes exactly as an uninterrupted one;
* :meth:`SOHO.synchronize` - the dictionary's Eq. 4 update, once per optimizer update, from the
  statistics of every forward pass of the update, all-reduced across ranks;
* :meth:`SOHO.configure_optimizer` - SGD for the ResNet and the 1x1 conv, AdamW for everything else
  (§4.1), one :class:`~mmf_multilevel.trainers.optim.CompositeOptimizer`; both learning rates step
  down together at ``optimization.lr_steps`` (set in :meth:`SOHO.on_update_start` from the pushed
  update: rc10's step scheduler ``pythia`` cannot be configured past the package's default scheduler
  parameters);
* :meth:`SOHO.log_message` - the dictionary's usage (distinct entries, perplexity, never used).

:meth:`SOHO.alignment` (the predictor's alignment pictures): the text's attention to the grid cells in the last
layer of the single-stream transformer.

Under DDP a frozen ResNet has no gradients: set ``training.find_unused_parameters: true``.
"""
import bisect

import torch
from torch import nn

from mmf_multilevel.methods.base import MethodModel, register_method
from mmf_multilevel.methods.batch import pixel_inputs, text_inputs
from mmf_multilevel.methods.config import build_text_encoder
from mmf_multilevel.methods.progress import TrainingProgress
from mmf_multilevel.methods.soho.config import SOHOConfig
from mmf_multilevel.methods.soho.network import SOHONetwork
from mmf_multilevel.methods.soho.pretraining import (
    SOHOPretrainingHeads,
    draw_mvm_mask,
    mvm_labels,
    pretraining_losses,
    unmasked_text,
)
from mmf_multilevel.modules.heads import ITMHead, VQAHead, bert_pretraining_head_state, init_bert_weights
from mmf_multilevel.modules.masking import IGNORE_INDEX
from mmf_multilevel.modules.task_heads import NLVR2PairedHead
from mmf_multilevel.modules.text import BertTextEncoder
from mmf_multilevel.trainers.optim import CompositeOptimizer

__all__ = ["SOHO"]

#: SNLI-VE's classes: entailment, neutral, contradiction
SNLI_VE_LABELS = 3


@register_method
class SOHO(MethodModel):
    """The registered MMF model ``soho`` (see the module docstring and ``defaults.yaml`` beside it)."""

    name = "soho"
    signal_module = "mmf_multilevel.methods.soho.picture"
    config_class = SOHOConfig
    head_types = ("pretraining", "vqa", "nlvr2", "snli_ve", "retrieval")

    # ------------------------------------------------------------------ build
    def build_backbone(self):
        s = self.settings
        backbone = SOHONetwork(self._text_encoder(), backbone=s.backbone, pretrained_backbone=s.backbone_pretrained,
                               frozen_batch_norm=s.frozen_batch_norm, vd_size=s.vd_size, vd_momentum=s.vd_momentum,
                               mask_token_id=s.mask_token_id, pool_before_conv=s.pool_before_conv,
                               visual_token_type=s.visual_token_type, vd_init=s.vd_init,
                               channels_last=s.channels_last)
        # the dictionary moves only in pre-training (fine-tuning neither reads nor updates it by default, §4.2)
        backbone.dictionary.updating = self.settings.training_head_type == "pretraining" and s.use_vd
        return backbone

    def _text_encoder(self):
        """``bert_model_name``'s BERT (its first ``bert_num_layers`` layers when set: Table 7's 3-layer
        transformer, §4.1), or a random one from the BertConfig fields."""
        s = self.settings
        if s.bert_num_layers is None:
            return build_text_encoder(s)
        layers = int(s.bert_num_layers)
        if not s.bert_model_name:
            raise ValueError("model_config.soho.bert_num_layers keeps the first layers of bert_model_name, which is "
                             f"null: set num_hidden_layers: {layers} for a randomly initialised transformer instead")
        if layers < 1:
            raise ValueError(f"model_config.soho.bert_num_layers must be positive (or null = all), got {layers}")
        encoder = BertTextEncoder.from_name(str(s.bert_model_name), num_hidden_layers=layers,
                                            hidden_dropout_prob=s.hidden_dropout_prob,
                                            attention_probs_dropout_prob=s.attention_probs_dropout_prob)
        if encoder.config.num_hidden_layers != layers:
            raise ValueError(f"model_config.soho.bert_num_layers: {layers} asked, {s.bert_model_name} built "
                             f"{encoder.config.num_hidden_layers}")
        return encoder

    def build_head(self, head_type):
        s, config = self.settings, self.backbone.config
        if head_type == "pretraining":
            self.heads = SOHOPretrainingHeads(self.backbone, s.vd_size)
            if s.bert_model_name and s.pretraining.init_mlm_from_bert:
                self.heads.mlm.load_bert_state_dict(bert_pretraining_head_state(str(s.bert_model_name)))
        elif head_type == "vqa":
            if s.num_answers < 1:
                raise ValueError(f"model_config.soho.num_answers must be positive for training_head_type: vqa (the "
                                 f"answer vocabulary's size), got {s.num_answers}")
            self.classifier = VQAHead(config.hidden_size, s.num_answers, dropout=config.hidden_dropout_prob,
                                      layer_norm_eps=config.layer_norm_eps, initializer_range=config.initializer_range)
        elif head_type == "nlvr2":
            self.classifier = NLVR2PairedHead(config.hidden_size, 2, dropout=config.hidden_dropout_prob,
                                              layer_norm_eps=config.layer_norm_eps,
                                              initializer_range=config.initializer_range)
        elif head_type == "snli_ve":
            self.classifier = nn.Sequential(nn.Dropout(config.hidden_dropout_prob),
                                            nn.Linear(config.hidden_size, SNLI_VE_LABELS))
            init_bert_weights(self.classifier, config.initializer_range)
        else:  # retrieval: named as SemVLP's, so a pre-trained ITM head maps onto it
            self.itm_head = ITMHead(config.hidden_size, 2, dropout=config.hidden_dropout_prob,
                                    initializer_range=config.initializer_range)

    # ------------------------------------------------------------------ training hooks
    def resnet_frozen_at(self, progress: TrainingProgress) -> bool:
        """Whether the ResNet is frozen in the update ``progress`` names (pre-training only)."""
        s = self.settings
        if self.head_type != "pretraining":
            return False
        if s.freeze_resnet_updates is not None:
            return progress.update < int(s.freeze_resnet_updates)
        return progress.epoch <= int(s.freeze_resnet_epochs)

    def lr_factor_at(self, progress: TrainingProgress) -> float:
        """``lr_ratio`` to the number of ``lr_steps`` the pushed update has passed (§4.1's step schedule)."""
        o = self.settings.optimization
        return float(o.lr_ratio) ** bisect.bisect_right(sorted(int(s) for s in o.lr_steps), progress.update)

    def on_update_start(self, progress: TrainingProgress) -> None:
        super().on_update_start(progress)
        self.backbone.encoder.resnet_frozen = self.resnet_frozen_at(progress)
        optimizer = getattr(self, "_optimizer", None)
        if optimizer is not None and self.settings.optimization.lr_steps:
            factor = self.lr_factor_at(progress)
            o = self.settings.optimization
            for name, base in (("cnn", o.cnn_lr), ("transformer", o.lr)):
                for group in optimizer.parts[name].param_groups:
                    group["lr"] = base * factor

    def synchronize(self, world_size: int) -> None:
        if self.backbone.dictionary.updating:
            self.backbone.dictionary.step(world_size)

    def optimizer_parts(self):
        """``(cnn, rest)``: the trainable parameters of the ResNet and the 1x1 conv, and all others."""
        cnn_ids = {id(p) for p in self.backbone.encoder.parameters()}
        trainable = [p for p in self.parameters() if p.requires_grad]
        return [p for p in trainable if id(p) in cnn_ids], [p for p in trainable if id(p) not in cnn_ids]

    def configure_optimizer(self, config):
        """SGD for the CNN, AdamW for the rest (§4.1), one optimizer; its learning rates follow
        ``optimization.lr_steps`` from :meth:`on_update_start`."""
        o = self.settings.optimization
        cnn, rest = self.optimizer_parts()
        optimizer = CompositeOptimizer({
            "cnn": torch.optim.SGD(cnn, lr=o.cnn_lr, momentum=o.cnn_momentum, weight_decay=o.cnn_weight_decay),
            "transformer": torch.optim.AdamW(rest, lr=o.lr, weight_decay=o.weight_decay),
        })
        self._optimizer = optimizer  # a plain attribute: not a module, not in the state dict
        return optimizer

    def log_message(self, progress: TrainingProgress):
        if self.head_type != "pretraining" or not self.settings.use_vd:
            return None
        usage = self.backbone.dictionary.usage_summary()
        frozen = "frozen" if self.backbone.encoder.resnet_frozen else "training"
        return (f"soho visual dictionary: last update used {usage['distinct']} of {self.settings.vd_size} entries "
                f"(perplexity {usage['perplexity']:.1f}), never used so far {usage['never_used']}; ResNet {frozen}")

    # ------------------------------------------------------------------ forward
    def _visual_source(self) -> str:
        s = self.settings
        return "dictionary" if s.use_vd and s.use_vd_in_finetune else "features"

    def encode(self, sample_list, side=None):
        text = text_inputs(sample_list, self.name)
        pixels = pixel_inputs(sample_list, self.name, side=side)
        return self.backbone(text.input_ids, text.mask, pixels.pixels, pixels.mask, source=self._visual_source(),
                             segment_ids=text.segment_ids)

    def alignment(self, sample_list):
        """The first sample's text-to-cell attention (see :mod:`mmf_multilevel.methods.alignment` for the dict): the
        single stream ``[CLS] text [SEP] cells`` (paper §3.3), the last layer's self-attention, rows the text
        positions, columns the grid cells (at ``T + k``, row-major; ``grid`` and ``cell``: 64 x 64 pixels of the
        model's input image each, §3.1). SOHO has no global visual token, so every cell is a column."""
        from mmf_multilevel.methods.alignment import attention_alignment, first_mask, recorded_attention
        from mmf_multilevel.methods.soho.network import GRID_STRIDE

        layers = self.backbone.text.layers
        text = text_inputs(sample_list, self.name)
        record, out = recorded_attention(self, layers[-1].attention.self, lambda: self.encode(sample_list))
        length = text.input_ids.size(1)
        return attention_alignment(record, first_mask(text.mask), 0, first_mask(out["image"]["mask"]), length,
                                   f"single-stream self-attention, text to grid cells, layer {len(layers)} of "
                                   f"{len(layers)}",
                                   extra={"grid": tuple(out["image"]["grid"]), "cell": (GRID_STRIDE, GRID_STRIDE)})

    def task_forward(self, sample_list):
        if self.head_type == "retrieval" and self.training and self.settings.retrieval_in_batch:
            return self.in_batch_retrieval_forward(sample_list)
        head = self.itm_head if self.head_type == "retrieval" else self.classifier
        return {"scores": head(self.encode(sample_list)["pooled"])}

    def in_batch_retrieval_forward(self, sample_list):
        """§4.2.1's training batch: ``t`` aligned (image, caption) pairs; every image with every caption of
        the batch (the other ``t - 1`` its unaligned ones; a caption of the same image, when the batch holds
        one twice, counts as aligned), the matching head as a binary classifier over all ``t²`` pairs, the
        CNN once per image. Loss ``<split>/<dataset>/itm``; ``scores`` are the aligned pairs' (t, 2)."""
        where = f"dataset_config.{sample_list.dataset_name}"
        if "targets" in sample_list and bool((sample_list["targets"].view(-1) != 1).any()):
            raise ValueError(f"soho retrieval_in_batch reads aligned pairs only: set {where}.itm_probability: 0 "
                             "(the unaligned pairs are the batch's other captions)")
        text = text_inputs(sample_list, self.name)
        pixels = pixel_inputs(sample_list, self.name)
        count = text.input_ids.size(0)
        device = text.input_ids.device
        image = self.backbone.encode_image(pixels.pixels, pixels.mask, quantise=self._visual_source() == "dictionary")
        visual = image["visual"]
        images = torch.arange(count, device=device).repeat_interleave(count)  # pair (i, j): image i, caption j
        texts = torch.arange(count, device=device).repeat(count)
        segments = text.segment_ids[texts] if text.segment_ids is not None else None
        out = self.backbone.joint(text.input_ids[texts], text.mask[texts], visual[images], image["mask"][images],
                                  image["grid"], segment_ids=segments)
        logits = self.itm_head(out["pooled"])
        if "image_index" in sample_list:
            owner = sample_list["image_index"].to(device).view(-1)
            labels = (owner[images] == owner[texts]).long()
        else:
            labels = (images == texts).long()
        loss = nn.functional.cross_entropy(logits.float(), labels)
        return {"losses": self.named_losses(sample_list, {"itm": loss}),
                "scores": logits.view(count, count, -1).diagonal(dim1=0, dim2=1).transpose(0, 1)}

    def _pretraining_inputs(self, sample_list):
        """The batch's images and texts: the pair layout under ``pairs`` (SOHO's corpora, ``data.py``), or
        the texts at the top level (a caption corpus with one text per image, or ``pair_image_index`` beside it)."""
        where = f"dataset_config.{sample_list.dataset_name}"
        texts = sample_list["pairs"] if "pairs" in sample_list else sample_list
        text = text_inputs(texts, self.name)
        if "lm_label_ids" not in texts:
            raise KeyError(f"soho pre-training reads its MLM targets from the batch ('lm_label_ids'): give {where} a "
                           "masked_token text_processor with mask_probability > 0")
        if "is_correct" not in texts:
            raise KeyError(f"soho pre-training needs 'is_correct' (1 = the text describes its image) for image-text "
                           f"matching from {where}")
        pixels = pixel_inputs(sample_list, self.name)
        device = pixels.pixels.device
        count = text.input_ids.size(0)
        if "pair_image_index" in texts:
            pair_index = texts["pair_image_index"].to(device).long().view(-1)
            if pair_index.numel() != count or (pair_index < 0).any() or (pair_index >= pixels.pixels.size(0)).any():
                raise ValueError(f"soho: pair_image_index must give each of the {count} texts an image in "
                                 f"[0, {pixels.pixels.size(0)}), got {pair_index.tolist()}")
        elif count == pixels.pixels.size(0):
            pair_index = torch.arange(count, device=device)
        else:
            raise KeyError(f"soho: {count} texts and {pixels.pixels.size(0)} images but no 'pair_image_index' naming "
                           "each text's image")
        raw_labels = texts["lm_label_ids"].to(device).long()
        is_matched = texts["is_correct"].to(device).long().view(-1)
        return text, pixels, pair_index, raw_labels, is_matched

    def pretraining_match_logits(self, sample_list):
        """The ITM head (§3.3) on the clean pair as pre-training's matching pass reads it: the caption unmasked,
        the cells through the visual dictionary when ``use_vd`` (f(v), Eq. 3), the features otherwise."""
        text = text_inputs(sample_list, self.name)
        pixels = pixel_inputs(sample_list, self.name)
        out = self.backbone(text.input_ids, text.mask, pixels.pixels, pixels.mask,
                            source="dictionary" if self.settings.use_vd else "features", segment_ids=text.segment_ids)
        return self.heads.itm(out["pooled"])

    def pretraining_forward(self, sample_list):
        """One pre-training forward pass (§3.3): the CNN once per image, the dictionary, the matching
        pass and the masked pass; losses ``<split>/<dataset>/{itm,mlm,mvm}``."""
        s, p = self.settings, self.settings.pretraining
        text, pixels, pair_index, raw_labels, is_matched = self._pretraining_inputs(sample_list)
        image = self.backbone.encode_image(pixels.pixels, pixels.mask, quantise=s.use_vd)
        visual = image["visual"][pair_index]
        visual_mask = image["mask"][pair_index]
        grid = image["grid"]
        mlm_targets = raw_labels.masked_fill(raw_labels < 0, IGNORE_INDEX)

        if p.itm_separate_pass:
            clean = unmasked_text(text.input_ids, raw_labels)
            itm_out = self.backbone.joint(clean, text.mask, visual, visual_mask, grid, segment_ids=text.segment_ids)
            rows = (is_matched == 1).nonzero().view(-1)
        else:
            itm_out, rows = None, torch.arange(is_matched.numel(), device=is_matched.device)

        masked_out = mvm_targets = None
        if rows.numel():
            mvm_mask = None
            if s.use_vd:
                ids = image["ids"][pair_index][rows]
                mvm_mask = draw_mvm_mask(ids, visual_mask[rows], p.mvm_mode, p.mvm_mask_ratio, p.mvm_max_ratio)
                mvm_targets = mvm_labels(ids, mvm_mask)
            segments = text.segment_ids[rows] if text.segment_ids is not None else None
            masked_out = self.backbone.joint(text.input_ids[rows], text.mask[rows], visual[rows], visual_mask[rows],
                                             grid, masked=mvm_mask, segment_ids=segments)
        if itm_out is None:
            itm_out = masked_out
        itm_logits = self.heads.itm(itm_out["pooled"])
        losses = pretraining_losses(self.heads, itm_logits, is_matched, masked_out, rows,
                                    mlm_targets[rows] if masked_out is not None else None, mvm_targets)
        if masked_out is None:  # no matched pair in this batch: graph-connected zeros keep the keys
            losses["mlm"] = self.heads.mlm.bias.sum() * 0.0
            if s.use_vd:
                losses["mvm"] = self.heads.mvm.decoder.bias.sum() * 0.0
        return {"losses": self.named_losses(sample_list, losses), "scores": itm_logits}
