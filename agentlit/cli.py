"""The ``agentlit`` command: LightningCLI over every task's LightningModule and DataModule.

    agentlit fit      --config configs/quickstart.yaml
    agentlit test     --config configs/quickstart.yaml --ckpt_path runs/quickstart/version_0/checkpoints/last.ckpt
    agentlit predict  --config configs/generation/quickstart.yaml

Model and data are chosen by class path in the YAML (``model: {class_path: agentlit.tasks.…}``),
so any LightningModule / LightningDataModule works. Defaults added when the config leaves them out:
CSV + TensorBoard loggers sharing one run folder ``<default_root_dir>/version_N``, a checkpoint
callback that monitors the task's own metric and keeps ``last.ckpt``, a rich progress bar, and
safe interrupts (Ctrl-C / SIGTERM save ``last.ckpt``; ``--ckpt_path last`` resumes in the same folder).

This module stays cheap to import: Lightning, torch and timm load only when a sub-command runs
(:mod:`agentlit._lightning_cli`), so ``agentlit --help`` answers at once. Every configuration,
data, checkpoint or environment mistake ends with one line on stderr and exit status 2
(``AGENTLIT_TRACEBACK=1`` shows the traceback instead).
"""
from __future__ import annotations

import difflib
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import errors
from .environment import apply_thread_default, check_imports, import_failure, version_text

if TYPE_CHECKING:  # pragma: no cover
    from ._lightning_cli import AgentLitCLI, default_checkpoints, latest_last_checkpoint

__all__ = ["AgentLitCLI", "SUBCOMMANDS", "cli", "default_checkpoints", "describe_error", "latest_last_checkpoint", "main"]

#: the sub-commands and what they do (``agentlit --help`` prints these without loading Lightning;
#: a test checks they match :meth:`AgentLitCLI.subcommands`)
SUBCOMMANDS = {
    "fit": "train, validating every epoch; Ctrl-C saves last.ckpt, --ckpt_path last resumes",
    "validate": "evaluate a checkpoint on the validation set",
    "test": "evaluate a checkpoint on the test set",
    "predict": "run a checkpoint on the predict set and write the predictions",
    "profile": "parameters, MACs, throughput and peak memory of the configured model",
    "export": "write a trained classifier's weights as safetensors that plain timm loads",
}

HELP = """usage: agentlit [-h] [--version] {subs} ...

Agent Attention (Han et al., ECCV 2024) as a PyTorch Lightning pipeline.

sub-commands (each takes --config FILE.yaml and --section.key value overrides):
{table}

examples:
  agentlit fit  --config configs/quickstart.yaml
  agentlit fit  --config configs/quickstart.yaml --ckpt_path last      # resume the newest run
  agentlit test --config configs/quickstart.yaml --ckpt_path last
  agentlit fit  --config configs/quickstart.yaml --print_config        # what will run
  agentlit fit  --help                                                 # every option of a sub-command

AGENTLIT_TRACEBACK=1 shows the traceback of an error. When other work keeps cores busy, torch's CPU threads wait
passively (OMP_WAIT_POLICY=PASSIVE) unless you set OMP_NUM_THREADS, OMP_WAIT_POLICY or another thread variable.
"""

_TRACEBACK_ENV = "AGENTLIT_TRACEBACK"


def __getattr__(name: str) -> Any:
    if name in ("AgentLitCLI", "default_checkpoints", "latest_last_checkpoint"):
        from . import _lightning_cli

        return getattr(_lightning_cli, name)
    raise AttributeError(f"module 'agentlit.cli' has no attribute {name!r}")


def help_text() -> str:
    """The top-level ``agentlit --help`` (no Lightning import)."""
    width = max(map(len, SUBCOMMANDS))
    table = "\n".join(f"  {name:<{width}}  {text}" for name, text in SUBCOMMANDS.items())
    return HELP.format(subs="{" + ",".join(SUBCOMMANDS) + "}", table=table)


def cli(args: list[str] | None = None, run: bool = True) -> AgentLitCLI:
    """Build (and by default run) the CLI.

    Args:
        args: command-line arguments (default ``sys.argv[1:]``).
        run: run the sub-command in ``args``; False only builds model, data and trainer.
    """
    check_imports()  # a broken torch / torchvision / timm install: one line, not the library's traceback
    from ._lightning_cli import build_cli

    return build_cli(args, run)


# ------------------------------------------------------------------------------------------ errors
def describe_error(err: BaseException) -> str | None:
    """The one line the command prints for ``err`` (:func:`agentlit.errors.describe_error`, with a
    library that fails while it is imported named with its versions), or None for a bug (the
    traceback is shown).

    Args:
        err: the exception that ended the command.
    """
    return errors.describe_error(err, import_failure)


