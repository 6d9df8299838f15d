"""SemVLP's network: one shared transformer run in single-stream and two-stream modes (paper §3.1-§3.2).

The network (:class:`SemVLPNetwork`, a plain ``nn.Module``) holds one stack of ``L`` BERT blocks
(self-attention + FFN). Both ways of running it use these same module instances:

* **single-stream**: ``[IMG] o_1 .. o_N [CLS] w_1 .. [SEP]`` (objects first, then text, as the paper
  writes ``S^0 = {o', e}``) goes through the ``L`` blocks with full attention;
* **two-stream**: the text goes through the ``L`` blocks alone, giving ``H^L``; the objects go
  through the same ``L`` blocks alone, and in blocks ``l > L_s`` (``cross_layer_start``) an extra
  cross-attention module attends from the object states to the text's **last-layer** states ``H^L``
  (text -> image only). Those cross-attention modules are the only mode-specific parameters.

Objects are ``Linear([f ; x1/W, y1/H, x2/W, y2/H])`` (2048 + 4 -> H), a learned ``[IMG]`` vector
prepended, then LayerNorm and dropout (:class:`~mmf_multilevel.modules.visual.RegionEmbedding`,
``style="concat"``). The summary token read by ITM / QA / the task heads is ``h_CLS`` in
single-stream mode (sequence index ``1 + N``, not 0) and ``o_IMG`` in two-stream mode, both through
one shared BERT pooler (dense + tanh).

Parameter counts at BERT-base size (``python -m mmf_multilevel.methods.semvlp --counts``):
the network used by the single-stream mode has 111,061,248 parameters (BERT-base 109,482,240 with its
pooler + the 2,052 -> 768 object projection, its LayerNorm and [IMG]: the paper's "110M"); each
cross-attention module adds 2,363,904, so the two-stream mode with the modules of blocks 7-12 only
(``cross_attention_layers: upper``, the default) has 125,244,672 and with a module in all 12 blocks
(``cross_attention_layers: all``; only those above ``L_s`` are run) 139,428,096 (the paper's "140M").

The network imports no MMF; the registered adapter is :mod:`mmf_multilevel.methods.semvlp.model`.
"""
from typing import Dict, List, Optional

import torch
from torch import nn
from transformers import BertConfig
from transformers.models.bert.modeling_bert import BertAttention

from mmf_multilevel.modules.attention import use_fast_attention
from mmf_multilevel.modules.heads import init_bert_weights
from mmf_multilevel.modules.text import BertTextEncoder, extended_attention_mask, mask_compute_dtype
from mmf_multilevel.modules.visual import RegionEmbedding

__all__ = ["MODES", "SINGLE", "TWO", "CROSS_LAYOUTS", "SemVLPNetwork", "check_mode", "describe_cross_layout"]

SINGLE, TWO = "single", "two"
MODES = (SINGLE, TWO)
CROSS_LAYOUTS = ("upper", "all")
BOX_DIM = 4  # (x1/W, y1/H, x2/W, y2/H)


def check_mode(mode: str, key: str = "mode") -> str:
    if mode not in MODES:
        raise ValueError(f"{key} must be one of {list(MODES)}, got {mode!r}")
    return mode


