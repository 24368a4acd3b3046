"""Trainable agent attention for diffusers UNets: an attention processor built on ``agentlit.core``.

AgentSD (:mod:`agentlit.diffusion.patch`) is training-free: it has no agent biases and replaces the
depthwise conv on V with a fixed ``0.075 · V`` shortcut. A model that is trained (from scratch, or
fine-tuned from a pretrained UNet) can afford the paper's learned parts, and this module adds them:

    x (B, N = h·w, C) -> Q, K, V = to_q(x), to_k(x), to_v(x)                      # (B, N, C)
    A   = adaptive_avg_pool(Q laid out as (B, C, h, w)) to the (ph, pw) agent grid  # (B, n, C)
    O   = softmax(bs·Q Aᵀ + B2) · softmax(s·A Kᵀ + B1) · V                          # agentlit.core
    O  += DWC(V) + shortcut · V                                                    # 3x3 depthwise conv
    out = to_out(O)

with B1/B2 the agent position biases of :class:`agentlit.core.AgentPositionBias`, laid out for the
configured latent map and bilinearly interpolated to whatever (h, w) the forward pass sees.

:class:`AgentAttnProcessor` is an ``nn.Module``: diffusers' ``Attention.set_processor`` registers
it as the submodule ``processor``, so its parameters train, checkpoint and move with the UNet.
:func:`set_agent_attention` installs it on the self-attention layers of chosen resolutions of a
``UNet2DModel`` / ``UNet2DConditionModel``; ``attention="softmax"`` leaves diffusers' own
processors in place, so both variants come from one config.
"""
from __future__ import annotations

import math
import re
from typing import Any, Iterable

from torch import Tensor, nn

from ..core import AgentPositionBias, agent_attention_tokens, pool_agents, to_grid

__all__ = [
    "AgentAttnProcessor", "ATTENTION_TYPES", "agent_processors", "attention_levels", "head_norm", "latent_size_cell",
    "set_agent_attention",
]

ATTENTION_TYPES = ("agent", "softmax")


