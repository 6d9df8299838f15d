"""SIMLA's momentum model, ITC feature queues and distillation-weight ramp (paper §2.2, §2.5).

Framework-free pieces (plain ``torch``; no MMF import) that the pre-training model composes:

* :class:`MomentumCopies` - the momentum ("time-averaged", paper §2.2) copies of named online modules.
  The copies are made by one ``deepcopy`` of all the given modules together (so weights tied between them,
  e.g. the MLM decoder and the word embeddings, stay tied in the copies), start equal to the online
  modules, never require gradients, and are moved towards the online weights by :func:`momentum_update`:
  ``θ_m <- m θ_m + (1 - m) θ`` with m = 0.995 (paper §2.5). The official ``models/simla/pretrain.py``
  (class ``SIMLA``: ``model_pairs``, ``copy_params``, ``_momentum_update``) pairs ``visual_encoder``,
  ``vision_proj``, ``text_encoder`` (BERT with its MLM head), ``text_proj``, ``mim_head`` and
  ``concept_head``; the ITM head and the temperature have no copy. The update runs at the start of the
  no-grad teacher block of every forward, before the momentum passes.
  :func:`momentum_parameter_names` lists the copies' parameter names in a model, so that an optimizer
  builder can leave them out.
* :class:`FeatureQueues` - MoCo-style queues Q^img, Q^txt of M = 65,536 momentum features (paper §2.2,
  Eq. 1; §2.5), buffers ``image_queue``/``text_queue`` ``(embed_dim, M)`` initialised to unit-norm random
  columns, and ``queue_ptr``, as the official ``_dequeue_and_enqueue``. Each step the momentum features of
  the **global** batch (all-gathered over the ranks, :func:`gather_from_all_ranks`) replace the oldest
  columns. The pre-training model keeps no image-id queue; ``track_ids=True`` adds ALBEF's retrieval
  ``idx_queue`` (ids of the queued features, -100 while empty) for fine-tuning.
* :func:`ramped_alpha` - the distillation weight α, ramped linearly 0 -> α over the first epoch (paper
  §2.5; official ``Pretrain.py``: ``alpha * min(1, i / len(data_loader))`` in epoch 0).
"""
import copy
from typing import Iterable, List, Mapping, Optional, Set, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

__all__ = ["MOMENTUM", "QUEUE_SIZE", "ALPHA", "MomentumCopies", "momentum_update", "momentum_parameter_names",
           "gather_from_all_ranks", "FeatureQueues", "ramped_alpha"]

#: paper §2.5: "We set the momentum coefficient to 0.995"
MOMENTUM = 0.995
#: paper §2.5: "an M = 65,536 length memory queue"
QUEUE_SIZE = 65536
#: paper §2.5: α scaled "from 0 -> 0.4 in the first epoch"
ALPHA = 0.4


def _check_momentum(m: float) -> float:
    m = float(m)
    if not 0.0 <= m <= 1.0:
        raise ValueError(f"model_config.simla.momentum: {m} must lie in [0, 1] (the paper's is 0.995)")
    return m


def _parameter_pairs(pairs: Iterable[Tuple[nn.Module, nn.Module]]) -> List[Tuple[nn.Parameter, nn.Parameter]]:
    """(online, momentum) parameter pairs of module pairs of one architecture, each momentum parameter once."""
    out, seen = [], set()
    for online, momentum in pairs:
        ours, theirs = list(online.parameters()), list(momentum.parameters())
        if len(ours) != len(theirs):
            raise ValueError(f"momentum pair of {type(online).__name__}: {len(ours)} online parameters but "
                             f"{len(theirs)} momentum parameters (the copy must have the same architecture)")
        for p, p_m in zip(ours, theirs):
            if p.shape != p_m.shape:
                raise ValueError(f"momentum pair of {type(online).__name__}: parameter shapes {tuple(p.shape)} "
                                 f"and {tuple(p_m.shape)} differ")
            if id(p_m) in seen:  # a weight tied between two paired modules: update it once
                continue
            seen.add(id(p_m))
            out.append((p, p_m))
    return out


@torch.no_grad()
def momentum_update(pairs: Iterable[Tuple[nn.Module, nn.Module]], m: float = MOMENTUM) -> None:
    """The exponential moving average of paper §2.2/§2.5, in place and without gradient:
    ``p_m <- m * p_m + (1 - m) * p`` for every parameter of every ``(online, momentum)`` module pair
    (the official ``_momentum_update``). Buffers are not averaged (the official code averages parameters
    only). A parameter shared by two momentum modules is updated once."""
    m = _check_momentum(m)
    for p, p_m in _parameter_pairs(pairs):
        p_m.mul_(m).add_(p.detach().to(p_m.dtype), alpha=1.0 - m)


