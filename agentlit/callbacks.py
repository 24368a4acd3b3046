"""Callbacks the CLI adds to every run."""
from __future__ import annotations

import os
import random
import shlex
import signal
import sys
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.callbacks import ModelSummary as _LightningModelSummary
from lightning.pytorch.utilities.model_summary.model_summary import get_formatted_model_size, get_human_readable_count

from .data.sampling import default_seed, mix_seed

__all__ = ["LastModelCheckpoint", "ModelSummary", "SafeInterrupt", "StepSeed", "TrainingInterrupted"]


class LastModelCheckpoint(ModelCheckpoint):
    """``last.ckpt``, the run's latest state: rewritten at every save, and written once more when
    ``fit`` ends with trained steps not yet saved, however it ended (a step or time limit, early
    stopping, or the last epoch coming before the first validation). Always the one file
    ``last.ckpt`` (no ``last-v1.ckpt`` after a resume): the new state replaces it atomically.

    Args:
        dirpath: the folder (None: the run folder's ``checkpoints/``, as for any ModelCheckpoint).
    """

    def __init__(self, dirpath: str | None = None) -> None:
        super().__init__(dirpath=dirpath, monitor=None, save_top_k=1, filename=self.CHECKPOINT_NAME_LAST,
                         enable_version_counter=False)
        self._start_step = 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start_step = trainer.global_step  # a resumed run's steps so far are in its checkpoint already

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        if trainer.global_step > self._start_step and not self._should_skip_saving_checkpoint(trainer):
            self._save_topk_checkpoint(trainer, self._monitor_candidates(trainer))


def _continue_last(trainer: L.Trainer) -> None:
    """After a resume from a ModelCheckpoint's own ``last.ckpt``, make that callback overwrite it
    rather than write ``last-v1.ckpt`` beside it (it only knows the file when the checkpoint it
    resumed from recorded it, which a checkpoint written at an interrupt does not)."""
    if not trainer.ckpt_path or "://" in str(trainer.ckpt_path):
        return
    resumed = Path(trainer.ckpt_path).resolve()
    for cb in trainer.checkpoint_callbacks:
        if not (isinstance(cb, ModelCheckpoint) and cb.save_last and cb.dirpath) or "{" in cb.CHECKPOINT_NAME_LAST:
            continue
        last = os.path.join(cb.dirpath, cb.CHECKPOINT_NAME_LAST + cb.FILE_EXTENSION)
        if Path(last).resolve() == resumed and cb.last_model_path != last:
            cb.last_model_path = last


class StepSeed(Callback):
    """Seeds Python, NumPy and torch (CPU + CUDA) at the start of every training step from
    (seed, global step, rank).

    Dropout, drop path and mixup/cutmix then depend only on the step, not on how many random
    numbers were drawn before it, so a run resumed from a mid-epoch checkpoint draws exactly what
    the uninterrupted run drew, without storing RNG states in the checkpoint.

    Args:
        seed: base seed (default: the run's ``seed_everything`` value).
    """

    def __init__(self, seed: int | None = None) -> None:
        self.seed = seed

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        seed = mix_seed(default_seed() if self.seed is None else self.seed, trainer.global_step, trainer.global_rank)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)  # also seeds every CUDA device


class TrainingInterrupted(Exception):
    """Raised (after the checkpoint is written) to end ``fit`` on SIGINT/SIGTERM."""

    def __init__(self, signame: str, checkpoint: Path, step: int, epoch: int) -> None:
        super().__init__(f"{signame} at global step {step} (epoch {epoch}); saved {checkpoint}")
        self.signame, self.checkpoint, self.step, self.epoch = signame, checkpoint, step, epoch
        self.exit_code = 128 + getattr(signal, signame, signal.SIGINT)