class AgentAttnProcessor(AgentPositionBias):
    """Agent attention with learned position biases and a depthwise conv on V, for one diffusers
    ``Attention`` layer (self-attention only; cross-attention calls go to softmax attention).

    Handles the layouts diffusers uses: (B, N, C) token sequences in transformer blocks and
    (B, C, h, w) maps in ``UNet2DModel``'s attention blocks (with their group norm and residual).

    Args:
        dim: inner width of the layer (``to_q`` output features).
        num_heads: heads of the layer.
        feat_size: (h, w) latent map the biases are laid out for; other sizes are interpolated.
        agent_num: agents, a square count or an (ph, pw) grid.
        dwc_kernel: depthwise conv kernel on V (0: none).
        zero_init: start biases and the DWC at zero, so the layer begins as training-free agent
            attention (what fine-tuning from a pretrained softmax UNet wants); else biases are drawn
            from trunc_normal(0.02) as in the paper and the DWC uses PyTorch's default init.
        broadcast_scale_exp: the broadcast softmax uses ``scale ** broadcast_scale_exp`` (1: the
            paper's vision models; 0.3: AgentSD's sharper softmax).
        shortcut: weight of a fixed ``shortcut · V`` term (AgentSD's training-free stand-in for the
            DWC, 0.075; 0 for models trained with agent attention from the start).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        feat_size: int | tuple[int, int],
        agent_num: int | tuple[int, int] = 16,
        dwc_kernel: int = 3,
        zero_init: bool = False,
        broadcast_scale_exp: float = 1.0,
        shortcut: float = 0.0,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"AgentAttnProcessor: dim={dim} is not divisible by num_heads={num_heads}")
        self.dim, self.num_heads = dim, num_heads
        self.feat_size = to_grid(feat_size * feat_size if isinstance(feat_size, int) else feat_size, "feat_size")
        self.agent_grid = to_grid(agent_num)
        check_agent_grid(self.agent_grid, self.feat_size)
        self.broadcast_scale_exp, self.shortcut = broadcast_scale_exp, shortcut
        self.dwc = nn.Conv2d(dim, dim, dwc_kernel, padding=dwc_kernel // 2, groups=dim) if dwc_kernel else None
        self._init_biases(num_heads, self.agent_grid, self.feat_size, 0)
        if zero_init:
            for p in self.bias_parameters():
                nn.init.zeros_(p)
            if self.dwc is not None:
                nn.init.zeros_(self.dwc.weight)
                nn.init.zeros_(self.dwc.bias)
        # Latent (H, W) of the current UNet call, set by set_agent_attention's UNet pre-hook; it
        # lets a (B, N, C) sequence be laid out as a map even when the map is not square.
        self.latent_size: list[tuple[int, int] | None] = [None]

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, heads={self.num_heads}, agents={self.agent_grid}, feat_size={self.feat_size}, "
                f"broadcast_scale_exp={self.broadcast_scale_exp}, shortcut={self.shortcut}")

    def map_size(self, n_tokens: int) -> tuple[int, int]:
        """(h, w) of a sequence of ``n_tokens`` latent tokens."""
        size = self.latent_size[0]
        if size is not None:
            H, W = size
            down = max(1, round(math.sqrt(H * W / n_tokens)))
            h, w = math.ceil(H / down), math.ceil(W / down)
            if h * w == n_tokens:
                return h, w
        side = math.isqrt(n_tokens)
        if side * side != n_tokens:
            raise ValueError(
                f"AgentAttnProcessor: cannot lay out {n_tokens} tokens as a latent map; call the UNet through "
                "set_agent_attention's hook or use square latents"
            )
        return side, side

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        temb: Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> Tensor:
        if encoder_hidden_states is not None or attention_mask is not None:
            # Agents pool every query: a mask would leak through them, and cross-attention has no
            # map to pool. Diffusers' own softmax processor serves those calls unchanged.
            from diffusers.models.attention_processor import AttnProcessor2_0

            return AttnProcessor2_0()(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            B, C_in, h, w = hidden_states.shape
            hidden_states = hidden_states.view(B, C_in, h * w).transpose(1, 2)  # (B, N, C)
        else:
            B, N, _ = hidden_states.shape
            h, w = self.map_size(N)
        check_agent_grid(self.agent_grid, (h, w))
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)  # (B, N, C)
        layout, grid = [h, w], list(self.agent_grid)
        agents = None
        if attn.norm_q is not None:  # agents: queries pooled before the head norm, then normed as queries
            agents = head_norm(attn.norm_q, pool_agents(q, layout, grid)[0], attn.heads)
            q = head_norm(attn.norm_q, q, attn.heads)
        if attn.norm_k is not None:
            k = head_norm(attn.norm_k, k, attn.heads)
        agent_bias, query_bias = self.biases_for(q, layout, shortcut=self.shortcut)  # (1, H, n, N), (1, H, N, n)
        dwc = self.dwc
        scale = attn.scale
        out = agent_attention_tokens(
            q, k, v, attn.heads, layout, grid, agents=agents, agent_bias=agent_bias, query_bias=query_bias,
            dwc_weight=None if dwc is None else dwc.weight, dwc_bias=None if dwc is None else dwc.bias,
            shortcut=self.shortcut, scale=scale, broadcast_scale=scale**self.broadcast_scale_exp,
        )  # (B, N, C)
        out = attn.to_out[1](attn.to_out[0](out.to(q.dtype)))  # linear, dropout
        if input_ndim == 4:
            out = out.transpose(1, 2).reshape(B, -1, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def head_norm(norm: nn.Module, t: Tensor, heads: int) -> Tensor:
    """A per-head norm (diffusers' ``norm_q`` / ``norm_k``, over the head dim) on (B, T, C) tokens."""
    B, T, C = t.shape
    return norm(t.reshape(B, T, heads, C // heads)).reshape(B, T, C)


def check_agent_grid(agent_grid: tuple[int, int], size: tuple[int, int]) -> None:
    """Raise when the agent grid cannot be pooled from an (h, w) latent map (more agents than tokens per side)."""
    if agent_grid[0] > size[0] or agent_grid[1] > size[1]:
        raise ValueError(
            f"agent grid {agent_grid[0]}x{agent_grid[1]} cannot be pooled from a {size[0]}x{size[1]} latent map; "
            f"use at most {size[0]}x{size[1]} = {size[0] * size[1]} agents there, or apply agent attention "
            "only at larger resolutions (`agent_downsample`)"
        )


_LEVEL = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.|^mid_block\.")


def attention_levels(unet: nn.Module) -> dict[str, tuple[int, bool]]:
    """``{attention module name: (downsampling factor, is self-attention)}`` for every diffusers
    ``Attention`` of a UNet2DModel / UNet2DConditionModel, read from the block layout: down block i
    and up block L-1-i work at factor 2**i, the mid block at the coarsest one."""
    from diffusers.models.attention_processor import Attention

    n_levels = len(unet.config.block_out_channels)
    out: dict[str, tuple[int, bool]] = {}
    for name, mod in unet.named_modules():
        if not isinstance(mod, Attention):
            continue
        m = _LEVEL.match(name)
        if m is None:
            continue
        if m.group(1) == "down_blocks":
            level = int(m.group(2))
        elif m.group(1) == "up_blocks":
            level = n_levels - 1 - int(m.group(2))
        else:
            level = n_levels - 1
        out[name] = (2**level, not mod.is_cross_attention)
    return out


def set_agent_attention(
    unet: nn.Module,
    attention: str = "agent",
    agent_downsample: Iterable[int] = (1,),
    agent_num: int | tuple[int, int] = 16,
    dwc_kernel: int = 3,
    zero_init: bool = False,
    broadcast_scale_exp: float = 1.0,
    shortcut: float = 0.0,
) -> list[str]:
    """Give the self-attention layers of a diffusers UNet agent attention, in place.

    Args:
        unet: a ``UNet2DModel`` or ``UNet2DConditionModel``.
        attention: "agent" installs :class:`AgentAttnProcessor`; "softmax" keeps diffusers' processors.
        agent_downsample: latent downsampling factors (1 = full latent resolution, 2 = half …) whose
            self-attention uses agents; other resolutions keep softmax attention.
        agent_num: agents per layer (a square count or an (ph, pw) grid).
        dwc_kernel: depthwise conv kernel on V (0: none).
        zero_init: zero biases and DWC (fine-tuning a pretrained UNet; see :class:`AgentAttnProcessor`).
        broadcast_scale_exp: exponent of the broadcast softmax scale (AgentSD: 0.3).
        shortcut: weight of the fixed V shortcut (AgentSD: 0.075).

    Returns:
        The names of the attention modules that got agent attention.
    """
    if attention not in ATTENTION_TYPES:
        raise ValueError(f"attention must be one of {list(ATTENTION_TYPES)}, got {attention!r}")
    if attention == "softmax":
        return []
    wanted = {int(f) for f in agent_downsample}
    levels = attention_levels(unet)
    sample = unet.config.sample_size
    sample = (sample, sample) if isinstance(sample, int) else tuple(sample)
    available = sorted({f for f, is_self in levels.values() if is_self})
    missing = sorted(wanted - set(available))
    if missing:
        raise ValueError(
            f"agent_downsample {missing} has no self-attention layer in this UNet; its self-attention layers are "
            f"at downsampling factors {available}"
        )
    latent = latent_size_cell(unet)
    names = []
    modules = dict(unet.named_modules())
    for name, (factor, is_self) in levels.items():
        if not is_self or factor not in wanted:
            continue
        attn = modules[name]
        size = (math.ceil(sample[0] / factor), math.ceil(sample[1] / factor))
        proc = AgentAttnProcessor(
            attn.to_q.out_features, attn.heads, size, agent_num, dwc_kernel=dwc_kernel, zero_init=zero_init,
            broadcast_scale_exp=broadcast_scale_exp, shortcut=shortcut,
        ).to(device=attn.to_q.weight.device, dtype=attn.to_q.weight.dtype)
        proc.latent_size = latent
        attn.set_processor(proc)
        names.append(name)
    return names


def latent_size_cell(unet: nn.Module) -> list[tuple[int, int] | None]:
    """The one latent-size cell shared by every processor of ``unet`` (a deepcopy, e.g. an EMA copy,
    gets its own), filled by a forward pre-hook (installed once) from the sample of each call.

    Args:
        unet: a ``UNet2DModel`` / ``UNet2DConditionModel``.
    """
    if not hasattr(unet, "_agent_latent_size"):
        unet._agent_latent_size = [None]
        unet.register_forward_pre_hook(_record_latent_size, with_kwargs=True)
    return unet._agent_latent_size


def _record_latent_size(module: nn.Module, args: tuple, kwargs: dict) -> None:
    sample = args[0] if args else kwargs.get("sample")
    module._agent_latent_size[0] = (sample.shape[-2], sample.shape[-1])


def agent_processors(unet: nn.Module) -> dict[str, AgentAttnProcessor]:
    """The :class:`AgentAttnProcessor` of each attention layer that has one."""
    return {name: mod for name, mod in unet.named_modules() if isinstance(mod, AgentAttnProcessor)}
