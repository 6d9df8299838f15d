"""The registered MMF model ``mvptr``: MVPTR's network, heads and losses on the adapter base.

``training_head_type: retrieval`` - COCO / Flickr30K fine-tuning (paper §4.2): VSC + ITM with in-batch hard
negatives; evaluation scores the gallery's pairs with the ITM head (through ``mmf_run``) or, faster,
with the paper's two-stage inference (``python -m mmf_multilevel.methods.mvptr.retrieval``); ``retrieval.uni``
is MVPTR-Uni (the VSC similarity alone).

``training_head_type: vqa`` / ``snli_ve`` (paper §4.2): the official heads on the multimodal outputs of
``mvptr_vqa2`` / ``mvptr_snli_ve`` batches (questions / hypotheses with the image's tags).

``training_head_type: refcoco`` (paper §4.2): each proposal of ``mvptr_refcoco_plus`` scored by the cosine
of the multimodal text [CLS] and its region output after ``refcoco.layer`` multimodal layers, trained by
regressing the scores onto the proposals' IoU with the gold box (the official loss).

``training_head_type: pretraining`` - the five losses of paper §3.2-§3.3, weight 1 each (Eq. 5), all
from one forward pass over the batch that ``mvptr_captions`` (``data.py``) gives: captions ``[CLS]
words phrases [SEP]`` with MLM + chain masking already applied (``lm_label_ids``, ``phrase_slots``),
tags ``[CLS] tags [SEP]`` with MCR masking (``tag_ids``, ``tag_mask``, ``mcr_label_ids``), regions
(``image_feature_0`` / ``image_info_0``, 6-d boxes) and ``image_index``:

1. stage 1: the text encoder over the captions, the visual encoder over tags + regions;
2. **MCR** (§3.2): the MCR head on the visual-encoder outputs at the masked tags;
3. **VSC** (§3.3, Eq. 1): symmetric InfoNCE over the batch's global [CLS] embeddings;
4. in-batch hard negatives from the VSC similarities (sampled, or the hardest: ``itm_negatives``),
   never a pair of one image; ``n`` negatives, half (caption, hard image), half (hard caption, image),
   as the official code lays them out;
5. stage 2: **one** multimodal pass over the matched pairs, the negatives and - for WPG's paper negative -
   the (caption, hard image) pairs the ITM half lacks, all built from the stage-1 outputs by index
   (:meth:`~.network.MVPTRNetwork.fuse`: nothing is encoded twice);
6. **ITM** (Eq. 4) on the pooler of the matched (label 1) and negative (label 0) pairs; **MLM** (Eq. 3)
   on the matched pairs' word-pieces; **WPG** (Eq. 2) from the phrase and region outputs: the caption's
   score with its image against its score with the negative image, hinge with margin 0.2.

:meth:`MVPTR.alignment` (the predictor's alignment pictures): the text's attention to the regions in the last
multimodal layer the model runs (the phrase-region cosine of ``picture.py``, §3.3, stays the grounding picture).

Losses ``<split>/<dataset>/{mcr,vsc,itm,mlm,wpg}`` (``pretraining.mcr`` / ``pretraining.wpg`` false:
the paper's Table 4 ablations drop them); ``scores``: the ITM logits (index 1 = matched).
"""

import torch
from torch import nn

from mmf_multilevel.methods.base import MethodModel, register_method
from mmf_multilevel.methods.batch import region_inputs, text_inputs
from mmf_multilevel.methods.config import bert_config_of
from mmf_multilevel.methods.mvptr.config import MVPTRConfig
from mmf_multilevel.methods.mvptr.losses import (
    hard_negatives,
    itm_loss,
    masked_token_loss,
    split_negatives,
    vsc_loss,
    vsc_scale,
    wpg_loss,
    wpg_scores,
)
from mmf_multilevel.methods.mvptr.network import BOX_DIM, MVPTRNetwork, embedding_rows
from mmf_multilevel.methods.mvptr.pretraining import MVPTRPretrainingHeads
from mmf_multilevel.modules.heads import ITMHead, VQAHead, bert_pretraining_head_state, init_bert_weights
from mmf_multilevel.modules.masking import IGNORE_INDEX

