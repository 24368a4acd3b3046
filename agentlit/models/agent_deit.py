"""Agent-DeiT (docs/reference.md §2): timm's VisionTransformer with agent attention in its first blocks.

Registered in timm as ``agent_deit_tiny`` / ``agent_deit_small`` / ``agent_deit_base``. State-dict
names equal the official release's (``blocks.N.attn.{qkv,proj,dwc,an_bias,…}``), so
:func:`checkpoint_filter_fn` only unwraps, resizes and passes through.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs, register_model
from timm.models.vision_transformer import Block, VisionTransformer, init_weights_vit_timm
from timm.models.vision_transformer import checkpoint_filter_fn as vit_checkpoint_filter_fn

from ..core import AgentAttention, to_grid
from ..core.recompute import rebuild_norm_later
from ._helpers import adapt_agent_biases, pretrained_cfg, unwrap_checkpoint
from ._policy import no_weight_decay_names

__all__ = ["AgentBlock", "AgentVisionTransformer", "checkpoint_filter_fn"]


class AgentBlock(Block):
    """timm's ViT block (same submodules and names) whose attention input, the norm1 output, is rebuilt
    in the backward pass by an agent layer rather than kept (:mod:`agentlit.core.recompute`)."""

    def forward(self, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
        y = self.norm1(x)
        if not torch.jit.is_scripting():
            rebuild_norm_later(self.norm1, x, y)
        x = x + self.drop_path1(self.ls1(self.attn(y, attn_mask=attn_mask, is_causal=is_causal)))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class AgentVisionTransformer(VisionTransformer):
    """A DeiT/ViT whose first ``agent_layers`` blocks use :class:`AgentAttention`.

    Args:
        agent_num: agents per agent layer (square int or (ph, pw) grid), at most the patch grid.
        agent_layers: how many leading blocks use agent attention (None: all of them; the paper
            uses all 12 for tiny/small and the first 4 for base).
        **kwargs: everything timm's VisionTransformer takes (img_size, patch_size, embed_dim, …).
    """

    def __init__(self, *, agent_num: int | tuple[int, int] = 49, agent_layers: int | None = None, **kwargs: Any):
        img_size = kwargs.get("img_size", 224)
        patch_size = kwargs.get("patch_size", 16)
        img_hw = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        if not kwargs.get("dynamic_img_pad") and any(s % patch_size for s in img_hw):
            fits = sorted({(s // patch_size) * patch_size for s in img_hw} | {(s // patch_size + 1) * patch_size for s in img_hw})
            raise ValueError(
                f"img_size={img_size} is not divisible by patch_size={patch_size}; use a multiple such as {fits}"
            )
        kwargs.setdefault("block_fn", AgentBlock)
        super().__init__(**kwargs)
        depth = len(self.blocks)
        agent_layers = depth if agent_layers is None else agent_layers
        if not 0 <= agent_layers <= depth:
            raise ValueError(f"agent_layers={agent_layers} must be in [0, depth={depth}]")
        grid = tuple(self.patch_embed.grid_size)
        agents = to_grid(agent_num)
        if agents[0] > grid[0] or agents[1] > grid[1]:
            raise ValueError(
                f"agent_num={agent_num} ({agents[0]}x{agents[1]} agents) does not fit the {grid[0]}x{grid[1]} "
                f"token grid of img_size={img_size} / patch_size={patch_size}; use at most {grid[0] * grid[1]} "
                f"agents, e.g. agent_num={min(grid) ** 2 if min(grid) < 7 else 49}"
            )
        self.agent_layers = agent_layers
        for blk in self.blocks[:agent_layers]:
            old = blk.attn
            blk.attn = AgentAttention(
                self.embed_dim,
                old.num_heads,
                feat_size=grid,
                agent_num=agents,
                num_prefix_tokens=self.num_prefix_tokens,
                qkv_bias=old.qkv.bias is not None,
                attn_drop=kwargs.get("attn_drop_rate", 0.0),
                proj_drop=kwargs.get("proj_drop_rate", 0.0),
            )
            # Same init as the rest of the ViT (and the official code): trunc-normal linears.
            blk.attn.apply(init_weights_vit_timm)
            # on the device / dtype timm's factory asked for (create_model(device=, dtype=), meta included)
            ref = self.patch_embed.proj.weight
            blk.attn.to(device=ref.device, dtype=ref.dtype)

    def _agent_attentions(self) -> list[AgentAttention]:
        return [blk.attn for blk in self.blocks[: self.agent_layers]]

    @torch.jit.unused
    def _sync_feat_size(self, x: Tensor) -> None:
        # Blocks only see (B, L, C); tell the agent layers which map the tokens form.
        if self.dynamic_img_size:
            grid = tuple(self.patch_embed.dynamic_feat_size(x.shape[-2:]))
        else:
            grid = tuple(self.patch_embed.grid_size)
        for attn in self._agent_attentions():
            attn.feat_size = grid

    def forward_features(self, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
        # timm's VisionTransformer.forward_features, spelled out (TorchScript has no super()); the
        # scripted model runs at its configured grid, eager / FX also at dynamic sizes.
        if not torch.jit.is_scripting():
            self._sync_feat_size(x)
        x = self.patch_embed(x)
        x = self._pos_embed(x)
        x = self.patch_drop(x)
        x = self.norm_pre(x)
        if attn_mask is not None or is_causal:
            for blk in self.blocks:
                x = blk(x, attn_mask=attn_mask, is_causal=is_causal)
        elif self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.blocks, x)
        else:
            x = self.blocks(x)
        return self.norm(x)

    def forward_intermediates(self, x: Tensor, *args: Any, **kwargs: Any):
        self._sync_feat_size(x)
        return super().forward_intermediates(x, *args, **kwargs)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Position embedding, class token and agent biases (see :mod:`agentlit.models._policy`)."""
        return no_weight_decay_names(self)


