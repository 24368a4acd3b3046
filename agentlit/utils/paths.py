"""Output folders: checked for writability up front, never overwritten silently."""
from __future__ import annotations

import itertools
import os
import tempfile
from pathlib import Path

__all__ = ["CLAIM_MARKER", "ensure_writable_dir", "fresh_dir"]


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


#: the file that marks an output folder as taken by one run (created exclusively: the claim itself)
CLAIM_MARKER = ".agentlit-output"


def fresh_dir(path: str | Path) -> Path:
    """Claim ``path`` for this run's outputs and return it — or, when an earlier run wrote there (or
    another run claimed it a moment ago), the first free ``path-1``, ``path-2``, … — so that outputs are
    never overwritten or mixed. A missing folder is created; an empty one (made by the user) is taken.
    The claim is an exclusively created marker file (:data:`CLAIM_MARKER`), so runs started at the same
    moment get different folders.

    Args:
        path: the folder asked for.
    """
    path = Path(path)
    candidates = itertools.chain([path], (path.with_name(f"{path.name}-{n}") for n in itertools.count(1)))
    for candidate in candidates:
        try:
            candidate.mkdir(parents=True, exist_ok=True)
            if any(e.name != CLAIM_MARKER for e in os.scandir(candidate)):
                continue  # an earlier run's outputs (or the user's files)
            os.close(os.open(candidate / CLAIM_MARKER, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:  # a file of that name, or another run's marker
            continue
        except OSError as err:
            raise PermissionError(f"cannot create the output folder {candidate} ({err.strerror or err}); "
                                  "choose a folder you can write to") from err
        return candidate
    raise AssertionError("unreachable: the candidates never end")
