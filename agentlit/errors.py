"""agentlit's own exception type for user mistakes, and the one way a setting's choices are checked.

A mistake in what the user gave (a setting, a file, a checkpoint, a dataset) is detected where it
arises and raised as a :class:`UserError` (or a subclass: ``CheckpointError``, ``SettingsError``,
``ConfigError``, ``BadImageError``, ``ResumeError``) whose message is already the one line the user
should read: what is wrong, the bad value, and what would be valid. The CLI prints that line with
exit status 2 and no traceback, without parsing it.

This module imports nothing heavy: the CLI's error handling loads it before Lightning or torch.
"""
from __future__ import annotations

import types
import typing
from typing import Any

__all__ = ["UserError", "check_choice", "choices_of"]


class UserError(ValueError):
    """A mistake in the user's input, phrased as the one line the user sees.

    A ``ValueError``, so code that catches those (and tests written against them) keeps working.
    """


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
