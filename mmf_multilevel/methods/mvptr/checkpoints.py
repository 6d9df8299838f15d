"""The official MVPTR release (github.com/Junction4Nako/mvp_pytorch, an Oscar/VinVL fork) into ``mvptr``.

The official pre-training model (``BiBertImgForPreTraining``) saves a flat state dict:

* ``bert.embeddings.*`` - one BERT ``BertEmbeddings`` whose word table holds the 30,522 word-pieces
  and the phrase-concept rows (86,051 rows in the release);
* ``bert.txt_encoder.layer.<i>.*``, ``bert.vis_encoder.layer.<i>.*``, ``bert.mul_encoder.layer.<i>.*`` -
  three ``L``-layer encoders with Hugging Face's BERT layer names;
* ``bert.pooler.dense.*``; ``bert.txt_proj`` / ``bert.vis_proj`` (bias-free ``H x H`` VSC projections,
  stored as matrices that multiply from the right: ``cls @ W``); ``bert.img_embedding.*`` (the
  ``Linear(2054, H)`` region embedding) and, when it was trained with ``use_img_layernorm``,
  ``bert.LayerNorm.*`` after it;
* ``cls.predictions.*`` (the MLM head; its decoder is the word table's first 30,522 rows),
  ``cls.seq_relationship.*`` (ITM, **0 = matched**: BERT's next-sentence convention), ``half_mlm.*``
  (the MCR head, same layout as the MLM head), ``logit_scale`` (VSC's temperature, a log);
* ``qa_head.*`` - a QA variant's answer head, unused by MVPTR's five losses.

What maps (:func:`convert_official_state`): the embeddings and pooler into ``backbone.bert.bert``, the
text encoder into BERT layers ``0..L-1`` and the multimodal encoder into ``L..2L-1`` of
``backbone.bert.bert.encoder`` (the storage of :class:`~.network.MVPTRNetwork`), the visual encoder
into ``backbone.visual_layers``, the region embedding (and its LayerNorm) into
``backbone.region_embedding.{proj,norm}``, the projections and temperature as they are; the heads into
``heads.{mlm,mcr,itm}`` with the ITM rows swapped, because ``mvptr`` (like every model here) reads
index 1 as "matched". The MLM/MCR decoders are tied to the word table in ``mvptr``: a release whose
decoder equals the table's first rows loses nothing; one whose decoder differs is reported with the
largest difference (the tied table is what ``mvptr`` uses). ``qa_head.*`` is dropped (listed). Any
other key is an error naming it; so is a missing encoder, embedding or region layer.

    python -m mmf_multilevel.methods.mvptr.checkpoints convert OFFICIAL.bin OUT.pth [--allow-pickle]

writes ``{"model": state}`` (weights only), loadable with ``checkpoint.resume_file=OUT.pth
checkpoint.resume_pretrained=True``; the printout names the model_config keys the sizes need.
"""
import argparse
import re
import sys
from typing import Dict, List, Mapping, Tuple

import torch

from mmf_multilevel.files import save_torch_atomically
from mmf_multilevel.zoo.zoo import read_state

__all__ = ["convert_official_state", "read_official_state", "main"]

_ENCODERS = ("txt_encoder", "vis_encoder", "mul_encoder")
_EMBEDDINGS = ("word_embeddings.weight", "position_embeddings.weight", "token_type_embeddings.weight",
               "LayerNorm.weight", "LayerNorm.bias")
_LM_HEAD = ("transform.dense.weight", "transform.dense.bias", "transform.LayerNorm.weight",
            "transform.LayerNorm.bias", "bias")
_DROPPED_PREFIXES = {"qa_head.": "the QA pre-training variant's answer head, unused by MVPTR's losses"}


def read_official_state(path: str, allow_pickle=None) -> Dict[str, torch.Tensor]:
    """The tensors of an official checkpoint (a bare ``pytorch_model.bin`` state dict, or one under
    ``model``/``state_dict``); a ``module.`` prefix from DDP is removed."""
    state = read_state(path, allow_pickle, container="model")
    if len(state) == 0:
        raise ValueError(f"{path}: the checkpoint holds no tensor")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}


def _layer_count(state: Mapping[str, torch.Tensor], encoder: str) -> int:
    pattern = re.compile(rf"^bert\.{encoder}\.layer\.(\d+)\.")
    indices = {int(m.group(1)) for m in map(pattern.match, state) if m}
    if not indices:
        raise KeyError(f"official checkpoint: bert.{encoder}.layer.0.* missing (the {encoder.split('_')[0]} encoder)")
    if indices != set(range(len(indices))):
        raise KeyError(f"official checkpoint: bert.{encoder} has layers {sorted(indices)}; expected 0..{max(indices)}")
    return len(indices)


