"""SIMLA's fine-tuning heads and their losses (paper §3.1 "Visual Question Answering", "Visual Entailment";
results §3.4; the official ``models/simla/{vqa,ve,nlvr}.py``).

Plain PyTorch (no MMF); the adapter (``model.py``) composes them.

* **VQA as answer generation** (paper §3.1, "Following [ALBEF] ... an auto-regressive decoder ... restricted to a
  predefined set of candidate answers"): :class:`AnswerDecoder`, a 6-layer BERT decoder (causal self-attention,
  cross-attention to the multimodal encoder's question states, an LM head tied to its own word embeddings) with
  [CLS] as the start and [SEP] as the end of an answer. Training: :func:`answer_sequence_loss` per answer,
  weighted by how many annotators gave it (:func:`answer_targets`), summed and divided by the batch
  (the official ``loss.sum() / image.size(0)``), distilled from the momentum decoder. Inference:
  :func:`rank_answers` ranks every candidate by the probability of its first token, keeps the top ``k`` and
  re-scores them by their full log-likelihood.
* **SNLI-VE and NLVR2 classification** (paper §3.1, "Visual Entailment"; NLVR2 as the official code): :class:`ClassifierHead`, an MLP (hidden -> hidden, ReLU,
  -> classes) on the multimodal [CLS], trained by :func:`distilled_cross_entropy` (the official
  ``(1 - α)·CE + α·soft CE`` against the momentum head's softmax).
* **NLVR2's two-image layout** (the paper gives no method for NLVR2; the official code follows ALBEF): the
  12-layer BERT becomes 18 layers (:func:`pair_encoder`; checkpoints of the 12-layer encoder are read through
  :func:`expand_pair_state`), the lower 6 kept once and each upper layer duplicated, layer j cross-attending to
  image ``j % 2`` (:func:`fuse_pair`), the two copies of a layer sharing their cross-attention keys and values;
  a text-assignment pre-step (:func:`text_assignment_pairs`) teaches it which image a caption describes.
"""
import copy
import re
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig
from transformers.models.bert.modeling_bert import BertAttention, BertEmbeddings, BertLayer

from mmf_multilevel.methods.simla.network import SIMLATextEncoder
from mmf_multilevel.modules.attention import use_fast_attention
from mmf_multilevel.modules.heads import MLMHead, init_bert_weights
from mmf_multilevel.modules.text import extended_attention_mask, mask_compute_dtype

__all__ = ["AnswerDecoder", "ClassifierHead", "answer_sequence_loss", "answer_targets", "rank_answers",
           "distilled_cross_entropy", "NOT_RANKED", "pair_layer_sources", "pair_encoder", "tie_pair_cross_attention",
           "expand_pair_state", "fuse_pair", "text_assignment_pairs"]

#: the score of a candidate answer outside a question's top k (ranked last by the accuracy metric's argmax)
NOT_RANKED = -1.0e4


