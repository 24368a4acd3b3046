"""Models named by a Hugging Face hub id: a copy in the local cache loads without touching the
network, and a miss (offline, no network, an unknown id) is one line naming the model id and how
to point at a local copy, instead of a screen of retries that ends blaming a missing file."""
from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from .errors import UserError

__all__ = ["HubMissError", "from_pretrained"]

T = TypeVar("T")
_TRUE = ("1", "on", "yes", "true")


class HubMissError(UserError, OSError):
    """A model id that is neither a local folder nor in the hub cache, and could not be fetched;
    already phrased as the one line the user sees."""


def _offline() -> bool:
    return any(os.environ.get(v, "").lower() in _TRUE for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _cached(model_id: str, probe: str) -> bool | None:
    """True when ``probe`` of ``model_id`` is in the local hub cache, False when not, None when
    ``model_id`` is not a valid hub id at all."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(model_id, probe)
    except ValueError:  # HFValidationError: not of the form "name" or "owner/name"
        return None
    return isinstance(found, str)


@contextlib.contextmanager
def _quiet_retries() -> Iterator[None]:
    """No per-attempt retry warnings from huggingface_hub / urllib3 while a download is tried: the
    outcome is reported once, by :func:`from_pretrained`."""
    loggers = [logging.getLogger(n) for n in ("huggingface_hub", "urllib3")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _miss(model_id: str, option: str, why: str) -> HubMissError:
    from huggingface_hub import constants

    return HubMissError(
        f"{option} {model_id}: {why}; download it where the hub is reachable "
        f"(huggingface-cli download {model_id} --local-dir DIR) and pass {option} DIR, or fill the cache "
        f"({constants.HF_HUB_CACHE}) there and copy it here")


def from_pretrained(load: Callable[..., T], name_or_path: str, option: str, probe: str = "model_index.json",
                    **kwargs: Any) -> T:
    """``load(name_or_path, **kwargs)`` (a ``from_pretrained``), with a local folder used as is, a
    cached hub id loaded with ``local_files_only=True`` (no network at all) and any miss raised as
    :class:`HubMissError`.

    Args:
        load: the loader, e.g. ``StableDiffusionPipeline.from_pretrained``.
        name_or_path: a local folder or a hub model id.
        option: the setting that named it (for the message), e.g. ``--model.pipeline``.
        probe: a file every copy of the model has (tells whether the cache holds it).
        **kwargs: passed on to ``load``.
    """
    if Path(name_or_path).expanduser().exists():
        return load(name_or_path, **kwargs)
    cached = _cached(name_or_path, probe)
    if cached is None:
        raise HubMissError(f"{option} {name_or_path}: no such folder, and not a hub model id (owner/name); give "
                           "the folder of a saved model or a hub id such as runwayml/stable-diffusion-v1-5")
    if cached:
        return load(name_or_path, local_files_only=True, **kwargs)
    if _offline():
        raise _miss(name_or_path, option, "not in the local hub cache and the hub is off (HF_HUB_OFFLINE=1)")
    try:
        with _quiet_retries():
            return load(name_or_path, **kwargs)
    except (OSError, ValueError) as err:  # requests / huggingface_hub errors derive from OSError
        reason = " ".join(str(err).split())[:120]
        raise _miss(name_or_path, option, f"not in the local hub cache and could not be fetched ({reason})") from err
