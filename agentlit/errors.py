"""agentlit's own exception types for user mistakes, the one way a setting's choices are checked, and
the one line the ``agentlit`` command prints for an error.

A mistake in what the user gave (a setting, a file, a checkpoint, a dataset) is detected where it
arises and raised as a :class:`UserError` (or a subclass: ``CheckpointError``, ``SettingsError``,
:class:`ConfigError`, ``BadImageError``, ``ResumeError``, ``BrokenInstallError``, ``HubMissError``) whose message is
already the one line the user should read: what is wrong, the bad value, and what would be valid.
The CLI prints that line with exit status 2 and no traceback, without parsing it.

Only what comes from outside is recognised by its text: jsonargparse's parse errors, Lightning's "no
GPU", a DataLoader worker's re-raised error and CPython's call errors. Each such pattern is a named
entry of :data:`LIBRARY_MESSAGES`, and each entry is pinned by a test that provokes the message with
the installed library (``tests/test_error_messages.py``), so a rewording upstream fails a test
instead of silently changing what users see.

This module imports nothing heavy: the CLI's error handling loads it before Lightning or torch.
"""
from __future__ import annotations

import difflib
import re
import shlex
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "ConfigError", "LIBRARY_MESSAGES", "UserError", "check_choice", "choices_of", "describe_error",
    "explain_parse_error", "unwrap_error_text",
]


class UserError(ValueError):
    """A mistake in the user's input, phrased as the one line the user sees.

    A ``ValueError``, so code that catches those (and tests written against them) keeps working.
    """


class ConfigError(UserError):
    """A configuration mistake found while the command line and config files are parsed."""


def choices_of(choices: Any) -> tuple[Any, ...]:
    """The values a ``Literal[...]`` type (also inside ``Optional`` / ``|``) or a sequence allows.

    Args:
        choices: ``Literal["a", "b"]``, ``Literal["a"] | None`` or a tuple / list of values.
    """
    origin = typing.get_origin(choices)
    if origin is typing.Literal:
        return typing.get_args(choices)
    if origin in (typing.Union, types.UnionType):
        return tuple(v for arg in typing.get_args(choices) for v in ((None,) if arg is type(None) else choices_of(arg)))
    return tuple(choices)


def check_choice(name: str, value: Any, choices: Any) -> None:
    """Refuse ``value`` unless ``choices`` allows it.

    A setting with a fixed set of values is typed with a ``Literal`` (so ``--help`` and the config
    parser list them) and checked with that same type here (so a module built in Python is checked
    too): one source for both.

    Args:
        name: the setting's name, for the message.
        value: what was given.
        choices: the setting's ``Literal`` type, or a tuple of the valid values.

    Raises:
        UserError: ``"{name}={value!r} must be one of [...]"``.
    """
    valid = choices_of(choices)
    if value not in valid:
        raise UserError(f"{name}={value!r} must be one of {list(valid)}")


