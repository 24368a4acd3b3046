"""Agent position biases (docs/reference.md §1): parameter layout, evaluation at any size, resizing.

Parameter names and shapes follow the official release for (h, w) maps, so checkpoints map one to
one (H heads, n agents, (h, w) the training feature map, P prefix/class tokens):

    an_bias (H, n, 7, 7)      agent→token template, bilinearly resized to (h, w)
    na_bias (H, n, 7, 7)      token→agent template, resized and transposed
    ah_bias (1, H, n, h, 1)   aw_bias (1, H, n, 1, w)     separable agent→token terms
    ha_bias (1, H, h, 1, n)   wa_bias (1, H, 1, w, n)     separable token→agent terms
    ac_bias (1, H, n, P)      ca_bias (1, H, P, n)        prefix (class) token column / row

Other layouts generalise this rank by rank:

- 1-D sequence of length L: length templates an_bias / na_bias (H, n, 7), linearly resized to L,
  plus per-position terms al_bias (1, H, n, L) / la_bias (1, H, L, n);
- 3-D volume (t, h, w): the 2-D parameters above for the (h, w) plane, shared by every frame, plus
  a depth axis beside h and w: ad_bias (1, H, n, t) / da_bias (1, H, t, n). A 2-D layer's biases
  therefore load into a 3-D one (only the depth terms are new).

A layer that has no token layout on the key side (cross-attention) has only the token→agent half.
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .fused import RowBias, plane_bias_rows, supports_fused

__all__ = [
    "AGENT_BIAS_AXES", "AGENT_BIAS_NAMES", "AgentPositionBias", "adapt_agent_bias", "resize_agent_axis", "resize_axis",
    "to_grid",
]

# For each bias parameter of a 2-D layer: (agent axis, {spatial axis: which of (h, w) it follows}).
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
#: Every agent-bias parameter name, of every layout (the 2-D ones first, in their official order).
AGENT_BIAS_NAMES: tuple[str, ...] = (*AGENT_BIAS_AXES, "al_bias", "la_bias", "ad_bias", "da_bias")


def to_grid(value: int | tuple[int, ...] | list[int], what: str = "agent_num", rank: int = 2) -> tuple[int, ...]:
    """A grid of ``rank`` sides from an int (a square for 2-D, a cube for 3-D) or an explicit tuple.

    Args:
        value: a token count (1-D: any positive int; 2-D: a perfect square; 3-D: a perfect cube) or
            a tuple of ``rank`` positive ints.
        what: the name used in error messages.
        rank: the grid's number of axes (1, 2 or 3).
    """
    if isinstance(value, int) and not isinstance(value, bool):
        side = round(value ** (1.0 / rank)) if value > 0 else 0
        if value <= 0 or side**rank != value:
            if rank == 1:
                raise ValueError(f"{what}={value} must be a positive number of tokens")
            side = max(int(value ** (1.0 / rank)), 1)
            lo, hi = side**rank, (side + 1) ** rank
            shape, axes = ("square", "(h, w)") if rank == 2 else ("cube", "(t, h, w)")
            example = [side] * (rank - 1) + [max(1, value // side ** (rank - 1))]
            raise ValueError(
                f"{what}={value} is not a {shape} number of tokens; use a perfect {shape} such as "
                f"{lo} or {hi}, or an explicit {axes} grid like {example}"
            )
        return (side,) * rank
    grid = tuple(int(v) for v in value)
    if len(grid) != rank or min(grid) <= 0:
        raise ValueError(f"{what}={value!r} must be a positive int or {rank} positive ints (one per axis)")
    return grid


def resize_axis(t: Tensor, size: int, dim: int) -> Tensor:
    """Linearly resample ``t`` along one axis to ``size`` (align_corners=False, as bilinear does)."""
    if t.shape[dim] == size:
        return t
    moved = t.movedim(dim, -1)
    flat = moved.reshape(1, -1, moved.shape[-1])
    out = F.interpolate(flat.to(_interp_dtype(t)), size=size, mode="linear", align_corners=False).to(t.dtype)
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
    """Resize a stored 2-D-layer bias parameter ``name`` (e.g. ``"ah_bias"``) to a new agent grid / map size.

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

    Mixed into the layers that own them (:class:`~agentlit.core.AgentAttention`, the Agent-CSwin
    branch, the diffusers processor): the parameters live directly on that module, so the
    state-dict names are the official ``attn.an_bias`` ….
    """

    # (the *_bias parameters are registered by _init_biases; no class-level annotations, which
    # TorchScript would try to read as attribute types)

    #: Elements of whole biases (B1 and B2 together, per layer) that an evaluating layer keeps for its
    #: next call. Larger ones are never built whole where the CPU op serves an (h, w) map: they reach it
    #: factored (:class:`RowBias`, in training too), else they are built again in every call. What is kept
    #: is memory held between calls: at detection resolution (800×1344) keeping every layer's would hold
    #: 0.9–1.4 GB, four to five times the softmax backbone's whole inference peak (docs/performance.md).
    #: Set it on a layer, or on the class for every layer, to trade otherwise.
    bias_cache_elements = 1 << 21

    def _init_biases(
        self,
        num_heads: int,
        agent_grid: int | tuple[int, ...],
        feat_size: tuple[int, ...],
        num_prefix_tokens: int,
        template: int = 7,
        key_side: bool = True,
    ) -> None:
        """Register the bias parameters for a layout of rank ``len(feat_size)`` (1, 2 or 3).

        Args:
            num_heads: heads H.
            agent_grid: the agent count n, or the agent grid (n = its product).
            feat_size: the layout the per-axis terms are laid out for: (L,), (h, w) or (t, h, w).
            num_prefix_tokens: P tokens before the layout (they get their own column / row).
            template: side of the an / na templates.
            key_side: register B1 (agent→token); False for cross-attention, whose keys have no layout.
        """
        H = num_heads
        n = agent_grid if isinstance(agent_grid, int) else math.prod(agent_grid)
        rank = len(feat_size)
        if rank not in (1, 2, 3):
            raise ValueError(f"feat_size={tuple(feat_size)} must have 1 (L,), 2 (h, w) or 3 (t, h, w) sizes")
        tmpl = (template,) if rank == 1 else (template, template)
        if key_side:
            self.an_bias = nn.Parameter(torch.zeros(H, n, *tmpl))
        self.na_bias = nn.Parameter(torch.zeros(H, n, *tmpl))
        if rank == 1:
            (L,) = feat_size
            if key_side:
                self.al_bias = nn.Parameter(torch.zeros(1, H, n, L))
            self.la_bias = nn.Parameter(torch.zeros(1, H, L, n))
        else:
            h, w = feat_size[-2], feat_size[-1]
            if key_side:
                self.ah_bias = nn.Parameter(torch.zeros(1, H, n, h, 1))
                self.aw_bias = nn.Parameter(torch.zeros(1, H, n, 1, w))
            self.ha_bias = nn.Parameter(torch.zeros(1, H, h, 1, n))
            self.wa_bias = nn.Parameter(torch.zeros(1, H, 1, w, n))
        if num_prefix_tokens:
            if key_side:
                self.ac_bias = nn.Parameter(torch.zeros(1, H, n, num_prefix_tokens))
            self.ca_bias = nn.Parameter(torch.zeros(1, H, num_prefix_tokens, n))
        if rank == 3:
            if key_side:
                self.ad_bias = nn.Parameter(torch.zeros(1, H, n, feat_size[0]))
            self.da_bias = nn.Parameter(torch.zeros(1, H, feat_size[0], n))
        for p in self.bias_parameters():
            nn.init.trunc_normal_(p, std=0.02)

    @torch.jit.unused
    def train(self, mode: bool = True) -> "AgentPositionBias":
        # a mode switch ends any evaluation phase: no cached bias outlives the training steps in between
        # (a fused optimizer updates parameters without bumping their version counters)
        if mode != self.training:
            self.__dict__.pop("_bias_cache", None)
        return super().train(mode)

    @torch.jit.unused
    def bias_parameters(self) -> list[nn.Parameter]:
        """The bias parameters this layer has, in a fixed order (the official 2-D order first)."""
        return [getattr(self, k) for k in AGENT_BIAS_NAMES if isinstance(getattr(self, k, None), nn.Parameter)]

    def position_biases(self, size: List[int]) -> Tuple[Optional[Tensor], Optional[Tensor]]:
        """B1 (1, H, n, P + N) and B2 (1, H, P + N, n) for a layout of ``size`` (N = its product).

        B2 is the transposed view of an agent-major (1, H, n, P + N) tensor, the layout the fused CPU op
        (:mod:`agentlit.core.fused`) computes in. In eager mode, when autograd records, both are marked
        as rebuildable, so that op recomputes them in the backward pass instead of keeping them; when it
        does not and the module is in eval mode (evaluation), the last pair is cached per size (unless
        larger than :attr:`bias_cache_elements`) and reused until a bias parameter changes
        (``load_state_dict``, ``.to()``, any in-place update that bumps its version counter) or the
        module's mode changes: biases depend on the parameters alone.

        2-D: B1[a, (y, x)] = bilinear(an_bias)[a, y, x] + ah[a, y] + aw[a, x] (B2 likewise,
        transposed); 1-D: linear(an_bias)[a, l] + al[a, l]; 3-D: the 2-D bias of the (y, x) plane
        + ad[a, z]. The resize is separable, so each (h, w) bias is one batched matmul that writes the
        (H·n, h, w) result once, with the axis terms folded in: no resized template, no sums of
        full-size tensors. B1 is None on a layer without the key side (cross-attention).

        Args:
            size: [L], [h, w] or [t, h, w], the layout the forward pass sees.
        """
        if not torch.jit.is_scripting() and not torch.is_grad_enabled() and not self.training:
            cached = _cached_biases(self, size)
            if cached is not None:
                return cached
        # the resize weights, shared by B1 and B2 (same template size)
        r0 = _linear_weights(self.na_bias.shape[2], size[-1] if hasattr(self, "la_bias") else size[-2], self.na_bias)
        r1 = r0 if hasattr(self, "la_bias") else _linear_weights(self.na_bias.shape[3], size[-1], self.na_bias)
        b1: Optional[Tensor] = None
        if hasattr(self, "an_bias"):
            if hasattr(self, "al_bias"):
                b1 = _sequence_bias(self.an_bias, r0, resize_axis(self.al_bias, size[0], 3))
            else:
                H, n = self.an_bias.shape[0], self.an_bias.shape[1]
                h, w = size[-2], size[-1]
                b1 = plane_bias_rows(self._agent_plane(r0, r1), 0, h).reshape(1, H, n, h * w)
                if hasattr(self, "ad_bias"):
                    b1 = _add_depth(b1, resize_axis(self.ad_bias, size[0], 3))
            if hasattr(self, "ac_bias"):
                b1 = torch.cat([self.ac_bias, b1], dim=-1)
        if hasattr(self, "la_bias"):  # built agent-major, (n, L) per head, like every other B2
            la = resize_axis(self.la_bias, size[0], 2)[0].transpose(-1, -2)  # (H, n, L)
            b2 = torch.baddbmm(la, self.na_bias, r0.t().expand(la.shape[0], r0.shape[1], r0.shape[0]))
            b2 = b2.unsqueeze(0)  # (1, H, n, L)
        else:
            H, n = self.na_bias.shape[0], self.na_bias.shape[1]
            h, w = size[-2], size[-1]
            b2 = plane_bias_rows(self._query_plane(r0, r1), 0, h).reshape(1, H, n, h * w)
            if hasattr(self, "da_bias"):
                b2 = _add_depth(b2, resize_axis(self.da_bias, size[0], 2).transpose(-1, -2))
        if hasattr(self, "ca_bias"):
            b2 = torch.cat([self.ca_bias.transpose(-1, -2), b2], dim=-1)
        b2 = b2.transpose(-1, -2)  # (1, H, P + N, n), a view of agent-major memory: the fused op's layout
        if not torch.jit.is_scripting():
            if torch.is_grad_enabled():
                _rebuild_in_backward(self, size, b1, b2)
            elif not self.training:
                _cache_biases(self, size, b1, b2)
        return b1, b2

    def _agent_plane(self, ry: Tensor, rx: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """B1 of an (h, w) plane in factored form (:func:`_plane_factors`); ry (h, 7), rx (w, 7) resize weights."""
        H, n = self.an_bias.shape[0], self.an_bias.shape[1]
        h, w = ry.shape[0], rx.shape[0]
        ah = resize_axis(self.ah_bias, h, 3).reshape(H * n, h, 1)
        aw = resize_axis(self.aw_bias, w, 4).reshape(H * n, 1, w)
        return _plane_factors(self.an_bias, ry, rx, ah, aw)

    def _query_plane(self, ry: Tensor, rx: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """B2 (agent-major) of an (h, w) plane in factored form, as :meth:`_agent_plane`."""
        H, n = self.na_bias.shape[0], self.na_bias.shape[1]
        h, w = ry.shape[0], rx.shape[0]
        ha = resize_axis(self.ha_bias, h, 2).permute(0, 1, 4, 2, 3).reshape(H * n, h, 1)
        wa = resize_axis(self.wa_bias, w, 3).permute(0, 1, 4, 2, 3).reshape(H * n, 1, w)
        return _plane_factors(self.na_bias, ry, rx, ha, wa)

    @torch.jit.unused
    def biases_for(self, q: Tensor, size: List[int], num_prefix_tokens: int = 0, *, padded: bool = False,
                   dropout_p: float = 0.0, shortcut: float = 0.0) -> Tuple[Optional[Tensor], Optional[Tensor]]:
        """B1 and B2 for one call of :func:`~agentlit.core.agent_attention_tokens` on queries ``q``: as
        :class:`RowBias` where the CPU op serves the call and :meth:`builds_biases_by_rows` says so, else
        :meth:`position_biases` (the RowBias pair stands in for the two tensors; eager only).

        Args:
            q: the call's queries (their device and dtype, and ``torch.compile``, decide the op).
            size: the layout the forward pass sees.
            num_prefix_tokens: P prefix tokens of the call.
            padded: a padding mask is given (it is folded into whole biases).
            dropout_p: the call's attention dropout (any: the SDPA path, whole biases).
            shortcut: the call's ``shortcut · V`` weight (any: the SDPA path, whole biases).
        """
        if (not padded and shortcut == 0.0 and supports_fused(q, dropout_p)
                and self.builds_biases_by_rows(size, num_prefix_tokens)):
            return self.position_bias_rows(size)  # type: ignore[return-value]
        return self.position_biases(size)

    @torch.jit.unused
    def builds_biases_by_rows(self, size: List[int], num_prefix_tokens: int) -> bool:
        """Whether :meth:`position_bias_rows` serves a call at ``size`` rather than :meth:`position_biases`:
        an (h, w) map without prefix tokens whose whole biases are larger than an evaluating layer keeps
        (:attr:`bias_cache_elements`). Smaller ones are built whole, once per call (and kept in
        evaluation); larger ones, fresh allocations of tens of MB per layer at detection sizes in the
        forward pass, again in the backward pass and for their gradients, go to the op factored.

        Args:
            size: the layout the forward pass sees.
            num_prefix_tokens: P prefix tokens of the layer (any: whole biases, which carry their column).
        """
        if len(size) != 2 or num_prefix_tokens or not hasattr(self, "an_bias"):
            return False
        return 2 * self.na_bias.shape[0] * self.na_bias.shape[1] * size[0] * size[1] > self.bias_cache_elements

    @torch.jit.unused
    def position_bias_rows(self, size: List[int]) -> Tuple[RowBias, RowBias]:
        """B1 and B2 (agent-major) of an (h, w) map as :class:`RowBias`: what :meth:`position_biases`
        returns, in factored form (cols and offset carry autograd to the parameters), for the CPU op to
        build by chunks of map rows. Eager only.

        Args:
            size: [h, w], the layout the forward pass sees.
        """
        h, w = size[0], size[1]
        ry = _linear_weights(self.na_bias.shape[2], h, self.na_bias)
        rx = _linear_weights(self.na_bias.shape[3], w, self.na_bias)
        heads = self.na_bias.shape[0]
        b1, b2 = RowBias(self._agent_plane(ry, rx), heads), RowBias(self._query_plane(ry, rx), heads)
        if torch.is_grad_enabled():  # cols are 7 map rows' worth each: rebuilt in the backward pass, not kept
            from .recompute import mark_recomputable

            size = list(size)
            mark_recomputable(lambda: _factor_tensors(self.position_bias_rows(size)), *_factor_tensors((b1, b2)))
        return b1, b2


def _factor_tensors(biases: Tuple[RowBias, RowBias]) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(cols, offset) of B1, then of B2."""
    return biases[0].factors[1], biases[0].factors[2], biases[1].factors[1], biases[1].factors[2]


