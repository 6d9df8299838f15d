"""Deterministic, resumable data order for training.

The order of one epoch is a pure function of ``(seed, epoch)``: every rank draws
the same permutation, takes its shard, and a resumed run starts the epoch's
iteration at the batch it had reached, without reading the skipped samples.

* :class:`ResumableSampler` - a DistributedSampler whose epoch can start at an offset.
* :class:`TrainBatchStream` - batches of one or several datasets; with several, the
  dataset of each batch follows a schedule drawn from ``(seed, epoch)`` (size
  proportional by default, as MMF's ``dataset_size_proportional_sampling``).
* :class:`SequentialLoaders` - evaluation over every dataset of a split, in order.
"""
import math
import random

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler, get_worker_info


class ResumableSampler(Sampler):
    """Shards ``range(len(dataset))`` over ranks; deterministic per epoch; resumable."""

    def __init__(self, dataset, shuffle=True, seed=0, rank=0, world_size=1):
        self.length = len(dataset)
        self.shuffle = shuffle
        self.seed = int(seed)
        self.rank = rank
        self.world_size = world_size
        self.num_samples = math.ceil(self.length / world_size) if self.length else 0
        self.epoch = 0
        self.start = 0  # samples of this rank's shard to skip (resume)

    def set_epoch(self, epoch, start=0):
        self.epoch = int(epoch)
        self.start = int(start)

    def shard(self):
        if self.shuffle:
            generator = torch.Generator()
            generator.manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.length, generator=generator).tolist()
        else:
            order = list(range(self.length))
        total = self.num_samples * self.world_size
        if total > len(order) and order:  # pad so every rank has the same number of samples
            order += (order * math.ceil(total / len(order)))[: total - len(order)]
        return order[self.rank : total : self.world_size]

    def __iter__(self):
        return iter(self.shard()[self.start :])

    def __len__(self):
        return max(0, self.num_samples - self.start)


class SeededDataset(torch.utils.data.Dataset):
    """In DataLoader workers, seeds ``random``/``numpy``/``torch`` per sample from
    ``(seed, epoch, index)``, so random masking or augmentation of a sample does not
    depend on which worker loads it - nor on where a resumed run restarted.

    In the main process (``num_workers=0``) the global RNG streams are left alone: they
    are deterministic there and saved in checkpoints. Other attributes are the wrapped
    dataset's (``dataset_name``, ``prepare_batch``, ...).
    """

    def __init__(self, dataset, seed):
        self.dataset = dataset
        self.seed = int(seed)
        self.epoch = 0

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        if get_worker_info() is not None:
            sample_seed = hash((self.seed, self.epoch, int(index))) & 0xFFFFFFFF
            random.seed(sample_seed)
            np.random.seed(sample_seed)
            torch.manual_seed(sample_seed)
        return self.dataset[index]

    def __getattr__(self, name):
        if name in ("dataset", "seed", "epoch") or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.dataset, name)


def make_loader(dataset, batch_size, sampler, num_workers, pin_memory, seed, collate_fn):
    """A DataLoader that draws nothing from the global RNG (worker seeds come from ``seed``)."""
    generator = torch.Generator()
    generator.manual_seed(int(seed))
    return DataLoader(
        SeededDataset(dataset, seed) if num_workers > 0 else dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=pin_memory,
        collate_fn=collate_fn,
        generator=generator,
        persistent_workers=False,
        drop_last=False,
    )


class TrainBatchStream:
    """Training batches of several datasets, resumable at any batch of an epoch.

    ``loaders[i]`` iterates ``samplers[i]``; ``len(loaders[i])`` batches per epoch. The
    schedule of an epoch lists the dataset index of every batch: with proportional
    sampling it is a seeded shuffle of ``[i] * len(loaders[i])`` (every dataset is
    seen once per epoch), otherwise a uniform choice among datasets not yet exhausted.
    """

    def __init__(self, loaders, samplers, seed, proportional=True):
        self.loaders = loaders
        self.samplers = samplers
        self.seed = int(seed)
        self.proportional = proportional

    def batches_per_dataset(self):
        return [math.ceil(len(s.shard()) / loader.batch_size) for s, loader in zip(self.samplers, self.loaders)]

    def schedule(self, epoch):
        counts = self.batches_per_dataset()
        if len(counts) == 1:
            return [0] * counts[0]
        rng = np.random.Generator(np.random.PCG64([self.seed, int(epoch), 7]))
        if self.proportional:
            schedule = np.repeat(np.arange(len(counts)), counts)
            rng.shuffle(schedule)
            return schedule.tolist()
        left, schedule = list(counts), []
        while any(left):
            choices = [i for i, n in enumerate(left) if n > 0]
            i = choices[int(rng.integers(len(choices)))]
            left[i] -= 1
            schedule.append(i)
        return schedule

    def __len__(self):
        return sum(self.batches_per_dataset())

    def epoch(self, epoch, start_batch=0):
        """Yield the batches of ``epoch`` from batch number ``start_batch`` on."""
        schedule = self.schedule(epoch)
        done = [0] * len(self.loaders)
        for i in schedule[:start_batch]:
            done[i] += 1
        iterators = []
        for i, (sampler, loader) in enumerate(zip(self.samplers, self.loaders)):
            sampler.set_epoch(epoch, start=min(done[i] * loader.batch_size, sampler.num_samples))
            iterators.append(None)
        for i in schedule[start_batch:]:
            if iterators[i] is None:
                loader = self.loaders[i]
                if isinstance(loader.dataset, SeededDataset):
                    loader.dataset.epoch = int(epoch)
                # worker base seeds are drawn from the loader's own generator
                loader.generator.manual_seed(hash((self.seed, int(epoch), i)) & 0xFFFFFFFF)
                iterators[i] = iter(loader)
            yield next(iterators[i])


class SequentialLoaders:
    """Iterates the loaders of every dataset of an evaluation split, one after another."""

    def __init__(self, loaders):
        self.loaders = loaders

    def __iter__(self):
        for loader in self.loaders:
            yield from loader

    def __len__(self):
        return sum(len(loader) for loader in self.loaders)
