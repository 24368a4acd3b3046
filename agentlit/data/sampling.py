"""Samplers and dataset wrappers that make training a pure function of (seed, epoch, step).

* :class:`ResumableDistributedSampler` — the permutation of epoch e is ``randperm(seed + e)``
  (DistributedSampler's rule), cut into global batches and dealt out to the ranks by striding, so
  R processes with batch b see, step for step, the samples one process with batch R·b sees (no
  padding, no sample twice in an epoch); after a resume it skips the global batches the
  interrupted epoch already used, on any number of processes that keeps the global batch.
* :class:`EvalDistributedSampler` — strided split *without* padding, so an evaluation over R
  ranks visits every sample exactly once (a padded sampler would count some twice).
* :class:`EpochSeededDataset` — random augmentation seeded by (seed, epoch, index): the same
  sample gets the same augmentation whatever the worker count, batch layout or resume point.
"""
from __future__ import annotations

import os
import random
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler

__all__ = [
    "EpochSeededDataset", "EvalDistributedSampler", "ResumableDistributedSampler", "default_seed", "mix_seed",
    "seeded_generator",
]


def default_seed() -> int:
    """The run's seed: ``seed_everything``'s (exported as PL_GLOBAL_SEED), else 0."""
    return int(os.environ.get("PL_GLOBAL_SEED", 0))


def mix_seed(*parts: int) -> int:
    """A well-spread 63-bit seed from integers (SplitMix64 over the parts)."""
    x = 0x9E3779B97F4A7C15
    for p in parts:
        x = (x ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        x = (x ^ (x >> 31)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
    return x & 0x7FFFFFFFFFFFFFFF


def seeded_generator(*parts: int) -> torch.Generator:
    """A CPU generator whose stream is a pure function of ``parts`` (:func:`mix_seed`), e.g. (run seed,
    global step, micro-batch): what a task draws with it is the same after a resume and on any device.

    Args:
        parts: the integers that identify the draw.
    """
    return torch.Generator().manual_seed(mix_seed(*parts))


class ResumableDistributedSampler(DistributedSampler):
    """Training sampler of every agentlit DataModule (one process or many): yields ``(epoch, index)``
    pairs; data order depends on the global batch only, not on how it is split over processes.

    With G = ``batch_size × num_replicas`` samples per step, epoch e takes the first
    ``(N // G) · G`` entries of its permutation (the last, incomplete global batch is dropped, as
    one process with ``drop_last`` does) and rank r gets, at step t, the positions
    ``t·G + r + R·k`` (k < batch_size): the ``rank::world`` rows of the global batch, which the
    global-batch random draws (diffusion noise) index the same way. ``resume_from(epoch, n)`` skips
    the first n global batches of that epoch, so a run stopped after step n continues with the
    samples not seen yet, none twice, on any number of processes with the same G.

    Args:
        dataset: the training set (indexed with ``(epoch, index)`` pairs).
        batch_size: samples per batch and process.
        num_replicas: processes in the job (the trainer's world size, all nodes).
        rank: this process's global rank (not its rank on the node).
        shuffle: a new permutation every epoch (False: dataset order).
        seed: base of the per-epoch permutation (None: the run's seed).
    """

    def __init__(self, dataset: Dataset, batch_size: int, num_replicas: int = 1, rank: int = 0,
                 shuffle: bool = True, seed: int | None = None) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle,
                         seed=default_seed() if seed is None else seed, drop_last=False)
        if batch_size < 1:
            raise ValueError(f"--data.batch_size should be a positive integer, got {batch_size}")
        self.batch_size = batch_size
        self.global_batch = batch_size * num_replicas
        self.steps_per_epoch = len(dataset) // self.global_batch  # type: ignore[arg-type]
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"the training set has {len(dataset)} samples, fewer than one global batch of {self.global_batch} "  # type: ignore[arg-type]
                f"({num_replicas} process(es) × batch_size {batch_size}); lower --data.batch_size or use fewer processes")
        # what the DataLoader (drop_last) and Lightning plan with: whole steps only
        self.num_samples = self.steps_per_epoch * batch_size
        self.total_size = self.steps_per_epoch * self.global_batch
        self.resume_epoch: int | None = None
        self.skip_batches = 0

    def resume_from(self, epoch: int, batches_done: int) -> None:
        """Skip the first ``batches_done`` global batches of ``epoch`` (once, when it is iterated).

        Args:
            epoch: the interrupted epoch.
            batches_done: steps the interrupted run completed in it (each one global batch).
        """
        self.resume_epoch, self.skip_batches = epoch, batches_done

    def __iter__(self) -> Iterator[tuple[int, int]]:  # type: ignore[override]
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            order = torch.randperm(len(self.dataset), generator=g)[: self.total_size].tolist()  # type: ignore[arg-type]
        else:
            order = list(range(self.total_size))
        skip = self.skip_batches * self.global_batch if self.resume_epoch == self.epoch else 0
        self.resume_epoch = None  # the skip applies once
        return iter([(self.epoch, i) for i in order[skip + self.rank:: self.num_replicas]])

    def __len__(self) -> int:
        # Always the full epoch: Lightning counts the resumed epoch's batches from where it
        # stopped, so the length it plans with must not shrink.
        return self.num_samples


class EvalDistributedSampler(DistributedSampler):
    """Rank r takes indices r, r+R, r+2R, … — no padding, so every sample is evaluated once."""

    def __init__(self, dataset: Dataset, num_replicas: int = 1, rank: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)
        self.num_samples = len(range(rank, len(dataset), num_replicas))  # type: ignore[arg-type]
        self.total_size = len(dataset)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.total_size, self.num_replicas))


class EpochSeededDataset(Dataset):
    """Wraps ``dataset``; ``transform(sample)`` runs with Python, NumPy and torch RNGs seeded from
    (seed, epoch, index), then the global RNG states are put back untouched.

    Indexed by ``(epoch, index)`` pairs (from :class:`ResumableDistributedSampler`) or plain ints
    (epoch 0). For ``(sample, target)`` items the transform gets the sample; any other item (a
    dict holding an image and its mask, say) goes to the transform whole.
    """

    def __init__(self, dataset: Dataset, transform: Callable[[Any], Any] | None, seed: int | None = None) -> None:
        self.dataset, self.transform = dataset, transform
        self.seed = default_seed() if seed is None else seed

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: int | tuple[int, int]) -> Any:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        item = self.dataset[index]
        if self.transform is None:
            return item
        pair = isinstance(item, tuple) and len(item) == 2
        seed = mix_seed(self.seed, epoch, index)
        py_state, np_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            random.seed(seed)
            np.random.seed(seed % 2**32)
            torch.manual_seed(seed)
            out = (self.transform(item[0]), item[1]) if pair else self.transform(item)
        random.setstate(py_state)
        np.random.set_state(np_state)
        return out
