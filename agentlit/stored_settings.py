"""Settings are data: what a checkpoint's stored settings may set, and what a mapping-typed setting
(``model_kwargs: dict[str, Any]`` and the like) may hold, from a checkpoint or from a config file.

A checkpoint written through the CLI stores the task's ``__init__`` arguments (``hyper_parameters``)
and its class path (``_class_path``). Plain LightningCLI parses them back into the configuration,
where they beat the command line and where a nested ``{"class_path": …, "init_args": …}`` is
instantiated. agentlit instead checks them before anything is parsed (:func:`check_stored`) and
merges only what is allowed (:func:`merge_stored`):

- the class must be a task agentlit ships (``agentlit.tasks.*``), and every value plain data: no
  ``class_path`` / ``init_args`` anywhere, no objects, except in ``net`` (the task's network), whose
  ``class_path`` must be one of agentlit's own networks (:data:`agentlit.tasks.networks.NETWORKS`)
  for the checkpoint's value to be built, and whose ``init_args`` are plain data;
- locations are never taken from a checkpoint: output folders, input folders and files, the
  initial weights (``pretrained``, ``checkpoint_path``: the checkpoint's own weights replace them);
- a model name that would be used from the checkpoint must be a registry name, not a hub id,
  folder or URL (nothing is downloaded because a file said so);
- stored values fill in only what the user left unset; a user value that differs from a stored
  network setting (a task's ``network_settings``: classes, architecture, sizes) is an error
  naming both values; other settings (learning rate, thresholds, inference mode) follow the user.
"""
from __future__ import annotations

import collections.abc
import importlib
import inspect
import json
import re
import types
import typing
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .errors import UserError

__all__ = [
    "NET", "SettingsError", "check_plain_settings", "check_stored", "merge_stored", "network_names", "plain_data_problem",
    "setting_names", "shipped_task",
]


class SettingsError(UserError):
    """Stored or configured settings that agentlit refuses, already phrased as the one line the user sees."""


#: how LightningCLI records that it built the task (Lightning's own allowlist); nothing else is accepted there
_INSTANTIATORS = ("lightning.pytorch.cli.instantiate_module", "pytorch_lightning.cli.instantiate_module")
#: mapping keys by which jsonargparse / LightningCLI turn a value into a class to build
_CODE_KEYS = ("class_path", "_class_path", "init_args", "dict_kwargs")
#: string prefixes of places weights are fetched from (timm's hub names, URLs)
_REMOTE = re.compile(r"^(hf[-_]hub:|local-dir:|[a-zA-Z][a-zA-Z0-9+.-]*://)")
#: settings that name where a model comes from; used from a checkpoint only as a registry name
_SOURCES = ("model_name", "backbone", "pipeline")
#: nested keys (inside ``model_kwargs`` …) that point timm or diffusers at weights to fetch
_NESTED_LOCATIONS = ("pretrained_cfg", "pretrained_cfg_overlay", "hf_hub_id", "hf_hub_filename", "url", "file", "cache_dir")
_TASK_PATH = re.compile(r"^agentlit\.tasks(\.[A-Za-z_]\w*)?\.[A-Za-z_]\w*$")


def _kind(key: str) -> str:
    """``weights`` (initial weights), ``location`` (a folder or file to read or write), ``source`` (a
    model name) or ``value``, by the setting's name."""
    if key == "pretrained" or key == "checkpoint_path" or key.endswith(("_checkpoint", "_checkpoint_path")):
        return "weights"
    if key in _SOURCES or key.endswith("_name_or_path"):
        return "source"
    if key.startswith("output") or key.endswith(("_dir", "_root", "_file", "_path")):
        return "location"
    return "value"


def _short(value: Any, width: int = 80) -> str:
    text = json.dumps(_plain(value), default=str) if not isinstance(value, str) else repr(value)
    return text if len(text) <= width else text[: width - 1] + "…"


def _plain(value: Any) -> Any:
    """Namespaces → dicts, tuples → lists (recursively): the form two settings are compared in."""
    if hasattr(value, "as_dict") and callable(value.as_dict):  # jsonargparse Namespace
        value = value.as_dict()
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# ------------------------------------------------------------------------------------ plain data
def _nodes(value: Any, where: str) -> typing.Iterator[tuple[str, Any]]:
    """(key path, value) of ``value`` and of everything nested in its mappings and sequences, parents first."""
    if hasattr(value, "as_dict") and callable(value.as_dict):  # jsonargparse Namespace
        value = value.as_dict()
    yield where, value
    if isinstance(value, Mapping):
        for key, item in value.items():
            yield from _nodes(item, f"{where}.{key}")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from _nodes(item, f"{where}[{i}]")


