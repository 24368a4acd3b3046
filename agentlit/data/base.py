"""What every agentlit DataModule shares: loaders that resume exactly and evaluate each sample once."""
from __future__ import annotations

from typing import Any

import lightning as L
from torch.utils.data import DataLoader, Dataset

from .sampling import EvalDistributedSampler, ResumableDistributedSampler

__all__ = ["ResumableDataModule"]


class ResumableDataModule(L.LightningDataModule):
    """Base DataModule: ``train_loader`` / ``eval_loader`` build the samplers of
    :mod:`agentlit.data.sampling` for the trainer's world size, and the checkpoint records how far
    into the epoch training got, so a resumed run continues with the very next batch.

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
        self._resume: tuple[int, int] | None = None  # (epoch, batches already trained in it)

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
        return {"epoch": trainer.current_epoch, "batches_done": progress.processed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "epoch" in state_dict:
            self._resume = (int(state_dict["epoch"]), int(state_dict["batches_done"]))