# ------------------------------------------------------------------------------ other libraries' messages
#: Every piece of another library's message text agentlit recognises, by what it is. Nothing else is
#: matched; each entry is provoked with the installed library by ``tests/test_error_messages.py``.
LIBRARY_MESSAGES: dict[str, re.Pattern[str]] = {
    # jsonargparse: an init argument the class does not take (--model.x, or a key under init_args)
    "unknown_init_arg": re.compile(r"key \"?(\w+)\"?:.*?class_path '([\w.]+)':\s*Option '([\w.]+)' is not accepted", re.S),
    # jsonargparse: a class_path naming a class its module does not have
    "unknown_class": re.compile(r"key \"?(\w+)\"?:.*?class_path '([\w.]+)':\s*module '([\w.]+)' has no attribute '(\w+)'",
                                re.S),
    # argparse / jsonargparse: an option no parser knows (--trainer.max_epocs)
    "unrecognized_arguments": re.compile(r"[Uu]nrecognized arguments: (.+)"),
    # jsonargparse: a key of a config file that no option takes
    "option_not_accepted": re.compile(r"does not accept option '([\w.]+)'"),
    # jsonargparse: a YAML file that is not valid YAML
    "invalid_yaml": re.compile(r"Problems parsing config:\s*(.*)", re.S),
    # jsonargparse: the lines of a Union / nested-class dump that say nothing to a user
    "union_header": re.compile(r"^Does not validate against any of the Union subtypes"),
    "union_subtypes": re.compile(r"^Subtypes: "),
    "union_errors": re.compile(r"^Errors:$"),
    "union_given_type": re.compile(r"^Given value type: "),
    "union_not_none": re.compile(r"^Expected a <class 'NoneType'>"),
    "union_not_a_path": re.compile(r"^Expected a path but "),
    # jsonargparse: the offending value of a Union dump
    "given_value": re.compile(r"^Given value: (.*)$"),
    # jsonargparse: "Expected a <class 'int'>" → "expected int"
    "expected_class": re.compile(r"Expected a <class '(\w+)'>\.?"),
    # jsonargparse: "Expected a typing.Literal['a', 'b']" (a setting with fixed choices) → "must be one of [...]"
    "expected_literal": re.compile(r"Expected a typing\.Literal\[(.*?)\]\.?"),
    # jsonargparse: the value at the end of a type error
    "got_value": re.compile(r"\.? Got value: (.+)$"),
    # Lightning: accelerator "gpu" / "cuda" on a machine without one
    "no_gpu_backend": re.compile(r"No supported gpu backend found"),
    "cuda_unavailable": re.compile(r"CUDA\w*`? can not run on your system"),
    # torch: an error raised in a DataLoader worker and re-raised in the main process
    "worker_traceback": re.compile(r"Original Traceback \(most recent call last\):"),
    # CPython: the exception class before the message in a re-raised traceback's last line
    "exception_prefix": re.compile(r"^[\w.]+(?:Error|Exception): "),
    # CPython: a TypeError about a call's arguments (a setting of the wrong kind), not an internal one
    "call_arguments": re.compile(r"got an unexpected keyword argument"),
}
#: the dump lines of :data:`LIBRARY_MESSAGES` dropped from a message
_NOISE = ("union_header", "union_subtypes", "union_errors", "union_given_type", "union_not_none", "union_not_a_path")
_M = LIBRARY_MESSAGES

_GPU_HINT = ("this config asks for a GPU but none is available; to run it on the CPU add "
             "--trainer.accelerator cpu --trainer.devices 1 --trainer.strategy auto --trainer.precision 32-true "
             "(or bf16-mixed)")
#: exception types a command ends with on a user's mistake (when not already a UserError)
_USER_ERRORS = (ValueError, OSError, KeyError, FloatingPointError, ImportError, TypeError)
#: the same for other libraries' types, by name (none of them needs importing to be recognised)
_USER_ERROR_NAMES = {"ArgumentError", "MisconfigurationException", "UnpicklingError", "BadZipFile"}


def unwrap_error_text(text: str) -> str:
    """jsonargparse's Union / nested-class dumps (and any multi-line message) → the sentence that
    matters, on one line.

    Args:
        text: the error message.
    """
    if _M["worker_traceback"].search(text):  # re-raised from a DataLoader worker: its last line is the error
        text = _M["exception_prefix"].sub("", [ln for ln in text.strip().splitlines() if ln.strip()][-1])
    lines = []
    for raw in text.splitlines():
        line = raw.strip().removeprefix("- ")  # list items of a dump
        given = _M["given_value"].match(line)
        if given:  # keep a short offending value, drop object dumps
            value = given.group(1).strip()
            if len(value) < 60 and not value.startswith(("Namespace", "NestedArg", "{", "[")):
                lines.append(f"(got {value})")
            continue
        if line and not any(_M[name].match(line) for name in _NOISE):
            lines.append(line)
    out = " ".join(lines).replace("Parser key ", "key ")
    out = _M["expected_class"].sub(r"expected \1", out)
    out = _M["expected_literal"].sub(r"must be one of [\1]", out)
    return _M["got_value"].sub(r" (got \1)", out)