def convert_official_state(state: Mapping[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """The official state dict -> (``mvptr`` state entries, official keys dropped or reported with the
    reason). See the module docstring for the mapping."""
    out: Dict[str, torch.Tensor] = {}
    notes: List[str] = []
    used = set()

    def need(key, why):
        if key not in state:
            raise KeyError(f"official checkpoint: {key} missing ({why})")
        used.add(key)
        return state[key]

    counts = {encoder: _layer_count(state, encoder) for encoder in _ENCODERS}
    if len(set(counts.values())) != 1:
        raise ValueError(f"official checkpoint: the three encoders differ in depth {counts}; mvptr builds three "
                         "encoders of num_hidden_layers / 2 layers each")
    layers = counts["txt_encoder"]
    targets = {"txt_encoder": lambda i: f"backbone.bert.bert.encoder.layer.{i}.",
               "mul_encoder": lambda i: f"backbone.bert.bert.encoder.layer.{layers + i}.",
               "vis_encoder": lambda i: f"backbone.visual_layers.{i}."}
    for key in state:
        match = re.match(r"^bert\.(txt_encoder|vis_encoder|mul_encoder)\.layer\.(\d+)\.(.+)$", key)
        if match:
            encoder, index, rest = match.group(1), int(match.group(2)), match.group(3)
            out[targets[encoder](index) + rest] = state[key]
            used.add(key)

    for name in _EMBEDDINGS:
        out[f"backbone.bert.bert.embeddings.{name}"] = need(f"bert.embeddings.{name}", "the shared embeddings")
    if "bert.embeddings.position_ids" in state:  # a buffer newer Hugging Face versions save
        used.add("bert.embeddings.position_ids")
    for name in ("weight", "bias"):
        out[f"backbone.bert.bert.pooler.dense.{name}"] = need(f"bert.pooler.dense.{name}", "BERT's pooler")
        out[f"backbone.region_embedding.proj.{name}"] = need(f"bert.img_embedding.{name}", "the region embedding")
        if "bert.LayerNorm.weight" in state:
            out[f"backbone.region_embedding.norm.{name}"] = need(f"bert.LayerNorm.{name}", "use_img_layernorm's LayerNorm")
    for name in ("txt_proj", "vis_proj"):
        out[f"backbone.{name}"] = need(f"bert.{name}", "the VSC projections")
    out["backbone.logit_scale"] = need("logit_scale", "VSC's temperature")

    table = out["backbone.bert.bert.embeddings.word_embeddings.weight"]
    for source, head in (("cls.predictions.", "mlm"), ("half_mlm.", "mcr")):
        for name in _LM_HEAD:
            out[f"heads.{head}.{name}"] = need(f"{source}{name}", f"the {head.upper()} head")
        decoder = state.get(f"{source}decoder.weight")
        if decoder is not None:
            used.add(f"{source}decoder.weight")
            rows = decoder.size(0)
            if decoder.size(1) != table.size(1) or rows > table.size(0):
                raise ValueError(f"official checkpoint: {source}decoder.weight has shape {tuple(decoder.shape)}, "
                                 f"not the first rows of the {tuple(table.shape)} word table")
            gap = (decoder.float() - table[:rows].float()).abs().max().item()
            if gap > 0:
                notes.append(f"{source}decoder.weight (differs from the word table's first {rows} rows by up to "
                             f"{gap:.3g}; mvptr's {head.upper()} decoder is tied to the table)")
    weight = need("cls.seq_relationship.weight", "the ITM head")
    bias = need("cls.seq_relationship.bias", "the ITM head")
    if weight.size(0) != 2:
        raise ValueError(f"official checkpoint: cls.seq_relationship.weight has {weight.size(0)} rows, expected 2")
    # official: 0 = matched (next-sentence); mvptr: 1 = matched
    out["heads.itm.classifier.weight"], out["heads.itm.classifier.bias"] = weight.flip(0), bias.flip(0)

    for key in state:
        if key in used:
            continue
        prefix = next((p for p in _DROPPED_PREFIXES if key.startswith(p)), None)
        if prefix is None:
            raise KeyError(f"official checkpoint: {key} is not a key of the official MVPTR pre-training model "
                           "(bert.{embeddings,txt_encoder,vis_encoder,mul_encoder,pooler,img_embedding,LayerNorm,"
                           "txt_proj,vis_proj}, cls.{predictions,seq_relationship}, half_mlm, logit_scale, qa_head)")
        notes.append(f"{key} ({_DROPPED_PREFIXES[prefix]})")
    return out, notes


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mmf_multilevel.methods.mvptr.checkpoints",
                                     description="Convert an official MVPTR checkpoint into mvptr's layout.")
    sub = parser.add_subparsers(dest="command", required=True)
    convert = sub.add_parser("convert", help="the official release (Junction4Nako/mvp_pytorch) -> mvptr")
    convert.add_argument("source", help="the official pytorch_model.bin")
    convert.add_argument("output", help="where to write {'model': state} (weights only)")
    convert.add_argument("--allow-pickle", action="store_true",
                         help="the official file holds non-tensor objects and you trust it")
    args = parser.parse_args(argv)
    try:
        converted, notes = convert_official_state(read_official_state(args.source, args.allow_pickle or None))
    except (FileNotFoundError, KeyError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    save_torch_atomically({"model": converted}, args.output)
    rows, hidden = converted["backbone.bert.bert.embeddings.word_embeddings.weight"].shape
    layers = len({k.split(".")[5] for k in converted if k.startswith("backbone.bert.bert.encoder.layer.")})
    feature = converted["backbone.region_embedding.proj.weight"].size(1)
    norm = "backbone.region_embedding.norm.weight" in converted
    print(f"wrote {args.output}: {len(converted)} tensors\n"
          f"build mvptr with: model_config.mvptr.num_embeddings={rows} model_config.mvptr.hidden_size={hidden} "
          f"model_config.mvptr.num_hidden_layers={layers} model_config.mvptr.img_layer_norm={str(norm).lower()} "
          f"(region input {feature} = feature + 6-d box)\n"
          f"{len(notes)} notes" + "".join(f"\n  {n}" for n in notes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