class AnswerDecoder(nn.Module):
    """The VQA answer decoder (the official ``BertLMHeadModel`` with ``fusion_layer = 0``, 6 layers): word +
    position embeddings, BERT layers whose self-attention is causal and whose cross-attention reads the
    question states, and an LM head (BERT's ``cls.predictions`` shape) tied to the decoder's word embeddings.

    The layers are numbered as the encoder layers they start from (``first_layer`` .. ``first_layer +
    num_layers - 1``: ``layers.6`` .. ``layers.11`` at base size), so a ``pretrained_state_mapping`` entry
    ``classifier.layers: backbone.text_encoder.text.bert.encoder.layer`` copies encoder layer n into decoder
    layer n whatever the depth; their module names are the encoder's (``attention``, ``intermediate``,
    ``output``; ``cross_attention.<n>``; ``embeddings.{word_embeddings,position_embeddings,LayerNorm}``)."""

    def __init__(self, config: BertConfig, num_layers: int = 6, first_layer: int = 6):
        super().__init__()
        num_layers, first_layer = int(num_layers), int(first_layer)
        if num_layers < 1 or first_layer < 0:
            raise ValueError(f"model_config.simla.vqa: decoder_layers ({num_layers}) must be positive and "
                             f"decoder_from_layer ({first_layer}) not negative")
        if getattr(config, "_attn_implementation", None) is None:  # a config no BertModel has seen yet
            config = copy.deepcopy(config)
            config._attn_implementation = "eager"
        self.config = config
        self.numbers = [str(first_layer + i) for i in range(num_layers)]
        self.embeddings = BertEmbeddings(config)
        del self.embeddings.token_type_embeddings  # as the encoder's (no token types)
        self.layers = nn.ModuleDict({n: BertLayer(config) for n in self.numbers})
        self.cross_attention = nn.ModuleDict({n: BertAttention(config) for n in self.numbers})
        self.lm = MLMHead.from_config(config)
        init_bert_weights(self, config.initializer_range)
        self.lm.tie_to(self.embeddings.word_embeddings)
        use_fast_attention(self)

    @property
    def num_layers(self) -> int:
        return len(self.numbers)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        emb = self.embeddings
        if input_ids.size(1) > self.config.max_position_embeddings:
            raise ValueError(f"answer length {input_ids.size(1)} exceeds max_position_embeddings="
                             f"{self.config.max_position_embeddings}")
        positions = torch.arange(input_ids.size(1), device=input_ids.device)
        hidden = emb.word_embeddings(input_ids) + emb.position_embeddings(positions).unsqueeze(0)
        return emb.dropout(emb.LayerNorm(hidden))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, states: torch.Tensor,
                states_mask: torch.Tensor) -> torch.Tensor:
        """``(N, L)`` answer ids (``[CLS] answer [SEP]``, zero-padded) and their 0/1 mask, read left to right
        while cross-attending to ``states`` ``(N, Q, H)`` (0/1 ``states_mask`` ``(N, Q)``): the next-token logits
        ``(N, L, V)`` (position t predicts token t + 1)."""
        if input_ids.dim() != 2 or tuple(attention_mask.shape) != tuple(input_ids.shape):
            raise ValueError(f"answer ids {tuple(input_ids.shape)} and mask {tuple(attention_mask.shape)} must be "
                             "the same (answers, length)")
        hidden = self.embed(input_ids)
        length = input_ids.size(1)
        causal = torch.ones(length, length, dtype=torch.bool, device=input_ids.device).tril()
        dtype = mask_compute_dtype(hidden)
        self_mask = extended_attention_mask(causal.unsqueeze(0) & attention_mask.bool().unsqueeze(1), dtype)
        memory_mask = extended_attention_mask(states_mask, dtype)
        for n in self.numbers:
            layer = self.layers[n]
            attended = layer.attention(hidden, attention_mask=self_mask)[0]
            attended = self.cross_attention[n](attended, attention_mask=memory_mask, encoder_hidden_states=states)[0]
            hidden = layer.output(layer.intermediate(attended), attended)
        return self.lm(hidden)

    @torch.no_grad()
    def init_from_encoder(self, encoder: SIMLATextEncoder, lm: Optional[MLMHead] = None) -> None:
        """The official initialisation (``VQA.py``) from a model's own encoder: the embeddings, each decoder layer
        n (self-attention, cross-attention, FFN) from encoder layer n, the LM head from ``lm`` when given."""
        missing = [n for n in self.numbers if int(n) >= encoder.num_layers or n not in encoder.cross_attention]
        if missing:
            raise ValueError(f"model_config.simla.vqa.decoder_from_layer: decoder layers {self.numbers} start from "
                             f"encoder layers that a {encoder.num_layers}-layer encoder does not have")
        source = encoder.text.bert.embeddings.state_dict()
        self.embeddings.load_state_dict({k: v for k, v in source.items() if "token_type" not in k}, strict=False)
        for n in self.numbers:
            self.layers[n].load_state_dict(encoder.blocks[int(n)].state_dict())
            self.cross_attention[n].load_state_dict(encoder.cross_attention[n].state_dict())
        if lm is not None:
            self.lm.load_state_dict({k: v for k, v in lm.state_dict().items() if k != "decoder.weight"}, strict=False)


def answer_sequence_loss(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                         teacher_logits: Optional[torch.Tensor] = None, alpha: float = 0.0) -> torch.Tensor:
    """Per answer: the summed next-token cross-entropy over its real tokens after the start ([CLS]), i.e. the
    negative log-likelihood of ``answer [SEP]``; with ``teacher_logits`` (the momentum decoder's, same shape)
    ``(1 - α)·CE + α·Σ_t -softmax(teacher_t)·log_softmax(student_t)`` (the official ``BertLMHeadModel`` with
    ``soft_labels``; the soft term over the vocabulary axis). Returns ``(N,)``."""
    student = logits[:, :-1].float()
    targets = input_ids[:, 1:]
    valid = attention_mask[:, 1:].to(student.dtype)
    hard = F.cross_entropy(student.transpose(1, 2), targets, reduction="none")
    loss = (hard * valid).sum(1)
    if teacher_logits is not None and alpha > 0:
        soft = -(F.softmax(teacher_logits[:, :-1].float(), dim=-1) * F.log_softmax(student, dim=-1)).sum(-1)
        loss = (1.0 - alpha) * loss + alpha * (soft * valid).sum(1)
    return loss


