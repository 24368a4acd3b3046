"""The agent-attention operator: two softmax attentions through a small set of agent tokens.

Two levels, both public:

- :func:`agent_attention_tokens`, the whole agent computation on projected tokens (B, N, C) that
  every host calls (:class:`~agentlit.core.AgentAttention`, the Agent-CSwin branch, the diffusers
  processor and the AgentSD patch): pool agents over the token layout → split heads → fold padding
  into the biases → the two softmax attentions → local term (depthwise conv on V and/or a V shortcut);
- :func:`agent_attention`, the two softmax attentions on head-split tensors, below.

Shapes (docs/reference.md §1): q (B, H, N, d); k, v (B, H, M, d); agents (B, H, n, d) with n << N, M.

    V_A = softmax(scale · A Kᵀ + B1) V          # agent aggregation, (B, H, n, d)
    O   = softmax(broadcast_scale · Q Aᵀ + B2) V_A   # agent broadcast,  (B, H, N, d)

On the CPU (eager, no attention dropout) both steps run in :mod:`agentlit.core.fused`: the broadcast
step agent-major, a hand-written backward that keeps no attention map and rebuilds the biases.
Elsewhere (CUDA, TorchScript, dropout) they go through ``scaled_dot_product_attention`` with the
biases as float masks, so whichever fused kernel the backend offers serves them. Nothing of size
N×M is ever built: the largest intermediate is (B, H, N, n).
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .fused import agent_attention_fused, channels_last_map, depthwise_conv, supports_fused

__all__ = [
    "LayoutSize", "agent_attention", "agent_attention_reference", "agent_attention_sdpa", "agent_attention_tokens",
    "as_sizes", "depthwise_local", "pool_agents",
]

#: A token layout: (L,) sequence, (h, w) map or (t, h, w) volume (a list works too).
LayoutSize = Union[Tuple[int], Tuple[int, int], Tuple[int, int, int], List[int]]


@torch.jit.unused
def _check_shapes(q: Tensor, k: Tensor, v: Tensor, agents: Tensor) -> None:
    for name, t in (("q", q), ("k", k), ("v", v), ("agents", agents)):
        if t.dim() != 4:
            raise ValueError(f"agent_attention: {name} must be 4-D (B, H, tokens, d), got shape {tuple(t.shape)}")
    if k.shape[:3] != v.shape[:3]:
        raise ValueError(f"agent_attention: k {tuple(k.shape)} and v {tuple(v.shape)} must share (B, H, M)")
    if q.shape[-1] != k.shape[-1] or agents.shape[-1] != q.shape[-1]:
        raise ValueError(
            "agent_attention: q, k and agents must share the head dim d, got "
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, agents {tuple(agents.shape)}"
        )


def _mask(bias: Optional[Tensor], like: Tensor) -> Optional[Tensor]:
    # SDPA wants the float mask in the query dtype; a bias kept in fp32 would otherwise be rejected
    # under autocast.
    return None if bias is None else bias.to(like.dtype)


def agent_attention_sdpa(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    agents: Tensor,
    agent_bias: Optional[Tensor],
    query_bias: Optional[Tensor],
    scale: float,
    broadcast_scale: float,
    dropout_p: float = 0.0,
) -> Tensor:
    """The two SDPA calls of :func:`agent_attention`, positional and TorchScript-compatible
    (no shape checks, no float16 upcast); shapes as there.

    Args:
        q: queries (B, H, N, d).
        k: keys (B, H, M, d).
        v: values (B, H, M, d).
        agents: agent tokens (B, H, n, d).
        agent_bias: B1, broadcastable to (B, H, n, M), or None.
        query_bias: B2, broadcastable to (B, H, N, n), or None.
        scale: s of the agent aggregation.
        broadcast_scale: bs of the agent broadcast.
        dropout_p: attention dropout on both softmax maps.
    """
    # The fused CPU kernel needs a unit stride along d; pooled agents of a one-head layer are a
    # transposed view (stride n along d) and would send both calls to the ~3x slower math path.
    agents = _unit_last_stride(agents)
    q, k, v = _unit_last_stride(q), _unit_last_stride(k), _unit_last_stride(v)
    agent_v = F.scaled_dot_product_attention(  # (B, H, n, d)
        agents, k, v, attn_mask=_mask(agent_bias, agents), dropout_p=dropout_p, scale=scale
    )
    # B2 arrives as a transposed view of agent-major memory (what the bias modules build); SDPA
    # would copy a non-contiguous mask in every call, per window batch where it broadcasts
    query_mask = _mask(query_bias, q)
    if query_mask is not None:
        query_mask = query_mask.contiguous()
    return F.scaled_dot_product_attention(  # (B, H, N, d)
        q, agents, agent_v, attn_mask=query_mask, dropout_p=dropout_p, scale=broadcast_scale
    )


def _unit_last_stride(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def agent_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    agents: Tensor,
    *,
    agent_bias: Tensor | None = None,
    query_bias: Tensor | None = None,
    scale: float | None = None,
    broadcast_scale: float | None = None,
    dropout_p: float = 0.0,
    upcast: bool | None = None,
) -> Tensor:
    """Agent attention ``softmax(bs·Q Aᵀ + B2) · (softmax(s·A Kᵀ + B1) · V)``.

    Args:
        q: queries (B, H, N, d).
        k, v: keys and values (B, H, M, d).
        agents: agent tokens (B, H, n, d).
        agent_bias: B1, broadcastable to (B, H, n, M), added to the agent→key logits.
        query_bias: B2, broadcastable to (B, H, N, n), added to the query→agent logits.
        scale: s, defaults to d^-0.5.
        broadcast_scale: bs, defaults to ``scale`` (AgentSD uses a sharper ``scale ** 0.3``).
        dropout_p: attention dropout applied to both softmax maps (pass 0 in eval).
        upcast: compute the similarities and softmaxes in float32 and cast the result back.
            Default: only for float16 inputs, whose range (65504) large logits exceed — the
            agent path is O(N·n·d), so this costs little; bfloat16 has float32's range. The CPU
            op (below) always computes half types in float32.

    On the CPU without attention dropout this runs :func:`agentlit.core.fused.agent_attention_fused`
    (agent-major broadcast step, hand-written backward that keeps no attention map); elsewhere, and in
    TorchScript, two ``scaled_dot_product_attention`` calls.

    Returns:
        (B, H, N, d).
    """
    _check_shapes(q, k, v, agents)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if broadcast_scale is None:
        broadcast_scale = scale
    if supports_fused(q, dropout_p):  # computes half types in float32 itself
        return agent_attention_fused(q, k, v, agents, agent_bias, query_bias, scale, broadcast_scale).transpose(1, 2)
    if upcast is None:
        upcast = q.dtype == torch.float16
    if upcast and q.dtype != torch.float32:
        # autocast would cast SDPA's inputs straight back to half precision
        with torch.autocast(device_type=q.device.type, enabled=False):
            out = agent_attention(
                q.float(), k.float(), v.float(), agents.float(),
                agent_bias=None if agent_bias is None else agent_bias.float(),
                query_bias=None if query_bias is None else query_bias.float(),
                scale=scale, broadcast_scale=broadcast_scale, dropout_p=dropout_p, upcast=False,
            )
        return out.to(q.dtype)
    return agent_attention_sdpa(q, k, v, agents, agent_bias, query_bias, scale, broadcast_scale, dropout_p)


def agent_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    agents: Tensor,
    *,
    agent_bias: Tensor | None = None,
    query_bias: Tensor | None = None,
    scale: float | None = None,
    broadcast_scale: float | None = None,
) -> Tensor:
    """The same quantity written straight from the paper's formulas (einsum + softmax).

    Slow and memory-hungry on purpose: it is the yardstick the fused op is tested against.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    broadcast_scale = scale if broadcast_scale is None else broadcast_scale
    s1 = torch.einsum("bhnd,bhmd->bhnm", agents, k) * scale
    if agent_bias is not None:
        s1 = s1 + agent_bias
    agent_v = torch.einsum("bhnm,bhmd->bhnd", s1.softmax(-1), v)
    s2 = torch.einsum("bhqd,bhnd->bhqn", q, agents) * broadcast_scale
    if query_bias is not None:
        s2 = s2 + query_bias
    return torch.einsum("bhqn,bhnd->bhqd", s2.softmax(-1), agent_v)


