"""Every piece of another library's message text agentlit recognises (agentlit.errors.LIBRARY_MESSAGES)
is provoked here with the installed library, so a rewording upstream fails a test instead of silently
turning a one-line error into a dump. Mistakes agentlit can detect itself raise its own UserError at the
source and are not matched by text at all.
"""
from __future__ import annotations

from pathlib import Path
from unittest import mock

import pytest
import torch
from cli_helpers import QUICKSTART, SEG_CONFIG

from agentlit.errors import LIBRARY_MESSAGES, ConfigError, UserError, describe_error, unwrap_error_text


def _parse_error(tmp_path: Path, *args: str, yaml: str | None = None, config: str = QUICKSTART) -> str:
    """jsonargparse's own message for a command line (the cause of agentlit's ConfigError)."""
    from agentlit.cli import cli

    if yaml is not None:
        (tmp_path / "extra.yaml").write_text(yaml)
        args = (*args, "--config", str(tmp_path / "extra.yaml"))
    with pytest.raises(ConfigError) as info:
        cli(["--config", config, *args, "--trainer.default_root_dir", str(tmp_path)], run=False)
    assert info.value.__cause__ is not None
    return str(info.value.__cause__)


def _gpu_error(accelerator: str) -> str:
    """Lightning's message for an accelerator the machine lacks (availability patched: same on any machine)."""
    import lightning as L
    from lightning.pytorch.accelerators import CUDAAccelerator, MPSAccelerator

    never = staticmethod(lambda: False)
    with mock.patch.object(CUDAAccelerator, "is_available", never), mock.patch.object(MPSAccelerator, "is_available", never):
        with pytest.raises(Exception) as info:
            L.Trainer(accelerator=accelerator, logger=False)
    return str(info.value)


class _Broken(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int):
        raise ValueError("cannot read image 0.png: truncated")


def _worker_error() -> str:
    """torch's re-raise, in the main process, of an error raised in a DataLoader worker."""
    with pytest.raises(ValueError) as info:
        next(iter(torch.utils.data.DataLoader(_Broken(), num_workers=1)))
    return str(info.value)


def _call_error() -> str:
    """CPython's TypeError for a setting a network does not take (model_kwargs reach the model class)."""
    from agentlit.tasks.networks import TimmClassifier

    with pytest.raises(TypeError) as info:
        TimmClassifier("agent_deit_tiny", model_kwargs={"depht": 2})
    return str(info.value)


#: name of a LIBRARY_MESSAGES entry -> how to provoke the library's message
PROVOKE = {
    "unknown_init_arg": lambda t: _parse_error(t, "--model.drop_path", "0.1"),
    "unknown_class": lambda t: _parse_error(t, "--model", "agentlit.tasks.ClassificationModul"),
    "unrecognized_arguments": lambda t: _parse_error(t, "--trainer.max_epocs", "1"),
    "option_not_accepted": lambda t: _parse_error(t, yaml="trainer:\n  max_epoch: 3\n"),
    "invalid_yaml": lambda t: _parse_error(t, yaml="trainer: [unclosed\n"),
    "union_header": lambda t: _parse_error(t, "--model.num_classes", "abc"),
    "union_subtypes": lambda t: _parse_error(t, "--model.num_classes", "abc"),
    "union_errors": lambda t: _parse_error(t, "--model.num_classes", "abc"),
    "union_given_type": lambda t: _parse_error(t, "--model.num_classes", "abc"),
    "union_not_none": lambda t: _parse_error(t, "--model.num_classes", "abc"),
    "union_not_a_path": lambda t: _parse_error(t, "--model", "agentlit.tasks.ClassificationModul"),
    "given_value": lambda t: _parse_error(t, "--model", "agentlit.tasks.ClassificationModul"),
    "expected_class": lambda t: _parse_error(t, "--model.num_classes", "abc"),
    "expected_literal": lambda t: _parse_error(t, "--model.inference", "slid", config=SEG_CONFIG),
    "got_value": lambda t: _parse_error(t, "--model.num_classes", "abc"),
    "no_gpu_backend": lambda t: _gpu_error("gpu"),
    "cuda_unavailable": lambda t: _gpu_error("cuda"),
    "worker_traceback": lambda t: _worker_error(),
    "exception_prefix": lambda t: _worker_error().strip().splitlines()[-1],
    "call_arguments": lambda t: _call_error(),
}


def test_every_library_pattern_has_a_provocation():
    assert set(PROVOKE) == set(LIBRARY_MESSAGES)


@pytest.mark.parametrize("name", sorted(LIBRARY_MESSAGES))
def test_the_installed_library_still_says_it(name, tmp_path):
    text = PROVOKE[name](tmp_path)
    lines = [ln.strip().removeprefix("- ") for ln in text.splitlines()]  # dump patterns match one line of a dump
    assert LIBRARY_MESSAGES[name].search(text) or any(LIBRARY_MESSAGES[name].search(ln) for ln in lines), (name, text)


def test_what_the_user_reads_for_them(tmp_path):
    assert unwrap_error_text(_parse_error(tmp_path, "--model.num_classes", "abc")) == (
        "key \"model\": Problem with given class_path 'agentlit.tasks.ClassificationModule': key \"num_classes\": "
        "expected int (got abc)")
    assert unwrap_error_text(_parse_error(tmp_path, "--model.inference", "slid", config=SEG_CONFIG)).endswith(
        "key \"inference\": must be one of ['whole', 'slide'] (got slid)")
    assert describe_error(ValueError(_worker_error())) == "cannot read image 0.png: truncated"
    assert describe_error(TypeError(_call_error())).endswith("got an unexpected keyword argument 'depht'")
    assert describe_error(TypeError("unsupported operand type(s) for +: 'int' and 'str'")) is None  # a bug: traceback
    assert describe_error(Exception(_gpu_error("gpu"))).startswith("this config asks for a GPU but none is available")
    assert describe_error(UserError("one line\nand a second")) == "one line and a second"
