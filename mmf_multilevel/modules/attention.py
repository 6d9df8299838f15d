"""BERT self-/cross-attention with a faster training path on CPU.

In training with attention dropout, ``scaled_dot_product_attention`` on CPU leaves its flash kernel
for the math path (softmax with NaN guards, then ``bernoulli_`` at ~6 ns an element for the dropout
mask). :class:`FastBertSelfAttention` keeps HF's ``BertSelfAttention`` (its parameters, names and
eager code for every case it does not cover) and computes that case itself: scaled ``q k^T`` plus the
additive mask, softmax, :func:`dropout` (the same Bernoulli(1 - p) keep mask and 1 / (1 - p) scale,
drawn as 31-bit integers compared with ``round(p · 2^31)``, ~2.5x cheaper on CPU), ``@ v``. Without
dropout (evaluation, ``p = 0``) it calls SDPA, whose flash kernel is then the fastest. On CUDA,
where SDPA's fused kernels handle dropout themselves, it always calls SDPA.

:func:`use_fast_attention` swaps it (and :class:`FastDropout` for BERT's other dropouts) into a
model in place (state dict unchanged); :class:`~mmf_multilevel.modules.text.BertTextEncoder` does so
for every encoder it builds.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.bert.modeling_bert import BertSelfAttention

_RANGE = 2 ** 31


class _Dropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, p):
        drop_below = int(round(p * _RANGE))
        keep = torch.empty(x.shape, dtype=torch.int32, device=x.device).random_(0, _RANGE) >= drop_below
        scale = 1.0 / (1.0 - drop_below / _RANGE)
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return x.masked_fill(~keep, 0).mul_(scale)

    @staticmethod
    def backward(ctx, grad):
        (keep,) = ctx.saved_tensors
        return grad.masked_fill(~keep, 0).mul_(ctx.scale), None


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """``F.dropout`` with the keep mask drawn from 31-bit integers (drop probability ``p`` rounded to a
    multiple of 2^-31, the scale exact for it); on CUDA, and when not needed, ``F.dropout`` itself."""
    if not training or p == 0.0:
        return x
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must lie in [0, 1), got {p}")
    if x.device.type != "cpu":
        return F.dropout(x, p, True)
    return _Dropout.apply(x, p)


class FastBertSelfAttention(BertSelfAttention):
    """HF's ``BertSelfAttention`` with the training-time CPU path described in the module docstring."""

    def forward(self, hidden_states, attention_mask=None, head_mask=None, encoder_hidden_states=None, *args, **kwargs):
        plain = (
            not args
            and head_mask is None
            and not kwargs.get("output_attentions")
            and kwargs.get("past_key_values") is None
            and kwargs.get("past_key_value") is None
            and getattr(self, "position_embedding_type", "absolute") == "absolute"
            and not getattr(self, "is_decoder", False)
        )
        if not plain:  # relative positions, caches, returned attention maps, head masks: HF's code
            return super().forward(hidden_states, attention_mask, head_mask, encoder_hidden_states, *args, **kwargs)
        batch, length, _ = hidden_states.shape
        source = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        heads, size = self.num_attention_heads, self.attention_head_size

        def split(x):
            return x.view(batch, -1, heads, size).transpose(1, 2)

        query, key, value = split(self.query(hidden_states)), split(self.key(source)), split(self.value(source))
        p = self.dropout.p if self.training else 0.0
        if p == 0.0 or hidden_states.device.type != "cpu":
            context = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=p)
        else:
            scores = torch.matmul(query * (1.0 / math.sqrt(size)), key.transpose(-1, -2))
            if attention_mask is not None and attention_mask.dtype == torch.bool:  # SDPA's convention: True = attend
                scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
            elif attention_mask is not None:
                scores = scores + attention_mask
            context = torch.matmul(dropout(scores.softmax(dim=-1), p).to(value.dtype), value)
        return context.transpose(1, 2).reshape(batch, length, self.all_head_size), None


class FastDropout(nn.Dropout):
    """``nn.Dropout`` through :func:`dropout`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)


def use_fast_attention(module: nn.Module) -> int:
    """Make every HF ``BertSelfAttention`` (eager or SDPA) inside ``module`` a
    :class:`FastBertSelfAttention` and every plain ``nn.Dropout`` a :class:`FastDropout`, in place:
    the same objects, parameters, hooks and state dict, only their class changes (each new class
    subclasses the old one). Returns how many modules changed."""
    changed = 0
    for child in module.modules():
        if isinstance(child, BertSelfAttention) and not isinstance(child, FastBertSelfAttention):
            child.__class__ = FastBertSelfAttention
            changed += 1
        elif type(child) is nn.Dropout:
            child.__class__ = FastDropout
            changed += 1
    return changed
