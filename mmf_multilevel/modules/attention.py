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

:func:`record_attention` is a context manager under which every :class:`FastBertSelfAttention` inside a
model also keeps its attention probabilities ``(batch, heads, queries, keys)`` - the softmax of the scaled
``q k^T`` plus the layer's additive or boolean mask, before dropout - keyed by the module's qualified
name, with whether it was cross-attention (``encoder_hidden_states`` given). The layer's output is
computed as without it; outside the context a forward pass does one thread-local lookup more.
"""
import contextlib
import math
import threading
from typing import Dict, Iterable, List, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.bert.modeling_bert import BertSelfAttention

_RANGE = 2 ** 31

__all__ = ["FastBertSelfAttention", "FastDropout", "dropout", "use_fast_attention", "AttentionRecord",
           "AttentionRecorder", "record_attention", "attention_scores"]


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


def attention_scores(query: torch.Tensor, key: torch.Tensor, attention_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """``q k^T / sqrt(d)`` of ``(B, heads, S, d)`` queries and ``(B, heads, K, d)`` keys plus ``attention_mask``:
    additive (BERT's: 0 or a large negative number, broadcast to ``(B, heads, S, K)``) or boolean (SDPA's
    convention: True = attend). Its softmax over the keys is the attention of the layer."""
    scores = torch.matmul(query * (1.0 / math.sqrt(query.size(-1))), key.transpose(-1, -2))
    if attention_mask is not None and attention_mask.dtype == torch.bool:
        return scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
    if attention_mask is not None:
        return scores + attention_mask
    return scores


class FastBertSelfAttention(BertSelfAttention):
    """HF's ``BertSelfAttention`` with the training-time CPU path described in the module docstring."""

    def forward(self, hidden_states, attention_mask=None, head_mask=None, encoder_hidden_states=None, *args, **kwargs):
        recorders = _active_recorders()
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
            out = super().forward(hidden_states, attention_mask, head_mask, encoder_hidden_states, *args, **kwargs)
            for recorder in recorders:
                recorder.observe(self, lambda: out[1], encoder_hidden_states is not None)
            return out
        batch, length, _ = hidden_states.shape
        source = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        heads, size = self.num_attention_heads, self.attention_head_size

        def split(x):
            return x.view(batch, -1, heads, size).transpose(1, 2)

        query, key, value = split(self.query(hidden_states)), split(self.key(source)), split(self.value(source))
        for recorder in recorders:
            recorder.observe(self, lambda: attention_scores(query, key, attention_mask).softmax(dim=-1),
                             encoder_hidden_states is not None)
        p = self.dropout.p if self.training else 0.0
        if p == 0.0 or hidden_states.device.type != "cpu":
            context = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=p)
        else:
            scores = attention_scores(query, key, attention_mask)
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


# ---------------------------------------------------------------------------------------------- recording
class AttentionRecord(NamedTuple):
    """One call of a recorded attention module."""

    name: str  # the module's qualified name under the recorder's root
    probs: torch.Tensor  # (batch, heads, queries, keys), detached
    cross: bool  # cross-attention: the keys were encoder_hidden_states


class AttentionRecorder:
    """What :func:`record_attention` yields: ``records[name]`` lists the calls of that module in order (a
    module run twice in one pass, as SemVLP's shared blocks in two-stream mode, has two)."""

    def __init__(self, root: nn.Module, names: Optional[Iterable[str]] = None):
        modules = {name: module for name, module in root.named_modules() if isinstance(module, FastBertSelfAttention)}
        if names is not None:
            names = list(names)
            missing = [name for name in names if name not in modules]
            if missing:
                raise KeyError(f"no FastBertSelfAttention named {missing} in {type(root).__name__} (its attention "
                               f"modules: {sorted(modules)[:8]}{' ...' if len(modules) > 8 else ''})")
            modules = {name: modules[name] for name in names}
        self._names = {id(module): name for name, module in modules.items()}
        self.records: Dict[str, List[AttentionRecord]] = {}

    def observe(self, module: nn.Module, probabilities, cross: bool) -> None:
        name = self._names.get(id(module))
        if name is None:
            return
        probs = probabilities()
        if not isinstance(probs, torch.Tensor):
            raise RuntimeError(f"{name}: the attention code returned no probabilities to record")
        self.records.setdefault(name, []).append(AttentionRecord(name, probs.detach(), bool(cross)))

    def last(self, name: str) -> AttentionRecord:
        """The last call of module ``name``; a clear error when it did not run."""
        calls = self.records.get(name)
        if not calls:
            raise KeyError(f"attention module {name} did not run while recording (recorded: {sorted(self.records)})")
        return calls[-1]


_LOCAL = threading.local()


def _active_recorders() -> tuple:
    return getattr(_LOCAL, "recorders", ())


@contextlib.contextmanager
def record_attention(root: nn.Module, names: Optional[Iterable[str]] = None):
    """While active (in this thread), every :class:`FastBertSelfAttention` under ``root`` (only those named
    ``names``, qualified names under ``root``, when given) records its attention probabilities on each call;
    yields the :class:`AttentionRecorder`. Outputs are unchanged; nothing is recorded once the block ends."""
    recorder = AttentionRecorder(root, names)
    previous = _active_recorders()
    _LOCAL.recorders = previous + (recorder,)
    try:
        yield recorder
    finally:
        _LOCAL.recorders = previous