class SafeInterrupt(Callback):
    """Ctrl-C / SIGTERM during ``fit`` finish the current training step, write ``last.ckpt`` in
    the run's checkpoint folder and stop; ``--ckpt_path last`` then continues exactly there, in the
    same run folder. A second Ctrl-C quits at once without saving.

    The checkpoint is written in ``on_train_batch_end``, where Lightning's own step checkpoints
    are written, so resuming from it is as exact as resuming from those. Under DDP the ranks agree
    on the stop (one all-reduce of a flag per step) so all of them save the same step. After a
    resume from a ModelCheckpoint's ``last.ckpt`` it makes that callback keep writing that file.

    Args:
        signals: the signal names to handle.
    """

    def __init__(self, signals: tuple[str, ...] = ("SIGINT", "SIGTERM")) -> None:
        self.signals = tuple(signals)
        self._received: str | None = None
        self._previous: dict[int, Any] = {}

    # Lightning registers its own SIGTERM handler when fit starts; ours goes in afterwards so a
    # SIGTERM does not abort the loop before the checkpoint is written.
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        _continue_last(trainer)  # the resumed run goes on writing the last.ckpt it was resumed from
        self._received = None
        for name in self.signals:
            signum = getattr(signal, name)
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self._received is not None and signum == signal.SIGINT:
            self._restore()
            raise KeyboardInterrupt
        self._received = name
        print(f"\nagentlit: {name} received; saving a checkpoint after the current step "
              "(Ctrl-C again quits without saving)", file=sys.stderr, flush=True)

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            try:
                signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
            except ValueError:
                pass
        self._previous = {}

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        stop = self._received is not None
        if trainer.world_size > 1:
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if not stop:
            return
        path = self.checkpoint_path(trainer)
        trainer.save_checkpoint(path)
        self._restore()
        raise TrainingInterrupted(self._received or "SIGTERM", path, trainer.global_step, trainer.current_epoch)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore()

    @staticmethod
    def checkpoint_path(trainer: L.Trainer) -> Path:
        """``last.ckpt`` in the folder of the run's ``last``-checkpoint callback (else
        ``<run folder>/checkpoints``), the file ``--ckpt_path last`` looks for."""
        for cb in trainer.checkpoint_callbacks:
            if getattr(cb, "dirpath", None) and (getattr(cb, "save_last", False) or cb.monitor is None):
                return Path(cb.dirpath) / "last.ckpt"
        for cb in trainer.checkpoint_callbacks:
            if getattr(cb, "dirpath", None):
                return Path(cb.dirpath) / "last.ckpt"
        return Path(trainer.log_dir or trainer.default_root_dir) / "checkpoints" / "last.ckpt"


def resume_command(argv: list[str]) -> str:
    """``agentlit ARGV`` with ``--ckpt_path last`` in place of any ``--ckpt_path``.

    Args:
        argv: the command-line arguments of the interrupted run.
    """
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--ckpt_path":
            skip = True
            continue
        if a.startswith("--ckpt_path="):
            continue
        out.append(a)
    return "agentlit " + shlex.join(out + ["--ckpt_path", "last"])


class ModelSummary(_LightningModelSummary):
    """Lightning's model summary without the FLOPs column and total unless they were measured
    (they read 0 without an ``example_input_array``); ``agentlit profile`` counts MACs.

    Args:
        max_depth: module depth shown (Lightning's meaning).
    """

    def __init__(self, max_depth: int = 1) -> None:
        super().__init__(max_depth=max_depth)

    @staticmethod
    def summarize(summary_data: list[tuple[str, list[str]]], total_parameters: int, trainable_parameters: int,
                  model_size: float, total_training_modes: dict[str, int], total_flops: int, **kwargs: Any) -> None:
        if not total_flops:
            summary_data = [(name, col) for name, col in summary_data if name != "FLOPs"]
        try:
            from rich import get_console
            from rich.table import Table
        except ImportError:  # pragma: no cover - rich is a dependency
            _LightningModelSummary.summarize(summary_data, total_parameters, trainable_parameters, model_size,
                                             total_training_modes, total_flops, **kwargs)
            return
        table = Table(header_style="bold magenta")
        for name, _ in summary_data:
            table.add_column(name, justify="right" if name in ("Params", "FLOPs", "In sizes", "Out sizes") else "left",
                             style="dim" if name == " " else None, no_wrap=name == "Name")
        for row in zip(*(col for _, col in summary_data)):
            table.add_row(*row)
        console = get_console()
        console.print(table)
        grid = Table.grid(expand=True)
        grid.add_column()
        trainable = get_human_readable_count(int(trainable_parameters))
        frozen = get_human_readable_count(int(total_parameters - trainable_parameters))
        grid.add_row(f"[bold]Trainable params[/]: {trainable}   [bold]Non-trainable params[/]: {frozen}   "
                     f"[bold]Total[/]: {get_human_readable_count(int(total_parameters))}   "
                     f"[bold]Size (MB)[/]: {get_formatted_model_size(model_size)}")
        if total_flops:
            grid.add_row(f"[bold]Total FLOPs[/]: {get_human_readable_count(total_flops)}")
        console.print(grid)
