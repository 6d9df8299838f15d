"""Load the released BUTD and VinVL checkpoints into the detectron2 models of :mod:`.models`.

Supported source layouts (detected from the key names; ``module.`` prefixes are stripped):

``detectron2`` - the caffe-converted bottom-up-attention checkpoints used with detectron2
    (py-bottom-up-attention's ``faster_rcnn_from_caffe_attr.pkl``: a pickle of
    ``{"model": {name: ndarray}}``; bottom-up-attention.pytorch's ``bua-caffe-frcn-r101*.pth``:
    ``{"model": {name: tensor}}``). Backbone/RPN/res5 names are detectron2's. The class head is
    ``roi_heads.box_predictor.{cls_score,bbox_pred}``; its background row is taken as detectron2's
    (last) when ``cls_score`` has C + 1 rows and ``bbox_pred`` C x 4 rows, as caffe's (first) when
    ``bbox_pred`` has (C + 1) x 4 rows (the attribute head's object embedding follows the same
    order). An attribute head with A outputs (no "no attribute" column) gets one added that is
    never chosen. The attribute head is either
    ``roi_heads.attribute_predictor.{obj_embed, fc.0, attr_score}`` or bottom-up-attention.pytorch's
    ``roi_heads.box_predictor.{cls_embed, attr_linear1, attr_linear2}``.
``maskrcnn_benchmark`` - VinVL's ``vinvl_vg_x152c4.pth`` (scene_graph_benchmark / maskrcnn-benchmark
    names: ``backbone.body.stem``, ``backbone.body.layer1-3``, ``rpn.head.{conv,cls_logits,bbox_pred}``,
    ``roi_heads.box.feature_extractor.head.layer4``, ``roi_heads.box.predictor.{cls_score,bbox_pred}``
    with the background first, and the attribute head ``attribute.predictor.{cls_embedding,fc_attr,attr_score}``
    (``attribute.feature_extractor`` is the box head's res5, shared, and skipped); vqa-maskrcnn-benchmark's
    ``roi_heads.box.predictor.{cls_embed,attr_linear1,attr_linear2}`` is read too).
    RPN anchors are reordered from maskrcnn-benchmark's ratio-major to detectron2's size-major order,
    and FrozenBatchNorm statistics are adjusted for detectron2's epsilon (maskrcnn-benchmark's has none).

Every mismatch (a tensor the model lacks, one the checkpoint lacks, a shape that differs) is an
error naming the checkpoint, the key and both shapes.
"""
import hashlib
import os
import pickle
import re
import urllib.parse

import numpy as np
import torch

LAYOUT_DETECTRON2 = "detectron2"
LAYOUT_MASKRCNN = "maskrcnn_benchmark"

# tensors of the source files that the extractor does not use
_IGNORED = (
    re.compile(r"^rpn\.anchor_generator\."),
    re.compile(r"^proposal_generator\.anchor_generator\."),
    re.compile(r"^attribute\.feature_extractor\."),  # VinVL: the box head's res5, shared
    re.compile(r".*num_batches_tracked$"),
    re.compile(r"^pixel_(mean|std)$"),
)


class CheckpointError(ValueError):
    pass


# --------------------------------------------------------------------------- files
def sha256_of(path, chunk=1 << 20):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            digest.update(block)
    return digest.hexdigest()


def resolve_weights(path_or_url, cache_dir=None):
    """Local path of ``path_or_url``; URLs are downloaded once into ``cache_dir`` (temp file + rename)."""
    parsed = urllib.parse.urlparse(str(path_or_url))
    if parsed.scheme in ("http", "https", "ftp"):
        cache_dir = cache_dir or os.path.join(
            os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "mmf_multilevel", "detectors"
        )
        os.makedirs(cache_dir, exist_ok=True)
        target = os.path.join(cache_dir, os.path.basename(parsed.path) or "weights")
        if not os.path.exists(target):
            from torch.hub import download_url_to_file

            tmp = f"{target}.part{os.getpid()}"
            try:
                download_url_to_file(str(path_or_url), tmp, progress=True)
                os.replace(tmp, target)
            except Exception as exc:
                if os.path.exists(tmp):
                    os.remove(tmp)
                raise CheckpointError(f"cannot download {path_or_url}: {exc}") from None
        return target
    if parsed.scheme == "file":
        path_or_url = parsed.path
    if not os.path.isfile(path_or_url):
        raise CheckpointError(f"weights file not found: {path_or_url}")
    return str(path_or_url)