# ---------------------------------------------------------------------------------------------
# The agent computation on projected tokens, shared by every host
# ---------------------------------------------------------------------------------------------
def as_sizes(size: LayoutSize) -> List[int]:
    """A layout size (tuple or list of 1-3 ints) as a list (TorchScript-friendly)."""
    if not torch.jit.is_scripting():
        return [int(s) for s in size]
    if isinstance(size, List[int]):
        return size
    elif isinstance(size, Tuple[int, int]):
        return [size[0], size[1]]
    elif isinstance(size, Tuple[int]):
        return [size[0]]
    else:
        return [size[0], size[1], size[2]]


def _real_padding(pad: Tensor) -> Tensor:
    # A row with nothing real (all padded) is treated as unpadded: its outputs are garbage anyway,
    # but finite, where an all -inf softmax row would put NaN into the forward and backward pass.
    return pad & ~pad.all(-1, keepdim=True)


def _pool_weights(size_in: int, size_out: int, like: Tensor) -> Tensor:
    """(size_out, size_in): adaptive average pooling along one axis as a matrix (taken from
    ``F.adaptive_avg_pool1d`` itself, so the regions are PyTorch's)."""
    eye = torch.eye(size_in, device=like.device, dtype=like.dtype).unsqueeze(0)  # (1, in, in)
    weights = F.adaptive_avg_pool1d(eye, size_out)[0].t().contiguous()
    if not torch.jit.is_scripting():
        _mark_pooling(weights)
    return weights


