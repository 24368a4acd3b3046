"""What every agentlit DataModule shares: loaders that resume exactly (on any number of processes
that keeps the global batch) and evaluate each sample once."""
from __future__ import annotations

from typing import Any

import lightning as L
from torch.utils.data import DataLoader, Dataset

from ..errors import UserError
from .sampling import EvalDistributedSampler, ResumableDistributedSampler

__all__ = ["ResumableDataModule", "ResumeError", "global_batch_error"]


class ResumeError(UserError):
    """A checkpoint that cannot be resumed with this run's batch layout (one line for the user)."""


def _processes(n: int) -> str:
    return f"{n} process" + ("" if n == 1 else "es")


def global_batch_error(per_step: int, saved: str, processes: int) -> str:
    """The one line saying how ``processes`` processes keep ``per_step`` samples per batch step, or
    on which process counts they can be kept when ``processes`` does not divide them.

    Args:
        per_step: samples per batch step of the run, all processes together (batch_size × world size).
        saved: how the checkpoint's global batch was made up, e.g. "2 processes × batch_size 8".
        processes: processes of the resuming job (all nodes).
    """
    head = f"the checkpoint was trained with a global batch of {saved}"
    if per_step % processes == 0:
        return f"{head}; on {_processes(processes)} keep it with --data.batch_size {per_step // processes}"
    # the process counts that can (at most 8, the nearest to the one asked for)
    counts = sorted(sorted((n for n in range(1, per_step + 1) if per_step % n == 0), key=lambda n: abs(n - processes))[:8])
    listed = ", ".join(map(str, counts[:-1])) + f" or {counts[-1]}" if len(counts) > 1 else str(counts[0])
    sizes = ", ".join(str(per_step // n) for n in counts)
    return (f"{head}, which {_processes(processes)} cannot split evenly; resume on {listed} processes "
            f"(--data.batch_size {sizes})")


class ResumableDataModule(L.LightningDataModule):
    """Base DataModule: ``train_loader`` / ``eval_loader`` build the samplers of
    :mod:`agentlit.data.sampling` for the trainer's world size (all nodes; each process samples by its
    global rank), and the checkpoint records how far into the epoch training got and with which global
    batch, so a resumed run continues with the very next batch, on the same or another number of
    processes: ``batch_size`` is per process, and a run resumed on R processes must set it to
    global batch / R (anything else is a :class:`ResumeError` naming the value to use). Evaluating a
    checkpoint (validate / test / predict) takes any batch size.

    Subclasses set ``batch_size`` and ``num_workers`` and call the two helpers from their
    ``*_dataloader`` methods. The training dataset must accept ``(epoch, index)`` keys, e.g.
    :class:`~agentlit.data.sampling.EpochSeededDataset`.
    """

    batch_size: int
    num_workers: int = 0
    pin_memory: bool = False
    seed: int | None = None

    def __init__(self) -> None:
        super().__init__()
        self._resume: tuple[int, int] | None = None  # (epoch, steps already trained in it)

    def _world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 1, 0
        return trainer.world_size, trainer.global_rank

    def train_loader(self, dataset: Dataset, **kwargs: Any) -> DataLoader:
        replicas, rank = self._world()
        sampler = ResumableDistributedSampler(
            dataset, self.batch_size, num_replicas=replicas, rank=rank, shuffle=True, seed=self.seed
        )
        if self._resume is not None:
            epoch, done = self._resume
            sampler.set_epoch(epoch)  # worker processes may draw indices before Lightning sets it
            sampler.resume_from(epoch, done)
            self._resume = None
        return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler, drop_last=True, **self._loader_kwargs(kwargs))

    def eval_loader(self, dataset: Dataset, batch_size: int | None = None, **kwargs: Any) -> DataLoader:
        """The loader of every evaluation stage (validate, test, predict) of every DataModule: in order,
        each sample exactly once across ranks (no padding duplicates, so metrics are exact).

        Args:
            dataset: the evaluation dataset.
            batch_size: samples per batch (None: ``self.batch_size``).
            **kwargs: further ``DataLoader`` arguments (e.g. ``collate_fn``).
        """
        replicas, rank = self._world()
        sampler = EvalDistributedSampler(dataset, replicas, rank) if replicas > 1 else None
        return DataLoader(dataset, batch_size=batch_size or self.batch_size, sampler=sampler, shuffle=False,
                          **self._loader_kwargs(kwargs))

    def _loader_kwargs(self, extra: dict[str, Any]) -> dict[str, Any]:
        return {"num_workers": self.num_workers, "pin_memory": self.pin_memory,
                "persistent_workers": self.num_workers > 0, **extra}

    # Lightning stores these in every checkpoint and restores them before building the loaders.
    def state_dict(self) -> dict[str, Any]:
        trainer = getattr(self, "trainer", None)
        if trainer is None or not trainer.training:
            return {}
        progress = trainer.fit_loop.epoch_loop.batch_progress.current
        return {"epoch": trainer.current_epoch, "batches_done": progress.processed,
                "batch_size": self.batch_size, "world_size": trainer.world_size,
                "accumulate_grad_batches": trainer.accumulate_grad_batches}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "epoch" not in state_dict:
            return
        stage = getattr(getattr(getattr(self, "trainer", None), "state", None), "fn", None)
        if stage is not None and stage != "fit":
            return  # validate / test / predict restore the weights only: any batch size evaluates a checkpoint
        if "world_size" in state_dict:  # written since resuming on another world size is checked
            self._check_global_batch(int(state_dict["batch_size"]), int(state_dict["world_size"]),
                                     int(state_dict["accumulate_grad_batches"]))
        self._resume = (int(state_dict["epoch"]), int(state_dict["batches_done"]))

    def _check_global_batch(self, batch_size: int, world_size: int, accumulate: int) -> None:
        """The resumed run must take the checkpoint's samples per step (its batch counts and the
        sampler's skip are in those units); the per-process split of them may change."""
        trainer = self.trainer
        if (self.batch_size * trainer.world_size, trainer.accumulate_grad_batches) == (batch_size * world_size, accumulate):
            return
        total = batch_size * world_size * accumulate
        saved = f"{total} ({_processes(world_size)} × batch_size {batch_size}" + (
            f" × {accumulate} accumulated)" if accumulate > 1 else ")")
        if trainer.accumulate_grad_batches != accumulate:
            raise ResumeError(f"the checkpoint was trained with a global batch of {saved}; resume with "
                              f"--trainer.accumulate_grad_batches {accumulate} (the per-process batch_size may change)")
        raise ResumeError(global_batch_error(batch_size * world_size, saved, trainer.world_size))
