"""Agent position biases (docs/reference.md §1): parameter layout, evaluation at any map size, resizing.

Parameter names and shapes follow the official release so checkpoints map one to one
(H heads, n = ph·pw agents, (h, w) the training feature map, P prefix/class tokens):

    an_bias (H, n, 7, 7)      agent→token template, bilinearly resized to (h, w)
    na_bias (H, n, 7, 7)      token→agent template, resized and transposed
    ah_bias (1, H, n, h, 1)   aw_bias (1, H, n, 1, w)     separable agent→token terms
    ha_bias (1, H, h, 1, n)   wa_bias (1, H, 1, w, n)     separable token→agent terms
    ac_bias (1, H, n, P)      ca_bias (1, H, P, n)        prefix (class) token column / row
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["AgentPositionBias", "resize_axis", "resize_agent_axis", "adapt_agent_bias", "to_grid", "AGENT_BIAS_AXES"]

# For each bias parameter: (agent axis, {spatial axis: which of (h, w) it follows}).
AGENT_BIAS_AXES: dict[str, tuple[int, dict[int, int]]] = {
    "an_bias": (1, {}),
    "na_bias": (1, {}),
    "ah_bias": (2, {3: 0}),
    "aw_bias": (2, {4: 1}),
    "ha_bias": (4, {2: 0}),
    "wa_bias": (4, {3: 1}),
    "ac_bias": (2, {}),
    "ca_bias": (3, {}),
}


def to_grid(value: int | tuple[int, int] | list[int], what: str = "agent_num") -> tuple[int, int]:
    """An int that is a perfect square, or an (h, w) pair, as an (h, w) grid."""
    if isinstance(value, int):
        side = math.isqrt(value)
        if value <= 0 or side * side != value:
            lo, hi = max(side, 1) ** 2, (side + 1) ** 2
            raise ValueError(
                f"{what}={value} is not a square number of tokens; use a perfect square such as "
                f"{lo} or {hi}, or an explicit (h, w) grid like [{side or 1}, {max(1, value // max(side, 1))}]"
            )
        return side, side
    grid = tuple(int(v) for v in value)
    if len(grid) != 2 or min(grid) <= 0:
        raise ValueError(f"{what}={value!r} must be a positive int square or a pair (h, w) of positive ints")
    return grid  # type: ignore[return-value]


def resize_axis(t: Tensor, size: int, dim: int) -> Tensor:
    """Linearly resample ``t`` along one axis to ``size`` (align_corners=False, as bilinear does)."""
    if t.shape[dim] == size:
        return t
    moved = t.movedim(dim, -1)
    flat = moved.reshape(1, -1, moved.shape[-1])
    out = F.interpolate(flat.float(), size=size, mode="linear", align_corners=False).to(t.dtype)
    return out.reshape(list(moved.shape[:-1]) + [size]).movedim(-1, dim)  # no *-unpacking: TorchScript


def resize_agent_axis(t: Tensor, dim: int, old_grid: tuple[int, int], new_grid: tuple[int, int]) -> Tensor:
    """Resample the agent axis of ``t``, read as a (ph, pw) grid, bilinearly to ``new_grid``."""
    if tuple(old_grid) == tuple(new_grid):
        return t
    moved = t.movedim(dim, -1)
    lead = moved.shape[:-1]
    grid = moved.reshape(-1, 1, *old_grid).float()
    out = F.interpolate(grid, size=new_grid, mode="bilinear", align_corners=False).to(t.dtype)
    return out.reshape(*lead, new_grid[0] * new_grid[1]).movedim(-1, dim)


def adapt_agent_bias(
    name: str,
    t: Tensor,
    *,
    agent_grid: tuple[int, int],
    feat_size: tuple[int, int],
    old_agent_grid: tuple[int, int] | None = None,
) -> Tensor:
    """Resize a stored bias parameter ``name`` (e.g. ``"ah_bias"``) to a new agent grid / map size.

    ``old_agent_grid`` defaults to the square grid implied by the stored agent count.
    """
    key = name.rsplit(".", 1)[-1]
    if key not in AGENT_BIAS_AXES:
        raise KeyError(f"{name!r} is not an agent bias; known: {sorted(AGENT_BIAS_AXES)}")
    agent_dim, spatial = AGENT_BIAS_AXES[key]
    if old_agent_grid is None:
        old_agent_grid = to_grid(t.shape[agent_dim], what=f"{name} agent count")
    t = resize_agent_axis(t, agent_dim, old_agent_grid, agent_grid)
    for dim, which in spatial.items():
        t = resize_axis(t, feat_size[which], dim)
    return t


class AgentPositionBias(nn.Module):
    """The two learned biases B1 (agent→token) and B2 (token→agent) of one attention layer.

    Mixed into :class:`~agentlit.core.AgentAttention` (its parameters live directly on that module
    so the state-dict names are the official ``attn.an_bias`` …).
    """

    # (an_bias … wa_bias, ac_bias / ca_bias are registered by _init_biases; no class-level
    # annotations, which TorchScript would try to read as attribute types)

    def _init_biases(
        self,
        num_heads: int,
        agent_grid: tuple[int, int],
        feat_size: tuple[int, int],
        num_prefix_tokens: int,
        template: int = 7,
    ) -> None:
        H, n, (h, w) = num_heads, agent_grid[0] * agent_grid[1], feat_size
        self.an_bias = nn.Parameter(torch.zeros(H, n, template, template))
        self.na_bias = nn.Parameter(torch.zeros(H, n, template, template))
        self.ah_bias = nn.Parameter(torch.zeros(1, H, n, h, 1))
        self.aw_bias = nn.Parameter(torch.zeros(1, H, n, 1, w))
        self.ha_bias = nn.Parameter(torch.zeros(1, H, h, 1, n))
        self.wa_bias = nn.Parameter(torch.zeros(1, H, 1, w, n))
        if num_prefix_tokens:
            self.ac_bias = nn.Parameter(torch.zeros(1, H, n, num_prefix_tokens))
            self.ca_bias = nn.Parameter(torch.zeros(1, H, num_prefix_tokens, n))
        for p in self.bias_parameters():
            nn.init.trunc_normal_(p, std=0.02)

    @torch.jit.unused
    def bias_parameters(self) -> list[nn.Parameter]:
        return [getattr(self, k) for k in AGENT_BIAS_AXES if isinstance(getattr(self, k, None), nn.Parameter)]

    def position_biases(self, h: int, w: int) -> tuple[Tensor, Tensor]:
        """B1 (1, H, n, P + h·w) and B2 (1, H, P + h·w, n) for an (h, w) map.

        B1[a, (y, x)] = bilinear(an_bias)[a, y, x] + ah[a, y] + aw[a, x] (B2 likewise, transposed).
        The bilinear resize is separable, so each bias is one batched matmul that writes the
        (H·n, h, w) result once, with the separable terms folded in: no resized template, no sums
        of full-size tensors.
        """
        H, n, th, tw = self.an_bias.shape
        ry = _linear_weights(th, h, self.an_bias)  # (h, th)
        rx = _linear_weights(tw, w, self.an_bias)  # (w, tw)
        ah = resize_axis(self.ah_bias, h, 3).reshape(H * n, h, 1)
        aw = resize_axis(self.aw_bias, w, 4).reshape(H * n, 1, w)
        ha = resize_axis(self.ha_bias, h, 2).permute(0, 1, 4, 2, 3).reshape(H * n, h, 1)
        wa = resize_axis(self.wa_bias, w, 3).permute(0, 1, 4, 2, 3).reshape(H * n, 1, w)
        b1 = _resize_plus(self.an_bias.reshape(H * n, th, tw), ry, rx, ah, aw).reshape(1, H, n, h * w)
        b2 = _resize_plus(self.na_bias.reshape(H * n, th, tw), ry, rx, ha, wa).reshape(1, H, n, h * w)
        b2 = b2.transpose(-1, -2)  # (1, H, h·w, n)
        if hasattr(self, "ac_bias"):
            b1 = torch.cat([self.ac_bias, b1], dim=-1)
            b2 = torch.cat([self.ca_bias, b2], dim=-2)
        # B2 contiguous once here (a no-op after the cat): SDPA would otherwise copy a transposed mask
        # in every call, per batch element where it broadcasts (Swin: one call over all windows)
        return b1, b2.contiguous()


def _linear_weights(size_in: int, size_out: int, like: Tensor) -> Tensor:
    """(size_out, size_in): the weights of ``F.interpolate(mode="linear", align_corners=False)`` as a
    matrix (taken from F.interpolate itself, so resizing by it is what bilinear resizing computes)."""
    eye = torch.eye(size_in, device=like.device, dtype=torch.float32).unsqueeze(0)  # (1, in, in)
    weights = F.interpolate(eye, size=size_out, mode="linear", align_corners=False)[0]  # (in, out)
    return weights.t().to(like.dtype)


def _resize_plus(t: Tensor, ry: Tensor, rx: Tensor, col: Tensor, row: Tensor) -> Tensor:
    """ry · t · rxᵀ + col + row: (a, th, tw) templates bilinearly resized to (a, h, w) plus the
    separable terms col (a, h, 1) and row (a, 1, w), as one batched matmul."""
    a, h = t.shape[0], ry.shape[0]
    m = torch.cat([torch.matmul(t, rx.t()), row], dim=1)  # (a, th + 1, w)
    r = torch.cat([ry, torch.ones(h, 1, device=ry.device, dtype=ry.dtype)], dim=1)  # (h, th + 1)
    return torch.baddbmm(col, r.expand(a, h, r.shape[1]), m)  # col broadcast over w
