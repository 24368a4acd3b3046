"""The exponential moving average of a model's weights, one rule for every task that keeps one."""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["ema_update"]


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, step: int, max_decay: float) -> None:
    """One EMA step after an optimizer step: ``ema ← decay·ema + (1 − decay)·model``, buffers copied.

    The decay warms up as in timm's ModelEmaV3, ``min(max_decay, (1 + step) / (10 + step))``, so an
    EMA read early in training is not dominated by the initial weights.

    Args:
        ema: the averaged copy (same architecture as ``model``).
        model: the trained module.
        step: optimizer steps completed before this one (the trainer's ``global_step``).
        max_decay: the decay once warmed up, e.g. 0.9999.
    """
    decay = min(max_decay, (1 + step) / (10 + step))
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach(), 1.0 - decay)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)