def plain_data_problem(value: Any, where: str) -> tuple[str, str] | None:
    """The first thing in ``value`` that is not plain data, as (key path, what it is), else None.

    Plain data: None, bools, numbers, strings, and lists / tuples / string-keyed mappings of them,
    with no ``class_path`` / ``init_args`` key anywhere (jsonargparse would build that class).

    Args:
        value: a setting's value (mappings may be jsonargparse Namespaces).
        where: the setting's name, the start of the returned key path.
    """
    for path, node in _nodes(value, where):
        if isinstance(node, Mapping):
            for key in node:
                if not isinstance(key, str):
                    return path, f"a mapping key {key!r} that is not a string"
                if key in _CODE_KEYS:
                    named = node.get("class_path", node.get("_class_path"))
                    article = "an" if key[0] in "aeiou" else "a"
                    return path, f"{article} {key} key" + (f" naming {named!r}" if named is not None else "")
        elif not (node is None or isinstance(node, (bool, int, float, str, list, tuple))):
            return path, f"a {type(node).__module__}.{type(node).__qualname__} object"
    return None


def _remote_problem(value: Any, where: str) -> tuple[str, str] | None:
    """A URL, hub name or nested weights location inside a stored value, as (key path, value)."""
    for path, node in _nodes(value, where):
        if isinstance(node, str) and _REMOTE.match(node.strip()):
            return path, repr(node)
        if isinstance(node, Mapping):
            for key, item in node.items():
                if (key in _NESTED_LOCATIONS or _kind(key) in ("weights", "location")) and item not in (None, False, "", {}):
                    return f"{path}.{key}", _short(item)
    return None


# -------------------------------------------------------------------------------------- classes
def shipped_task(class_path: Any) -> type | None:
    """The agentlit task class ``class_path`` names (``agentlit.tasks.ClassificationModule`` or its
    module path), else None. Only modules under ``agentlit.tasks`` are ever imported for it.

    Args:
        class_path: a stored ``_class_path``.
    """
    if not isinstance(class_path, str) or not _TASK_PATH.match(class_path):
        return None
    from .tasks.base import TaskModule

    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name, None)
    except ImportError:
        return None
    ok = isinstance(cls, type) and issubclass(cls, TaskModule) and cls is not TaskModule
    return cls if ok and cls.__module__.startswith("agentlit.tasks.") else None


def _shipped_names() -> list[str]:
    from . import tasks

    return sorted(f"agentlit.tasks.{n}" for n in dir(tasks) if n.endswith("Module") and shipped_task(f"agentlit.tasks.{n}"))


def _init_params(cls: type) -> tuple[dict[str, inspect.Parameter], dict[str, Any], bool]:
    """The ``__init__`` parameters of ``cls`` (through ``**kwargs`` to the parents, as LightningCLI
    follows them), their resolved type hints, and whether the chain ends in a free ``**kwargs``."""
    params: dict[str, inspect.Parameter] = {}
    hints: dict[str, Any] = {}
    open_kwargs = False
    for klass in cls.__mro__:
        if "__init__" not in klass.__dict__ or klass is object:
            continue
        sig = inspect.signature(klass.__init__)
        try:
            hints.update({k: v for k, v in typing.get_type_hints(klass.__init__).items() if k not in hints})
        except Exception:  # an unresolvable annotation: its setting is treated as plain data
            pass
        for p in list(sig.parameters.values())[1:]:
            if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                params.setdefault(p.name, p)
        open_kwargs = any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values())
        builder = klass.__dict__.get("network_class")
        if open_kwargs and builder is not None:  # a task's **network: the flat settings of its default network
            from .tasks.networks import network_parameters

            passed = getattr(klass, "network_passed", ())
            for name, p in network_parameters(builder).items():
                if name not in passed:
                    params.setdefault(name, p)
            for fn in (builder.__new__, getattr(getattr(builder, "forwards", (None,))[0], "__init__", None)):
                try:
                    hints.update({k: v for k, v in typing.get_type_hints(fn).items() if k not in hints} if fn else {})
                except Exception:  # an unresolvable annotation: its setting is treated as plain data
                    pass
            open_kwargs = False
        if not open_kwargs:
            break
    return params, hints, open_kwargs


# ------------------------------------------------------------------------------------- networks
#: the setting that holds a task's network (a ``class_path`` and plain ``init_args``)
NET = "net"


def _net_shape_problem(value: Mapping[str, Any]) -> tuple[str, str] | None:
    """What makes a stored ``net`` more than ``{class_path: str, init_args: plain data}``, else None."""
    extra = sorted(set(value) - {"class_path", "init_args"})
    if extra:
        return f"{NET}.{extra[0]}", "a key other than class_path and init_args"
    if not isinstance(value["class_path"], str):
        return f"{NET}.class_path", "a value that is not a class path"
    return plain_data_problem(value.get("init_args") or {}, f"{NET}.init_args")