def read_checkpoint(path):
    """{name: tensor} of a ``.pkl`` (pickled numpy dict) or torch checkpoint; ``{"model": ...}`` is unwrapped."""
    with open(path, "rb") as f:
        magic = f.read(2)
    if magic[:1] == b"\x80" and not path.endswith((".pth", ".pt", ".bin")):
        data = _load_numpy_pickle(path)
    else:
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            if magic[:1] == b"\x80":
                data = _load_numpy_pickle(path)
            else:
                raise CheckpointError(f"{path}: cannot read as a torch checkpoint ({type(exc).__name__}: {exc})") from None
    if isinstance(data, dict) and "model" in data and isinstance(data["model"], dict):
        data = data["model"]
    elif isinstance(data, dict) and "state_dict" in data and isinstance(data["state_dict"], dict):
        data = data["state_dict"]
    if not isinstance(data, dict) or not data:
        raise CheckpointError(f"{path}: expected a dict of tensors (or {{'model': {{...}}}}), got {type(data).__name__}")
    state = {}
    for key, value in data.items():
        if isinstance(value, np.ndarray):
            value = torch.from_numpy(np.ascontiguousarray(value))
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{path}: key {key!r} holds a {type(value).__name__}, expected an array/tensor")
        state[str(key)] = value
    return state


