"""Recomputation instead of storage: tensors the backward pass rebuilds rather than keeps.

A tensor computed cheaply from what stays alive anyway (position biases from their parameters, a
LayerNorm output from the block input its norm keeps) can carry a recipe, ``fn()[index]`` returning
it again. Ops that honour recipes keep the recipe for their backward pass instead of the tensor:

- :func:`agentlit.core.fused.agent_attention_fused` for its biases;
- :class:`RecomputingLinear` for its input (a ``nn.Linear`` with the same parameters and names).

Eager mode only (the recipe is a Python attribute on the tensor); everywhere else the tensor is
used, and kept, as usual.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["RecomputingLinear", "mark_recomputable", "rebuild", "rebuild_norm_later", "recipe_of"]

_RECIPE = "_agentlit_recompute"  # attribute on a tensor: (fn, index), fn() rebuilds it as fn()[index]
Recipe = Tuple[Callable[[], Sequence[Optional[Tensor]]], int]


def mark_recomputable(fn: Callable[[], Sequence[Optional[Tensor]]], *tensors: Optional[Tensor]) -> None:
    """Let recipe-aware ops rebuild ``tensors`` in the backward pass instead of keeping them.

    ``fn()`` must return the same values again (``tensors[i] == fn()[i]``) from tensors that stay
    alive until then (parameters; inputs that other ops keep anyway).

    Args:
        fn: rebuilds the tensors; called under ``torch.no_grad()``, once per backward pass of an op.
        tensors: the tensors ``fn`` returns, in its order (None entries are skipped).
    """
    for i, t in enumerate(tensors):
        if t is not None:
            setattr(t, _RECIPE, (fn, i))


def recipe_of(t: Optional[Tensor]) -> Optional[Recipe]:
    """The (fn, index) :func:`mark_recomputable` attached to ``t``, or None."""
    return None if t is None else getattr(t, _RECIPE, None)


def rebuild(recipe: Recipe) -> Tensor:
    """The tensor a recipe stands for, rebuilt without recording autograd."""
    fn, index = recipe
    with torch.no_grad():
        out = fn()[index]
    assert out is not None
    return out


class _LinearRebuildingInput(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Optional[Tensor], recipe: Recipe) -> Tensor:
        ctx.recipe, ctx.has_bias = recipe, bias is not None
        ctx.save_for_backward(weight)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, grad: Tensor):  # noqa: ANN205
        (weight,) = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        g = grad.reshape(-1, grad.shape[-1])
        dx = torch.mm(g, weight).view(*grad.shape[:-1], weight.shape[1]) if need_x else None
        dw = None
        if need_w:
            x = rebuild(ctx.recipe)
            dw = torch.mm(g.t(), x.reshape(-1, x.shape[-1]))
        db = g.sum(0) if ctx.has_bias and need_b else None
        return dx, dw, db, None


class RecomputingLinear(nn.Linear):
    """``nn.Linear`` that, given an input with a recipe, rebuilds it for the weight gradient instead of
    keeping it (same parameters, names and results)."""

    def forward(self, x: Tensor) -> Tensor:
        if not torch.jit.is_scripting() and torch.is_grad_enabled():
            recipe = _recipe(x)
            if recipe is not None:
                return _apply_rebuilding(x, self.weight, self.bias, recipe)
        return F.linear(x, self.weight, self.bias)


@torch.jit.unused
def _recipe(x: Tensor) -> Optional[Recipe]:
    return recipe_of(x)


@torch.jit.unused
def _apply_rebuilding(x: Tensor, weight: Tensor, bias: Optional[Tensor], recipe: Recipe) -> Tensor:
    return _LinearRebuildingInput.apply(x, weight, bias, recipe)


@torch.jit.unused
def rebuild_norm_later(norm: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """Mark ``y = norm(x)`` so a :class:`RecomputingLinear` reading it rebuilds it in the backward pass
    (the norm keeps ``x`` for its own backward anyway): a block's attention then keeps no copy of
    its normalised input. Returns ``y``.

    Args:
        norm: the normalisation layer that produced ``y`` (a LayerNorm: cheap to run again).
        x: its input.
        y: its output, possibly reshaped (it is rebuilt in ``y``'s shape).
    """
    if torch.is_grad_enabled():
        shape = y.shape
        mark_recomputable(lambda: (norm(x).reshape(shape),), y)
    return y