def describe_error(err: BaseException, broken_install: Callable[[BaseException], str | None] | None = None) -> str | None:
    """The one line a user sees for ``err``, or None when it is not a user mistake (a bug: the
    traceback is shown).

    Args:
        err: the exception that ended the command.
        broken_install: names a library that failed while it was imported (None for this exception and
            the ones it was raised from), see :func:`agentlit.environment.import_failure`.
    """
    text = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
    for cause in _chain(err):  # raised at the source, already phrased (also when jsonargparse wrapped it)
        if isinstance(cause, UserError):
            return unwrap_error_text(str(cause))
    if _M["no_gpu_backend"].search(text) or _M["cuda_unavailable"].search(text):
        return _GPU_HINT
    if isinstance(err, ModuleNotFoundError) and err.name and not _installed_top(err.name):
        return f"this command needs the package '{err.name}', which is not installed: pip install {err.name}"
    for cause in _chain(err) if broken_install is not None else ():  # e.g. diffusers failing on first use
        broken = broken_install(cause)
        if broken is not None:
            return broken
    if isinstance(err, _USER_ERRORS) or {k.__name__ for k in type(err).__mro__} & _USER_ERROR_NAMES:
        if isinstance(err, TypeError) and not _M["worker_traceback"].search(text) and not _M["call_arguments"].search(text):
            return None
        return unwrap_error_text(text) or type(err).__name__
    return None


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


# ------------------------------------------------------------------------------------------ parse errors
def explain_parse_error(text: str, options: Sequence[str], config_files: Sequence[str],
                        params_of: Callable[[str], list[str]]) -> str:
    """One line for a jsonargparse parse error, with the closest valid name for an unknown one.

    Args:
        text: the parser's message.
        options: every ``--a.b`` option of the sub-command being parsed.
        config_files: the ``--config`` files given.
        params_of: the settings a class path takes (for "did you mean").
    """
    m = _M["unknown_init_arg"].search(unwrap_error_text(text))
    if m:
        group, class_path, key = m.groups()
        valid = params_of(class_path)
        close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
        hint = f"did you mean --{group}.{close[0]}? " if close else ""
        return f"--{group}.{key}: {class_path} has no argument '{key}'; {hint}valid: {', '.join(valid)}"
    m = _M["unknown_class"].search(text)
    if m:
        group, class_path, module, name = m.groups()
        names = _public_classes(module)
        close = difflib.get_close_matches(name, names, n=1, cutoff=0.5)
        return (f"--{group} {class_path}: {module} has no class '{name}'; "
                + (f"did you mean {module}.{close[0]}? " if close else "") + (f"available: {', '.join(names)}" if names else ""))
    m = _M["unrecognized_arguments"].search(text)
    if m:
        bad = [a for a in shlex.split(m.group(1)) if a.startswith("--")] or [m.group(1).split()[0]]
        key = bad[0].split("=", 1)[0]
        close = difflib.get_close_matches(key, options, n=1, cutoff=0.6)
        return f"unknown option {key}" + (f"; did you mean {close[0]}?" if close else "; see `agentlit <sub-command> --help`")
    m = _M["invalid_yaml"].search(text)
    if m:
        bad = [c for c in config_files if _yaml_error(c)]
        where = f"--config {bad[0]}" if bad else "a --config file"
        return f"{where} is not valid YAML: " + " ".join(m.group(1).replace('in "<unicode string>", ', "").split())
    m = _M["option_not_accepted"].search(text)
    if m:
        key = m.group(1)
        close = difflib.get_close_matches("--" + key, options, n=1, cutoff=0.6)
        return f"unknown key '{key}' in the config" + (f"; did you mean '{close[0][2:]}'?" if close else "")
    return unwrap_error_text(text)


def _public_classes(module: str) -> list[str]:
    import importlib

    try:
        mod = importlib.import_module(module)
    except ImportError:
        return []
    return [n for n in getattr(mod, "__all__", dir(mod)) if n[:1].isupper()]


def _yaml_error(path: str) -> bool:
    import yaml

    try:
        yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return True
    return False
