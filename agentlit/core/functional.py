"""The agent-attention operator: two softmax attentions through a small set of agent tokens.

Shapes (docs/reference.md §1): q (B, H, N, d); k, v (B, H, M, d); agents (B, H, n, d) with n << N, M.

    V_A = softmax(scale · A Kᵀ + B1) V          # agent aggregation, (B, H, n, d)
    O   = softmax(broadcast_scale · Q Aᵀ + B2) V_A   # agent broadcast,  (B, H, N, d)

Both steps go through ``torch.nn.functional.scaled_dot_product_attention`` with the biases as
float masks, so whichever fused kernel the backend offers serves them, and nothing of size N×M is
ever built: the largest intermediate is (B, H, N, n).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["agent_attention", "agent_attention_reference", "agent_attention_sdpa"]


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
    return F.scaled_dot_product_attention(  # (B, H, N, d)
        q, agents, agent_v, attn_mask=_mask(query_bias, q), dropout_p=dropout_p, scale=broadcast_scale
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
            agent path is O(N·n·d), so this costs little; bfloat16 has float32's range.

    Returns:
        (B, H, N, d).
    """
    _check_shapes(q, k, v, agents)
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
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if broadcast_scale is None:
        broadcast_scale = scale
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
