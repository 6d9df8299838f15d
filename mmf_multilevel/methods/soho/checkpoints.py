"""The official SOHO release (github.com/researchmm/soho, mmcv-based) into ``soho``'s network.

The official pre-training model (``SOHOSingleStreamPre``) saves, under mmcv's ``state_dict``:

* ``backbone.*`` - an mmcv ResNet (torchvision's module names: ``conv1``, ``bn1``, ``layer{1-4}.<i>.
  {conv,bn}<j>``, ``downsample.{0,1}``), BatchNorm with ``num_batches_tracked``;
* ``neck.conv.conv.weight`` (+ ``.bias`` without a norm) - the 1x1 conv, applied to the 2x2
  max-pooled C5 map; ``neck.conv.bn.*`` - the released configs' SyncBN after it;
* ``neck.vq.embed`` - the visual dictionary (``k x c``), with its running statistics
  ``neck.vq.{cluster_size, cluster_sum, embed_avg}``;
* ``neck.ln`` - the LayerNorm of the visual tokens, ``LN(x + pos)``;
* ``neck.pos_line`` (a linear layer on the dictionary's output, summed with the conv features before
  the LayerNorm), ``neck.begin_line``, ``neck.gate_fc`` (the gated variant ``SimpleVDforPreGate``),
  ``neck.mask_emb`` (a learned MVM mask vector);
* ``language.bert.{embeddings, encoder.layer.<i>}.*`` - BERT without a pooler (Hugging Face's names);
  ``mask_l_fc.weight`` - the MLM decoder, tied to the word embeddings;
* ``head.match_class.weight`` - ITM, a bias-free linear layer on the [CLS] state (no pooler).

What maps (:func:`convert_official_state`):

* the ResNet into ``backbone.encoder.resnet`` (frozen BatchNorm: ``num_batches_tracked`` dropped);
* the 1x1 conv into ``backbone.encoder.proj``, the SyncBN after it folded in (``W γ/σ``,
  ``β - μ γ/σ``: exact with its running statistics, which is how it runs at inference);
* ``neck.vq.embed`` into ``backbone.dictionary.embedding`` (the running statistics are the official
  update's, not Eq. 4's, and are dropped), ``neck.ln`` into ``backbone.visual_norm``;
* BERT's embeddings and layers into ``backbone.text.bert``.

The network that reads them: ``pool_before_conv: true`` (the official order; §3.1 convolves first)
and ``visual_token_type: false`` (no token-type row on the visual tokens), the release's ResNet
(``backbone: resnet18``) and layer count (``bert_num_layers: 3`` or ``num_hidden_layers``).
What does not map, and what happens to it:

* ``target="finetune"`` (default): the fine-tuning path reads the conv features before the dictionary
  (§4.2), as the official fine-tuning neck ``SimpleVDforVQA`` does (``LN(conv features + pos)``), so
  ``neck.pos_line`` / ``begin_line`` / ``gate_fc`` / ``mask_emb`` take no part and are dropped (listed);
* ``target="pretraining"``: they change the visual token the transformer was trained on
  (``LN(pos_line(f(v)) + v + pos)``, gated, or a learned mask vector); ``soho`` has none of them, so
  the conversion is refused naming the key;
* BERT's pooler and every head start fresh: the release has no pooler, and its ITM layer reads the
  raw [CLS] state while ``soho``'s heads read the pooled one (``head.match_class.weight`` is dropped,
  listed); ``mask_l_fc.weight`` must equal the word embeddings (tied) and is dropped.

Any other key is an error naming it; so is a missing piece (the conv, the LayerNorm, the dictionary,
BERT's embeddings or layers, the ResNet stem).

    python -m mmf_multilevel.methods.soho.checkpoints convert OFFICIAL.pth OUT.pth [--target pretraining]

writes ``{"model": state}`` (weights only), loadable with ``checkpoint.resume_file=OUT.pth
checkpoint.resume_pretrained=True`` and ``pretrained_state_mapping: {backbone: backbone}``.
"""
import argparse
import sys
from typing import Dict, List, Mapping, Tuple

import torch

from mmf_multilevel.files import save_torch_atomically
from mmf_multilevel.zoo.zoo import read_state

__all__ = ["TARGETS", "convert_official_state", "read_official_state", "OFFICIAL_SETTINGS", "main"]

