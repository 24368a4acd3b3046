"""Agent-CSwin and its baseline CSWin (docs/reference.md §2).

Registered in timm as ``agent_cswin_{tiny,small,base}`` ("AABB", agents 9-16-49-49; the official
agent depths 2-4-18-1 / 3-6-29-2 / 3-6-29-2) and ``cswin_{tiny,small,base}`` (CSWin's own
cross-shaped-window attention everywhere, depths 1-2-21-1 / 2-4-32-2 / 2-4-32-2, stripes 1-2-7-7).

Every block owns the ``qkv`` / ``proj`` linears; its attention branches (``attns.B``) receive
q, k, v and own only the locally-enhanced positional encoding ``get_v`` (a 3×3 depthwise conv on V):
- agent blocks: one branch over the full map with all heads — agent attention
  (:func:`agentlit.core.agent_attention_tokens` with :class:`~agentlit.core.AgentPositionBias` biases),
  LePE playing the role of the DWC;
- CSWin blocks: two half-width branches attending inside vertical / horizontal stripes of width
  ``split_size`` (one full-map branch in the last stage), LePE computed per stripe.
Names equal the official release, so :func:`checkpoint_filter_fn` only unwraps and resizes biases.
"""
# No ``from __future__ import annotations``: FX copies forward()'s annotations into the traced
# module's code, and TorchScript then needs them as real types, not strings.
from typing import Any, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from timm.layers import DropPath, Mlp, register_notrace_module, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices

from ..core import AgentPositionBias, agent_attention_tokens, as_sizes, to_grid
from ._helpers import adapt_agent_biases, pretrained_cfg, unwrap_checkpoint
from ._policy import no_weight_decay_names
from ._stages import expand_attn_types, per_stage, run_blocks

__all__ = ["AgentBranch", "LePEBranch", "CSwinBlock", "CSwinTransformer", "checkpoint_filter_fn"]


