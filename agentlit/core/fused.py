"""The CPU agent-attention operator: agent-major broadcast step and a hand-written backward.

Same quantity as :func:`agentlit.core.agent_attention_reference` (q (B, H, N, d), k/v (B, H, M, d),
agents (B, H, n, d), n << N, M)::

    V_A = softmax(s · A Kᵀ + B1) V            # aggregation: n agents read the M keys, (B, H, n, d)
    O   = softmax(bs · Q Aᵀ + B2) V_A          # broadcast: every query reads the n agents, (B, H, N, d)

Why not two ``scaled_dot_product_attention`` calls (what CUDA and TorchScript run):

- **Short softmax rows.** The broadcast softmax runs over only n agents (9 in Agent-Swin's first
  stage), and a softmax along a short last axis is an order of magnitude slower per element on the CPU
  than along a long one. Here the broadcast logits are built agent-major, P2ᵀ = softmax over agents
  of (bs·A Qᵀ + B2ᵀ) with shape (H, n, N), so the reduction runs across n rows with the N tokens
  vectorised, and O = P2 V_A is one matmul with a transposed operand. B2 is built agent-major anyway
  (:meth:`~agentlit.core.AgentPositionBias.position_biases`), so nothing is transposed.
- **Training memory.** Learned biases make SDPA fall back to its math path, which stores both
  attention maps, (B, H, n, M) and (B, H, N, n), plus copies of Q, K and V. Here the backward keeps
  only Q, K, V (views of the layer's qkv projection, stored anyway), the agents and V_A, (B, H, n, d)
  each, and recomputes the two maps, which costs two of the forward's four products (of the cheap
  O(N·n·d) kind). Biases built from parameters alone (:func:`mark_recomputable`) are not kept either:
  the backward rebuilds them, so a layer stores no (n × N) tensor at all.
- **No layout copies.** The loops run over the batch, each step a batched matmul over heads on
  strided views of Q, K and V (every head matrix has a unit last stride), writing into token-major
  (B, N, H, d) buffers, so the output and the gradients of Q, K and V need no transposing copy.

The aggregation step of the forward pass is one SDPA call (its rows are long: M keys). Gradients
follow the softmax rule dS = P ⊙ (dP − Σ P ⊙ dP) and are checked against autograd of the naive
reference (tests/test_fused.py).
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["agent_attention_fused", "mark_recomputable", "supports_fused"]

_RECIPE = "_agentlit_recompute"  # attribute on a tensor: (fn, index), fn() rebuilds it as fn()[index]


def mark_recomputable(fn: Callable[[], Sequence[Optional[Tensor]]], *tensors: Optional[Tensor]) -> None:
    """Let :func:`agent_attention_fused` rebuild ``tensors`` in the backward pass instead of keeping them.

    ``fn()`` must return the same values again (``tensors[i] == fn()[i]``): tensors computed from
    parameters alone, such as position biases. Eager mode only (a Python attribute on the tensors).

    Args:
        fn: rebuilds the tensors; called under ``torch.no_grad()``, once per backward pass.
        tensors: the tensors ``fn`` returns, in its order (None entries are skipped).
    """
    for i, t in enumerate(tensors):
        if t is not None:
            setattr(t, _RECIPE, (fn, i))


def recipe_of(t: Optional[Tensor]) -> Optional[Tuple[Callable[[], Sequence[Optional[Tensor]]], int]]:
    """The (fn, index) :func:`mark_recomputable` attached to ``t``, or None."""
    return None if t is None else getattr(t, _RECIPE, None)


def supports_fused(q: Tensor, dropout_p: float) -> bool:
    """Whether :func:`agent_attention_fused` serves this call: eager CPU tensors, no attention dropout
    (``torch.compile`` traces the SDPA path instead, whose graph its compiler fuses itself)."""
    return q.device.type == "cpu" and dropout_p == 0.0 and not torch.compiler.is_compiling()


def _as_4d(t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    """A bias broadcastable to (B, H, ·, ·) as a 4-D tensor of ``dtype`` (leading size-1 axes added)."""
    if t is None:
        return None
    t = t.to(dtype)
    return t if t.dim() == 4 else t.reshape((1,) * (4 - t.dim()) + tuple(t.shape))


def _pick(t: Optional[Tensor], i: int) -> Optional[Tensor]:
    """Batch element ``i`` of a tensor that is per-batch (B, …) or shared (1, …)."""
    return None if t is None else t[0 if t.shape[0] == 1 else i]


def _aggregation_probs(a: Tensor, k: Tensor, b1: Optional[Tensor], s: float) -> Tensor:
    """P1 = softmax over keys of s·A Kᵀ + B1 for one batch element: a (H, n, d), k (H, M, d) → (H, n, M)."""
    if b1 is None:
        return torch.softmax(torch.bmm(a, k.transpose(1, 2)).mul_(s), -1)
    return torch.softmax(torch.baddbmm(b1, a, k.transpose(1, 2), alpha=s), -1)


def _broadcast_probs_t(a: Tensor, q: Tensor, b2t: Optional[Tensor], bs: float) -> Tensor:
    """P2ᵀ = softmax over agents of bs·A Qᵀ + B2ᵀ for one batch element: a (H, n, d), q (H, N, d) → (H, n, N)."""
    if b2t is None:
        return torch.softmax(torch.bmm(a, q.transpose(1, 2)).mul_(bs), -2)
    return torch.softmax(torch.baddbmm(b2t, a, q.transpose(1, 2), alpha=bs), -2)


def _forward(q: Tensor, k: Tensor, v: Tensor, a: Tensor, b1: Optional[Tensor], b2t: Optional[Tensor],
             s: float, bs: float) -> Tuple[Tensor, Tensor]:
    """(O in token-major memory (B, N, H, d), V_A (B, H, n, d))."""
    B, H, N, d = q.shape
    # detached: SDPA leaves its fused kernel for the math path when the mask requires grad
    mask = None if b1 is None else b1.detach()
    agent_v = F.scaled_dot_product_attention(a.detach(), k.detach(), v.detach(), attn_mask=mask, scale=s)  # (B, H, n, d)
    out = torch.empty(B, N, H, d, dtype=q.dtype, device=q.device)
    for i in range(B):
        p2t = _broadcast_probs_t(a[i], q[i], _pick(b2t, i), bs)  # (H, n, N)
        torch.bmm(p2t.transpose(1, 2), agent_v[i], out=out[i].transpose(0, 1))  # (H, N, d) into (N, H, d)
    return out, agent_v


def _softmax_backward_(p: Tensor, dp: Tensor, dim: int) -> Tensor:
    """dS = P ⊙ (dP − Σ_dim P ⊙ dP), written into ``dp``."""
    return dp.sub_((dp * p).sum(dim, keepdim=True)).mul_(p)


def _accumulate(grad: Optional[Tensor], i: int, value: Tensor) -> None:
    """Add one batch element's bias gradient into ``grad`` (per-batch or shared, broadcast dims summed)."""
    if grad is None:
        return
    target = grad[0 if grad.shape[0] == 1 else i]
    target.add_(value if value.shape == target.shape else value.sum_to_size(target.shape))


