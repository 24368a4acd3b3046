"""The one loader for every weights file agentlit reads: data only, never code.

``.safetensors`` files are read with safetensors; everything else goes through
``torch.load(..., weights_only=True)``, whose unpickler builds only tensors, containers, numbers and
strings plus an explicit allowlist. Checkpoints in the wild carry a few inert objects besides their
tensors, so :func:`register_safe_globals` (run at ``import agentlit``, which makes timm's own
``pretrained_cfg_overlay=dict(file=...)`` loader benefit too) allowlists plain-data stand-ins for them:

- ``yacs.config.CfgNode``: the training config the reference release pickles next to its weights;
  rebuilt as :class:`ConfigNode` (a ``dict``), so yacs need not be installed;
- ``argparse.Namespace``: command-line arguments saved by many training scripts (an attribute bag);
- numpy scalars, arrays and dtypes (``max_accuracy`` and friends), as PyTorch documents for ``weights_only``.

None of these run code when rebuilt. A file that needs any other global is refused with one line
naming the file and the globals, and how to turn it into a plain weights file.

Whether weights fit a network is decided by one rule, :func:`check_fit` (:func:`load_fitting` loads
under it), for initial weights, backbone weights, a restored ``--ckpt_path`` and ``export`` alike:
every weight of the network comes from the file with its shape, and every weight of the file is
used; only parts a caller names as kept fresh (a classifier of another class count) may be absent.
Anything else is one line naming the keys.

A ``--ckpt_path`` argument is resolved once, by :func:`resolve`: the file (``last``: the newest
readable checkpoint of the runs folder) is read once through :func:`load_checkpoint` into a
:class:`ResolvedCheckpoint` that the CLI, the trainer and Lightning's restore then share.
Checkpoints are written by :func:`atomic_save`: a failed write never replaces or truncates one.
"""
from __future__ import annotations

import argparse
import os
import pickle
import re
import tempfile
import warnings
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .errors import UserError

__all__ = [
    "CheckpointError", "ConfigNode", "NoCheckpointError", "ResolvedCheckpoint", "atomic_save", "check_checkpoint_file",
    "check_fit", "file_mode", "load_checkpoint", "load_fitting", "load_state_dict_file", "register_safe_globals", "resolve",
    "state_dict_mismatch", "unwrap_checkpoint",
]


class CheckpointError(UserError):
    """A weights file that cannot be read, or that needs Python objects a weights file must not hold."""


class NoCheckpointError(CheckpointError):
    """``--ckpt_path last`` found no checkpoint at all under the runs folder."""


class ConfigNode(dict):
    """Plain-data stand-in for ``yacs.config.CfgNode``: a ``dict`` with read-only attribute access.

    :func:`load_checkpoint` returns the release's pickled ``config`` as a tree of these.
    """

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __repr__(self) -> str:
        return f"ConfigNode({dict.__repr__(self)})"


_YACS_FLAG = "__immutable__"  # one of the two flags yacs keeps in a CfgNode's __dict__


class _CfgNodeRebuild:
    """What the name ``yacs.config.CfgNode`` builds inside a weights-only load: an empty
    ``OrderedDict`` (the unpickler fills only exact dict types with items; yacs' two boolean flags
    land in its ``__dict__``, by which :func:`_config_nodes` turns it into a :class:`ConfigNode`)."""

    def __new__(cls, *args: Any) -> Any:
        return OrderedDict()


def _config_nodes(obj: Any, depth: int = 0) -> Any:
    """Rebuilt yacs nodes (ordered dicts carrying yacs' flags) → :class:`ConfigNode`, recursively."""
    if type(obj) not in (dict, OrderedDict) or depth > 32:
        return obj
    is_node = type(obj) is OrderedDict and _YACS_FLAG in getattr(obj, "__dict__", {})
    if not is_node and depth > 0 and not any(type(v) in (dict, OrderedDict) for v in obj.values()):
        return obj  # a plain state dict or leaf mapping: nothing to convert below
    items = {k: _config_nodes(v, depth + 1) if type(v) in (dict, OrderedDict) else v for k, v in obj.items()}
    if is_node:
        return ConfigNode(items)
    if any(items[k] is not obj[k] for k in items):
        out = type(obj)(items)
        return out
    return obj


