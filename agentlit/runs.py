"""Run folders ``<root>/version_N``: claimed atomically (runs started at the same moment never share
one), found again by ``--ckpt_path last``, and removed after a failed command only when it left
nothing in them.

No Lightning import here: :mod:`agentlit.cli` uses it in its error handler.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

__all__ = [
    "CREATED_RUN_DIRS", "VERSION_ENV", "checkpoints_newest_first", "claim_version", "discard_empty_runs",
    "next_version", "run_of_checkpoint", "run_version",
]

#: the run's version, handed to the processes Lightning starts for the other ranks (they inherit it)
VERSION_ENV = "AGENTLIT_RUN_VERSION"
#: run folders this process created; the error handler removes them again when they stay empty
CREATED_RUN_DIRS: list[Path] = []
#: what this process itself put into ``VERSION_ENV`` (a later command in the same process claims anew)
_set_here: list[str] = []
#: files a run writes before it has done anything worth keeping
_BOOKKEEPING = ("config.yaml", "hparams.yaml", "metrics.csv")


def next_version(root: Path) -> int:
    """One more than the highest ``version_N`` under ``root`` (0 when there is none); nothing is created.

    Args:
        root: the runs folder (``--trainer.default_root_dir``).
    """
    taken = [int(p.name[8:]) for p in Path(root).glob("version_*") if p.name[8:].isdigit()]
    return max(taken, default=-1) + 1


def claim_version(root: Path) -> int:
    """Create the next free ``<root>/version_N`` and return N. The folder is made with an exclusive
    ``mkdir``: of several runs starting at once each gets its own number (the loser of a race moves on
    to the next one).

    Args:
        root: the runs folder (created if missing).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    version = next_version(root)
    while True:
        try:
            (root / f"version_{version}").mkdir()
        except FileExistsError:
            version += 1
            continue
        CREATED_RUN_DIRS.append(root / f"version_{version}")
        return version


def run_version(root: Path, rank: int) -> int:
    """The version folder this process's run logs into.

    Rank 0 claims a new folder (:func:`claim_version`) and puts its number into ``AGENTLIT_RUN_VERSION``,
    so the processes Lightning starts for the other ranks (which inherit the environment) use the
    same one. Other ranks never create a folder: with the variable set they take its number; started
    by an outside launcher (torchrun, SLURM) without it, they take the next free number for their
    loggers, which write nothing off rank 0 (Lightning broadcasts rank 0's folder to every rank for
    checkpoints and the saved config).

    Args:
        root: the runs folder.
        rank: this process's global rank as the launcher's environment gives it.
    """
    inherited = os.environ.get(VERSION_ENV)
    if inherited is not None and inherited not in _set_here and inherited.isdigit():
        return int(inherited)
    if rank != 0:
        return next_version(root)
    version = claim_version(root)
    os.environ[VERSION_ENV] = str(version)
    _set_here.append(str(version))
    return version


def run_of_checkpoint(ckpt: Path, root: Path) -> int | None:
    """``N`` when ``ckpt`` lies in ``<root>/version_N/checkpoints/``, else None.

    Args:
        ckpt: a checkpoint file.
        root: the runs folder.
    """
    try:
        folder = Path(ckpt).resolve().parent
        run = folder.parent
        if folder.name == "checkpoints" and run.parent == Path(root).resolve() and run.name[8:].isdigit() \
                and run.name.startswith("version_"):
            return int(run.name[8:])
    except OSError:
        pass
    return None


def checkpoints_newest_first(root: Path) -> list[Path]:
    """Every ``<root>/version_*/checkpoints/*.ckpt``, the most recently written first (of two written
    in the same instant, ``last.ckpt`` first): the candidates of ``--ckpt_path last``.

    Args:
        root: the runs folder.
    """
    found = []
    for path in Path(root).glob("version_*/checkpoints/*.ckpt"):
        try:
            if path.is_file():
                found.append((path.stat().st_mtime_ns, path.name == "last.ckpt", path))
        except OSError:
            continue
    return [p for *_, p in sorted(found, key=lambda t: (t[0], t[1]), reverse=True)]


def _worth_keeping(run: Path) -> bool:
    """Whether a run folder holds anything besides what every run writes as it starts: a checkpoint,
    logged metrics, predictions or any other output."""
    for path in run.rglob("*"):
        if path.is_dir():
            continue
        if path.name == "metrics.csv":
            try:
                if len(path.read_text().splitlines()) > 1:
                    return True
            except OSError:
                return True
            continue
        if path.name in _BOOKKEEPING or path.name.startswith("events.out.tfevents."):
            continue
        return True
    return False


def discard_empty_runs() -> None:
    """Remove the run folders this process created when the failed command left nothing in them
    worth keeping (see :func:`_worth_keeping`): predictions already written are never deleted."""
    for run in list(CREATED_RUN_DIRS):
        CREATED_RUN_DIRS.remove(run)
        if run.is_dir() and not _worth_keeping(run):
            shutil.rmtree(run, ignore_errors=True)
