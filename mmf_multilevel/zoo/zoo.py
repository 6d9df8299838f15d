"""The model zoo: named entries -> downloaded, verified folders -> checkpoints loaded safely.

Entries live in ``mmf_multilevel/zoo/models.yaml`` (ours, plus MMF's own model names whose
yaml the rc10 package lacks, e.g. ``visual_bert.pretrained.coco``) and in any *user zoo*
yaml - ``MMF_USER_ZOO=/path/a.yaml:/path/b.yaml`` or ``env.user_zoo`` in a config - merged on
top, so weights one trains oneself get names without touching the package. An entry is MMF's
format::

    semvlp:
      pretrained:
        coco:
          version: 1.0_2026_12_01
          resources:
          - url: https://example.org/semvlp.pretrained.coco.tar.gz   # or mmf://..., file://...
            file_name: semvlp.pretrained.coco.tar.gz
            hashcode: <sha256 of the file>
        defaults: ${semvlp.pretrained.coco}

A name that points at a node without ``version``/``resources`` uses its ``defaults``. Entries are
fetched into ``<env.data_dir>/models/<name>`` (see :mod:`.download`). The folder holds exactly one
checkpoint (``*.ckpt``, ``*.pth``, ``*.pt`` or ``*.safetensors``) and at most one ``*.yaml``;
checkpoints load with ``torch.load(weights_only=True)`` or safetensors - a legacy pickle that needs
arbitrary objects is refused unless ``allow_pickle`` (``MMF_ZOO_ALLOW_PICKLE=1``) is given, for
files one trusts.
"""
import glob
import os
from typing import TYPE_CHECKING, Dict, List, Mapping

from mmf_multilevel.zoo.download import ZooError, fetch_resources

if TYPE_CHECKING:  # pragma: no cover
    import torch

PACKAGE_ZOO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "models.yaml")
CHECKPOINT_PATTERNS = ("*.ckpt", "*.pth", "*.pt", "*.safetensors")


class ZooEntryError(ZooError, KeyError):
    """The zoo has no such entry, or the entry is malformed."""

    def __str__(self):
        return self.args[0]


class UnsafeCheckpointError(ZooError):
    """A checkpoint needs full unpickling and ``allow_pickle`` was not given."""


def zoo_files(extra=None):
    files = [PACKAGE_ZOO]
    for value in (os.environ.get("MMF_USER_ZOO"), extra):
        if not value:
            continue
        for path in (value if isinstance(value, (list, tuple)) else str(value).split(os.pathsep)):
            if path:
                if not os.path.isfile(path):
                    raise ZooEntryError(f"user zoo file not found: {path} (MMF_USER_ZOO / env.user_zoo)")
                files.append(path)
    return files


def load_zoo(extra=None):
    from omegaconf import OmegaConf

    merged = OmegaConf.create()
    for path in zoo_files(extra):
        merged = OmegaConf.merge(merged, OmegaConf.load(path))
    return merged


def resolve(name, extra=None):
    """(entry as a plain dict with ``version`` and ``resources``, the folder name) of a zoo name."""
    from omegaconf import OmegaConf

    zoo = load_zoo(extra)
    node = OmegaConf.select(zoo, name, default=None)
    folder = name
    if node is None:
        known = sorted(str(k) for k in zoo.keys())
        raise ZooEntryError(f"no model zoo entry {name!r} (top-level names: {', '.join(known)}; files: {', '.join(zoo_files(extra))})")
    if not (OmegaConf.is_dict(node) and "version" in node and "resources" in node):
        if OmegaConf.is_dict(node) and "defaults" in node:
            node = node.defaults
            folder = f"{name}.defaults"
        if not (OmegaConf.is_dict(node) and "version" in node and "resources" in node):
            raise ZooEntryError(f"model zoo entry {name!r} has no 'version' and 'resources' (nor a 'defaults' entry that has them)")
    entry = OmegaConf.to_container(node, resolve=True)
    resources = entry["resources"]
    entry["resources"] = resources if isinstance(resources, list) else [resources]
    for resource in entry["resources"]:
        if not isinstance(resource, dict) or "url" not in resource:
            raise ZooEntryError(f"model zoo entry {name!r}: each resource needs a 'url', got {resource!r}")
        code = resource.get("hashcode")
        if isinstance(code, int) and not isinstance(code, bool):  # YAML reads an all-digit hash as a number
            code = f"{code:064d}"
        if code is not None:
            code = str(code).lower()
            if len(code) != 64 or any(c not in "0123456789abcdef" for c in code):
                raise ZooEntryError(f"model zoo entry {name!r}: hashcode must be a SHA-256 (64 hex digits), got {code!r}")
            resource["hashcode"] = code
    return entry, folder