def _numpy_globals() -> list[Any]:
    try:
        import numpy as np
    except ImportError:
        return []
    try:
        from numpy._core import multiarray
    except ImportError:  # numpy < 2
        from numpy.core import multiarray
    out: list[Any] = [np.ndarray, np.dtype]
    # pickles from numpy 1.x name numpy.core.*, from numpy 2.x numpy._core.*
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        out += [(multiarray._reconstruct, f"{mod}._reconstruct"), (multiarray.scalar, f"{mod}.scalar")]
    dtypes = getattr(np, "dtypes", None)  # numpy >= 1.25: one class per dtype (np.dtypes.Float64DType …)
    if dtypes is not None:
        out += [getattr(dtypes, n) for n in dir(dtypes) if n.endswith("DType") and isinstance(getattr(dtypes, n), type)]
    return out


def register_safe_globals() -> None:
    """Allowlist the plain-data stand-ins for ``torch.load(weights_only=True)`` (idempotent).

    Checked against torch's current list on every call, not a flag of ours: code elsewhere may
    reset the list (``torch.serialization.clear_safe_globals`` or leaving a ``safe_globals`` block)."""
    if argparse.Namespace in torch.serialization.get_safe_globals():
        return
    torch.serialization.add_safe_globals(
        [(_CfgNodeRebuild, "yacs.config.CfgNode"), argparse.Namespace, *_numpy_globals()]
    )


_CONVERT_HINT = (
    "it was not loaded; where it was made, re-save its weights alone (torch.save(ckpt['model'], 'weights.pth')) "
    "or convert them to .safetensors (safetensors.torch.save_file(state_dict, 'weights.safetensors'))"
)


def _unsafe_globals(path: Path, err: Exception) -> list[str]:
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception:
        found = []
    # legacy (non-zip) files: fall back to the name in the unpickler's message
    return sorted(found) or re.findall(r"GLOBAL ([\w.]+)", str(err))[:1]


def _check_path(path: Path, what: str) -> None:
    if not path.exists():
        raise FileNotFoundError(f"{what} {path} does not exist; pass the path of a .pth/.ckpt/.safetensors file")
    if not path.is_file():
        raise CheckpointError(f"{what} {path} is not a file; pass the path of a .pth/.ckpt/.safetensors file")


def _refusal(path: Path, names: list[str], what: str) -> CheckpointError:
    return CheckpointError(
        f"{what} {path} needs Python objects a weights file should not contain ({', '.join(names)}); "
        + _CONVERT_HINT
    )


def check_checkpoint_file(path: str | os.PathLike[str], what: str = "checkpoint") -> None:
    """Refuse ``path`` in one line if it is missing, unreadable, or needs a non-allowlisted global.

    Reads only the file's pickle, not its tensors: cheap enough to run before Lightning loads it.

    Args:
        path: a ``torch.save`` file.
        what: how the error names the file (``checkpoint``, ``--ckpt_path`` …).
    """
    register_safe_globals()
    path = Path(path)
    _check_path(path, what)
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt"):  # reads the header only
                pass
        except Exception as e:
            raise CheckpointError(f"{what} {path} is not a readable safetensors file (truncated or corrupt{_short(e)})") from None
        return
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception as e:
        if not _is_zip(path):  # a legacy (pre-zip) torch file, or not a checkpoint at all: a full load decides
            load_checkpoint(path, what)
            return
        raise CheckpointError(f"{what} {path} is not a readable PyTorch checkpoint (truncated, corrupt or another format{_short(e)})") from None
    if names:
        raise _refusal(path, sorted(names), what)


def _is_zip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


def _short(err: Exception) -> str:
    """The first sentence of a library's error, or nothing when it says nothing useful."""
    text = str(err).strip().splitlines()
    first = text[0].split(". ")[0][:120] if text else ""
    return f": {first}" if len(first) >= 12 else ""


def load_checkpoint(path: str | os.PathLike[str], what: str = "checkpoint") -> Any:
    """The raw object stored in a weights file, loaded as data only.

    Args:
        path: a ``.safetensors`` file (a flat dict of tensors) or any ``torch.save`` file (``.pth``, ``.ckpt`` …).
        what: how errors name the file (``checkpoint``, ``backbone checkpoint`` …).

    Returns:
        What the file holds: a state dict, or a training checkpoint such as ``{'model': …, 'config': …}``.

    Raises:
        FileNotFoundError: the file does not exist.
        CheckpointError: the file is unreadable (truncated, corrupt, not a checkpoint) or needs Python
            objects outside the allowlist; the message is one line.
    """
    register_safe_globals()
    path = Path(path)
    _check_path(path, what)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:
            raise CheckpointError(f"{what} {path} is not a readable safetensors file (truncated or corrupt{_short(e)})") from None
    try:
        return _config_nodes(torch.load(path, map_location="cpu", weights_only=True))
    except pickle.UnpicklingError as e:
        names = _unsafe_globals(path, e)
        if names and ("GLOBAL" in str(e) or "global" in str(e)):
            raise _refusal(path, names, what) from None
        raise CheckpointError(f"{what} {path} is not a readable PyTorch checkpoint (truncated, corrupt or another format{_short(e)})") from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, AttributeError, TypeError) as e:
        raise CheckpointError(f"{what} {path} is not a readable PyTorch checkpoint (truncated, corrupt or another format{_short(e)})") from None


