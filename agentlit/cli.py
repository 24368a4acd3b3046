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
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

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

AGENTLIT_TRACEBACK=1 shows the traceback of an error. OpenMP threads wait passively (OMP_WAIT_POLICY=PASSIVE)
unless you set OMP_NUM_THREADS, OMP_WAIT_POLICY or another thread variable yourself.
"""

_TRACEBACK_ENV = "AGENTLIT_TRACEBACK"
_GPU_HINT = ("this config asks for a GPU but none is available; to run it on the CPU add "
             "--trainer.accelerator cpu --trainer.devices 1 --trainer.strategy auto --trainer.precision 32-true "
             "(or bf16-mixed)")


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
_PHRASED = {"CheckpointError", "ConfigError", "SettingsError", "BadImageError", "BrokenInstallError", "HubMissError"}
_USER_ERRORS = (ValueError, OSError, KeyError, FloatingPointError, ImportError, TypeError)
_USER_ERROR_NAMES = {"ArgumentError", "MisconfigurationException", "UnpicklingError", "BadZipFile", "ConfigError"}
_NOISE = (
    "Does not validate against any of the Union subtypes", "Subtypes:", "Errors:", "Given value type:",
    "Given value:", "- Expected a <class 'NoneType'>", "Expected a <class 'NoneType'>",
    "Expected a <class 'lightning", "- Expected a <class 'lightning", "Expected a path but",
    "- Expected a path but",
)


def unwrap_error_text(text: str) -> str:
    """jsonargparse's Union/NestedArg dumps (and multi-line messages) → the sentence that matters,
    on one line.

    Args:
        text: the error message.
    """
    if "Original Traceback (most recent call last):" in text:  # re-raised from a DataLoader worker
        text = [ln for ln in text.strip().splitlines() if ln.strip()][-1]
        text = re.sub(r"^[\w.]+(Error|Exception): ", "", text)
    lines = []
    for raw in text.splitlines():
        line = raw.strip()
        line = line[2:] if line.startswith("- ") else line
        if line.startswith("Given value:"):  # keep a short offending value, drop object dumps
            value = line.split(":", 1)[1].strip()
            if len(value) < 60 and not re.match(r"(Namespace|NestedArg|\{|\[)", value):
                lines.append(f"(got {value})")
            continue
        if not line or any(line.startswith(n) for n in _NOISE):
            continue
        lines.append(line)
    out = " ".join(lines).replace("Parser key ", "key ")
    out = re.sub(r"Expected a <class '(\w+)'>\.?", r"expected \1", out)
    return re.sub(r"\.? Got value: (.+)$", r" (got \1)", out)


def _arg_value(argv: list[str], name: str) -> str | None:
    for i, a in enumerate(argv):
        if a == name and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


def _state_dict_mismatch(text: str, ckpt: str) -> str:
    """torch's "Error(s) in loading state_dict" → one sentence with counts and the first keys."""
    def keys(label: str) -> list[str]:
        m = re.search(label + r' key\(s\) in state_dict: (.*?)(?:\.\s*$|\.\s*\n|\. [A-Z])', text, re.S)
        return re.findall(r'"([^"]+)"', m.group(1)) if m else []

    missing, unexpected = keys("Missing"), keys("Unexpected")
    shapes = re.findall(r"size mismatch for ([\w.]+)", text)
    model = re.search(r"loading state_dict for (\w+)", text)
    parts = []
    for label, names in (("missing from the checkpoint", missing), ("not in the model", unexpected),
                         ("shape mismatches", shapes)):
        if names:
            parts.append(f"{label} ({len(names)}): {', '.join(names[:3])}{', …' if len(names) > 3 else ''}")
    what = f"checkpoint {ckpt}" if ckpt else "the checkpoint"
    return (f"{what} does not fit the configured {model.group(1) if model else 'model'}: " + "; ".join(parts)
            + "; it was written for another architecture or task — use the config it was trained with")


def _chain(err: BaseException) -> list[BaseException]:
    """``err`` and the exceptions it was raised from or while handling, outermost first."""
    seen: list[BaseException] = []
    while err is not None and err not in seen:
        seen.append(err)
        err = err.__cause__ or err.__context__
    return seen


def _installed_top(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module.split(".")[0]) is not None
    except (ImportError, ValueError):
        return False


def describe_error(err: BaseException, argv: list[str] | None = None) -> str | None:
    """The one line a user sees for ``err``, or None when it is not a user mistake (a bug: the
    traceback is shown).

    Args:
        err: the exception that ended the command.
        argv: the command-line arguments (to name the checkpoint in checkpoint errors).
    """
    names = {k.__name__ for k in type(err).__mro__}
    text = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
    ckpt = _arg_value(argv or [], "--ckpt_path") or ""
    for cause in _chain(err):  # ours, already phrased for the user (also when jsonargparse wrapped it)
        if {k.__name__ for k in type(cause).__mro__} & _PHRASED:
            return unwrap_error_text(str(cause))
    if "No supported gpu backend found" in text or re.search(r"CUDA.*(not available|can not run)", text):
        return _GPU_HINT
    if "Weights only load failed" in text or "weights_only" in text:
        found = sorted(set(re.findall(r"GLOBAL ([\w.]+)", text)))
        return (f"checkpoint {ckpt or '(file)'} holds Python objects, not only tensors and plain data"
                + (f" ({', '.join(found)})" if found else "")
                + "; agentlit does not run code from weight files: re-save just the state dict "
                "(torch.save(model.state_dict(), path)) or convert it to .safetensors")
    if "Error(s) in loading state_dict" in text:
        return _state_dict_mismatch(text, ckpt)
    if "PytorchStreamReader failed" in text or "invalid load key" in text or isinstance(err, EOFError):
        return (f"checkpoint {ckpt or '(file)'} is truncated or corrupt ({unwrap_error_text(text)[:120]}); "
                "use another checkpoint, e.g. the run's last.ckpt or the best one")
    m = re.search(r"(\w+)\.__init__\(\) got an unexpected keyword argument '(\w+)'", text)
    if m and ckpt:
        return (f"checkpoint {ckpt} stores the setting '{m.group(2)}', which {m.group(1)} does not take "
                "(saved by another version or class); use a checkpoint written with this config")
    if isinstance(err, ModuleNotFoundError) and err.name and not _installed_top(err.name):
        return f"this command needs the package '{err.name}', which is not installed: pip install {err.name}"
    for cause in _chain(err):  # e.g. diffusers failing on its first use, inside a task jsonargparse builds
        broken = import_failure(cause)
        if broken is not None:
            return broken
    if isinstance(err, _USER_ERRORS) or names & _USER_ERROR_NAMES:
        if isinstance(err, TypeError) and "Traceback" not in text and not re.search(r"argument|parameter", text):
            return None
        return unwrap_error_text(text) or type(err).__name__
    return None


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
    apply_thread_default()  # before torch loads: OpenMP reads it once
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
        message = None if os.environ.get(_TRACEBACK_ENV) else describe_error(err, argv)
        if message is None:
            raise
        _discard_empty_runs()
        print(f"agentlit: error: {message}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