class MomentumCopies(nn.Module):
    """Momentum copies of named online modules (paper §2.2: "momentum (time-averaged) versions of the text
    and image encoders").

    ``online``: name -> module (names without dots, e.g. ``{"visual_encoder": vit, "vision_proj": proj}``).
    The copies live in ``self.copies`` (an ``nn.ModuleDict`` under the same names), so they are in the
    owning model's ``state_dict`` (checkpoints carry them) but their parameters have ``requires_grad=False``.
    The online modules are only referenced (a plain list, not registered), so they are not counted twice.
    The copies keep the training mode the owner gives them (the official teacher BERT runs with dropout
    during pre-training, as the online one does).
    """

    def __init__(self, online: Mapping[str, nn.Module], momentum: float = MOMENTUM):
        super().__init__()
        if not online:
            raise ValueError("MomentumCopies needs at least one online module")
        for name in online:
            if not name or "." in name:
                raise ValueError(f"momentum copy name {name!r} must be non-empty and without dots")
        self.momentum = _check_momentum(momentum)
        self.names = tuple(online)
        self._online = [online[name] for name in self.names]  # a plain list: not registered as submodules
        # one deepcopy of all modules together keeps weights tied across them tied in the copies
        copies = copy.deepcopy(dict(online))
        self.copies = nn.ModuleDict({name: copies[name] for name in self.names})
        self.copies.requires_grad_(False)
        self.synchronize()

    def __getitem__(self, name: str) -> nn.Module:
        return self.copies[name]

    def online(self, name: str) -> nn.Module:
        return self._online[self.names.index(name)]

    def pairs(self) -> List[Tuple[nn.Module, nn.Module]]:
        """``(online, momentum)`` module pairs, in the order given."""
        return [(module, self.copies[name]) for name, module in zip(self.names, self._online)]

    @torch.no_grad()
    def synchronize(self) -> None:
        """Copy the online weights into the copies (the official ``copy_params``). Call it again after
        loading pre-trained weights into the online modules, so the copies start equal to them."""
        for p, p_m in _parameter_pairs(self.pairs()):
            p_m.copy_(p.detach())

    def update(self, m: Optional[float] = None) -> None:
        """One EMA step with ``m`` (default: this object's ``momentum``); see :func:`momentum_update`."""
        momentum_update(self.pairs(), self.momentum if m is None else m)

    def forward(self, *args, **kwargs):  # pragma: no cover - a container, not a layer
        raise RuntimeError("MomentumCopies is a container: call the copies (copies[name]) directly")


def momentum_parameter_names(model: nn.Module) -> Set[str]:
    """The names (as ``model.named_parameters()`` gives them) of every parameter held by a
    :class:`MomentumCopies` inside ``model``: the ones an optimizer must leave out."""
    names = set()
    for prefix, module in model.named_modules():
        if isinstance(module, MomentumCopies):
            lead = f"{prefix}." if prefix else ""
            names.update(f"{lead}{name}" for name, _ in module.named_parameters())
    return names


