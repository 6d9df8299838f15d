"""μ-VLA's network: a single-stream BERT over text (or tags) and regions (paper §3.1).

The network (:class:`MuVLANetwork`, a plain ``nn.Module``) is a single-stream BERT over
``[text ; regions]``:

* text: BERT's word + position + token-type embeddings (with BERT's LayerNorm; without it when
  ``embedding_style: released``, as the official code runs);
* regions: ``LN_v(W_v f) + LN_b(W_b loc5)`` with the 5-d location ``[x1/W, y1/H, x2/W, y2/H, wh/WH]``
  (:class:`~mmf_multilevel.modules.visual.RegionEmbedding`). ``embedding_style: paper`` (default,
  paper §3.1) adds the token-type embedding of segment 1 and a LayerNorm over the sum;
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
choices behind switches: MRM averaged over the masked regions (``mrm_normalization:
masked``) or the official ``Σ_masked / (B·N) × 6.67`` (``official``); MRFR against the unmasked
features with L2 (``mse``) or smooth-L1; the ITM re-weighting ``w = p_match`` (detached; 1 for
shuffled negatives) applied per pair to the R-P and I-S losses (``itm_weighting: per_pair``) or,
as the official code does, as the batch-mean weight times the batch-mean MLM / ITM loss of every
dataset, R-T included (``batch_mean``).

The network imports no MMF; heads and losses are in :mod:`~mmf_multilevel.methods.muvla.pretraining`,
the registered adapter in :mod:`~mmf_multilevel.methods.muvla.model`.
"""
from typing import Dict, Optional

import torch
from torch import nn
from transformers import BertConfig

from mmf_multilevel.modules.text import BertTextEncoder
from mmf_multilevel.modules.visual import RegionEmbedding

__all__ = ["TASKS", "TASK_IDS", "EMBEDDING_STYLES", "MuVLANetwork"]

#: pre-training tasks and the integer ids the datasets put in ``muvla_task`` ("text": text-only MLM,
#: U-VisualBERT's unpaired text)
TASKS = ("region_tag", "region_phrase", "image_sentence", "text")
TASK_IDS = {name: i for i, name in enumerate(TASKS)}
EMBEDDING_STYLES = ("paper", "released", "visual_bert")

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