@torch.jit.unused
def _mark_pooling(weights: Tensor) -> None:
    from ..utils.flops import POOLING  # pooling, not a counted product (the paper's MAC convention)

    setattr(weights, POOLING, True)


def _pool_tokens(tokens: Tensor, layout: List[int], grid: List[int]) -> Tensor:
    """Adaptive average pooling of (B, N, C) tokens laid out as ``layout`` to ``grid``: (B, n, C).

    One small matmul per axis with the pooling matrix, on token-major memory: no map copy (strided
    views of a qkv projection are read in place), and autograd keeps only the constant matrices.
    """
    B, C = tokens.shape[0], tokens.shape[2]
    x = tokens.reshape([B] + layout + [C])  # (B, *layout, C)
    inner = C  # product of the axes after the one being pooled (already pooled ones included)
    for axis in range(len(layout) - 1, -1, -1):
        lead = [B] + [layout[i] for i in range(axis)]
        x = torch.matmul(_pool_weights(layout[axis], grid[axis], tokens), x.reshape(lead + [layout[axis], inner]))
        inner = inner * grid[axis]
    return x.reshape(B, -1, C)


def pool_agents(
    tokens: Tensor, layout: List[int], grid: List[int], padding_mask: Optional[Tensor] = None
) -> Tuple[Tensor, Optional[Tensor]]:
    """Agents as the adaptive average pooling of ``tokens`` laid out as ``layout``, to ``grid``.

    With a padding mask, each agent is the mean of the real tokens of its pool region (masked sum
    over masked count); an agent whose region holds only padding is zero and flagged.

    Args:
        tokens: (B, N, C) with N = prod(layout), usually the projected queries of the layout tokens.
        layout: [L], [h, w] or [t, h, w].
        grid: the agent grid, of the same rank as ``layout``; n = prod(grid).
        padding_mask: (B, N) bool, True at padded tokens, or None.

    Returns:
        agents (B, n, C), and (B, n) bool True at agents that saw no real token (None without a mask).
    """
    if padding_mask is None:
        return _pool_tokens(tokens, layout, grid), None
    pad = padding_mask.unsqueeze(-1)  # (B, N, 1)
    mean_of_real = _pool_tokens(tokens.masked_fill(pad, 0.0), layout, grid)  # Σ real / region size
    share_real = _pool_tokens((~pad).to(tokens.dtype), layout, grid)  # (B, n, 1) count real / region size
    none_real = share_real == 0
    agents = mean_of_real / share_real.masked_fill(none_real, 1.0)  # all-padding regions: 0 / 1
    empty = _real_padding(none_real.squeeze(-1))
    return agents, empty


