"""Recomputation instead of storage: tensors the backward pass rebuilds rather than keeps.

A tensor computed cheaply from what stays alive anyway (position biases from their parameters, a
LayerNorm output from the block input its norm keeps) can carry a recipe, ``fn()[index]`` returning
it again. Ops that honour recipes keep the recipe for their backward pass instead of the tensor:

- :func:`agentlit.core.fused.agent_attention_fused` for its biases;
- :class:`RecomputingLinear` and :class:`SplitLinear` for their input (``nn.Linear`` modules with the
  same parameters and names).

Eager mode only (the recipe is a Python attribute on the tensor); everywhere else the tensor is
used, and kept, as usual.
"""
# no ``from __future__ import annotations``: TorchScript reads the annotations of SplitLinear.forward

from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["RecomputingLinear", "SplitLinear", "mark_recomputable", "rebuild", "rebuild_norm_later", "recipe_of"]

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


class _SplitLinearFunction(torch.autograd.Function):
    """x Wᵀ + b cut into ``chunks`` equal parts along the features, each written dense by its own GEMM,
    so the parts come with no layout copy and their gradients need no stacking."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Optional[Tensor], chunks: int,
                recipe: Optional[Recipe]) -> Tuple[Tensor, ...]:
        lead, width = x.shape[:-1], weight.shape[0] // chunks
        x2d = x.reshape(-1, x.shape[-1])
        out = torch.empty(chunks, x2d.shape[0], width, dtype=x.dtype, device=x.device)
        for j in range(chunks):
            rows = slice(j * width, (j + 1) * width)
            if bias is None:
                torch.mm(x2d, weight[rows].t(), out=out[j])
            else:
                torch.addmm(bias[rows], x2d, weight[rows].t(), out=out[j])
        ctx.recipe, ctx.has_bias, ctx.chunks = recipe, bias is not None, chunks
        ctx.save_for_backward(weight, x if recipe is None else None)  # a marked input is rebuilt instead
        return tuple(out[j].view(*lead, width) for j in range(chunks))

    @staticmethod
    def backward(ctx: Any, *grads: Optional[Tensor]):  # noqa: ANN205
        weight, x = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        chunks, width = ctx.chunks, weight.shape[0] // ctx.chunks
        present = [(j, g.reshape(-1, width)) for j, g in enumerate(grads) if g is not None]
        if x is None and need_w:
            x = rebuild(ctx.recipe)
        dx = dw = db = None
        if need_x:
            for j, g in present:
                w_j = weight[j * width:(j + 1) * width]
                dx = torch.mm(g, w_j) if dx is None else dx.addmm_(g, w_j)
            if dx is None:
                dx = torch.zeros(*grads[0].shape[:-1] if grads[0] is not None else (), weight.shape[1])
            else:
                lead = next(g for g in grads if g is not None).shape[:-1]
                dx = dx.view(*lead, weight.shape[1])
        if need_w:
            x2d = x.reshape(-1, x.shape[-1])
            dw = torch.zeros_like(weight)
            for j, g in present:
                torch.mm(g.t(), x2d, out=dw[j * width:(j + 1) * width])
        if ctx.has_bias and need_b:
            db = torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)
            for j, g in present:
                torch.sum(g, 0, out=db[j * width:(j + 1) * width])
        return dx, dw, db, None, None


class SplitLinear(RecomputingLinear):
    """A ``nn.Linear`` whose output comes as ``chunks`` separate dense tensors (the features cut in
    equal parts): a fused qkv projection giving Q, K and V as (B, L, C) tensors with unit row stride,
    which depthwise convs, pooling and the agent op read without layout copies, and whose gradients
    reach the projection without being stacked. Same parameters, names and values as ``nn.Linear``
    followed by ``chunk``; a marked input is rebuilt rather than kept (:func:`mark_recomputable`).

    Args:
        in_features: input width.
        out_features: output width, divisible by ``chunks``.
        bias: learn an additive bias.
        chunks: number of equal parts.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, chunks: int = 3,
                 device: Any = None, dtype: Any = None) -> None:
        if out_features % chunks:
            raise ValueError(f"SplitLinear: out_features={out_features} is not divisible by chunks={chunks}")
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.chunks = chunks

    def forward(self, x: Tensor, dense: bool = False) -> List[Tensor]:  # type: ignore[override]
        """The parts of x Wᵀ + b, each (..., out_features / chunks).

        Args:
            x: (..., in_features).
            dense: write the parts dense without autograd too (one GEMM per part instead of one wide
                GEMM): worth it when a part is read as a map (a depthwise conv, the agent pooling), which
                a strided part would first copy.
        """
        if not torch.jit.is_scripting() and _split_eagerly(x, dense):
            return _apply_split(x, self.weight, self.bias, self.chunks)
        return list(F.linear(x, self.weight, self.bias).chunk(self.chunks, -1))


@torch.jit.unused
def _split_eagerly(x: Tensor, dense: bool = False) -> bool:
    # CPU eager float32/64, in training or when asked (``dense``): under autocast (half GEMMs) or
    # torch.compile the plain linear + chunk runs, and so it does without autograd unless asked, where
    # one wide GEMM beats three narrow ones when the strided parts cost nothing downstream (1% of
    # Agent-DeiT-T's inference at 896²; with a class token its map is a copy either way)
    return (x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)
            and (dense or torch.is_grad_enabled())
            and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling())


@torch.jit.unused
def _apply_split(x: Tensor, weight: Tensor, bias: Optional[Tensor], chunks: int) -> List[Tensor]:
    recipe = recipe_of(x) if torch.is_grad_enabled() else None
    return list(_SplitLinearFunction.apply(x, weight, bias, chunks, recipe))