def _discard_empty_runs() -> None:
    """Remove the run folders this process created when the failed command left nothing in them
    worth keeping (no checkpoint, no logged metrics, no predictions)."""
    from .runs import discard_empty_runs

    discard_empty_runs()


def _plot_curves(run: Path) -> None:
    """``metrics.png`` of an interrupted run, as at the end of fit (best effort: never hides the message)."""
    from .utils.plots import plot_metrics

    try:
        plot_metrics(run / "metrics.csv", run / "metrics.png")
    except (OSError, ValueError):
        pass


def _config_values(argv: list[str]) -> list[str]:
    """The values of every ``--config`` / ``-c`` in ``argv``."""
    found = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a in ("--config", "-c")]
    return found + [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]


def quick_check(argv: list[str]) -> str | None:
    """The mistakes answered before torch and Lightning load (in well under a second instead of the
    time their import takes): no or an unknown sub-command, a ``--config`` file that does not exist.
    Returns the error line, or None when the command may go on.

    Args:
        argv: the command-line arguments.
    """
    subs = ", ".join(SUBCOMMANDS)
    first = argv[0] if argv else ""
    config_first = first in ("-c", "--config") or first.startswith("--config=")
    if not first or first.startswith("-") and not config_first:
        return f"choose a sub-command: {subs} (agentlit --help lists them)"
    if not config_first and first not in SUBCOMMANDS:
        close = difflib.get_close_matches(first, SUBCOMMANDS, n=1, cutoff=0.5)
        return f"unknown sub-command '{first}'" + (f"; did you mean `agentlit {close[0]}`?" if close else "") + f" (choose from {subs})"
    for value in _config_values(argv):
        if any(c in value for c in ":{\n") or Path(value).is_file():
            continue  # a file, or a YAML string jsonargparse parses itself
        path = Path(value)
        if path.is_dir():
            return f"--config {value} is a folder; give a YAML file, e.g. configs/quickstart.yaml"
        siblings = [p.name for p in path.parent.glob("*.y*ml")] if path.parent.is_dir() else []
        close = difflib.get_close_matches(path.name, siblings, n=1, cutoff=0.6)
        hint = f"; did you mean {path.parent / close[0]}?" if close else (
            f" (no folder {path.parent})" if not path.parent.is_dir() else f"; {path.parent} holds {', '.join(sorted(siblings)[:6]) or 'no YAML files'}")
        return f"--config {value} does not exist{hint}"
    return None


def main(args: list[str] | None = None) -> None:
    """Console entry point (``agentlit``, ``python -m agentlit``).

    Args:
        args: command-line arguments (default ``sys.argv[1:]``).
    """
    argv = sys.argv[1:] if args is None else [str(a) for a in args]
    if argv[:1] in (["-h"], ["--help"]):
        print(help_text(), end="")
        return
    if argv[:1] in (["-V"], ["--version"]):
        print(version_text())
        return
    mistake = quick_check(argv)
    if mistake is not None:
        if not argv or argv[0].startswith("-"):
            print(f"usage: agentlit [-h] [--version] {{{','.join(SUBCOMMANDS)}}} ...", file=sys.stderr)
        print(f"agentlit: error: {mistake}", file=sys.stderr)
        sys.exit(2)
    if apply_thread_default():  # before torch loads: OpenMP reads it once
        print("agentlit: other work keeps CPU cores busy: torch's threads wait passively (OMP_WAIT_POLICY=PASSIVE; "
              "OMP_NUM_THREADS=1 is faster still there)", file=sys.stderr, flush=True)
    try:
        cli(argv)
        if argv[0] in ("validate", "test", "predict"):
            _discard_empty_runs()  # a folder that got only the config (outputs written elsewhere) is not kept
    except SystemExit as exit_:
        if exit_.code not in (0, None):  # e.g. Lightning's exit after a Ctrl-C before the first step
            _discard_empty_runs()
        raise
    except KeyboardInterrupt:
        _discard_empty_runs()
        print("\nagentlit: interrupted before training started; nothing saved", file=sys.stderr)
        sys.exit(130)
    except BaseException as err:  # noqa: BLE001  (anything not a user mistake is re-raised below)
        if type(err).__name__ == "TrainingInterrupted":
            from .callbacks import resume_command

            print(f"agentlit: interrupted by {err.signame} at step {err.step} (epoch {err.epoch}); "
                  f"checkpoint: {err.checkpoint}", file=sys.stderr)
            print(f"agentlit: resume with: {resume_command(argv)}", file=sys.stderr)
            _plot_curves(Path(err.checkpoint).parent.parent)
            sys.exit(err.exit_code)
        message = None if os.environ.get(_TRACEBACK_ENV) else describe_error(err)
        if message is None:
            raise
        _discard_empty_runs()
        print(f"agentlit: error: {message}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
