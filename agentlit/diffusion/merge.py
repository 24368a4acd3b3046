"""Token merging for Stable Diffusion: bipartite soft matching with a random destination per cell.

Tokens x (B, N = h·w, C) of one latent map are split into two sets:

* dst: one token per sx×sy cell of the map, picked at random in the cell (the top-left one when
  randomness is off); tokens of an incomplete cell at the right/bottom border are all src.
* src: every other token.

Each src token is scored against every dst token by cosine similarity of the *metric* (the block
input) and points to its most similar dst. The r src tokens with the highest best-score are merged
(averaged) into their dst; the rest stay. The merged sequence is ``[unmerged src | dst]``
(N - r tokens). One matching serves twice (AgentSD, docs/reference.md §4): with r = ⌊N·ratio⌋ for the
features that go through attention, and with r_a = ⌊N·agent_ratio⌋ for the agent tokens.
``unmerge`` gives every original position the value of the merged token it went into.

Cost: no host<->device synchronisation (the token counts follow from the map and cell sizes, the
random picks are drawn on the CPU generator and moved once), and the agents are folded out of the
merged features with one ``scatter_add`` (the agent merge is the feature merge plus r_a - r more
src tokens, because both take the same most-similar-first order).
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["TokenMatching", "bipartite_soft_matching_random2d"]


class TokenMatching:
    """One matching of the N tokens of a (h, w) map: merge to N - r tokens, make agents, unmerge.

    Built by :func:`bipartite_soft_matching_random2d`; all index tensors are (B, ·, 1) int64.
    """

    def __init__(
        self,
        num_tokens: int,
        src_pos: Tensor,  # (1, Ns, 1) positions of the src tokens in the map
        dst_pos: Tensor,  # (1, Nd, 1) positions of the dst tokens in the map
        order: Tensor,  # (B, Ns, 1) src indices sorted by best similarity, most similar first
        best_dst: Tensor,  # (B, Ns, 1) index (into dst) of each src token's most similar dst
        r: int,
        agent_r: int,
    ) -> None:
        self.num_tokens = num_tokens
        self.src_pos, self.dst_pos = src_pos, dst_pos
        self.order, self.best_dst = order, best_dst
        self.r, self.agent_r = r, agent_r
        self._unmerge_index: Tensor | None = None
        self._counts: tuple[Tensor, Tensor] | None = None

    @property
    def num_merged(self) -> int:
        """Length of the merged feature sequence, N - r."""
        return self.num_tokens - self.r

    @property
    def num_agents(self) -> int:
        """Number of agent tokens, N - r_a."""
        return self.num_tokens - self.agent_r

    @property
    def use_agents(self) -> bool:
        """Agents pay off only while they are fewer than half the tokens attention runs on."""
        return 2 * self.num_agents < self.num_merged

    def _merge(self, x: Tensor, r: int) -> Tensor:
        # x (B, N, C) -> (B, N - r, C) = [unmerged src | dst (mean over itself and its merged src)]
        B, _, C = x.shape
        # compose the (B, ·, 1) index tensors first, so x is read once per kept/moved token
        src_of = self.src_pos.expand(B, -1, -1)  # (B, Ns, 1)
        dst = x.gather(1, self.dst_pos.expand(B, -1, C))  # (B, Nd, C)
        unm = x.gather(1, src_of.gather(1, self.order[:, r:]).expand(B, -1, C))  # (B, Ns - r, C)
        if r > 0:
            moved = x.gather(1, src_of.gather(1, self.order[:, :r]).expand(B, -1, C))  # (B, r, C)
            into = self.best_dst.gather(1, self.order[:, :r]).expand(B, -1, C)  # (B, r, C)
            dst = dst.scatter_reduce(1, into, moved, reduce="mean", include_self=True)
        return torch.cat([unm, dst], dim=1)

    def merge(self, x: Tensor) -> Tensor:
        """(B, N, C) -> merged features (B, N - r, C)."""
        return self._merge(x, self.r)

    def agents(self, x: Tensor, merged: Tensor | None = None) -> Tensor:
        """(B, N, C) -> agent tokens (B, N - r_a, C), from the same matching with r_a merges.

        Args:
            x: the tokens (B, N, C) the matching was made for.
            merged: ``merge(x)`` when already computed: the agents are then folded out of it with
                one ``scatter_add`` (the same means up to float rounding) instead of a second merge.
        """
        r, ra = self.r, self.agent_r
        if merged is None or ra < r:
            return self._merge(x, ra)
        B, _, C = merged.shape
        Ns, k = self.order.shape[1], ra - r
        # merged = [unm ranks r.. | dst]; the agent merge also folds unm ranks r..ra-1 (= merged[:, :k])
        # into their dst, so the agents are [merged[:, k:Ns-r] | dst re-averaged with those k]
        dst = merged[:, Ns - r:]  # (B, Nd, C), each the mean of cnt tokens
        if k == 0:
            return merged
        cnt, cnt_a = self._dst_counts()  # (B, Nd, 1) tokens per dst after r and after ra merges
        into = self.best_dst.gather(1, self.order[:, r:ra]).expand(B, -1, C)  # (B, k, C)
        sums = (dst * cnt.to(dst.dtype)).scatter_add(1, into, merged[:, :k])
        return torch.cat([merged[:, k:Ns - r], sums / cnt_a.to(dst.dtype)], dim=1)

    def _dst_counts(self) -> tuple[Tensor, Tensor]:
        # (B, Nd, 1) float counts: 1 + src merged into each dst with r, and with r_a merges
        if self._counts is None:
            B = self.order.shape[0]
            Nd, r, ra = self.dst_pos.shape[1], self.r, self.agent_r
            into = self.best_dst.gather(1, self.order[:, :ra])  # (B, ra, 1)
            ones = torch.ones(B, ra, 1, device=into.device)
            cnt = torch.ones(B, Nd, 1, device=into.device).scatter_add(1, into[:, :r], ones[:, :r])
            self._counts = (cnt, cnt.scatter_add(1, into[:, r:], ones[:, r:]))
        return self._counts

    def unmerge(self, x: Tensor) -> Tensor:
        """(B, N - r, C) -> (B, N, C): each position takes the merged token it was folded into."""
        B, _, C = x.shape
        return x.gather(1, self.unmerge_index.expand(B, -1, C))

    @property
    def unmerge_index(self) -> Tensor:
        """(B, N, 1): for every original token, its index in the merged sequence."""
        if self._unmerge_index is None:
            B, Ns, _ = self.order.shape
            Nd, r = self.dst_pos.shape[1], self.r
            dev = self.order.device
            # index in the merged sequence of each src, by src index: unmerged -> 0..Ns-r-1,
            # merged -> (Ns - r) + its dst index
            src_to_merged = torch.empty(B, Ns, 1, dtype=torch.int64, device=dev)
            unm_rank = torch.arange(Ns - r, device=dev).view(1, -1, 1).expand(B, -1, 1)
            src_to_merged.scatter_(1, self.order[:, r:], unm_rank)
            if r > 0:
                dst_of_merged = self.best_dst.gather(1, self.order[:, :r]) + (Ns - r)
                src_to_merged.scatter_(1, self.order[:, :r], dst_of_merged)
            index = torch.empty(B, self.num_tokens, 1, dtype=torch.int64, device=dev)
            index.scatter_(1, self.src_pos.expand(B, -1, 1), src_to_merged)
            dst_rank = torch.arange(Ns - r, Ns - r + Nd, device=dev).view(1, -1, 1).expand(B, -1, 1)
            index.scatter_(1, self.dst_pos.expand(B, -1, 1), dst_rank)
            self._unmerge_index = index
        return self._unmerge_index


def _dst_mask(h: int, w: int, sx: int, sy: int, rand: bool, generator: torch.Generator | None,
              device: torch.device | str = "cpu") -> Tensor:
    """(h·w,) bool on ``device``, True at the one destination token of every complete sy×sx cell."""
    hsy, wsx = h // sy, w // sx
    if rand:  # drawn on the CPU generator (reproducible on any device), moved once
        pick = torch.randint(sy * sx, (hsy, wsx), generator=generator, device="cpu").to(device, non_blocking=True)
    else:
        pick = torch.zeros(hsy, wsx, dtype=torch.int64, device=device)
    cells = torch.zeros(hsy, wsx, sy * sx, dtype=torch.bool, device=device)
    cells.scatter_(2, pick.unsqueeze(-1), True)
    cells = cells.view(hsy, wsx, sy, sx).transpose(1, 2).reshape(hsy * sy, wsx * sx)
    mask = torch.zeros(h, w, dtype=torch.bool, device=device)
    mask[: hsy * sy, : wsx * sx] = cells  # border tokens outside complete cells stay src
    return mask.flatten()


def _src_dst_perm(mask: Tensor, num_dst: int) -> Tensor:
    """(N,) the positions of the src tokens (mask False) then of the dst tokens, each in raster
    order: a stable argsort of ``mask`` in O(N), without reading the mask back to the host."""
    N = mask.numel()
    is_dst = mask.to(torch.int64)
    dst_rank = is_dst.cumsum(0) - 1  # rank of each dst among the dst
    src_rank = (1 - is_dst).cumsum(0) - 1  # rank of each src among the src
    slot = torch.where(mask, (N - num_dst) + dst_rank, src_rank)
    return torch.empty_like(slot).scatter_(0, slot, torch.arange(N, device=mask.device))


def bipartite_soft_matching_random2d(
    metric: Tensor,
    w: int,
    h: int,
    sx: int,
    sy: int,
    r: int,
    agent_r: int = 0,
    *,
    use_rand: bool = True,
    generator: torch.Generator | None = None,
) -> TokenMatching | None:
    """Match the tokens of a (h, w) map for merging (ToMe for SD) and for AgentSD's agents.

    Args:
        metric: (B, N = h·w, C) features the similarity is measured on (the block input).
        w: the map width in tokens.
        h: the map height in tokens.
        sx: cell width; one destination token per complete cell.
        sy: cell height.
        r: src tokens merged for the features (clamped to the number of src tokens).
        agent_r: src tokens merged for the agent tokens (clamped likewise).
        use_rand: pick the destination at random in each cell (else the top-left token).
        generator: CPU generator for the random picks (the global RNG is left untouched if given).

    Returns:
        A :class:`TokenMatching`, or None when there is nothing to do (no merge and no agents, or no
        complete cell).
    """
    B, N, _ = metric.shape
    if N != h * w:
        raise ValueError(f"metric has {N} tokens but the map is h={h} x w={w} = {h * w}")
    if sx < 1 or sy < 1:
        raise ValueError(f"sx and sy must be >= 1, got sx={sx}, sy={sy}")
    num_dst = (h // sy) * (w // sx)  # one per complete cell: known without looking at the mask
    num_src = N - num_dst
    r, agent_r = min(max(r, 0), num_src), min(max(agent_r, 0), num_src)
    if num_dst == 0 or (r == 0 and agent_r == 0):
        return None
    dev = metric.device
    perm = _src_dst_perm(_dst_mask(h, w, sx, sy, use_rand, generator, dev), num_dst)
    src_pos = perm[:num_src].view(1, -1, 1)
    dst_pos = perm[num_src:].view(1, -1, 1)
    with torch.no_grad():
        m = metric / metric.norm(dim=-1, keepdim=True)
        C = m.shape[-1]
        a = m.gather(1, src_pos.expand(B, -1, C))
        b = m.gather(1, dst_pos.expand(B, -1, C))
        scores = a @ b.transpose(-1, -2)  # (B, Ns, Nd) cosine similarity src -> dst
        best, best_dst = scores.max(dim=-1)  # (B, Ns)
        order = best.argsort(dim=-1, descending=True, stable=True)
    return TokenMatching(N, src_pos, dst_pos, order.unsqueeze(-1), best_dst.unsqueeze(-1), r, agent_r)
