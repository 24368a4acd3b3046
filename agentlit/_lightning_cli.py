"""The LightningCLI behind ``agentlit`` (imported only when a sub-command runs; ``agentlit --help``
never loads Lightning). See :mod:`agentlit.cli` for the entry point and error handling."""
from __future__ import annotations

import argparse
import csv
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any

from jsonargparse import set_parsing_settings
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint, ProgressBar, RichProgressBar
from lightning.pytorch.callbacks import ModelSummary as _LightningModelSummary
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from . import runs
from .callbacks import LastModelCheckpoint, ModelSummary, SafeInterrupt, StepSeed
from .checkpoint import NoCheckpointError, ResolvedCheckpoint, resolve
from .errors import ConfigError, explain_parse_error
from .runs import CREATED_RUN_DIRS  # noqa: F401  (re-exported: the tests reset it between in-process runs)
from .stored_settings import check_plain_settings, check_stored, merge_stored, setting_names
from .utils.paths import ensure_writable_dir

__all__ = ["AgentLitCLI", "ConfigError", "build_cli", "default_checkpoints", "latest_last_checkpoint"]

#: ``--ckpt_path none``: run validate/test/predict with the weights the config builds
UNTRAINED = "none"



# ---------------------------------------------------------------------------------------- output
def quiet_library_noise() -> None:
    """Drop what our own use of Lightning/torch prints but a user cannot act on, and send
    Lightning's info lines to stdout so stderr carries only warnings and errors."""
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated")
    warnings.filterwarnings("ignore", message=r".*LeafSpec.*is deprecated")
    warnings.filterwarnings("ignore", message=r"Precision .* is not supported by the model summary")
    # pin_memory is the data modules' default for GPUs; on a CPU-only machine it is simply unused
    warnings.filterwarnings("ignore", message=r"'pin_memory' argument is set as true but no accelerator is found")
    # parse_arguments always hands LightningCLI an explicit list (it strips --print_config)
    warnings.filterwarnings("ignore", message=r"LightningCLI's args parameter is intended to run from within Python")
    warnings.filterwarnings("ignore", message=r"The '\w+_dataloader' does not have many workers")
    warnings.filterwarnings("ignore", message=r"The number of training batches \(\d+\) is smaller than the logging interval")

    class _DropAdverts(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return "litlogger" not in str(record.msg)

    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_DropAdverts())
    for name in ("lightning.pytorch", "lightning.fabric"):
        for handler in logging.getLogger(name).handlers:
            if isinstance(handler, logging.StreamHandler) and getattr(handler, "stream", None) is sys.__stderr__:
                handler.setStream(sys.stdout)


# ------------------------------------------------------------------------------------ run folders
def latest_last_checkpoint(root: Path) -> Path | None:
    """The newest ``last*.ckpt`` of any run folder under ``root`` (``<root>/version_N/checkpoints``);
    ``--ckpt_path last`` itself takes the newest *readable* checkpoint (:func:`agentlit.checkpoint.resolve`)."""
    return next((p for p in runs.checkpoints_newest_first(root) if p.name.startswith("last")), None)


def _rows_before(metrics_csv: Path, step: int) -> tuple[list[str], list[dict[str, str]]]:
    """The header and rows of ``metrics_csv`` logged before ``step``: what a resumed run carries
    over (the interrupted run's rows after its checkpoint are logged again)."""
    if not metrics_csv.is_file():
        return [], []
    with open(metrics_csv, newline="") as f:
        reader = csv.DictReader(f)
        rows = [r for r in reader if not (r.get("step") or "").isdigit() or int(r["step"]) < step]
        return list(reader.fieldnames or []), rows


def _carry_over(logger: CSVLogger, fields: list[str], rows: list[dict[str, str]]) -> None:
    """Put the earlier rows back in front of a resumed run's metrics.csv (Lightning's CSV writer
    deletes an existing file when it opens the folder)."""
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    if rows and rank_zero_only.rank == 0:
        experiment = logger.experiment
        experiment.metrics_keys = list(fields)
        experiment.metrics = list(rows)
        experiment.save()


# -------------------------------------------------------------------------------------- defaults
def default_checkpoints(monitor: str | None, mode: str) -> list[ModelCheckpoint]:
    """The best checkpoint by the task's metric, and ``last.ckpt`` rewritten at every save and at the
    end of ``fit`` (:class:`~agentlit.callbacks.LastModelCheckpoint`).

    Two callbacks because a monitored ModelCheckpoint only refreshes its ``last.ckpt`` when the
    metric improved; resuming needs the latest state whatever the metric did.

    Args:
        monitor: the metric to rank checkpoints by (None: only ``last.ckpt``).
        mode: "max" or "min", the direction in which ``monitor`` improves.
    """
    return [cls(**kwargs) for cls, kwargs in _checkpoint_specs(monitor, mode)]


