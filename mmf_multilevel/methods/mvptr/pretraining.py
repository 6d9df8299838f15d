"""MVPTR's pre-training heads (paper §3.2-§3.3; the losses are in ``losses.py``, the wiring in ``model.py``).

* ``mlm``: BERT's LM head (dense, GELU, LayerNorm, decoder + bias) on the multimodal outputs of the
  text tokens (paper §3.3, "Masked Language Modeling", Eq. 3);
* ``mcr``: a second, separate LM head on the visual-encoder outputs of the masked tags (paper §3.2,
  "Masked Concept Recovering"; the targets are word-pieces, as the official code's ``half_mlm`` predicts them);
* both decoders are **tied** to the first ``vocab_size`` (30,522) rows of the network's shared word table,
  so phrase-concept rows are never predicted (the paper: the MLM vocabulary holds no phrase);
* ``itm``: ``Linear(H, 2)`` on the multimodal pooler output (paper §3.3, "Image-Text Matching", Eq. 4;
  index 1 = matched).

The VSC projections and temperature are on the network (:class:`~.network.MVPTRNetwork`:
``txt_proj``, ``vis_proj``, ``logit_scale``) because uni-modal retrieval uses them as well.
At base size the heads add 1,246,838 parameters (the tied decoders count zero), 198,660,471 with the network.
"""
import torch
from torch import nn

from mmf_multilevel.modules.heads import ITMHead, MLMHead

from .network import MVPTRNetwork

__all__ = ["MVPTRPretrainingHeads"]


class MVPTRPretrainingHeads(nn.Module):
    """MLM, MCR and ITM heads of ``network`` (their decoders share its word table, not a copy)."""

    def __init__(self, network: MVPTRNetwork):
        super().__init__()
        config = network.config
        hidden = config.hidden_size
        heads = dict(hidden_size=hidden, vocab_size=network.vocab_size, hidden_act=config.hidden_act,
                     layer_norm_eps=config.layer_norm_eps, initializer_range=config.initializer_range)
        self.mlm = MLMHead(**heads).tie_to(network.word_embeddings)
        self.mcr = MLMHead(**heads).tie_to(network.word_embeddings)
        self.itm = ITMHead(hidden, 2, initializer_range=config.initializer_range)

    def mlm_logits(self, states: torch.Tensor) -> torch.Tensor:
        """``(..., H)`` multimodal outputs (gather the masked token positions first) -> ``(..., vocab_size)``."""
        return self.mlm(states)

    def mcr_logits(self, states: torch.Tensor) -> torch.Tensor:
        """``(..., H)`` visual-encoder outputs at masked tag positions -> ``(..., vocab_size)``."""
        return self.mcr(states)

    def itm_logits(self, pooled: torch.Tensor) -> torch.Tensor:
        """``(P, H)`` multimodal pooler outputs -> ``(P, 2)``."""
        return self.itm(pooled)