TARGETS = ("finetune", "pretraining")
#: the model_config.soho keys a converted checkpoint needs besides the release's sizes
OFFICIAL_SETTINGS = {"pool_before_conv": True, "visual_token_type": False}
#: SyncBN's default epsilon (mmcv's build_norm_layer leaves it)
BN_EPS = 1e-5
#: neck parameters that change the pre-training visual token; unused by the fine-tuning path
_PRETRAINING_ONLY = ("neck.pos_line.", "neck.begin_line.", "neck.gate_fc.", "neck.mask_emb.")
#: dropped with a reason (listed)
_DROPPED = {"neck.vq.cluster_size": "the official update's running count",
            "neck.vq.cluster_sum": "the official update's usage count",
            "neck.vq.embed_avg": "the official update's running sum",
            "head.match_class.weight": "ITM on the raw [CLS] state (soho's heads read the pooled state)",
            "mask_l_fc.weight": "the MLM decoder, tied to the word embeddings"}


def read_official_state(path: str, allow_pickle=None) -> Dict[str, torch.Tensor]:
    """The tensors of an official checkpoint (mmcv's ``{"meta", "state_dict", "optimizer"}`` or a bare
    state dict; a ``module.`` prefix from DDP is removed)."""
    state = read_state(path, allow_pickle, container="state_dict")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}


def _fold_batch_norm(weight, bias, state, prefix):
    """``conv`` then eval-mode BatchNorm ``prefix`` as one conv: (weight, bias)."""
    names = ("weight", "bias", "running_mean", "running_var")
    missing = [f"{prefix}{n}" for n in names if f"{prefix}{n}" not in state]
    if missing:
        raise KeyError(f"official checkpoint: {missing[0]} missing (the BatchNorm after the 1x1 conv needs "
                       f"{', '.join(prefix + n for n in names)})")
    gamma, beta, mean, var = (state[f"{prefix}{n}"].double() for n in names)
    scale = gamma / torch.sqrt(var + BN_EPS)
    folded_w = weight.double() * scale.view(-1, 1, 1, 1)
    folded_b = (bias.double() - mean) * scale + beta
    return folded_w.to(weight.dtype), folded_b.to(weight.dtype)


