"""The official ALBEF (salesforce/ALBEF) and SIMLA (codezakh/SIMLA) checkpoints into ``simla``'s layout.

Both releases save ``torch.save({"model": state_dict, "optimizer", "lr_scheduler", "config", "epoch"})``
(``Pretrain.py``, ``Retrieval.py``); only ``model`` is read. Their key layouts:

* ``visual_encoder.*`` - the ViT of ``models/vit.py`` (timm's names: ``cls_token``, ``pos_embed``,
  ``patch_embed.proj``, ``blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}``, ``norm``); SIMLA's
  pre-training ViT also has ``mask_token``;
* ``text_encoder.bert.{embeddings,encoder.layer.N}.*`` and ``text_encoder.cls.predictions.*`` - the
  ``BertForMaskedLM`` of pre-training; the retrieval models hold a ``BertModel`` (``text_encoder.{embeddings,
  encoder}.*``, no MLM head). Each layer has ``attention``, ``intermediate``, ``output`` and, where it
  cross-attends, ``crossattention``: from layer ``fusion_layer`` (6) on in ALBEF's ``xbert.py``, in every
  layer in SIMLA's ``med.py``. ALBEF's embeddings have a token-type table (only row 0 is ever used: the
  models pass no ``token_type_ids``), SIMLA's have none; both carry the ``position_ids`` buffer;
* ``vision_proj``, ``text_proj``, ``itm_head``, ``temp``; SIMLA adds ``mim_head`` and ``concept_head``;
* the momentum copies ``visual_encoder_m``, ``vision_proj_m``, ``text_encoder_m`` (with its MLM head),
  ``text_proj_m`` (SIMLA: ``mim_head_m``, ``concept_head_m``), and the queues ``image_queue``,
  ``text_queue``, ``queue_ptr`` (retrieval: ``idx_queue``).

The mapping (:func:`convert_official_state`): the ViT into ``backbone.image_encoder.vit`` (the mask token
beside it), the position embeddings resampled when ``image_size`` gives another grid; the BERT into
``backbone.text_encoder.text.bert``, each ``crossattention`` into ``backbone.text_encoder.cross_attention.N``;
``cls.predictions`` into ``heads.mlm``; the projections, ITM, MIM and concept heads and τ into ``heads``; the
``*_m`` copies into ``momentum.copies.<name>`` (``text_encoder_m.cls`` into ``momentum.copies.mlm``); the queues
into ``queues``. What does not map, and why (listed by the command):

* ALBEF's ``token_type_embeddings``: its row 0 is folded into the position embeddings (word + position +
  type-0 before the LayerNorm, exactly what the official forward computes); the other rows are never used;
* ``position_ids`` (a buffer equal to ``arange``) and ``cls.predictions.decoder.bias`` (the same tensor as
  ``cls.predictions.bias``; checked);
* ALBEF's retrieval ``idx_queue``: ``simla`` keeps no image ids of queued features (SIMLA's fine-tuning
  treats them all as negatives).

The MLM decoder weight is kept as ``heads.mlm.decoder.weight``; in pre-training ``simla`` ties it to the word
embeddings, as the official ``BertForMaskedLM`` does, so the two must be equal (checked). Any other key is
an error naming it; so is a missing piece, or a layout that is not the one asked for (``--from albef``
expects text layers without cross-attention, ``--from simla`` cross-attention in every layer).

    python -m mmf_multilevel.methods.simla.checkpoints convert --from albef ALBEF.pth albef.pth
    python -m mmf_multilevel.methods.simla.checkpoints convert --from simla SIMLA.pth simla.pth --image-size 384

writes ``{"model": state}`` (weights only, atomically) and prints the ``model_config.simla`` settings the
state needs (layout, fusion_layer, the sizes).
"""
import argparse
import re
import sys
from typing import Dict, List, Mapping, Optional, Tuple

import torch

from mmf_multilevel.files import save_torch_atomically
from mmf_multilevel.zoo.zoo import UnsafeCheckpointError, read_state

__all__ = ["SOURCES", "convert_official_state", "read_official_state", "official_settings", "main"]