def _checkpoint_specs(monitor: str | None, mode: str) -> list[tuple[type, dict[str, Any]]]:
    last = (LastModelCheckpoint, {})
    if not monitor:
        return [last]
    best = (ModelCheckpoint, dict(
        monitor=monitor, mode=mode, save_top_k=1, auto_insert_metric_name=False,
        filename="epoch{epoch:03d}-step{step}" + f"-{monitor.replace('/', '_')}{{{monitor}:.4f}}",
    ))
    return [best, last]


def _class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


# ------------------------------------------------------------------------------------------- CLI
class AgentLitCLI(LightningCLI):
    """LightningCLI with agentlit's run-folder, checkpoint and progress-bar defaults, safe
    interrupts, one-line configuration errors and the extra sub-commands of
    :class:`~agentlit.trainer.AgentTrainer`."""

    argv: list[str] = []
    resume_version: int | None = None  # the run folder a resumed fit continues in
    untrained_ok = False  # --ckpt_path none
    resolved: ResolvedCheckpoint | None = None  # --ckpt_path, read once

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {**LightningCLI.subcommands(), "profile": {"model", "datamodule"}, "export": {"model", "datamodule"}}

    # -------------------------------------------------------------------------------- parsing
    def parse_arguments(self, parser, args) -> None:  # noqa: ANN001
        args = list(sys.argv[1:] if args is None else args)
        self.argv = list(args)
        print_config = next((a for a in args if a == "--print_config" or a.startswith("--print_config=")), None)
        if print_config:
            args.remove(print_config)
        self._args = args
        try:
            super().parse_arguments(parser, args)
        except argparse.ArgumentError as err:
            raise ConfigError(_explain(str(err), parser, args)) from err
        sub = self.config.get("subcommand")
        if sub:
            self._resolve_ckpt_path(sub)
        if print_config:
            self._print_effective_config(sub, print_config)
            sys.exit(0)

    def _resolve_ckpt_path(self, sub: str) -> None:
        """``--ckpt_path``, resolved and read once (:func:`agentlit.checkpoint.resolve`): ``last`` → the
        newest readable checkpoint of the runs folder; ``none`` → no checkpoint (opt-in to evaluate
        configured weights); a named file must be a readable Lightning checkpoint."""
        cfg = self.config[sub]
        ckpt = cfg.get("ckpt_path")
        if ckpt is None:
            return
        root = Path(cfg.trainer.get("default_root_dir") or "runs")
        if ckpt == UNTRAINED and sub in ("validate", "test", "predict"):
            cfg.ckpt_path, self.untrained_ok = None, True
            return
        if ckpt in ("best", "hpc", "registry") or ckpt.startswith("registry:"):
            return  # Lightning's own meanings
        try:
            self.resolved = resolve(ckpt, root)
        except NoCheckpointError:
            if sub != "fit":
                raise
            warnings.warn(f"--ckpt_path last: no checkpoint under {root}; starting fresh", stacklevel=1)
            cfg.ckpt_path = None
            return
        cfg.ckpt_path = str(self.resolved.path)
        if sub == "fit" and self.resolved.run_dir is not None:  # a resumed run continues in its own folder
            self.resume_version = int(self.resolved.run_dir.name[8:])

    def _parse_ckpt_path(self) -> None:
        """The checkpoint's stored settings, checked before anything is parsed from them
        (:mod:`agentlit.stored_settings`): they fill in only what the user left unset."""
        sub = self.config.get("subcommand")
        if not sub or self.resolved is None:
            return
        model = self.config[sub].get("model")
        wanted = getattr(model, "class_path", None)
        cls, stored = check_stored(self.resolved.settings, self.resolved.path, wanted)
        cls = cls or _import_class(wanted)
        if cls is None or not stored:
            return
        given = self.parser.parse_args(self._args, defaults=False)[sub].get("model")
        given_args = getattr(given, "init_args", None) if given is not None else None
        fill = merge_stored(stored, cls, given_args.as_dict() if given_args is not None else {}, self.resolved.path)
        if not fill:
            return
        try:
            self.config = self.parser.parse_object({sub: {"model": {"class_path": wanted, "init_args": fill}}}, self.config)
        except (argparse.ArgumentError, SystemExit) as err:
            raise ConfigError(
                f"checkpoint {self.resolved.path} does not fit {wanted}: {_explain(str(err), self.parser, [])}"
                "; use a checkpoint written by `agentlit fit` with this config") from err

    def before_instantiate_classes(self) -> None:
        """Mapping-typed settings (``model_kwargs`` …) hold plain values: a ``class_path`` inside one,
        from a config file or the command line, is refused before anything is built."""
        sub = self.config.get("subcommand")
        cfg = self.config[sub] if sub else self.config
        for group in ("model", "data"):
            check_plain_settings(cfg.get(group), f"--{group}")

    def _print_effective_config(self, sub: str | None, flag: str) -> None:
        """``--print_config``: the resolved config with the loggers and callbacks agentlit adds
        written out, i.e. what will actually run."""
        parser = self._parser(sub)
        cfg = self.config[sub].clone() if sub else self.config.clone()
        if sub:
            model_cls = _import_class(getattr(cfg.get("model"), "class_path", None))
            extra_loggers, extra_callbacks = self.default_specs(sub, cfg.trainer, model_cls, configured=_as_list(cfg.trainer.get("callbacks")))
            if extra_loggers:
                cfg.trainer.logger = [_spec_dict(c, k) for c, k in extra_loggers]
            cfg.trainer.callbacks = _as_list(cfg.trainer.get("callbacks")) + [_spec_dict(c, k) for c, k in extra_callbacks]
        skip_none = "skip_null" in flag
        print(parser.dump(cfg, skip_none=skip_none, skip_check=True), end="")

    # ------------------------------------------------------------------------------- defaults
    def default_specs(self, sub: str, trainer_cfg: Any, model_cls: type | None,
                      configured: list[Any]) -> tuple[list[tuple[type, dict]], list[tuple[type, dict]]]:
        """The loggers and callbacks agentlit adds for ``sub`` when the config leaves them out, as
        (class, init kwargs) pairs: one source for the trainer and for ``--print_config``."""
        sub = sub or "fit"  # cli(run=False): the caller decides, give it what fit gets
        get = trainer_cfg.get if hasattr(trainer_cfg, "get") else lambda k, d=None: getattr(trainer_cfg, k, d)
        loggers: list[tuple[type, dict]] = []
        callbacks: list[tuple[type, dict]] = []
        run = sub not in ("profile", "export")  # profile/export are not runs: no folder, no checkpoints

        def has(kind: type, name: str) -> bool:
            return any(isinstance(c, kind) or (_class_name(c) or "").endswith(name) for c in configured)

        if run and get("logger") in (None, True):
            root = Path(get("default_root_dir") or "runs")
            evaluated = self.evaluated_run(sub)
            if evaluated is not None:
                root, version = evaluated, runs.next_evaluation_folder(evaluated, sub)
            else:
                version = self.resume_version if getattr(self, "resume_version", None) is not None else _peek_version(root)
            loggers = [
                (CSVLogger, dict(save_dir=str(root), name="", version=version, flush_logs_every_n_steps=1)),
                (TensorBoardLogger, dict(save_dir=str(root), name="", version=version, default_hp_metric=False)),
            ]
        if sub == "fit" and get("enable_checkpointing") is not False and not has(ModelCheckpoint, "ModelCheckpoint"):
            callbacks += _checkpoint_specs(getattr(model_cls, "monitor", None), getattr(model_cls, "monitor_mode", "min"))
        if run and get("enable_progress_bar") is not False and not has(ProgressBar, "ProgressBar"):
            callbacks.append((RichProgressBar, dict(leave=True)))
        if sub == "fit" and get("enable_model_summary") is not False and not has(_LightningModelSummary, "ModelSummary"):
            callbacks.append((ModelSummary, {}))
        if sub == "fit" and not has(StepSeed, "StepSeed"):
            callbacks.append((StepSeed, {}))
        if sub == "fit" and not has(SafeInterrupt, "SafeInterrupt"):
            callbacks.append((SafeInterrupt, {}))
        if sub == "fit" and (loggers or get("logger")) and not has(LearningRateMonitor, "LearningRateMonitor"):
            callbacks.append((LearningRateMonitor, dict(logging_interval="step")))
        return loggers, callbacks

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Callback]) -> Trainer:
        sub = self.subcommand or "fit"
        configured = list(config.get("callbacks") or []) + list(callbacks)
        if sub in ("profile", "export"):
            config.update(logger=False, enable_checkpointing=False, enable_progress_bar=False)
        if sub != "fit" and not any(isinstance(c, ModelCheckpoint) for c in configured):
            config["enable_checkpointing"] = False  # nothing to save; no "dirpath has changed" warnings
            # evaluation restores weights only; the training callbacks' states do not matter here
            warnings.filterwarnings("ignore", message=r"Be aware that when using `ckpt_path`, callbacks used to create")
        loggers, extra = self.default_specs(sub, config, type(self.model), configured)
        evaluated = self.evaluated_run(sub) if loggers else None
        if evaluated is not None:  # validate / test / predict of a run's checkpoint: into that run's folder
            folder = runs.evaluation_folder(evaluated, sub, rank_zero_only.rank)
            config["logger"] = [CSVLogger(evaluated, name="", version=folder, flush_logs_every_n_steps=1),
                                TensorBoardLogger(evaluated, name="", version=folder, default_hp_metric=False)]
        elif loggers:
            root = ensure_writable_dir(config.get("default_root_dir") or "runs", "--trainer.default_root_dir")
            if self.resume_version is not None:
                version = self.resume_version
                os.environ[runs.VERSION_ENV] = str(version)  # the other ranks' processes inherit it
            else:
                version = runs.run_version(root, rank_zero_only.rank)  # rank 0 claims a new folder atomically
            run_dir = root / f"version_{version}"
            resumed_step = None
            if self.resume_version is not None and self.resolved is not None:
                resumed_step = self.resolved.global_step
                carried = _rows_before(run_dir / "metrics.csv", resumed_step)
                warnings.filterwarnings("ignore", message=r"Experiment logs directory .* exists and is not empty")
                warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
            config["logger"] = [
                # written at every logging step: a killed run keeps its curves up to its last step
                CSVLogger(root, name="", version=version, flush_logs_every_n_steps=1),
                TensorBoardLogger(root, name="", version=version, default_hp_metric=False,
                                  **({"purge_step": resumed_step} if resumed_step else {})),
            ]
            if resumed_step is not None:
                _carry_over(config["logger"][0], *carried)
        if any(cls is ModelSummary for cls, _ in extra):
            config["enable_model_summary"] = False  # ours replaces Lightning's default (no "already configured" note)
        callbacks.extend(cls(**kwargs) for cls, kwargs in extra)
        trainer = super()._instantiate_trainer(config, callbacks)
        if self.resolved is not None and hasattr(trainer, "preload_checkpoint"):
            trainer.preload_checkpoint(self.resolved)  # Lightning's restore takes what resolve() read
        return trainer

    def evaluated_run(self, sub: str) -> Path | None:
        """The run folder whose checkpoint ``validate`` / ``test`` / ``predict`` evaluate (their metrics
        and outputs go under it), when ``--ckpt_path`` lies in a writable ``…/version_N/checkpoints/``;
        else None (a new ``<default_root_dir>/version_N``, as for ``fit``)."""
        if sub not in ("validate", "test", "predict") or getattr(self, "resolved", None) is None:
            return None
        run = runs.run_folder_of(self.resolved.path)
        return run if run is not None and os.access(run, os.W_OK) else None

    # ---------------------------------------------------------------------------- sub-commands
    def _require_weights(self) -> None:
        """validate/test/predict evaluate trained weights: a checkpoint, or a config that loads
        pretrained/checkpoint weights; anything else needs the explicit ``--ckpt_path none``."""
        if getattr(self, "untrained_ok", False) or self.config[self.subcommand].get("ckpt_path"):
            return
        if has_configured_weights(self.model):
            return
        raise ConfigError(
            f"`agentlit {self.subcommand}` needs trained weights: pass --ckpt_path <file.ckpt> (or 'last' for the "
            f"newest run under {self.trainer.default_root_dir}), or --ckpt_path none to run the untrained model")

    before_validate = before_test = before_predict = _require_weights

    def after_fit(self) -> None:
        if self.trainer.is_global_zero:
            print_fit_summary(self.trainer)

    def _after_evaluation(self) -> None:
        """Where ``validate`` / ``test`` wrote their metrics (the evaluated run's ``test/`` folder)."""
        logger = self.trainer.loggers[0] if self.trainer.loggers else None
        folder = Path(logger.log_dir) if logger is not None and getattr(logger, "log_dir", None) else None
        if self.trainer.is_global_zero and folder is not None and (folder / "metrics.csv").is_file():
            print(f"agentlit: metrics written to {folder / 'metrics.csv'}")

    after_validate = after_test = _after_evaluation