class _NumpyUnpickler(pickle.Unpickler):
    """Unpickler of detectron2-style ``.pkl`` weights: numpy arrays and builtins only."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
        ("collections", "OrderedDict"),
        ("builtins", "dict"),
        ("builtins", "list"),
        ("builtins", "tuple"),
    }

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing {module}.{name}: weight pickles may hold numpy arrays and builtins only")
        return super().find_class(module, name)


def _load_numpy_pickle(path):
    with open(path, "rb") as f:
        try:
            return _NumpyUnpickler(f, encoding="latin1").load()
        except Exception as exc:
            raise CheckpointError(f"{path}: cannot read as a pickled weight dict ({type(exc).__name__}: {exc})") from None


# --------------------------------------------------------------------------- layout
def detect_layout(state, path="<checkpoint>"):
    keys = list(state)
    if any(k.startswith("backbone.body.") for k in keys):
        return LAYOUT_MASKRCNN
    if any(k.startswith(("backbone.stem.", "backbone.res")) for k in keys):
        return LAYOUT_DETECTRON2
    sample = ", ".join(sorted(keys)[:5])
    raise CheckpointError(
        f"{path}: unknown checkpoint layout (first keys: {sample}); expected detectron2 names (backbone.stem.*, "
        "backbone.res2.*: BUTD caffe-converted) or maskrcnn-benchmark names (backbone.body.*: VinVL)"
    )


def _strip_module(state):
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}


_MRCNN_BLOCK = re.compile(r"^(?P<stage>layer[1-4])\.(?P<block>\d+)\.(?P<rest>.+)$")
_MRCNN_PARTS = {
    "conv1.weight": "conv1.weight",
    "conv2.weight": "conv2.weight",
    "conv3.weight": "conv3.weight",
    "downsample.0.weight": "shortcut.weight",
}
_BN_FIELDS = ("weight", "bias", "running_mean", "running_var")


def _mrcnn_block_part(rest):
    if rest in _MRCNN_PARTS:
        return _MRCNN_PARTS[rest]
    m = re.match(r"^bn([123])\.(\w+)$", rest)
    if m and m.group(2) in _BN_FIELDS:
        return f"conv{m.group(1)}.norm.{m.group(2)}"
    m = re.match(r"^downsample\.1\.(\w+)$", rest)
    if m and m.group(1) in _BN_FIELDS:
        return f"shortcut.norm.{m.group(1)}"
    return None


def _maskrcnn_name(key):
    """maskrcnn-benchmark name -> (our name, kind) or (None, None) if unknown."""
    if key.startswith("backbone.body.stem."):
        rest = key[len("backbone.body.stem."):]
        if rest == "conv1.weight":
            return "backbone.stem.conv1.weight", "param"
        m = re.match(r"^bn1\.(\w+)$", rest)
        if m and m.group(1) in _BN_FIELDS:
            return f"backbone.stem.conv1.norm.{m.group(1)}", "param"
        return None, None
    if key.startswith("backbone.body."):
        m = _MRCNN_BLOCK.match(key[len("backbone.body."):])
        if m and m.group("stage") in ("layer1", "layer2", "layer3"):
            part = _mrcnn_block_part(m.group("rest"))
            if part:
                return f"backbone.res{int(m.group('stage')[-1]) + 1}.{m.group('block')}.{part}", "param"
        return None, None
    if key.startswith("roi_heads.box.feature_extractor.head."):
        m = _MRCNN_BLOCK.match(key[len("roi_heads.box.feature_extractor.head."):])
        if m and m.group("stage") == "layer4":
            part = _mrcnn_block_part(m.group("rest"))
            if part:
                return f"roi_heads.res5.{m.group('block')}.{part}", "param"
        return None, None
    table = {
        "rpn.head.conv.weight": ("proposal_generator.rpn_head.conv.weight", "param"),
        "rpn.head.conv.bias": ("proposal_generator.rpn_head.conv.bias", "param"),
        "rpn.head.cls_logits.weight": ("proposal_generator.rpn_head.objectness_logits.weight", "rpn_logits"),
        "rpn.head.cls_logits.bias": ("proposal_generator.rpn_head.objectness_logits.bias", "rpn_logits"),
        "rpn.head.bbox_pred.weight": ("proposal_generator.rpn_head.anchor_deltas.weight", "rpn_deltas"),
        "rpn.head.bbox_pred.bias": ("proposal_generator.rpn_head.anchor_deltas.bias", "rpn_deltas"),
        "roi_heads.box.predictor.cls_score.weight": ("roi_heads.box_predictor.cls_score.weight", "cls_bg_first"),
        "roi_heads.box.predictor.cls_score.bias": ("roi_heads.box_predictor.cls_score.bias", "cls_bg_first"),
        "roi_heads.box.predictor.bbox_pred.weight": ("roi_heads.box_predictor.bbox_pred.weight", "bbox_bg_first"),
        "roi_heads.box.predictor.bbox_pred.bias": ("roi_heads.box_predictor.bbox_pred.bias", "bbox_bg_first"),
        # scene_graph_benchmark's AttrRCNN: the attribute head is a top-level module
        "attribute.predictor.cls_embedding.weight": ("roi_heads.attribute_predictor.obj_embed.weight", "cls_bg_first"),
        "attribute.predictor.fc_attr.weight": ("roi_heads.attribute_predictor.fc.0.weight", "param"),
        "attribute.predictor.fc_attr.bias": ("roi_heads.attribute_predictor.fc.0.bias", "param"),
        "attribute.predictor.attr_score.weight": ("roi_heads.attribute_predictor.attr_score.weight", "param"),
        "attribute.predictor.attr_score.bias": ("roi_heads.attribute_predictor.attr_score.bias", "param"),
        # vqa-maskrcnn-benchmark's box predictor with attributes (the same head, other names)
        "roi_heads.box.predictor.cls_embed.weight": ("roi_heads.attribute_predictor.obj_embed.weight", "cls_bg_first"),
        "roi_heads.box.predictor.attr_linear1.weight": ("roi_heads.attribute_predictor.fc.0.weight", "param"),
        "roi_heads.box.predictor.attr_linear1.bias": ("roi_heads.attribute_predictor.fc.0.bias", "param"),
        "roi_heads.box.predictor.attr_linear2.weight": ("roi_heads.attribute_predictor.attr_score.weight", "param"),
        "roi_heads.box.predictor.attr_linear2.bias": ("roi_heads.attribute_predictor.attr_score.bias", "param"),
    }
    return table.get(key, (None, None))


_D2_ALIASES = {
    # caffe layer names of the BUTD attribute head (cls_embedding, fc_attr, attr_score)
    "roi_heads.attribute_predictor.cls_embedding.weight": "roi_heads.attribute_predictor.obj_embed.weight",
    "roi_heads.attribute_predictor.fc_attr.weight": "roi_heads.attribute_predictor.fc.0.weight",
    "roi_heads.attribute_predictor.fc_attr.bias": "roi_heads.attribute_predictor.fc.0.bias",
    # bottom-up-attention.pytorch: the attribute head inside the box predictor
    "roi_heads.box_predictor.cls_embed.weight": "roi_heads.attribute_predictor.obj_embed.weight",
    "roi_heads.box_predictor.attr_linear1.weight": "roi_heads.attribute_predictor.fc.0.weight",
    "roi_heads.box_predictor.attr_linear1.bias": "roi_heads.attribute_predictor.fc.0.bias",
    "roi_heads.box_predictor.attr_linear2.weight": "roi_heads.attribute_predictor.attr_score.weight",
    "roi_heads.box_predictor.attr_linear2.bias": "roi_heads.attribute_predictor.attr_score.bias",
}


def _ignored(key):
    return any(p.match(key) for p in _IGNORED)


def _reorder_anchors(tensor, num_sizes, num_ratios, per_anchor):
    """Rows ordered (ratio, size[, coord]) -> (size, ratio[, coord])."""
    rest = tensor.shape[1:]
    t = tensor.reshape(num_ratios, num_sizes, per_anchor, *rest)
    return t.transpose(0, 1).reshape(num_ratios * num_sizes * per_anchor, *rest).contiguous()


def convert_state_dict(state, model_state, layout, anchors=(5, 3), path="<checkpoint>", norm_eps=1e-5):
    """Map a source ``state`` to our model's names and conventions; -> {our name: tensor}.

    ``model_state`` is the target model's ``state_dict()`` (for shapes and the class count);
    ``anchors`` is (number of sizes, number of aspect ratios) of the RPN.
    """
    state = _strip_module(state)
    num_classes = model_state["roi_heads.box_predictor.cls_score.weight"].shape[0] - 1 if "roi_heads.box_predictor.cls_score.weight" in model_state else None
    out, unknown = {}, []
    if layout == LAYOUT_MASKRCNN:
        for key, value in state.items():
            name, kind = _maskrcnn_name(key)
            if name is None:
                if not _ignored(key):
                    unknown.append(key)
                continue
            value = value.float() if value.is_floating_point() else value
            if kind == "rpn_logits":
                value = _reorder_anchors(value, anchors[0], anchors[1], 1)
            elif kind == "rpn_deltas":
                value = _reorder_anchors(value, anchors[0], anchors[1], 4)
            elif kind == "cls_bg_first":
                value = torch.cat([value[1:], value[:1]], dim=0)
            elif kind == "bbox_bg_first":
                value = value[4:]
            if name.endswith("norm.running_var"):
                value = (value - norm_eps).clamp_min(0.0)  # maskrcnn-benchmark normalises by sqrt(var), detectron2 by sqrt(var + eps)
            out[name] = value
    elif layout == LAYOUT_DETECTRON2:
        for key, value in state.items():
            name = _D2_ALIASES.get(key, key)
            if _ignored(name):
                continue
            if name not in model_state:
                unknown.append(key)
                continue
            out[name] = value.float() if value.is_floating_point() else value
        _fix_class_head_order(out, num_classes, path)
    else:
        raise CheckpointError(f"{path}: unknown layout {layout!r}")
    _add_no_attribute_column(out, model_state)
    if unknown:
        shown = ", ".join(unknown[:8]) + (f" ... ({len(unknown)} in all)" if len(unknown) > 8 else "")
        raise CheckpointError(f"{path} ({layout} layout): keys the {len(model_state)}-tensor model has no place for: {shown}")
    return out


def _fix_class_head_order(out, num_classes, path):
    """detectron2-named class head: background last (detectron2) or first (caffe order)."""
    if num_classes is None or "roi_heads.box_predictor.bbox_pred.weight" not in out:
        return
    rows = out["roi_heads.box_predictor.bbox_pred.weight"].shape[0]
    if rows == (num_classes + 1) * 4:  # caffe order: background first, with its own deltas
        embed = "roi_heads.attribute_predictor.obj_embed.weight"
        if embed in out:
            out[embed] = torch.cat([out[embed][1:], out[embed][:1]], dim=0)
        for suffix in ("weight", "bias"):
            cls_key = f"roi_heads.box_predictor.cls_score.{suffix}"
            box_key = f"roi_heads.box_predictor.bbox_pred.{suffix}"
            if cls_key in out:
                value = out[cls_key]
                out[cls_key] = torch.cat([value[1:], value[:1]], dim=0)
            if box_key in out:
                out[box_key] = out[box_key][4:]
    elif rows != num_classes * 4:
        raise CheckpointError(
            f"{path}: roi_heads.box_predictor.bbox_pred has {rows} rows; expected {num_classes * 4} (C x 4, detectron2) or "
            f"{(num_classes + 1) * 4} ((C + 1) x 4, caffe order) for C = {num_classes} classes"
        )


def anchor_shape(cfg):
    """(number of anchor sizes, number of aspect ratios) of a single-level RPN config."""
    return len(cfg.MODEL.ANCHOR_GENERATOR.SIZES[0]), len(cfg.MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS[0])


def _add_no_attribute_column(out, model_state):
    """Attribute heads trained without a "no attribute" output (A rows for our A + 1): add one that is never chosen."""
    key = "roi_heads.attribute_predictor.attr_score"
    if f"{key}.weight" not in out or f"{key}.weight" not in model_state:
        return
    have, want = out[f"{key}.weight"].shape[0], model_state[f"{key}.weight"].shape[0]
    if have == want - 1:
        weight, bias = out[f"{key}.weight"], out.get(f"{key}.bias")
        out[f"{key}.weight"] = torch.cat([torch.zeros_like(weight[:1]), weight], dim=0)
        if bias is not None:
            out[f"{key}.bias"] = torch.cat([bias.new_full((1,), -1e4), bias], dim=0)


def load_weights(model, path, anchors):
    """Read ``path``, convert it and load it into ``model`` (strict); -> (layout, sha256 of the file).

    ``anchors``: :func:`anchor_shape` of the model's config.
    """
    state = read_checkpoint(path)
    layout = detect_layout(_strip_module(state), path)
    model_state = model.state_dict()
    converted = convert_state_dict(state, model_state, layout, anchors=anchors, path=path)
    missing = [k for k in model_state if k not in converted and not _ignored(k)]
    if missing:
        shown = ", ".join(missing[:8]) + (f" ... ({len(missing)} in all)" if len(missing) > 8 else "")
        raise CheckpointError(f"{path} ({layout} layout): lacks tensors the model needs: {shown}")
    for key, value in converted.items():
        expected = tuple(model_state[key].shape)
        if tuple(value.shape) != expected:
            raise CheckpointError(
                f"{path} ({layout} layout): tensor {key} has shape {tuple(value.shape)}, the model expects {expected} "
                "(wrong --model, or a config override that changes the architecture?)"
            )
    result = model.load_state_dict(converted, strict=False)
    unexpected = [k for k in result.unexpected_keys]
    if unexpected:
        raise CheckpointError(f"{path}: unexpected tensors {unexpected[:8]}")
    return layout, sha256_of(path)


def state_sha256(model):
    """sha256 over a model's tensors (names, shapes, bytes): identifies random-initialised weights."""
    digest = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        digest.update(key.encode("utf-8"))
        digest.update(str(tuple(value.shape)).encode("ascii"))
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