def unwrap_checkpoint(checkpoint: dict[str, Any], use_ema: bool = False) -> dict[str, Tensor]:
    """The weights inside a training checkpoint.

    Args:
        checkpoint: official ``{'model': …, 'state_dict_ema': …}``, Lightning ``{'state_dict': {'model.…': …}}`` or a bare state dict.
        use_ema: prefer the EMA copy (``state_dict_ema``) when the checkpoint has one.

    Returns:
        The state dict, without a LightningModule's ``model.`` prefix.
    """
    if use_ema and isinstance(checkpoint.get("state_dict_ema"), dict):
        return checkpoint["state_dict_ema"]
    for key in ("model", "state_dict", "module"):
        if key in checkpoint and isinstance(checkpoint[key], dict):
            checkpoint = checkpoint[key]
            break
    if any(k.startswith("model.") for k in checkpoint):  # a LightningModule's "model." prefix
        checkpoint = {k[len("model."):]: v for k, v in checkpoint.items() if k.startswith("model.")}
    return checkpoint


def load_state_dict_file(path: str | os.PathLike[str], use_ema: bool = False, what: str = "checkpoint") -> dict[str, Tensor]:
    """The state dict inside a weights file (see :func:`load_checkpoint` and :func:`unwrap_checkpoint`).

    Args:
        path: a ``.safetensors``, ``.pth`` or ``.ckpt`` file.
        use_ema: prefer the EMA weights when the file has them.
        what: how errors name the file.

    Returns:
        ``{name: tensor}`` ready for the model family's ``checkpoint_filter_fn``.
    """
    ckpt = load_checkpoint(path, what)
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{what} {path} holds a {type(ckpt).__name__}, not a state dict; save model.state_dict() instead")
    state = unwrap_checkpoint(ckpt, use_ema=use_ema)
    if not state or not any(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(
            f"{what} {path} holds no weights (keys: {sorted(map(str, ckpt))[:6]}); expected a state dict, "
            "{'model': state_dict} or a Lightning checkpoint"
        )
    return state


# ------------------------------------------------------------------------------------- fitting
def state_dict_mismatch(expected: Mapping[str, Any], found: Mapping[str, Any], limit: int = 8) -> str:
    """A short description of how ``found`` (a file's weights) differs from ``expected`` (a network's).

    Args:
        expected: the network's state dict.
        found: the weights read from the file.
        limit: names listed per kind of difference.
    """
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    shapes = [f"{k}: checkpoint {tuple(found[k].shape)} vs model {tuple(expected[k].shape)}"
              for k in expected if k in found and hasattr(found[k], "shape") and found[k].shape != expected[k].shape]

    def head(items: list[str]) -> str:
        return ", ".join(items[:limit]) + (f", … ({len(items)} in all)" if len(items) > limit else "")

    parts = [f"{name} ({len(items)}): {head(items)}" for name, items in
             (("missing from the checkpoint", missing), ("not in the model", unexpected), ("shape mismatches", shapes))
             if items]
    return "; ".join(parts) or "no key differences"


def check_fit(expected: Mapping[str, Any], found: Mapping[str, Any], what: str, fresh: tuple[str, ...] = (),
              hint: str = "") -> None:
    """The one rule by which weights fit a network: every weight of ``expected`` is in ``found`` with
    its shape (except names under ``fresh``, which the network keeps), and every weight of ``found`` is
    used.

    Args:
        expected: the network's state dict (names → tensors).
        found: the weights from the file, after the model family's ``checkpoint_filter_fn`` if it has one.
        what: the start of the message, e.g. ``checkpoint x.pth does not fit AgentPVT``.
        fresh: name prefixes the network may keep its own values for (a classifier of another class count).
        hint: what to do about it, appended to the message.

    Raises:
        CheckpointError: one line: ``"{what}: missing from the checkpoint (n): …; not in the model (n): …;
            shape mismatches (n): name: checkpoint (…) vs model (…)"`` and the hint.
    """
    kept = tuple(f"{p}." for p in fresh)
    missing = any(k not in found and not k.startswith(kept) for k in expected)
    bad = any(k not in expected or getattr(v, "shape", None) != expected[k].shape for k, v in found.items())
    if missing or bad:
        shown = {k: v for k, v in expected.items() if k in found or not k.startswith(kept)}
        raise CheckpointError(f"{what}: {state_dict_mismatch(shown, found)}" + (f"; {hint}" if hint else ""))


def load_fitting(model: nn.Module, state: Mapping[str, Tensor], what: str, fresh: tuple[str, ...] = ()) -> nn.Module:
    """Load ``state`` into ``model`` under :func:`check_fit` (nothing is loaded when it does not fit).

    Args:
        model: the network.
        state: its weights from a file (after the family's ``checkpoint_filter_fn``).
        what: the start of the error message (``checkpoint x.pth does not fit AgentPVT``).
        fresh: name prefixes the model keeps its own values for when ``state`` lacks them.

    Returns:
        ``model``, loaded.
    """
    check_fit(model.state_dict(), state, what, fresh)
    model.load_state_dict(state, strict=not fresh)
    return model


# ------------------------------------------------------------------------------------- writing
def file_mode() -> int:
    """The permission bits a new file gets from the process umask (``0o666 & ~umask``)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


class _Writes:
    """A file's ``write`` that remembers the OSError it raised (torch.save turns it into a RuntimeError)."""

    def __init__(self, f: Any) -> None:
        self.f, self.error = f, None

    def write(self, data: Any) -> int:
        try:
            return self.f.write(data)
        except OSError as err:
            self.error = err
            raise

    def flush(self) -> None:
        self.f.flush()


def atomic_save(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save(obj)`` to ``path`` without ever leaving a partial file there: written to a hidden
    temporary file in the same folder, synced to disk, then renamed over ``path``. A failed write
    (disk full, quota, interrupt) removes the temporary file and leaves an existing ``path`` as it was.

    Args:
        obj: what to save (a Lightning checkpoint dict, a state dict …).
        path: the file to write; its folder is created if needed.

    Raises:
        CheckpointError: the write failed; one line naming the file and the reason.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    except OSError as err:
        raise CheckpointError(f"cannot write checkpoint {path}: {err.strerror or err}") from None
    writer = _Writes(None)
    try:
        with os.fdopen(fd, "wb") as f:
            writer.f = f
            torch.save(obj, writer)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, file_mode())  # mkstemp makes it owner-only; a checkpoint is an ordinary file
        os.replace(tmp, path)
    except BaseException as err:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        err = writer.error or err  # torch reports a failed write as its own RuntimeError
        if isinstance(err, OSError):
            kept = "the previous file is unchanged" if path.exists() else "nothing was written"
            raise CheckpointError(f"cannot write checkpoint {path}: {err.strerror or err}; {kept}") from None
        raise
    try:  # the rename itself survives a power cut only once the folder entry is on disk
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


# ------------------------------------------------------------------------------------- resolving
@dataclass
class ResolvedCheckpoint:
    """A ``--ckpt_path`` argument, resolved and read once (:func:`resolve`).

    Attributes:
        path: the checkpoint file.
        task: the task class path the checkpoint was written by (``hyper_parameters._class_path``), if stored.
        settings: the stored ``hyper_parameters`` as written (``_class_path`` and Lightning's ``_instantiator``
            included), unchecked: :mod:`agentlit.stored_settings` decides what of it may be used.
        global_step: the optimizer steps the checkpoint was trained for.
        run_dir: ``<root>/version_N`` when the file lies in that run's ``checkpoints/`` folder, else None.
        skipped: unreadable checkpoints ``last`` passed over (newest first), with the reason.
        data: the whole loaded checkpoint, handed to Lightning's restore instead of reading the file again.
    """

    path: Path
    task: str | None
    settings: dict[str, Any]
    global_step: int
    run_dir: Path | None
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    data: dict[str, Any] | None = field(default=None, repr=False)

    def take_data(self) -> dict[str, Any] | None:
        """The loaded checkpoint, once (later calls return None, so its memory can be freed)."""
        data, self.data = self.data, None
        return data


def _lightning_checkpoint(path: Path, what: str) -> dict[str, Any]:
    """``path`` loaded as data, or a one-line error saying what it is instead of a Lightning checkpoint."""
    data = load_checkpoint(path, what)
    if not isinstance(data, dict) or "state_dict" not in data:
        kind = "a plain state dict" if isinstance(data, dict) and data and all(
            isinstance(v, Tensor) for v in data.values()) else "not a Lightning checkpoint"
        raise CheckpointError(
            f"{what} {path} is {kind}; {what} takes a checkpoint written by `agentlit fit` "
            "(to start from these weights, set the model's checkpoint_path, e.g. --model.checkpoint_path)")
    return data


def _newest_readable(root: Path, what: str) -> tuple[Path, dict[str, Any], list[tuple[Path, str]]]:
    from .runs import checkpoints_newest_first

    skipped: list[tuple[Path, str]] = []
    for candidate in checkpoints_newest_first(root):
        try:
            return candidate, _lightning_checkpoint(candidate, "checkpoint"), skipped
        except (CheckpointError, OSError) as err:
            skipped.append((candidate, str(err)))
    if skipped:
        raise CheckpointError(f"{what} last: no checkpoint under {root} is readable ({skipped[0][1]}"
                                + (f"; and {len(skipped) - 1} more" if len(skipped) > 1 else "") + ")")
    raise NoCheckpointError(f"{what} last: no run under {root} has a checkpoint ({root}/version_N/checkpoints/*.ckpt); "
                            "train one with `agentlit fit` or pass a .ckpt file")


def resolve(arg: str | os.PathLike[str], root: str | os.PathLike[str] = "runs", what: str = "--ckpt_path") -> ResolvedCheckpoint:
    """Resolve a ``--ckpt_path`` argument and read the checkpoint once, as data only.

    ``last`` is the most recently written readable checkpoint of any ``<root>/version_N/checkpoints/``
    (``last.ckpt`` normally; when that is truncated or corrupt, the newest intact one beside or
    before it, and a warning names what was skipped and what was taken).

    Args:
        arg: ``last`` or the path of a checkpoint written by ``agentlit fit``.
        root: the runs folder (``--trainer.default_root_dir``).
        what: how errors name the argument.

    Raises:
        NoCheckpointError: ``last`` found no checkpoint (CheckpointError: none of them is readable).
        FileNotFoundError / CheckpointError: a missing file, a folder, an unreadable or unsafe file, or
            not a Lightning checkpoint; one line each.
    """
    from .runs import run_of_checkpoint

    root = Path(root)
    skipped: list[tuple[Path, str]] = []
    if str(arg) == "last":
        path, data, skipped = _newest_readable(root, what)
        if skipped:
            warnings.warn(f"{what} last: skipped {', '.join(str(p) for p, _ in skipped)} (unreadable: "
                          f"{skipped[0][1]}); using {path}, the newest readable checkpoint", stacklevel=2)
    else:
        path = Path(arg)
        if not path.exists():
            near = _first_or_none(root)
            raise FileNotFoundError(f"{what} {path} does not exist; pass a .ckpt file" + (f" (e.g. {near})" if near else "")
                                    + " or 'last' for the newest run's last.ckpt")
        if path.is_dir():
            inside = sorted(path.glob("**/last*.ckpt"))
            raise CheckpointError(f"{what} {path} is a folder; pass a checkpoint file"
                                  + (f" such as {inside[0]}" if inside else " (runs/…/version_N/checkpoints/last.ckpt)"))
        data = _lightning_checkpoint(path, what)
    hparams = data.get("hyper_parameters") or {}
    if not isinstance(hparams, dict):
        raise CheckpointError(f"{what} {path} stores hyper_parameters as a {type(hparams).__name__}, not a mapping "
                              "of settings; use a checkpoint written by `agentlit fit`")
    task = hparams.get("_class_path")
    step = data.get("global_step", 0)
    version = run_of_checkpoint(path, root)
    return ResolvedCheckpoint(
        path=path, task=task if task is None else str(task), settings=dict(hparams),
        global_step=int(step) if isinstance(step, int) else 0,
        run_dir=root / f"version_{version}" if version is not None else None, skipped=skipped, data=data,
    )


def _first_or_none(root: Path) -> Path | None:
    from .runs import checkpoints_newest_first

    found = checkpoints_newest_first(root)
    return found[0] if found else None


register_safe_globals()  # at import: timm's own loader (pretrained_cfg_overlay=dict(file=...)) benefits too
