"""The adapter base every method's registered MMF model extends.

A method's network is a plain ``nn.Module`` (``methods/<method>/network.py``, no MMF); its adapter
(``methods/<method>/model.py``) subclasses :class:`MethodModel` and fills in four things:

* ``name`` (the registry name), ``config_class`` (the typed defaults), ``head_types``;
* :meth:`build_backbone` -> the network, stored as ``self.backbone`` in every method;
* :meth:`build_head` for each head type (pre-training heads are ``self.heads``, task heads
  ``self.classifier``);
* :meth:`encode` (a batch, or one side of a paired batch, through the backbone) and the per-head
  forwards :meth:`pretraining_forward` / :meth:`task_forward`; NLVR2's paired forward is written once
  here (:meth:`paired_forward`).

What the base does for all of them: ``config_path`` (the ``defaults.yaml`` beside the method),
the typed settings (``self.settings``), head-type checking, forward dispatch, loss naming
``<split>/<dataset>/<name>`` (:meth:`named_losses`), checkpoint key maps for state dicts written
before a rename (:attr:`state_key_map`), and the **training hooks** the ``mmf_multilevel`` trainer
calls so a method owns its optimisation policy without editing the trainer:

* :meth:`on_update_start` - before the first forward of every optimizer update, with the update
  index and the epoch (:class:`TrainingProgress`): the model reads its schedule from here, never
  from MMF's global registry inside ``forward``;
* :meth:`synchronize` - on every rank, once per update after the backward passes and before the
  optimizer step: buffers that must stay identical across ranks are all-reduced here;
* :meth:`configure_optimizer` - the method's own optimizer (parameter groups, several optimizers
  behind one ``step``), or None for MMF's ``optimizer:`` config;
* :meth:`log_message` - a line for MMF's log every ``training.log_interval`` updates.

:meth:`alignment` - the first sample's text-to-visual attention from the layer the method names (the
pictures of :mod:`mmf_multilevel.predict`); each method implements it for its own network.

:meth:`retrieval_encoders` - the method's dual encoder (:mod:`mmf_multilevel.methods.dual_encoder`) when its
retrieval ranks with uni-modal embeddings (SIMLA, MVPTR); None (the base) when it scores every pair with its
matching head.
"""
import inspect
import os
from typing import Dict, Optional, Sequence, Tuple

import torch

from mmf_multilevel.methods.batch import PAIRED_SIDES
from mmf_multilevel.methods.config import read_config
from mmf_multilevel.methods.progress import TrainingProgress

try:
    # importing MMF registers this plugin's methods (compat/_bootstrap.py); when this module is what
    # imported MMF first, that registration waits until this module's import is complete
    from mmf.common.registry import registry
    from mmf.models.base_model import BaseModel
except ModuleNotFoundError as error:  # pragma: no cover - exercised only without MMF
    if error.name != "mmf" and not str(error.name).startswith("mmf."):
        raise

    class BaseModel(torch.nn.Module):  # type: ignore[no-redef]
        def __init__(self, config, *args, **kwargs):
            raise ImportError(f"the registered {type(self).__name__} model needs MMF: "
                              "pip install --no-deps mmf==1.0.0rc10")

    registry = None

__all__ = ["TrainingProgress", "MethodModel", "register_method", "apply_key_map", "load_method_model"]


def register_method(cls):
    """Register a :class:`MethodModel` subclass under its ``name`` in MMF's model registry."""
    if registry is not None:
        registry.register_model(cls.name)(cls)
    return cls


def load_method_model(config, name: str, checkpoint=None):
    """The run config's model ``name`` built as MMF's trainer builds it, with ``checkpoint``'s weights (an
    MMF ``.pth`` state dict or ``.ckpt``; strict) when given, in eval mode: what a command that evaluates
    a trained model (a ranking, a picture) starts from."""
    from mmf.utils.build import build_model
    from omegaconf import open_dict

    from mmf_multilevel.zoo.zoo import read_state

    if config.get("model") != name:
        raise ValueError(f"the config's model is {config.get('model')!r}; this command evaluates {name!r}")
    attributes = config.model_config[name]
    with open_dict(attributes):
        attributes.model = name
    model = build_model(attributes)
    if checkpoint is not None:
        if not os.path.isfile(checkpoint):
            raise FileNotFoundError(f"--checkpoint {checkpoint}: no such file")
        model.load_state_dict(read_state(checkpoint), strict=True)
    return model.eval()


