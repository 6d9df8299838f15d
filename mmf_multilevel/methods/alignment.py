"""Text-to-visual alignment read from a method's own attention (:meth:`MethodModel.alignment
<mmf_multilevel.methods.base.MethodModel.alignment>`).

Each method names the layer where its text attends to its visual units (the last one, unless it has a better
signal of its own) and runs the part of its network that computes it, under
:func:`~mmf_multilevel.modules.attention.record_attention`. :func:`recorded_attention` does that recording and
:func:`attention_alignment` turns the recorded probabilities of the batch's first sample into the dict every
method returns:

* ``weights`` ``(T, K)`` float: the attention of each attended text position to each visual unit, averaged over
  the heads (what a row leaves over went to text positions or to a global visual unit, so a row sums to at most 1);
* ``text_positions`` ``(T,)`` long: the positions in ``input_ids`` the rows are (every position the text mask
  keeps, special tokens included);
* ``visual_valid`` ``(K,)`` bool: the real visual units (padding regions or cells False);
* ``source``: the layer and signal in words; ``layer``: the attention module's qualified name in the model.

Pixel methods add ``grid`` ``(rows, columns)`` and ``cell`` ``(height, width)``: column ``k`` is the grid cell
``divmod(k, columns)`` covering that many pixels of the model's input image (row-major); region methods' column
``k`` is region ``k`` of the sample's ``image_feature_0``.
"""
from typing import Callable, Dict, Optional, Tuple

import torch
from torch import nn

from mmf_multilevel.modules.attention import AttentionRecord, record_attention

__all__ = ["module_name", "recorded_attention", "attention_alignment", "first_mask"]


def module_name(root: nn.Module, module: nn.Module) -> str:
    """The qualified name of ``module`` under ``root``."""
    for name, candidate in root.named_modules():
        if candidate is module:
            return name
    raise KeyError(f"{type(module).__name__} is not a submodule of {type(root).__name__}")


def recorded_attention(root: nn.Module, module: nn.Module, run: Callable[[], object]
                       ) -> Tuple[AttentionRecord, object]:
    """``run()`` (without gradients) while ``module`` (an attention module under ``root``) records: its last
    call's :class:`~mmf_multilevel.modules.attention.AttentionRecord` and ``run``'s result."""
    name = module_name(root, module)
    with torch.no_grad(), record_attention(root, [name]) as recorder:
        output = run()
    return recorder.last(name), output


def first_mask(mask: torch.Tensor) -> torch.Tensor:
    """Row 0 of a ``(B, N)`` 0/1 or bool mask, as bool on the CPU."""
    return mask[0].detach().bool().cpu()


def attention_alignment(record: AttentionRecord, text_mask: torch.Tensor, text_offset: int,
                        visual_valid: torch.Tensor, visual_offset: int, source: str, transpose: bool = False,
                        normalise: bool = False, extra: Optional[Dict] = None) -> Dict:
    """The alignment dict of the first sample from a recorded attention call.

    ``text_mask`` ``(T,)``: the sample's text positions to keep as rows, found at ``text_offset + t`` along the
    queries (along the keys with ``transpose``: an attention whose queries are the visual units);
    ``visual_valid`` ``(K,)``: the visual units, at ``visual_offset + k`` along the keys (the queries with
    ``transpose``). ``normalise``: each row divided by its sum over the valid units (a row of a transposed
    attention is no distribution). ``source`` gets ``, mean of <n> heads`` appended; ``extra`` is merged in."""
    probs = record.probs[0].float()  # (heads, queries, keys)
    if transpose:
        probs = probs.transpose(-1, -2)
    heads, queries, keys = probs.shape
    text_positions = text_mask.nonzero().view(-1)
    rows = text_offset + text_positions
    columns = visual_offset + torch.arange(visual_valid.numel())
    if len(rows) and int(rows.max()) >= queries or len(columns) and int(columns.max()) >= keys:
        raise ValueError(f"{record.name}: the attention is {queries} x {keys} (queries x keys), too small for text rows "
                         f"{rows.tolist()} and visual columns {visual_offset}..{visual_offset + len(columns) - 1}")
    weights = probs.mean(0).cpu()[rows][:, columns]
    if normalise:
        weights = weights * visual_valid.to(weights.dtype)
        weights = weights / weights.sum(1, keepdim=True).clamp_min(torch.finfo(weights.dtype).tiny)
    out = {"weights": weights, "text_positions": text_positions, "visual_valid": visual_valid.clone(),
           "source": f"{source}, mean of {heads} heads", "layer": record.name}
    out.update(extra or {})
    return out
