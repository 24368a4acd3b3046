"""Agent-PVT and its baseline PVT (v1) (docs/reference.md §2): a 4-stage pyramid of plain transformer blocks.

Registered in timm as ``agent_pvt_{tiny,small,medium,large}`` (agent attention in every block, no
spatial reduction: "AAAA", agents 9-16-49-49) and ``pvt_v1_{tiny,small,medium,large}`` (the same
network with PVT's spatial-reduction attention everywhere: "BBBB", sr ratios 8-4-2-1).

Layout follows the official release (``patch_embed{1..4}``, ``pos_embed{1..4}``, ``block{1..4}.N``,
``head``; no class token and no final norm: stage-4 tokens are averaged into the head). Agent blocks
are :class:`agentlit.core.AgentAttention` with a fused ``qkv``; the official agent blocks keep PVT's
separate ``attn.q`` / ``attn.kv``, which :func:`checkpoint_filter_fn` concatenates.
"""
# No ``from __future__ import annotations``: FX copies forward()'s annotations into the traced
# module's code, and TorchScript then needs them as real types, not strings.
import re
from typing import Any, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from timm.layers import DropPath, Mlp, trunc_normal_
from timm.models import register_notrace_function
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices

from ..core import AgentAttention, to_grid
from ..core.recompute import rebuild_norm_later
from ._helpers import adapt_agent_biases, pretrained_cfg, unwrap_checkpoint
from ._policy import no_weight_decay_names
from ._stages import expand_attn_types, per_stage, run_blocks

__all__ = ["AgentPVT", "PVTAttention", "PVTBlock", "checkpoint_filter_fn"]


class PVTPatchEmbed(nn.Module):
    """Non-overlapping patch conv + LayerNorm: (B, C, H, W) → (B, h·w, D), (h, w)."""

    def __init__(self, in_chans: int, embed_dim: int, patch_size: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim)  # eps 1e-5, as the official patch embeds

    def forward(self, x: Tensor) -> Tuple[Tensor, Tuple[int, int]]:
        x = self.proj(x)  # (B, D, h, w)
        h, w = x.shape[-2], x.shape[-1]  # indexed, not unpacked: FX traces it
        return self.norm(x.flatten(2).transpose(1, 2)), (h, w)


class PVTAttention(nn.Module):
    """PVT's spatial-reduction attention: keys/values from the map downsampled by ``sr_ratio``.

    x (B, h·w, C) → (B, h·w, C). Names follow the official code: ``q``, ``kv``, ``sr``, ``norm``, ``proj``.
    """

    def __init__(self, dim: int, num_heads: int, *, sr_ratio: int = 1, qkv_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"PVTAttention: dim={dim} is not divisible by num_heads={num_heads}")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.sr_ratio = sr_ratio
        self.sr: Optional[nn.Module] = None  # None attributes: TorchScript resolves the branch statically
        self.norm: Optional[nn.Module] = None
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio)
            self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor, feat_size: Tuple[int, int]) -> Tensor:
        B, N, C = x.shape
        H, d = self.num_heads, self.head_dim
        q = self.q(x).reshape(B, N, H, d).transpose(1, 2)  # (B, H, N, d)
        if self.sr is not None:
            x = self.sr(x.transpose(1, 2).reshape(B, C, feat_size[0], feat_size[1])).flatten(2).transpose(1, 2)  # (B, M, C)
            x = self.norm(x)
        k, v = self.kv(x).reshape(B, -1, 2, H, d).permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, M, d)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, N, C)))