def models_dir(data_dir=None):
    if data_dir is None:
        try:
            from mmf.utils.configuration import get_mmf_env

            data_dir = get_mmf_env("data_dir")
        except Exception:  # outside an MMF run
            data_dir = None
    data_dir = data_dir or os.environ.get("MMF_DATA_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "torch", "mmf", "data")
    return os.path.join(os.path.abspath(os.path.expanduser(str(data_dir))), "models")


def download_model(name, data_dir=None, extra=None, progress=True):
    """The local folder of zoo entry ``name`` (downloaded, verified and extracted if needed)."""
    entry, folder = resolve(name, extra)
    for requirement in entry.get("zoo_requirements") or []:
        download_model(requirement, data_dir, extra, progress)
    root = models_dir(data_dir)
    return fetch_resources(entry["resources"], os.path.join(root, folder), entry["version"], os.path.join(root, "downloads"), progress)


def load_checkpoint(path, allow_pickle=None):
    """A checkpoint file as a dict, never unpickling arbitrary objects unless ``allow_pickle``."""
    import pickle

    import torch

    if allow_pickle is None:
        allow_pickle = os.environ.get("MMF_ZOO_ALLOW_PICKLE", "") not in ("", "0")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if not allow_pickle:
            raise UnsafeCheckpointError(
                f"{path} needs full unpickling, which can run arbitrary code ({str(exc).splitlines()[0]}); "
                "if you trust the file, allow it with MMF_ZOO_ALLOW_PICKLE=1 (or allow_pickle=True)"
            ) from None
        return torch.load(path, map_location="cpu", weights_only=False)


def load_pretrained(name_or_path, data_dir=None, extra=None, allow_pickle=None):
    """MMF's ``load_pretrained_model`` contract: ``{"config", "checkpoint", "full_config"}``.

    ``name_or_path``: a zoo name or a local folder / checkpoint file.
    """
    from mmf.utils.configuration import load_yaml

    if os.path.isfile(name_or_path):
        folder, checkpoints = os.path.dirname(name_or_path), [name_or_path]
        model_name = os.path.basename(name_or_path)
    else:
        folder = name_or_path if os.path.isdir(name_or_path) else download_model(name_or_path, data_dir, extra)
        checkpoints = sorted(p for pattern in CHECKPOINT_PATTERNS for p in glob.glob(os.path.join(folder, pattern)))
        model_name = os.path.basename(name_or_path.rstrip(os.sep))
        if len(checkpoints) != 1:
            raise ZooEntryError(
                f"{folder}: expected exactly one checkpoint ({', '.join(CHECKPOINT_PATTERNS)}), found {len(checkpoints)}: "
                f"{[os.path.basename(p) for p in checkpoints]}"
            )
    configs = sorted(glob.glob(os.path.join(folder, "*.yaml")))
    if len(configs) > 1:
        raise ZooEntryError(f"{folder}: more than one yaml next to the checkpoint: {[os.path.basename(p) for p in configs]}")
    checkpoint = load_checkpoint(checkpoints[0], allow_pickle)
    if configs:
        config = load_yaml(configs[0])
    elif isinstance(checkpoint, dict) and "config" in checkpoint:
        config = checkpoint["config"]
    else:
        raise ZooEntryError(f"{folder}: no yaml beside the checkpoint and no 'config' inside it")
    if isinstance(config, dict):
        from omegaconf import OmegaConf

        config = OmegaConf.create(config)
    model_config = config.get("model_config", config)
    key = model_name.split(".")[0]
    if key in model_config:
        model_config = model_config[key]
    state = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else checkpoint
    return {"config": model_config, "checkpoint": state, "full_config": config}


def load_converted(model: "torch.nn.Module", converted: Mapping[str, "torch.Tensor"], source: str) -> List[str]:
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


def read_state(path: str, allow_pickle=None, container: str = "model") -> Dict[str, "torch.Tensor"]:
    """The tensors of a checkpoint (``.ckpt`` / ``.pth``), optionally under ``container`` (MMF's
    ``model``; mmcv's ``state_dict``)."""
    import torch

    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    state = load_checkpoint(path, allow_pickle)
    state = state.get(container, state) if isinstance(state, dict) else state
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a state dict of tensors (optionally under '{container}')")
    return dict(state)
