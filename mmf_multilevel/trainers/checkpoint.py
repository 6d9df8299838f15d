"""MMF's checkpoint, made atomic, safe to load, and complete enough to resume exactly.

The file format stays MMF's (``model, optimizer, best_iteration, current_iteration,
current_epoch, num_updates, best_update, best_metric_value, config``) so MMF's own
``from_pretrained``/``resume_file`` read it; added keys:

* ``lr_scheduler``, ``fp16_scaler`` - their ``state_dict()``;
* ``rng_states`` - per rank: Python, NumPy, torch CPU and CUDA generator states;
* ``train_position`` - ``{"epoch", "batch"}``: batches of the epoch already consumed.

Every value is a tensor, number, string or container of them, so checkpoints load
with ``torch.load(weights_only=True)``. Each file is written to a temporary name in
the same folder and renamed over the target: a kill during a save leaves the
previous ``current.ckpt`` intact.
"""
import glob
import os
import random
import re
import shutil
import tempfile

import numpy as np
import torch
from mmf.common.registry import registry
from mmf.utils.checkpoint import Checkpoint
from mmf.utils.distributed import get_world_size, is_master
from omegaconf import OmegaConf


def atomic_torch_save(obj, path):
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".ckpt", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_copy(src, path):
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".ckpt", dir=directory)
    os.close(fd)
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def rng_state():
    """This process's random generator states, in ``weights_only``-loadable types."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {
            "algorithm": np_state[0],
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate(_as_tuples(state["python"]))
    np_state = state["numpy"]
    np.random.set_state(
        (
            np_state["algorithm"],
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuples(value):
    if isinstance(value, list):
        return tuple(_as_tuples(v) for v in value)
    if isinstance(value, tuple):
        return tuple(_as_tuples(v) for v in value)
    return value


def gather_rng_states():
    """RNG states of every rank (a list indexed by rank)."""
    state = rng_state()
    if get_world_size() < 2:
        return [state]
    import torch.distributed as dist

    states = [None] * get_world_size()
    dist.all_gather_object(states, state)
    return states


class MultilevelCheckpoint(Checkpoint):
    """MMF's ``Checkpoint`` with atomic writes, extra state and weights-only loading."""

    def __init__(self, trainer):
        super().__init__(trainer)
        self.last_loaded = None
        self.max_to_keep = self.config.checkpoint.get("max_to_keep", -1)

    def _torch_load(self, file):
        if os.path.isdir(file) or not os.path.exists(file):
            raise FileNotFoundError(f"checkpoint not found: {file}")
        ckpt = torch.load(file, map_location="cpu", weights_only=True)
        self.last_loaded = ckpt
        return ckpt

    def _load_pretrained(self, ckpt):
        """MMF's ``pretrained_state_mapping`` load (``own_prefix: checkpoint_prefix``), with each
        prefix written before a rename translated by the model's key map (``semvlp`` -> ``backbone``),
        and an error when a mapping entry copies nothing (a misspelt prefix used to load nothing, silently)."""
        model = self.trainer.model
        inner = model.module if hasattr(model, "module") else model
        translate = getattr(inner, "map_pretrained_prefix", lambda prefix: prefix)
        # a model may adapt a checkpoint tensor to its own shape (SIMLA: ViT position embeddings of another grid)
        adapt = getattr(inner, "adapt_pretrained_tensor", lambda name, tensor, own: tensor)
        own_state = model.state_dict()
        formatted = {attr: (inner.format_state_key(attr) if hasattr(inner, "format_state_key") else attr) for attr in ckpt}
        mapping = self.trainer.config.checkpoint.pretrained_state_mapping
        if hasattr(inner, "check_pretrained_state"):  # e.g. SemVLP: the checkpoint's L_s layout must be the model's
            inner.check_pretrained_state({name: ckpt[attr] for attr, name in formatted.items()})
        origin = {}
        if hasattr(inner, "prepare_pretrained_state"):  # e.g. SIMLA's NLVR2: a 12-layer encoder read as 18 layers
            named = {name: ckpt[attr] for attr, name in formatted.items()}
            ckpt = inner.prepare_pretrained_state(named)
            formatted = {name: name for name in ckpt}
            # an entry the model wrote (a duplicated layer) is logged with the checkpoint entry it came from
            written = {id(value): name for name, value in named.items()}
            origin = {name: written.get(id(value), name) for name, value in ckpt.items() if name not in named}
        for own_prefix, ckpt_prefix in mapping.items():
            key, value = translate(str(own_prefix)) + ".", translate(str(ckpt_prefix)) + "."
            copied = 0
            for attr, name in formatted.items():
                if value not in name:
                    continue
                rest = name.replace(value, "")
                for own_attr in own_state:
                    if key in own_attr and own_attr.replace(key, "") == rest:
                        self.trainer.writer.write(f"Copying {own_attr} from {origin.get(attr, attr)}")
                        own_state[own_attr].copy_(adapt(own_attr, ckpt[attr], own_state[own_attr]))
                        copied += 1
            if copied == 0:
                raise KeyError(f"checkpoint.pretrained_state_mapping {own_prefix}: {ckpt_prefix} copied nothing: the "
                               f"checkpoint has no '{value}*' entry matching a model '{key}*' entry")
            self.trainer.writer.write(f"Copied {copied} tensors from '{value}*' of the checkpoint into '{key}*'")
        self.trainer.writer.write("Pretrained model loaded")

    def state(self, update, iteration):
        trainer = self.trainer
        model = trainer.model
        if registry.get("data_parallel") or registry.get("distributed"):
            model = model.module
        early = trainer.early_stopping
        ckpt = {
            "model": model.state_dict(),
            "optimizer": trainer.optimizer.state_dict(),
            "best_iteration": early.best_monitored_iteration,
            "current_iteration": iteration,
            "current_epoch": trainer.current_epoch,
            "num_updates": update,
            "best_update": early.best_monitored_update,
            "best_metric_value": float(early.best_monitored_value) if early.best_monitored_value is not None else None,
            "config": OmegaConf.to_container(self.config, resolve=True),
            "train_position": {"epoch": trainer.current_epoch, "batch": trainer.epoch_batch},
        }
        if trainer.lr_scheduler is not None:
            ckpt["lr_scheduler"] = trainer.lr_scheduler.state_dict()
        if trainer.scaler is not None:
            ckpt["fp16_scaler"] = trainer.scaler.state_dict()
        return ckpt

    def save(self, update, iteration=None, update_best=False):
        if not is_master():
            return
        iteration = iteration or update
        ckpt = self.state(update, iteration)
        # gathered from every rank by the trainer where all ranks reach the same point
        # (MMF's early stopping saves from the master alone)
        stash = getattr(self.trainer, "rng_stash", None)
        ckpt["rng_states"] = stash[1] if stash and stash[0] == update else [rng_state()]
        if self.git_repo:
            ckpt.update(self._get_vcs_fields())
        model_path = os.path.join(self.models_foldername, f"model_{update}.ckpt")
        atomic_torch_save(ckpt, model_path)
        if update_best:
            atomic_copy(model_path, os.path.join(self.ckpt_foldername, self.ckpt_prefix + "best.ckpt"))
        atomic_copy(model_path, os.path.join(self.ckpt_foldername, self.ckpt_prefix + "current.ckpt"))
        self._remove_old()

    def _remove_old(self):
        if self.max_to_keep is None or self.max_to_keep <= 0:
            return
        found = []
        for path in glob.glob(os.path.join(self.models_foldername, "model_*.ckpt")):
            match = re.fullmatch(r"model_(\d+)\.ckpt", os.path.basename(path))
            if match:
                found.append((int(match.group(1)), path))
        for _, path in sorted(found)[: -self.max_to_keep]:
            os.unlink(path)

    def finalize(self):
        if is_master():
            model = self.trainer.model
            if registry.get("data_parallel") or registry.get("distributed"):
                model = model.module
            atomic_torch_save(model.state_dict(), self.pth_filepath)