def convert_official_state(state: Mapping[str, torch.Tensor], target: str = "finetune"
                           ) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """The official state dict -> (``soho`` state entries, official keys dropped with their reason).
    See the module docstring for the mapping, the refusals and the settings the result needs."""
    if target not in TARGETS:
        raise ValueError(f"target must be one of {list(TARGETS)}, got {target!r}")
    out: Dict[str, torch.Tensor] = {}
    dropped: List[str] = []
    used = set()

    def need(key, why):
        if key not in state:
            raise KeyError(f"official checkpoint: {key} missing ({why})")
        used.add(key)
        return state[key]

    # the ResNet
    backbone = [k for k in state if k.startswith("backbone.")]
    if "backbone.conv1.weight" not in state:
        raise KeyError("official checkpoint: backbone.conv1.weight missing (the ResNet's stem; expected mmcv's "
                       "ResNet under 'backbone.')")
    for key in backbone:
        used.add(key)
        if key.endswith(".num_batches_tracked"):
            continue
        out[f"backbone.encoder.resnet.{key[len('backbone.'):]}"] = state[key]

    # the 1x1 conv (+ the BatchNorm after it, folded)
    weight = need("neck.conv.conv.weight", "the 1x1 conv after the ResNet")
    bias = state.get("neck.conv.conv.bias")
    if bias is not None:
        used.add("neck.conv.conv.bias")
    else:
        bias = torch.zeros(weight.size(0), dtype=weight.dtype)
    norm = [k for k in state if k.startswith("neck.conv.") and not k.startswith("neck.conv.conv.")]
    if norm:
        prefix = "neck.conv.bn."
        stray = [k for k in norm if not k.startswith(prefix)]
        if stray:
            raise KeyError(f"official checkpoint: {stray[0]} is not a key this converter knows (only a BatchNorm "
                           f"'{prefix}*' after the 1x1 conv is folded)")
        weight, bias = _fold_batch_norm(weight, bias, state, prefix)
        used.update(norm)
    out["backbone.encoder.proj.weight"], out["backbone.encoder.proj.bias"] = weight, bias

    out["backbone.dictionary.embedding"] = need("neck.vq.embed", "the visual dictionary")
    out["backbone.dictionary.initialised"] = torch.tensor(True)  # trained entries: never redrawn (vd_init)
    for name in ("weight", "bias"):
        out[f"backbone.visual_norm.{name}"] = need(f"neck.ln.{name}", "the visual tokens' LayerNorm")

    # BERT (no pooler in the release)
    embeddings = ("word_embeddings.weight", "position_embeddings.weight", "token_type_embeddings.weight",
                  "LayerNorm.weight", "LayerNorm.bias")
    for name in embeddings:
        out[f"backbone.text.bert.embeddings.{name}"] = need(f"language.bert.embeddings.{name}", "BERT's embeddings")
    layers = [k for k in state if k.startswith("language.bert.encoder.layer.")]
    if not layers:
        raise KeyError("official checkpoint: language.bert.encoder.layer.0.* missing (BERT's layers)")
    for key in layers:
        used.add(key)
        out[f"backbone.text.bert.{key[len('language.bert.'):]}"] = state[key]
    if "mask_l_fc.weight" in state and not torch.equal(state["mask_l_fc.weight"],
                                                       state["language.bert.embeddings.word_embeddings.weight"]):
        raise ValueError("official checkpoint: mask_l_fc.weight differs from language.bert.embeddings."
                         "word_embeddings.weight (the release ties them)")

    for key in state:
        if key in used:
            continue
        if key in _DROPPED:
            dropped.append(f"{key} ({_DROPPED[key]})")
        elif key.startswith(_PRETRAINING_ONLY):
            if target == "pretraining":
                raise ValueError(f"official checkpoint: {key} is part of the official pre-training visual token "
                                 "(a linear layer / gate on the dictionary output with a residual of the features, "
                                 "or a learned mask vector), which soho does not have; convert with target "
                                 "'finetune' (the fine-tuning path reads the features before the dictionary)")
            dropped.append(f"{key} (the official pre-training visual token; unused when fine-tuning)")
        else:
            raise KeyError(f"official checkpoint: {key} is not a key of the official SOHO pre-training model "
                           "(backbone.*, neck.{conv,ln,vq,pos_line,begin_line,gate_fc,mask_emb}.*, language.bert.*, "
                           "mask_l_fc.weight, head.match_class.weight)")
    return out, dropped


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mmf_multilevel.methods.soho.checkpoints",
                                     description="Convert an official SOHO checkpoint into soho's layout.")
    sub = parser.add_subparsers(dest="command", required=True)
    convert = sub.add_parser("convert", help="the official release (researchmm/soho) -> soho")
    convert.add_argument("source", help="the official checkpoint (mmcv)")
    convert.add_argument("output", help="where to write {'model': state} (weights only)")
    convert.add_argument("--target", choices=TARGETS, default="finetune",
                         help="finetune (default): drop the pre-training-only visual-token layers; pretraining: "
                              "refuse a checkpoint that has them")
    convert.add_argument("--allow-pickle", action="store_true",
                         help="the official file holds non-tensor objects (mmcv's meta) and you trust it")
    args = parser.parse_args(argv)
    try:
        converted, dropped = convert_official_state(read_official_state(args.source, args.allow_pickle or None),
                                                    args.target)
    except (FileNotFoundError, KeyError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    save_torch_atomically({"model": converted}, args.output)
    layers = len({k.split(".")[5] for k in converted if k.startswith("backbone.text.bert.encoder.layer.")})
    k, c = converted["backbone.dictionary.embedding"].shape
    settings = " ".join(f"model_config.soho.{key}={str(v).lower()}" for key, v in OFFICIAL_SETTINGS.items())
    print(f"wrote {args.output}: {len(converted)} tensors (the network; BERT's pooler and the heads start fresh)\n"
          f"build soho with: {settings} model_config.soho.vd_size={k} model_config.soho.hidden_size={c} "
          f"and {layers} BERT layers (bert_num_layers={layers} with bert-base-uncased)\n"
          f"dropped {len(dropped)} official keys" + "".join(f"\n  {d}" for d in dropped))
    return 0


if __name__ == "__main__":
    sys.exit(main())
