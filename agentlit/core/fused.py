"""The CPU agent-attention operator: agent-major broadcast step and a hand-written backward.

Same quantity as :func:`agentlit.core.agent_attention_reference` (q (B, H, N, d), k/v (B, H, M, d),
agents (B, H, n, d), n << N, M)::

    V_A = softmax(s · A Kᵀ + B1) V            # aggregation: n agents read the M keys, (B, H, n, d)
    O   = softmax(bs · Q Aᵀ + B2) V_A          # broadcast: every query reads the n agents, (B, H, N, d)

Why not two ``scaled_dot_product_attention`` calls (what CUDA and TorchScript run):

- **Short softmax rows.** The broadcast softmax runs over only n agents (9 in Agent-Swin's first
  stage), and a softmax along a short last axis is an order of magnitude slower per element on the CPU
  than along a long one. Here the broadcast logits are built agent-major, P2ᵀ = softmax over agents
  of (bs·A Qᵀ + B2ᵀ) with shape (H, n, N), so the reduction runs across n rows with the N tokens
  vectorised, and O = P2 V_A is one matmul with a transposed operand. When training, the forward pass
  keeps each token's log-sum-exp (N floats per head), so the backward pass rebuilds P2 as
  exp(logits − lse), two passes over the logits instead of a softmax's four. B2 is built agent-major anyway
  (:meth:`~agentlit.core.AgentPositionBias.position_biases`), so nothing is transposed. From 64 agents
  on (the dense agent grids of the detection backbones: 81–784 agents) a row of n agents is long enough
  for the flash kernel, which then beats the agent-major path (Agent-PVT-S at 800×1344, a stage-3 layer
  of 784 agents: 49 vs 82 ms for the broadcast step with its bias): the broadcast step is flash calls
  with B2 token-major as the mask (a RowBias builds its chunks token-major, one matmul each), and the
  backward pass rebuilds P2 from their log-sum-exps, exp(logits − lse), with no softmax.
- **Training memory.** Learned biases make SDPA fall back to its math path, which stores both
  attention maps, (B, H, n, M) and (B, H, N, n), plus copies of Q, K and V. Here the backward keeps
  only Q, K, V (views of the layer's qkv projection, stored anyway), the agents and V_A, (B, H, n, d)
  each, and recomputes the two maps, which costs two of the forward's four products (of the cheap
  O(N·n·d) kind). Biases built from parameters alone (:mod:`agentlit.core.recompute`) are not kept either:
  the backward rebuilds them, so a layer stores no (n × N) tensor at all.
- **No layout copies.** The loops run over the batch, each step a batched matmul over heads on
  strided views of Q, K and V (every head matrix has a unit last stride), writing into token-major
  (B, N, H, d) buffers, so the output and the gradients of Q, K and V need no transposing copy. With
  no prefix tokens the depthwise conv's output is that buffer: the broadcast step adds O into it.
- **Large biases by map rows.** Above a layer's size limit the biases arrive factored
  (:class:`~agentlit.core.RowBias`): both passes build them by chunks of whole map rows in one reused
  buffer and the backward pass reduces each chunk's gradient into the factors, so no whole (n × N)
  bias, nor its gradient, is allocated (at detection sizes a fresh one per layer and call cost more in
  page faults than its arithmetic).

The aggregation step of the forward pass is one SDPA call (its rows are long: M keys; with a RowBias,
one call per chunk of keys, merged by their log-sum-exps). Gradients follow the softmax rule
dS = P ⊙ (dP − Σ P ⊙ dP) and are checked against autograd of the naive reference (tests/test_fused.py).
"""
from __future__ import annotations

from typing import Any, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .recompute import recipe_of


def plane_bias_rows(factors: Tuple[Tensor, Tensor, Tensor], y0: int, y1: int, out: Optional[Tensor] = None,
                    span: Optional[Tuple[int, int]] = None) -> Tensor:
    """Map rows ``y0:y1`` of a factored (h, w) bias (:class:`RowBias`), (H·n, y1 - y0, w): one batched
    matmul (into ``out``) over the k in ``span`` (all when None: no data-dependent step, so the whole
    biases of a traced or exported model build the same way)."""
    rows, cols, offset = factors
    k0, k1 = (0, rows.shape[1]) if span is None else span
    a, part = cols.shape[0], rows[y0:y1, k0:k1]
    expanded = part.expand(a, part.shape[0], part.shape[1])
    if out is None:
        return torch.baddbmm(offset[:, y0:y1], expanded, cols[:, k0:k1])  # offset broadcast over w
    return torch.baddbmm(offset[:, y0:y1], expanded, cols[:, k0:k1], out=out)


_SMALL_BMM = 400  # below this many MACs per matrix, PyTorch's CPU bmm runs a plain loop (several times slower)


def _nonzero_span(rows: Tensor, width: int) -> Tuple[int, int]:
    """(k0, k1): the columns of ``rows`` (R, K) outside of which every entry is zero, for products of
    (R × K) by (K × ``width``) per agent row. The rows of a linear resize have two adjacent nonzero weights,
    so a few map rows use two or three of the K template rows, and a batched product over only those
    takes less time than one over all K. All K when the smaller product would fall to bmm's plain loop."""
    used = rows.ne(0).any(0).nonzero()
    if used.numel() == 0:
        return 0, 1
    k0, k1 = int(used[0]), int(used[-1]) + 1
    if (k1 - k0) * rows.shape[0] * width < _SMALL_BMM:
        return 0, rows.shape[1]
    return k0, k1


