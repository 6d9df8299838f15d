"""Converters from official checkpoint layouts into our models' state dicts.

``uvlp``: the official μ-VLA release (github.com/zmykevin/UVLP, an MMF fork whose ``visual_bert``
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

    python -m mmf_multilevel.zoo.converters uvlp OFFICIAL.ckpt OUT.pth [--allow-pickle]

writes a weights-only MMF checkpoint (``{"model": state}``) of the ``muvla`` model, loadable with
``model_config.muvla.released_checkpoint=OUT.pth`` (which takes the official file too), and
prints the source keys it left out (used by no ``muvla`` module); loading reports any model key the
file does not fill.
"""
import argparse
import os
import sys
from typing import Dict, List, Mapping, Tuple

import torch

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
    task classifier is left out: our task heads follow the paper's §6 and start fresh).
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


def load_converted(model: torch.nn.Module, converted: Mapping[str, torch.Tensor], source: str) -> List[str]:
    """Load ``converted`` into ``model`` (shape-checked); returns the model keys it did not fill.

    A key the model lacks is an error naming ``source`` (e.g. pre-training heads into a model built
    for a downstream task are skipped before this is called, never silently dropped here)."""
    own = model.state_dict()
    unexpected = [k for k in converted if k not in own]
    if unexpected:
        raise KeyError(f"{source}: {len(unexpected)} converted entries have no place in this model, e.g. {unexpected[:5]}")
    for key, value in converted.items():
        if own[key].shape != value.shape:
            raise ValueError(f"{source}: {key} has shape {tuple(value.shape)} in the checkpoint but "
                             f"{tuple(own[key].shape)} in the model (hidden size, vocabulary, tag classes or "
                             "feature_dim differ)")
    model.load_state_dict(converted, strict=False)
    return [k for k in own if k not in converted]


def read_state(path: str, allow_pickle=None) -> Dict[str, torch.Tensor]:
    """The tensors of an MMF checkpoint (``.ckpt`` / ``.pth``, optionally under ``model``)."""
    from mmf_multilevel.zoo.zoo import load_checkpoint

    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    state = load_checkpoint(path, allow_pickle)
    state = state.get("model", state) if isinstance(state, dict) else state
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a state dict of tensors (optionally under 'model')")
    return dict(state)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mmf_multilevel.zoo.converters",
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
    tmp = f"{args.output}.tmp-{os.getpid()}"  # written whole, then renamed: no half-written output
    try:
        torch.save({"model": converted}, tmp)
        os.replace(tmp, args.output)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    heads = sorted({k.split(".")[1] for k in converted if k.startswith("heads.")})
    print(f"wrote {args.output}: {len(converted)} tensors (backbone{' + heads ' + ', '.join(heads) if heads else ''}); "
          f"left out {len(dropped)} source keys{': ' + ', '.join(dropped[:8]) if dropped else ''}"
          f"{' ...' if len(dropped) > 8 else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