def _bias_stamp(module: AgentPositionBias, size: List[int]) -> tuple:
    # what the biases are a function of: the size and each parameter's storage and version counter
    # (bumped by every in-place update: optimizer steps, load_state_dict, copy_)
    params = module.bias_parameters()
    return (tuple(size),) + tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in params)


@torch.jit.unused
def _cached_biases(module: AgentPositionBias, size: List[int]) -> Optional[Tuple[Optional[Tensor], Tensor]]:
    cache = module.__dict__.get("_bias_cache")
    if cache is not None and cache[0] == _bias_stamp(module, size) and _fits_cache(module, cache[1], cache[2]):
        return cache[1], cache[2]
    return None


@torch.jit.unused
def _fits_cache(module: AgentPositionBias, b1: Optional[Tensor], b2: Tensor) -> bool:
    return (0 if b1 is None else b1.numel()) + b2.numel() <= module.bias_cache_elements


@torch.jit.unused
def _cache_biases(module: AgentPositionBias, size: List[int], b1: Optional[Tensor], b2: Tensor) -> None:
    # one entry (the last size): a plain attribute, not a buffer, so it never reaches a state dict
    if not _fits_cache(module, b1, b2):
        module.__dict__.pop("_bias_cache", None)  # too large to hold between calls
        return
    module.__dict__["_bias_cache"] = (_bias_stamp(module, size), b1, b2)