# --------------------------------------------------------------------------- writing the source layouts
def to_maskrcnn_state_dict(model_state, anchors=(5, 3), norm_eps=1e-5):
    """Inverse of the maskrcnn-benchmark conversion: our state dict in VinVL's key layout.

    Used by the tests to make checkpoints in the released file's layout, and handy for
    checking a conversion by round trip.
    """
    inverse = {}
    for key in _all_maskrcnn_keys(model_state):
        name, kind = _maskrcnn_name(key)
        value = model_state[name].clone()
        if kind == "rpn_logits":
            value = _reorder_anchors(value, anchors[1], anchors[0], 1)
        elif kind == "rpn_deltas":
            value = _reorder_anchors(value, anchors[1], anchors[0], 4)
        elif kind == "cls_bg_first":
            value = torch.cat([value[-1:], value[:-1]], dim=0)
        elif kind == "bbox_bg_first":
            value = torch.cat([torch.zeros_like(value[:4]), value], dim=0)
        if name.endswith("norm.running_var"):
            value = value + norm_eps
        inverse[key] = value
    return inverse


def _all_maskrcnn_keys(model_state):
    """Every maskrcnn-benchmark key that maps onto a tensor of ``model_state``."""
    keys = []
    for name in model_state:
        source = _maskrcnn_source_name(name)
        if source is not None:
            keys.append(source)
    return keys