class SemVLPNetwork(nn.Module):
    """Embeddings, the shared block stack, the cross-attention modules and the summary pooler.

    ``text``: a :class:`BertTextEncoder` (with its pooler); its ``layers`` are the shared blocks,
    used by both modes and both streams. ``cross_layer_start`` is ``L_s``: blocks with 1-based index
    ``l > L_s`` (0-based ``i >= L_s``) get text -> image cross-attention in two-stream mode.
    ``cross_attention_layers``: ``"upper"`` builds modules only for those blocks, ``"all"`` one per block
    (the paper's 140M; ``L_s`` can then change at run time without new parameters).
    """

    def __init__(
        self,
        text: BertTextEncoder,
        feature_dim: int = 2048,
        cross_layer_start: int = 6,
        cross_attention_layers: str = "upper",
    ):
        super().__init__()
        if text.pooler is None:
            raise ValueError("SemVLPNetwork needs a BertTextEncoder built with its pooler (add_pooling_layer=True)")
        config = text.config
        num_layers = config.num_hidden_layers
        if cross_attention_layers not in CROSS_LAYOUTS:
            raise ValueError(f"cross_attention_layers must be one of {list(CROSS_LAYOUTS)}, got {cross_attention_layers!r}")
        if not 0 <= int(cross_layer_start) <= num_layers:
            raise ValueError(f"cross_layer_start (L_s) must lie in [0, {num_layers}] (num_hidden_layers), got {cross_layer_start}")
        self.text = text
        self.num_layers = num_layers
        self.cross_attention_layers = cross_attention_layers
        self._cross_layer_start = int(cross_layer_start)
        self.objects = RegionEmbedding(
            feature_dim=feature_dim,
            hidden_size=config.hidden_size,
            box_dim=BOX_DIM,
            style="concat",
            dropout=config.hidden_dropout_prob,
            layer_norm=True,
            img_token=True,
            layer_norm_eps=config.layer_norm_eps,
            initializer_range=config.initializer_range,
        )
        first = 0 if cross_attention_layers == "all" else self._cross_layer_start
        # key = 0-based block index; BertAttention fed encoder_hidden_states = multi-head cross-attention
        # with its own output dense + residual + LayerNorm (LXMERT's cross-attention layer)
        self.cross_attention = nn.ModuleDict({str(i): BertAttention(config) for i in range(first, num_layers)})
        init_bert_weights(self.cross_attention, config.initializer_range)
        use_fast_attention(self.cross_attention)

    # ------------------------------------------------------------------ structure
    @property
    def config(self) -> BertConfig:
        return self.text.config

    @property
    def hidden_size(self) -> int:
        return self.text.hidden_size

    @property
    def feature_dim(self) -> int:
        return self.objects.feature_dim

    @property
    def blocks(self) -> nn.ModuleList:
        """The ``L`` shared blocks (``BertLayer``: ``attention`` = φ_S, ``intermediate``/``output`` = φ_F)."""
        return self.text.layers

    @property
    def cross_layer_start(self) -> int:
        return self._cross_layer_start

    @cross_layer_start.setter
    def cross_layer_start(self, value: int) -> None:
        value = int(value)
        if not 0 <= value <= self.num_layers:
            raise ValueError(f"cross_layer_start (L_s) must lie in [0, {self.num_layers}], got {value}")
        missing = [i for i in range(value, self.num_layers) if str(i) not in self.cross_attention]
        if missing:
            raise ValueError(
                f"L_s={value} needs cross-attention in blocks {[i + 1 for i in missing]}, which this network was built "
                "without; build it with cross_attention_layers='all' to change L_s after construction"
            )
        self._cross_layer_start = value

    def cross_module(self, index: int) -> Optional[nn.Module]:
        """φ_C of 0-based block ``index`` when two-stream mode uses one there, else None."""
        if index < self._cross_layer_start:
            return None
        return self.cross_attention[str(index)]

    def mode_parameters(self, mode: str) -> List[nn.Parameter]:
        """The parameters a forward pass in ``mode`` uses (each once)."""
        check_mode(mode)
        unused = set()
        for key, module in self.cross_attention.items():
            if mode == SINGLE or int(key) < self._cross_layer_start:
                unused.update(id(p) for p in module.parameters())
        return [p for p in self.parameters() if id(p) not in unused]

    def num_parameters(self, mode: str) -> int:
        return sum(p.numel() for p in self.mode_parameters(mode))

    # ------------------------------------------------------------------ inputs
    def embed_text(self, input_ids: torch.Tensor, segment_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """BERT word + segment + position embeddings (positions count from the text's [CLS])."""
        return self.text.embed(input_ids, token_type_ids=segment_ids)

    def embed_objects(self, features: torch.Tensor, boxes: torch.Tensor, region_mask: Optional[torch.Tensor] = None):
        """``(B, N, D)`` features + ``(B, N, 4)`` normalised boxes -> ``(B, 1 + N, H)`` with [IMG] first, and its mask."""
        return self.objects(features, boxes, region_mask)

    # ------------------------------------------------------------------ blocks
    def run_block(
        self,
        index: int,
        hidden: torch.Tensor,
        extended_mask: torch.Tensor,
        memory: Optional[torch.Tensor] = None,
        memory_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Shared block ``index``: φ_F(φ_S(x)), or φ_F(φ_C(φ_S(x), memory)) when ``memory`` is given."""
        block = self.blocks[index]
        attended = block.attention(hidden, attention_mask=extended_mask)[0]
        if memory is not None:
            cross = self.cross_module(index)
            if cross is None:
                raise RuntimeError(f"block {index + 1} has no cross-attention (L_s = {self._cross_layer_start})")
            attended = cross(attended, attention_mask=memory_mask, encoder_hidden_states=memory)[0]
        return block.output(block.intermediate(attended), attended)

    def _stack(self, hidden, mask, memory=None, memory_mask=None, output_hidden_states=False):
        dtype = mask_compute_dtype(hidden)
        extended = extended_attention_mask(mask, dtype)
        memory_extended = extended_attention_mask(memory_mask, dtype) if memory is not None else None
        states = [hidden] if output_hidden_states else None
        for index in range(self.num_layers):
            use_memory = memory is not None and index >= self._cross_layer_start
            hidden = self.run_block(
                index, hidden, extended, memory if use_memory else None, memory_extended if use_memory else None
            )
            if output_hidden_states:
                states.append(hidden)
        return hidden, states

    # ------------------------------------------------------------------ modes
    def single_stream(self, text_embeddings, text_mask, object_embeddings, object_mask, output_hidden_states=False):
        """``[objects ; text]`` through the shared blocks. Returns ``objects (B, 1+N, H)``, ``text (B, T, H)``."""
        num_objects = object_embeddings.size(1)
        hidden = torch.cat([object_embeddings, text_embeddings], dim=1)
        mask = torch.cat([object_mask.long(), text_mask.long()], dim=1)
        hidden, states = self._stack(hidden, mask, output_hidden_states=output_hidden_states)
        out = {"objects": hidden[:, :num_objects], "text": hidden[:, num_objects:], "sequence": hidden,
               "summary_index": num_objects}
        if output_hidden_states:
            out["hidden_states"] = states
        return out

    def two_stream(self, text_embeddings, text_mask, object_embeddings, object_mask, output_hidden_states=False):
        """Text alone through the shared blocks (H^L), then objects through the same blocks with
        cross-attention to H^L in blocks above L_s."""
        text, text_states = self._stack(text_embeddings, text_mask.long(), output_hidden_states=output_hidden_states)
        objects, object_states = self._stack(
            object_embeddings, object_mask.long(), memory=text, memory_mask=text_mask.long(),
            output_hidden_states=output_hidden_states,
        )
        out = {"objects": objects, "text": text, "summary_index": 0}
        if output_hidden_states:
            out["text_hidden_states"], out["object_hidden_states"] = text_states, object_states
        return out

    def pool(self, summary: torch.Tensor) -> torch.Tensor:
        pooler = self.text.pooler
        return pooler.activation(pooler.dense(summary))

    def forward(
        self,
        input_ids: torch.Tensor,
        text_mask: torch.Tensor,
        features: torch.Tensor,
        boxes: torch.Tensor,
        region_mask: Optional[torch.Tensor] = None,
        segment_ids: Optional[torch.Tensor] = None,
        mode: str = SINGLE,
        output_hidden_states: bool = False,
    ) -> Dict[str, torch.Tensor]:
        """Run one mode. Returns ``text (B, T, H)``, ``objects (B, 1+N, H)`` ([IMG] at 0), ``object_mask
        (B, 1+N)``, ``summary`` (h_CLS single / o_IMG two, ``(B, H)``) and ``pooled`` (pooler(summary))."""
        check_mode(mode)
        text_embeddings = self.embed_text(input_ids, segment_ids)
        object_embeddings, object_mask = self.embed_objects(features, boxes, region_mask)
        run = self.single_stream if mode == SINGLE else self.two_stream
        out = run(text_embeddings, text_mask, object_embeddings, object_mask, output_hidden_states)
        out["summary"] = out["text"][:, 0] if mode == SINGLE else out["objects"][:, 0]
        out["pooled"] = self.pool(out["summary"])
        out["object_mask"] = object_mask
        out["mode"] = mode
        return out


def describe_cross_layout(blocks, num_layers: int) -> str:
    """A cross-attention layout in words, from the 0-based blocks that hold a cross-attention module."""
    blocks = sorted(int(b) for b in blocks)
    if not blocks:
        return f"no cross-attention (L_s = {num_layers})"
    if blocks == list(range(blocks[0], num_layers)):
        start = blocks[0]
        extra = " (or cross_attention_layers: all)" if start == 0 else ""
        return f"cross-attention in blocks {start + 1}..{num_layers} (L_s = {start}, cross_attention_layers: upper{extra})"
    return f"cross-attention in blocks {[b + 1 for b in blocks]}"