def answer_targets(answers_indices: torch.Tensor, weight: float = 1.0
                   ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The answers a question is trained on and their weights (the official VQA dataset: each distinct answer
    once, weighted by the share of annotators who gave it; VG-QA's weight 0.5 through ``weight``).
    ``answers_indices`` ``(B, A)``: the annotators' answers as candidate-list indices, -1 for an answer outside
    the list (or no answer). Returns ``question`` ``(N,)`` (the row of each pair), ``answer`` ``(N,)`` and
    ``weights`` ``(N,)``; a question's weights sum to ``weight`` over its in-list answers (an answer outside the
    list is not trained on: the shares are of the in-list answers)."""
    if answers_indices.dim() != 2:
        raise ValueError(f"answers_indices must be (batch, answers); got {tuple(answers_indices.shape)}")
    questions, answers, weights = [], [], []
    for row, indices in enumerate(answers_indices.tolist()):
        given = [i for i in indices if i >= 0]
        for answer in sorted(set(given)):
            questions.append(row)
            answers.append(answer)
            weights.append(weight * given.count(answer) / len(given))
    device = answers_indices.device
    return (torch.tensor(questions, dtype=torch.long, device=device),
            torch.tensor(answers, dtype=torch.long, device=device),
            torch.tensor(weights, dtype=torch.float, device=device))


@torch.no_grad()
def rank_answers(decoder: AnswerDecoder, states: torch.Tensor, states_mask: torch.Tensor,
                 answer_ids: torch.Tensor, answer_mask: torch.Tensor, k: int,
                 count_first_token_twice: bool = False) -> torch.Tensor:
    """Scores ``(B, C)`` of the C candidate answers for B questions (the official ``rank_answer``): the decoder
    reads the start token ([CLS]) once per question; every candidate is ranked by the probability of its first
    token; the top ``k`` are decoded in full and scored by their log-likelihood (``log p(answer [SEP])``); the
    others get :data:`NOT_RANKED`. ``count_first_token_twice``: the official score, which adds the first
    token's log-probability to a likelihood that already holds it."""
    batch, candidates = states.size(0), answer_ids.size(0)
    if answer_ids.size(1) < 2:
        raise ValueError("the candidate answers must be tokenised as [CLS] answer [SEP] (at least 2 tokens)")
    k = max(1, min(int(k), candidates))
    start = answer_ids[:1, :1].expand(batch, 1)
    first = decoder(start, torch.ones_like(start), states, states_mask)[:, 0].float().log_softmax(-1)
    first = first.index_select(1, answer_ids[:, 1])
    top_first, top = first.topk(k, dim=1)
    ids = answer_ids[top.reshape(-1)]
    mask = answer_mask[top.reshape(-1)]
    logits = decoder(ids, mask, states.repeat_interleave(k, 0), states_mask.repeat_interleave(k, 0))
    score = -answer_sequence_loss(logits, ids, mask).view(batch, k)
    if count_first_token_twice:
        score = score + top_first
    scores = torch.full((batch, candidates), NOT_RANKED, dtype=score.dtype, device=score.device)
    return scores.scatter(1, top, score)


class ClassifierHead(nn.Module):
    """The official ``cls_head``: Linear(hidden, hidden), ReLU, Linear(hidden, classes) on the multimodal [CLS]
    (SNLI-VE: 3 classes; NLVR2: 2)."""

    def __init__(self, hidden_size: int, num_classes: int):
        super().__init__()
        if int(num_classes) < 2:
            raise ValueError(f"model_config.simla: a classifier needs at least 2 classes, got {num_classes}")
        self.mlp = nn.Sequential(nn.Linear(hidden_size, hidden_size), nn.ReLU(), nn.Linear(hidden_size, num_classes))

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.mlp(pooled)


def distilled_cross_entropy(logits: torch.Tensor, targets: torch.Tensor,
                            teacher_logits: Optional[torch.Tensor] = None, alpha: float = 0.0) -> torch.Tensor:
    """``(1 - α)·CE(logits, targets) + α·mean_b(-Σ_c softmax(teacher)·log_softmax(logits))`` (the official
    SNLI-VE / NLVR2 loss with momentum distillation); plain CE without a teacher."""
    hard = F.cross_entropy(logits.float(), targets)
    if teacher_logits is None or alpha <= 0:
        return hard
    soft = -(F.softmax(teacher_logits.float(), dim=-1) * F.log_softmax(logits.float(), dim=-1)).sum(-1).mean()
    return (1.0 - alpha) * hard + alpha * soft


# ---------------------------------------------------------------------- NLVR2: the two-image layout
def pair_layer_sources(num_layers: int, shared: int) -> List[int]:
    """For each layer of the NLVR2 layout, the layer of the ``num_layers``-layer encoder it starts from (the
    official ``Pretrain_NLVR.py``): layers ``0 .. shared - 1`` once, every layer ``l >= shared`` twice, as layers
    ``shared + 2 (l - shared)`` and ``shared + 2 (l - shared) + 1``. 12 layers, ``shared`` 6: 18 layers."""
    if not 0 <= int(shared) < int(num_layers):
        raise ValueError(f"model_config.simla.nlvr2_shared_layers: {shared} must lie in [0, {num_layers}) (the "
                         "encoder's layers below it are kept once, the others duplicated)")
    return list(range(shared)) + [layer for layer in range(shared, num_layers) for _ in range(2)]


def tie_pair_cross_attention(encoder: SIMLATextEncoder, shared: int) -> None:
    """The official ``share_cross_attention``: the two copies of a duplicated layer (``shared + 2i`` and
    ``shared + 2i + 1``) share their cross-attention key and value projections (the image keys/values), the
    queries and outputs stay separate."""
    for first in range(int(shared), encoder.num_layers, 2):
        one, two = encoder.cross_attention[str(first)].self, encoder.cross_attention[str(first + 1)].self
        one.key.weight, one.key.bias = two.key.weight, two.key.bias
        one.value.weight, one.value.bias = two.value.weight, two.value.bias


def pair_encoder(encoder: SIMLATextEncoder, shared: int) -> SIMLATextEncoder:
    """The NLVR2 layout of ``encoder``: a new :class:`SIMLATextEncoder` whose layer j (self-attention,
    cross-attention, FFN) is a copy of the encoder's layer ``pair_layer_sources(...)[j]``, the embeddings copied,
    the cross-attention keys/values of each duplicated pair tied (:func:`tie_pair_cross_attention`)."""
    if len(encoder.cross_attention) != encoder.num_layers:
        raise ValueError("the NLVR2 layout needs a cross-attention in every layer (model_config.simla.layout: simla)")
    sources = pair_layer_sources(encoder.num_layers, shared)
    fields = encoder.config.to_dict()
    fields["num_hidden_layers"] = len(sources)
    config = BertConfig(**fields)
    config._attn_implementation = encoder.config._attn_implementation
    paired = SIMLATextEncoder.from_config(config)
    with torch.no_grad():
        paired.text.bert.embeddings.load_state_dict(encoder.text.bert.embeddings.state_dict())
        for target, source in enumerate(sources):
            paired.blocks[target].load_state_dict(encoder.blocks[source].state_dict())
            paired.cross_attention[str(target)].load_state_dict(encoder.cross_attention[str(source)].state_dict())
    tie_pair_cross_attention(paired, shared)
    return paired


def expand_pair_state(state: Dict[str, torch.Tensor], prefixes: Sequence[str], num_layers: int,
                      shared: int) -> Dict[str, torch.Tensor]:
    """A checkpoint of the ``num_layers``-layer encoder read in the NLVR2 layout: for each text encoder under
    ``prefixes`` (``backbone.text_encoder.``, ``momentum.copies.text_encoder.``) that has ``num_layers`` layers,
    every ``...layer.<l>.`` / ``cross_attention.<l>.`` entry of a layer ``l >= shared`` is written as its two
    copies; other entries as they are. A checkpoint already in the NLVR2 layout is returned unchanged."""
    sources = pair_layer_sources(num_layers, shared)
    targets: Dict[int, List[int]] = {}
    for target, source in enumerate(sources):
        targets.setdefault(source, []).append(target)
    out: Dict[str, torch.Tensor] = {}
    pattern = re.compile(r"^(?P<head>(?:text\.bert\.encoder\.layer|cross_attention)\.)(?P<n>\d+)(?P<rest>\..*)$")
    for key, value in state.items():
        prefix = next((p for p in prefixes if key.startswith(p)), None)
        match = pattern.match(key[len(prefix):]) if prefix is not None else None
        if match is None:
            out[key] = value
            continue
        layers = {int(m.group("n")) for k in state if k.startswith(prefix)
                  for m in [pattern.match(k[len(prefix):])] if m}
        if max(layers) + 1 != num_layers:  # already expanded (a text-assignment checkpoint), or foreign
            out[key] = value
            continue
        for target in targets[int(match.group("n"))]:
            out[f"{prefix}{match.group('head')}{target}{match.group('rest')}"] = value
    return out


def fuse_pair(encoder: SIMLATextEncoder, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor],
              images: Sequence[torch.Tensor], image_masks: Optional[Sequence[Optional[torch.Tensor]]] = None
              ) -> torch.Tensor:
    """The statement through the NLVR2 layout from its embeddings, layer j cross-attending to ``images[j % 2]``
    (the official xbert with a list of ``encoder_hidden_states`` and ``fusion_layer = 0``). Returns ``(B, L, H)``."""
    if len(images) != 2:
        raise ValueError(f"fuse_pair reads two images, got {len(images)}")
    hidden = encoder.embed(input_ids)
    batch, length, _ = hidden.shape
    dtype = mask_compute_dtype(hidden)
    if attention_mask is None:
        attention_mask = torch.ones(batch, length, dtype=torch.long, device=hidden.device)
    extended = extended_attention_mask(attention_mask, dtype)
    masks = []
    for index, image in enumerate(images):
        given = None if image_masks is None else image_masks[index]
        if given is None:
            given = torch.ones(image.shape[:2], dtype=torch.long, device=image.device)
        masks.append(extended_attention_mask(given, dtype))
    for layer in range(encoder.num_layers):
        hidden, _, _ = encoder.run_block(layer, hidden, extended, images[layer % 2], masks[layer % 2])
    return hidden