class RowBias:
    """B1, or B2 agent-major, of an (h, w) map, (1, H, n, h·w), never built whole: handed out by chunks of
    whole map rows (:meth:`rows_per_chunk`), each built into one reused buffer where it is used.

    What :meth:`~agentlit.core.AgentPositionBias.position_bias_rows` returns for this op at sizes whose
    whole biases an evaluating layer would not keep; the backward pass reduces each chunk's gradient
    into cols and offset. A whole bias of a detection-size map is tens of MB: freshly allocated in every
    call, its pages are faulted in and zeroed before the build writes them, which cost more than the
    build itself (docs/performance.md); chunks of 8–20 MB reuse memory that stays in the allocator.

    Args:
        factors: rows (h, K), cols (H·n, K, w) and offset (H·n, h, 1), with
            bias[a, y, x] = Σ_k rows[y, k]·cols[a, k, x] + offset[a, y] (a = head·n + agent).
        heads: H.
    """

    #: elements of one chunk (8 MiB in float32): a whole number of map rows, at least one (and at least
    #: :attr:`MIN_TOKENS` tokens). Each chunk is one flash call per step; at 4 MiB a 784-agent layer of
    #: Agent-PVT-S at 800×1344 got chunks of 3 map rows (252 keys), and its forward pass took 11% longer
    #: than with this size
    CHUNK = 1 << 21
    #: tokens a chunk covers at least, above :attr:`CHUNK` where one map row holds many agents' biases.
    #: PyTorch's CPU flash kernel splits the queries of a call into blocks of 256 from 768 queries on (64
    #: below): a broadcast step over chunks of fewer tokens ran 8–9% slower, and the aggregation over
    #: chunks of fewer keys 5–9% slower (Agent-PVT-S at 800×1344: 4,200 tokens and 784 agents in 504-token
    #: chunks, 1,050 tokens in 294-token chunks)
    MIN_TOKENS = 768

    def __init__(self, factors: Tuple[Tensor, Tensor, Tensor], heads: int) -> None:
        self.factors, self.heads = factors, heads
        rows, cols, _ = factors
        self.height, self.width = rows.shape[0], cols.shape[-1]
        self.agents = cols.shape[0] // heads

    @property
    def shape(self) -> Tuple[int, int, int, int]:
        """(1, H, n, h·w), the shape of the whole bias."""
        return (1, self.heads, self.agents, self.height * self.width)

    def rows_per_chunk(self) -> int:
        """Map rows of one chunk: as many as :attr:`CHUNK` elements hold, at least one, and at least
        enough for :attr:`MIN_TOKENS` tokens."""
        a = self.heads * self.agents
        return max(1, self.CHUNK // (a * self.width), -(-self.MIN_TOKENS // self.width))

    def chunks(self, dtype: torch.dtype, token_major: bool = False):
        """Yield (start, end, bias) over the tokens: bias (1, H, n, end - start) of ``dtype``, a view of a
        buffer the next chunk overwrites (use it before advancing); with ``token_major`` the transposed
        bias (1, H, end - start, n), a view of (tokens, H, n) memory (each token's row of agents contiguous)."""
        rows, cols, offset = self.factors
        a, w = cols.shape[0], self.width
        step = self.rows_per_chunk()
        buffer = torch.empty(a * min(step, self.height) * w, dtype=cols.dtype, device=cols.device)
        if token_major:  # (K, w·H·n): a chunk is then one (R, K) x (K, w·H·n) product, token-major
            # (one 2-D transpose: 4x faster than the equivalent 3-D permute's copy)
            cols_t = cols.reshape(a, -1).t().contiguous().view(cols.shape[1], w * a)
            # (h, H·n), dense: a strided operand made each chunk's broadcast add 4x slower
            offset_t = offset[..., 0].t().contiguous()
        for y0 in range(0, self.height, step):
            y1 = min(self.height, y0 + step)
            part = buffer[: a * (y1 - y0) * w]
            k0, k1 = _nonzero_span(rows[y0:y1], w)
            if token_major:
                torch.mm(rows[y0:y1, k0:k1], cols_t[k0:k1], out=part.view(y1 - y0, w * a))
                part.view(y1 - y0, w, a).add_(offset_t[y0:y1, None])  # offset broadcast over x
                yield y0 * w, y1 * w, part.view(1, (y1 - y0) * w, self.heads, self.agents).transpose(1, 2).to(dtype)
            else:
                plane_bias_rows(self.factors, y0, y1, out=part.view(a, y1 - y0, w), span=(k0, k1))
                yield y0 * w, y1 * w, part.view(1, self.heads, self.agents, (y1 - y0) * w).to(dtype)

    def dense(self) -> Tensor:
        """The whole bias (1, H, n, h·w)."""
        return plane_bias_rows(self.factors, 0, self.height).reshape(self.shape)


_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu  # (out, logsumexp)

__all__ = [
    "RowBias", "agent_attention_fused", "channels_last_map", "depthwise_conv", "plane_bias_rows", "supports_fused",
]


def channels_last_map(tokens: Tensor, layout: List[int]) -> Tensor:
    """(B, N, C) tokens as a (B, C, *layout) map in channels-last memory: a view of dense token-major
    memory, else one copy. Depthwise convs on the CPU are several times faster on dense channels-last
    input than on the strided views a fused qkv projection gives (row stride 3C)."""
    B, C = tokens.shape[0], tokens.shape[2]
    x = tokens.reshape([B] + layout + [C])
    if not x.is_contiguous():
        x = x.contiguous()
    return x.movedim(-1, 1)


def depthwise_conv(x: Tensor, weight: Tensor, bias: Optional[Tensor], rank: int) -> Tensor:
    """The depthwise conv of a (B, C, *layout) map of rank 1, 2 or 3 (odd kernel, 'same' zero padding)."""
    pad = weight.shape[-1] // 2
    groups = x.shape[1]
    if rank == 2:
        return F.conv2d(x, weight, bias, padding=pad, groups=groups)
    if rank == 1:
        return F.conv1d(x, weight, bias, padding=pad, groups=groups)
    return F.conv3d(x, weight, bias, padding=pad, groups=groups)


def supports_fused(q: Tensor, dropout_p: float) -> bool:
    """Whether :func:`agent_attention_fused` serves this call: eager CPU tensors, no attention dropout
    (``torch.compile`` traces the SDPA path instead, whose graph its compiler fuses itself)."""
    return q.device.type == "cpu" and dropout_p == 0.0 and not torch.compiler.is_compiling()


def _as_4d(t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    """A bias broadcastable to (B, H, ·, ·) as a 4-D tensor of ``dtype`` (leading size-1 axes added)."""
    if t is None:
        return None
    t = t.to(dtype)
    return t if t.dim() == 4 else t.reshape((1,) * (4 - t.dim()) + tuple(t.shape))


_HEAD_LOOP = 4  # heads up to which the op loops over heads (each step batched over the samples)


def _loop_axis(H: int) -> int:
    """The axis the op loops over: heads (1) for layers of few heads, else the batch (0). Every slice
    along either is a strided batch of matrices with a unit last stride, so each step is one batched
    matmul over the other axis with no layout copy; fewer, larger steps cost less dispatch. Chosen by
    the head count alone, never the batch size, so a sample takes the same path whatever else is in
    its batch (DDP ranks with half the batch run the same steps as one process)."""
    return 1 if H <= _HEAD_LOOP else 0


def _pick(t: Optional[Tensor], axis: int, i: int) -> Optional[Tensor]:
    """Slice ``i`` along ``axis`` (0 batch, 1 heads) of a 4-D bias that is per-slice or shared (size 1)."""
    if t is None:
        return None
    return t.select(axis, 0 if t.shape[axis] == 1 else i)


_TILE = 1 << 16  # elements of one (·, n, tokens) logits tile: the tiles of a slice stay in a core's cache
_MIN_TILE = 256  # tokens; smaller tiles cost more in dispatch than they gain in cache hits


def _tile_rows(H: int, n: int, d: int, axis: int) -> int:
    """Logit rows of one sample that size its token tiles (:func:`_tiles`): H·n, except where the op loops
    over heads (``axis`` 1) and a head's n rows of logits outweigh the tile's Q, dO and dQ rows (n ≥ 2d, the
    dense agent grids): then n, so those tiles are H times longer and cost H times fewer dispatches. Where
    d dominates, longer tiles were slower (Agent-PVT-S at 896²: 16 agents, d = 64)."""
    return n if axis == 1 and n >= 2 * d else H * n


def _tiles(tokens: int, rows: int) -> list[Tuple[int, int]]:
    """Token ranges that cut a (rows, tokens) logits slice into cache-sized tiles (one range when it fits)."""
    step = max(_MIN_TILE, _TILE // max(rows, 1))
    if tokens <= step + step // 2:
        return [(0, tokens)]
    return [(start, min(tokens, start + step)) for start in range(0, tokens, step)]


def _aggregation_probs(a: Tensor, k: Tensor, b1: Optional[Tensor], s: float, lse: Tensor) -> Tensor:
    """P1 = exp(s·A Kᵀ + B1 − lse) over a range of keys: a (·, n, d), k (·, m, d), lse (·, n, 1) → (·, n, m).
    With the log-sum-exp over all keys from the forward pass, any range of keys is exact on its own."""
    if b1 is None:
        logits = torch.bmm(a, k.transpose(1, 2)).mul_(s)
    else:
        logits = torch.baddbmm(b1, a, k.transpose(1, 2), alpha=s)
    return logits.sub_(lse).exp_()


def _broadcast_logits_t(a: Tensor, q: Tensor, b2t: Optional[Tensor], bs: float) -> Tensor:
    """bs·A Qᵀ + B2ᵀ: a (·, n, d), q (·, N, d), b2t (·, n, N) or None → (·, n, N), agent-major."""
    if b2t is None:
        return torch.bmm(a, q.transpose(1, 2)).mul_(bs)
    return torch.baddbmm(b2t, a, q.transpose(1, 2), alpha=bs)


def _broadcast_probs_t(a: Tensor, q: Tensor, b2t: Optional[Tensor], bs: float, lse: Optional[Tensor] = None) -> Tensor:
    """P2ᵀ = softmax over agents of bs·A Qᵀ + B2ᵀ: a (·, n, d), q (·, N, d) → (·, n, N). Each token's
    column is its own softmax, so any range of tokens is exact on its own; with the tokens' log-sum-exps
    lse (·, 1, N) from the forward pass it is exp(logits − lse), with no reduction."""
    logits = _broadcast_logits_t(a, q, b2t, bs)
    return torch.softmax(logits, -2) if lse is None else logits.sub_(lse).exp_()


def _softmax_keeping_lse_(logits: Tensor, dim: int, lse: Tensor) -> Tensor:
    """softmax(logits) along ``dim``, in place, its log-sum-exp written into ``lse`` (the shape of a keepdim
    reduction over ``dim``, any strides): what the backward pass needs to rebuild the probabilities as
    exp(logits − lse), two passes instead of a softmax's four."""
    peak = logits.amax(dim, keepdim=True)
    total = logits.sub_(peak).exp_().sum(dim, keepdim=True)
    torch.add(peak, total.log(), out=lse)
    return logits.div_(total)


def _cols(t: Optional[Tensor], start: int, end: int) -> Optional[Tensor]:
    """Tokens ``start:end`` of a bias (or its gradient) along the last axis; one broadcast along it stays whole."""
    if t is None or t.shape[-1] == 1:
        return t
    return t[..., start:end]


Bias = Union[Tensor, RowBias]  # a whole bias, or one the op builds by chunks of map rows


def _chunks(bias: Optional[Bias], tokens: int, dtype: torch.dtype) -> Iterator[Tuple[int, int, Optional[Tensor]]]:
    """(start, end, bias over tokens start:end): one range for a whole bias (or none), map-row chunks
    of a :class:`RowBias` (each valid until the next is drawn)."""
    if isinstance(bias, RowBias):
        yield from bias.chunks(dtype)
    else:
        yield 0, tokens, bias


def _aggregate(a: Tensor, k: Tensor, v: Tensor, b1: Optional[Bias], s: float) -> Tuple[Tensor, Tensor]:
    """V_A = softmax(s·A Kᵀ + B1) V (B, H, n, d) and the log-sum-exp of each agent's row (B, H, n): one
    flash call over the M-long key rows (detached: a mask that requires grad would send it to the math
    path); with a :class:`RowBias`, one call per chunk of keys, merged by their log-sum-exps."""
    a, k, v = a.detach(), k.detach(), v.detach()
    if not isinstance(b1, RowBias):
        return _flash(a, k, v, 0.0, False, attn_mask=None if b1 is None else b1.detach(), scale=s)
    outs, lses = [], []
    for start, end, mask in b1.chunks(a.dtype):
        out, lse = _flash(a, k[:, :, start:end], v[:, :, start:end], 0.0, False, attn_mask=mask, scale=s)
        outs.append(out)
        lses.append(lse)
    lse_c = torch.stack(lses)  # (chunks, B, H, n)
    lse = torch.logsumexp(lse_c, 0)
    weights = (lse_c - lse).exp_().unsqueeze(-1)  # each chunk's share of the softmax mass
    agent_v = outs[0].mul_(weights[0])
    for out, weight in zip(outs[1:], weights[1:]):
        agent_v.addcmul_(out, weight)
    return agent_v, lse


_FLASH_BROADCAST = 64  # agents from which the broadcast step is a flash call (rows of n agents are long enough)


def _broadcast_flash(q: Tensor, a: Tensor, agent_v: Tensor, b2t: Optional[Bias], bs: float,
                     into: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """O = softmax(bs·Q Aᵀ + B2) V_A token-major (B, N, H, d) by flash calls with B2 token-major as the
    mask (chunks of map rows for a :class:`RowBias`; a whole agent-major bias is transposed once), added
    into ``into`` when given, and the log-sum-exp of each token's logits (B, H, N)."""
    B, H, N, d = q.shape
    q, a, agent_v = q.detach(), a.detach(), agent_v.detach()
    if not isinstance(b2t, RowBias):
        b2 = None if b2t is None else b2t.detach().transpose(-1, -2)  # (·, ·, N, n)
        if b2 is not None and b2.shape[-1] > 1 and b2.stride(-1) != 1:
            b2 = b2.contiguous()  # flash reads the mask by rows of agents
        out, lse = _flash(q, a, agent_v, 0.0, False, attn_mask=b2, scale=bs)
        if into is not None:
            return into.add_(out.transpose(1, 2)), lse
        # token-major already when q is a view of token-major memory (a layer's qkv projection)
        return out.transpose(1, 2).contiguous(), lse
    out = torch.empty(B, N, H, d, dtype=q.dtype, device=q.device) if into is None else into
    lse = torch.empty(B, H, N, dtype=q.dtype, device=q.device)
    for first, last, mask in b2t.chunks(q.dtype, token_major=True):
        part, lse[:, :, first:last] = _flash(q[:, :, first:last], a, agent_v, 0.0, False, attn_mask=mask, scale=bs)
        if into is None:
            out[:, first:last].copy_(part.transpose(1, 2))
        else:
            out[:, first:last].add_(part.transpose(1, 2))
    return out, lse


def _forward(q: Tensor, k: Tensor, v: Tensor, a: Tensor, b1: Optional[Bias], b2t: Optional[Bias],
             s: float, bs: float, into: Optional[Tensor] = None,
             keep_lse: bool = False) -> Tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
    """(O in token-major memory (B, N, H, d), added into ``into`` (B, N, H, d) when given, V_A (B, H, n, d),
    log-sum-exp of the aggregation (B, H, n), of the broadcast (B, H, N) where flash calls ran it or
    ``keep_lse`` asks for it (the backward pass then rebuilds P2 without a softmax), else None)."""
    B, H, N, d = q.shape
    n = a.shape[2]
    # aggregation: also gives the log-sum-exp the backward pass needs to recompute the map by key tiles
    agent_v, lse = _aggregate(a, k, v, b1, s)  # (B, H, n, d), (B, H, n)
    if n >= _FLASH_BROADCAST:
        out, lse2 = _broadcast_flash(q, a, agent_v, b2t, bs, into)
        return out, agent_v, lse, lse2
    out = torch.empty(B, N, H, d, dtype=q.dtype, device=q.device) if into is None else into
    lse2 = torch.empty(B, H, N, dtype=q.dtype, device=q.device) if keep_lse else None
    axis = _loop_axis(H)
    rows = _tile_rows(H, n, d, axis)
    o = out.transpose(1, 2)  # (B, H, N, d) view of token-major memory
    for first, last, bias in _chunks(b2t, N, q.dtype):  # whole biases: one range
        for i in range(q.shape[axis]):
            ai, qi, vai, oi, bi = (a.select(axis, i), q.select(axis, i)[:, first:last], agent_v.select(axis, i),
                                   o.select(axis, i)[:, first:last], _pick(bias, axis, i))
            lse_i = None if lse2 is None else lse2.select(axis, i)[:, None, first:last]  # (·, 1, tokens)
            for start, end in _tiles(last - first, rows):
                if lse_i is None:
                    p2t = _broadcast_probs_t(ai, qi[:, start:end], _cols(bi, start, end), bs)  # (·, n, tile)
                else:
                    p2t = _softmax_keeping_lse_(_broadcast_logits_t(ai, qi[:, start:end], _cols(bi, start, end), bs),
                                                -2, lse_i[..., start:end])
                if into is None:
                    torch.bmm(p2t.transpose(1, 2), vai, out=oi[:, start:end])
                else:
                    oi[:, start:end].baddbmm_(p2t.transpose(1, 2), vai)
    return out, agent_v, lse, lse2


class _Local:
    """The local term on V: a depthwise conv of V's layout tokens (after P prefix tokens), added to O."""

    def __init__(self, layout: Sequence[int], prefix: int) -> None:
        self.layout, self.prefix = list(layout), prefix

    def first(self, v: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Optional[Tensor]:
        """With no prefix tokens, the local term as the (B, N, H, d) token-major tensor O is then added
        into (the conv's output: no separate O, no extra pass); else None (O first, the term added after)."""
        if self.prefix:
            return None
        B, H, N, d = v.shape
        # a 2-D / 3-D conv on channels-last input writes token-major memory (a view); conv1d does not
        return self.conv(v, weight, bias).contiguous().view(B, N, H, d)

    def add_to(self, out: Tensor, v: Tensor, weight: Tensor, bias: Optional[Tensor]) -> None:
        """Add the local term to the layout tokens of O (B, N, H, d) after the broadcast step: behind prefix
        tokens only; without them :meth:`first` already started O with it, and this does nothing."""
        if self.prefix:
            B, N, H, d = out.shape
            out.view(B, N, H * d)[:, self.prefix:].add_(self.conv(v, weight, bias))

    def tokens(self, v: Tensor) -> Tensor:
        """V (B, H, M, d) → its layout tokens (B, M - P, C), a view of token-major memory."""
        B, H, M, d = v.shape
        return v.transpose(1, 2).reshape(B, M, H * d)[:, self.prefix:]

    def conv(self, v: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        x = self.tokens(v)
        y = depthwise_conv(channels_last_map(x, self.layout), weight, bias, len(self.layout))
        return y.movedim(1, -1).reshape(x.shape)  # channels-last output: a view

    def backward(self, grad_local: Tensor, v: Tensor, weight: Tensor, has_bias: bool,
                 mask: list[bool]) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
        rank, C, pad = len(self.layout), weight.shape[0], weight.shape[-1] // 2
        dx, dw, db = torch.ops.aten.convolution_backward(
            channels_last_map(grad_local, self.layout), channels_last_map(self.tokens(v), self.layout), weight,
            [C] if has_bias else None, [1] * rank, [pad] * rank, [1] * rank, False, [0] * rank, C, mask,
        )
        return (None if dx is None else dx.movedim(1, -1).reshape(grad_local.shape)), dw, db


def _softmax_backward_(p: Tensor, dp: Tensor, dim: int) -> Tensor:
    """dS = P ⊙ (dP − Σ_dim P ⊙ dP), written into ``dp``."""
    return dp.sub_((dp * p).sum(dim, keepdim=True)).mul_(p)


def _accumulate(grad: Optional[Tensor], axis: int, i: int, value: Tensor, first_tile: bool) -> None:
    """Add one slice's bias gradient into ``grad`` (per-slice or shared, broadcast dims summed); the first
    value that reaches a place is written there instead, so gradient buffers need no zero fill. A place is
    first reached by the first slice, or by every slice when the bias is per slice, and by the tile
    ``first_tile`` says (:meth:`_BiasGrad.first_tile`)."""
    if grad is None:
        return
    target = _pick(grad, axis, i)
    assert target is not None
    value = value if value.shape == target.shape else value.sum_to_size(target.shape)
    if (i == 0 or grad.shape[axis] > 1) and first_tile:
        target.copy_(value)
    else:
        target.add_(value)


class _AgentAttentionFunction(torch.autograd.Function):
    """O (+ local term) (+ output projection) with a hand-written backward; see the module docstring.

    A bias comes whole (``b1`` / ``b2t``, kept or rebuilt from a recipe) or as the cols and offset of a
    :class:`RowBias` (``c1, o1`` / ``c2, o2``, small; their constant rows travel with the non-tensor
    arguments): then both passes build it by chunks of map rows and the backward pass reduces each
    chunk's gradient into the factors at once, so no whole (n × N) bias nor its gradient is allocated.
    With the output projection folded in, its input X = O + local is not kept either: the backward
    pass rebuilds O from the broadcast maps it recomputes anyway, and the local term from V.
    """

    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor, a: Tensor, b1: Optional[Tensor], b2t: Optional[Tensor],
                dwc_weight: Optional[Tensor], dwc_bias: Optional[Tensor], proj_weight: Optional[Tensor],
                proj_bias: Optional[Tensor], c1: Optional[Tensor], o1: Optional[Tensor], c2: Optional[Tensor],
                o2: Optional[Tensor], s: float, bs: float, recipes: Tuple[Any, ...],
                rows: Tuple[Optional[Tensor], Optional[Tensor]], local: Optional[_Local]) -> Tensor:
        H = q.shape[1]
        bias1 = b1 if c1 is None else RowBias((rows[0], c1.detach(), o1.detach()), H)
        bias2 = b2t if c2 is None else RowBias((rows[1], c2.detach(), o2.detach()), H)
        into = None if local is None else local.first(v, dwc_weight, dwc_bias)
        out, agent_v, lse, lse2 = _forward(q, k, v, a, bias1, bias2, s, bs, into, keep_lse=True)  # (B, N, H, d)
        B, N, H, d = out.shape
        x = out.view(B, N, H * d)
        if local is not None:
            local.add_to(out, v, dwc_weight, dwc_bias)
        ctx.recipes, ctx.rows, ctx.local, ctx.s, ctx.bs = recipes, rows, local, s, bs
        ctx.has = (dwc_bias is not None, proj_weight is not None, proj_bias is not None)
        ctx.bias_shapes = (None if b1 is None else b1.shape, None if b2t is None else b2t.shape)
        # rebuilt ones (whole biases, RowBias factors) are not kept
        kept = [None if r is not None else t for t, r in zip((b1, b2t, c1, o1, c2, o2), recipes)]
        ctx.save_for_backward(q, k, v, a, agent_v, lse, lse2, dwc_weight, dwc_bias, proj_weight, *kept)
        if proj_weight is None:
            return out
        return F.linear(x, proj_weight, proj_bias)  # (B, N, C_out); x itself is not kept

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor):  # noqa: ANN205
        # in the forward pass's precision: a backward called inside an autocast region (the forward ran
        # in float32 with autocast off) must not get half-precision products
        with torch.autocast(grad_out.device.type, enabled=False):
            return _AgentAttentionFunction._backward(ctx, grad_out)

    @staticmethod
    def _backward(ctx: Any, grad_out: Tensor):  # noqa: ANN205
        q, k, v, a, agent_v, lse, lse2, dwc_weight, dwc_bias, proj_weight, b1, b2t, c1, o1, c2, o2 = ctx.saved_tensors
        has_dwc_bias, has_proj, has_proj_bias = ctx.has
        b1, b2t, c1, o1, c2, o2 = _biases_for_backward(ctx.recipes, (b1, b2t, c1, o1, c2, o2), q.dtype)
        s, bs, local = ctx.s, ctx.bs, ctx.local
        B, H, N, d = q.shape
        M, C = k.shape[2], H * d
        need = ctx.needs_input_grad
        kw = dict(dtype=q.dtype, device=q.device)
        x = d_proj_weight = d_proj_bias = None
        if has_proj:  # y = X Wᵀ + b: dX = dy W; dW needs X, rebuilt below
            grad_y = grad_out.reshape(B * N, -1)
            g_x = torch.mm(grad_y, proj_weight).view(B, N, H, d)
            d_proj_bias = grad_y.sum(0) if has_proj_bias and need[9] else None
        else:
            g_x = grad_out
        # the local term first: with no prefix tokens its conv outputs start X and dV, into which the
        # loops below add (no separate buffers, no extra pass); behind prefix tokens they are added after
        d_local = d_dwc_weight = d_dwc_bias = None
        if local is not None:
            mask = [True, bool(need[6]), has_dwc_bias and bool(need[7])]
            d_local, d_dwc_weight, d_dwc_bias = local.backward(
                g_x.reshape(B, N, C)[:, local.prefix:], v, dwc_weight, has_dwc_bias, mask)
        into = local is not None and not local.prefix
        if has_proj and need[8]:  # X = O + local, filled by the loop and the local term
            x = local.first(v, dwc_weight, dwc_bias) if into else torch.empty(B, N, H, d, **kw)
        g = g_x.transpose(1, 2)  # (B, H, N, d) view of the token-major gradient of O
        dq = torch.empty(B, N, H, d, **kw)
        dk = torch.empty(B, M, H, d, **kw)
        dv = d_local.contiguous().view(B, M, H, d) if into else torch.empty(B, M, H, d, **kw)
        da = torch.empty_like(a)
        grad1 = _BiasGrad(b1 if c1 is None else RowBias((ctx.rows[0], c1, o1), H), ctx.bias_shapes[0],
                          need[4] if c1 is None else need[10] or need[11], kw)
        grad2 = _BiasGrad(b2t if c2 is None else RowBias((ctx.rows[1], c2, o2), H), ctx.bias_shapes[1],
                          need[5] if c2 is None else need[12] or need[13], kw)
        axis = _loop_axis(H)
        xh = None if x is None else x.transpose(1, 2)  # (B, H, N, d) views of token-major buffers
        dqh, dkh, dvh = dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)
        n = a.shape[2]
        rows = _tile_rows(H, n, d, axis)
        slices = range(q.shape[axis])  # each slice: (·, T, d) matrices, batched over the other axis
        dva = [torch.zeros_like(agent_v.select(axis, i)) for i in slices]  # Σ over tokens of P2ᵀ dO
        dai = [torch.zeros_like(a.select(axis, i)) for i in slices]
        # broadcast step, agent-major by token tiles (inside chunks of map rows for a RowBias):
        # O = P2 V_A, P2ᵀ (·, n, tile)
        for first, last, bias, db in grad2.chunks(N):
            for i in slices:
                ai, vai = a.select(axis, i), agent_v.select(axis, i)
                qi, gi, dqi = (t.select(axis, i)[:, first:last] for t in (q, g, dqh))
                b2i = _pick(bias, axis, i)
                lse_i = lse2.select(axis, i)[:, None, first:last]  # (·, 1, tokens): P2 = exp(logits − lse)
                for start, end in _tiles(last - first, rows):  # per sample's size: the same tiles at any batch size
                    p2t = _broadcast_probs_t(ai, qi[:, start:end], _cols(b2i, start, end), bs, _cols(lse_i, start, end))
                    g_t = gi[:, start:end]
                    if xh is not None:  # O rebuilt for dW of the projection
                        x_t = xh.select(axis, i)[:, first + start:first + end]
                        if into:
                            x_t.baddbmm_(p2t.transpose(1, 2), vai)
                        else:
                            torch.bmm(p2t.transpose(1, 2), vai, out=x_t)
                    dva[i].baddbmm_(p2t, g_t)
                    ds2t = _softmax_backward_(p2t, torch.bmm(vai, g_t.transpose(1, 2)), -2)  # (·, n, tile)
                    _accumulate(_cols(db, start, end), axis, i, ds2t, grad2.first_tile(start))
                    torch.bmm(ds2t.transpose(1, 2), ai, out=dqi[:, start:end]).mul_(bs)
                    dai[i].baddbmm_(ds2t, qi[:, start:end], alpha=bs)
            grad2.reduce(first, last)
        # aggregation step by key tiles: V_A = P1 V with P1 = exp(s·A Kᵀ + B1 − lse); the softmax
        # rule's row sums Σ_keys P1 ⊙ dP1 equal dV_A · V_A, so no tile needs the others
        sums = [(dva[i] * agent_v.select(axis, i)).sum(-1, keepdim=True) for i in slices]  # (·, n, 1)
        for first, last, bias, db in grad1.chunks(M):
            for i in slices:
                ai, lse_i = a.select(axis, i), lse.select(axis, i).unsqueeze(-1)  # (·, n, 1)
                ki, vi, dki, dvi = (t.select(axis, i)[:, first:last] for t in (k, v, dkh, dvh))
                b1i = _pick(bias, axis, i)
                for start, end in _tiles(last - first, rows):
                    k_t, v_t = ki[:, start:end], vi[:, start:end]
                    p1 = _aggregation_probs(ai, k_t, _cols(b1i, start, end), s, lse_i)  # (·, n, tile)
                    if into:
                        dvi[:, start:end].baddbmm_(p1.transpose(1, 2), dva[i])
                    else:
                        torch.bmm(p1.transpose(1, 2), dva[i], out=dvi[:, start:end])
                    ds1 = torch.bmm(dva[i], v_t.transpose(1, 2)).sub_(sums[i]).mul_(p1)  # (·, n, tile)
                    _accumulate(_cols(db, start, end), axis, i, ds1, grad1.first_tile(start))
                    dai[i].baddbmm_(ds1, k_t, alpha=s)
                    torch.bmm(ds1.transpose(1, 2), ai, out=dki[:, start:end]).mul_(s)
            grad1.reduce(first, last)
        for i in slices:
            da.select(axis, i).copy_(dai[i])
        if local is not None and not into:
            if x is not None:  # the local term of X, recomputed (a depthwise conv: cheap next to keeping X)
                local.add_to(x, v, dwc_weight, dwc_bias)
            dv.view(B, M, C)[:, local.prefix:].add_(d_local)
        if x is not None:
            d_proj_weight = torch.mm(grad_out.reshape(B * N, -1).t(), x.view(B * N, C))
        grads = (dq.transpose(1, 2) if need[0] else None, dk.transpose(1, 2) if need[1] else None,
                 dv.transpose(1, 2) if need[2] else None, da if need[3] else None, grad1.whole, grad2.whole,
                 d_dwc_weight, d_dwc_bias, d_proj_weight, d_proj_bias, *grad1.factors, *grad2.factors)
        return (*grads, None, None, None, None, None)


class _BiasGrad:
    """One bias as the backward pass reads it, by the chunks :func:`_chunks` hands out, and its gradient:
    whole (a tensor of the bias's shape, written by tiles: :func:`_accumulate`) or, for a :class:`RowBias`,
    the gradients of its cols and offset, into which each chunk's gradient (one reused buffer, written
    the same way) is reduced as soon as the chunk is done."""

    def __init__(self, bias: Optional[Bias], whole_shape: Optional[torch.Size], needed: bool, kw: dict) -> None:
        self.bias, self.kw = bias, kw
        self.whole: Optional[Tensor] = None
        self.factors: Tuple[Optional[Tensor], Optional[Tensor]] = (None, None)
        self.buffer: Optional[Tensor] = None
        self.cols_buffer: Optional[Tensor] = None  # one chunk's gradient of the cols it reads
        if needed and isinstance(bias, RowBias):
            _, cols, offset = bias.factors  # gradients in the op's dtype (autograd casts them to the factors')
            self.factors = (torch.zeros(cols.shape, **kw), torch.zeros(offset.shape, **kw))
        elif needed and whole_shape is not None:
            self.whole = torch.empty(whole_shape, **kw)

    def chunks(self, tokens: int) -> Iterator[Tuple[int, int, Optional[Tensor], Optional[Tensor]]]:
        """(start, end, bias over tokens start:end, its gradient there (every element of which the tiles
        write before they add: not zeroed), or None when not needed)."""
        for start, end, part in _chunks(self.bias, tokens, self.kw["dtype"]):
            grad = None if self.whole is None else _cols(self.whole, start, end)
            if self.factors[0] is not None:
                if self.buffer is None:
                    self.buffer = torch.empty(part.numel(), **self.kw)
                grad = self.buffer[: part.numel()].view(part.shape)
            yield start, end, part, grad

    def first_tile(self, start: int) -> bool:
        """Whether the token tile from ``start`` (within a chunk) is the first to reach its gradient columns:
        every tile has its own, unless a whole bias broadcasts along the tokens (one column for all)."""
        return start == 0 or self.whole is None or self.whole.shape[-1] > 1

    def reduce(self, start: int, end: int) -> None:
        """Fold the gradient of a RowBias chunk (map rows start/w : end/w) into its factors'."""
        d_cols, d_offset = self.factors
        if d_cols is None:
            return
        rows = self.bias.factors[0]
        a, w = d_cols.shape[0], d_cols.shape[-1]
        y0, y1 = start // w, end // w
        grad = self.buffer[: a * (y1 - y0) * w].view(a, y1 - y0, w)
        d_offset[:, y0:y1].add_(grad.sum(-1, keepdim=True))
        # d_cols[a, k, x] += Σ_y rows[y, k]·dB[a, y, x], for the k these rows use (the others get nothing)
        k0, k1 = _nonzero_span(rows[y0:y1], w)
        weights = rows[y0:y1, k0:k1].t().to(grad.dtype)  # (k1 - k0, R)
        weights = weights.expand(a, weights.shape[0], weights.shape[1])
        target = d_cols[:, k0:k1]
        if target.is_contiguous():
            target.baddbmm_(weights, grad)
            return
        # into a dense buffer, then added: a batched product into a strided view took three times as long
        if self.cols_buffer is None or self.cols_buffer.numel() < target.numel():
            self.cols_buffer = torch.empty(target.numel(), **self.kw)
        target.add_(torch.bmm(weights, grad, out=self.cols_buffer[: target.numel()].view(target.shape)))


def _biases_for_backward(recipes: Tuple[Any, ...], tensors: Tuple[Optional[Tensor], ...],
                         dtype: torch.dtype) -> Tuple[Optional[Tensor], ...]:
    """The biases the forward pass saw, (B1, B2ᵀ, B1's cols and offset, B2's): kept ones as they are,
    rebuildable ones rebuilt (once per recipe: B1 and B2 come from one call)."""
    rebuilt: dict[int, Sequence[Optional[Tensor]]] = {}
    out = list(tensors)
    for j, recipe in enumerate(recipes):
        if recipe is not None:
            fn, index = recipe
            if id(fn) not in rebuilt:
                with torch.no_grad():
                    rebuilt[id(fn)] = fn()
            out[j] = rebuilt[id(fn)][index]
            if j < 2:  # whole biases: 4-D in the op's dtype, B2 agent-major as the forward pass used it
                out[j] = _as_4d(out[j], dtype)
                if j == 1:
                    out[j] = out[j].transpose(-1, -2)
    return tuple(out)


def agent_attention_fused(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    agents: Tensor,
    agent_bias: Optional[Tensor],
    query_bias: Optional[Tensor],
    scale: float,
    broadcast_scale: float,
    *,
    dwc_weight: Optional[Tensor] = None,
    dwc_bias: Optional[Tensor] = None,
    layout: Optional[Sequence[int]] = None,
    num_prefix_tokens: int = 0,
    proj_weight: Optional[Tensor] = None,
    proj_bias: Optional[Tensor] = None,
) -> Tensor:
    """Agent attention on head-split tensors, returned in token-major memory; optionally with the local
    term (depthwise conv on V) added and the output projection applied.

    Args:
        q: queries (B, H, N, d), any strides with a unit last stride (views of a qkv projection).
        k: keys (B, H, M, d), likewise.
        v: values (B, H, M, d), likewise.
        agents: agent tokens (B, H, n, d).
        agent_bias: B1 broadcastable to (B, H, n, M), or None; or a :class:`~agentlit.core.RowBias`
            (built by chunks of map rows, its gradient reduced into its factors).
        query_bias: B2 broadcastable to (B, H, N, n), or None; fastest as the transposed view of an
            agent-major (·, H, n, N) tensor (what the bias modules return); or a
            :class:`~agentlit.core.RowBias` of B2 agent-major (1, H, n, N), as B1.
        scale: s of the aggregation step.
        broadcast_scale: bs of the broadcast step.
        dwc_weight: (C, 1, k, …) depthwise conv on V's layout tokens, added to O (needs M == N), or None.
        dwc_bias: its bias (C,) or None.
        layout: the layout of the N - P tokens the conv runs over ([L], [h, w] or [t, h, w]).
        num_prefix_tokens: P tokens before the layout (not convolved).
        proj_weight: (C_out, C) output projection applied to O (+ local), or None.
        proj_bias: its bias (C_out,) or None.

    Returns:
        with ``proj_weight``: (B, N, C_out); else (B, N, H, d), O (+ local) token-major
        (``.transpose(1, 2)`` is the (B, H, N, d) result, ``.reshape(B, N, H·d)`` the merged heads,
        both without a copy).
    """
    if q.dtype not in (torch.float32, torch.float64):
        # half types: logits and softmaxes in float32 (bf16 rounds logits of order 1e3 to whole units)
        with torch.autocast("cpu", enabled=False):
            f = (lambda t: None if t is None else t.float())
            out = agent_attention_fused(
                q.float(), k.float(), v.float(), agents.float(), agent_bias, query_bias, scale, broadcast_scale,
                dwc_weight=f(dwc_weight), dwc_bias=f(dwc_bias), layout=layout, num_prefix_tokens=num_prefix_tokens,
                proj_weight=f(proj_weight), proj_bias=f(proj_bias))
        return out.to(q.dtype)
    recipes = (recipe_of(agent_bias), recipe_of(query_bias))
    b1, rows1, c1, o1 = _bias_inputs(agent_bias, q.dtype, transpose=False)
    b2t, rows2, c2, o2 = _bias_inputs(query_bias, q.dtype, transpose=True)
    if agents.stride(-1) != 1:
        agents = agents.contiguous()
    local = None if dwc_weight is None else _Local(layout if layout is not None else [k.shape[2]], num_prefix_tokens)
    inputs = (q, k, v, agents, b1, b2t, dwc_weight, dwc_bias, proj_weight, proj_bias, c1, o1, c2, o2)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs):
        recipes += tuple(recipe_of(t) for t in (c1, o1, c2, o2))
        return _AgentAttentionFunction.apply(*inputs, scale, broadcast_scale, recipes, (rows1, rows2), local)
    bias1 = agent_bias if isinstance(agent_bias, RowBias) else b1
    bias2 = query_bias if isinstance(query_bias, RowBias) else b2t
    return _forward_only(q, k, v, agents, bias1, bias2, scale, broadcast_scale, dwc_weight, dwc_bias, local,
                         proj_weight, proj_bias)


def _bias_inputs(bias: Optional[Bias], dtype: torch.dtype, transpose: bool
                 ) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """A bias as the autograd function's inputs: (whole 4-D, agent-major if ``transpose`` (B2), None, None,
    None), or (None, rows, cols, offset) of a :class:`RowBias` (agent-major already)."""
    if isinstance(bias, RowBias):
        rows, cols, offset = bias.factors
        return None, rows, cols, offset
    whole = _as_4d(bias, dtype)
    if whole is not None and transpose:
        whole = whole.transpose(-1, -2)
    return whole, None, None, None


def _forward_only(q: Tensor, k: Tensor, v: Tensor, agents: Tensor, b1: Optional[Bias], b2t: Optional[Bias], s: float,
                  bs: float, dwc_weight: Optional[Tensor], dwc_bias: Optional[Tensor], local: Optional[_Local],
                  proj_weight: Optional[Tensor], proj_bias: Optional[Tensor]) -> Tensor:
    """The op without autograd: O (+ local term) (+ projection), as the autograd function returns it."""
    into = None if local is None else local.first(v, dwc_weight, dwc_bias)
    out = _forward(q, k, v, agents, b1, b2t, s, bs, into)[0]
    B, N, H, d = out.shape
    if local is not None:
        local.add_to(out, v, dwc_weight, dwc_bias)
    return out if proj_weight is None else F.linear(out.view(B, N, H * d), proj_weight, proj_bias)
