"""``training.trainer: mmf_multilevel`` - MMF's trainer, made whole.

A registered subclass of rc10's ``BaseTrainer`` (MMF's own extension point). It
keeps MMF's dataset loading, model/optimizer building, metrics, meters, logging,
early stopping, evaluation and checkpoint format, and adds:

* DDP on any device: nccl on CUDA, gloo on CPU; started by ``mmf_run
  distributed.world_size=N`` or ``torchrun`` (one process per device, multi-node);
* mixed precision: ``training.fp16`` (autocast + GradScaler, CUDA) and
  ``training.bf16`` (autocast on CPU or CUDA);
* gradient accumulation (``training.update_frequency``), gradient clipping
  (``training.clip_gradients`` + ``max_grad_l2_norm``) on unscaled gradients;
* ``training.batch_size_per_device``;
* a dataset's own ``collate_fn`` when it has one (raw images of different sizes), else MMF's
  ``BatchCollator``;
* exact resume: ``checkpoint.resume=True`` restores model, optimizer, scheduler,
  scaler, every rank's RNG states and the position in the epoch's data order, then
  continues as if never stopped; atomic checkpoint writes;
* fused Adam/AdamW: the optimizer MMF builds is rebuilt with ``fused=True`` (one kernel per
  parameter tensor instead of a Python loop over them; torch's own default on CPU is the loop)
  unless ``optimizer.params`` names ``fused`` or ``foreach`` itself;
* a tqdm progress bar and TensorBoard scalars (losses, lr, samples/s);
* the method-level training hooks of :class:`~mmf_multilevel.methods.base.MethodModel`, so a method
  owns its optimisation policy without editing this trainer: ``configure_optimizer`` (its own
  optimizer and parameter groups), ``on_update_start`` (the update index and epoch pushed before the
  first forward of every update), ``synchronize`` (every rank, after the backward passes, before the
  step: buffers kept identical across ranks) and ``log_message`` (a line every ``log_interval``).
"""
import contextlib
import inspect
import math
import os
import time
import warnings

import torch
import torch.distributed as dist
from mmf.common.registry import registry
from mmf.common.report import Report
from mmf.common.sample import SampleList
from mmf.trainers.base_trainer import BaseTrainer
from mmf.utils.build import build_scheduler
from mmf.utils.configuration import get_mmf_env
from mmf.utils.distributed import broadcast_scalar, get_rank, get_world_size, is_master
from mmf.utils.early_stopping import EarlyStopping
from mmf.utils.logger import TensorboardLogger
from mmf.utils.timer import Timer
from tqdm import tqdm

from mmf_multilevel.methods.progress import TrainingProgress
from mmf_multilevel.trainers.checkpoint import (
    MultilevelCheckpoint,
    gather_rng_states,
    rng_state,
    set_rng_state,
)
from mmf_multilevel.trainers.data import (
    ResumableSampler,
    SequentialLoaders,
    TrainBatchStream,
    make_loader,
)

_FUSABLE = (torch.optim.Adam, torch.optim.AdamW)


def fused_optimizer(optimizer, config):
    """``optimizer`` rebuilt with ``fused=True`` when it is a plain torch Adam/AdamW whose params in
    ``config.optimizer.params`` say nothing of ``fused``/``foreach`` and whose parameters all sit on
    a device the fused kernel runs on (CPU, CUDA) and are floating point; else ``optimizer`` itself. Only called before
    any step, so there is no state to carry over."""
    params = config.optimizer.get("params", {}) or {}
    if type(optimizer) not in _FUSABLE or "fused" in params or "foreach" in params:
        return optimizer
    tensors = [p for group in optimizer.param_groups for p in group["params"]]
    if not tensors or any(p.device.type not in ("cpu", "cuda") or not p.is_floating_point() for p in tensors):
        return optimizer
    groups = [{k: v for k, v in group.items() if k not in ("fused", "foreach")} for group in optimizer.param_groups]
    accepted = inspect.signature(type(optimizer).__init__).parameters
    defaults = {k: v for k, v in optimizer.defaults.items() if k in accepted and k not in ("fused", "foreach", "params")}
    return type(optimizer)(groups, **{**defaults, "fused": True, "foreach": None})


def _collator(dataset):
    """The dataset's own ``collate_fn`` when it has one (e.g. raw images of different sizes), else
    MMF's ``BatchCollator``."""
    own = getattr(dataset, "collate_fn", None)
    if callable(own):
        return own
    from mmf.common.batch_collator import BatchCollator

    return BatchCollator(dataset.dataset_name, dataset.dataset_type)


