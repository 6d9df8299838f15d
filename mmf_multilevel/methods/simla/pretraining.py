"""SIMLA's pre-training heads (paper §2.1-§2.4). Heads only: the losses are in ``losses.py``.

* ITC projections g_v, g_l (paper §2.2): ``vision_proj`` Linear(768, 256) on the image [CLS] and
  ``text_proj`` Linear(768, 256) on the text [CLS], each followed by L2 normalisation;
* the learnable temperature τ (``temp``), initialised to 0.07 and clamped to [0.001, 0.5] (the official
  code clamps it in place at every step: :meth:`SIMLAPretrainingHeads.clamp_temperature`);
* ITM (paper §2.2): Linear(768, 2) on the multimodal [CLS];
* MLM (paper §2.3): BERT's LM head (dense, GELU, LayerNorm, decoder + bias), its decoder tied to the
  word embeddings (:meth:`~SIMLAPretrainingHeads.tie_to`);
* MIM (paper §2.3): ``mim_head`` Linear(768, 8192) on the BERT outputs at the image-token positions;
* the concept (PSL) head (paper §2.4): Linear(256, vocabulary) on the *projected, normalised* image
  feature (the official ``concept_head(image_feat)``), one logit per tokenizer word.

The linear heads keep PyTorch's default initialisation, as the official ``nn.Linear`` modules do; the
MLM head starts from BERT's ``cls.predictions`` weights when they are loaded (``MLMHead.load_bert_state_dict``).
"""
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig

from mmf_multilevel.modules.heads import MLMHead

__all__ = ["EMBED_DIM", "IMAGE_VOCAB", "TEMP_INIT", "TEMP_RANGE", "SIMLAPretrainingHeads"]

EMBED_DIM = 256
IMAGE_VOCAB = 8192
TEMP_INIT = 0.07
TEMP_RANGE = (0.001, 0.5)


class SIMLAPretrainingHeads(nn.Module):
    """The heads above the two encoders. ``config``: the BERT config (hidden size, vocabulary, LM-head
    settings); ``vision_width``: the ViT width; ``mim_head`` / ``concept_head``: whether to build those two
    (the ALBEF layout has no MIM head, and a concept head only with PSL)."""

    def __init__(self, config: BertConfig, vision_width: int = 768, embed_dim: int = EMBED_DIM,
                 image_vocab: int = IMAGE_VOCAB, temp: float = TEMP_INIT,
                 temp_range: Tuple[float, float] = TEMP_RANGE, mim_head: bool = True, concept_head: bool = True):
        super().__init__()
        low, high = (float(v) for v in temp_range)
        if not 0.0 < low <= float(temp) <= high:
            raise ValueError(f"model_config.simla.temp: {temp} must lie in the clamp range "
                             f"model_config.simla.temp_range {list(temp_range)} (0 < low <= temp <= high)")
        if int(embed_dim) < 1 or int(image_vocab) < 1:
            raise ValueError(f"model_config.simla.embed_dim ({embed_dim}) and model_config.simla.image_vocab "
                             f"({image_vocab}) must be positive")
        hidden = config.hidden_size
        self.temp_range = (low, high)
        self.vision_proj = nn.Linear(vision_width, embed_dim)
        self.text_proj = nn.Linear(hidden, embed_dim)
        self.itm_head = nn.Linear(hidden, 2)
        self.mlm = MLMHead.from_config(config)
        # None where the model has no such head (the ALBEF layout: no MIM; no concept head without PSL)
        self.mim_head = nn.Linear(hidden, image_vocab) if mim_head else None
        self.concept_head = nn.Linear(embed_dim, config.vocab_size) if concept_head else None
        self.temp = nn.Parameter(torch.tensor(float(temp)))

    def tie_to(self, word_embeddings: nn.Embedding) -> "SIMLAPretrainingHeads":
        """Share the MLM decoder weight with the text encoder's word embeddings."""
        self.mlm.tie_to(word_embeddings)
        return self

    def clamp_temperature(self) -> torch.Tensor:
        """Clamp τ in place to ``temp_range`` (no gradient through the clamp) and return it."""
        with torch.no_grad():
            self.temp.clamp_(*self.temp_range)
        return self.temp

    def image_feature(self, image_cls: torch.Tensor) -> torch.Tensor:
        """g_v: ``(B, 768)`` image [CLS] -> ``(B, 256)`` unit vectors."""
        return F.normalize(self.vision_proj(image_cls), dim=-1)

    def text_feature(self, text_cls: torch.Tensor) -> torch.Tensor:
        """g_l: ``(B, 768)`` text [CLS] -> ``(B, 256)`` unit vectors."""
        return F.normalize(self.text_proj(text_cls), dim=-1)

    def itm_logits(self, multimodal_cls: torch.Tensor) -> torch.Tensor:
        return self.itm_head(multimodal_cls)

    def mlm_logits(self, text_hidden: torch.Tensor) -> torch.Tensor:
        return self.mlm(text_hidden)

    def mim_logits(self, image_hidden: torch.Tensor) -> torch.Tensor:
        """``(B, 1 + N, H)`` BERT outputs of the MIM pass -> ``(B, N, 8192)`` (the [CLS] position dropped)."""
        return self.mim_head(image_hidden[:, 1:])

    def concept_logits(self, image_feature: torch.Tensor) -> torch.Tensor:
        """``(B, 256)`` normalised image feature -> ``(B, vocabulary)`` keyword logits."""
        return self.concept_head(image_feature)