def _maskrcnn_source_name(name):
    m = re.match(r"^backbone\.stem\.conv1\.(weight|norm\.(\w+))$", name)
    if m:
        return "backbone.body.stem.conv1.weight" if m.group(1) == "weight" else f"backbone.body.stem.bn1.{m.group(2)}"
    m = re.match(r"^(backbone\.res(?P<stage>[2-4])|roi_heads\.res5)\.(?P<block>\d+)\.(?P<rest>.+)$", name)
    if m:
        rest = m.group("rest")
        part = {"conv1.weight": "conv1.weight", "conv2.weight": "conv2.weight", "conv3.weight": "conv3.weight", "shortcut.weight": "downsample.0.weight"}.get(rest)
        if part is None:
            mm = re.match(r"^conv([123])\.norm\.(\w+)$", rest)
            if mm:
                part = f"bn{mm.group(1)}.{mm.group(2)}"
            mm = re.match(r"^shortcut\.norm\.(\w+)$", rest)
            if mm:
                part = f"downsample.1.{mm.group(1)}"
        if part is None:
            return None
        if m.group("stage"):
            return f"backbone.body.layer{int(m.group('stage')) - 1}.{m.group('block')}.{part}"
        return f"roi_heads.box.feature_extractor.head.layer4.{m.group('block')}.{part}"
    for key in (
        "rpn.head.conv.weight", "rpn.head.conv.bias", "rpn.head.cls_logits.weight", "rpn.head.cls_logits.bias",
        "rpn.head.bbox_pred.weight", "rpn.head.bbox_pred.bias",
        "roi_heads.box.predictor.cls_score.weight", "roi_heads.box.predictor.cls_score.bias",
        "roi_heads.box.predictor.bbox_pred.weight", "roi_heads.box.predictor.bbox_pred.bias",
        "attribute.predictor.cls_embedding.weight",
        "attribute.predictor.fc_attr.weight", "attribute.predictor.fc_attr.bias",
        "attribute.predictor.attr_score.weight", "attribute.predictor.attr_score.bias",
    ):
        if _maskrcnn_name(key)[0] == name:
            return key
    return None
