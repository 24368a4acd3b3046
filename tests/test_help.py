"""``agentlit fit --help`` documents every option: each ``init_args`` of every task and DataModule
that ``agentlit.tasks`` / ``agentlit.data`` export (new ones included) has a help line, taken by
jsonargparse from the class's Google-style ``Args:`` section, one line per parameter."""
from __future__ import annotations

import importlib
import inspect
import pkgutil
import re

import lightning as L
import pytest

import agentlit.data
import agentlit.tasks


def _classes(package, base: type) -> list[type]:
    """What ``package.__all__`` exports, and every public ``base`` subclass defined in one of its modules
    (so a new task or DataModule is checked before it is exported). Bases without options are skipped."""
    found = {obj for name in package.__all__ if inspect.isclass(obj := getattr(package, name)) and issubclass(obj, base)}
    for info in pkgutil.iter_modules(package.__path__, package.__name__ + "."):
        module = importlib.import_module(info.name)
        found |= {obj for name, obj in vars(module).items() if inspect.isclass(obj) and issubclass(obj, base)
                  and obj.__module__ == module.__name__ and not name.startswith("_")}
    return sorted((c for c in found if _init_params(c)), key=lambda c: c.__name__)


def _init_params(cls: type) -> set[str]:
    return {n for n, p in inspect.signature(cls.__init__).parameters.items()
            if n != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


TASKS = _classes(agentlit.tasks, L.LightningModule)
DATA = _classes(agentlit.data, L.LightningDataModule)
CASES = [("model", c) for c in TASKS] + [("data", c) for c in DATA]


def _help_text(args: list[str], capsys) -> str:
    from agentlit.cli import cli

    with pytest.raises(SystemExit) as exit_info:
        cli(args, run=False)
    out = capsys.readouterr().out
    assert exit_info.value.code in (0, None), out
    return out


def _undocumented(text: str, prefix: str) -> tuple[list[str], list[str]]:
    """Options under ``--<prefix>.`` in a ``--<prefix>.help`` text: (those with no description, all)."""
    body = text.split("\nHelp for", 1)[1]
    entries = re.split(rf"\n  (?=--{re.escape(prefix)}\.)", body)[1:]
    missing, names = [], []
    for entry in entries:
        option = entry.split()[0]
        if option.endswith(".help"):
            continue
        names.append(option)
        desc = entry.split("(type:", 1)[0].replace(option, "", 1)
        desc = re.sub(r"\{[^}]*\}|\[[A-Z_,.]*\]|\b[A-Z][A-Z0-9_]*\b", "", desc)  # metavars and choices
        if not re.search(r"[a-z]{2}", desc):
            missing.append(option)
    return missing, names


def test_there_is_something_to_check():
    names = {c.__name__ for c in TASKS + DATA}
    assert {"ClassificationModule", "SegmentationModule", "GenerationModule"} <= names
    assert {"DigitsDataModule", "ImageFolderDataModule", "ShapesDataModule", "PromptDataModule"} <= names


@pytest.mark.parametrize("group,cls", CASES, ids=[c.__name__ for _, c in CASES])
def test_every_init_arg_has_a_help_line(group, cls, capsys):
    path = f"{cls.__module__}.{cls.__name__}"
    text = _help_text(["fit", f"--{group}.help", path], capsys)
    missing, names = _undocumented(text, group)
    listed = {n.split(".", 1)[1] for n in names if n.count(".") == 1}
    assert _init_params(cls) <= listed, f"options not in --help: {_init_params(cls) - listed}"
    assert not missing, f"{cls.__name__}: no help text for {missing}; add one `name: description` line per parameter to its Args section"
    # dataclass-typed options (e.g. GenerationModule's agentsd) have their own --<option>.help: every field too
    for name, dc in _dataclass_params(cls).items():
        sub_missing, sub_names = _undocumented(_parser_help(dc, name), name)
        assert sub_names and not sub_missing, f"{cls.__name__}.{name} ({dc.__name__}): no help text for {sub_missing}"


def _dataclass_params(cls: type) -> dict[str, type]:
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls.__init__)
    out = {}
    for name in _init_params(cls):
        for t in (hints.get(name), *typing.get_args(hints.get(name))):
            if inspect.isclass(t) and dataclasses.is_dataclass(t):
                out[name] = t
    return out


def _parser_help(cls: type, prefix: str) -> str:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(cls, prefix)
    return "x\nHelp for\n" + parser.format_help().split("\n\n", 1)[1]


GROUPED = re.compile(r"^\s+\w+(?:,\s*\w+)+\s*:", re.M)  # "a, b, c: ..." documents several parameters in one line


@pytest.mark.parametrize("cls", TASKS + DATA, ids=[c.__name__ for c in TASKS + DATA])
def test_args_sections_have_one_line_per_parameter(cls):
    for klass in cls.__mro__:
        if not klass.__module__.startswith("agentlit") or not klass.__doc__ or "Args:" not in klass.__doc__:
            continue
        args = klass.__doc__.split("Args:", 1)[1].split("\n\n", 1)[0]
        assert not GROUPED.findall(args), f"{klass.__name__}: grouped parameters {GROUPED.findall(args)}; one line each"


def test_the_checks_catch_a_grouped_line():
    class Bad(L.LightningDataModule):
        """Bad.

        Args:
            a, b: two at once.
        """

        def __init__(self, a: int = 1, b: int = 2) -> None:
            super().__init__()

    missing, names = _undocumented(_parser_help(Bad, "data"), "data")
    assert set(names) == {"--data.a", "--data.b"} and set(missing) == set(names)
    assert GROUPED.findall(Bad.__doc__)
