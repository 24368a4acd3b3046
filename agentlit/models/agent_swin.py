"""Agent-Swin (docs/reference.md §2): timm's Swin Transformer with global agent blocks in its early stages.

Registered in timm as ``agent_swin_tiny`` ("AAAB"), ``agent_swin_small`` ("AABB") and
``agent_swin_base`` ("AAMB2": stage 3 has 2 agent blocks, then Swin blocks), agents 9-16-49-49.
Agent blocks attend over the whole stage map (no window, no shift); "B" blocks are timm's own
windowed Swin blocks, so the baseline is timm's ``swin_*_patch4_window7_224``.

The official release stores agent blocks as window attention with the window equal to the stage
(56/28/14): their parameters are exactly :class:`agentlit.core.AgentAttention`'s (``attn.qkv``,
``attn.proj``, ``attn.dwc``, ``attn.*_bias``), so the names match; :func:`checkpoint_filter_fn`
only applies timm's Swin conversion (downsample moved to the next stage, ``head`` → ``head.fc``,
precomputed ``attn_mask`` / ``relative_position_index`` dropped) and resizes what is resolution-bound.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from timm.layers import DropPath, Mlp
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.swin_transformer import SwinTransformer
from timm.models.swin_transformer import checkpoint_filter_fn as swin_checkpoint_filter_fn
from timm.models.vision_transformer import init_weights_vit_timm

from ..core import AgentAttention, to_grid
from ..core.recompute import rebuild_norm_later
from ._helpers import adapt_agent_biases, pretrained_cfg, unwrap_checkpoint
from ._policy import no_weight_decay_names
from ._stages import expand_attn_types, per_stage

__all__ = ["AgentSwinBlock", "AgentSwinTransformer", "checkpoint_filter_fn"]


class AgentSwinBlock(nn.Module):
    """A Swin block whose attention is global agent attention over the stage map.

    x (B, H, W, C) → (B, H, W, C), like timm's ``SwinTransformerBlock`` (same submodule names).
    """

    def __init__(self, dim: int, num_heads: int, *, feat_size: tuple[int, int], agent_num: int | tuple[int, int] = 49,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, proj_drop: float = 0.0, attn_drop: float = 0.0,
                 drop_path: float = 0.0, norm_layer: type[nn.Module] = nn.LayerNorm) -> None:
        super().__init__()
        self.dim, self.input_resolution = dim, tuple(feat_size)
        self.norm1 = norm_layer(dim)
        self.attn = AgentAttention(dim, num_heads, feat_size=feat_size, agent_num=agent_num, qkv_bias=qkv_bias,
                                   attn_drop=attn_drop, proj_drop=proj_drop)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=proj_drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def set_input_size(self, feat_size: tuple[int, int], window_size: Any = None, always_partition: Any = None) -> None:
        # Nothing is precomputed for a map size: biases are interpolated on every forward.
        self.input_resolution = tuple(feat_size)

    def forward(self, x: Tensor) -> Tensor:
        B, H, W, C = x.shape
        y = self.norm1(x).reshape(B, H * W, C)
        if not torch.jit.is_scripting():
            rebuild_norm_later(self.norm1, x, y)  # the agent layer's qkv rebuilds y rather than keeping it
        y = self.attn(y, (H, W)).reshape(B, H, W, C)
        x = x + self.drop_path1(y)
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class AgentSwinTransformer(SwinTransformer):
    """timm's SwinTransformer with per-stage attention types.

    Args:
        attn_type: per-stage letters, "A" agent (global), "B" Swin window attention, "M" mixed
            (first k blocks agent, k = trailing digit, default 2), e.g. "AAAB", "AABB", "AAMB2".
        agent_num: agents per stage (square ints or (ph, pw) grids), e.g. (9, 16, 49, 49), or the
            dense-prediction grids ((9, 9), (12, 12), (14, 14), (7, 7)).
        **kwargs: everything timm's SwinTransformer takes (img_size, embed_dim, depths, num_heads,
            window_size, dynamic_img_size, …).
    """

    def __init__(self, *, attn_type: str = "AAAB", agent_num: Any = (9, 16, 49, 49), **kwargs: Any) -> None:
        super().__init__(**kwargs)
        depths = [len(stage.blocks) for stage in self.layers]
        types = expand_attn_types(attn_type, depths)
        agents = [to_grid(a, f"agent_num[{i}]") for i, a in enumerate(per_stage(agent_num, len(depths), "agent_num"))]
        self.attn_types = ["".join(t) for t in types]
        for i, stage in enumerate(self.layers):
            for j, blk in enumerate(stage.blocks):
                if types[i][j] != "A":
                    continue
                new = AgentSwinBlock(
                    blk.dim, blk.attn.num_heads, feat_size=stage.output_resolution, agent_num=agents[i],
                    mlp_ratio=blk.mlp_ratio, qkv_bias=blk.attn.qkv.bias is not None,
                    proj_drop=kwargs.get("proj_drop_rate", 0.0), attn_drop=kwargs.get("attn_drop_rate", 0.0),
                    drop_path=getattr(blk.drop_path1, "drop_prob", 0.0),
                )
                new.apply(init_weights_vit_timm)  # the same trunc-normal init as the rest of the Swin
                # on the device / dtype timm's factory asked for (create_model(device=, dtype=), meta included)
                ref = self.patch_embed.proj.weight
                stage.blocks[j] = new.to(device=ref.device, dtype=ref.dtype)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Swin's relative-position tables plus every agent bias (see :mod:`agentlit.models._policy`)."""
        return no_weight_decay_names(self)