def _peek_version(root: Path) -> int:
    """The run version this job would use (what ``--print_config`` shows); nothing is created."""
    inherited = os.environ.get(runs.VERSION_ENV, "")
    return int(inherited) if inherited.isdigit() else runs.next_version(root)


def _as_list(value: Any) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _class_name(obj: Any) -> str | None:
    if isinstance(obj, dict) or hasattr(obj, "class_path"):
        return obj.get("class_path") if isinstance(obj, dict) else obj.class_path
    return type(obj).__name__


def _spec_dict(cls: type, kwargs: dict) -> dict:
    return {"class_path": _class_path(cls), "init_args": dict(kwargs)}


def _import_class(path: str | None) -> type | None:
    if not path or "." not in path:
        return None
    import importlib

    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None


def has_configured_weights(model: Any) -> bool:
    """True when ``model``'s config loads weights (a truthy ``*pretrained*`` / ``*checkpoint*``
    hyper-parameter) or the module cannot be trained at all (no ``training_step``: its weights
    come with its config, e.g. a pretrained pipeline)."""
    from lightning.pytorch.utilities.model_helpers import is_overridden

    if isinstance(model, LightningModule) and not is_overridden("training_step", model):
        return True
    hparams = dict(getattr(model, "hparams", {}) or {})
    return any(v for k, v in hparams.items() if "pretrained" in k or "checkpoint" in k)


