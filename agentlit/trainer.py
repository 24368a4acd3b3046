"""The Trainer behind the ``agentlit`` CLI: Lightning's, plus the extra sub-commands and safe
checkpoint files.

LightningCLI turns every method of its Trainer class listed in ``AgentLitCLI.subcommands()`` into
a sub-command whose options are the method's typed arguments, so ``agentlit profile --help``
lists them next to fit/validate/test/predict.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import lightning as L
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch import Trainer

from .checkpoint import ResolvedCheckpoint, atomic_save, check_checkpoint_file, load_checkpoint
from .profiling import Mode

__all__ = ["AgentTrainer", "SafeCheckpointIO"]


def _local(path: Any) -> bool:
    return "://" not in str(path)


class SafeCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint files, written atomically and read as data only.

    Every save (ModelCheckpoint, ``last.ckpt``, an interrupt, an hpc save) goes to a temporary file
    beside the target that is renamed over it once complete (:func:`~agentlit.checkpoint.atomic_save`):
    a full disk or a crash never leaves a truncated checkpoint or destroys the previous one. Loads go
    through :func:`~agentlit.checkpoint.load_checkpoint`; a checkpoint the CLI already read
    (:meth:`preload`) is handed over instead of being read a second time. Remote paths keep
    Lightning's own (weights-only) handling.
    """

    def __init__(self) -> None:
        super().__init__()
        self._preloaded: ResolvedCheckpoint | None = None

    def preload(self, resolved: ResolvedCheckpoint) -> None:
        """Serve ``resolved``'s loaded data for the next load of its path.

        Args:
            resolved: a checkpoint read by :func:`~agentlit.checkpoint.resolve`.
        """
        self._preloaded = resolved

    def is_preloaded(self, path: Any) -> bool:
        """Whether ``path`` is the checkpoint :meth:`preload` holds (already read as data only).

        Args:
            path: a checkpoint path as Lightning passes it.
        """
        held = self._preloaded
        return (held is not None and held.data is not None and path is not None and _local(path)
                and Path(path).resolve() == held.path.resolve())

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or not _local(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_save(checkpoint, os.fspath(path))

    def load_checkpoint(self, path: Any, map_location: Callable | None = None, weights_only: bool | None = None) -> dict[str, Any]:
        if not _local(path):
            return super().load_checkpoint(path, map_location=map_location, weights_only=True)
        if self.is_preloaded(path):
            return self._preloaded.take_data()  # type: ignore[union-attr, return-value]
        return load_checkpoint(path, "--ckpt_path")


class AgentTrainer(Trainer):
    """``lightning.Trainer`` with ``profile`` (MACs, throughput, memory) and ``export`` (weights for timm),
    and :class:`SafeCheckpointIO` for checkpoint files (unless another CheckpointIO plugin is given)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if type(self.strategy.checkpoint_io) is TorchCheckpointIO:
            self.strategy.checkpoint_io = SafeCheckpointIO()

    def preload_checkpoint(self, resolved: ResolvedCheckpoint) -> None:
        """Restore ``resolved`` (read once by the CLI) without reading its file again.

        Args:
            resolved: the ``--ckpt_path`` checkpoint, as :func:`~agentlit.checkpoint.resolve` read it.
        """
        io = self.strategy.checkpoint_io
        if isinstance(io, SafeCheckpointIO):
            io.preload(resolved)

    def profile(
        self,
        model: L.LightningModule,
        datamodule: L.LightningDataModule | None = None,
        batch_size: int | None = None,
        img_size: int | None = None,
        mode: Mode = "both",
        steps: int | None = None,
        warmup: int | None = None,
        threads: int | None = None,
        output: str | None = None,
    ) -> dict[str, Any]:
        """Profile the configured model: parameters, MACs, throughput and peak memory (writes JSON with --output).

        Args:
            model: the task module built from the config (any module implementing agentlit's task protocol).
            datamodule: the config's data; gives the batch size when not overridden.
            batch_size: items per measured step (default: the datamodule's batch size).
            img_size: input resolution override (square; default: the task's own); the task is rebuilt at that size.
            mode: measure inference, a training step (forward + loss + backward + optimiser step), or both.
            steps: timed steps per measurement, the median is reported (default 5; multi-step tasks such as
                generation: 3 full inferences).
            warmup: untimed steps before timing (default 2; multi-step tasks: 1).
            threads: torch intra-op CPU threads for the measurement (default: torch's); 1 gives steadier
                numbers when other processes share the cores.
            output: write the report as JSON to this path.
        """
        from .profiling import profile_module

        return profile_module(
            self, model, datamodule, batch_size=batch_size, img_size=img_size, mode=mode, steps=steps,
            warmup=warmup, threads=threads, output=output,
        )

    def export(
        self,
        model: L.LightningModule,
        ckpt_path: str,
        datamodule: L.LightningDataModule | None = None,
        output: str = "model.safetensors",
        use_ema: bool = True,
    ) -> str:
        """Write a trained classifier's weights as safetensors that plain timm loads (after ``import agentlit``).

        Args:
            model: the task module built from the config (its weights come from ``ckpt_path``).
            datamodule: the config's data (not needed for exporting).
            ckpt_path: the Lightning checkpoint to export.
            output: the ``.safetensors`` file to write (written atomically; the folder must be writable).
            use_ema: export the EMA weights when the run kept them.
        """
        from .export import export_weights

        io = self.strategy.checkpoint_io  # serves the --ckpt_path the CLI has read, instead of reading it again
        data = io.load_checkpoint(ckpt_path) if isinstance(io, SafeCheckpointIO) and _local(ckpt_path) else None
        return str(export_weights(model, ckpt_path, output, use_ema=use_ema, datamodule=datamodule, checkpoint=data))

    def _run(self, model: L.LightningModule, ckpt_path: Any = None, weights_only: bool | None = None) -> Any:
        # Every --ckpt_path (fit/validate/test/predict, resume) is loaded as data only: a checkpoint
        # holding code is refused in one line before Lightning opens it (agentlit.checkpoint).
        if weights_only is False:
            raise ValueError("agentlit loads checkpoints as data only (weights_only must stay True); "
                             "convert other files to plain state dicts or .safetensors")
        io = self.strategy.checkpoint_io
        preloaded = isinstance(io, SafeCheckpointIO) and io.is_preloaded(ckpt_path)
        if ckpt_path is not None and _local(ckpt_path) and not preloaded:
            check_checkpoint_file(ckpt_path, what="--ckpt_path")
        self._log_data_hparams_if_consistent(model)
        return super()._run(model, ckpt_path=ckpt_path, weights_only=True)

    def _log_data_hparams_if_consistent(self, module: L.LightningModule) -> None:
        """Log the data module's hyper-parameters next to the model's only when no key of both differs:
        Lightning would stop with an error instead (the model leaving ``class_names`` unset while the data
        module reads them from a file, say). Both stay in the run's ``config.yaml`` either way.

        Args:
            module: the task about to run.
        """
        dm = self.datamodule
        if dm is None or not getattr(dm, "_log_hyperparams", False):
            return
        mine, theirs = module.hparams_initial, dm.hparams_initial
        for key in (mine.keys() & theirs.keys()) - {"_class_path"}:
            a, b = mine[key], theirs[key]
            if type(a) is not type(b) or a is not b and not _equal(a, b):
                dm._log_hyperparams = False
                return




def _equal(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except Exception:  # tensors and other values without a plain truth value
        return False
