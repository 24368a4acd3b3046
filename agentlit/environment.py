"""The Python environment the ``agentlit`` command runs in: CPU threads on a shared machine, the
installed versions (``agentlit --version``), and a broken install named in one line.

Nothing here imports torch: :mod:`agentlit.cli` uses it before the heavy libraries load (the thread
setting must be in place before torch's OpenMP runtime starts).
"""
from __future__ import annotations

import os
import re
import sys
import time
import traceback
from importlib import metadata
from pathlib import Path
from typing import MutableMapping

from .errors import UserError

__all__ = [
    "BrokenInstallError", "THREAD_DEFAULT", "THREAD_VARIABLES", "apply_thread_default", "busy_cores", "check_imports",
    "describe_broken_install", "import_failure", "installed", "thread_default", "version_text",
]

#: Variables through which a user chooses CPU threading themselves; when any is set, agentlit sets nothing.
THREAD_VARIABLES = (
    "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT",
    "KMP_BLOCKTIME", "KMP_AFFINITY", "OMP_PROC_BIND",
)
#: What agentlit adds when other work keeps cores busy (:func:`thread_default`): OpenMP threads that
#: sleep when they wait instead of spinning. torch's default — one spinning thread per core — burns the
#: core another process needs while a thread waits for its partner: beside one busy process the
#: quickstart ran 3.1x slower than with one thread, 1.1x with passive waiting. The thread count itself
#: never follows the load: float sums depend on it, and a run's results (exact resume, DDP against one
#: process) must not depend on what else ran. On an idle machine torch's default is the fastest
#: (passive waiting cost the quickstart 25% there), so agentlit then sets nothing (README, "Speed on a
#: shared machine"; ``benchmarks/threads.py``).
THREAD_DEFAULT = {"OMP_WAIT_POLICY": "PASSIVE"}

#: The libraries a run imports, in import order (a later one fails when an earlier one is broken).
PACKAGES = ("torch", "torchvision", "lightning", "timm", "diffusers")
#: The set this release is tested with (pyproject.toml allows torch up to this one).
TESTED = {"torch": "2.14.1", "torchvision": "0.29.1", "lightning": "2.6.6", "timm": "1.0.31", "diffusers": "0.42.1"}
#: their own dependencies that a failing import often names (their versions are then listed too)
_DEPENDENCIES = ("huggingface_hub", "transformers", "numpy", "safetensors", "accelerate")
_CPU_INDEX = "--index-url https://download.pytorch.org/whl/cpu"


def busy_cores(interval: float = 0.2) -> float | None:
    """How many of the CPUs this process may use are kept busy by other work, sampled from ``/proc/stat``
    over ``interval`` seconds (this process sleeps meanwhile); None where that is not available.

    Args:
        interval: sampling time in seconds.
    """
    allowed = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []

    def sample() -> dict[int, list[int]]:
        with open("/proc/stat") as f:  # "cpuN user nice system idle iowait irq softirq steal …"
            return {int(p[0][3:]): [int(v) for v in p[1:9]] for p in (ln.split() for ln in f)
                    if p and p[0].startswith("cpu") and p[0][3:].isdigit()}

    try:
        before = sample()
        time.sleep(interval)
        after = sample()
    except (OSError, ValueError):
        return None
    busy = 0.0
    for cpu in allowed or sorted(before):
        if cpu in before and cpu in after:
            delta = [b - a for a, b in zip(before[cpu], after[cpu])]
            if sum(delta) > 0:
                busy += 1.0 - (delta[3] + delta[4]) / sum(delta)  # not idle, not waiting for I/O
    return busy


def _physical_share() -> float:
    """Physical cores per logical CPU (0.5 with hyper-threading), from ``/proc/cpuinfo``; 1 if unknown."""
    try:
        with open("/proc/cpuinfo") as f:  # the first processor's block
            first = f.read().split("\n\n")[0]
        info = dict(ln.split(":", 1) for ln in first.splitlines() if ":" in ln)
        return int(info["cpu cores\t"]) / int(info["siblings\t"])
    except (OSError, KeyError, ValueError, ZeroDivisionError):
        return 1.0


def thread_default() -> dict[str, str]:
    """The thread settings agentlit starts torch with: :data:`THREAD_DEFAULT` when other work keeps
    some of the cores torch would use (one per physical core) busy (:func:`busy_cores`); else nothing,
    torch's default (also where the load cannot be read)."""
    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch_threads = max(1, int(allowed * _physical_share()))
    busy = busy_cores()
    if busy is None:
        return {}
    free = max(1, int(allowed - busy + 0.5))
    return dict(THREAD_DEFAULT) if free < torch_threads else {}