def apply_key_map(key: str, key_map: Sequence[Tuple[str, Optional[str]]]) -> Optional[str]:
    """``key`` with the first matching ``(old_prefix, new_prefix)`` of ``key_map`` applied; a
    ``new_prefix`` of None means the entry is obsolete (returns None)."""
    for old, new in key_map:
        if key == old.rstrip(".") or key.startswith(old):
            return None if new is None else new + key[len(old):]
    return key


class MethodModel(BaseModel):
    #: the registry name (``model: <name>`` in a config)
    name: str = ""
    #: the typed defaults (a dataclass extending :class:`~mmf_multilevel.methods.config.MethodConfig`)
    config_class = None
    #: the ``training_head_type`` values this method builds
    head_types: Tuple[str, ...] = ("pretraining",)
    #: ``(old_prefix, new_prefix)`` pairs: state-dict keys of checkpoints written before a rename;
    #: ``new_prefix`` None drops the entry (a buffer that no longer exists)
    state_key_map: Tuple[Tuple[str, Optional[str]], ...] = ()
    #: ``{dotted key: where it went}``: config keys that moved out of ``model_config.<name>`` (an error
    #: names the new place instead of "unknown key")
    moved_keys: Dict[str, str] = {}
    #: the module (dotted name) that computes and draws the method's own grounding signal of a query, with
    #: ``predictor_signal(predictor, image, text, image_id)`` (:mod:`mmf_multilevel.predict.signals`); None: none
    signal_module: Optional[str] = None
    #: for a method without one: where a signal of its own is drawn instead (said with the refusal)
    no_signal_hint: str = ""

    def __init__(self, config, *args, **kwargs):
        super().__init__(config)
        self.config = config
        self.settings = read_config(self.config_class, config, self.name, self.moved_keys)
        self.progress = TrainingProgress()

    @classmethod
    def config_path(cls):
        return os.path.join(os.path.dirname(inspect.getfile(cls)), "defaults.yaml")

    # ------------------------------------------------------------------ build
    def build(self):
        head_type = self.settings.training_head_type
        if head_type not in self.head_types:
            raise ValueError(f"model_config.{self.name}.training_head_type must be one of {list(self.head_types)}, "
                             f"got {head_type!r}")
        self.head_type = head_type
        self.backbone = self.build_backbone()
        self.build_head(head_type)
        self.after_build()

    def build_backbone(self) -> torch.nn.Module:
        raise NotImplementedError

    def build_head(self, head_type: str) -> None:
        raise NotImplementedError

    def after_build(self) -> None:
        """Called once the backbone and head exist (e.g. to load released weights into both)."""

    def write(self, message: str) -> None:
        """A line in MMF's log (when a run has a writer)."""
        writer = registry.get("writer", no_warning=True) if registry is not None else None
        if writer is not None:
            writer.write(message)

    # ------------------------------------------------------------------ forward
    def forward(self, sample_list):
        if self.head_type == "pretraining":
            return self.pretraining_forward(sample_list)
        if self.head_type == "nlvr2":
            return self.paired_forward(sample_list)
        return self.task_forward(sample_list)

    def encode(self, sample_list, side: Optional[str] = None) -> Dict[str, torch.Tensor]:
        """The batch (or its ``side`` image, ``img0`` / ``img1``) through the backbone; must return
        at least ``pooled`` (B, H)."""
        raise NotImplementedError

    def pretraining_forward(self, sample_list):
        raise NotImplementedError

    def task_forward(self, sample_list):
        raise NotImplementedError

    def alignment(self, sample_list) -> Dict:
        """The first sample's text-to-visual alignment, read from the method's own attention: ``weights`` ``(T, K)``
        (text positions x visual units, averaged over heads), ``text_positions`` ``(T,)`` (the rows' positions in
        ``input_ids``), ``visual_valid`` ``(K,)`` bool, ``source`` (the layer and signal in words), ``layer`` (the
        attention module's name); pixel methods add ``grid`` and ``cell``. See
        :mod:`mmf_multilevel.methods.alignment`."""
        raise NotImplementedError(f"the {self.name} model has no alignment(): it does not name the layer where its "
                                  "text attends to its visual units")

    def retrieval_encoders(self):
        """The method's dual-encoder retrieval (a :class:`~mmf_multilevel.methods.dual_encoder.DualEncoder`: the
        uni-modal encoders, their similarity and the matching head its retrieval evaluation ranks with), or None
        when that evaluation scores every (image, text) pair with the matching head (``forward`` on gallery pairs,
        :func:`~mmf_multilevel.metrics.pair_match_scores`)."""
        return None

    def match_logits(self, sample_list) -> torch.Tensor:
        """The matching head's scores of the batch's (image, text) pairs as given: nothing masked, no negative
        drawn. A ``retrieval`` model's ``scores`` (what its retrieval evaluation ranks gallery pairs by); a
        ``pretraining`` model's image-text matching head on the clean pair (:meth:`pretraining_match_logits`).
        Read with :func:`~mmf_multilevel.metrics.pair_match_scores` (``Predictor.match``, retrieval by the
        matching head)."""
        if self.head_type == "retrieval":
            return self.forward(sample_list)["scores"]
        if self.head_type == "pretraining":
            return self.pretraining_match_logits(sample_list)
        raise ValueError(f"a {self.name} model with training_head_type {self.head_type!r} has no image-text matching "
                         "head: match a pair with a 'retrieval' or 'pretraining' model")

    def pretraining_match_logits(self, sample_list) -> torch.Tensor:
        """The pre-training image-text matching head's logits ``(B, 2)`` (column 1 = matched) of the batch's pairs,
        unmasked, through the pass the method's ITM loss reads."""
        raise NotImplementedError(f"{self.name} pre-training has no image-text matching head to score a pair with")

    def paired_forward(self, sample_list):
        """NLVR2: the statement with each image of the pair, the two pooled states to the paired head."""
        pooled = [self.encode(sample_list, side)["pooled"] for side in PAIRED_SIDES]
        return {"scores": self.classifier(*pooled)}

    @staticmethod
    def named_losses(sample_list, losses: Dict[str, torch.Tensor], *parts: str) -> Dict[str, torch.Tensor]:
        """``{name: loss}`` -> ``{"<split>/<dataset>[/<part>...]/<name>": loss}`` (MMF's loss naming)."""
        prefix = "/".join([str(sample_list.dataset_type), str(sample_list.dataset_name), *parts])
        return {f"{prefix}/{name}": value for name, value in losses.items()}

    # ------------------------------------------------------------------ training hooks
    def on_update_start(self, progress: TrainingProgress) -> None:
        """Called by the trainer before the first forward pass of every optimizer update."""
        self.progress = progress

    def synchronize(self, world_size: int) -> None:
        """Called on every rank once per update, after the backward passes, before the optimizer
        step (``world_size`` > 1 only under torch.distributed): all-reduce buffers here."""

    def configure_optimizer(self, config) -> Optional[torch.optim.Optimizer]:
        """The method's own optimizer for the run's ``config``, or None to build MMF's ``optimizer:``."""
        return None

    def log_message(self, progress: TrainingProgress) -> Optional[str]:
        """A line the trainer writes to MMF's log every ``training.log_interval`` updates."""
        return None

    # ------------------------------------------------------------------ checkpoints
    @classmethod
    def format_state_key(cls, key):
        """MMF's hook for loading older checkpoints (used by ``load_state_dict`` and by
        ``pretrained_state_mapping``): keys renamed by :attr:`state_key_map`."""
        mapped = apply_key_map(key, cls.state_key_map)
        return key if mapped is None else mapped

    def load_state_dict(self, state_dict, *args, **kwargs):
        """MMF's ``BaseModel.load_state_dict`` renames keys through :meth:`format_state_key` after a deep
        copy of the whole state dict; this one also drops the obsolete keys (``state_key_map`` entries
        mapped to None, which a rename cannot express) and copies no tensor."""
        upgraded = {}
        for key, value in state_dict.items():
            mapped = apply_key_map(key, self.state_key_map)
            if mapped is not None:
                upgraded[mapped] = value
        self.check_pretrained_state(upgraded)
        return torch.nn.Module.load_state_dict(self, upgraded, *args, **kwargs)

    def check_pretrained_state(self, state: Dict[str, torch.Tensor]) -> None:
        """Called with a checkpoint's state (keys in this model's names) before any of it is loaded, by
        ``load_state_dict`` and by a ``pretrained_state_mapping`` load: raise when the checkpoint was
        written by a differently structured network whose weights would be silently dropped or left at
        their initialisation (SemVLP: a different cross-attention layout)."""

    def prepare_pretrained_state(self, state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """A checkpoint's state (keys in this model's names) as this model reads it in a
        ``pretrained_state_mapping`` load, before any prefix is matched: a model whose layout differs from the
        checkpoint's by rule rewrites it here (SIMLA's NLVR2: the upper BERT layers duplicated)."""
        return state

    def map_pretrained_prefix(self, prefix: str) -> str:
        """A ``pretrained_state_mapping`` prefix written before a rename, in today's names."""
        mapped = apply_key_map(prefix + ".", self.state_key_map)
        return prefix if mapped is None else mapped.rstrip(".")
