"""Learning-rate multipliers shared by the tasks (used with ``torch.optim.lr_scheduler.LambdaLR``)."""
from __future__ import annotations

import math
from typing import Callable

__all__ = ["warmup_cosine", "warmup_poly"]


def _warmup(step: int, warmup_steps: int, warmup_factor: float) -> float:
    return warmup_factor + (1.0 - warmup_factor) * step / warmup_steps


def warmup_cosine(total_steps: int, warmup_steps: int = 0, warmup_factor: float = 1e-3, min_factor: float = 0.0) -> Callable[[int], float]:
    """Linear warm-up from ``warmup_factor`` to 1, then cosine decay to ``min_factor`` at ``total_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return _warmup(step, warmup_steps, warmup_factor)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
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