def apply_thread_default(environ: MutableMapping[str, str] | None = None,
                         settings: dict[str, str] | None = None) -> dict[str, str]:
    """Set the thread default (:func:`thread_default`) in ``environ`` unless the user chose any of
    :data:`THREAD_VARIABLES`; returns what was set. Takes effect only before torch is imported (OpenMP
    reads it once).

    Args:
        environ: the environment to update (default ``os.environ``).
        settings: the settings to apply (default: :func:`thread_default`, measured now).
    """
    env = os.environ if environ is None else environ
    if any(env.get(name) for name in THREAD_VARIABLES):
        return {}
    settings = thread_default() if settings is None else settings
    env.update(settings)
    return dict(settings)


def installed(name: str) -> str | None:
    """The installed version of distribution ``name`` (None when it is not installed); reads the
    package metadata only, never imports it.

    Args:
        name: a distribution name, e.g. ``torch``.
    """
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def version_text() -> str:
    """``agentlit --version``: agentlit's version and the libraries' it runs on."""
    from . import __version__

    libs = ", ".join(f"{name} {installed(name) or 'not installed'}" for name in PACKAGES)
    return f"agentlit {__version__} ({libs}; Python {sys.version.split()[0]})"


class BrokenInstallError(UserError, ImportError):
    """An installed library that fails to import (mismatched torch / torchvision, a half-upgraded
    package), already phrased as the one line the user sees."""


def _matching_torchvision(torch_version: str) -> str | None:
    """The torchvision release built for ``torch_version`` (torch 2.k pairs with torchvision 0.(k+15))."""
    parts = torch_version.split("+")[0].split(".")
    if len(parts) >= 2 and parts[0] == "2" and parts[1].isdigit():
        return f"0.{int(parts[1]) + 15}"
    return None


def _culprit(err: BaseException, failed: str) -> str:
    """The library whose own files raised ``err`` (the innermost frame inside one of :data:`PACKAGES`),
    else ``failed``, the one being imported."""
    found = failed
    for frame in traceback.extract_tb(err.__traceback__):
        found = _package_of(frame.filename) or found
    return found


def _package_of(filename: str) -> str | None:
    """Which of :data:`PACKAGES` an installed file belongs to (``…/site-packages/<name>/…``), if any."""
    parts = Path(filename).parts
    for i, part in enumerate(parts[:-1]):
        if part in ("site-packages", "dist-packages") and parts[i + 1] in PACKAGES:
            return parts[i + 1]
    return None


def describe_broken_install(err: BaseException, failed: str) -> str:
    """One line for a library that does not import: which one, the versions found, and a set that works.

    Args:
        err: the exception the import raised.
        failed: the package being imported when it was raised.
    """
    name = _culprit(err, failed)
    reason = re.sub(r" \((/|[A-Za-z]:\\)[^)]*\)", "", " ".join(str(err).split()))[:160] or type(err).__name__  # no file paths
    torch_v = installed("torch")
    if name == "torchvision" and torch_v:
        pair = _matching_torchvision(torch_v)
        fix = (f"install the torchvision built for it: pip install \"torchvision=={pair}.*\" (CPU build: add {_CPU_INDEX})"
               if pair else "install torch and torchvision together, from one index")
        return (f"torchvision {installed('torchvision')} does not work with the installed torch {torch_v} ({reason}); "
                f"{fix}; tested pair: torch {TESTED['torch']} + torchvision {TESTED['torchvision']}")
    version = installed(name)
    if version is None:
        return f"this command needs the package '{name}', which is not installed: pip install {name}"
    tested = ", ".join(f"{k} {v}" for k, v in TESTED.items())
    named = [k for k in _DEPENDENCIES if k in reason or k.replace("_", "-") in reason]  # e.g. huggingface_hub
    found = ", ".join(f"{k} {installed(k)}" for k in (*PACKAGES, *named) if installed(k))
    return (f"{name} {version} fails to import ({reason}); installed: {found}; a set that works: {tested} "
            f"(e.g. pip install \"{name}=={TESTED[name]}\")")


def import_failure(err: BaseException) -> str | None:
    """One line (:func:`describe_broken_install`) when ``err`` was raised while Python imported one of
    :data:`PACKAGES` (an import machinery frame and a frame of that library's files in its traceback),
    else None: a library that breaks only when a task first needs it (diffusers) is named the same way.

    Args:
        err: any exception.
    """
    # importlib drops its own frames from tracebacks; a module body executing shows as "<module>"
    importing = any(f.name == "<module>" and _package_of(f.filename) for f in traceback.extract_tb(err.__traceback__))
    if not importing or not isinstance(err, (ImportError, RuntimeError, AttributeError, OSError)):
        return None
    return describe_broken_install(err, _culprit(err, ""))


def check_imports(names: tuple[str, ...] = ("torch", "torchvision", "lightning", "timm")) -> None:
    """Import ``names`` in order; the first that fails raises :class:`BrokenInstallError` with one
    line (:func:`describe_broken_install`) instead of the library's traceback.

    Args:
        names: the packages to import.
    """
    import importlib

    for name in names:
        try:
            importlib.import_module(name)
        except Exception as err:  # noqa: BLE001  (any failure inside a library's import is a broken install)
            raise BrokenInstallError(describe_broken_install(err, name)) from err