@torch.jit.unused
def _rebuild_in_backward(module: AgentPositionBias, size: List[int], b1: Optional[Tensor], b2: Tensor) -> None:
    # built from parameters alone: the fused op rebuilds them in the backward pass instead of keeping
    # (n × N) tensors per layer alive until then
    from .recompute import mark_recomputable

    size = list(size)
    mark_recomputable(lambda: module.position_biases(size), b1, b2)


def _plane_factors(template: Tensor, ry: Tensor, rx: Tensor, col: Tensor, row: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """An (h, w) bias, the (H, n, th, tw) ``template`` bilinearly resized by ``ry`` (h, th) and ``rx`` (w, tw)
    plus the axis terms ``col`` (H·n, h, 1) and ``row`` (H·n, 1, w), as factors: rows (h, K), cols
    (H·n, K, w) and offset (H·n, h, 1) with bias[a, y, x] = Σ_k rows[y, k]·cols[a, k, x] + offset[a, y].
    The resize is separable: rows = ry, cols = the template resized along w. Every row of a linear
    resize sums to 1, so the row term rides in every k of cols, and a map row's bias reads only the two
    template rows it lies between (:func:`plane_bias_rows` multiplies by no more than those)."""
    H, n, th, tw = template.shape[0], template.shape[1], template.shape[2], template.shape[3]
    cols = torch.matmul(template.reshape(H * n, th, tw), rx.t()).add_(row)  # (H·n, th, w)
    return ry, cols, col


def _sequence_bias(template: Tensor, r: Tensor, term: Tensor) -> Tensor:
    """(1, H, n, L): the (H, n, T) ``template`` linearly resized by ``r`` (L, T) plus ``term`` (1, H, n, L), one addmm."""
    H, n, T = template.shape[0], template.shape[1], template.shape[2]
    length = r.shape[0]
    out = torch.addmm(term.reshape(H * n, length), template.reshape(H * n, T), r.t())
    return out.reshape(1, H, n, length)


def _add_depth(plane: Tensor, depth: Tensor) -> Tensor:
    """(1, H, n, t·h·w): the (1, H, n, h·w) ``plane`` bias shared by every frame plus ``depth`` (1, H, n, t)."""
    H, n = plane.shape[1], plane.shape[2]
    t = depth.shape[-1]
    return (plane.unsqueeze(3) + depth.unsqueeze(-1)).reshape(1, H, n, t * plane.shape[-1])


def _interp_dtype(t: Tensor) -> torch.dtype:
    # interpolation in float32 for half types (not every backend resizes them), else in t's dtype
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _linear_weights(size_in: int, size_out: int, like: Tensor) -> Tensor:
    """(size_out, size_in): the weights of ``F.interpolate(mode="linear", align_corners=False)`` as a
    matrix (taken from F.interpolate itself, so resizing by it is what bilinear resizing computes)."""
    eye = torch.eye(size_in, device=like.device, dtype=_interp_dtype(like)).unsqueeze(0)  # (1, in, in)
    weights = F.interpolate(eye, size=size_out, mode="linear", align_corners=False)[0]  # (in, out)
    return weights.t().to(like.dtype)