__all__ = ["MVPTR"]

#: dropout before the VQA head (the official BiImageBertForVQA)
VQA_DROPOUT = 0.3


def read_id2phrase(path: str) -> dict:
    """``model_config.mvptr.concepts``: the concept tool's vocabulary ``{id: words}``."""
    from mmf_multilevel.methods.mvptr.concepts import read_id2phrase as read

    return read(path, "model_config.mvptr.concepts")


@register_method
class MVPTR(MethodModel):
    """The registered MMF model ``mvptr`` (see the module docstring and ``defaults.yaml`` beside it)."""

    name = "mvptr"
    signal_module = "mmf_multilevel.methods.mvptr.picture"
    config_class = MVPTRConfig
    head_types = ("pretraining", "retrieval", "vqa", "snli_ve", "refcoco")

    # ------------------------------------------------------------------ build
    def build_backbone(self):
        s = self.settings
        id2phrase = read_id2phrase(str(s.concepts)) if s.concepts else None
        rows = s.num_embeddings
        if id2phrase is not None and not s.bert_model_name:
            rows = embedding_rows(id2phrase, s.vocab_size)
        options = dict(region_feature_dim=s.feature_dim, box_dim=BOX_DIM, img_layer_norm=s.img_layer_norm,
                       num_tag_slots=s.num_tag_slots)
        if s.bert_model_name:
            tokenizer = None
            if id2phrase is not None:
                from transformers import AutoTokenizer

                from mmf_multilevel.modules.text import load_pretrained

                tokenizer = load_pretrained(AutoTokenizer, str(s.bert_model_name))
            network = MVPTRNetwork.from_bert(str(s.bert_model_name), id2phrase=id2phrase, tokenizer=tokenizer,
                                             num_embeddings=rows if id2phrase is None else None, **options)
        else:
            network = MVPTRNetwork(bert_config_of(s), rows, **options)
        return network

    def build_head(self, head_type):
        s = self.settings
        config = self.backbone.config
        if head_type == "vqa":  # the official BiImageBertForVQA head (dropout 0.3 on the text [CLS] output)
            if s.num_answers < 1:
                raise ValueError(f"model_config.mvptr.num_answers must be positive for training_head_type: vqa, "
                                 f"got {s.num_answers}")
            self.classifier = VQAHead(config.hidden_size, s.num_answers, intermediate_size=config.hidden_size,
                                      dropout=VQA_DROPOUT, layer_norm_eps=config.layer_norm_eps,
                                      initializer_range=config.initializer_range)
            return
        if head_type == "refcoco":
            r = s.refcoco
            if r.loss not in ("mse_iou", "cross_entropy"):
                raise ValueError(f"model_config.mvptr.refcoco.loss must be 'mse_iou' or 'cross_entropy', got {r.loss!r}")
            if not 1 <= r.layer <= self.backbone.stage_layers:
                raise ValueError(f"model_config.mvptr.refcoco.layer must lie in [1, {self.backbone.stage_layers}] (the "
                                 f"multimodal layers), got {r.layer}")
            self.classifier = RegionCosineScorer(config.hidden_dropout_prob, r.learn_scale)
            return
        if head_type == "snli_ve":
            self.classifier = nn.Sequential(nn.Dropout(config.hidden_dropout_prob), nn.Linear(config.hidden_size, 3))
            init_bert_weights(self.classifier, config.initializer_range)
            return
        if head_type == "retrieval":
            if s.retrieval.itm_negatives not in ("sampled", "hardest", "random"):
                raise ValueError("model_config.mvptr.retrieval.itm_negatives must be 'sampled', 'hardest' or 'random', "
                                 f"got {s.retrieval.itm_negatives!r}")
            self.itm_head = ITMHead(config.hidden_size, 2, dropout=config.hidden_dropout_prob,
                                    initializer_range=config.initializer_range)
            return
        p = s.pretraining
        for key, value, allowed in (("itm_negatives", p.itm_negatives, ("sampled", "hardest", "random")),
                                    ("wpg_negative", p.wpg_negative, ("hard", "random")),
                                    ("wpg_aggregation", p.wpg_aggregation, ("max", "rand_top3"))):
            if value not in allowed:
                raise ValueError(f"model_config.mvptr.pretraining.{key} must be one of {list(allowed)}, got {value!r}")
        self.heads = MVPTRPretrainingHeads(self.backbone)
        if s.bert_model_name and s.pretraining.init_heads_from_bert:
            state = bert_pretraining_head_state(str(s.bert_model_name))
            self.heads.mlm.load_bert_state_dict(state)
            self.heads.mcr.load_bert_state_dict(state)

    def get_optimizer_parameters(self, config):
        """AdamW's groups as the official code: ``optimizer.params.weight_decay`` (pre-training 0.01,
        fine-tuning 0.05) except on biases and LayerNorms (the region LayerNorm included)."""
        decay = float(config.optimizer.params.get("weight_decay", 0.01))
        groups = {True: [], False: []}
        for name, param in self.named_parameters():
            if param.requires_grad:
                groups[not (name.endswith("bias") or "LayerNorm" in name or ".norm." in name)].append(param)
        return [{"params": groups[True], "weight_decay": decay}, {"params": groups[False], "weight_decay": 0.0}]

    # ------------------------------------------------------------------ forward
    def _need(self, sample_list, key, why):
        if key not in sample_list or sample_list[key] is None:
            raise KeyError(f"mvptr pre-training needs '{key}' in the batch ({why}; dataset mvptr_captions gives it)")
        return sample_list[key]

    def encode(self, sample_list, side=None):
        """Stage 1, the two encoders (paper §3.1; the regions of the ``side`` image of a paired batch): ``text``,
        ``text_mask``, ``visual`` (the visual [CLS], the tags, the regions), ``visual_mask``. The callers run
        stage 2 (``backbone.fuse``) on the pairs they need."""
        s = self.settings
        text = text_inputs(sample_list, self.name)
        regions = region_inputs(sample_list, self.name, s.feature_dim, "6d", side=side)
        tag_ids = self._need(sample_list, "tag_ids", "the object tags of the visual encoder")
        tag_mask = self._need(sample_list, "tag_mask", "the object tags of the visual encoder")
        net = self.backbone
        text_states = net.encode_text(text.input_ids, text.mask, text.segment_ids)
        visual, visual_mask = net.encode_visual(tag_ids.to(text_states.device), tag_mask.to(text_states.device),
                                                regions.corrupted, regions.boxes, regions.mask)
        return dict(text=text_states, text_mask=text.mask, visual=visual, visual_mask=visual_mask)

    def pretraining_match_logits(self, sample_list):
        """The ITM head (§3.4) on the clean pair: both encoders, the multimodal pass over (caption i, image i)."""
        out = self.encode(sample_list)
        _, pooled, _ = self.backbone.fuse(out["text"], out["text_mask"], out["visual"], out["visual_mask"])
        return self.heads.itm_logits(pooled)

    def pretraining_forward(self, sample_list):
        p = self.settings.pretraining
        net, heads = self.backbone, self.heads
        out = self.encode(sample_list)
        text, text_mask, visual, visual_mask = out["text"], out["text_mask"], out["visual"], out["visual_mask"]
        device, n, width = text.device, text.size(0), text.size(1)
        losses = {}

        if p.mcr:  # §3.2: masked tags from the visual encoder
            labels = self._need(sample_list, "mcr_label_ids", "the MCR targets").to(device).long()
            chosen = labels != IGNORE_INDEX
            # nothing masked: masked_token_loss gives a zero connected to the graph
            losses["mcr"] = masked_token_loss(heads.mcr_logits(visual[:, : net.num_tag_slots][chosen]), labels[chosen])

        g_t, g_v = net.global_embeddings(text, visual)  # §3.3, Eq. 1
        losses["vsc"], sim = vsc_loss(g_t, g_v, net.logit_scale, p.vsc_max_logit_scale)

        image_ids = sample_list["image_index"].to(device).view(-1) if "image_index" in sample_list else None
        scale = vsc_scale(net.logit_scale, p.vsc_max_logit_scale)
        hard_image, hard_text = hard_negatives(sim, p.itm_negatives, scale=scale, image_ids=image_ids)
        neg_text, neg_image, text_anchored = split_negatives(hard_image, hard_text)
        arange = torch.arange(n, device=device)
        text_index, image_index = [arange, neg_text], [arange, neg_image]
        wpg_rows = None
        if p.wpg and p.wpg_negative == "hard":
            # the row of (caption i, hard image of i) in the multimodal pass, for every caption that has one
            wpg_rows = torch.full((n,), -1, dtype=torch.long, device=device)
            anchored = neg_text[text_anchored]
            wpg_rows[anchored] = n + text_anchored.nonzero().view(-1)
            extra = ((wpg_rows < 0) & (hard_image >= 0)).nonzero().view(-1)
            wpg_rows[extra] = n + neg_text.numel() + torch.arange(extra.numel(), device=device)
            text_index.append(extra)
            image_index.append(hard_image[extra])
        states, pooled, joint_mask = net.fuse(text, text_mask, visual, visual_mask,
                                              torch.cat(text_index), torch.cat(image_index))

        pairs = n + neg_text.numel()
        itm_logits = heads.itm_logits(pooled[:pairs])
        labels = torch.cat([torch.ones(n, dtype=torch.long, device=device),
                            torch.zeros(neg_text.numel(), dtype=torch.long, device=device)])
        losses["itm"] = itm_loss(itm_logits, labels)

        lm_labels = self._need(sample_list, "lm_label_ids", "the MLM targets").to(device).long()
        chosen = lm_labels != IGNORE_INDEX
        losses["mlm"] = masked_token_loss(heads.mlm_logits(states[:n, :width][chosen]), lm_labels[chosen])

        if p.wpg:
            losses["wpg"] = self._wpg(sample_list, states, joint_mask, n, width, wpg_rows, image_ids)
        return {"losses": self.named_losses(sample_list, losses), "scores": itm_logits}

    def task_forward(self, sample_list):
        """VQA (``vqa``) and SNLI-VE (``snli_ve``): the classifier's scores; MMF's configured loss. Retrieval. Aligned pairs (training, and ``eval_pairs: aligned`` validation; ``image_index`` tells
        captions of one image apart): VSC + ITM over the matched pairs and ``n`` in-batch hard negatives
        (§4.2), losses ``<split>/<dataset>/{vsc,itm}``. Gallery pairs (``pair_image_index``, ``eval_pairs:
        all``): their ITM scores (index 1 = matched); with ``retrieval.uni`` (MVPTR-Uni) the VSC similarity
        alone, as the log-odds of the 2-column scores, with no multimodal pass."""
        net = self.backbone
        out = self.encode(sample_list)
        if self.head_type == "refcoco":
            return self.refcoco_forward(sample_list, out)
        if self.head_type in ("vqa", "snli_ve"):
            states, pooled, _ = net.fuse(out["text"], out["text_mask"], out["visual"], out["visual_mask"])
            # VQA reads the multimodal text [CLS] output, SNLI-VE the pooler (the official heads)
            return {"scores": self.classifier(states[:, 0] if self.head_type == "vqa" else pooled)}
        r = self.settings.retrieval
        text, text_mask, visual, visual_mask = out["text"], out["text_mask"], out["visual"], out["visual_mask"]
        g_t, g_v = net.global_embeddings(text, visual)
        if self.training or "pair_image_index" not in sample_list:  # aligned pairs: the fine-tuning losses
            device, n = text.device, text.size(0)
            loss_vsc, sim = vsc_loss(g_t, g_v, net.logit_scale, self.settings.pretraining.vsc_max_logit_scale)
            image_ids = sample_list["image_index"].to(device).view(-1) if "image_index" in sample_list else None
            scale = vsc_scale(net.logit_scale, self.settings.pretraining.vsc_max_logit_scale)
            hard_image, hard_text = hard_negatives(sim, r.itm_negatives, scale=scale, image_ids=image_ids)
            neg_text, neg_image, _ = split_negatives(hard_image, hard_text)
            arange = torch.arange(n, device=device)
            _, pooled, _ = net.fuse(text, text_mask, visual, visual_mask, torch.cat([arange, neg_text]),
                                    torch.cat([arange, neg_image]))
            logits = self.itm_head(pooled)
            labels = torch.cat([torch.ones(n, dtype=torch.long, device=device),
                                torch.zeros(neg_text.numel(), dtype=torch.long, device=device)])
            losses = {"vsc": loss_vsc, "itm": itm_loss(logits, labels)}
            return {"losses": self.named_losses(sample_list, losses), "scores": logits[:n]}
        if r.uni:
            similarity = (g_t * g_v).sum(-1) * vsc_scale(net.logit_scale, self.settings.pretraining.vsc_max_logit_scale)
            return {"scores": torch.stack([-similarity / 2, similarity / 2], dim=-1)}
        _, pooled, _ = net.fuse(text, text_mask, visual, visual_mask)
        return {"scores": self.itm_head(pooled)}

    def retrieval_encoders(self):
        """:class:`~mmf_multilevel.methods.mvptr.retrieval.MVPTRDualEncoder` for a model with an ITM head
        (``retrieval``, ``pretraining``): VSC top-k re-ranked by ITM (paper §4.2), or the VSC similarity alone
        with ``retrieval.uni`` (MVPTR-Uni, §4.3)."""
        from mmf_multilevel.methods.mvptr.retrieval import MVPTRDualEncoder

        return MVPTRDualEncoder(self) if self.head_type in ("retrieval", "pretraining") else None

    def alignment(self, sample_list):
        """The first sample's text-to-region attention (see :mod:`mmf_multilevel.methods.alignment` for the dict):
        stage 2, the multimodal encoder over ``[text (T) ; regions (K)]`` (paper §3.3; the visual [CLS] and the
        tags stay in stage 1), the self-attention of its last layer - of layer ``refcoco.layer`` for a RefCOCO+
        model, whose scores read that layer's outputs - rows the text positions (words, and phrases when the
        text has them), columns the regions (at ``T + k``)."""
        from mmf_multilevel.methods.alignment import attention_alignment, first_mask, recorded_attention

        net = self.backbone
        layers = self.settings.refcoco.layer if self.head_type == "refcoco" else net.stage_layers

        def run():
            out = self.encode(sample_list)
            net.fuse(out["text"], out["text_mask"], out["visual"], out["visual_mask"], num_layers=layers)
            return out

        record, out = recorded_attention(self, net.multimodal_layers[layers - 1].attention.self, run)
        width = out["text"].size(1)
        return attention_alignment(record, first_mask(out["text_mask"]), 0,
                                   first_mask(out["visual_mask"][:, net.num_tag_slots:]), width,
                                   f"multimodal self-attention, text to regions, layer {layers} of "
                                   f"{net.stage_layers}")

    def refcoco_forward(self, sample_list, out):
        """RefCOCO+ (paper §4.2; the official BiImageBertForRE): every proposal scored by the cosine of the text
        [CLS] and the region's multimodal output after ``refcoco.layer`` layers; loss ``<split>/<dataset>/refcoco``:
        ``mse_iou`` - the scores regressed onto the proposals' IoU with the gold box (the official loss) - or
        ``cross_entropy`` over the proposals with the best one as target. Padding proposals score -inf."""
        from mmf_multilevel.evaluation.grounding import pairwise_iou

        r = self.settings.refcoco
        net = self.backbone
        states, _, mask = net.fuse(out["text"], out["text_mask"], out["visual"], out["visual_mask"], num_layers=r.layer)
        width = out["text"].size(1)
        region_mask = mask[:, width:].bool()
        scores = self.classifier(states[:, 0], states[:, width:])
        shown = scores.masked_fill(~region_mask, float("-inf"))
        if "gold_box" not in sample_list:
            return {"scores": shown}
        if r.loss == "cross_entropy":
            targets = sample_list["targets"].to(scores.device).long().view(-1)
            loss = torch.nn.functional.cross_entropy(shown.float(), targets, ignore_index=-100)
        else:
            boxes = sample_list["proposal_boxes"].to(scores.device).float()
            gold = sample_list["gold_box"].to(scores.device).float().view(-1, 4)
            iou = torch.stack([pairwise_iou(b, g.unsqueeze(0)).squeeze(1) for b, g in zip(boxes, gold)])
            squared = (scores.float() - iou[:, : scores.size(1)]) ** 2
            loss = squared[region_mask].mean() if bool(region_mask.any()) else scores.sum() * 0.0
        return {"losses": self.named_losses(sample_list, {"refcoco": loss}), "scores": shown}

    def _wpg(self, sample_list, states, joint_mask, n, width, wpg_rows, image_ids):
        """Eq. 2's hinge: each caption's phrase-region score with its image against the negative image's."""
        p = self.settings.pretraining
        device = states.device
        phrases = self._need(sample_list, "phrase_slots", "the phrase positions WPG reads; pretraining.wpg: false "
                             "trains without WPG").to(device).long()
        regions, region_mask = states[:, width:], joint_mask[:, width:]
        positive, has_phrase = wpg_scores(states[:n, :width], phrases, regions[:n], region_mask[:n], p.wpg_aggregation)
        if p.wpg_negative == "hard":
            valid = has_phrase & (wpg_rows >= 0)
            rows = wpg_rows.clamp(min=0)
            negative, _ = wpg_scores(states[rows, :width], phrases, regions[rows], region_mask[rows], p.wpg_aggregation)
        elif p.wpg_negative == "random":
            other = _random_other_image(n, image_ids, device)
            valid = has_phrase & (other >= 0)
            other = other.clamp(min=0)
            negative, _ = wpg_scores(states[:n, :width], phrases, regions[other], region_mask[other], p.wpg_aggregation)
        else:
            raise ValueError(f"model_config.mvptr.pretraining.wpg_negative must be 'hard' or 'random', "
                             f"got {p.wpg_negative!r}")
        return wpg_loss(positive, negative, valid, p.wpg_margin)


class RegionCosineScorer(nn.Module):
    """``scale · cos(dropout(text [CLS]), dropout(region))`` per region (the official RefCOCO+ scorer; ``scale``
    starts at 1 and is learned unless ``learn_scale`` is false, where it stays 1 as in the official code)."""

    def __init__(self, dropout: float, learn_scale: bool = True):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.scale = nn.Parameter(torch.ones(()), requires_grad=bool(learn_scale))

    def forward(self, cls_state: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
        text = torch.nn.functional.normalize(self.dropout(cls_state).float(), dim=-1)
        region = torch.nn.functional.normalize(self.dropout(regions).float(), dim=-1)
        return self.scale * (region @ text.unsqueeze(-1)).squeeze(-1)


def _random_other_image(n, image_ids, device):
    """For each sample a uniformly drawn sample of another image (``-1`` when the batch has none)."""
    ids = image_ids if image_ids is not None else torch.arange(n, device=device)
    allowed = (ids.view(-1, 1) != ids.view(1, -1)).float()
    out = torch.full((n,), -1, dtype=torch.long, device=device)
    has = allowed.sum(1) > 0
    if bool(has.any()):
        out[has] = torch.multinomial(allowed[has], 1).view(-1)
    return out
