"""Checkpoints from other releases into ``muvla``.

* VisualBERT (MMF ``visual_bert`` or HF ``VisualBertModel``) into the backbone:
  :func:`convert_visual_bert_state`, :func:`load_visual_bert`. ``embedding_style: visual_bert`` takes
  it whole; ``paper`` / ``released`` take the text embeddings, encoder, pooler and the visual projection
  (as the regions' ``W_v``), and start their box embedding and box / visual / tag LayerNorms fresh
  (reported as new); VisualBERT's visual token-type / position embeddings have no place there;
* ``uvlp``: the official μ-VLA release (github.com/zmykevin/UVLP, an MMF fork whose ``visual_bert``
carries the μ-VLA embeddings and heads). Its state dict, under MMF's ``model.`` prefix:

* ``bert.embeddings.{word,position,token_type}_embeddings``, ``LayerNorm`` (BERT's text side; with
  ``use_image_position_embedding`` the caption embedding is the plain sum, no LayerNorm);
* ``bert.embeddings.projection`` + ``visn_layer_norm`` (regions: ``LN(W_v f)``), ``box_fc`` +
  ``box_layer_norm`` (``LN(W_b loc5)``, shared by regions and R-T tags), ``tag_layer_norm`` (tags'
  word embeddings); ``token_type_embeddings_visual`` / ``position_embeddings_visual`` (VisualBERT's,
  unused by the box embedding the release trains with);
* ``bert.encoder.layer.*``, ``bert.pooler.dense``;
* pre-training heads: ``cls.predictions.{transform.*,bias,decoder.weight}`` (tied MLM head),
  ``obj_predict_head.transform.*`` (one transform for both region heads) with
  ``obj_predict_head.decoder_dict.{obj,feat}`` (region class / 2048-d feature), ``itm_cls`` (ITM).

They map onto ``muvla`` with ``embedding_style: released`` (the same function: tested on checkpoints
built in that layout against an independent computation of the official forward pass). The shared
region-head transform is copied into both of our region heads (``mrc``, ``mrfr``), which are separate.

    python -m mmf_multilevel.methods.muvla.checkpoints uvlp OFFICIAL.ckpt OUT.pth [--allow-pickle]

writes a weights-only MMF checkpoint (``{"model": state}``) of the ``muvla`` model, loadable with
``model_config.muvla.released_checkpoint=OUT.pth`` (which takes the official file too), and
prints the source keys it left out (used by no ``muvla`` module); loading reports any model key the
file does not fill.
"""
import argparse
import os
import sys
from typing import TYPE_CHECKING, Callable, Dict, List, Mapping, Optional, Tuple

import torch

from mmf_multilevel.files import save_torch_atomically
from mmf_multilevel.zoo.zoo import load_converted, read_state

if TYPE_CHECKING:  # pragma: no cover
    from mmf_multilevel.methods.muvla.network import MuVLANetwork

__all__ = ["convert_visual_bert_state", "load_visual_bert", "read_visual_bert_checkpoint", "convert_uvlp_state",
           "load_converted", "read_state"]

#: VisualBERT's visual embedding in MMF (``visual_bert``) and HF (``VisualBertModel``) -> a neutral name
_VISUAL_KEYS = {
    "mmf": {"projection": "projection", "token_type_embeddings_visual": "token_type",
            "position_embeddings_visual": "position"},
    "hf": {"visual_projection": "projection", "visual_token_type_embeddings": "token_type",
           "visual_position_embeddings": "position"},
}
#: where each of them goes per ``embedding_style`` (None: the style has no such parameter, left out).
#: paper / released: W_v of ``LN_v(W_v f)`` is VisualBERT's ``W_v f`` (same shape, same input); the
#: regions' segment is BERT's text token-type row 1 (paper) or absent (released), and no style with
#: boxes has a visual position embedding
_VISUAL_TARGETS = {
    "visual_bert": {"projection": "regions.proj", "token_type": "visual_token_type", "position": "visual_position"},
    "paper": {"projection": "regions.feature_proj", "token_type": None, "position": None},
    "released": {"projection": "regions.feature_proj", "token_type": None, "position": None},
}
#: parameters each style has and VisualBERT does not: they keep the network's initialisation and are
#: reported as new (``tag_norm``: the R-T tag path; unused by ``visual_bert``, which has none)
_NEW_IN_STYLE = {
    "visual_bert": ("tag_norm.",),
    "paper": ("regions.feature_norm.", "regions.box_proj.", "regions.box_norm.", "regions.norm.", "tag_norm."),
    "released": ("regions.feature_norm.", "regions.box_proj.", "regions.box_norm.", "tag_norm."),
}