class _AgentAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor, a: Tensor, b1: Optional[Tensor], b2t: Optional[Tensor],
                s: float, bs: float, recipes: Tuple[Any, Any]) -> Tensor:
        out, agent_v = _forward(q, k, v, a, b1, b2t, s, bs)
        ctx.recipes = recipes
        kept = [None if r is not None else t for t, r in zip((b1, b2t), recipes)]  # rebuilt ones are not kept
        ctx.bias_shapes = (None if b1 is None else b1.shape, None if b2t is None else b2t.shape)
        ctx.save_for_backward(q, k, v, a, agent_v, *kept)
        ctx.s, ctx.bs = s, bs
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor):  # noqa: ANN205
        q, k, v, a, agent_v, b1, b2t = ctx.saved_tensors
        rebuilt: dict[int, Sequence[Optional[Tensor]]] = {}
        biases = [b1, b2t]
        for j, recipe in enumerate(ctx.recipes):
            if recipe is not None:
                fn, index = recipe
                if id(fn) not in rebuilt:
                    with torch.no_grad():
                        rebuilt[id(fn)] = fn()
                biases[j] = _as_4d(rebuilt[id(fn)][index], q.dtype)
                if j == 1:
                    biases[j] = biases[j].transpose(-1, -2)  # as the forward pass saw it
        b1, b2t = biases
        s, bs = ctx.s, ctx.bs
        B, H, N, d = q.shape
        M = k.shape[2]
        need_q, need_k, need_v, need_a, need_b1, need_b2 = ctx.needs_input_grad[:6]
        g = grad_out.transpose(1, 2)  # (B, H, N, d) view of the token-major gradient
        kw = dict(dtype=q.dtype, device=q.device)
        dq = torch.empty(B, N, H, d, **kw)
        dk = torch.empty(B, M, H, d, **kw)
        dv = torch.empty(B, M, H, d, **kw)
        da = torch.empty_like(a)
        db1 = torch.zeros(ctx.bias_shapes[0], **kw) if need_b1 else None
        db2t = torch.zeros(ctx.bias_shapes[1], **kw) if need_b2 else None
        for i in range(B):
            qi, ki, vi, ai, gi, vai = q[i], k[i], v[i], a[i], g[i], agent_v[i]
            # broadcast step, agent-major: O = P2 V_A, P2ᵀ (H, n, N)
            p2t = _broadcast_probs_t(ai, qi, _pick(b2t, i), bs)
            dva = torch.bmm(p2t, gi)  # (H, n, d)
            ds2t = _softmax_backward_(p2t, torch.bmm(vai, gi.transpose(1, 2)), -2)  # (H, n, N)
            _accumulate(db2t, i, ds2t)
            torch.bmm(ds2t.transpose(1, 2), ai, out=dq[i].transpose(0, 1)).mul_(bs)
            dai = torch.bmm(ds2t, qi).mul_(bs)  # (H, n, d)
            del p2t, ds2t
            # aggregation step: V_A = P1 V, P1 (H, n, M)
            p1 = _aggregation_probs(ai, ki, _pick(b1, i), s)
            torch.bmm(p1.transpose(1, 2), dva, out=dv[i].transpose(0, 1))
            ds1 = _softmax_backward_(p1, torch.bmm(dva, vi.transpose(1, 2)), -1)  # (H, n, M)
            _accumulate(db1, i, ds1)
            torch.baddbmm(dai, ds1, ki, alpha=s, out=da[i])
            torch.bmm(ds1.transpose(1, 2), ai, out=dk[i].transpose(0, 1)).mul_(s)
        grads = (dq.transpose(1, 2) if need_q else None, dk.transpose(1, 2) if need_k else None,
                 dv.transpose(1, 2) if need_v else None, da if need_a else None, db1, db2t)
        return (*grads, None, None, None)