def checkpoint_filter_fn(state_dict: dict[str, Any], model: AgentSwinTransformer) -> dict[str, Tensor]:
    """Map an official Agent-Swin checkpoint (or one of ours) onto ``model``.

    Unwraps ``{'model': …}``, applies timm's Swin conversion (old downsample layout, classifier name,
    drops the masks / indices the model rebuilds, resizes relative-position tables), then resizes the
    agent biases to the model's stage maps and agent grids.
    """
    state_dict = unwrap_checkpoint(state_dict)
    state_dict = swin_checkpoint_filter_fn(state_dict, model)
    return adapt_agent_biases(state_dict, model)


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> AgentSwinTransformer:
    return build_model_with_cfg(
        AgentSwinTransformer,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=(0, 1, 2, 3), feature_cls="getter"),  # NCHW maps
        **kwargs,
    )


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return pretrained_cfg("patch_embed.proj", fixed_input_size=True, classifier="head.fc", **kwargs)


# No hub weights: official checkpoints load with pretrained_cfg_overlay=dict(file=...).
default_cfgs = generate_default_cfgs({f"agent_swin_{s}.in1k": _cfg() for s in ("tiny", "small", "base")})

_AGENTS = (9, 16, 49, 49)


@register_model
def agent_swin_tiny(pretrained: bool = False, **kwargs: Any) -> AgentSwinTransformer:
    """Agent-Swin-T: 29M params, 4.5G MACs; agent stages 1-3, Swin stage 4 ("AAAB")."""
    args = dict(patch_size=4, window_size=7, embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24),
                attn_type="AAAB", agent_num=_AGENTS)
    return _create("agent_swin_tiny", pretrained, **{**args, **kwargs})


@register_model
def agent_swin_small(pretrained: bool = False, **kwargs: Any) -> AgentSwinTransformer:
    """Agent-Swin-S: 50M params, 8.7G MACs; agent stages 1-2 ("AABB")."""
    args = dict(patch_size=4, window_size=7, embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24),
                attn_type="AABB", agent_num=_AGENTS)
    return _create("agent_swin_small", pretrained, **{**args, **kwargs})


@register_model
def agent_swin_base(pretrained: bool = False, **kwargs: Any) -> AgentSwinTransformer:
    """Agent-Swin-B: 88M params, 15.4G MACs; agent stages 1-2 and the first 2 blocks of stage 3 ("AAMB2")."""
    args = dict(patch_size=4, window_size=7, embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32),
                attn_type="AAMB2", agent_num=_AGENTS)
    return _create("agent_swin_base", pretrained, **{**args, **kwargs})