# ------------------------------------------------------------------------------------ parse errors
def _valid_options(parser: Any, args: list[str]) -> list[str]:
    """Every ``--a.b`` option of the sub-command being parsed."""
    subs = getattr(parser, "_subcommands_action", None)
    target = parser
    if subs is not None:
        for a in args:
            if a in subs.choices:
                target = subs.choices[a]
                break
    return [s for action in target._actions for s in action.option_strings if s.startswith("--")]


def _explain(text: str, parser: Any, args: list[str]) -> str:
    """:func:`agentlit.errors.explain_parse_error` for this parser and command line."""
    def params_of(class_path: str) -> list[str]:
        cls = _import_class(class_path)
        return setting_names(cls) if cls is not None else []

    configs = [args[i + 1] for i, a in enumerate(args[:-1]) if a in ("--config", "-c")]
    configs += [a.split("=", 1)[1] for a in args if a.startswith("--config=")]
    return explain_parse_error(text, _valid_options(parser, args), configs, params_of)


# ---------------------------------------------------------------------------------------- summary
def print_fit_summary(trainer: Trainer) -> None:
    """End of ``fit``: best metric, best/last checkpoints, the run folder, ``metrics.png``."""
    from .utils.plots import plot_metrics

    lines = []
    best = next((c for c in trainer.checkpoint_callbacks if getattr(c, "monitor", None)), None)
    last = next((c for c in trainer.checkpoint_callbacks if getattr(c, "last_model_path", "") or
                 (getattr(c, "monitor", 1) is None and getattr(c, "best_model_path", ""))), None)
    if best is not None and best.best_model_score is not None:
        lines.append(f"best {best.monitor}: {float(best.best_model_score):.4f}  ({best.best_model_path})")
    if last is not None:
        lines.append(f"last checkpoint: {last.last_model_path or last.best_model_path}")
    logger = trainer.loggers[0] if trainer.loggers else None  # not trainer.log_dir: that is a collective call
    run_dir = Path(logger.log_dir) if logger is not None and getattr(logger, "log_dir", None) else None
    if run_dir is not None and run_dir.is_dir():
        lines.append(f"run folder: {run_dir}")
        png = plot_metrics(run_dir / "metrics.csv", run_dir / "metrics.png")
        if png is not None:
            lines.append(f"training curves: {png}   (live: tensorboard --logdir {run_dir.parent})")
    for line in lines:
        print(f"agentlit: {line}")


def build_cli(args: list[str] | None = None, run: bool = True) -> AgentLitCLI:
    """Build (and by default run) the CLI; ``args`` defaults to ``sys.argv[1:]``."""
    from .trainer import AgentTrainer

    quiet_library_noise()
    # Values typed Any / dict[str, Any] are data: jsonargparse's coming default (v5) keeps a class_path
    # inside them as a mapping instead of building the class, and the import paths it denies by default
    # (os, subprocess …) are refused rather than warned about. before_instantiate_classes then refuses
    # such a value in one line.
    set_parsing_settings(instantiate_subclass_spec_in_any=False, import_path_denylist=[])
    parser_kwargs: dict[str, Any] = {"exit_on_error": False}
    try:
        import omegaconf  # noqa: F401

        parser_kwargs["parser_mode"] = "omegaconf"
    except ImportError:
        pass
    return AgentLitCLI(
        trainer_class=AgentTrainer,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},  # multi-process runs write config.yaml once per rank
        parser_kwargs=parser_kwargs,
        args=args,
        run=run,
    )
