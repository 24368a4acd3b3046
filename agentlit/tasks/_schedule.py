"""Learning-rate multipliers shared by the tasks (used with ``torch.optim.lr_scheduler.LambdaLR``)."""
from __future__ import annotations

import math
from typing import Callable

__all__ = ["warmup_cosine", "warmup_poly"]


def _warmup(step: int, warmup_steps: int, warmup_factor: float) -> float:
    return warmup_factor + (1.0 - warmup_factor) * step / warmup_steps


def warmup_cosine(
    total_steps: int,
    warmup_steps: int = 0,
    warmup_factor: float = 1e-3,
    min_factor: float = 0.0,
    warmup_prefix: bool = True,
) -> Callable[[int], float]:
    """Linear warm-up from ``warmup_factor`` to 1, cosine decay to ``min_factor`` at ``total_steps``, then flat.

    Steps past ``total_steps`` stay at ``min_factor``: training for longer than the cosine gives the
    cool-down phase of timm's scheduler (``cooldown_epochs``), which the PVT and CSwin recipes use.

    Args:
        total_steps: length of the cosine in steps, warm-up included (the cool-down comes after it).
        warmup_steps: linear warm-up length in steps.
        warmup_factor: multiplier at step 0 (warm-up lr / peak lr).
        min_factor: multiplier at the end of the cosine and during the cool-down (min lr / peak lr).
        warmup_prefix: True: the cosine starts where the warm-up ends (progress ``(t - warmup) / (total - warmup)``);
            False: timm's ``CosineLRScheduler`` default, used by the paper's release: the cosine is a function of the
            absolute step, ``0.5 (1 + cos(pi t / total))``, and the warm-up replaces its first ``warmup_steps``.
    """

    def factor(step: int) -> float:
        if step < warmup_steps:
            return _warmup(step, warmup_steps, warmup_factor)
        if warmup_prefix:
            progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        else:
            progress = step / max(1, total_steps)
        progress = min(1.0, progress)
        return min_factor + (1.0 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def warmup_poly(total_steps: int, warmup_steps: int = 0, warmup_factor: float = 1e-6, power: float = 1.0, min_factor: float = 0.0) -> Callable[[int], float]:
    """Linear warm-up, then polynomial decay ``(1 - t)^power`` to ``min_factor`` (segmentation schedules)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return _warmup(step, warmup_steps, warmup_factor)
        progress = min(1.0, step / max(1, total_steps))
        return min_factor + (1.0 - min_factor) * (1.0 - progress) ** power

    return factor