def agent_attention_fused(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    agents: Tensor,
    agent_bias: Optional[Tensor],
    query_bias: Optional[Tensor],
    scale: float,
    broadcast_scale: float,
) -> Tensor:
    """Agent attention on head-split tensors, returned in token-major memory.

    Args:
        q: queries (B, H, N, d), any strides with a unit last stride (views of a qkv projection).
        k: keys (B, H, M, d), likewise.
        v: values (B, H, M, d), likewise.
        agents: agent tokens (B, H, n, d).
        agent_bias: B1 broadcastable to (B, H, n, M), or None.
        query_bias: B2 broadcastable to (B, H, N, n), or None; fastest as the transposed view of an
            agent-major (·, H, n, N) tensor (what the bias modules return).
        scale: s of the aggregation step.
        broadcast_scale: bs of the broadcast step.

    Returns:
        (B, N, H, d): O token-major (``.transpose(1, 2)`` is the (B, H, N, d) result, ``.reshape(B, N, H·d)``
        the merged heads, both without a copy).
    """
    if q.dtype not in (torch.float32, torch.float64):
        # half types: logits and softmaxes in float32 (bf16 rounds logits of order 1e3 to whole units)
        with torch.autocast("cpu", enabled=False):
            out = agent_attention_fused(q.float(), k.float(), v.float(), agents.float(), agent_bias, query_bias,
                                        scale, broadcast_scale)
        return out.to(q.dtype)
    recipes = (recipe_of(agent_bias), recipe_of(query_bias))
    agent_bias = _as_4d(agent_bias, q.dtype)
    b2t = None if query_bias is None else _as_4d(query_bias, q.dtype).transpose(-1, -2)
    if agents.stride(-1) != 1:
        agents = agents.contiguous()
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                       for t in (q, k, v, agents, agent_bias, b2t)):
        return _AgentAttentionFunction.apply(q, k, v, agents, agent_bias, b2t, scale, broadcast_scale, recipes)
    return _forward(q, k, v, agents, agent_bias, b2t, scale, broadcast_scale)[0]