def _convert_visual_bert(state: Mapping[str, torch.Tensor], embedding_style: str
                         ) -> Tuple[Dict[str, torch.Tensor], Dict[str, str], List[str]]:
    """(network keys -> tensors, network key -> source key, source keys left out for this style)."""
    if embedding_style not in _VISUAL_TARGETS:
        raise ValueError(f"no VisualBERT mapping for embedding_style {embedding_style!r}; expected one of "
                         f"{list(_VISUAL_TARGETS)}")
    anchor = "embeddings.word_embeddings.weight"
    prefixes = [k[: -len(anchor)] for k in state if k.endswith(anchor)]
    if len(prefixes) != 1:
        raise KeyError(f"not a VisualBERT state dict: expected one '*{anchor}' entry, found {len(prefixes)}")
    prefix = prefixes[0]
    source = "hf" if f"{prefix}embeddings.visual_projection.weight" in state else "mmf"
    if f"{prefix}embeddings.{next(iter(_VISUAL_KEYS[source]))}.weight" not in state:
        raise KeyError(f"no VisualBERT visual embedding under '{prefix}embeddings.' (expected MMF's 'projection' or "
                       "HF's 'visual_projection')")
    targets = _VISUAL_TARGETS[embedding_style]
    out: Dict[str, torch.Tensor] = {}
    names: Dict[str, str] = {}
    left_out: List[str] = []
    for key, value in state.items():
        if not key.startswith(prefix) or key.endswith(("position_ids", "token_type_ids")):
            continue
        name = key[len(prefix):]
        part, _, rest = name.partition(".")
        if part == "embeddings":
            module, _, leaf = rest.partition(".")
            if module in _VISUAL_KEYS[source]:
                target = targets[_VISUAL_KEYS[source][module]]
                if target is None:
                    left_out.append(key)
                    continue
                target = f"{target}.{leaf}"
            else:
                target = f"text.bert.{name}"
        elif part in ("encoder", "pooler"):
            target = f"text.bert.{name}"
        else:
            continue
        out[target], names[target] = value, key
    return out, names, left_out


def convert_visual_bert_state(state: Dict[str, torch.Tensor], embedding_style: str = "visual_bert"
                              ) -> Dict[str, torch.Tensor]:
    """A VisualBERT state dict -> :class:`MuVLANetwork` keys for ``embedding_style``.

    Reads MMF ``visual_bert`` checkpoints (``model.bert.*``, any outer prefix) and HF transformers'
    ``VisualBertModel`` / ``VisualBertFor*`` ones (``[visual_bert.]embeddings.visual_projection``,
    ...). Heads and buffers are left out; the text embeddings, encoder layers and pooler keep BERT's names.
    ``visual_bert`` takes the visual projection, token-type and position embeddings as they are;
    ``paper`` / ``released`` take the projection as the region feature projection ``W_v`` and leave the
    visual token-type / position embeddings out (no such parameter there).
    """
    return _convert_visual_bert(state, embedding_style)[0]


