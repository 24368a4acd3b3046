"""The Trainer behind the ``agentlit`` CLI: Lightning's, plus the extra sub-commands.

LightningCLI turns every method of its Trainer class listed in ``AgentLitCLI.subcommands()`` into
a sub-command whose options are the method's typed arguments, so ``agentlit profile --help``
lists them next to fit/validate/test/predict.
"""
from __future__ import annotations

from typing import Any, Literal

import lightning as L
from lightning.pytorch import Trainer

__all__ = ["AgentTrainer"]


class AgentTrainer(Trainer):
    """``lightning.Trainer`` with ``profile`` (MACs, throughput, memory) and ``export`` (weights for timm)."""

    def profile(
        self,
        model: L.LightningModule,
        datamodule: L.LightningDataModule | None = None,
        batch_size: int | None = None,
        img_size: int | None = None,
        mode: Literal["inference", "train", "both"] = "both",
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

        return str(export_weights(model, ckpt_path, output, use_ema=use_ema, datamodule=datamodule))

    def _run(self, model: L.LightningModule, ckpt_path: Any = None, weights_only: bool | None = None) -> Any:
        # Every --ckpt_path (fit/validate/test/predict, resume) is loaded as data only: a checkpoint
        # holding code is refused in one line before Lightning opens it (agentlit.checkpoint).
        if weights_only is False:
            raise ValueError("agentlit loads checkpoints as data only (weights_only must stay True); "
                             "convert other files to plain state dicts or .safetensors")
        if ckpt_path is not None and "://" not in str(ckpt_path):
            from .checkpoint import check_checkpoint_file

            check_checkpoint_file(ckpt_path, what="--ckpt_path")
        return super()._run(model, ckpt_path=ckpt_path, weights_only=True)


