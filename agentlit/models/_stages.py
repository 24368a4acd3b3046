"""Per-stage settings of the hierarchical families (PVT, Swin, CSwin): one spec, one entry per stage;
and how a stage runs its blocks (with or without gradient checkpointing)."""
from __future__ import annotations

from typing import Any, Iterable, Sequence

import torch
from timm.models import checkpoint
from torch import Tensor, nn

__all__ = ["expand_attn_types", "per_stage", "run_blocks"]


def expand_attn_types(attn_type: str | Sequence[str], depths: Sequence[int]) -> list[list[str]]:
    """Per-block attention letters from a per-stage spec such as ``"AAAB"`` or ``"AAMB2"``.

    ``A`` = agent, ``B`` = the baseline's attention, ``M`` = mixed: the first k blocks of the stage
    agent and the rest baseline (k = the trailing number, 2 by default, as in the official "AAMB2").

    Args:
        attn_type: one letter per stage (a string or a sequence of letters), optionally followed by k.
        depths: blocks per stage.
    """
    spec = "".join(attn_type) if not isinstance(attn_type, str) else attn_type
    letters, tail = spec[: len(depths)], spec[len(depths):]
    if len(letters) != len(depths) or set(letters) - set("ABM") or (tail and not tail.isdigit()):
        raise ValueError(
            f"attn_type={attn_type!r} must be one letter per stage from A (agent), B (baseline), "
            f"M (mixed) for {len(depths)} stages, optionally followed by the mixed agent-block count, e.g. 'AAMB2'"
        )
    mixed = int(tail) if tail else 2
    return [
        ["A" if c == "A" or (c == "M" and j < mixed) else "B" for j in range(d)] for c, d in zip(letters, depths)
    ]


def per_stage(value: Any, n: int, what: str) -> list[Any]:
    """An int/pair for all stages, or one entry per stage (``"9-16-49-49"`` strings too).

    Args:
        value: one value for every stage, a (ph, pw) pair, a per-stage sequence or a dash-separated string.
        n: number of stages.
        what: the argument's name, for the error message.
    """
    if isinstance(value, str):
        value = [int(v) for v in value.split("-")]
    is_pair = isinstance(value, (tuple, list)) and len(value) == 2 and n != 2 and all(isinstance(v, int) for v in value)
    if isinstance(value, int) or is_pair:  # one value (or one (ph, pw) grid) for every stage
        return [value] * n
    value = list(value)
    if len(value) != n:
        raise ValueError(f"{what}={value!r} needs one entry per stage ({n}), e.g. [9, 16, 49, 49]")
    return value


def run_blocks(blocks: Iterable[nn.Module], x: Tensor, feat_size: tuple[int, int], grad_checkpointing: bool) -> Tensor:
    """Blocks called as ``blk(x, feat_size)`` in order: x (B, h·w, C) → (B, h·w, C).

    With ``grad_checkpointing`` each block keeps only its input for backward and recomputes its
    activations there (timm's non-reentrant ``checkpoint``, random draws replayed), trading one more
    block forward for the memory of its activations. Without autograd recording (``no_grad``,
    inference) there is nothing to save, so blocks run plainly.

    Args:
        blocks: the stage's blocks.
        x: tokens (B, h·w, C).
        feat_size: (h, w) of the token map.
        grad_checkpointing: recompute each block's activations in backward instead of storing them.
    """
    recompute = grad_checkpointing and torch.is_grad_enabled()
    for blk in blocks:
        x = checkpoint(blk, x, feat_size) if recompute else blk(x, feat_size)
    return x
