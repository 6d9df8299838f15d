"""Heads and helpers of the downstream tasks that every method shares.

* :class:`NLVR2PairedHead` - NLVR2's paired head (VisualBERT, LXMERT, UNITER "paired", μ-VLA):
  the statement is encoded with each image, the two pooled vectors are concatenated (2H) and
  classified true / false.
* :class:`NLVR2PairedAttentionHead` - UNITER's "paired-attn": each pair's sequence attends to the
  other pair's, the attended sequences are mean-pooled, and the concatenation is classified.
* :class:`RegionScoringHead` - one score per region (RefCOCO+): ``Linear(H, H) -> GELU ->
  LayerNorm -> Linear(H, 1)``, padding regions at -1e4.
* :func:`sample_hard_negatives` - in-batch hard negatives for a matching head (ALBEF-style):
  for each image a text, for each text an image, drawn with probability proportional to
  ``softmax(similarity)`` among the batch entries that do not match it.

Initialisation: BERT's (``heads.init_bert_weights``: N(0, ``initializer_range``) weights, zero biases,
unit LayerNorms), as every other head of the package and as UNITER's and MMF VisualBERT's task heads
are initialised.
"""
from typing import Optional, Tuple

import torch
from torch import nn

from mmf_multilevel.modules.heads import init_bert_weights

__all__ = ["NLVR2PairedHead", "NLVR2PairedAttentionHead", "RegionScoringHead", "sample_hard_negatives"]


def _classifier(in_features: int, hidden: int, num_labels: int, layer_norm_eps: float) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(in_features, hidden), nn.GELU(), nn.LayerNorm(hidden, eps=layer_norm_eps), nn.Linear(hidden, num_labels)
    )


class NLVR2PairedHead(nn.Module):
    """``[pooled(text, left) ; pooled(text, right)]`` (2H) -> ``Linear(2H, 2H) -> GELU -> LN -> Linear(2H, 2)``."""

    def __init__(self, hidden_size: int, num_labels: int = 2, dropout: float = 0.1, layer_norm_eps: float = 1e-12,
                 initializer_range: float = 0.02):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.classifier = _classifier(2 * hidden_size, 2 * hidden_size, num_labels, layer_norm_eps)
        init_bert_weights(self, initializer_range)

    def forward(self, pooled_left: torch.Tensor, pooled_right: torch.Tensor) -> torch.Tensor:
        if pooled_left.shape != pooled_right.shape:
            raise ValueError(f"the two pooled outputs differ in shape: {tuple(pooled_left.shape)} vs {tuple(pooled_right.shape)}")
        return self.classifier(self.dropout(torch.cat([pooled_left, pooled_right], dim=-1)))


class NLVR2PairedAttentionHead(nn.Module):
    """UNITER's paired-attention head over the two pairs' full output sequences (B x L x H each)."""

    def __init__(self, hidden_size: int, num_heads: int = 12, num_labels: int = 2, dropout: float = 0.1,
                 layer_norm_eps: float = 1e-12, initializer_range: float = 0.02):
        super().__init__()
        self.attention = nn.MultiheadAttention(hidden_size, num_heads, dropout=dropout, batch_first=True)
        self.dropout = nn.Dropout(dropout)
        self.classifier = _classifier(2 * hidden_size, 2 * hidden_size, num_labels, layer_norm_eps)
        init_bert_weights(self.classifier, initializer_range)

    @staticmethod
    def _pool(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        weights = mask.to(states.dtype).unsqueeze(-1)
        return (states * weights).sum(1) / weights.sum(1).clamp(min=1.0)

    def forward(self, left: torch.Tensor, right: torch.Tensor, left_mask: torch.Tensor, right_mask: torch.Tensor) -> torch.Tensor:
        attended_left, _ = self.attention(left, right, right, key_padding_mask=~right_mask.bool())
        attended_right, _ = self.attention(right, left, left, key_padding_mask=~left_mask.bool())
        pooled = torch.cat([self._pool(attended_left, left_mask), self._pool(attended_right, right_mask)], dim=-1)
        return self.classifier(self.dropout(pooled))


class RegionScoringHead(nn.Module):
    """Per-region score; ``mask`` (B x R, 1 = real region) puts padding at -1e4."""

    def __init__(self, hidden_size: int, layer_norm_eps: float = 1e-12, initializer_range: float = 0.02):
        super().__init__()
        self.transform = nn.Sequential(nn.Linear(hidden_size, hidden_size), nn.GELU(), nn.LayerNorm(hidden_size, eps=layer_norm_eps))
        self.score = nn.Linear(hidden_size, 1)
        init_bert_weights(self, initializer_range)

    def forward(self, regions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        scores = self.score(self.transform(regions)).squeeze(-1)
        return scores.masked_fill(~mask.bool(), -1e4)


def sample_hard_negatives(
    similarity: torch.Tensor,
    image_ids: Optional[torch.Tensor] = None,
    text_image_ids: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(negative text per image, negative image per text) drawn from ``softmax(similarity)``.

    ``similarity``: B_img x B_txt (e.g. contrastive image-text similarity / temperature). Entries
    that match are excluded: by default the diagonal; with ``image_ids`` (B_img) and
    ``text_image_ids`` (B_txt, the image id of each text) every pair of the same image, so two
    captions of one image in a batch are never each other's negative. A query with no
    non-matching candidate raises ``ValueError``.
    """
    sim = similarity.detach().float()
    if image_ids is None:
        if sim.shape[0] != sim.shape[1]:
            raise ValueError(f"a non-square similarity {tuple(sim.shape)} needs image_ids and text_image_ids")
        positive = torch.eye(sim.shape[0], dtype=torch.bool, device=sim.device)
    else:
        positive = image_ids.view(-1, 1).to(sim.device) == text_image_ids.view(1, -1).to(sim.device)
    if (positive.all(dim=1)).any() or (positive.all(dim=0)).any():
        raise ValueError("a query has no non-matching candidate in the batch (batch of one image?)")
    masked = sim.masked_fill(positive, float("-inf"))
    weights_i2t = torch.softmax(masked, dim=1)
    weights_t2i = torch.softmax(masked.t(), dim=1)
    negative_text = torch.multinomial(weights_i2t.cpu(), 1, generator=generator).view(-1).to(sim.device)
    negative_image = torch.multinomial(weights_t2i.cpu(), 1, generator=generator).view(-1).to(sim.device)
    return negative_text, negative_image