def depthwise_local(tokens: Tensor, layout: List[int], weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """The depthwise conv of ``tokens`` (B, N, C) laid out as ``layout``, back as tokens (B, N, C).

    Runs on a channels-last copy of the map; in eager mode that copy is made again in the backward
    pass rather than kept (:class:`_DepthwiseTokens`), so the layer stores no more than the tokens.

    Args:
        tokens: (B, N, C), N = prod(layout).
        layout: [L], [h, w] or [t, h, w]; picks conv1d / conv2d / conv3d.
        weight: (C, 1, k, …) of a depthwise conv of the layout's rank (odd k, 'same' zero padding).
        bias: (C,) or None.
    """
    if not torch.jit.is_scripting() and torch.is_grad_enabled():
        return _depthwise_tokens(tokens, layout, weight, bias)
    y = depthwise_conv(channels_last_map(tokens, layout), weight, bias, len(layout))
    return y.movedim(1, -1).reshape(tokens.shape[0], tokens.shape[1], tokens.shape[2])  # channels-last: a view


@torch.jit.unused
def _depthwise_tokens(tokens: Tensor, layout: List[int], weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    return _DepthwiseTokens.apply(tokens, weight, bias, list(layout))


class _DepthwiseTokens(torch.autograd.Function):
    """Depthwise conv on tokens that keeps the tokens (a view of the projection, stored anyway), not
    the channels-last copy the conv reads; the backward pass makes that copy again."""

    @staticmethod
    def forward(ctx, tokens: Tensor, weight: Tensor, bias: Optional[Tensor], layout: List[int]) -> Tensor:  # noqa: ANN001
        ctx.save_for_backward(tokens, weight)
        ctx.layout, ctx.has_bias = layout, bias is not None
        y = depthwise_conv(channels_last_map(tokens, layout), weight, bias, len(layout))
        return y.movedim(1, -1).reshape(tokens.shape)

    @staticmethod
    def backward(ctx, grad: Tensor):  # noqa: ANN001, ANN205
        tokens, weight = ctx.saved_tensors
        layout = ctx.layout
        rank, C = len(layout), tokens.shape[2]
        pad = weight.shape[-1] // 2
        dx, dw, db = torch.ops.aten.convolution_backward(
            channels_last_map(grad, layout), channels_last_map(tokens, layout), weight,
            [C] if ctx.has_bias else None, [1] * rank, [pad] * rank, [1] * rank, False, [0] * rank, C,
            [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]],
        )
        if dx is not None:
            dx = dx.movedim(1, -1).reshape(tokens.shape)
        return dx, dw, db, None


def _padding_bias(bias: Optional[Tensor], pad: Tensor, like: Tensor) -> Tensor:
    """``bias`` plus -inf where ``pad`` (B, T) is True, broadcast as (B, 1, 1, T)."""
    mask = torch.zeros(pad.shape, dtype=like.dtype, device=like.device).masked_fill(pad, float("-inf"))
    mask = mask[:, None, None, :]
    return mask if bias is None else bias + mask


def agent_attention_tokens(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    num_heads: int,
    layout: List[int],
    agent_grid: List[int],
    agents: Optional[Tensor] = None,
    num_prefix_tokens: int = 0,
    agent_bias: Optional[Tensor] = None,
    query_bias: Optional[Tensor] = None,
    key_padding_mask: Optional[Tensor] = None,
    query_padding_mask: Optional[Tensor] = None,
    dwc_weight: Optional[Tensor] = None,
    dwc_bias: Optional[Tensor] = None,
    shortcut: float = 0.0,
    scale: Optional[float] = None,
    broadcast_scale: Optional[float] = None,
    dropout_p: float = 0.0,
    upcast: Optional[bool] = None,
    proj_weight: Optional[Tensor] = None,
    proj_bias: Optional[Tensor] = None,
) -> Tensor:
    """Agent attention on projected tokens: pool agents → heads → padding → two softmaxes → local term.

    ``q`` holds P prefix tokens followed by the layout's N - P tokens; keys and values are the same
    tokens (self-attention) or another sequence (cross-attention: no layout, no local term)::

        A   = pool(Q[P:] laid out as ``layout``) to ``agent_grid``   (or the given ``agents``)
        O   = softmax(bs·Q Aᵀ + B2) · softmax(s·A Kᵀ + B1) · V     per head
        O  += DWC(V[P:]) + shortcut · V                            (local term, self-attention)

    Padding: padded keys get -inf in B1 (their K and V are zeroed, so no value they hold reaches a
    real output); padded queries are left out of the agent pooling (masked means); an agent that
    pooled only padding gets -inf in B2, so no query reads it; V is zeroed at padded positions before
    the depthwise conv. Outputs at padded query positions are unspecified (finite).

    Args:
        q: queries (B, N, C), C = num_heads · d.
        k: keys (B, M, C).
        v: values (B, M, C).
        num_heads: heads H.
        layout: the layout of the N - P query tokens: [L], [h, w] or [t, h, w] ([] with given agents
            and no conv: tokens with no layout).
        agent_grid: the pooling grid (same rank as ``layout``); unused when ``agents`` is given.
        agents: (B, n, C) or learned (n, C) agent tokens; None pools them from ``q``.
        num_prefix_tokens: P tokens before the layout (not pooled, not convolved).
        agent_bias: B1 broadcastable to (B, H, n, M), or None.
        query_bias: B2 broadcastable to (B, H, N, n), or None.
        key_padding_mask: (B, M) bool, True at padded keys, or None.
        query_padding_mask: (B, N) bool, True at padded queries (left out of the pooling), or None.
        dwc_weight: depthwise conv weight (C, 1, k, …) of the layout's rank, applied to V when M == N.
        dwc_bias: its bias (C,) or None.
        shortcut: weight of a ``shortcut · V`` term (AgentSD's training-free stand-in for the conv).
        scale: s, defaults to d^-0.5.
        broadcast_scale: bs, defaults to ``scale``.
        dropout_p: attention dropout on both softmax maps (pass 0 in eval).
        upcast: as :func:`agent_attention` (eager only; TorchScript runs in the input dtype).
        proj_weight: (C_out, C) output projection applied to the result, or None. Given to this
            function rather than applied after it, the CPU op folds it in and keeps no copy of its
            input for the backward pass (it rebuilds it from what that pass recomputes anyway).
        proj_bias: its bias (C_out,) or None.

    Returns:
        (B, N, C), or (B, N, C_out) with the output projection.
    """
    if not torch.jit.is_scripting():
        _check_tokens(q, k, v, num_heads, layout, agent_grid, agents, num_prefix_tokens, key_padding_mask,
                      query_padding_mask, dwc_weight, shortcut)
    B, N, C = q.shape
    M = k.shape[1]
    H, P = num_heads, num_prefix_tokens
    d = C // H
    empty_agents: Optional[Tensor] = None
    if agents is None:
        query_pad: Optional[Tensor] = None
        if query_padding_mask is not None:
            query_pad = query_padding_mask[:, P:]
        agents, empty_agents = pool_agents(q[:, P:] if P > 0 else q, layout, agent_grid, query_pad)
    elif agents.dim() == 2:  # learned agents, shared by the batch
        agents = agents.unsqueeze(0).expand(B, agents.shape[0], C)
    n = agents.shape[1]
    if key_padding_mask is not None:
        key_pad = _real_padding(key_padding_mask)
        k = k.masked_fill(key_pad.unsqueeze(-1), 0.0)
        v = v.masked_fill(key_pad.unsqueeze(-1), 0.0)
        agent_bias = _padding_bias(agent_bias, key_pad, q)
    if empty_agents is not None:
        query_bias = _padding_bias(query_bias, empty_agents, q)

    # heads: (B, T, C) -> (B, H, T, d)
    qh = q.reshape(B, N, H, d).transpose(1, 2)
    kh = k.reshape(B, M, H, d).transpose(1, 2)
    vh = v.reshape(B, M, H, d).transpose(1, 2)
    ah = agents.reshape(B, n, H, d).transpose(1, 2)
    s = d**-0.5 if scale is None else scale
    bs = s if broadcast_scale is None else broadcast_scale
    if not torch.jit.is_scripting() and supports_fused(q, dropout_p) and shortcut == 0.0:
        # the CPU op runs the local term and the projection too: one backward that keeps nothing of them
        return _fused_tokens(qh, kh, vh, ah, agent_bias, query_bias, s, bs, dwc_weight, dwc_bias, layout, P,
                             proj_weight, proj_bias)
    fresh = False  # True: nothing keeps ``out`` for the backward pass, so the local term goes in in place
    if torch.jit.is_scripting():  # no shape checks / fp16 upcast context in TorchScript
        out = agent_attention_sdpa(qh, kh, vh, ah, agent_bias, query_bias, s, bs, dropout_p)
    else:
        out = _eager_agent_attention(qh, kh, vh, ah, agent_bias, query_bias, s, bs, dropout_p, upcast)
        fresh = supports_fused(q, dropout_p)  # the fused op's output: new token-major memory, not saved
    out = out.transpose(1, 2).reshape(B, N, C)  # (B, N, C), a view of the fused op's token-major output

    if dwc_weight is not None:
        # v[P:] only where there is a prefix: slicing costs a zero-filled gradient buffer in the backward pass
        local = depthwise_local(v[:, P:] if P > 0 else v, layout, dwc_weight, dwc_bias)  # (B, N - P, C)
        if fresh:
            (out[:, P:] if P > 0 else out).add_(local)
        else:
            out = torch.cat([out[:, :P], out[:, P:] + local], dim=1) if P > 0 else out + local
    if shortcut != 0.0:
        out = out.add_(v, alpha=shortcut) if fresh else out + shortcut * v
    if proj_weight is not None:
        out = F.linear(out, proj_weight, proj_bias)
    return out


@torch.jit.unused
def _fused_tokens(
    q: Tensor, k: Tensor, v: Tensor, agents: Tensor, agent_bias: Optional[Tensor], query_bias: Optional[Tensor],
    scale: float, broadcast_scale: float, dwc_weight: Optional[Tensor], dwc_bias: Optional[Tensor],
    layout: List[int], prefix: int, proj_weight: Optional[Tensor], proj_bias: Optional[Tensor],
) -> Tensor:
    B, H, N, d = q.shape
    out = agent_attention_fused(q, k, v, agents, agent_bias, query_bias, scale, broadcast_scale,
                                dwc_weight=dwc_weight, dwc_bias=dwc_bias, layout=layout, num_prefix_tokens=prefix,
                                proj_weight=proj_weight, proj_bias=proj_bias)
    return out if proj_weight is not None else out.reshape(B, N, H * d)


@torch.jit.unused
def _eager_agent_attention(
    q: Tensor, k: Tensor, v: Tensor, agents: Tensor, agent_bias: Optional[Tensor], query_bias: Optional[Tensor],
    scale: float, broadcast_scale: float, dropout_p: float, upcast: Optional[bool],
) -> Tensor:
    return agent_attention(q, k, v, agents, agent_bias=agent_bias, query_bias=query_bias, scale=scale,
                           broadcast_scale=broadcast_scale, dropout_p=dropout_p, upcast=upcast)


@torch.jit.unused
def _check_tokens(
    q: Tensor, k: Tensor, v: Tensor, num_heads: int, layout: List[int], agent_grid: List[int],
    agents: Optional[Tensor], num_prefix_tokens: int, key_padding_mask: Optional[Tensor],
    query_padding_mask: Optional[Tensor], dwc_weight: Optional[Tensor], shortcut: float,
) -> None:
    where = "agent_attention_tokens"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 3:
            raise ValueError(f"{where}: {name} must be (B, tokens, C), got shape {tuple(t.shape)}")
    B, N, C = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[2] != C:
        raise ValueError(f"{where}: k {tuple(k.shape)} and v {tuple(v.shape)} must be (B={B}, M, C={C})")
    if C % num_heads:
        raise ValueError(f"{where}: width C={C} is not divisible by num_heads={num_heads}")
    n_layout = N - num_prefix_tokens
    if (agents is None or dwc_weight is not None) and math.prod(layout) != n_layout:
        raise ValueError(
            f"{where}: {N} tokens with {num_prefix_tokens} prefix tokens do not fit the layout {list(layout)} "
            f"({math.prod(layout)} tokens); pass the layout the tokens form"
        )
    if agents is None and len(agent_grid) != len(layout):
        raise ValueError(f"{where}: agent grid {list(agent_grid)} and layout {list(layout)} must have the same rank")
    if agents is not None and (agents.shape[-1] != C or agents.dim() not in (2, 3)
                               or (agents.dim() == 3 and agents.shape[0] != B)):
        raise ValueError(f"{where}: agents must be (B={B}, n, C={C}) or (n, C={C}), got {tuple(agents.shape)}")
    for name, mask, length in (("key_padding_mask", key_padding_mask, k.shape[1]),
                               ("query_padding_mask", query_padding_mask, N)):
        if mask is not None and (mask.dtype != torch.bool or tuple(mask.shape) != (B, length)):
            raise ValueError(
                f"{where}: {name} must be a bool tensor of shape (B={B}, {length}) with True at padded "
                f"tokens, got {mask.dtype} {tuple(mask.shape)}"
            )
    if (dwc_weight is not None or shortcut != 0.0) and k.shape[1] != N:
        raise ValueError(
            f"{where}: the local term (depthwise conv / V shortcut) needs keys on the query tokens "
            f"(M = N = {N}), got M = {k.shape[1]}; cross-attention has no local term"
        )