def checkpoint_filter_fn(state_dict: dict[str, Any], model: AgentVisionTransformer, **kwargs: Any) -> dict[str, Tensor]:
    """Map an official Agent-DeiT checkpoint (or one of ours) onto ``model``.

    Unwraps ``{'model': …}``, resamples the position embedding / patch embedding (timm's ViT
    filter), and resizes agent biases to the model's map size and agent grid.
    """
    state_dict = unwrap_checkpoint(state_dict)
    state_dict = vit_checkpoint_filter_fn(state_dict, model, **kwargs)
    return adapt_agent_biases(state_dict, model)


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> AgentVisionTransformer:
    return build_model_with_cfg(
        AgentVisionTransformer,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=3, feature_cls="getter"),
        **kwargs,
    )


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return pretrained_cfg("patch_embed.proj", pool_size=None, crop_pct=0.875, fixed_input_size=True, **kwargs)


# Official weights are published outside the hub: pass them with pretrained_cfg_overlay=dict(file=...).
default_cfgs = generate_default_cfgs(
    {
        "agent_deit_tiny.in1k": _cfg(),
        "agent_deit_small.in1k": _cfg(),
        "agent_deit_base.in1k": _cfg(),
    }
)


@register_model
def agent_deit_tiny(pretrained: bool = False, **kwargs: Any) -> AgentVisionTransformer:
    """Agent-DeiT-T: 6.0M params, 49 agents in all 12 blocks."""
    args = dict(patch_size=16, embed_dim=192, depth=12, num_heads=3, agent_num=49, agent_layers=None)
    return _create("agent_deit_tiny", pretrained, **{**args, **kwargs})


@register_model
def agent_deit_small(pretrained: bool = False, **kwargs: Any) -> AgentVisionTransformer:
    """Agent-DeiT-S: 22.7M params, 49 agents in all 12 blocks."""
    args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6, agent_num=49, agent_layers=None)
    return _create("agent_deit_small", pretrained, **{**args, **kwargs})


@register_model
def agent_deit_base(pretrained: bool = False, **kwargs: Any) -> AgentVisionTransformer:
    """Agent-DeiT-B: 87.2M params, 81 agents in the first 4 blocks, softmax attention after."""
    args = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, agent_num=81, agent_layers=4)
    return _create("agent_deit_base", pretrained, **{**args, **kwargs})