def load_visual_bert(network: "MuVLANetwork", state: Dict[str, torch.Tensor],
                     log: Optional[Callable[[str], None]] = None) -> List[str]:
    """Load a VisualBERT state dict (MMF or HF, see :func:`convert_visual_bert_state`) into ``network``,
    any ``embedding_style``; returns the parameters it initialised as new (not in the checkpoint: the box
    embedding and the box / visual / final / tag LayerNorms of ``paper`` and ``released``, the unused
    ``tag_norm`` of ``visual_bert``), which keep the network's own initialisation. ``log`` receives a
    one-line report. A shape that disagrees or a tensor the style needs from VisualBERT and the
    checkpoint lacks is an error."""
    style = network.embedding_style
    converted, names, left_out = _convert_visual_bert(state, style)
    own = network.state_dict()
    for key, value in converted.items():
        if key not in own:
            raise KeyError(f"VisualBERT entry {names[key]!r} ({key!r}) has no place in this network "
                           f"(embedding_style: {style})")
        if own[key].shape != value.shape:
            raise ValueError(f"{key} (checkpoint's {names[key]}): checkpoint shape {tuple(value.shape)} != network "
                             f"{tuple(own[key].shape)} (hidden size, vocabulary, layers or feature_dim differ)")
    unfilled = [k for k in own if k not in converted and not k.endswith(("position_ids", "token_type_ids"))]
    missing = [k for k in unfilled if not k.startswith(_NEW_IN_STYLE[style])]
    if missing:
        raise KeyError(f"the VisualBERT checkpoint lacks {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    network.load_state_dict(converted, strict=False)
    parameters = dict(network.named_parameters())
    new = [k for k in unfilled if k in parameters]
    if log is not None:
        log(f"VisualBERT weights into embedding_style {style}: copied {len(converted)} tensors; initialised as new "
            f"(not in the VisualBERT checkpoint): {', '.join(new) if new else 'none'}"
            + (f"; left out (no place in this style): {', '.join(left_out)}" if left_out else ""))
    return new


def read_visual_bert_checkpoint(path: str) -> Dict[str, torch.Tensor]:
    """State dict of an MMF checkpoint file (``.pth`` / ``.ckpt``, optionally under ``model``) or of an HF
    ``save_pretrained`` folder (``VisualBertModel``)."""
    if os.path.isdir(path):
        from transformers import VisualBertModel

        from mmf_multilevel.modules.text import load_pretrained

        return load_pretrained(VisualBertModel, path).state_dict()
    if not os.path.isfile(path):
        raise FileNotFoundError(f"VisualBERT checkpoint not found: {path} (model_config.muvla.visual_bert_checkpoint)")
    from mmf_multilevel.zoo.zoo import load_checkpoint

    state = load_checkpoint(path)  # weights only; a legacy pickle needs MMF_ZOO_ALLOW_PICKLE=1
    return state.get("model", state) if isinstance(state, dict) else state


_UVLP_EMBEDDINGS = {
    "projection": "backbone.regions.feature_proj",
    "visn_layer_norm": "backbone.regions.feature_norm",
    "box_fc": "backbone.regions.box_proj",
    "box_layer_norm": "backbone.regions.box_norm",
    "tag_layer_norm": "backbone.tag_norm",
}
#: VisualBERT leftovers in the release: its box embedding never reads them
_UVLP_UNUSED_EMBEDDINGS = ("token_type_embeddings_visual", "position_embeddings_visual")
_UVLP_REGION_DECODERS = {"obj": "heads.mrc", "feat": "heads.mrfr"}


def _uvlp_prefix(state: Mapping[str, torch.Tensor]) -> str:
    anchor = "bert.embeddings.box_fc.weight"
    prefixes = [k[: -len(anchor)] for k in state if k.endswith(anchor)]
    if len(prefixes) != 1:
        raise KeyError(
            f"not a UVLP (official μ-VLA) state dict: expected one '*{anchor}' entry (the box embedding its "
            f"released models train with), found {len(prefixes)}"
        )
    return prefixes[0]


def convert_uvlp_state(state: Mapping[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """An official UVLP state dict -> (``muvla`` model keys, source keys left out).

    Backbone keys always; pre-training heads when the checkpoint has them (a fine-tuned release's
    task classifier is left out: our task heads follow the paper's §C and start fresh).
    """
    prefix = _uvlp_prefix(state)
    out: Dict[str, torch.Tensor] = {}
    dropped: List[str] = []
    for key, value in state.items():
        if not key.startswith(prefix):
            dropped.append(key)
            continue
        name = key[len(prefix):]
        if name.endswith(("position_ids", "token_type_ids")):
            continue
        if name.startswith("bert.embeddings."):
            module, _, leaf = name[len("bert.embeddings."):].partition(".")
            if module in _UVLP_EMBEDDINGS:
                out[f"{_UVLP_EMBEDDINGS[module]}.{leaf}"] = value
            elif module in _UVLP_UNUSED_EMBEDDINGS:
                dropped.append(key)
            else:
                out[f"backbone.text.{name}"] = value
        elif name.startswith(("bert.encoder.", "bert.pooler.")):
            out[f"backbone.text.{name}"] = value
        elif name.startswith("cls.predictions."):
            leaf = name[len("cls.predictions."):]
            if leaf == "decoder.weight":  # tied to the word embeddings in both models
                continue
            out[f"heads.mlm.{leaf}"] = value
        elif name.startswith("obj_predict_head.transform."):
            leaf = name[len("obj_predict_head."):]
            for head in _UVLP_REGION_DECODERS.values():
                out[f"{head}.{leaf}"] = value
        elif name.startswith("obj_predict_head.decoder_dict."):
            loss, _, leaf = name[len("obj_predict_head.decoder_dict."):].partition(".")
            if loss in _UVLP_REGION_DECODERS:
                out[f"{_UVLP_REGION_DECODERS[loss]}.decoder.{leaf}"] = value
            else:
                dropped.append(key)
        elif name.startswith("itm_cls."):
            out[f"heads.itm.classifier.{name[len('itm_cls.'):]}"] = value
        else:
            dropped.append(key)
    return out, dropped


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mmf_multilevel.methods.muvla.checkpoints",
                                     description="Convert an official checkpoint into our model's layout.")
    parser.add_argument("layout", choices=["uvlp"], help="uvlp: the official μ-VLA release -> muvla (embedding_style: released)")
    parser.add_argument("source", help="the official checkpoint file")
    parser.add_argument("output", help="where to write {'model': state} (weights only)")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="the official file is a legacy pickle with non-tensor objects and you trust it")
    args = parser.parse_args(argv)
    try:
        converted, dropped = convert_uvlp_state(read_state(args.source, args.allow_pickle or None))
    except (FileNotFoundError, KeyError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    save_torch_atomically({"model": converted}, args.output)
    heads = sorted({k.split(".")[1] for k in converted if k.startswith("heads.")})
    print(f"wrote {args.output}: {len(converted)} tensors (backbone{' + heads ' + ', '.join(heads) if heads else ''}); "
          f"left out {len(dropped)} source keys{': ' + ', '.join(dropped[:8]) if dropped else ''}"
          f"{' ...' if len(dropped) > 8 else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
