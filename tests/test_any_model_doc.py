"""docs/any-model.md: every Python block on the page runs as written, and shows what it says."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

DOC = Path(__file__).resolve().parents[1] / "docs" / "any-model.md"
BLOCKS = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)


def test_the_page_has_its_examples():
    assert len(BLOCKS) == 4


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_block_runs(index):
    torch.manual_seed(0)
    scope: dict = {}
    exec(compile(BLOCKS[index], f"{DOC.name} block {index}", "exec"), scope)
    if "logits" in scope:  # the text classifier
        assert scope["logits"].shape == (2, 2) and torch.isfinite(scope["logits"]).all()
    if "longer" in scope:  # the volume block
        assert scope["out"].shape == (2, 1568, 96) and scope["longer"].shape == (2, 784, 96)
    if "cross" in scope:
        assert scope["out"].shape == (2, 1024, 256) and not hasattr(scope["cross"], "an_bias")
    if "report" in scope:  # the conversions
        assert scope["report"].num_converted == 12 and scope["y"].shape == (2, 700, 256)