SOURCES = ("albef", "simla")
_LAYER = re.compile(r"^encoder\.layer\.(\d+)\.(attention|crossattention|intermediate|output)\.(.+)$")
#: online module -> (our prefix, our momentum copy); the BERT and its MLM head are handled apart
_MODULES = {"vision_proj": "heads.vision_proj", "text_proj": "heads.text_proj", "itm_head": "heads.itm_head",
            "mim_head": "heads.mim_head", "concept_head": "heads.concept_head"}
#: the parameters of the official vit.py VisionTransformer (anything else is reported)
_VIT = re.compile(r"^(cls_token|pos_embed|mask_token|patch_embed\.proj\.(weight|bias)|norm\.(weight|bias)|"
                  r"blocks\.\d+\.(norm1|attn\.qkv|attn\.proj|norm2|mlp\.fc1|mlp\.fc2)\.(weight|bias))$")
_QUEUES = {"image_queue": "queues.image_queue", "text_queue": "queues.text_queue", "queue_ptr": "queues.queue_ptr"}


def read_official_state(path: str, allow_pickle=None) -> Dict[str, torch.Tensor]:
    """The tensors under ``model`` of an official checkpoint (or a bare state dict); a DDP ``module.``
    prefix is removed."""
    state = read_state(path, allow_pickle, container="model")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}


def _bert(state: Mapping[str, torch.Tensor], prefix: str, target: str, out: Dict[str, torch.Tensor],
          dropped: List[str], used: set) -> Tuple[List[int], int]:
    """One official BERT (``prefix`` = ``text_encoder.bert.`` or ``text_encoder.``) into ``target`` (our text
    encoder); returns the layers that have a cross-attention and the number of layers."""
    emb = f"{prefix}embeddings."
    for name in ("word_embeddings.weight", "position_embeddings.weight", "LayerNorm.weight", "LayerNorm.bias"):
        if emb + name not in state:
            raise KeyError(f"official checkpoint: {emb}{name} missing (the BERT embeddings)")
    position = state[emb + "position_embeddings.weight"]
    token_type = state.get(emb + "token_type_embeddings.weight")
    if token_type is not None:  # xbert adds type 0 to every token: fold it into the positions
        position = position + token_type[0]
        used.add(emb + "token_type_embeddings.weight")
        dropped.append(f"{emb}token_type_embeddings.weight (row 0 folded into the position embeddings; the "
                       "official models pass no token types)")
    out[f"{target}text.bert.embeddings.position_embeddings.weight"] = position
    for name in ("word_embeddings.weight", "LayerNorm.weight", "LayerNorm.bias"):
        out[f"{target}text.bert.embeddings.{name}"] = state[emb + name]
    used.update(emb + n for n in ("word_embeddings.weight", "position_embeddings.weight", "LayerNorm.weight",
                                  "LayerNorm.bias"))
    if emb + "position_ids" in state:
        used.add(emb + "position_ids")
        dropped.append(f"{emb}position_ids (a buffer, arange)")
    layers, cross = set(), set()
    for key, value in state.items():
        if not key.startswith(prefix + "encoder."):
            continue
        match = _LAYER.match(key[len(prefix):])
        if match is None:
            continue  # reported as unexpected
        index, part, rest = int(match.group(1)), match.group(2), match.group(3)
        layers.add(index)
        if part == "crossattention":
            cross.add(index)
            out[f"{target}cross_attention.{index}.{rest}"] = value
        else:
            out[f"{target}text.bert.encoder.layer.{index}.{part}.{rest}"] = value
        used.add(key)
    if not layers or sorted(layers) != list(range(len(layers))):
        raise KeyError(f"official checkpoint: {prefix}encoder.layer.N missing or not numbered 0..N-1 "
                       f"(found {sorted(layers)})")
    return sorted(cross), len(layers)


def _mlm(state, prefix: str, target: str, out, dropped, used) -> bool:
    head = f"{prefix}cls.predictions."
    keys = [k for k in state if k.startswith(head)]
    if not keys:
        return False
    for key in keys:
        rest = key[len(head):]
        if rest == "decoder.bias":
            if f"{head}bias" not in state or not torch.equal(state[key], state[f"{head}bias"]):
                raise ValueError(f"official checkpoint: {key} differs from {head}bias (the official head ties them)")
            dropped.append(f"{key} (the same tensor as {head}bias)")
        else:
            out[f"{target}{rest}"] = state[key]
        used.add(key)
    return True


