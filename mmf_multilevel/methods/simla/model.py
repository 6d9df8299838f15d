"""The registered MMF model ``simla``: SIMLA's encoders, heads, momentum model and queues on the adapter base.

``training_head_type: pretraining`` (paper §2, Eq. 10: ``L = L_itc^mod + L_xmm^mod + L_itm + L_PSL^mod``, all
weighted 1). A batch is an image-caption corpus on raw images (``coco_captions_images`` and its siblings with
``itm_probability: 0``; the in-batch hard negatives are drawn here): ``image`` ``(B, 3, S, S)``, the caption
``input_ids`` masked by the dataset's ``masked_token`` processor and its ``lm_label_ids`` (-1 = not predicted).
One forward, in the official order (``models/simla/pretrain.py``):

1. τ clamped; the image through the ViT (``V``) and the unmasked caption (the dataset's masked words put back)
   through the BERT in text mode; their projected, normalised [CLS] features ``f_v``, ``f_t`` (§2.2);
2. under ``no_grad`` the momentum model's ``V'``, ``f_v'``, ``f_t'`` (its EMA already applied by
   :meth:`SIMLA.on_update_start`, once per optimizer update);
3. ITC against ``[momentum features ; queue]`` with momentum distillation (Eqs. 1-4);
4. ITM on the B pairs and 2B in-batch hard negatives drawn from the ITC similarities (Eq. 5);
5. MLM (Eqs. 6-7): the masked caption through the multimodal BERT reading ``V``; the teacher reads ``V'``;
6. MIM (Eqs. 6-7): the image again with a BEiT block mask, its tokens as BERT's queries cross-attending to
   the caption's embedding-layer output, predicting the dVAE tokens of the image (teacher: the momentum
   ViT, BERT and MIM head on the same masked image);
7. PSL (Eqs. 8-9, appendix §3): keywords from the momentum multimodal pass's last-layer self-attention,
   predicted from ``f_v`` by the concept head, distilled from the momentum concept head on ``f_v'``;
8. in training, the momentum features enqueued (all-gathered over the ranks).

Losses ``<split>/<dataset>/{itc,itm,mlm,mim,psl}`` (``mlm``, ``mim``, ``psl`` switchable: Table 1's
ablations); ``scores``: the ITM logits ``(3B, 2)`` of the positives and the two negative sets, in the
order of :func:`~mmf_multilevel.methods.simla.losses.itm_pair_indices`.

``training_head_type: retrieval`` (paper §3.1, "Image-Text Retrieval": ITC (Eq. 2) and ITM (Eq. 5) during
fine-tuning; the official ``models/simla/retrieval.py`` otherwise). Aligned pairs (training, and ``eval_pairs:
aligned`` validation) of ``coco_retrieval_images`` / ``flickr30k_retrieval_images``, each with its
``image_index``: ITC with the queue and momentum distillation whose hard target is uniform over every
caption of the same image in the batch (queued features are always negatives: the official ``idx_queue``
stays -100), ITM on the pairs and one in-batch hard negative per image and per caption, never of the same
image; losses ``<split>/<dataset>/{itc,itm}``. Gallery pairs (``pair_image_index``, ``eval_pairs: all``):
``scores`` ``(P, 1)``, the ITM head's "match" logit of each pair (the official re-ranking score), for the
``retrieval_*`` metrics. Two-stage inference (ITC top-k re-ranked by ITM): ``python -m
mmf_multilevel.methods.simla.retrieval``. Both head types build the same modules, so a pre-training
checkpoint loads into a retrieval model as it is (the ViT position embeddings resampled to its grid).

``training_head_type: grounding`` (paper §3.1 "Visual Grounding", §3.5): weakly supervised RefCOCO+
(``refcoco_plus_images`` with ``supervision: none``). Training is retrieval's on (image, expression) pairs,
no box; in evaluation each proposal is also scored by the Grad-CAM of the ITM match logit on the
cross-attention of layer ``gradcam_layer`` (``grounding.py``), ``scores`` ``(B, proposals)`` for
``refcoco_accuracy``. It builds the same modules as retrieval.

:meth:`SIMLA.alignment` (the predictor's alignment pictures): the text's cross-attention to the image patches in the
last multimodal layer (Grad-CAM, the grounding signal above, stays in ``grounding.py`` and ``picture.py``).

Training hooks: :meth:`SIMLA.on_update_start` (the EMA step, α from the pushed update, the learning rate of
the model's AdamW), :meth:`SIMLA.configure_optimizer` / :meth:`SIMLA.get_optimizer_parameters` (the momentum
copies never reach an optimizer), :meth:`SIMLA.log_message` (α, τ, the queue pointer).
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from mmf_multilevel.methods.base import MethodModel, register_method
from mmf_multilevel.methods.batch import pixel_inputs, text_inputs
from mmf_multilevel.methods.config import bert_config_of
from mmf_multilevel.methods.progress import TrainingProgress
from mmf_multilevel.methods.simla.config import SIMLAConfig
from mmf_multilevel.methods.simla.downstream import (
    AnswerDecoder,
    ClassifierHead,
    answer_sequence_loss,
    answer_targets,
    distilled_cross_entropy,
    expand_pair_state,
    fuse_pair,
    pair_encoder,
    rank_answers,
    text_assignment_pairs,
)
from mmf_multilevel.methods.simla.grounding import check_gradcam_layer, grounding_scores
from mmf_multilevel.methods.simla.losses import (
    IGNORE_INDEX,
    ITM_MATCH,
    distilled_token_loss,
    itc_loss,
    itm_loss,
    itm_pair_indices,
    mlm_loss,
    psl_loss,
    psl_targets,
    sample_hard_negatives,
)
from mmf_multilevel.methods.simla.momentum import FeatureQueues, MomentumCopies, ramped_alpha
from mmf_multilevel.methods.simla.network import ALBEF_LAYOUT, SIMLATextEncoder
from mmf_multilevel.methods.simla.pretraining import SIMLAPretrainingHeads
from mmf_multilevel.methods.simla.vision import DVAETokenizer, SIMLAImageEncoder, block_mask

__all__ = ["SIMLA", "SIMLABackbone", "MOMENTUM_PAIRS"]

#: the online modules with a momentum copy (the official ``model_pairs``): the ViT (with its mask token), the
#: BERT with its MLM head, both projections, the MIM and concept heads; the ITM head and τ have none
MOMENTUM_PAIRS = ("visual_encoder", "text_encoder", "mlm", "vision_proj", "text_proj", "mim_head", "concept_head")
#: the fine-tuning heads on the multimodal encoder (paper §3.1; results §3.4): their momentum model is the ViT, the BERT and
#: the head (the official VQA / VE / NLVR ``model_pairs``); they build no ITC/ITM/MLM heads and no queues
TASK_HEADS = ("vqa", "snli_ve", "nlvr2", "nlvr2_assignment")
TASK_MOMENTUM_PAIRS = ("visual_encoder", "text_encoder", "classifier")
#: the head types on NLVR2's two-image layout of the BERT (``downstream.pair_encoder``); the text-assignment
#: pre-step has no momentum model (the official ``pretrain_nlvr.py`` distils nothing)
PAIR_HEADS = ("nlvr2", "nlvr2_assignment")
#: SNLI-VE's classes: entailment, neutral, contradiction (the dataset's ``targets``); NLVR2: false, true;
#: text assignment: image 0, image 1, neither
SNLI_VE_CLASSES, NLVR2_CLASSES, ASSIGNMENT_CLASSES = 3, 2, 3
#: the fixed temperature of the text-assignment pre-step's image-image similarities (official: 0.07)
ASSIGNMENT_TEMPERATURE = 0.07

#: the image id of a queued feature in retrieval fine-tuning (the official ``idx_queue``, never written)
UNTRACKED_ID = -100


class SIMLABackbone(nn.Module):
    """The two encoders (paper §2.1): ``image_encoder`` (E_v, a ViT with the MIM mask token) and
    ``text_encoder`` (E_l = E_mm, one BERT with cross-attention in every layer)."""

    def __init__(self, image_encoder: SIMLAImageEncoder, text_encoder: SIMLATextEncoder):
        super().__init__()
        if image_encoder.hidden_size != text_encoder.hidden_size:
            raise ValueError(f"model_config.simla: the ViT width {image_encoder.hidden_size} must equal the BERT "
                             f"hidden_size {text_encoder.hidden_size} (the cross-attention reads the image tokens)")
        self.image_encoder = image_encoder
        self.text_encoder = text_encoder

    @property
    def config(self):
        return self.text_encoder.config

    def forward(self, *args, **kwargs):  # pragma: no cover - the adapter calls the encoders' roles
        raise RuntimeError("SIMLABackbone is a container: call image_encoder / text_encoder")


def _original_ids(input_ids: torch.Tensor, lm_labels: torch.Tensor) -> torch.Tensor:
    """The caption before the dataset's MLM corruption: the label wherever one is predicted."""
    return torch.where(lm_labels >= 0, lm_labels.to(input_ids.dtype), input_ids)