#: text-assignment labels (the official ``pretrain_nlvr.py``): the caption describes image 0, image 1, or neither
ASSIGN_FIRST, ASSIGN_SECOND, ASSIGN_NEITHER = 0, 1, 2


def text_assignment_pairs(similarity: torch.Tensor, generator: Optional[torch.Generator] = None
                          ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The text-assignment pre-step's image pairs (official ``pretrain_nlvr.py``): for caption b, with probability
    2/3 its own image and one drawn from ``softmax(similarity[b])`` without b, in a random order (label = the slot
    of b's image); otherwise two images drawn from that distribution (label 2, neither). ``similarity`` ``(B, B)``:
    the image-image similarities over the temperature. Returns the image indices of slot 0 and slot 1 and the
    labels, each ``(B,)``. A batch of two (a short last batch) has one other image: no "neither" pair."""
    batch = similarity.size(0)
    if batch < 2:
        raise ValueError(f"text assignment needs at least 2 images in a batch (another to draw), got {batch}")
    eye = torch.eye(batch, dtype=torch.bool, device=similarity.device)
    weights = similarity.float().masked_fill(eye, float("-inf")).softmax(dim=1)
    drawn = torch.multinomial(weights, min(2, batch - 1), generator=generator)
    drawn = torch.cat([drawn, drawn], dim=1) if drawn.size(1) == 1 else drawn
    own = torch.arange(batch, device=similarity.device)
    roll = torch.rand(batch, generator=generator, device=similarity.device if generator is None else None)
    order = torch.rand(batch, generator=generator, device=similarity.device if generator is None else None)
    roll, order = roll.to(similarity.device), order.to(similarity.device)
    matched = (roll > 1 / 3) | (batch < 3)
    first_slot = matched & (order > 0.5)
    slot0 = torch.where(matched, torch.where(first_slot, own, drawn[:, 0]), drawn[:, 0])
    slot1 = torch.where(matched, torch.where(first_slot, drawn[:, 0], own), drawn[:, 1])
    labels = torch.where(matched, torch.where(first_slot, ASSIGN_FIRST, ASSIGN_SECOND), ASSIGN_NEITHER)
    return slot0, slot1, labels.long()