# ---------------------------------------------------------------------- queues
@torch.no_grad()
def gather_from_all_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` from every rank along dim 0 (rank order), without gradient (the official
    ``concat_all_gather``); the tensor itself when ``torch.distributed`` is not initialised or has one rank.
    Every rank must pass a tensor of the same shape."""
    tensor = tensor.detach()
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=0)


class FeatureQueues(nn.Module):
    """The ITC memory queues Q^img and Q^txt (paper §2.2, Eq. 1; M = 65,536, §2.5).

    Buffers (so checkpoints carry them): ``image_queue`` and ``text_queue`` ``(embed_dim, queue_size)``,
    column j one queued feature, initialised to unit-norm Gaussian columns (the official code's
    ``normalize(randn(embed_dim, queue_size), dim=0)``); ``queue_ptr`` ``(1,)`` long, the next column to
    write; with ``track_ids``, ``idx_queue`` ``(1, queue_size)`` long, -100 until written.
    """

    def __init__(self, embed_dim: int = 256, queue_size: int = QUEUE_SIZE, track_ids: bool = False,
                 generator: Optional[torch.Generator] = None):
        super().__init__()
        embed_dim, queue_size = int(embed_dim), int(queue_size)
        if queue_size < 1:
            raise ValueError(f"model_config.simla.queue_size must be positive, got {queue_size}")
        if embed_dim < 1:
            raise ValueError(f"model_config.simla.embed_dim must be positive, got {embed_dim}")
        self.queue_size = queue_size
        self.embed_dim = embed_dim
        self.track_ids = bool(track_ids)
        image = F.normalize(torch.randn(embed_dim, queue_size, generator=generator), dim=0)
        text = F.normalize(torch.randn(embed_dim, queue_size, generator=generator), dim=0)
        self.register_buffer("image_queue", image)
        self.register_buffer("text_queue", text)
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))
        if self.track_ids:
            self.register_buffer("idx_queue", torch.full((1, queue_size), -100, dtype=torch.long))

    @torch.no_grad()
    def enqueue(self, image_feat: torch.Tensor, text_feat: torch.Tensor, ids: Optional[torch.Tensor] = None
                ) -> None:
        """Write the momentum features of the global batch over the oldest columns (the official
        ``_dequeue_and_enqueue``): ``image_feat``/``text_feat`` ``(b, embed_dim)`` of this rank are
        all-gathered to ``(B, embed_dim)`` (B = b x world size, rank order), written to columns
        ``ptr .. ptr + B - 1`` (modulo the queue size), and the pointer advances by B. The queue size must
        be a multiple of B, so a full cycle of equal batches ends exactly at the start again."""
        if image_feat.dim() != 2 or image_feat.shape != text_feat.shape or image_feat.size(1) != self.embed_dim:
            raise ValueError(f"enqueue needs image and text features of one shape (batch, {self.embed_dim}); got "
                             f"{tuple(image_feat.shape)} and {tuple(text_feat.shape)}")
        if self.track_ids and ids is None:
            raise ValueError("this queue tracks image ids (track_ids=True): pass ids")
        images = gather_from_all_ranks(image_feat)
        texts = gather_from_all_ranks(text_feat)
        batch = images.size(0)
        if self.queue_size % batch:
            raise ValueError(f"model_config.simla.queue_size ({self.queue_size}) must be a multiple of the global "
                             f"batch size ({batch} = per-rank batch x world size); the paper's 65,536 suits a "
                             "global batch of 512")
        ptr = int(self.queue_ptr)
        columns = (ptr + torch.arange(batch, device=self.image_queue.device)) % self.queue_size
        self.image_queue[:, columns] = images.t().to(self.image_queue)
        self.text_queue[:, columns] = texts.t().to(self.text_queue)
        if self.track_ids:
            all_ids = gather_from_all_ranks(ids.reshape(-1).to(self.idx_queue.device, torch.long))
            if all_ids.numel() != batch:
                raise ValueError(f"enqueue: {all_ids.numel()} ids for {batch} features")
            self.idx_queue[0, columns] = all_ids
        self.queue_ptr[0] = (ptr + batch) % self.queue_size

    def forward(self, *args, **kwargs):  # pragma: no cover - a container, not a layer
        raise RuntimeError("FeatureQueues is a container: read image_queue/text_queue, call enqueue()")


def ramped_alpha(iteration: int, steps_per_epoch: int, alpha: float = ALPHA, warm_up: bool = True) -> float:
    """The distillation weight α at a 0-based global ``iteration`` (paper §2.5: "linearly scale the
    distillation coefficient α from 0 -> 0.4 in the first epoch").

    The official ``Pretrain.py`` uses ``alpha * min(1, i / len(data_loader))`` for step i of epoch 0 and
    ``alpha`` afterwards; with the global iteration that is ``alpha * min(1, iteration / steps_per_epoch)``
    (0 at the first step, ``alpha`` from the first step of epoch 1 on). ``warm_up=False`` gives ``alpha``
    throughout (the fine-tuning scripts without ``warm_up``)."""
    if int(steps_per_epoch) < 1:
        raise ValueError(f"steps_per_epoch must be positive, got {steps_per_epoch}")
    if int(iteration) < 0:
        raise ValueError(f"iteration must be >= 0, got {iteration}")
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"model_config.simla.alpha: {alpha} must lie in [0, 1] (the paper's is 0.4)")
    if not warm_up:
        return float(alpha)
    return float(alpha) * min(1.0, int(iteration) / int(steps_per_epoch))