@register_method
class SIMLA(MethodModel):
    """The registered MMF model ``simla`` (see the module docstring and ``defaults.yaml`` beside it)."""

    name = "simla"
    signal_module = "mmf_multilevel.methods.simla.picture"
    config_class = SIMLAConfig
    head_types = ("pretraining", "retrieval", "grounding") + TASK_HEADS

    # ------------------------------------------------------------------ build
    def build_backbone(self):
        s = self.settings
        layout = str(s.layout)
        if layout == ALBEF_LAYOUT and s.mim:
            raise ValueError("model_config.simla.mim: true needs model_config.simla.layout: simla; the ALBEF layout "
                             "(layout: albef) has no MIM (its text layers have no cross-attention for image "
                             "queries): set model_config.simla.mim: false")
        if layout == ALBEF_LAYOUT and self.head_type in PAIR_HEADS:
            raise ValueError(f"model_config.simla.training_head_type: {self.head_type} is built on the SIMLA layout "
                             "(model_config.simla.layout: simla); the ALBEF layout's NLVR2 model is not built")
        fusion = {"layout": layout, "fusion_layer": s.fusion_layer}
        # no mask token in ALBEF's ViT (no MIM) nor in the fine-tuning tasks' (official vit_mask_token: false);
        # retrieval keeps it, so a pre-training checkpoint loads into it as it is
        image = SIMLAImageEncoder(str(s.vit), image_size=int(s.image_size), pretrained=bool(s.vit_pretrained),
                                  mask_token=layout != ALBEF_LAYOUT and self.head_type not in TASK_HEADS,
                                  mask_token_init=str(s.mask_token_init), **dict(s.vit_options))
        if s.bert_model_name:
            text = SIMLATextEncoder.from_bert(str(s.bert_model_name), hidden_dropout_prob=s.hidden_dropout_prob,
                                              attention_probs_dropout_prob=s.attention_probs_dropout_prob, **fusion)
        else:
            text = SIMLATextEncoder.from_config(bert_config_of(s), **fusion)
        if self.head_type in PAIR_HEADS:  # NLVR2: the upper layers duplicated, one copy per image
            text = pair_encoder(text, int(s.nlvr2_shared_layers))
        return SIMLABackbone(image, text)

    def build_head(self, head_type):
        s = self.settings
        backbone = self.backbone
        if head_type in TASK_HEADS:
            self.heads = None
            self.build_task_head(head_type)
            return
        self.heads = SIMLAPretrainingHeads(backbone.config, vision_width=backbone.image_encoder.hidden_size,
                                           embed_dim=s.embed_dim, image_vocab=s.image_vocab, temp=s.temp,
                                           temp_range=tuple(s.temp_range),
                                           # the ALBEF layout: ALBEF's heads (+ the concept head for PSL)
                                           mim_head=str(s.layout) != ALBEF_LAYOUT,
                                           concept_head=str(s.layout) != ALBEF_LAYOUT or bool(s.psl))
        if s.bert_model_name and s.init_mlm_from_bert:
            from mmf_multilevel.modules.heads import bert_pretraining_head_state

            self.heads.mlm.load_bert_state_dict(bert_pretraining_head_state(str(s.bert_model_name)))
        if head_type == "pretraining":
            # retrieval never reads the MLM head: kept (a pre-training checkpoint loads as it is), not tied
            self.heads.tie_to(backbone.text_encoder.word_embeddings)
        if head_type == "grounding":
            check_gradcam_layer(s.gradcam_layer, backbone.text_encoder.num_layers)

    def build_task_head(self, head_type):
        """``classifier``: VQA's answer decoder (its layers from the encoder's ``decoder_from_layer``.. at build
        time; a pre-trained model's by the projects' ``pretrained_state_mapping``) with the tokenised candidate
        answers; SNLI-VE's MLP over three classes."""
        s = self.settings
        encoder = self.backbone.text_encoder
        if head_type == "vqa":
            v = s.vqa
            self.classifier = AnswerDecoder(encoder.config, v.decoder_layers, v.decoder_from_layer)
            self.classifier.init_from_encoder(encoder)
            ids, mask = self._tokenised_answers()
            # rebuilt from the answer list at every build: not in checkpoints
            self.register_buffer("answer_ids", ids, persistent=False)
            self.register_buffer("answer_mask", mask, persistent=False)
        elif head_type == "nlvr2_assignment":
            # the official ta_head and the vision projection its image-image similarities read
            self.classifier = nn.ModuleDict({
                "ta_head": nn.Linear(encoder.hidden_size, ASSIGNMENT_CLASSES),
                "vision_proj": nn.Linear(self.backbone.image_encoder.hidden_size, s.embed_dim)})
        else:
            classes = NLVR2_CLASSES if head_type == "nlvr2" else SNLI_VE_CLASSES
            self.classifier = ClassifierHead(encoder.hidden_size, classes)

    def _tokenised_answers(self):
        from transformers import AutoTokenizer

        from mmf_multilevel.modules.text import load_pretrained
        from mmf_multilevel.processors.answers import AnswerVocabulary

        v = self.settings.vqa
        if not v.answer_list:
            raise ValueError("model_config.simla.vqa.answer_list: the VQA head needs the candidate answers (the "
                             "dataset's answer vocabulary file, one answer per line)")
        answers = AnswerVocabulary(str(v.answer_list), unk_token=None).words
        tokenizer = load_pretrained(AutoTokenizer, str(v.tokenizer))
        tokens = tokenizer(answers, padding="longest", truncation=True, max_length=int(v.max_answer_length),
                           return_tensors="pt")
        ids, mask = tokens["input_ids"], tokens["attention_mask"]
        if ids.size(1) < 3 or int(ids[:, 0].min()) != int(ids[:, 0].max()):
            raise ValueError(f"model_config.simla.vqa.tokenizer {v.tokenizer!r} must wrap each answer as [CLS] "
                             "answer [SEP]")
        if int(ids.max()) >= self.backbone.text_encoder.config.vocab_size:
            raise ValueError(f"model_config.simla.vqa.tokenizer {v.tokenizer!r} gives ids up to {int(ids.max())}; "
                             f"the BERT has {self.backbone.text_encoder.config.vocab_size} words")
        return ids, mask

    def after_build(self):
        s = self.settings
        if self.head_type in TASK_HEADS:
            online = {"visual_encoder": self.backbone.image_encoder, "text_encoder": self.backbone.text_encoder,
                      "classifier": self.classifier}
            self.momentum = (None if self.head_type == "nlvr2_assignment" else
                             MomentumCopies({name: online[name] for name in TASK_MOMENTUM_PAIRS}, momentum=s.momentum))
            self.queues, self.dvae = None, None
            self.alpha = self.alpha_at(self.progress)
            self._optimizer = None
            self.skipped_enqueues = 0
            return
        online = {"visual_encoder": self.backbone.image_encoder, "text_encoder": self.backbone.text_encoder,
                  "mlm": self.heads.mlm, "vision_proj": self.heads.vision_proj, "text_proj": self.heads.text_proj,
                  "mim_head": self.heads.mim_head, "concept_head": self.heads.concept_head}
        self.momentum = MomentumCopies({name: online[name] for name in MOMENTUM_PAIRS if online[name] is not None},
                                       momentum=s.momentum)
        # retrieval fine-tuning may remember each queued feature's image (ALBEF's idx_queue; SIMLA never does)
        track = bool(s.track_queue_ids) and self.head_type in ("retrieval", "grounding")
        self.queues = FeatureQueues(s.embed_dim, s.queue_size, track_ids=track)
        # the frozen dVAE: a plain attribute (outside the state dict, the optimizer, the EMA and .train())
        self.dvae = self._build_tokenizer() if s.mim and self.head_type == "pretraining" else None
        self.alpha = self.alpha_at(self.progress)
        self._optimizer = None
        self.skipped_enqueues = 0

    def _build_tokenizer(self) -> DVAETokenizer:
        s = self.settings
        if s.dvae_path:
            tokenizer = DVAETokenizer.from_file(str(s.dvae_path))
        else:
            tokenizer = DVAETokenizer.random(n_hid=s.dvae_random_hidden, n_blk_per_group=s.dvae_random_blocks,
                                             vocab_size=s.image_vocab)
        if tokenizer.vocab_size != s.image_vocab:
            raise ValueError(f"model_config.simla.dvae_path: the tokenizer has {tokenizer.vocab_size} visual tokens, "
                             f"model_config.simla.image_vocab is {s.image_vocab}")
        return tokenizer

    def adapt_pretrained_tensor(self, name: str, tensor: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
        """A ``pretrained_state_mapping`` load of a checkpoint at another resolution (pre-training at 256²,
        fine-tuning at 384²): the ViT position embeddings, online and momentum, resampled to this model's grid
        (the official ``interpolate_pos_embed``); every other tensor as it is."""
        if name.endswith("vit.pos_embed") and tuple(tensor.shape) != tuple(own.shape):
            from mmf_multilevel.methods.simla.vision import resize_position_embeddings

            return resize_position_embeddings({"pos_embed": tensor}, self.backbone.image_encoder.grid_size)["pos_embed"]
        return tensor

    # ------------------------------------------------------------------ optimisation
    def get_optimizer_parameters(self, config):
        """AdamW groups without the momentum copies (they never require gradients and move only by the EMA)
        and without frozen parameters: weight decay on every weight matrix and on τ, none on biases and
        other 1-D parameters (the official timm ``create_optimizer``: ``ndim == 1`` or ``.bias``)."""
        decay, no_decay = [], []
        for name, parameter in self.trainable_parameters():
            (no_decay if parameter.ndim == 1 or name.endswith(".bias") else decay).append(parameter)
        return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]

    def trainable_parameters(self):
        """``(name, parameter)`` of every parameter an optimizer updates: not the momentum copies."""
        copies = {id(p) for p in self.momentum.parameters()} if self.momentum is not None else set()
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad and id(p) not in copies]

    def configure_optimizer(self, config):
        """AdamW (paper §2.5: weight decay 0.02) over :meth:`get_optimizer_parameters`; its learning rate is
        set by :meth:`on_update_start` (warm-up, then cosine: :meth:`lr_at`)."""
        o = self.settings.optimization
        self._optimizer = torch.optim.AdamW(self.get_optimizer_parameters(config), lr=self.lr_at(self.progress),
                                            weight_decay=o.weight_decay)
        return self._optimizer

    def lr_at(self, progress: TrainingProgress) -> float:
        """Linear warm-up ``warmup_lr -> lr`` over ``warmup_updates``, then a cosine to ``min_lr`` at
        ``total_updates`` (paper §2.5; official ``Pretrain.py`` warms up over 2,000 steps)."""
        o = self.settings.optimization
        step = int(progress.update)
        if step < int(o.warmup_updates):
            return o.warmup_lr + (o.lr - o.warmup_lr) * step / int(o.warmup_updates)
        if o.total_updates is None:
            return o.lr
        span = max(1, int(o.total_updates) - int(o.warmup_updates))
        done = min(1.0, (step - int(o.warmup_updates)) / span)
        return o.min_lr + 0.5 * (o.lr - o.min_lr) * (1 + math.cos(math.pi * done))

    def alpha_at(self, progress: TrainingProgress) -> float:
        """α at the pushed update (paper §2.5: 0 -> alpha over the first epoch = ``alpha_ramp_updates``)."""
        s = self.settings
        if s.alpha_ramp_updates is None:
            return float(s.alpha)
        return ramped_alpha(int(progress.update), int(s.alpha_ramp_updates), float(s.alpha))

    # ------------------------------------------------------------------ training hooks
    def on_update_start(self, progress: TrainingProgress) -> None:
        """Once per optimizer update, before its first forward: the momentum model's EMA step (the official
        ``_momentum_update`` at the start of the teacher block; with gradient accumulation once per update,
        not per forward), α and the learning rate from the pushed update."""
        super().on_update_start(progress)
        if self.momentum is not None:
            self.momentum.update()
        self.alpha = self.alpha_at(progress)
        if self._optimizer is not None:
            lr = self.lr_at(progress)
            for group in self._optimizer.param_groups:
                group["lr"] = lr

    def log_message(self, progress: TrainingProgress):
        if self.heads is None:
            return f"simla: alpha {self.alpha:.3f}"
        return (f"simla: alpha {self.alpha:.3f}, temp {float(self.heads.temp.detach()):.4f}, queue pointer "
                f"{int(self.queues.queue_ptr)} of {self.queues.queue_size}"
                + (f", {self.skipped_enqueues} batches not enqueued" if self.skipped_enqueues else ""))

    # ------------------------------------------------------------------ forward
    def encode(self, sample_list, side=None):
        """The image through the ViT and the caption through the BERT in text mode: the unimodal features."""
        text = text_inputs(sample_list, self.name)
        pixels = pixel_inputs(sample_list, self.name, side=side).pixels
        image = self.backbone.image_encoder(pixels)
        hidden = self.backbone.text_encoder.encode_text(text.input_ids, text.mask)
        return {"image": image, "text": hidden, "pooled": hidden[:, 0],
                "image_feat": self.heads.image_feature(image[:, 0]), "text_feat": self.heads.text_feature(hidden[:, 0])}

    def dvae_view(self, pixels: torch.Tensor) -> torch.Tensor:
        """The dVAE's input: the same (augmented) crop as the ViT's, normalisation undone, resized to half the
        side (256 -> 128: 16x16 tokens, one per ViT patch), in [0, 1]."""
        s = self.settings
        mean = torch.tensor(s.pixel_mean, device=pixels.device, dtype=pixels.dtype).view(1, 3, 1, 1)
        std = torch.tensor(s.pixel_std, device=pixels.device, dtype=pixels.dtype).view(1, 3, 1, 1)
        raw = (pixels * std + mean).clamp(0.0, 1.0)
        side = pixels.shape[-1] // 2
        return F.interpolate(raw, size=(pixels.shape[-2] // 2, side), mode="bilinear", antialias=True,
                             align_corners=False).clamp(0.0, 1.0)

    def pretraining_match_logits(self, sample_list):
        """The ITM head (paper §2, Eq. 5) on the multimodal encoder's [CLS] over (caption i, image i): the online
        model, the caption unmasked."""
        text = text_inputs(sample_list, self.name)
        image_embeds = self.backbone.image_encoder(pixel_inputs(sample_list, self.name).pixels)
        fused = self.backbone.text_encoder.fuse(text.input_ids, text.mask, image_embeds)
        return self.heads.itm_logits(fused[:, 0])

    def pretraining_forward(self, sample_list):
        s, heads, momentum = self.settings, self.heads, self.momentum
        image_encoder, text_encoder = self.backbone.image_encoder, self.backbone.text_encoder
        text = text_inputs(sample_list, self.name)
        pixels = pixel_inputs(sample_list, self.name).pixels
        where = f"dataset_config.{sample_list.dataset_name}"
        if s.mlm and "lm_label_ids" not in sample_list:
            raise KeyError(f"simla pre-training reads its MLM targets from the batch ('lm_label_ids'): give {where} a "
                           "masked_token text_processor with mask_probability > 0 (or model_config.simla.mlm: false)")
        masked_ids, mask = text.input_ids, text.mask
        lm_labels = sample_list["lm_label_ids"].to(masked_ids.device).long() if "lm_label_ids" in sample_list else None
        ids = masked_ids if lm_labels is None else _original_ids(masked_ids, lm_labels)
        alpha = float(self.alpha)
        batch = ids.size(0)
        losses = {}

        # (1) online unimodal features; (2) the momentum model's (its EMA step ran in on_update_start)
        temp = heads.clamp_temperature()
        image_embeds = image_encoder(pixels)
        image_feat = heads.image_feature(image_embeds[:, 0])
        text_hidden = text_encoder.encode_text(ids, mask)
        text_feat = heads.text_feature(text_hidden[:, 0])
        with torch.no_grad():
            image_embeds_m = momentum["visual_encoder"](pixels)
            image_feat_m = F.normalize(momentum["vision_proj"](image_embeds_m[:, 0]), dim=-1)
            text_hidden_m = momentum["text_encoder"].encode_text(ids, mask)
            text_feat_m = F.normalize(momentum["text_proj"](text_hidden_m[:, 0]), dim=-1)

        # (3) ITC with the queues and momentum distillation (Eqs. 1-4)
        itc = itc_loss(image_feat, text_feat, image_feat_m, text_feat_m, self.queues.image_queue,
                       self.queues.text_queue, temp, alpha)
        losses["itc"] = itc.loss

        # (4) ITM: B positives + a hard negative image per text and a hard negative text per image (Eq. 5)
        if batch > 1:
            neg_text, neg_image = sample_hard_negatives(itc.sim_i2t, itc.sim_t2i)
            text_index, image_index = itm_pair_indices(neg_text, neg_image)
            # text_states: the ALBEF layout fuses the text encoder's output (ALBEF's mode="fusion"); SIMLA ignores it
            fused = text_encoder.fuse(ids[text_index], mask[text_index], image_embeds[image_index],
                                      text_states=text_hidden[text_index])
            itm_logits = heads.itm_logits(fused[:, 0])
            losses["itm"] = itm_loss(itm_logits)
        else:  # a batch of one has no in-batch negative (the official loader drops such a last batch)
            itm_logits = heads.itm_logits(text_encoder.fuse(ids, mask, image_embeds, text_states=text_hidden)[:, 0])
            losses["itm"] = itm_logits.sum() * 0.0

        # (5) MLM distilled (Eqs. 6-7): the masked caption reading the online / momentum image tokens
        if s.mlm:
            keep = lm_labels >= 0
            hidden = text_encoder.fuse(masked_ids, mask, image_embeds)
            logits = heads.mlm_logits(hidden[keep])
            teacher = None
            if alpha > 0:
                with torch.no_grad():
                    hidden_m = momentum["text_encoder"].fuse(masked_ids, mask, image_embeds_m)
                    teacher = momentum["mlm"](hidden_m[keep])
            losses["mlm"] = mlm_loss(logits, lm_labels[keep], teacher, alpha)

        # (6) MIM distilled (Eqs. 6-7): block-masked image tokens as BERT queries over the caption's embeddings
        if s.mim:
            losses["mim"] = self._mim_loss(pixels, ids, mask, alpha)

        # (7) PSL (Eqs. 8-9): keywords from the momentum multimodal pass over the online image tokens
        if s.psl:
            with torch.no_grad():
                _, attentions = momentum["text_encoder"].fuse(ids, mask, image_embeds.detach(), output_attentions=True)
                specials = (s.cls_token_id, s.sep_token_id, s.pad_token_id)
                targets = psl_targets(attentions[-1], ids, text_encoder.config.vocab_size, attention_mask=mask,
                                      excluded_ids=specials, cls_token_id=s.cls_token_id,
                                      k_per_head=s.psl_k_per_head, num_labels=s.psl_num_labels,
                                      replicate_official=s.psl_replicate_official)
                teacher = momentum["concept_head"](image_feat_m)
            losses["psl"] = psl_loss(heads.concept_logits(image_feat), targets, teacher, alpha)

        # (8) the momentum features of the global batch into the queues, after the losses (training only)
        if self.training:
            self._enqueue(image_feat_m, text_feat_m)
        return {"losses": self.named_losses(sample_list, losses), "scores": itm_logits}

    def alignment(self, sample_list):
        """The first sample's text-to-patch attention (see :mod:`mmf_multilevel.methods.alignment` for the dict):
        the multimodal encoder (paper §2.1: every layer self-attention, then cross-attention with the text as
        queries and the image tokens ``[CLS] p_1..p_N`` as keys; ALBEF's layout: the fusion layers), the
        cross-attention of the last layer, rows the text positions, columns the patches (at ``1 + k``, row-major
        over the ViT's grid; the image [CLS], no place in the picture, is left out)."""
        from mmf_multilevel.methods.alignment import attention_alignment, first_mask, recorded_attention

        if self.head_type in PAIR_HEADS:
            raise ValueError(f"simla alignment reads one image per text; a {self.head_type} model's encoder reads "
                             "two (its upper layers duplicated per image)")
        vit, encoder = self.backbone.image_encoder, self.backbone.text_encoder
        text = text_inputs(sample_list, self.name)
        pixels = pixel_inputs(sample_list, self.name).pixels
        last = encoder.num_layers - 1
        record, _ = recorded_attention(self, encoder.cross_attention[str(last)].self,
                                       lambda: encoder.fuse(text.input_ids, text.mask, vit(pixels)))
        grid = tuple(int(n) for n in vit.grid_size)
        patch = tuple(int(n) for n in vit.vit.patch_embed.patch_size)
        patches = torch.ones(grid[0] * grid[1], dtype=torch.bool)
        return attention_alignment(record, first_mask(text.mask), 0, patches, 1,
                                   f"cross-attention, text to image patches, layer {last + 1} of {encoder.num_layers}",
                                   extra={"grid": grid, "cell": patch})

    def retrieval_encoders(self):
        """:class:`~mmf_multilevel.methods.simla.retrieval.SIMLADualEncoder` for the head types SIMLA's retrieval
        ranks with (``retrieval``, and ``pretraining`` zero-shot): ITC top-k re-ranked by ITM (paper §3.6)."""
        from mmf_multilevel.methods.simla.retrieval import HEAD_TYPES, SIMLADualEncoder

        return SIMLADualEncoder(self) if self.head_type in HEAD_TYPES else None

    def task_forward(self, sample_list):
        """The fine-tuning head types, each its own forward: :meth:`retrieval_forward`, :meth:`grounding_forward`,
        :meth:`vqa_forward`, :meth:`snli_ve_forward`, :meth:`nlvr2_assignment_forward` (NLVR2 itself goes through
        :meth:`paired_forward`)."""
        return getattr(self, f"{self.head_type}_forward")(sample_list)

    def retrieval_forward(self, sample_list):
        """Retrieval (``training_head_type: retrieval``): the fine-tuning losses on aligned pairs, the ITM match
        logit of every gallery pair (see the module docstring)."""
        if self.training or "pair_image_index" not in sample_list:
            return self.retrieval_losses(sample_list)
        text = text_inputs(sample_list, self.name)
        image_embeds = self.backbone.image_encoder(pixel_inputs(sample_list, self.name).pixels)
        fused = self.backbone.text_encoder.fuse(text.input_ids, text.mask, image_embeds)
        return {"scores": self.heads.itm_logits(fused[:, 0])[:, ITM_MATCH:ITM_MATCH + 1]}

    def grounding_forward(self, sample_list):
        """Weakly supervised grounding (``training_head_type: grounding``; paper §3.1 "Visual Grounding", §3.5):
        trained as retrieval on (image, expression) pairs, no box (:meth:`retrieval_losses`; ``image_index``
        makes the expressions of one image positives); in evaluation also ``scores`` ``(B, proposals)``, each
        proposal's Grad-CAM mass (``grounding.py``), for ``refcoco_accuracy``."""
        output = self.retrieval_losses(sample_list)
        if not self.training:
            output["scores"] = grounding_scores(self, sample_list)
        return output

    def retrieval_losses(self, sample_list):
        """ITC + ITM on aligned (image, caption) pairs (paper §3.1; official ``models/simla/retrieval.py``):
        the ITC hard target of a caption is uniform over the batch's captions of its image (``image_index``;
        without it each pair is its own image), mixed with the momentum model's distribution by α; the
        queue holds the momentum features of earlier batches, all negatives. ITM: the B pairs, a hard
        negative image per caption and a hard negative caption per image drawn from the ITC similarities
        with every pair of the same image excluded."""
        heads, momentum = self.heads, self.momentum
        image_encoder, text_encoder = self.backbone.image_encoder, self.backbone.text_encoder
        text = text_inputs(sample_list, self.name)
        pixels = pixel_inputs(sample_list, self.name).pixels
        ids, mask = text.input_ids, text.mask
        batch = ids.size(0)
        if "image_index" in sample_list:
            image_ids = sample_list["image_index"].to(ids.device).long().view(-1)
        else:
            image_ids = torch.arange(batch, device=ids.device)
        temp = heads.clamp_temperature()
        image_embeds = image_encoder(pixels)
        image_feat = heads.image_feature(image_embeds[:, 0])
        text_hidden = text_encoder.encode_text(ids, mask)
        text_feat = heads.text_feature(text_hidden[:, 0])
        with torch.no_grad():
            image_feat_m = F.normalize(momentum["vision_proj"](momentum["visual_encoder"](pixels)[:, 0]), dim=-1)
            text_feat_m = F.normalize(momentum["text_proj"](momentum["text_encoder"].encode_text(ids, mask)[:, 0]),
                                      dim=-1)
        # SIMLA's official idx_queue is never written: every queued feature is a negative (track_queue_ids: ALBEF's)
        if self.queues.track_ids:  # ALBEF: a queued caption or image of a batch image is a positive too
            queue_ids = self.queues.idx_queue[0]
        else:
            queue_ids = torch.full((self.queues.queue_size,), UNTRACKED_ID, dtype=torch.long, device=ids.device)
        itc = itc_loss(image_feat, text_feat, image_feat_m, text_feat_m, self.queues.image_queue,
                       self.queues.text_queue, temp, float(self.alpha), image_ids=image_ids, queue_ids=queue_ids)
        losses = {"itc": itc.loss}
        if bool((image_ids != image_ids[0]).any()):
            neg_text, neg_image = sample_hard_negatives(itc.sim_i2t, itc.sim_t2i, image_ids=image_ids)
            text_index, image_index = itm_pair_indices(neg_text, neg_image)
            fused = text_encoder.fuse(ids[text_index], mask[text_index], image_embeds[image_index],
                                      text_states=text_hidden[text_index])
            itm_logits = heads.itm_logits(fused[:, 0])
            losses["itm"] = itm_loss(itm_logits)
        else:  # one image in the batch (a short last validation batch): no negative to draw
            itm_logits = heads.itm_logits(text_encoder.fuse(ids, mask, image_embeds, text_states=text_hidden)[:, 0])
            losses["itm"] = itm_logits.sum() * 0.0
        if self.training:
            self._enqueue(image_feat_m, text_feat_m, image_ids if self.queues.track_ids else None)
        return {"losses": self.named_losses(sample_list, losses), "scores": itm_logits[:batch]}

    def _fused_question(self, sample_list, online=True):
        """The image through the ViT and the text through the multimodal BERT reading it (online or momentum)."""
        text = text_inputs(sample_list, self.name)
        pixels = pixel_inputs(sample_list, self.name).pixels
        if online:
            image = self.backbone.image_encoder(pixels)
            return self.backbone.text_encoder.fuse(text.input_ids, text.mask, image), text.mask
        image = self.momentum["visual_encoder"](pixels)
        return self.momentum["text_encoder"].fuse(text.input_ids, text.mask, image), text.mask

    def vqa_forward(self, sample_list):
        """VQA as answer generation (paper §3.1, "Visual Question Answering"; official ``models/simla/vqa.py``): the question through the
        multimodal BERT reading the image; each of its distinct in-list answers (``answers_indices``) decoded
        from the question states, the summed token loss weighted by its share of the annotators (times the
        dataset's ``vqa.dataset_weights``; VG-QA's single ``answer_index`` likewise), summed over the answers and divided by the batch, distilled from the
        momentum ViT, BERT and decoder in training (loss ``vqa``). In evaluation ``scores`` ``(B, C)``: the
        candidate answers ranked by :func:`rank_answers` (the top ``vqa.k_test`` by first-token probability,
        re-scored by their log-likelihood; the rest :data:`~mmf_multilevel.methods.simla.downstream.NOT_RANKED`)."""
        v = self.settings.vqa
        states, mask = self._fused_question(sample_list)
        output = {}
        given = sample_list.get("answers_indices")
        if given is None and sample_list.get("answer_index") is not None:  # VG-QA / GQA: one answer a question
            given = sample_list["answer_index"].view(-1, 1)
        if given is not None:
            weight = float(v.dataset_weights.get(str(sample_list.get("dataset_name", "")), 1.0))
            question, answer, weights = answer_targets(given.to(states.device).long(), weight)
            if question.numel():
                ids, answer_mask = self.answer_ids[answer], self.answer_mask[answer]
                logits = self.classifier(ids, answer_mask, states[question], mask[question])
                teacher, alpha = None, float(self.alpha) if self.training else 0.0
                if alpha > 0:
                    with torch.no_grad():
                        states_m, _ = self._fused_question(sample_list, online=False)
                        teacher = self.momentum["classifier"](ids, answer_mask, states_m[question], mask[question])
                per_answer = answer_sequence_loss(logits, ids, answer_mask, teacher, alpha)
                loss = (weights * per_answer).sum() / states.size(0)
            else:  # no question of the batch has an answer in the candidate list
                loss = states.sum() * 0.0
            output["losses"] = self.named_losses(sample_list, {"vqa": loss})
        if not self.training:
            output["scores"] = rank_answers(self.classifier, states, mask, self.answer_ids, self.answer_mask,
                                            v.k_test, v.count_first_token_twice)
        return output

    def snli_ve_forward(self, sample_list):
        """SNLI-VE (paper §3.1, "Visual Entailment": an MLP on the multimodal [CLS], three classes; official ``models/simla/ve.py``):
        ``scores`` ``(B, 3)``; loss ``snli_ve`` = cross-entropy against ``targets``, distilled from the
        momentum model's classes in training (``(1 - α)·CE + α·soft CE``)."""
        states, _ = self._fused_question(sample_list)

        def teacher():
            return self.momentum["classifier"](self._fused_question(sample_list, online=False)[0][:, 0])

        return self._distilled_classification(sample_list, self.classifier(states[:, 0]), teacher, "snli_ve")

    def _distilled_classification(self, sample_list, logits, teacher, name):
        """``scores`` = ``logits``; with ``targets`` the loss ``name``: cross-entropy, distilled in training from
        ``teacher()`` (the momentum model's logits, computed without gradient) by α."""
        output = {"scores": logits}
        if "targets" in sample_list:
            targets = sample_list["targets"].to(logits.device).long().view(-1)
            alpha = float(self.alpha) if self.training else 0.0
            teacher_logits = None
            if alpha > 0:
                with torch.no_grad():
                    teacher_logits = teacher()
            output["losses"] = self.named_losses(
                sample_list, {name: distilled_cross_entropy(logits, targets, teacher_logits, alpha)})
        return output

    def prepare_pretrained_state(self, state):
        """A checkpoint for a ``pretrained_state_mapping`` load: for NLVR2's layouts a checkpoint of the 12-layer
        encoder (pre-training, retrieval) is read with its upper layers duplicated (official ``Pretrain_NLVR.py``;
        :func:`~mmf_multilevel.methods.simla.downstream.expand_pair_state`); a text-assignment checkpoint is
        already in the layout."""
        if self.head_type not in PAIR_HEADS:
            return state
        return expand_pair_state(state, ("backbone.text_encoder.", "momentum.copies.text_encoder."),
                                 int(self.settings.num_hidden_layers), int(self.settings.nlvr2_shared_layers))

    def paired_forward(self, sample_list):
        """NLVR2 (``training_head_type: nlvr2``; the official ``models/simla/nlvr.py``): both images (``img0``,
        ``img1``) through the ViT, the statement through the 18-layer two-image layout (layer j reading image
        j % 2), the MLP on its [CLS]: ``scores`` ``(B, 2)``; loss ``nlvr2`` = cross-entropy against ``targets``,
        distilled from the momentum model in training."""
        text = text_inputs(sample_list, self.name)
        pixels = [pixel_inputs(sample_list, self.name, side=side).pixels for side in ("img0", "img1")]

        def logits_of(vit, encoder, head):
            images = vit(torch.cat(pixels)).split(pixels[0].size(0))
            return head(fuse_pair(encoder, text.input_ids, text.mask, images)[:, 0])

        def teacher():
            return logits_of(self.momentum["visual_encoder"], self.momentum["text_encoder"], self.momentum["classifier"])

        logits = logits_of(self.backbone.image_encoder, self.backbone.text_encoder, self.classifier)
        return self._distilled_classification(sample_list, logits, teacher, "nlvr2")

    def nlvr2_assignment_forward(self, sample_list):
        """NLVR2's text-assignment pre-step (``training_head_type: nlvr2_assignment``; the official
        ``Pretrain_NLVR.py`` / ``models/simla/pretrain_nlvr.py``) on an image-caption corpus: each caption with
        two images - its own and a similar one (by the vision projection's cosine over 0.07), in a random order,
        or two similar ones - through the two-image layout; a 3-way head says which image it describes (0, 1,
        neither). ``scores`` ``(B, 3)``, loss ``nlvr2_assignment`` (cross-entropy)."""
        text = text_inputs(sample_list, self.name)
        ids = text.input_ids
        if "lm_label_ids" in sample_list:  # a corpus configured with MLM masking: the caption as written
            ids = _original_ids(ids, sample_list["lm_label_ids"].to(ids.device).long())
        image = self.backbone.image_encoder(pixel_inputs(sample_list, self.name).pixels)
        if ids.size(0) < 2:  # a last batch of one caption has no other image to pair it with
            logits = self.classifier["ta_head"](fuse_pair(self.backbone.text_encoder, ids, text.mask, (image, image))[:, 0])
            return {"scores": logits, "losses": self.named_losses(sample_list, {"nlvr2_assignment": logits.sum() * 0.0})}
        with torch.no_grad():
            feature = F.normalize(self.classifier["vision_proj"](image[:, 0]), dim=-1)
            first, second, labels = text_assignment_pairs(feature @ feature.t() / ASSIGNMENT_TEMPERATURE)
        hidden = fuse_pair(self.backbone.text_encoder, ids, text.mask, (image[first], image[second]))
        logits = self.classifier["ta_head"](hidden[:, 0])
        return {"scores": logits,
                "losses": self.named_losses(sample_list, {"nlvr2_assignment": F.cross_entropy(logits, labels)})}

    def _mim_loss(self, pixels, ids, mask, alpha):
        s, heads, momentum = self.settings, self.heads, self.momentum
        image_encoder, text_encoder = self.backbone.image_encoder, self.backbone.text_encoder
        grid = image_encoder.grid_size
        mim_mask = block_mask(pixels.size(0), grid, num_masked=s.mim_masked_patches, min_block=s.mim_min_block,
                              min_aspect=s.mim_min_aspect, device=pixels.device)
        tokens = self.dvae(self.dvae_view(pixels))
        if tokens.shape != mim_mask.shape:
            raise ValueError(f"simla MIM: the dVAE gives {tuple(tokens.shape)} tokens for {tuple(mim_mask.shape)} ViT "
                             "patches (its view is half the image side, stride 8: patch 16 needed)")
        labels = tokens.masked_fill(~mim_mask, IGNORE_INDEX)[mim_mask]
        # the cross-attention memory: the unmasked caption's embedding-layer output of the online BERT, for the
        # student and the teacher alike (official ``text_encoder.bert.embeddings``)
        text_memory = text_encoder.embed(ids)
        masked_embeds = image_encoder(pixels, mim_mask)
        hidden = text_encoder.encode(text_encoder.embed(inputs_embeds=masked_embeds), None, memory=text_memory,
                                     memory_mask=mask)
        logits = heads.mim_head(hidden[:, 1:][mim_mask])
        teacher = None
        if alpha > 0:
            with torch.no_grad():
                teacher_text = momentum["text_encoder"]
                masked_m = momentum["visual_encoder"](pixels, mim_mask)
                hidden_m = teacher_text.encode(teacher_text.embed(inputs_embeds=masked_m), None,
                                               memory=text_memory.detach(), memory_mask=mask)
                teacher = momentum["mim_head"](hidden_m[:, 1:][mim_mask])
        return distilled_token_loss(logits, labels, teacher, alpha)

    @torch.no_grad()
    def _enqueue(self, image_feat_m, text_feat_m, ids=None):
        queues = self.queues
        world = 1
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            world = torch.distributed.get_world_size()
        if queues.queue_size % (image_feat_m.size(0) * world):
            # a short last batch (the official loader drops it): trained on, not enqueued
            self.skipped_enqueues += 1
            return
        queues.enqueue(image_feat_m, text_feat_m, ids)

