"""The ``agentlit`` command: LightningCLI over every task's LightningModule and DataModule.

    agentlit fit      --config configs/quickstart.yaml
    agentlit test     --config configs/quickstart.yaml --ckpt_path runs/quickstart/version_0/checkpoints/last.ckpt
    agentlit predict  --config configs/generation/quickstart.yaml

Model and data are chosen by class path in the YAML (``model: {class_path: agentlit.tasks.…}``),
so any LightningModule / LightningDataModule works. Defaults added when the config leaves them out:
CSV + TensorBoard loggers sharing one run folder ``<default_root_dir>/version_N``, a checkpoint
callback that monitors the task's own metric and keeps ``last.ckpt``, and a rich progress bar.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint, ProgressBar, RichProgressBar
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from .callbacks import StepSeed
from .utils.paths import ensure_writable_dir

__all__ = ["AgentLitCLI", "main"]

_VERSION_ENV = "AGENTLIT_RUN_VERSION"


def _run_version(root: Path) -> int:
    """Next free ``version_N`` under ``root``; fixed once per job so every logger and every
    spawned DDP worker agrees on the same folder."""
    if _VERSION_ENV in os.environ:
        return int(os.environ[_VERSION_ENV])
    taken = [int(p.name.split("_", 1)[1]) for p in root.glob("version_*") if p.name.split("_", 1)[1].isdigit()]
    version = max(taken, default=-1) + 1
    os.environ[_VERSION_ENV] = str(version)
    return version


class AgentLitCLI(LightningCLI):
    """LightningCLI with agentlit's run-folder, checkpoint and progress-bar defaults and the
    extra sub-commands of :class:`~agentlit.trainer.AgentTrainer`."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {**LightningCLI.subcommands(), "profile": {"model", "datamodule"}, "export": {"model", "datamodule"}}

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Callback]) -> Trainer:
        configured = list(config.get("callbacks") or []) + list(callbacks)
        if self.subcommand in ("profile", "export"):  # not a run: no run folder, no checkpoints
            config.update(logger=False, enable_checkpointing=False, enable_progress_bar=False)
        if config.get("logger") in (None, True):
            root = ensure_writable_dir(config.get("default_root_dir") or "runs", "--trainer.default_root_dir")
            version = _run_version(root)
            config["logger"] = [
                CSVLogger(root, name="", version=version),
                TensorBoardLogger(root, name="", version=version, default_hp_metric=False),
            ]
        if config.get("enable_checkpointing") is not False and not any(isinstance(c, ModelCheckpoint) for c in configured):
            callbacks.extend(default_checkpoints(getattr(self.model, "monitor", None), getattr(self.model, "monitor_mode", "min")))
        if config.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in configured):
            callbacks.append(RichProgressBar(leave=True))
        if self.subcommand == "fit" and not any(isinstance(c, StepSeed) for c in configured):
            callbacks.append(StepSeed())
        if config.get("logger") and self.subcommand == "fit" and not any(isinstance(c, LearningRateMonitor) for c in configured):
            callbacks.append(LearningRateMonitor(logging_interval="step"))
        return super()._instantiate_trainer(config, callbacks)

    def before_fit(self) -> None:
        # `--ckpt_path last` resumes the newest run under default_root_dir. Every invocation logs
        # into a new version folder (nothing earlier is overwritten), so Lightning's own lookup,
        # which searches only the new run's folder, would never find it.
        config = self.config_init[self.subcommand]
        if config.get("ckpt_path") == "last":
            found = latest_last_checkpoint(Path(self.trainer.default_root_dir))
            if found is None:
                from lightning.pytorch.utilities import rank_zero_warn

                rank_zero_warn(f"--ckpt_path last: no last.ckpt under {self.trainer.default_root_dir}; starting fresh")
            config["ckpt_path"] = str(found) if found else None


def default_checkpoints(monitor: str | None, mode: str) -> list[ModelCheckpoint]:
    """The best checkpoint by the task's metric, and ``last.ckpt`` rewritten at every save.

    Two callbacks because a monitored ModelCheckpoint only refreshes its ``last.ckpt`` when the
    metric improved; resuming needs the latest state whatever the metric did.
    """
    best = ModelCheckpoint(
        monitor=monitor, mode=mode, save_top_k=1,
        filename="epoch{epoch:03d}-step{step}" + (f"-{monitor.replace('/', '_')}{{{monitor}:.4f}}" if monitor else ""),
        auto_insert_metric_name=False,
    )
    last = ModelCheckpoint(monitor=None, save_top_k=1, filename=ModelCheckpoint.CHECKPOINT_NAME_LAST)
    return [best, last] if monitor else [last]


def latest_last_checkpoint(root: Path) -> Path | None:
    """The newest ``last*.ckpt`` of any run folder under ``root`` (``<root>/version_N/checkpoints``)."""
    found = [p for p in root.glob("version_*/checkpoints/last*.ckpt") if p.is_file()]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def cli(args: list[str] | None = None, run: bool = True) -> AgentLitCLI:
    """Build (and by default run) the CLI; ``args`` defaults to ``sys.argv[1:]``."""
    import agentlit  # noqa: F401  (registers the agent backbones in timm)

    from .trainer import AgentTrainer

    return AgentLitCLI(
        trainer_class=AgentTrainer,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},  # multi-process runs write config.yaml once per rank
        parser_kwargs={"parser_mode": "omegaconf"} if _has_omegaconf() else None,
        args=args,
        run=run,
    )


def _has_omegaconf() -> bool:
    try:
        import omegaconf  # noqa: F401
    except ImportError:
        return False
    return True


def main(args: list[str] | None = None) -> None:
    """Console entry point. Configuration mistakes end with one clear line, not a traceback
    (set ``AGENTLIT_TRACEBACK=1`` to see the full one)."""
    try:
        cli(args)
    except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError, FileExistsError, KeyError,
            FloatingPointError) as err:
        if os.environ.get("AGENTLIT_TRACEBACK"):
            raise
        msg = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"agentlit: error: {type(err).__name__}: {msg}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