def network_names() -> list[str]:
    """The class paths a checkpoint's stored ``net`` may name: agentlit's own networks."""
    from .tasks.networks import NETWORKS

    return [f"{cls.__module__}.{cls.__qualname__}" for cls in NETWORKS]


def _stored_net(value: Mapping[str, Any], path: str | Path) -> dict[str, Any]:
    """A checkpoint's ``net`` as it may be built: one of agentlit's own networks, without initial
    weights (the checkpoint's own replace them) and with model names only from the registry."""
    named = value.get("class_path")
    if named not in network_names():
        raise SettingsError(f"checkpoint {path} stores net.class_path={_short(named)}; a checkpoint may only name one of "
                            f"agentlit's networks ({', '.join(network_names())}): it was not built, nothing was run; give "
                            "the net in your config")
    init_args = {}
    for key, item in (value.get("init_args") or {}).items():
        kind = _kind(key)
        if kind in ("weights", "location"):
            continue  # initial weights and places: never from a checkpoint
        remote = _remote_problem(item, f"{NET}.init_args.{key}")
        if remote is None and kind == "source" and isinstance(item, str) and re.search(r"[/\\:]", item):
            remote = (f"{NET}.init_args.{key}", _short(item))
        if remote:
            raise SettingsError(
                f"checkpoint {path} stores {remote[0]}={remote[1]}, a place to fetch weights from; agentlit takes model "
                "names and locations only from your config or command line: it was not used, nothing was fetched")
        init_args[key] = item
    return {"class_path": named, "init_args": init_args}


def _same_net(given: Any, stored: Mapping[str, Any]) -> bool:
    """Whether the user's ``net`` (class path and the init_args they set) agrees with the stored one."""
    given = _plain(given)
    if not isinstance(given, Mapping):
        return False
    if given.get("class_path") != stored.get("class_path"):
        return False
    mine, theirs = given.get("init_args") or {}, _plain(stored.get("init_args") or {})
    return all(_kind(k) in ("weights", "location") or theirs.get(k) == v for k, v in mine.items())


def setting_names(cls: type) -> list[str]:
    """Every setting ``cls`` takes, in signature order: its ``__init__`` arguments, followed through
    ``**kwargs`` into the parent tasks and into a task's default network (``network_class``).

    Args:
        cls: a task (or any class).
    """
    return list(_init_params(cls)[0])


# -------------------------------------------------------------------------------- checkpoints
def check_stored(settings: Mapping[str, Any], path: str | Path, configured: str | None,
                 what: str = "--ckpt_path") -> tuple[type | None, dict[str, Any]]:
    """Check a checkpoint's stored settings before anything is parsed from them.

    Args:
        settings: the checkpoint's ``hyper_parameters`` as stored.
        path: the checkpoint (for the messages).
        configured: the class path of the task the config builds (None: unknown).
        what: how messages name the checkpoint argument.

    Returns:
        (the stored task class or None when none is stored, the settings without ``_class_path`` / ``_instantiator``).

    Raises:
        SettingsError: a class that is not an agentlit task, a task other than the configured one, or a
            setting that is not plain data; one line, nothing was imported or run.
    """
    stored = settings.get("_class_path")
    cls = None
    if stored is not None:
        cls = shipped_task(stored)
        if cls is None:
            raise SettingsError(f"checkpoint {path} names {_short(stored)} as its task; a checkpoint may only name a "
                                f"task agentlit ships ({', '.join(_shipped_names())}): it was not used, nothing was run")
        wanted = shipped_task(configured) if configured else None
        if configured and wanted is not cls:
            raise SettingsError(f"checkpoint {path} was written by {stored}, but the config builds {configured}; "
                                "use the config the checkpoint was trained with")
    instantiator = settings.get("_instantiator")
    if instantiator is not None and instantiator not in _INSTANTIATORS:
        raise SettingsError(f"checkpoint {path} stores _instantiator={_short(instantiator)}, which names code; "
                            "it was not used, nothing was run")
    clean = {}
    for key, value in settings.items():
        if key in ("_class_path", "_instantiator"):
            continue
        if key == NET and isinstance(value, Mapping) and "class_path" in value:
            problem = _net_shape_problem(value)
        else:
            problem = plain_data_problem(value, str(key)) if isinstance(key, str) else (repr(key), "a key that is not a string")
        if problem:
            raise SettingsError(f"checkpoint {path} stores the setting {problem[0]} with {problem[1]}; stored settings "
                                "are plain values and agentlit never imports or runs what they name: it was not used")
        clean[key] = value
    return cls, clean


