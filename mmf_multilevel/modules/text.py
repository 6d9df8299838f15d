"""BERT text encoder built on Hugging Face ``transformers``.

:class:`BertTextEncoder` wraps a :class:`transformers.BertModel` and exposes the pieces that the
vision-language methods need separately: the embedding tables, the encoder layers, a run of the encoder
over arbitrary input embeddings (e.g. a single-stream ``[text; regions]`` sequence) and the pooler at
any position. It knows nothing of MMF: tensors in, tensors out.
"""

import os
from typing import Optional, Sequence, Tuple, Union

import torch
from torch import nn
from transformers import BertConfig, BertModel

DEFAULT_BERT = "bert-base-uncased"

__all__ = ["DEFAULT_BERT", "BertTextEncoder", "extended_attention_mask", "load_pretrained", "mask_compute_dtype"]


def mask_compute_dtype(reference: torch.Tensor) -> torch.dtype:
    """The dtype attention scores are computed in for ``reference``: the autocast dtype when autocast
    is active on its device, else its own floating dtype (float32 for integer tensors)."""
    device_type = reference.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return reference.dtype if reference.is_floating_point() else torch.float32


def extended_attention_mask(mask: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Turn a 0/1 (or boolean) attention mask into BERT's additive mask.

    ``mask`` is ``(B, S)`` (keys to attend to, same for every query) or ``(B, S_q, S_k)`` (a full
    per-query pattern, e.g. block-diagonal). The result is ``(B, 1, 1, S)`` / ``(B, 1, S_q, S_k)``
    with 0 where attention is allowed and the most negative finite value of ``dtype`` where it is
    not. ``dtype`` defaults to the autocast dtype when autocast is on for the mask's device (so
    the bias stays finite after the cast to bf16/fp16), else float32.
    """
    if mask.dim() == 2:
        mask = mask[:, None, None, :]
    elif mask.dim() == 3:
        mask = mask[:, None, :, :]
    else:
        raise ValueError(
            f"attention mask must be (batch, seq) or (batch, q_len, k_len); got shape {tuple(mask.shape)}"
        )
    if dtype is None:
        device_type = mask.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else torch.float32
    if not dtype.is_floating_point:
        raise ValueError(f"the additive mask needs a floating dtype, got {dtype}")
    keep = mask.to(torch.bool)
    additive = torch.zeros(keep.shape, dtype=dtype, device=mask.device)
    return additive.masked_fill(~keep, torch.finfo(dtype).min)


def _looks_like_path(name: str) -> bool:
    return os.path.isabs(name) or name.startswith(("./", "../", "~", ".\\", "..\\")) or os.path.exists(name)


def load_pretrained(model_cls, name_or_path: str, **kwargs):
    """``model_cls.from_pretrained(name_or_path, **kwargs)`` with errors that say what to do offline.

    A name that looks like a filesystem path must be an existing directory; anything else is treated
    as a hub id (resolved from the local cache when the hub cannot be reached).
    """
    if _looks_like_path(name_or_path):
        path = os.path.expanduser(name_or_path)
        if not os.path.isdir(path):
            raise FileNotFoundError(
                f"checkpoint directory {name_or_path!r} does not exist or is not a directory; pass a directory "
                "written by save_pretrained "
                f"(config.json + weights) or a hub id such as {DEFAULT_BERT!r}"
            )
        name_or_path = path
    try:
        from huggingface_hub.errors import HFValidationError
    except ImportError:  # older huggingface_hub
        from huggingface_hub.utils import HFValidationError
    try:
        return model_cls.from_pretrained(name_or_path, **kwargs)
    except (OSError, HFValidationError) as exc:
        raise OSError(
            f"could not load {model_cls.__name__} weights {name_or_path!r}: {exc}\n"
            "If this machine has no access to the Hugging Face hub (or HF_HUB_OFFLINE=1 is set), the weights "
            "must already be in the local cache (HF_HOME), or pass a local directory written by "
            "`save_pretrained` instead of a hub id."
        ) from exc


class BertTextEncoder(nn.Module):
    """A ``BertModel`` with the access points single- and two-stream VLP models need.

    Build it with :meth:`from_name` (pretrained weights: a hub id such as ``bert-base-uncased`` or a
    directory written by ``save_pretrained``) or :meth:`from_config` (random initialisation).
    """

    def __init__(self, bert: BertModel):
        super().__init__()
        if not isinstance(bert, BertModel):
            raise TypeError(f"BertTextEncoder wraps a transformers.BertModel, got {type(bert).__name__}")
        from mmf_multilevel.modules.attention import use_fast_attention

        use_fast_attention(bert)  # same parameters and results; a faster training path on CPU
        self.bert = bert

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(cls, config: BertConfig, add_pooling_layer: bool = True) -> "BertTextEncoder":
        """Randomly initialised encoder (BERT's own init) for ``config``."""
        return cls(BertModel(config, add_pooling_layer=add_pooling_layer))

    @classmethod
    def from_name(
        cls, name_or_path: str = DEFAULT_BERT, add_pooling_layer: bool = True, **overrides
    ) -> "BertTextEncoder":
        """Load pretrained weights with ``BertModel.from_pretrained``.

        ``name_or_path`` is a hub id (default ``bert-base-uncased``) or a local directory holding
        ``config.json`` and weights (a ``BertModel`` or ``BertForPreTraining`` checkpoint). Extra
        keyword arguments override config fields (``hidden_dropout_prob=0.0``,
        ``attn_implementation="eager"``, …).
        """
        return cls(load_pretrained(BertModel, name_or_path, add_pooling_layer=add_pooling_layer, **overrides))

    # ------------------------------------------------------------------ access points
    @property
    def config(self) -> BertConfig:
        return self.bert.config

    @property
    def hidden_size(self) -> int:
        return self.bert.config.hidden_size

    @property
    def embeddings(self) -> nn.Module:
        """BERT's embedding block (word/position/token-type tables, LayerNorm, dropout)."""
        return self.bert.embeddings

    @property
    def word_embeddings(self) -> nn.Embedding:
        return self.bert.embeddings.word_embeddings

    @property
    def position_embeddings(self) -> nn.Embedding:
        return self.bert.embeddings.position_embeddings

    @property
    def token_type_embeddings(self) -> nn.Embedding:
        return self.bert.embeddings.token_type_embeddings

    @property
    def layers(self) -> nn.ModuleList:
        """The ``BertLayer`` stack (``len == num_hidden_layers``)."""
        return self.bert.encoder.layer

    @property
    def pooler(self) -> Optional[nn.Module]:
        return self.bert.pooler

    def resize_token_embeddings(self, num_tokens: int) -> nn.Embedding:
        """Grow or shrink the word-embedding table (e.g. to add phrase-concept ids)."""
        return self.bert.resize_token_embeddings(num_tokens)

    # ------------------------------------------------------------------ computation
    def embed(
        self,
        input_ids: torch.Tensor,
        token_type_ids: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        layer_norm: bool = True,
    ) -> torch.Tensor:
        """Word + position + token-type embeddings, ``(B, T) -> (B, T, H)``.

        With ``layer_norm=False`` the embedding LayerNorm is skipped (dropout still applies); some
        released VisualBERT checkpoints were trained that way.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, seq_len); got shape {tuple(input_ids.shape)}")
        seq_len = input_ids.size(1)
        if seq_len > self.config.max_position_embeddings:
            raise ValueError(
                f"sequence length {seq_len} exceeds max_position_embeddings={self.config.max_position_embeddings}"
            )
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        if layer_norm:
            return self.embeddings(input_ids=input_ids, token_type_ids=token_type_ids, position_ids=position_ids)
        if position_ids is None:
            position_ids = torch.arange(seq_len, device=input_ids.device).unsqueeze(0)
        emb = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
        emb = emb + self.position_embeddings(position_ids)
        return self.embeddings.dropout(emb)

    def encode(
        self,
        hidden_states: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        extended_mask: Optional[torch.Tensor] = None,
        encoder_hidden_states: Optional[torch.Tensor] = None,
        encoder_attention_mask: Optional[torch.Tensor] = None,
        layers: Optional[Union[slice, Sequence[int]]] = None,
        output_hidden_states: bool = False,
    ) -> Union[torch.Tensor, Tuple[torch.Tensor, Tuple[torch.Tensor, ...]]]:
        """Run the BERT layers over arbitrary input embeddings ``(B, S, H)``.

        Pass either ``attention_mask`` (0/1, ``(B, S)`` or ``(B, S, S)``) or a prebuilt additive
        ``extended_mask`` from :func:`extended_attention_mask`. ``encoder_hidden_states`` feeds the
        cross-attention of layers built with ``add_cross_attention`` (0/1 ``encoder_attention_mask``).
        ``layers`` selects a subset of the stack (a ``slice`` or indices), e.g. the lower half of a
        model whose upper layers fuse modalities. Returns the last hidden states, plus the tuple of
        per-layer inputs and final output when ``output_hidden_states``.
        """
        if hidden_states.dim() != 3 or hidden_states.size(-1) != self.hidden_size:
            raise ValueError(
                f"hidden_states must be (batch, seq, {self.hidden_size}); got shape {tuple(hidden_states.shape)}"
            )
        if attention_mask is not None and extended_mask is not None:
            raise ValueError("pass either attention_mask or extended_mask, not both")
        batch, seq_len, _ = hidden_states.shape
        dtype = mask_compute_dtype(hidden_states)
        if extended_mask is None:
            if attention_mask is None:
                attention_mask = torch.ones(batch, seq_len, dtype=torch.long, device=hidden_states.device)
            if attention_mask.shape[0] != batch or attention_mask.shape[-1] != seq_len:
                raise ValueError(
                    f"attention_mask shape {tuple(attention_mask.shape)} does not match the sequence (batch={batch}, "
                    f"seq={seq_len})"
                )
            extended_mask = extended_attention_mask(attention_mask, dtype)
        cross_mask = None
        if encoder_hidden_states is not None:
            if encoder_attention_mask is None:
                encoder_attention_mask = torch.ones(
                    encoder_hidden_states.shape[:2], dtype=torch.long, device=encoder_hidden_states.device
                )
            cross_mask = extended_attention_mask(encoder_attention_mask, dtype)

        stack = self.layers
        if layers is None:
            selected = list(stack)
        elif isinstance(layers, slice):
            selected = list(stack)[layers]
        else:
            selected = [stack[i] for i in layers]
        all_states = [hidden_states] if output_hidden_states else None
        for layer in selected:
            hidden_states = layer(
                hidden_states,
                attention_mask=extended_mask,
                encoder_hidden_states=encoder_hidden_states,
                encoder_attention_mask=cross_mask,
            )[0]
            if output_hidden_states:
                all_states.append(hidden_states)
        if output_hidden_states:
            return hidden_states, tuple(all_states)
        return hidden_states

    def pool(self, sequence: torch.Tensor, index: Union[int, torch.Tensor] = 0) -> torch.Tensor:
        """BERT pooler (dense + tanh) on position ``index`` (an int, or a ``(B,)`` tensor per sample)."""
        if self.pooler is None:
            raise RuntimeError("this encoder was built with add_pooling_layer=False")
        if isinstance(index, torch.Tensor):
            index = index.to(device=sequence.device, dtype=torch.long)
            token = sequence[torch.arange(sequence.size(0), device=sequence.device), index]
        else:
            token = sequence[:, index]
        return self.pooler.activation(self.pooler.dense(token))

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        token_type_ids: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Encode text: ``(B, T)`` ids -> ``(sequence (B, T, H), pooled (B, H) or None)``."""
        embeddings = self.embed(input_ids, token_type_ids=token_type_ids, position_ids=position_ids)
        sequence = self.encode(embeddings, attention_mask=attention_mask)
        pooled = self.pool(sequence) if self.pooler is not None else None
        return sequence, pooled
