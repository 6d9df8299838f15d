"""An independent forward of the official ALBEF / SIMLA networks in plain torch ops, read straight from a state
dict by key prefix (the official ``xbert.py`` / ``med.py`` BERT layers, ``vit.py`` ViT blocks and
``BertOnlyMLMHead``). Name-agnostic: the callers pass the prefixes, so the same code checks our modules
(their own names) and official checkpoints (the official names)."""
import math

import torch
import torch.nn.functional as F

BERT_EPS, VIT_EPS = 1e-12, 1e-6


def linear(x, state, prefix):
    return x @ state[f"{prefix}.weight"].t() + state[f"{prefix}.bias"]


def layer_norm(x, state, prefix, eps):
    return F.layer_norm(x, (x.size(-1),), state[f"{prefix}.weight"], state[f"{prefix}.bias"], eps)


def _heads(x, heads):
    batch, length, width = x.shape
    return x.view(batch, length, heads, width // heads).transpose(1, 2)


def attention(x, memory, memory_mask, state, prefix, heads, eps=BERT_EPS):
    """A BERT attention block ``prefix.self.{query,key,value}``, ``prefix.output.{dense,LayerNorm}``: queries
    from ``x``, keys and values from ``memory`` (0/1 ``memory_mask``), residual + LayerNorm."""
    q = _heads(linear(x, state, f"{prefix}.self.query"), heads)
    k = _heads(linear(memory, state, f"{prefix}.self.key"), heads)
    v = _heads(linear(memory, state, f"{prefix}.self.value"), heads)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.size(-1))
    if memory_mask is not None:
        scores = scores.masked_fill(~memory_mask.bool()[:, None, None, :], float("-inf"))
    context = (scores.softmax(-1) @ v).transpose(1, 2).reshape(x.shape)
    return layer_norm(linear(context, state, f"{prefix}.output.dense") + x, state, f"{prefix}.output.LayerNorm", eps)


def bert_layer(x, mask, state, prefix, heads, cross_prefix=None, memory=None, memory_mask=None):
    """``prefix.attention`` (self), then ``cross_prefix`` over ``memory`` when given, then the FFN
    ``prefix.intermediate.dense`` (GELU) and ``prefix.output.{dense,LayerNorm}``."""
    hidden = attention(x, x, mask, state, f"{prefix}.attention", heads)
    if cross_prefix is not None:
        hidden = attention(hidden, memory, memory_mask, state, cross_prefix, heads)
    inner = F.gelu(linear(hidden, state, f"{prefix}.intermediate.dense"))
    return layer_norm(linear(inner, state, f"{prefix}.output.dense") + hidden, state, f"{prefix}.output.LayerNorm",
                      BERT_EPS)


def embeddings(ids, state, prefix):
    """Word + position (+ token type 0 where the table exists: ALBEF's xbert) embeddings, LayerNorm."""
    x = state[f"{prefix}.word_embeddings.weight"][ids] + state[f"{prefix}.position_embeddings.weight"][:ids.size(1)]
    if f"{prefix}.token_type_embeddings.weight" in state:
        x = x + state[f"{prefix}.token_type_embeddings.weight"][0]
    return layer_norm(x, state, f"{prefix}.LayerNorm", BERT_EPS)


def vit(pixels, state, prefix, heads, depth, patch=16):
    """The official ``vit.py`` VisionTransformer: patch conv, [CLS], position embeddings, pre-norm blocks
    (``norm1``, ``attn.qkv``, ``attn.proj``, ``norm2``, ``mlp.fc1``/``fc2``), final ``norm``."""
    x = F.conv2d(pixels, state[f"{prefix}.patch_embed.proj.weight"], state[f"{prefix}.patch_embed.proj.bias"],
                 stride=patch).flatten(2).transpose(1, 2)
    x = torch.cat([state[f"{prefix}.cls_token"].expand(x.size(0), -1, -1), x], dim=1)
    x = x + state[f"{prefix}.pos_embed"][:, :x.size(1)]
    batch, length, width = x.shape
    for i in range(depth):
        block = f"{prefix}.blocks.{i}"
        y = layer_norm(x, state, f"{block}.norm1", VIT_EPS)
        q, k, v = linear(y, state, f"{block}.attn.qkv").view(batch, length, 3, heads, width // heads).permute(
            2, 0, 3, 1, 4)
        weights = (q @ k.transpose(-1, -2) / math.sqrt(width // heads)).softmax(-1)
        x = x + linear((weights @ v).transpose(1, 2).reshape(batch, length, width), state, f"{block}.attn.proj")
        y = layer_norm(x, state, f"{block}.norm2", VIT_EPS)
        x = x + linear(F.gelu(linear(y, state, f"{block}.mlp.fc1")), state, f"{block}.mlp.fc2")
    return layer_norm(x, state, f"{prefix}.norm", VIT_EPS)


def mlm_head(hidden, state, prefix):
    """``BertOnlyMLMHead``: ``prefix.predictions.transform.{dense,LayerNorm}`` (GELU), ``decoder.weight`` + ``bias``."""
    h = F.gelu(linear(hidden, state, f"{prefix}.predictions.transform.dense"))
    h = layer_norm(h, state, f"{prefix}.predictions.transform.LayerNorm", BERT_EPS)
    return h @ state[f"{prefix}.predictions.decoder.weight"].t() + state[f"{prefix}.predictions.bias"]