class PVTBlock(nn.Module):
    """Pre-norm transformer block over an (h, w) token map with agent ("A") or SR ("B") attention."""

    def __init__(self, dim: int, num_heads: int, *, feat_size: tuple[int, int], attn_type: str = "A",
                 agent_num: int | tuple[int, int] = 49, sr_ratio: int = 1, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, proj_drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        if attn_type == "A":
            self.attn: nn.Module = AgentAttention(
                dim, num_heads, feat_size=feat_size, agent_num=agent_num, qkv_bias=qkv_bias,
                attn_drop=attn_drop, proj_drop=proj_drop,
            )
        else:
            self.attn = PVTAttention(dim, num_heads, sr_ratio=sr_ratio, qkv_bias=qkv_bias,
                                     attn_drop=attn_drop, proj_drop=proj_drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=proj_drop)

    def forward(self, x: Tensor, feat_size: Tuple[int, int]) -> Tensor:
        y = self.norm1(x)
        if not torch.jit.is_scripting():
            rebuild_norm_later(self.norm1, x, y)  # an agent layer's qkv rebuilds y rather than keeping it
        x = x + self.drop_path(self.attn(y, feat_size))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class AgentPVT(nn.Module):
    """PVT (v1) pyramid whose stages use agent ("A") or spatial-reduction ("B") attention.

    Args:
        img_size: training resolution (int or (H, W)); sets the position-embedding / bias grids.
            Any other input size works: position embeddings and biases are interpolated.
        embed_dims, num_heads, mlp_ratios, depths, sr_ratios: PVT's per-stage settings.
        attn_type: per-stage letters, e.g. "AAAA" (Agent-PVT) or "BBBB" (PVT); see :func:`expand_attn_types`.
        agent_num: agents per stage (square ints or (ph, pw) grids), e.g. (9, 16, 49, 49), or the
            dense-prediction grids ((12, 12), (16, 16), (28, 28), (28, 28)).
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 4,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        embed_dims: Sequence[int] = (64, 128, 320, 512),
        num_heads: Sequence[int] = (1, 2, 5, 8),
        mlp_ratios: Sequence[float] = (8, 8, 4, 4),
        depths: Sequence[int] = (2, 2, 2, 2),
        sr_ratios: Sequence[int] = (8, 4, 2, 1),
        attn_type: str = "AAAA",
        agent_num: Any = (9, 16, 49, 49),
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        device: Any = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        n = len(depths)
        img_hw = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        types = expand_attn_types(attn_type, depths)
        agents = [to_grid(a, f"agent_num[{i}]") for i, a in enumerate(per_stage(agent_num, n, "agent_num"))]
        self.num_classes, self.global_pool, self.num_stages = num_classes, global_pool, n
        self.in_chans = in_chans
        self.embed_dims = list(embed_dims)
        self.num_features = self.head_hidden_size = embed_dims[-1]
        self.drop_rate = drop_rate
        self.attn_types = ["".join(t) for t in types]
        dpr = [drop_path_rate * j / max(sum(depths) - 1, 1) for j in range(sum(depths))]  # linspace, meta-safe
        self.grid_sizes: list[tuple[int, int]] = []
        self.feature_info: list[dict[str, Any]] = []
        grid, cur, reduction = img_hw, 0, 1
        for i in range(n):
            p = patch_size if i == 0 else 2
            grid, reduction = (grid[0] // p, grid[1] // p), reduction * p
            if min(grid) < 1:
                raise ValueError(f"img_size={img_size} is too small for {n} stages (stage {i + 1} map would be empty)")
            self.grid_sizes.append(grid)
            setattr(self, f"patch_embed{i + 1}", PVTPatchEmbed(in_chans if i == 0 else embed_dims[i - 1], embed_dims[i], p))
            setattr(self, f"pos_embed{i + 1}", nn.Parameter(torch.zeros(1, grid[0] * grid[1], embed_dims[i])))
            setattr(self, f"block{i + 1}", nn.ModuleList([
                PVTBlock(embed_dims[i], num_heads[i], feat_size=grid, attn_type=types[i][j], agent_num=agents[i],
                         sr_ratio=sr_ratios[i], mlp_ratio=mlp_ratios[i], qkv_bias=qkv_bias, proj_drop=proj_drop_rate,
                         attn_drop=attn_drop_rate, drop_path=dpr[cur + j])
                for j in range(depths[i])
            ]))
            cur += depths[i]
            self.feature_info.append(dict(num_chs=embed_dims[i], reduction=reduction, module=f"block{i + 1}"))
        self.pos_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.grad_checkpointing = False
        self.init_weights()
        if device is not None or dtype is not None:  # timm's factory: create_model(device=, dtype=)
            self.to(device=device, dtype=dtype)

    @torch.jit.ignore
    def init_weights(self) -> None:
        for i in range(self.num_stages):
            trunc_normal_(getattr(self, f"pos_embed{i + 1}"), std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Position embeddings and agent biases (see :mod:`agentlit.models._policy`)."""
        return no_weight_decay_names(self)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        blocks = [(r"^block(\d+)\.(\d+)", None), (r"^(?:patch|pos)_embed(\d+)", (0,))]
        return dict(stem=r"^patch_embed1|^pos_embed1", blocks=blocks)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute every block's activations in backward instead of storing them (timm's contract).

        Args:
            enable: on or off.
        """
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = global_pool
        ref = next(self.parameters())  # the new head on the model's device / dtype (meta included)
        self.head = nn.Linear(self.num_features, num_classes, device=ref.device, dtype=ref.dtype) \
            if num_classes > 0 else nn.Identity()
        self.head.train(self.training)

    @torch.jit.unused
    def _pos_embed(self, i: int, feat_size: Tuple[int, int]) -> Tensor:
        """Stage i's position embedding for an (h, w) map (see :func:`resize_pos_embed`)."""
        return resize_pos_embed(getattr(self, f"pos_embed{i + 1}"), self.grid_sizes[i], feat_size)

    @torch.jit.unused
    def _stage(self, i: int, x: Tensor) -> Tensor:
        """Stage i: (B, C_in, H, W) → (B, C_i, h, w)."""
        x, hw = getattr(self, f"patch_embed{i + 1}")(x)
        x = self.pos_drop(x + resize_pos_embed(getattr(self, f"pos_embed{i + 1}"), self.grid_sizes[i], hw))
        x = run_blocks(getattr(self, f"block{i + 1}"), x, hw, self.grad_checkpointing)
        return x.transpose(1, 2).reshape(x.shape[0], -1, hw[0], hw[1])

    def forward_features(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) → last-stage map (B, C4, H/32, W/32)."""
        if torch.jit.is_scripting():
            return self._forward_features_scripted(x)
        for i in range(self.num_stages):
            x = self._stage(i, x)
        return x

    def _forward_features_scripted(self, x: Tensor) -> Tensor:
        # TorchScript cannot look modules up by a computed name: the (at most four) stages spelled
        # out, each present unless pruned (hasattr is resolved when scripting).
        if hasattr(self, "patch_embed1"):
            x, hw = self.patch_embed1(x)
            x = self.pos_drop(x + resize_pos_embed(self.pos_embed1, self.grid_sizes[0], hw))
            for blk in self.block1:
                x = blk(x, hw)
            x = x.transpose(1, 2).reshape(x.shape[0], -1, hw[0], hw[1])
        if hasattr(self, "patch_embed2"):
            x, hw = self.patch_embed2(x)
            x = self.pos_drop(x + resize_pos_embed(self.pos_embed2, self.grid_sizes[1], hw))
            for blk in self.block2:
                x = blk(x, hw)
            x = x.transpose(1, 2).reshape(x.shape[0], -1, hw[0], hw[1])
        if hasattr(self, "patch_embed3"):
            x, hw = self.patch_embed3(x)
            x = self.pos_drop(x + resize_pos_embed(self.pos_embed3, self.grid_sizes[2], hw))
            for blk in self.block3:
                x = blk(x, hw)
            x = x.transpose(1, 2).reshape(x.shape[0], -1, hw[0], hw[1])
        if hasattr(self, "patch_embed4"):
            x, hw = self.patch_embed4(x)
            x = self.pos_drop(x + resize_pos_embed(self.pos_embed4, self.grid_sizes[3], hw))
            for blk in self.block4:
                x = blk(x, hw)
            x = x.transpose(1, 2).reshape(x.shape[0], -1, hw[0], hw[1])
        return x

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        if self.global_pool == "avg":
            x = x.mean(dim=(2, 3))  # the official model averages stage-4 tokens, no final norm
        x = F.dropout(x, self.drop_rate, self.training)
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
        self,
        x: Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[Tensor] | tuple[Tensor, list[Tensor]]:
        """timm's feature API: per-stage maps (B, C_i, H/4/2^i, W/4/2^i) for the stages in ``indices``."""
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt={output_fmt!r} is not supported; AgentPVT returns 'NCHW' maps")
        take, max_index = feature_take_indices(self.num_stages, indices)
        feats = []
        last = max_index if stop_early or intermediates_only else self.num_stages - 1
        for i in range(last + 1):
            x = self._stage(i, x)
            if i in take:
                feats.append(x)
        return feats if intermediates_only else (x, feats)

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop the stages after the last requested feature (and the head)."""
        take, max_index = feature_take_indices(self.num_stages, indices)
        for i in range(max_index + 1, self.num_stages):
            for name in (f"patch_embed{i + 1}", f"pos_embed{i + 1}", f"block{i + 1}"):
                delattr(self, name)
        self.num_stages = max_index + 1
        self.grid_sizes, self.feature_info = self.grid_sizes[: max_index + 1], self.feature_info[: max_index + 1]
        if prune_head or max_index < len(self.embed_dims) - 1:
            self.num_features = self.head_hidden_size = self.embed_dims[max_index]
            self.reset_classifier(0, "")
        return take


@register_notrace_function  # FX: one call; the size comparison below is not traceable
def resize_pos_embed(pos: Tensor, grid: Tuple[int, int], feat_size: Tuple[int, int]) -> Tensor:
    """A position embedding (1, gh·gw, C) learned on ``grid``, bilinearly resampled to ``feat_size``
    (as the official code does for other input sizes); returned as is when the sizes agree.

    Args:
        pos: (1, gh·gw, C) embedding.
        grid: (gh, gw) it was learned on.
        feat_size: (h, w) of the current map.
    """
    if feat_size[0] == grid[0] and feat_size[1] == grid[1]:
        return pos
    pos = pos.reshape(1, grid[0], grid[1], -1).permute(0, 3, 1, 2)
    pos = F.interpolate(pos, size=(feat_size[0], feat_size[1]), mode="bilinear", align_corners=False)
    return pos.flatten(2).transpose(1, 2)


_SPLIT_QKV = re.compile(r"^(?P<attn>.+\.attn)\.(?P<which>q|kv)\.(?P<leaf>weight|bias)$")


def checkpoint_filter_fn(state_dict: dict[str, Any], model: AgentPVT) -> dict[str, Tensor]:
    """Map an official (Agent-)PVT checkpoint — or one of ours — onto ``model``.

    Unwraps ``{'model': …}``; fuses the official ``attn.q`` + ``attn.kv`` of agent blocks into our
    ``attn.qkv`` (q rows, then k, then v — the order ``kv`` is split in); resamples position
    embeddings to the model's grids and agent biases to its maps / agent grids.
    """
    state_dict = unwrap_checkpoint(state_dict)
    ours = model.state_dict()
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        split = _SPLIT_QKV.match(key)
        if split and f"{split['attn']}.qkv.{split['leaf']}" in ours:
            attn, leaf = split["attn"], split["leaf"]
            if split["which"] == "q":  # the kv half is consumed here too
                kv_key = f"{attn}.kv.{leaf}"
                if kv_key not in state_dict:
                    raise KeyError(f"{key} has no matching {kv_key} in the checkpoint to fuse into {attn}.qkv.{leaf}")
                out[f"{attn}.qkv.{leaf}"] = torch.cat([value, state_dict[kv_key]], dim=0)
            continue
        if key.startswith("pos_embed") and key in ours and value.shape != ours[key].shape:
            i = int(key[len("pos_embed"):]) - 1
            side = int(round(value.shape[1] ** 0.5))
            if side * side != value.shape[1]:
                raise ValueError(f"{key}: cannot resize a non-square stored grid of {value.shape[1]} tokens")
            grid = model.grid_sizes[i]
            pos = value.reshape(1, side, side, -1).permute(0, 3, 1, 2)
            value = F.interpolate(pos.float(), size=grid, mode="bilinear", align_corners=False).to(value.dtype)
            value = value.flatten(2).transpose(1, 2)
        out[key] = value
    return adapt_agent_biases(out, model)


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> AgentPVT:
    return build_model_with_cfg(
        AgentPVT,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=(0, 1, 2, 3), feature_cls="getter"),
        **kwargs,
    )


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return pretrained_cfg("patch_embed1.proj", license="apache-2.0", **kwargs)


# No hub weights: official checkpoints load with pretrained_cfg_overlay=dict(file=...).
default_cfgs = generate_default_cfgs(
    {f"{prefix}_{size}.in1k": _cfg() for prefix in ("agent_pvt", "pvt_v1") for size in ("tiny", "small", "medium", "large")}
)

_PVT = dict(patch_size=4, embed_dims=(64, 128, 320, 512), num_heads=(1, 2, 5, 8), mlp_ratios=(8, 8, 4, 4),
            sr_ratios=(8, 4, 2, 1), qkv_bias=True)
_DEPTHS = dict(tiny=(2, 2, 2, 2), small=(3, 4, 6, 3), medium=(3, 4, 18, 3), large=(3, 8, 27, 3))
_AGENT = dict(attn_type="AAAA", agent_num=(9, 16, 49, 49))
_BASE = dict(attn_type="BBBB")


@register_model
def agent_pvt_tiny(pretrained: bool = False, **kwargs: Any) -> AgentPVT:
    """Agent-PVT-T: 11.6M params, 2.0G MACs, agents 9-16-49-49 in every block."""
    return _create("agent_pvt_tiny", pretrained, **{**_PVT, **_AGENT, "depths": _DEPTHS["tiny"], **kwargs})


@register_model
def agent_pvt_small(pretrained: bool = False, **kwargs: Any) -> AgentPVT:
    """Agent-PVT-S: 20.6M params, 4.0G MACs."""
    return _create("agent_pvt_small", pretrained, **{**_PVT, **_AGENT, "depths": _DEPTHS["small"], **kwargs})


@register_model
def agent_pvt_medium(pretrained: bool = False, **kwargs: Any) -> AgentPVT:
    """Agent-PVT-M: 35.9M params, 7.0G MACs."""
    return _create("agent_pvt_medium", pretrained, **{**_PVT, **_AGENT, "depths": _DEPTHS["medium"], **kwargs})


@register_model
def agent_pvt_large(pretrained: bool = False, **kwargs: Any) -> AgentPVT:
    """Agent-PVT-L: 48.7M params, 10.4G MACs."""
    return _create("agent_pvt_large", pretrained, **{**_PVT, **_AGENT, "depths": _DEPTHS["large"], **kwargs})


@register_model
def pvt_v1_tiny(pretrained: bool = False, **kwargs: Any) -> AgentPVT:
    """PVT-T baseline: spatial-reduction attention (sr 8-4-2-1) in every block."""
    return _create("pvt_v1_tiny", pretrained, **{**_PVT, **_BASE, "depths": _DEPTHS["tiny"], **kwargs})


@register_model
def pvt_v1_small(pretrained: bool = False, **kwargs: Any) -> AgentPVT:
    """PVT-S baseline."""
    return _create("pvt_v1_small", pretrained, **{**_PVT, **_BASE, "depths": _DEPTHS["small"], **kwargs})


@register_model
def pvt_v1_medium(pretrained: bool = False, **kwargs: Any) -> AgentPVT:
    """PVT-M baseline."""
    return _create("pvt_v1_medium", pretrained, **{**_PVT, **_BASE, "depths": _DEPTHS["medium"], **kwargs})


@register_model
def pvt_v1_large(pretrained: bool = False, **kwargs: Any) -> AgentPVT:
    """PVT-L baseline."""
    return _create("pvt_v1_large", pretrained, **{**_PVT, **_BASE, "depths": _DEPTHS["large"], **kwargs})
