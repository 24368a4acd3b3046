"""Output folders: checked for writability up front, never overwritten silently."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

__all__ = ["ensure_writable_dir", "fresh_dir"]


def ensure_writable_dir(path: str | Path, what: str) -> Path:
    """Create ``path`` if needed and prove a file can be written there, or raise a PermissionError
    naming ``what`` (the option that set it) — before any work is done, not after hours of it."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as err:
        raise PermissionError(
            f"{what}={path} is not a writable folder ({err.strerror or err}); choose a folder you can write to"
        ) from err
    return path


def fresh_dir(path: str | Path) -> Path:
    """``path`` if it is missing or empty, else the first free ``path-1``, ``path-2``, … so that an
    earlier run's outputs are never overwritten."""
    path = Path(path)
    candidate, n = path, 0
    while candidate.exists() and (not candidate.is_dir() or any(os.scandir(candidate))):
        n += 1
        candidate = path.with_name(f"{path.name}-{n}")
    return candidate