def merge_stored(settings: Mapping[str, Any], cls: type, given: Mapping[str, Any], path: str | Path,
                 group: str = "model") -> dict[str, Any]:
    """The stored settings to fill into the configuration: only what the user left unset, minus
    locations; a stored model name only when it is a registry name.

    Args:
        settings: the checked settings (:func:`check_stored`).
        cls: the task class the config builds.
        given: the settings the user gave (config files and command line, no defaults).
        path: the checkpoint (for the messages).
        group: the config section (``model``), for naming options in the messages.

    Returns:
        ``{setting: stored value}`` to merge.

    Raises:
        SettingsError: a setting the class does not take, a stored download location that would be
            used, or a user value that conflicts with a stored network setting; one line.
    """
    params, _, open_kwargs = _init_params(cls)
    network = getattr(cls, "network_settings", None)
    fill: dict[str, Any] = {}
    ignored: list[str] = []
    for key, value in settings.items():
        if key not in params and not open_kwargs:
            raise SettingsError(f"checkpoint {path} stores the setting '{key}', which {cls.__name__} does not take "
                                "(saved by another version or class); use a checkpoint written with this config")
        mine = key in given
        if mine and _plain(given[key]) == _plain(value):
            continue
        if key == NET and isinstance(value, Mapping) and "class_path" in value:
            if not mine:
                fill[key] = _stored_net(value, path)
            elif not _same_net(given[key], value):
                raise SettingsError(
                    f"--{group}.net {_short(given[key])} conflicts with checkpoint {path}, which was trained with "
                    f"net={_short(value)}; leave --{group}.net out or pass a checkpoint trained with that network")
            continue
        kind = _kind(key)
        if kind == "weights":
            continue  # the checkpoint's own weights replace any initial weights
        if kind == "location":
            default = params[key].default if key in params else None
            if not mine and value is not None and _plain(value) != _plain(default):
                ignored.append(f"{key}={_short(value, width=400)}")
            continue
        remote = _remote_problem(value, key)
        if remote is None and kind == "source" and isinstance(value, str) and re.search(r"[/\\:]", value):
            remote = (key, _short(value))
        if remote:
            raise SettingsError(
                f"checkpoint {path} stores {remote[0]}={remote[1]}, a place to fetch weights from; agentlit takes "
                f"model names and locations only from your config or command line: it was not used, nothing was fetched")
        if mine:
            if network is None or key in network:
                raise SettingsError(
                    f"--{group}.{key} {_short(given[key])} conflicts with checkpoint {path}, which was trained with "
                    f"{key}={_short(value)}; leave --{group}.{key} out or pass a checkpoint trained with that value")
            continue
        fill[key] = value
    if ignored:
        warnings.warn(f"checkpoint {path}: ignored its stored {', '.join(ignored)} (output and data locations come from "
                      "your config or command line, never from a checkpoint)", stacklevel=2)
    return fill


# ---------------------------------------------------------------------------------- config files
def _plain_type(tp: Any) -> bool:
    """Whether a type hint admits only plain data (so a ``class_path`` in its value cannot be meant)."""
    if tp in (Any, object, None, type(None), str, int, float, bool, bytes, inspect.Parameter.empty):
        return True
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return True
    if origin in (typing.Union, types.UnionType, list, tuple, dict, set, frozenset, collections.abc.Mapping,
                  collections.abc.Sequence, collections.abc.MutableMapping):
        return all(_plain_type(a) for a in typing.get_args(tp) if a is not Ellipsis)
    return False


def check_plain_settings(section: Any, option: str) -> None:
    """Refuse a ``class_path`` (or any object) inside a setting whose type admits only plain data
    (``model_kwargs: dict[str, Any]``, ``compile: bool | dict[str, Any]`` …) of a parsed config
    section, whether it came from a config file or the command line: such a value is never built.

    Args:
        section: the parsed ``model`` / ``data`` section (``class_path`` + ``init_args``).
        option: its option name (``--model``), for the message.

    Raises:
        SettingsError: one line naming the setting and what it holds.
    """
    section = _plain(section) if section is not None else None
    if not isinstance(section, Mapping) or not isinstance(section.get("class_path"), str):
        return
    module, _, name = section["class_path"].rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return  # the parser has already reported an unknown class
    _, hints, _ = _init_params(cls)
    for key, value in (section.get("init_args") or {}).items():
        if key in hints and not _plain_type(hints[key]):
            continue  # a class-typed setting: a class_path is what it takes
        problem = plain_data_problem(value, key)
        if problem:
            raise SettingsError(f"{option}.{problem[0]} holds {problem[1]}; this setting takes plain values (numbers, "
                                "strings, lists, mappings) and agentlit never builds a class named inside it")
