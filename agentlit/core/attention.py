"""The multi-head agent-attention layer for sequences, maps and volumes (docs/reference.md §1)."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from .bias import AgentPositionBias, to_grid
from .functional import LayoutSize, agent_attention_tokens, as_sizes

__all__ = ["AgentAttention"]

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


class AgentAttention(AgentPositionBias):
    """Agent attention over a token layout, optionally preceded by P prefix (class) tokens.

    x (B, P + N, C) → (B, P + N, C), the N tokens forming a 1-D sequence (L,), a 2-D map (h, w) or a
    3-D volume (t, h, w), the rank given by ``feat_size``. Agents are the projected queries of the
    layout tokens, average-pooled to ``agent_num`` (a grid of the layout's rank), or ``agents="learned"``:
    ``agent_num`` parameters shared by every input. Position biases are learned at ``feat_size`` and
    interpolated to whatever size the forward pass sees (a sequence may have any length); a depthwise
    conv of the layout's rank on V restores the feature diversity the low-rank agent path loses.

    Cross-attention (``context_dim`` set): queries and pooled agents come from ``x``, keys and values
    from ``forward(x, context=…)`` (B, M, context_dim) of any length M. The keys share no layout with
    the queries, so such a layer has only the token→agent bias B2 (no agent→key bias B1, whose
    parameters it does not create) and no depthwise conv (V lives on the context, not on x's layout).

    Padding: ``key_padding_mask`` (B, P + N) marks padded tokens (True, as in
    ``nn.MultiheadAttention``); see :func:`~agentlit.core.agent_attention_tokens` for what it does.
    ``attn_mask`` / ``is_causal`` are refused: pooled agents mix every position.

    Args:
        dim: channels C (divisible by ``num_heads``).
        num_heads: heads H.
        feat_size: the layout the biases are laid out for (the training size): (L,), (h, w) or
            (t, h, w); an int s means the (s, s) map.
        agent_num: agents n: for pooled agents a grid of the layout's rank (an int is n for 1-D, a
            square for 2-D, a cube for 3-D); for learned agents any int.
        agents: "pooled" (the paper) or "learned".
        num_prefix_tokens: tokens before the layout (class/distillation) that take part in K/V and
            get their own bias column/row, but are not pooled into agents nor convolved.
        context_dim: width of the context of a cross-attention layer (None: self-attention).
        qkv_bias: bias of the q/k/v projections.
        attn_drop: dropout on both softmax maps.
        proj_drop: dropout after the output projection.
        dwc_kernel: depthwise conv kernel on V (0 disables it; always off for cross-attention).
        position_bias: learn the agent position biases (False: none, as ``agent-attention-pytorch``).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        *,
        feat_size: int | tuple[int, ...] = 14,
        agent_num: int | tuple[int, ...] = 49,
        agents: str = "pooled",
        num_prefix_tokens: int = 0,
        context_dim: int | None = None,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        dwc_kernel: int = 3,
        position_bias: bool = True,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"AgentAttention: dim={dim} is not divisible by num_heads={num_heads}")
        if agents not in ("pooled", "learned"):
            raise ValueError(f"AgentAttention: agents={agents!r} must be 'pooled' or 'learned'")
        if dwc_kernel and dwc_kernel % 2 == 0:
            raise ValueError(f"AgentAttention: dwc_kernel={dwc_kernel} must be odd (or 0 for no conv)")
        self.dim, self.num_heads = dim, num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        if isinstance(feat_size, int):
            feat_size = (feat_size, feat_size)
        self.feat_size = tuple(int(s) for s in feat_size)
        self.rank = len(self.feat_size)
        if self.rank not in (1, 2, 3) or min(self.feat_size) <= 0:
            raise ValueError(
                f"AgentAttention: feat_size={feat_size!r} must be (L,), (h, w) or (t, h, w) of positive sizes"
            )
        if agents == "learned":
            if isinstance(agent_num, bool) or not isinstance(agent_num, int) or agent_num <= 0:
                raise ValueError(f"AgentAttention: learned agents need agent_num=<positive int>, got {agent_num!r}")
            self.agent_grid = (agent_num,)
            self.agent_tokens = nn.Parameter(torch.zeros(agent_num, dim))
            nn.init.trunc_normal_(self.agent_tokens, std=0.02)
        else:
            self.agent_grid = to_grid(agent_num, rank=self.rank)
            self.agent_tokens = None
        self.agent_num = math.prod(self.agent_grid)
        self.num_prefix_tokens = num_prefix_tokens
        self.attn_drop = attn_drop
        self.context_dim = context_dim

        if context_dim is None:
            self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
            self.q = self.kv = None
        else:
            self.qkv = None
            self.q = nn.Linear(dim, dim, bias=qkv_bias)
            self.kv = nn.Linear(context_dim, dim * 2, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.dwc = None
        if dwc_kernel and context_dim is None:
            self.dwc = _CONV[self.rank](dim, dim, dwc_kernel, padding=dwc_kernel // 2, groups=dim)
        if position_bias:
            self._init_biases(num_heads, self.agent_num, self.feat_size, num_prefix_tokens,
                              key_side=context_dim is None)

    def extra_repr(self) -> str:
        kind = "learned" if self.agent_tokens is not None else "pooled"
        cross = f", context_dim={self.context_dim}" if self.context_dim is not None else ""
        return (
            f"dim={self.dim}, heads={self.num_heads}, agents={self.agent_grid} ({kind}), "
            f"feat_size={self.feat_size}, prefix={self.num_prefix_tokens}{cross}"
        )

    def forward(
        self,
        x: Tensor,
        feat_size: Optional[LayoutSize] = None,
        attn_mask: Optional[Tensor] = None,
        is_causal: bool = False,
        key_padding_mask: Optional[Tensor] = None,
        context: Optional[Tensor] = None,
        query_padding_mask: Optional[Tensor] = None,
    ) -> Tensor:
        """Agent attention of x (B, P + N, C).

        Args:
            x: the tokens, P prefix tokens first.
            feat_size: the layout of the N tokens; default: the construction size, except for a
                sequence, whose length is N.
            attn_mask: refused (exists for drop-in use in timm blocks): agents pool every position,
                so a masked or future position would leak through them.
            is_causal: refused, as ``attn_mask``.
            key_padding_mask: (B, P + N) bool, True at padded tokens (self-attention), or
                (B, M) over the context (cross-attention).
            context: (B, M, context_dim) keys/values of a cross-attention layer.
            query_padding_mask: (B, P + N) bool, padded queries of a cross-attention layer (left
                out of the agent pooling).
        """
        if attn_mask is not None or is_causal:
            raise ValueError(
                "AgentAttention does not support attn_mask or is_causal: agents pool every query, "
                "so masked or future positions would leak through them; use softmax attention there"
            )
        B, L, C = x.shape
        P = self.num_prefix_tokens
        if feat_size is not None:
            layout = as_sizes(feat_size)
        elif self.rank == 1:
            layout = [L - P]
        else:
            layout = as_sizes(self.feat_size)
        if not torch.jit.is_scripting():
            self._check_input(x, layout, context, key_padding_mask, query_padding_mask)
        if self.qkv is not None:  # self-attention: padded tokens are padded keys and padded queries
            q, k, v = self.qkv(x).reshape(B, L, 3, C).unbind(2)  # each (B, L, C)
            query_padding_mask = key_padding_mask
        else:
            assert self.q is not None and self.kv is not None and context is not None
            q = self.q(x)
            k, v = self.kv(context).reshape(B, context.shape[1], 2, C).unbind(2)  # each (B, M, C)
        agent_bias: Optional[Tensor] = None
        query_bias: Optional[Tensor] = None
        if hasattr(self, "na_bias"):
            agent_bias, query_bias = self.position_biases(layout)
        dwc_weight: Optional[Tensor] = None
        dwc_bias: Optional[Tensor] = None
        if self.dwc is not None:
            dwc_weight, dwc_bias = self.dwc.weight, self.dwc.bias
        out = agent_attention_tokens(
            q, k, v, self.num_heads, layout, as_sizes(self.agent_grid), agents=self.agent_tokens,
            num_prefix_tokens=P, agent_bias=agent_bias, query_bias=query_bias, key_padding_mask=key_padding_mask,
            query_padding_mask=query_padding_mask, dwc_weight=dwc_weight, dwc_bias=dwc_bias,
            scale=self.scale, broadcast_scale=self.scale, dropout_p=self.attn_drop if self.training else 0.0,
        )  # (B, L, C)
        return self.proj_drop(self.proj(out))

    @torch.jit.unused
    def _check_input(
        self, x: Tensor, layout: list[int], context: Optional[Tensor], key_padding_mask: Optional[Tensor],
        query_padding_mask: Optional[Tensor],
    ) -> None:
        L, P = x.shape[1], self.num_prefix_tokens
        if len(layout) != self.rank:
            raise ValueError(
                f"AgentAttention: feat_size={tuple(layout)} has {len(layout)} sizes, this layer is laid out "
                f"for {self.rank} ({self.feat_size})"
            )
        if L != P + math.prod(layout):
            shape = "x".join(str(s) for s in layout)
            raise ValueError(
                f"AgentAttention: got {L} tokens, expected {P} prefix + {shape} layout = {P + math.prod(layout)}; "
                "pass feat_size matching the input"
            )
        if self.context_dim is None and context is not None:
            raise ValueError("AgentAttention: context given to a self-attention layer; build it with context_dim=")
        if self.context_dim is not None:
            if context is None or context.dim() != 3 or context.shape[0] != x.shape[0] or context.shape[2] != self.context_dim:
                got = None if context is None else tuple(context.shape)
                raise ValueError(
                    f"AgentAttention: this cross-attention layer needs context=(B={x.shape[0]}, M, "
                    f"{self.context_dim}), got {got}"
                )
        elif query_padding_mask is not None:
            raise ValueError("AgentAttention: query_padding_mask is for cross-attention; self-attention takes "
                             "key_padding_mask only (it marks padded queries and keys alike)")


def _register_fx_leaf() -> None:
    # timm's FX feature extraction (and torchvision's) keeps the layer as one call: its token-count
    # check and bias interpolation branch on shapes, which symbolic tracing cannot follow.
    try:
        from timm.layers import register_notrace_module
    except ImportError:  # timm is optional for the core
        return
    register_notrace_module(AgentAttention)


_register_fx_leaf()
