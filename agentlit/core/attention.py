"""The multi-head agent-attention layer used by every agent backbone (docs/reference.md §1)."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .bias import AgentPositionBias, to_grid
from .functional import agent_attention, agent_attention_sdpa

__all__ = ["AgentAttention"]


class AgentAttention(AgentPositionBias):
    """Agent attention over an (h, w) token map, optionally preceded by P prefix (class) tokens.

    x (B, P + h·w, C) → (B, P + h·w, C). Agents are the projected queries of the map tokens,
    average-pooled to ``agent_num`` (a square count or an (ph, pw) grid). Position biases are
    learned at ``feat_size`` and interpolated to whatever map the forward pass sees; a 3×3
    depthwise conv on V restores the feature diversity the low-rank agent path loses.

    Args:
        dim: channels C (divisible by ``num_heads``).
        num_heads: heads H.
        feat_size: (h, w) map the biases are laid out for (the pre-training resolution).
        agent_num: agents n = ph·pw, an int square or an (ph, pw) grid.
        num_prefix_tokens: tokens before the map (class/distillation) that take part in K/V and
            get their own bias column/row, but are not pooled into agents nor convolved.
        qkv_bias, attn_drop, proj_drop: as in a ViT attention layer.
        dwc_kernel: depthwise conv kernel on V (0 disables it).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        *,
        feat_size: int | tuple[int, int] = 14,
        agent_num: int | tuple[int, int] = 49,
        num_prefix_tokens: int = 0,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        dwc_kernel: int = 3,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"AgentAttention: dim={dim} is not divisible by num_heads={num_heads}")
        self.dim, self.num_heads = dim, num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.feat_size = to_grid(feat_size * feat_size if isinstance(feat_size, int) else feat_size, "feat_size")
        self.agent_grid = to_grid(agent_num)
        self.agent_num = self.agent_grid[0] * self.agent_grid[1]
        self.num_prefix_tokens = num_prefix_tokens
        self.attn_drop = attn_drop

        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.dwc = (
            nn.Conv2d(dim, dim, dwc_kernel, padding=dwc_kernel // 2, groups=dim) if dwc_kernel else None
        )
        self._init_biases(num_heads, self.agent_grid, self.feat_size, num_prefix_tokens)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, heads={self.num_heads}, agents={self.agent_grid}, "
            f"feat_size={self.feat_size}, prefix={self.num_prefix_tokens}"
        )

    def forward(
        self,
        x: Tensor,
        feat_size: Optional[Tuple[int, int]] = None,
        attn_mask: Optional[Tensor] = None,
        is_causal: bool = False,
    ) -> Tensor:
        """x (B, P + h·w, C); ``feat_size`` (h, w) defaults to the size given at construction.

        ``attn_mask`` / ``is_causal`` exist for drop-in use in timm blocks; agent attention cannot
        honour them (pooled agents mix all positions, so a mask or causal order would leak).
        """
        if attn_mask is not None or is_causal:
            raise ValueError(
                "AgentAttention does not support attn_mask or is_causal: agents pool every query, "
                "so masked or future positions would leak through them; use softmax attention there"
            )
        B, L, C = x.shape
        if feat_size is None:
            h, w = self.feat_size[0], self.feat_size[1]
        else:
            h, w = feat_size[0], feat_size[1]
        P, H, d = self.num_prefix_tokens, self.num_heads, self.head_dim
        if L != P + h * w:
            raise ValueError(
                f"AgentAttention: got {L} tokens, expected {P} prefix + {h}x{w} map = {P + h * w}; "
                "pass feat_size=(h, w) matching the input"
            )
        q, k, v = self.qkv(x).reshape(B, L, 3, C).unbind(2)  # each (B, L, C)
        # Agents: pooled queries of the map tokens, before the head split (as in the paper).
        q_map = q[:, P:].transpose(1, 2).reshape(B, C, h, w)
        agents = F.adaptive_avg_pool2d(q_map, self.agent_grid).flatten(2).transpose(1, 2)  # (B, n, C)

        # heads: (B, T, C) -> (B, H, T, d)
        qh, kh, vh = (q.reshape(B, L, H, d).transpose(1, 2), k.reshape(B, L, H, d).transpose(1, 2),
                      v.reshape(B, L, H, d).transpose(1, 2))
        ah = agents.reshape(B, self.agent_num, H, d).transpose(1, 2)
        agent_bias, query_bias = self.position_biases(h, w)
        dropout_p = self.attn_drop if self.training else 0.0
        if torch.jit.is_scripting():  # no shape checks / fp16 upcast context in TorchScript
            out = agent_attention_sdpa(qh, kh, vh, ah, agent_bias, query_bias, self.scale, self.scale, dropout_p)
        else:
            out = _eager_agent_attention(qh, kh, vh, ah, agent_bias, query_bias, self.scale, dropout_p)
        # out: (B, H, L, d)
        out = out.transpose(1, 2).reshape(B, L, C)
        if self.dwc is not None:
            v_map = v[:, P:].transpose(1, 2).reshape(B, C, h, w)
            local = self.dwc(v_map).flatten(2).transpose(1, 2)  # (B, h·w, C)
            out = torch.cat([out[:, :P], out[:, P:] + local], dim=1) if P > 0 else out + local
        return self.proj_drop(self.proj(out))


@torch.jit.unused
def _eager_agent_attention(
    q: Tensor, k: Tensor, v: Tensor, agents: Tensor, agent_bias: Optional[Tensor], query_bias: Optional[Tensor],
    scale: float, dropout_p: float,
) -> Tensor:
    return agent_attention(q, k, v, agents, agent_bias=agent_bias, query_bias=query_bias, scale=scale, dropout_p=dropout_p)


def _register_fx_leaf() -> None:
    # timm's FX feature extraction (and torchvision's) keeps the layer as one call: its token-count
    # check and bias interpolation branch on shapes, which symbolic tracing cannot follow.
    try:
        from timm.layers import register_notrace_module
    except ImportError:  # timm is optional for the core
        return
    register_notrace_module(AgentAttention)


_register_fx_leaf()
