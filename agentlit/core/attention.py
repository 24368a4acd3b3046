"""The multi-head agent-attention layer for sequences, maps and volumes (docs/reference.md §1)."""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn

from .bias import AgentPositionBias, to_grid
from .recompute import SplitLinear
from .functional import LayoutSize, agent_attention_tokens, as_sizes

__all__ = ["AgentAttention", "AgentMultiheadAttention", "register_fx_leaves"]

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

        self._init_projections(dim, context_dim, qkv_bias)
        self.proj_drop = nn.Dropout(proj_drop)
        self.dwc = None
        if dwc_kernel and context_dim is None:
            self.dwc = _CONV[self.rank](dim, dim, dwc_kernel, padding=dwc_kernel // 2, groups=dim)
        if position_bias:
            self._init_biases(num_heads, self.agent_num, self.feat_size, num_prefix_tokens,
                              key_side=context_dim is None)

    def _init_projections(self, dim: int, context_dim: int | None, qkv_bias: bool) -> None:
        # self-attention: one fused ``qkv`` (the official name); cross-attention: ``q`` from x, ``kv``
        # from the context. Subclasses with another parameter layout override this.
        if context_dim is None:
            # rebuilds a marked input (a block's norm output) for its weight gradient instead of keeping it
            self.qkv = SplitLinear(dim, dim * 3, bias=qkv_bias, chunks=3)
            self.q = self.kv = None
        else:
            self.qkv = None
            self.q = nn.Linear(dim, dim, bias=qkv_bias)
            self.kv = nn.Linear(context_dim, dim * 2, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

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
        _refuse_masks(attn_mask, is_causal)
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
            # each (B, L, C); dense (even without autograd) when no prefix token precedes the map: the
            # conv and the agent pooling then read V's and Q's maps in place (Agent-PVT-S, Agent-Swin-T
            # inference 1-3% faster); behind a class token the map is a copy either way
            q, k, v = self.qkv(x, self.num_prefix_tokens == 0)
            out = self.attend(q, k, v, layout, key_padding_mask, key_padding_mask, False, project=True)
        else:
            assert self.q is not None and self.kv is not None and context is not None
            q = self.q(x)
            k, v = self.kv(context).reshape(B, context.shape[1], 2, C).unbind(2)  # each (B, M, C)
            out = self.attend(q, k, v, layout, key_padding_mask, query_padding_mask, True, project=True)
        return self.proj_drop(out)

    def attend(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        layout: List[int],
        key_padding_mask: Optional[Tensor],
        query_padding_mask: Optional[Tensor],
        cross: bool,
        project: bool = False,
    ) -> Tensor:
        """The agent step on projected tokens with this layer's agents, biases and conv.

        Args:
            q: queries (B, P + N, C), the N layout tokens after P prefix tokens.
            k: keys (B, M, C).
            v: values (B, M, C).
            layout: [L], [h, w] or [t, h, w] of the N tokens.
            key_padding_mask: (B, M) bool, True at padded keys, or None.
            query_padding_mask: (B, P + N) bool, True at padded queries, or None.
            cross: keys are not the query tokens: no agent→key bias, no conv.
            project: apply the output projection ``proj`` too (inside the core function, where the CPU
                op keeps no copy of its input).

        Returns:
            (B, P + N, C), before the output projection unless ``project``.
        """
        agent_bias: Optional[Tensor] = None
        query_bias: Optional[Tensor] = None
        if hasattr(self, "na_bias"):
            if torch.jit.is_scripting():
                agent_bias, query_bias = self.position_biases(layout)
            else:
                agent_bias, query_bias = self._eager_biases(q, layout, key_padding_mask, query_padding_mask)
        dwc_weight: Optional[Tensor] = None
        dwc_bias: Optional[Tensor] = None
        if self.dwc is not None and not cross:
            dwc_weight, dwc_bias = self.dwc.weight, self.dwc.bias
        return agent_attention_tokens(
            q, k, v, self.num_heads, layout, as_sizes(self.agent_grid), agents=self.agent_tokens,
            num_prefix_tokens=self.num_prefix_tokens, agent_bias=None if cross else agent_bias, query_bias=query_bias,
            key_padding_mask=key_padding_mask, query_padding_mask=query_padding_mask, dwc_weight=dwc_weight,
            dwc_bias=dwc_bias, scale=self.scale, broadcast_scale=self.scale,
            dropout_p=self.attn_drop if self.training else 0.0,
            proj_weight=self.proj.weight if project else None, proj_bias=self.proj.bias if project else None,
        )  # (B, P + N, C)

    @torch.jit.unused
    def _eager_biases(self, q: Tensor, layout: List[int], key_padding_mask: Optional[Tensor],
                      query_padding_mask: Optional[Tensor]) -> Tuple[Optional[Tensor], Optional[Tensor]]:
        # large biases reach the CPU op by map rows (RowBias), which TorchScript never sees
        padded = key_padding_mask is not None or query_padding_mask is not None
        return self.biases_for(q, layout, self.num_prefix_tokens, padded=padded,
                               dropout_p=self.attn_drop if self.training else 0.0)

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


def _refuse_masks(attn_mask: Optional[Tensor], is_causal: bool) -> None:
    if attn_mask is not None or is_causal:
        raise ValueError(
            "AgentAttention does not support attn_mask or is_causal: agents pool every query, "
            "so masked or future positions would leak through them; use softmax attention there"
        )


class AgentMultiheadAttention(AgentAttention):
    """A drop-in for ``nn.MultiheadAttention`` that runs agent attention on a 1-D sequence.

    Same constructor arguments, parameter names (``in_proj_weight`` / ``in_proj_bias``, or
    ``q_proj_weight`` / ``k_proj_weight`` / ``v_proj_weight`` when ``kdim`` / ``vdim`` differ, and
    ``out_proj``), call and return: ``forward(query, key, value, key_padding_mask=…)`` →
    ``(output, None)`` (no N×M attention weights exist to return). Built as self-attention (the
    default), keys and values are the query tokens (``layer(x, x, x)``: agent→key bias, depthwise
    conv); with ``cross_attention=True`` (or other ``kdim`` / ``vdim``) they are a context of any
    length (as :class:`AgentAttention` with ``context_dim``). ``key_padding_mask`` may be
    bool (True = padded) or float (0 / -inf, as ``nn.TransformerEncoderLayer`` passes it); ``attn_mask``
    and ``is_causal`` are refused. :meth:`from_mha` carries an existing layer's weights.

    Args:
        embed_dim: model width E.
        num_heads: heads.
        dropout: attention dropout on both softmax maps.
        bias: biases of the in / out projections.
        kdim: key width (None: E); another width makes the layer cross-attention only.
        vdim: value width (None: E).
        batch_first: (B, L, E) inputs instead of (L, B, E).
        feat_size: (L,) the length the per-position biases are laid out for (any length runs), or
            an (h, w) / (t, h, w) layout when the sequence is a flattened map or volume.
        agent_num: agents (pooled: a grid of the layout's rank; learned: any int).
        agents: "pooled" or "learned".
        dwc_kernel: depthwise conv kernel on V (0: none).
        position_bias: learn agent position biases.
        cross_attention: the layer is only used with a context (no agent→key bias, no conv).
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        kdim: int | None = None,
        vdim: int | None = None,
        batch_first: bool = False,
        *,
        feat_size: tuple[int, ...] = (64,),
        agent_num: int | tuple[int, ...] = 16,
        agents: str = "pooled",
        dwc_kernel: int = 3,
        position_bias: bool = True,
        cross_attention: bool = False,
    ) -> None:
        self.kdim = embed_dim if kdim is None else kdim
        self.vdim = embed_dim if vdim is None else vdim
        same = self.kdim == embed_dim and self.vdim == embed_dim
        cross_attention = cross_attention or not same
        super().__init__(
            embed_dim, num_heads, feat_size=feat_size, agent_num=agent_num, agents=agents, qkv_bias=bias,
            attn_drop=dropout, dwc_kernel=dwc_kernel, position_bias=position_bias,
            context_dim=self.kdim if cross_attention else None,
        )
        self.embed_dim, self.dropout, self.batch_first = embed_dim, dropout, batch_first

    def _init_projections(self, dim: int, context_dim: int | None, qkv_bias: bool) -> None:
        # nn.MultiheadAttention's parameters, names and init
        self.qkv = self.q = self.kv = None
        if self.kdim == dim and self.vdim == dim:
            self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
            nn.init.xavier_uniform_(self.in_proj_weight)
        else:
            self.in_proj_weight = None
            self.q_proj_weight = nn.Parameter(torch.empty(dim, dim))
            self.k_proj_weight = nn.Parameter(torch.empty(dim, self.kdim))
            self.v_proj_weight = nn.Parameter(torch.empty(dim, self.vdim))
            for w in (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight):
                nn.init.xavier_uniform_(w)
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim)) if qkv_bias else None
        self.out_proj = nn.modules.linear.NonDynamicallyQuantizableLinear(dim, dim, bias=qkv_bias)
        if qkv_bias:
            nn.init.zeros_(self.out_proj.bias)

    @property
    def _qkv_same_embed_dim(self) -> bool:
        # read by nn.TransformerEncoderLayer before it takes its fused fast path, which would run
        # its own softmax attention on these weights; False keeps every call going through forward
        return False

    @classmethod
    @torch.jit.unused
    def from_mha(cls, mha: nn.MultiheadAttention, **kwargs: object) -> "AgentMultiheadAttention":
        """Agent attention carrying ``mha``'s projection weights (the same Parameter objects).

        Args:
            mha: the softmax layer; ``add_bias_kv`` / ``add_zero_attn`` cannot be carried over.
            **kwargs: the agent settings of :class:`AgentMultiheadAttention` (feat_size, agent_num, …).
        """
        if mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError("nn.MultiheadAttention with add_bias_kv / add_zero_attn has no agent-attention "
                             "equivalent (the extra key would be pooled like a token)")
        new = cls(mha.embed_dim, mha.num_heads, mha.dropout, mha.in_proj_bias is not None, mha.kdim, mha.vdim,
                  mha.batch_first, **kwargs)  # type: ignore[arg-type]
        names = ["in_proj_weight"] if mha._qkv_same_embed_dim else ["q_proj_weight", "k_proj_weight", "v_proj_weight"]
        for name in names + ["in_proj_bias"]:
            if getattr(mha, name) is not None:
                setattr(new, name, getattr(mha, name))
        new.out_proj = mha.out_proj
        ref = mha.out_proj.weight
        return new.to(device=ref.device, dtype=ref.dtype)

    @torch.jit.unused
    def forward(  # type: ignore[override]
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Optional[Tensor] = None,
        need_weights: bool = True,
        attn_mask: Optional[Tensor] = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, None]:
        """``nn.MultiheadAttention.forward``: (L, B, E) or (B, L, E) with ``batch_first``, or (L, E).

        Returns:
            (output shaped like ``query``, None).
        """
        _refuse_masks(attn_mask, is_causal)
        self_attention = self.context_dim is None
        if self_attention and (key.shape[:-1] != query.shape[:-1] or value.shape[:-1] != query.shape[:-1]):
            raise ValueError(
                f"AgentMultiheadAttention: this layer is self-attention (keys and values on the query tokens), got "
                f"query {tuple(query.shape)}, key {tuple(key.shape)}; build it with cross_attention=True for keys "
                "and values from another sequence"
            )
        batched = query.dim() == 3
        if not batched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
        if not self.batch_first or not batched:  # (L, B, E) -> (B, L, E)
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        b_q = b_k = b_v = None
        if self.in_proj_bias is not None:
            b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        if self.in_proj_weight is not None:
            w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        else:
            w_q, w_k, w_v = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        q = torch.nn.functional.linear(query, w_q, b_q)  # (B, L, E)
        k = torch.nn.functional.linear(key, w_k, b_k)  # (B, M, E)
        v = torch.nn.functional.linear(value, w_v, b_v)
        pad = _bool_padding(key_padding_mask)
        L = q.shape[1]
        layout = [L] if self.rank == 1 else list(self.feat_size)
        if math.prod(layout) != L:
            raise ValueError(f"AgentMultiheadAttention: got {L} tokens, the layout {tuple(layout)} has {math.prod(layout)}")
        if self_attention:
            out = self.attend(q, k, v, layout, pad, pad, False)
        else:
            out = self.attend(q, k, v, layout, pad, None, True)
        out = self.out_proj(out)  # (B, L, E)
        if not self.batch_first or not batched:
            out = out.transpose(0, 1)
        return (out if batched else out.squeeze(1)), None


def _bool_padding(mask: Optional[Tensor]) -> Optional[Tensor]:
    """A key padding mask as bool (True = padded): bool as is, float 0 / -inf (PyTorch's canonical form)."""
    if mask is None or mask.dtype == torch.bool:
        return mask
    pad = torch.isneginf(mask)
    if not torch.all(pad | (mask == 0)):
        raise ValueError("AgentMultiheadAttention: a float key_padding_mask must hold only 0 (keep) and -inf "
                         "(padded); agent attention cannot add arbitrary per-key scores")
    return pad


def register_fx_leaves() -> None:
    """Keep the agent layers as single calls in timm's (and torchvision's) FX tracing: their token-count
    checks and bias interpolation branch on shapes, which symbolic tracing cannot follow.

    Called by :mod:`agentlit.models` (imported together with timm); the core itself never imports
    timm, so importing it first cannot leave the model registry half done.
    """
    from timm.layers import register_notrace_module

    register_notrace_module(AgentAttention)
    register_notrace_module(AgentMultiheadAttention)