def _heads(t: Tensor, num_heads: int) -> Tensor:
    """(B, N, C) → (B, H, N, C/H)."""
    B, N, C = t.shape
    return t.reshape(B, N, num_heads, C // num_heads).transpose(1, 2)


@register_notrace_module  # FX: one call (bias interpolation branches on the map size)
class AgentBranch(AgentPositionBias):
    """Agent attention over the full (h, w) map with LePE as the diversity-restoring DWC.

    q, k, v (B, h·w, C) → (B, h·w, C). Agents are the queries average-pooled to ``agent_num``.
    """

    def __init__(self, dim: int, num_heads: int, *, feat_size: tuple[int, int], agent_num: int | tuple[int, int] = 49,
                 attn_drop: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"AgentBranch: dim={dim} is not divisible by num_heads={num_heads}")
        self.num_heads, self.scale = num_heads, (dim // num_heads) ** -0.5
        self.feat_size, self.agent_grid = tuple(feat_size), to_grid(agent_num)
        self.agent_num = self.agent_grid[0] * self.agent_grid[1]
        self.attn_drop = attn_drop
        self.get_v = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self._init_biases(num_heads, self.agent_grid, self.feat_size, num_prefix_tokens=0)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, feat_size: Tuple[int, int]) -> Tensor:
        layout = [feat_size[0], feat_size[1]]
        agent_bias, query_bias = self.position_biases(layout)
        return agent_attention_tokens(
            q, k, v, self.num_heads, layout, as_sizes(self.agent_grid), agent_bias=agent_bias, query_bias=query_bias,
            dwc_weight=self.get_v.weight, dwc_bias=self.get_v.bias, scale=self.scale,
            dropout_p=self.attn_drop if self.training else 0.0,
        )  # (B, h·w, C)


def _stripes(t: Tensor, h: int, w: int, hs: int, ws: int, ph: int, pw: int) -> Tensor:
    """(B, N, C) tokens of an (h, w) map → (B·nW, C, hs, ws) windows of the map zero-padded by (ph, pw)."""
    B, C = t.shape[0], t.shape[2]
    t = F.pad(t.transpose(1, 2).reshape(B, C, h, w), (0, pw, 0, ph))
    t = t.reshape(B, C, (h + ph) // hs, hs, (w + pw) // ws, ws).permute(0, 2, 4, 1, 3, 5)
    return t.reshape(-1, C, hs, ws)


@register_notrace_module  # FX: one call (the stripe layout and padding branch on the map size)
class LePEBranch(nn.Module):
    """CSWin attention inside stripes plus the locally-enhanced positional encoding (LePE).

    ``idx`` -1: one window over the whole map; 0: vertical stripes (full height × ``split_size``);
    1: horizontal stripes (``split_size`` × full width). Maps that the stripes do not tile are
    zero-padded and the padded keys masked out.
    """

    def __init__(self, dim: int, num_heads: int, *, idx: int, split_size: int = 7, attn_drop: float = 0.0) -> None:
        super().__init__()
        if idx not in (-1, 0, 1):
            raise ValueError(f"LePEBranch: idx={idx} must be -1 (full map), 0 (vertical) or 1 (horizontal)")
        self.num_heads, self.idx, self.split_size = num_heads, idx, split_size
        self.attn_drop = attn_drop
        self.get_v = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

    def _window(self, h: int, w: int) -> Tuple[int, int]:
        if self.idx == -1:
            return h, w
        if self.idx == 0:
            return h, self.split_size
        return self.split_size, w

    def forward(self, q: Tensor, k: Tensor, v: Tensor, feat_size: Tuple[int, int]) -> Tensor:
        B, N, C = q.shape
        h, w = feat_size[0], feat_size[1]
        hs, ws = self._window(h, w)
        ph, pw = -h % hs, -w % ws
        # (B·nW, hs·ws, C) per window
        qw = _stripes(q, h, w, hs, ws, ph, pw).flatten(2).transpose(1, 2)
        kw = _stripes(k, h, w, hs, ws, ph, pw).flatten(2).transpose(1, 2)
        v_windows = _stripes(v, h, w, hs, ws, ph, pw)
        vw = v_windows.flatten(2).transpose(1, 2)
        lepe = self.get_v(v_windows).flatten(2).transpose(1, 2)  # per-window conv, as the official code
        mask: Optional[Tensor] = None
        if ph > 0 or pw > 0:  # padded keys must not receive attention
            valid = F.pad(q.new_ones(1, 1, h, w), (0, pw, 0, ph))
            valid = valid.reshape(1, (h + ph) // hs, hs, (w + pw) // ws, ws).permute(0, 1, 3, 2, 4).reshape(-1, 1, 1, hs * ws)
            mask = torch.zeros_like(valid).masked_fill(valid == 0, float("-inf")).repeat(B, 1, 1, 1)
        H = self.num_heads
        out = F.scaled_dot_product_attention(
            _heads(qw, H), _heads(kw, H), _heads(vw, H), attn_mask=mask,
            dropout_p=self.attn_drop if self.training else 0.0,
        )  # (B·nW, H, hs·ws, d)
        out = out.transpose(1, 2).reshape(-1, hs * ws, C) + lepe
        out = out.reshape(B, (h + ph) // hs, (w + pw) // ws, hs, ws, C).permute(0, 1, 3, 2, 4, 5)
        return out.reshape(B, h + ph, w + pw, C)[:, :h, :w].reshape(B, N, C)


class CSwinBlock(nn.Module):
    """CSWin block: shared ``qkv`` → branch(es) → ``proj``; MLP. x (B, h·w, C) → (B, h·w, C)."""

    def __init__(self, dim: int, num_heads: int, *, feat_size: tuple[int, int], attn_type: str = "A",
                 agent_num: int | tuple[int, int] = 49, split_size: int = 7, last_stage: bool = False,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, proj_drop: float = 0.0, attn_drop: float = 0.0,
                 drop_path: float = 0.0) -> None:
        super().__init__()
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.norm1 = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, dim)
        if attn_type == "A":
            branches: list[nn.Module] = [AgentBranch(dim, num_heads, feat_size=feat_size, agent_num=agent_num,
                                                     attn_drop=attn_drop)]
        elif last_stage or max(feat_size) <= split_size:  # the official "resolution == split_size" rule
            branches = [LePEBranch(dim, num_heads, idx=-1, split_size=split_size, attn_drop=attn_drop)]
        else:
            branches = [LePEBranch(dim // 2, num_heads // 2, idx=i, split_size=split_size, attn_drop=attn_drop)
                        for i in range(2)]
        self.attns = nn.ModuleList(branches)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=proj_drop)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, x: Tensor, feat_size: Tuple[int, int]) -> Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(B, N, 3, C).unbind(2)  # each (B, N, C)
        # two branches: half the channels (and heads) per stripe direction; one: all of them. A loop,
        # not indexing, so TorchScript compiles only the branches that exist.
        c = C // len(self.attns)
        outs: List[Tensor] = []
        for i, attn in enumerate(self.attns):
            outs.append(attn(q[..., i * c:(i + 1) * c], k[..., i * c:(i + 1) * c], v[..., i * c:(i + 1) * c], feat_size))
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
        x = x + self.drop_path(self.proj(out))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class MergeBlock(nn.Module):
    """3×3 stride-2 conv + LayerNorm between stages: (B, C, h, w) → (B, h'·w', 2C), (h', w')."""

    def __init__(self, dim: int, dim_out: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(dim, dim_out, 3, 2, 1)
        self.norm = nn.LayerNorm(dim_out)

    def forward(self, x: Tensor) -> Tuple[Tensor, Tuple[int, int]]:
        x = self.conv(x)
        return self.norm(x.flatten(2).transpose(1, 2)), (x.shape[-2], x.shape[-1])


class CSwinTransformer(nn.Module):
    """CSWin pyramid whose stages use agent ("A") or cross-shaped-window ("B") attention.

    Args:
        img_size: training resolution; the agent biases are laid out for its stage maps (any other
            input size works: biases are interpolated, stripes are padded).
        embed_dim, depths, num_heads, mlp_ratio: CSWin's settings (channels double per stage).
        split_size: stripe width per stage for "B" blocks (CSWin: 1, 2, 7, 7; stage 4 is one window).
        attn_type: per-stage letters, e.g. "AABB" (Agent-CSwin) or "BBBB" (CSWin).
        agent_num: agents per stage (square ints or (ph, pw) grids).
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        embed_dim: int = 64,
        depths: Sequence[int] = (1, 2, 21, 1),
        num_heads: Sequence[int] = (2, 4, 8, 16),
        split_size: Sequence[int] = (1, 2, 7, 7),
        mlp_ratio: float = 4.0,
        attn_type: str = "AABB",
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
        split_size = per_stage(split_size, n, "split_size")
        self.in_chans = in_chans
        self.num_classes, self.global_pool, self.num_stages, self.drop_rate = num_classes, global_pool, n, drop_rate
        self.attn_types = ["".join(t) for t in types]
        dims = [embed_dim * 2**i for i in range(n)]
        self.dims = dims
        self.num_features = self.head_hidden_size = dims[-1]
        # Official names: stage1_conv_embed.{0: conv, 2: norm} (1 was a token rearrange).
        self.stage1_conv_embed = nn.Sequential(nn.Conv2d(in_chans, embed_dim, 7, 4, 2), nn.Identity(), nn.LayerNorm(embed_dim))
        grid = ((img_hw[0] - 3) // 4 + 1, (img_hw[1] - 3) // 4 + 1)
        dpr = [drop_path_rate * j / max(sum(depths) - 1, 1) for j in range(sum(depths))]  # linspace, meta-safe
        self.feature_info: list[dict[str, Any]] = []
        cur = 0
        for i in range(n):
            if i > 0:
                setattr(self, f"merge{i}", MergeBlock(dims[i - 1], dims[i]))
                grid = ((grid[0] + 1) // 2, (grid[1] + 1) // 2)
            setattr(self, f"stage{i + 1}", nn.ModuleList([
                CSwinBlock(dims[i], num_heads[i], feat_size=grid, attn_type=types[i][j], agent_num=agents[i],
                           split_size=split_size[i], last_stage=i == n - 1, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                           proj_drop=proj_drop_rate, attn_drop=attn_drop_rate, drop_path=dpr[cur + j])
                for j in range(depths[i])
            ]))
            cur += depths[i]
            self.feature_info.append(dict(num_chs=dims[i], reduction=4 * 2**i, module=f"stage{i + 1}"))
        self.norm = nn.LayerNorm(dims[-1])
        self.head = nn.Linear(dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.grad_checkpointing = False
        self.init_weights()
        if device is not None or dtype is not None:  # timm's factory: create_model(device=, dtype=)
            self.to(device=device, dtype=dtype)

    @torch.jit.ignore
    def init_weights(self) -> None:
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
        """Agent biases (CSWin has no position embedding; see :mod:`agentlit.models._policy`)."""
        return no_weight_decay_names(self)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        blocks = [(r"^stage(\d+)\.(\d+)", None), (r"^merge(\d+)", (0,)), (r"^norm", (99999,))]
        return dict(stem=r"^stage1_conv_embed", blocks=blocks)

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
    def _stage(self, i: int, x: Tensor) -> Tuple[Tensor, Tuple[int, int]]:
        """Stage i: image (i = 0) or previous map (B, C, h, w) → tokens (B, h'·w', C_i), (h', w')."""
        if i == 0:
            x = self.stage1_conv_embed[0](x)
            hw = (x.shape[-2], x.shape[-1])
            x = self.stage1_conv_embed[2](x.flatten(2).transpose(1, 2))
        else:
            x, hw = getattr(self, f"merge{i}")(x)
        return run_blocks(getattr(self, f"stage{i + 1}"), x, hw, self.grad_checkpointing), hw

    @staticmethod
    def _to_map(x: Tensor, hw: Tuple[int, int]) -> Tensor:
        return x.transpose(1, 2).reshape(x.shape[0], -1, hw[0], hw[1])

    def forward_features(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) → normalised last-stage map (B, C4, H/32, W/32)."""
        if torch.jit.is_scripting():
            return self._forward_features_scripted(x)
        for i in range(self.num_stages):
            tokens, hw = self._stage(i, x)
            x = self._to_map(self.norm(tokens) if i == self.num_stages - 1 else tokens, hw)
        return x

    def _forward_features_scripted(self, x: Tensor) -> Tensor:
        # TorchScript cannot look modules up by a computed name: the stages spelled out (the family
        # has four; hasattr is resolved when scripting), the last one normalised.
        x = self.stage1_conv_embed[0](x)
        hw = (x.shape[-2], x.shape[-1])
        tokens = self.stage1_conv_embed[2](x.flatten(2).transpose(1, 2))
        for blk in self.stage1:
            tokens = blk(tokens, hw)
        if hasattr(self, "stage2"):
            tokens, hw = self.merge1(self._to_map(tokens, hw))
            for blk in self.stage2:
                tokens = blk(tokens, hw)
        if hasattr(self, "stage3"):
            tokens, hw = self.merge2(self._to_map(tokens, hw))
            for blk in self.stage3:
                tokens = blk(tokens, hw)
        if hasattr(self, "stage4"):
            tokens, hw = self.merge3(self._to_map(tokens, hw))
            for blk in self.stage4:
                tokens = blk(tokens, hw)
        return self._to_map(self.norm(tokens), hw)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        if self.global_pool == "avg":
            x = x.mean(dim=(2, 3))
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
        """timm's feature API: per-stage maps (B, C_i, H/4/2^i, W/4/2^i); ``norm`` normalises the last."""
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt={output_fmt!r} is not supported; CSwinTransformer returns 'NCHW' maps")
        take, max_index = feature_take_indices(self.num_stages, indices)
        feats = []
        last = max_index if stop_early or intermediates_only else self.num_stages - 1
        final = len(self.dims) - 1
        for i in range(last + 1):
            tokens, hw = self._stage(i, x)
            x = self._to_map(tokens, hw)
            if i in take:
                feats.append(self._to_map(self.norm(tokens), hw) if norm and i == final else x)
        if intermediates_only:
            return feats
        if last == final:
            x = self._to_map(self.norm(tokens), hw)
        return x, feats

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop the stages after the last requested feature (and the head / final norm)."""
        take, max_index = feature_take_indices(self.num_stages, indices)
        for i in range(max_index + 1, self.num_stages):
            delattr(self, f"stage{i + 1}")
            delattr(self, f"merge{i}")
        self.num_stages = max_index + 1
        self.feature_info = self.feature_info[: max_index + 1]
        if prune_norm or max_index < len(self.dims) - 1:
            self.norm = nn.Identity()
        if prune_head or max_index < len(self.dims) - 1:
            self.num_features = self.head_hidden_size = self.dims[max_index]
            self.reset_classifier(0, "")
        return take


def checkpoint_filter_fn(state_dict: dict[str, Any], model: CSwinTransformer) -> dict[str, Tensor]:
    """Map an official (Agent-)CSWin checkpoint (or one of ours) onto ``model``: names are equal, so
    this unwraps ``{'model': …}`` and resizes agent biases to the model's maps / agent grids."""
    return adapt_agent_biases(unwrap_checkpoint(state_dict), model)


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> CSwinTransformer:
    return build_model_with_cfg(
        CSwinTransformer,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=(0, 1, 2, 3), feature_cls="getter"),
        **kwargs,
    )


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return pretrained_cfg("stage1_conv_embed.0", **kwargs)


# No hub weights: official checkpoints load with pretrained_cfg_overlay=dict(file=...).
default_cfgs = generate_default_cfgs(
    {f"{prefix}_{size}.in1k": _cfg() for prefix in ("agent_cswin", "cswin") for size in ("tiny", "small", "base")}
)

_AGENT = dict(attn_type="AABB", agent_num=(9, 16, 49, 49), split_size=(1, 2, 7, 7))
_BASE = dict(attn_type="BBBB", split_size=(1, 2, 7, 7))


@register_model
def agent_cswin_tiny(pretrained: bool = False, **kwargs: Any) -> CSwinTransformer:
    """Agent-CSwin-T: 21M params, 4.3G MACs; depths 2-4-18-1."""
    args = dict(embed_dim=64, depths=(2, 4, 18, 1), num_heads=(2, 4, 8, 16), **_AGENT)
    return _create("agent_cswin_tiny", pretrained, **{**args, **kwargs})


@register_model
def agent_cswin_small(pretrained: bool = False, **kwargs: Any) -> CSwinTransformer:
    """Agent-CSwin-S: 33M params, 6.8G MACs; depths 3-6-29-2."""
    args = dict(embed_dim=64, depths=(3, 6, 29, 2), num_heads=(2, 4, 8, 16), **_AGENT)
    return _create("agent_cswin_small", pretrained, **{**args, **kwargs})


@register_model
def agent_cswin_base(pretrained: bool = False, **kwargs: Any) -> CSwinTransformer:
    """Agent-CSwin-B: 73M params, 14.9G MACs; depths 3-6-29-2, width 96."""
    args = dict(embed_dim=96, depths=(3, 6, 29, 2), num_heads=(4, 8, 16, 32), **_AGENT)
    return _create("agent_cswin_base", pretrained, **{**args, **kwargs})


@register_model
def cswin_tiny(pretrained: bool = False, **kwargs: Any) -> CSwinTransformer:
    """CSWin-T baseline (CSWin_64_12211_tiny_224): depths 1-2-21-1."""
    args = dict(embed_dim=64, depths=(1, 2, 21, 1), num_heads=(2, 4, 8, 16), **_BASE)
    return _create("cswin_tiny", pretrained, **{**args, **kwargs})


@register_model
def cswin_small(pretrained: bool = False, **kwargs: Any) -> CSwinTransformer:
    """CSWin-S baseline (CSWin_64_24322_small_224): depths 2-4-32-2."""
    args = dict(embed_dim=64, depths=(2, 4, 32, 2), num_heads=(2, 4, 8, 16), **_BASE)
    return _create("cswin_small", pretrained, **{**args, **kwargs})


@register_model
def cswin_base(pretrained: bool = False, **kwargs: Any) -> CSwinTransformer:
    """CSWin-B baseline (CSWin_96_24322_base_224): depths 2-4-32-2, width 96."""
    args = dict(embed_dim=96, depths=(2, 4, 32, 2), num_heads=(4, 8, 16, 32), **_BASE)
    return _create("cswin_base", pretrained, **{**args, **kwargs})