@registry.register_trainer("mmf_multilevel")
class MultilevelTrainer(BaseTrainer):
    # ------------------------------------------------------------------ setup
    def _set_device(self):
        self.local_rank = self.config.device_id or 0
        self.distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        requested = str(self.config.training.device or "cuda")
        if "cuda" in requested and torch.cuda.is_available():
            self.device = torch.device("cuda", self.local_rank if self.distributed else torch.cuda.current_device())
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
            if self.distributed:
                # share the cores of one machine between the processes on it
                local_world = int(os.environ.get("LOCAL_WORLD_SIZE", get_world_size()))
                torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local_world)))
        registry.register("global_device", get_rank() if self.distributed else 0)
        registry.register("current_device", self.device)

    def batch_size_per_device(self):
        training = self.config.training
        world = get_world_size()
        if training.get("batch_size_per_device"):
            return int(training.batch_size_per_device)
        if training.batch_size % world != 0:
            raise ValueError(f"training.batch_size={training.batch_size} is not divisible by the world size {world}")
        return training.batch_size // world

    def load_datasets(self):
        super().load_datasets()
        training = self.config.training
        seed = training.seed if training.seed is not None else 0
        batch_size = self.batch_size_per_device()
        rank, world = get_rank(), get_world_size()
        self.datasets_by_split = {}
        loaders = {}
        for split in ("train", "val", "test"):
            multi = getattr(self, f"{split}_dataset")
            datasets = list(multi.datasets)
            self.datasets_by_split[split] = {d.dataset_name: d for d in datasets}
            samplers, split_loaders = [], []
            for index, dataset in enumerate(datasets):
                sampler = ResumableSampler(dataset, shuffle=(split == "train"), seed=seed + index, rank=rank, world_size=world)
                loader = make_loader(
                    dataset,
                    batch_size,
                    sampler,
                    training.num_workers,
                    training.pin_memory,
                    seed + index,
                    _collator(dataset),
                )
                samplers.append(sampler)
                split_loaders.append(loader)
            loaders[split] = (split_loaders, samplers)
        self.train_stream = TrainBatchStream(
            *loaders["train"], seed=seed, proportional=training.get("dataset_size_proportional_sampling", True)
        )
        self.train_loader = self.train_stream
        self.val_loader = SequentialLoaders(loaders["val"][0])
        self.test_loader = SequentialLoaders(loaders["test"][0])

    def parallelize_model(self):
        registry.register("data_parallel", False)
        registry.register("distributed", False)
        if self.distributed:
            registry.register("distributed", True)
            cuda = self.device.type == "cuda"
            self.model = torch.nn.parallel.DistributedDataParallel(
                self.model,
                device_ids=[self.device.index] if cuda else None,
                output_device=self.device.index if cuda else None,
                find_unused_parameters=self.config.training.find_unused_parameters,
            )
        elif self.device.type == "cuda" and torch.cuda.device_count() > 1 and self.config.training.get("data_parallel", False):
            registry.register("data_parallel", True)
            self.model = torch.nn.DataParallel(self.model)

    def load_extras(self):
        self.writer.write("Torch version is: " + torch.__version__)
        self.training_config = training = self.config.training
        own = self._method_hook("configure_optimizer", self.config)
        if own is not None:
            self.optimizer = own
            self.writer.write(f"Optimizer: {type(self.optimizer).__name__} (the model's configure_optimizer)")
        else:
            self.optimizer = fused_optimizer(self.optimizer, self.config)
            self.writer.write(f"Optimizer: {type(self.optimizer).__name__}"
                              f"{' (fused)' if self.optimizer.defaults.get('fused') else ''}")
        self.checkpoint = MultilevelCheckpoint(self)
        from mmf.common.meter import Meter

        self.meter = Meter()
        early = training.early_stop
        # MMF's EarlyStopping decides on the master alone and would restore the best
        # checkpoint there while the other ranks wait in a broadcast; it only tracks the
        # best value here, and _try_full_validation stops every rank together.
        self.early_stop_enabled = bool(early.enabled)
        self.early_stopping = EarlyStopping(
            self.model, self.checkpoint, early.criteria, patience=early.patience, minimize=early.minimize, should_stop=False
        )
        self.log_interval = training.log_interval
        self.evaluation_interval = training.evaluation_interval
        self.checkpoint_interval = training.checkpoint_interval
        self.max_updates = training.max_updates
        self.max_epochs = training.max_epochs
        self.should_clip_gradients = training.clip_gradients
        self.update_frequency = max(1, int(training.get("update_frequency") or 1))
        self.not_debug = training.logger_level != "debug"
        self.current_epoch = 0
        self.current_iteration = 0
        self.num_updates = 0
        self.epoch_batch = 0
        self.rng_stash = None

        self.amp_dtype = None
        if training.get("fp16") and training.get("bf16"):
            raise ValueError("training.fp16 and training.bf16 are exclusive: choose one")
        if training.get("fp16"):
            if self.device.type != "cuda":
                raise ValueError("training.fp16 needs CUDA (float16 autocast + GradScaler); on CPU use training.bf16=True")
            self.amp_dtype = torch.float16
        elif training.get("bf16"):
            self.amp_dtype = torch.bfloat16
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None

        self.lr_scheduler = build_scheduler(self.optimizer, self.config) if training.lr_scheduler is True else None

        self.checkpoint.load_state_dict()
        self._restore_extras(self.checkpoint.last_loaded)

        self.tb_writer = None
        if training.tensorboard and is_master():
            log_dir = get_mmf_env(key="tensorboard_logdir") or self.writer.log_folder
            self.tb_writer = TensorboardLogger(log_dir, self.current_iteration)

    def _restore_extras(self, ckpt):
        """After MMF restored model/optimizer/counts: scheduler, scaler, RNG, data position."""
        ckpt_config = self.config.checkpoint
        if not ckpt or "num_updates" not in ckpt or ckpt_config.reset.all or ckpt_config.reset.counts:
            return
        if ckpt_config.resume_pretrained and len(ckpt_config.pretrained_state_mapping or {}) > 0:
            return
        if self.lr_scheduler is not None and "lr_scheduler" in ckpt and not ckpt_config.reset.optimizer:
            self.lr_scheduler.load_state_dict(ckpt["lr_scheduler"])
        if self.scaler is not None and "fp16_scaler" in ckpt:
            self.scaler.load_state_dict(ckpt["fp16_scaler"])
        position = ckpt.get("train_position")
        if position:
            self.current_epoch = int(position["epoch"])
            self.epoch_batch = int(position["batch"])
        states = ckpt.get("rng_states")
        if states:
            rank = get_rank()
            if len(states) != get_world_size():
                warnings.warn(
                    f"checkpoint holds RNG states of {len(states)} processes, this run has {get_world_size()}: "
                    "random streams will not continue exactly"
                )
            set_rng_state(states[rank % len(states)])
        self.writer.write(
            f"Resuming at update {self.num_updates}, epoch {self.current_epoch}, batch {self.epoch_batch} of the epoch"
        )

    # --------------------------------------------------------------- method hooks
    def _method_hook(self, name, *args):
        """Call the model's training hook ``name`` when it has one (models on the methods' adapter
        base; MMF's own models have none); the model is unwrapped from DDP / DataParallel."""
        model = self.model.module if hasattr(self.model, "module") else self.model
        hook = getattr(model, name, None)
        return hook(*args) if callable(hook) else None

    def _progress(self):
        return TrainingProgress(update=int(self.num_updates), epoch=int(self.current_epoch))

    # --------------------------------------------------------------- training
    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def _forward_pass(self, batch):
        sample_list = SampleList(batch)
        dataset = self.datasets_by_split[sample_list.dataset_type][sample_list.dataset_name]
        prepared = dataset.prepare_batch(sample_list)
        self.profile("Batch prepare time")
        with self._autocast():
            model_output = self.model(prepared)
        report = Report(prepared, model_output)
        self.profile("Forward time")
        return report

    def _step(self):
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.should_clip_gradients:
            from mmf.utils.general import clip_gradients

            clip_gradients(self.model, self.num_updates, self.tb_writer, self.config)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()
        self.num_updates += 1

    def train(self):
        try:
            self._train()
        finally:
            self.close_tensorboard()

    def close_tensorboard(self):
        """Flush and close the tensorboard writer while the interpreter is alive. Left to MMF's
        ``TensorboardLogger.__del__`` at exit, the close waits on a queue whose writer thread (a daemon)
        has already been stopped, and the process never exits."""
        logger = getattr(self, "tb_writer", None)
        if logger is not None and logger.summary_writer is not None:
            logger.summary_writer.close()
            logger.summary_writer = None

    def _train(self):
        self.writer.write("===== Model =====")
        self.writer.write(self.model)
        from mmf.utils.general import print_model_parameters

        print_model_parameters(self.model)
        if "train" not in self.run_type:
            self.inference()
            return

        if self.max_epochs is not None:
            self.max_updates = math.inf
        else:
            self.max_epochs = math.inf
        torch.autograd.set_detect_anomaly(bool(self.training_config.get("detect_anomaly", False)))
        self.model.train()
        self.train_timer = Timer()
        self.snapshot_timer = Timer()
        self.profile("Setup Time")
        self.writer.write("Starting training...")

        progress = tqdm(
            total=None if math.isinf(self.max_updates) else self.max_updates,
            initial=self.num_updates,
            unit="upd",
            dynamic_ncols=True,
            disable=not (is_master() and self.training_config.get("progress_bar", True)),
        )
        self._samples_since_log = 0
        self._log_clock = time.perf_counter()
        should_break = False
        micro = 0
        self.optimizer.zero_grad(set_to_none=True)
        while self.num_updates < self.max_updates and not should_break:
            if self.epoch_batch == 0:
                self.current_epoch += 1
            if self.current_epoch > self.max_epochs:
                break
            registry.register("current_epoch", self.current_epoch)
            for batch in self.train_stream.epoch(self.current_epoch, self.epoch_batch):
                self.profile("Batch load time")
                self.current_iteration += 1
                self.epoch_batch += 1
                if micro == 0:
                    self._method_hook("on_update_start", self._progress())
                micro += 1
                last_micro = micro == self.update_frequency
                sync = contextlib.nullcontext()
                if self.distributed and not last_micro:
                    sync = self.model.no_sync()
                with sync:
                    report = self._forward_pass(batch)
                    loss = self._extract_loss(report) / self.update_frequency
                    if self.scaler is not None:
                        self.scaler.scale(loss).backward()
                    else:
                        loss.backward()
                self._samples_since_log += report.batch_size
                if not last_micro:
                    continue
                micro = 0
                self._method_hook("synchronize", get_world_size() if self.distributed else 1)
                self._step()
                self.profile("Backward time")
                progress.update(1)
                should_break = self._logistics(report)
                if self.num_updates >= self.max_updates:
                    should_break = True
                if should_break:
                    break
            else:
                self.epoch_batch = 0
        progress.close()
        self.finalize()

    def _collect_rng_states(self):
        """Called by every rank where a checkpoint may be written."""
        self.rng_stash = (self.num_updates, gather_rng_states())

    def _try_snapshot(self):
        if self.num_updates % self.checkpoint_interval == 0:
            self._collect_rng_states()
        super()._try_snapshot()

    def _try_full_validation(self, force=False):
        if not (force or self.num_updates % self.evaluation_interval == 0):
            return False
        self._collect_rng_states()
        should_break = super()._try_full_validation(force=force)
        activated = bool(broadcast_scalar(int(self.early_stopping.is_activated()), src=0, device=self.device))
        if activated and self.early_stop_enabled:
            self.writer.write("Early stopping activated")
            should_break = True
        return should_break

    def evaluate(self, loader, use_tqdm=False, single_batch=False):
        """MMF's evaluation, leaving the training RNG streams exactly as they were."""
        saved = rng_state()
        try:
            return super().evaluate(loader, use_tqdm=use_tqdm, single_batch=single_batch)
        finally:
            set_rng_state(saved)

    def _logistics(self, report):
        if self.num_updates % self.log_interval == 0:
            message = self._method_hook("log_message", self._progress())
            if message:
                self.writer.write(message)
            elapsed = max(1e-9, time.perf_counter() - self._log_clock)
            samples_per_s = self._samples_since_log * get_world_size() / elapsed
            lr = self.optimizer.param_groups[0]["lr"]
            if self.tb_writer is not None:
                self.tb_writer.add_scalars({"train/lr": lr, "train/samples_per_s": samples_per_s}, self.num_updates)
            self._samples_since_log = 0
            self._log_clock = time.perf_counter()
        return super()._logistics(report)

    def _summarize_report(self, meter, should_print=True, extra=None):
        extra = dict(extra or {})
        extra.pop("max_updates", None)
        if "lr" not in extra and hasattr(self, "optimizer"):
            extra["lr"] = f"{self.optimizer.param_groups[0]['lr']:.3g}"
        if self.tb_writer is not None and should_print:
            self.tb_writer.add_scalars(meter.get_scalar_dict(), self.num_updates)
        if not is_master() or not should_print:
            return
        log_dict = {"progress": f"{self.num_updates}/{self.max_updates}"}
        log_dict.update(meter.get_log_dict())
        log_dict.update(extra)
        self.writer.log_progress(log_dict)