def convert_official_state(state: Mapping[str, torch.Tensor], source: str, image_size: Optional[int] = None
                           ) -> Tuple[Dict[str, torch.Tensor], List[str], Dict[str, object]]:
    """An official state dict -> (``simla`` state entries, official keys dropped with their reason, the
    ``model_config.simla`` settings it needs). ``source``: ``albef`` or ``simla``; ``image_size``: resample
    the ViT position embeddings to that resolution (default: keep the checkpoint's grid)."""
    from mmf_multilevel.methods.simla.vision import resize_position_embeddings

    if source not in SOURCES:
        raise ValueError(f"--from must be one of {list(SOURCES)}, got {source!r}")
    out: Dict[str, torch.Tensor] = {}
    dropped: List[str] = []
    used: set = set()
    if "visual_encoder.pos_embed" not in state or "visual_encoder.patch_embed.proj.weight" not in state:
        raise KeyError("official checkpoint: visual_encoder.pos_embed / visual_encoder.patch_embed.proj.weight missing "
                       "(expected the official model's state dict, under 'model')")
    patch = int(state["visual_encoder.patch_embed.proj.weight"].shape[-1])
    settings: Dict[str, object] = {}
    for suffix, ours in (("", "backbone.image_encoder."), ("_m", "momentum.copies.visual_encoder.")):
        prefix = f"visual_encoder{suffix}."
        keys = [k for k in state if k.startswith(prefix)]
        if suffix and not keys:
            continue
        for key in keys:
            rest = key[len(prefix):]
            if not _VIT.match(rest):
                continue  # reported as unexpected
            value = state[key]
            if rest == "pos_embed" and image_size is not None:
                if image_size % patch:
                    raise ValueError(f"--image-size {image_size} is not a multiple of the checkpoint's patch size "
                                     f"{patch}")
                value = resize_position_embeddings({"pos_embed": value}, (image_size // patch,) * 2)["pos_embed"]
            out[ours + (rest if rest == "mask_token" else f"vit.{rest}")] = value
            used.add(key)
    grid = int(round((out["backbone.image_encoder.vit.pos_embed"].shape[1] - 1) ** 0.5))
    settings["image_size"] = grid * patch

    bert_prefix = "text_encoder.bert." if any(k.startswith("text_encoder.bert.") for k in state) else "text_encoder."
    cross, num_layers = _bert(state, bert_prefix, "backbone.text_encoder.", out, dropped, used)
    if source == "albef":
        fusion = cross[0] if cross else num_layers
        if cross != list(range(fusion, num_layers)) or fusion < 1:
            raise ValueError(f"official checkpoint: cross-attention in layers {cross} of {num_layers}; --from albef "
                             "expects text layers without it, then fusion layers with it (ALBEF: layers 6-11 of 12); "
                             "a checkpoint with cross-attention in every layer is SIMLA's: --from simla")
        settings.update(layout="albef", fusion_layer=fusion, mim=False)
    else:
        if cross != list(range(num_layers)):
            raise ValueError(f"official checkpoint: cross-attention in layers {cross} of {num_layers}; --from simla "
                             "expects it in every layer (med.py with add_cross_attention); ALBEF's layout: --from albef")
        settings["layout"] = "simla"
    settings["num_hidden_layers"] = num_layers
    momentum_bert = "text_encoder_m.bert." if bert_prefix == "text_encoder.bert." else "text_encoder_m."
    if any(k.startswith(momentum_bert) for k in state):
        cross_m, layers_m = _bert(state, momentum_bert, "momentum.copies.text_encoder.", out, dropped, used)
        if (cross_m, layers_m) != (cross, num_layers):
            raise ValueError(f"official checkpoint: the momentum BERT ({momentum_bert}) has cross-attention in layers "
                             f"{cross_m} of {layers_m}, the online one in {cross} of {num_layers}")
    has_mlm = _mlm(state, "text_encoder.", "heads.mlm.", out, dropped, used)
    _mlm(state, "text_encoder_m.", "momentum.copies.mlm.", out, dropped, used)
    if has_mlm and not torch.equal(out["heads.mlm.decoder.weight"],
                                   out["backbone.text_encoder.text.bert.embeddings.word_embeddings.weight"]):
        raise ValueError("official checkpoint: text_encoder.cls.predictions.decoder.weight differs from the word "
                         "embeddings; the official BertForMaskedLM ties them (as simla's pre-training model does)")
    for name, ours in _MODULES.items():
        for suffix, target in (("", ours), ("_m", f"momentum.copies.{name}")):
            for part in ("weight", "bias"):
                key = f"{name}{suffix}.{part}"
                if key in state:
                    out[f"{target}.{part}"] = state[key]
                    used.add(key)
    for need in ("vision_proj.weight", "text_proj.weight", "itm_head.weight"):
        if need not in state:
            raise KeyError(f"official checkpoint: {need} missing (the ITC projections and the ITM head)")
    if "temp" in state:
        out["heads.temp"] = state["temp"].reshape(())
        used.add("temp")
    for key, ours in _QUEUES.items():
        if key in state:
            out[ours] = state[key]
            used.add(key)
    if "idx_queue" in state:
        used.add("idx_queue")
        dropped.append("idx_queue (ALBEF's retrieval image ids of the queued features; simla keeps none)")
    unexpected = sorted(k for k in state if k not in used)
    if unexpected:
        raise KeyError(f"official checkpoint (--from {source}): {len(unexpected)} keys that do not belong to the "
                       f"official {source.upper()} layout, e.g. {unexpected[:5]}")
    word = out["backbone.text_encoder.text.bert.embeddings.word_embeddings.weight"]
    settings.update(vocab_size=int(word.shape[0]), hidden_size=int(word.shape[1]),
                    max_position_embeddings=int(out["backbone.text_encoder.text.bert.embeddings."
                                                    "position_embeddings.weight"].shape[0]),
                    embed_dim=int(state["vision_proj.weight"].shape[0]))
    if "image_queue" in state:
        settings["queue_size"] = int(state["image_queue"].shape[1])
    if "mim_head.weight" in state:
        settings["image_vocab"] = int(state["mim_head.weight"].shape[0])
    if source == "albef":
        settings["psl"] = False
    return out, dropped, settings


def official_settings(settings: Mapping[str, object]) -> str:
    return " ".join(f"model_config.simla.{k}={str(v).lower() if isinstance(v, bool) else v}"
                    for k, v in settings.items())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mmf_multilevel.methods.simla.checkpoints",
                                     description="Convert an official ALBEF or SIMLA checkpoint into simla's layout.")
    sub = parser.add_subparsers(dest="command", required=True)
    convert = sub.add_parser("convert", help="the official release -> simla")
    convert.add_argument("--from", dest="source", choices=SOURCES, required=True,
                         help="albef (salesforce/ALBEF: text layers 0-5, fusion layers 6-11) or simla "
                              "(codezakh/SIMLA: cross-attention in every layer)")
    convert.add_argument("input", help="the official checkpoint ({'model': state_dict, ...})")
    convert.add_argument("output", help="where to write {'model': state} (weights only)")
    convert.add_argument("--image-size", type=int, default=None,
                         help="resample the ViT position embeddings to this resolution (e.g. 384 for fine-tuning)")
    convert.add_argument("--allow-pickle", action="store_true",
                         help="the file holds non-tensor objects that need full unpickling and you trust it "
                              "(also MMF_ZOO_ALLOW_PICKLE=1)")
    args = parser.parse_args(argv)
    try:
        state = read_official_state(args.input, args.allow_pickle or None)
        converted, dropped, settings = convert_official_state(state, args.source, args.image_size)
    except (FileNotFoundError, KeyError, ValueError, UnsafeCheckpointError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    save_torch_atomically({"model": converted}, args.output)
    print(f"wrote {args.output}: {len(converted)} tensors from {len(state)} official ones\n"
          f"build simla with: {official_settings(settings)}\n"
          f"dropped {len(dropped)} official keys" + "".join(f"\n  {d}" for d in dropped))
    return 0


if __name__ == "__main__":
    sys.exit(main())
