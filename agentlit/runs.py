"""Run folders ``<root>/version_N``: claimed atomically (runs started at the same moment never share
one), found again by ``--ckpt_path last``, and removed after a failed command only when it left
nothing in them. ``validate`` / ``test`` / ``predict`` of a run's checkpoint write into that run
(``version_N/test``, ``version_N/predict``, ``version_N/predict-1`` …), never into a new ``version_N``.

No Lightning import here: :mod:`agentlit.cli` uses it in its error handler.
"""
from __future__ import annotations

import itertools
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

__all__ = [
    "CREATED_RUN_DIRS", "EVAL_ENV", "VERSION_ENV", "checkpoints_newest_first", "claim_version", "discard_empty_runs",
    "evaluation_folder", "next_evaluation_folder", "next_version", "run_folder_of", "run_of_checkpoint", "run_version",
]

#: the run's version, handed to the processes Lightning starts for the other ranks (they inherit it)
VERSION_ENV = "AGENTLIT_RUN_VERSION"
#: likewise the evaluation folder (``test``, ``predict-1`` …) inside an evaluated run
EVAL_ENV = "AGENTLIT_EVAL_FOLDER"
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


def _claim_first_free(candidates: Iterator[Path]) -> Path:
    """Create the first of ``candidates`` that does not exist yet, with an exclusive ``mkdir`` (of several
    processes racing for one name, one wins and the others move on), and remember it in
    :data:`CREATED_RUN_DIRS`."""
    for path in candidates:
        try:
            path.mkdir()
        except FileExistsError:
            continue
        CREATED_RUN_DIRS.append(path)
        return path
    raise AssertionError("unreachable: the candidates never end")


def claim_version(root: Path) -> int:
    """Create the next free ``<root>/version_N`` and return N. The folder is made with an exclusive
    ``mkdir``: of several runs starting at once each gets its own number (the loser of a race moves on
    to the next one).

    Args:
        root: the runs folder (created if missing).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    path = _claim_first_free(root / f"version_{v}" for v in itertools.count(next_version(root)))
    return int(path.name[8:])


def _numbered(folder: Path, name: str) -> Iterator[Path]:
    """``folder/name``, ``folder/name-1``, ``folder/name-2``, …"""
    yield folder / name
    for k in itertools.count(1):
        yield folder / f"{name}-{k}"


def run_folder_of(ckpt: str | Path) -> Path | None:
    """The run folder ``…/version_N`` that wrote ``ckpt`` (a file in its ``checkpoints/`` folder), else None.

    Args:
        ckpt: a checkpoint file.
    """
    folder = Path(ckpt).absolute().parent
    run = folder.parent
    if not (folder.name == "checkpoints" and run.name.startswith("version_") and run.name[8:].isdigit()):
        return None
    try:
        return run.relative_to(Path.cwd())  # printed paths stay as short as the user's
    except ValueError:
        return run


def evaluation_folder(run: Path, sub: str, rank: int) -> str:
    """The folder name under ``run`` where ``sub`` (validate / test / predict) of this process writes:
    ``<sub>``, or ``<sub>-1``, ``<sub>-2`` … when an earlier evaluation of that run holds it, so a second
    predict never overwrites the first. Rank 0 claims it (exclusive ``mkdir``) and hands the name to the
    processes Lightning starts for the other ranks through ``AGENTLIT_EVAL_FOLDER``.

    Args:
        run: the evaluated run's folder (``…/version_N``).
        sub: the sub-command.
        rank: this process's global rank.
    """
    inherited = os.environ.get(EVAL_ENV)
    if inherited is not None and inherited not in _set_here:
        return inherited
    if rank != 0:
        return next(p.name for p in _numbered(run, sub) if not p.exists())
    name = _claim_first_free(_numbered(run, sub)).name
    os.environ[EVAL_ENV] = name
    _set_here.append(name)
    return name


def next_evaluation_folder(run: Path, sub: str) -> str:
    """The name :func:`evaluation_folder` would claim (what ``--print_config`` shows); nothing is created.

    Args:
        run: the evaluated run's folder.
        sub: the sub-command.
    """
    return next(p.name for p in _numbered(run, sub) if not p.exists())


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
