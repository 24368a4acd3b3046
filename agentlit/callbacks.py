"""Callbacks the CLI adds to every run."""
from __future__ import annotations

import random

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

from .data.sampling import default_seed, mix_seed

__all__ = ["StepSeed"]


class StepSeed(Callback):
    """Seeds Python, NumPy and torch (CPU + CUDA) at the start of every training step from
    (seed, global step, rank).

    Dropout, drop path and mixup/cutmix then depend only on the step, not on how many random
    numbers were drawn before it, so a run resumed from a mid-epoch checkpoint draws exactly what
    the uninterrupted run drew, without storing RNG states in the checkpoint.
    """

    def __init__(self, seed: int | None = None) -> None:
        self.seed = seed

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        seed = mix_seed(default_seed() if self.seed is None else self.seed, trainer.global_step, trainer.global_rank)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)  # also seeds every CUDA device
