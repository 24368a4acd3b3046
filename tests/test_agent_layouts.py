"""AgentAttention on every token layout × option against a naive reference written from the formulas.

Layouts: a 1-D sequence, a 2-D map and a 3-D volume (each at a size other than the one the biases
were laid out for); options: prefix tokens, learned agents, a key padding mask (with agents whose
pool region is all padding), cross-attention (with and without padding). The reference builds every
bias term by interpolating the parameters directly, pools agents region by region with explicit
masked means, and evaluates both softmaxes on full logit matrices per batch element.
"""
from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from agentlit.core import AgentAttention, agent_attention_tokens

# name: (feat_size the biases are laid out for, size the forward sees, pooled agent grid)
LAYOUTS = {
    "1d": ((8,), (13,), (4,)),
    "2d": ((4, 4), (6, 6), (3, 3)),
    "3d": ((2, 4, 4), (4, 3, 5), (2, 2, 2)),
}
OPTIONS = ["plain", "prefix", "learned", "padding", "prefix-padding", "cross", "cross-padding"]
C, H = 24, 3


def _interp(t: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """(A, *template) → (A, *size) by (bi)linear interpolation, align_corners=False."""
    mode = {1: "linear", 2: "bilinear"}[len(size)]
    return F.interpolate(t.unsqueeze(1), size=size, mode=mode, align_corners=False).squeeze(1)


def naive_biases(m: AgentAttention, size: tuple[int, ...]):
    """B1 (H, n, P + N) or None, and B2 (H, P + N, n), written term by term."""
    n, P, rank = m.agent_num, m.num_prefix_tokens, len(size)

    def side(name: str):  # an / na → (H, n, N)
        tmpl = getattr(m, f"{name}_bias")  # (H, n, 7[, 7])
        if rank == 1:
            (L,) = size
            term = m.al_bias[0] if name == "an" else m.la_bias[0].transpose(-1, -2)  # (H, n, L0)
            return _interp(tmpl.reshape(H * n, -1), (L,)).reshape(H, n, L) + _interp(term.reshape(H * n, -1), (L,)).reshape(H, n, L)
        h, w = size[-2:]
        plane = _interp(tmpl.reshape(H * n, 7, 7), (h, w)).reshape(H, n, h, w)
        if name == "an":
            rows, cols = m.ah_bias[0, :, :, :, 0], m.aw_bias[0, :, :, 0, :]  # (H, n, h0), (H, n, w0)
        else:
            rows, cols = m.ha_bias[0, :, :, 0, :].transpose(1, 2), m.wa_bias[0, :, 0, :, :].transpose(1, 2)
        rows = _interp(rows.reshape(H * n, -1), (h,)).reshape(H, n, h, 1)
        cols = _interp(cols.reshape(H * n, -1), (w,)).reshape(H, n, 1, w)
        plane = plane + rows + cols  # (H, n, h, w)
        if rank == 2:
            return plane.reshape(H, n, h * w)
        t = size[0]
        depth = m.ad_bias[0] if name == "an" else m.da_bias[0].transpose(-1, -2)  # (H, n, t0)
        depth = _interp(depth.reshape(H * n, -1), (t,)).reshape(H, n, t, 1, 1)
        return (plane.unsqueeze(2) + depth).reshape(H, n, t * h * w)

    b1 = None
    if hasattr(m, "an_bias"):
        b1 = side("an")
        if P:
            b1 = torch.cat([m.ac_bias[0], b1], dim=-1)
    b2 = side("na").transpose(-1, -2)
    if P:
        b2 = torch.cat([m.ca_bias[0], b2], dim=-2)
    return b1, b2


def _regions(size, grid):
    """The adaptive-pooling region of every agent cell, as index tuples into the layout."""
    axes = [[range(i * s // g, -(-(i + 1) * s // g)) for i in range(g)] for s, g in zip(size, grid)]
    return [list(itertools.product(*cell)) for cell in itertools.product(*axes)]


def naive_layer(m: AgentAttention, x, size, key_padding_mask=None, context=None, query_padding_mask=None):
    """The layer's output from the formulas; padded positions of x / context are never read."""
    B, L, _ = x.shape
    P, d = m.num_prefix_tokens, C // H
    if context is None:
        q, k, v = (x @ m.qkv.weight.T + m.qkv.bias).split(C, dim=-1)
        query_padding_mask = key_padding_mask
    else:
        q = x @ m.q.weight.T + m.q.bias
        k, v = (context @ m.kv.weight.T + m.kv.bias).split(C, dim=-1)
    b1, b2 = naive_biases(m, size)
    out = torch.zeros(B, L, C, dtype=x.dtype)
    for b in range(B):
        key_real = [j for j in range(k.shape[1]) if key_padding_mask is None or not key_padding_mask[b, j]]
        qreal = torch.ones(L, dtype=torch.bool) if query_padding_mask is None else ~query_padding_mask[b]
        if m.agent_tokens is not None:
            agents, live = m.agent_tokens, list(range(m.agent_num))
        else:
            grid_q = q[b, P:].reshape(*size, C)
            real = qreal[P:].reshape(size)
            agents, live = [], []
            for a, cells in enumerate(_regions(size, m.agent_grid)):
                picked = [grid_q[c] for c in cells if real[c]]
                agents.append(torch.stack(picked).mean(0) if picked else torch.zeros(C, dtype=x.dtype))
                if picked:
                    live.append(a)
            agents = torch.stack(agents)  # (n, C)
        for hh in range(H):
            sl = slice(hh * d, (hh + 1) * d)
            A, Q, K, V = agents[:, sl], q[b, :, sl], k[b, key_real, sl], v[b, key_real, sl]
            s1 = A @ K.T * d**-0.5 + (b1[hh][:, key_real] if b1 is not None else 0)  # (n, M_real)
            va = torch.softmax(s1, -1) @ V  # (n, d)
            s2 = Q @ A[live].T * d**-0.5 + b2[hh][:, live]  # (L, n_live)
            out[b, :, sl] = torch.softmax(s2, -1) @ va[live]
    if m.dwc is not None:
        vm = v[:, P:]
        if key_padding_mask is not None:
            vm = vm.masked_fill(key_padding_mask[:, P:, None], 0.0)
        vm = vm.transpose(1, 2).reshape(B, C, *size)
        conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[len(size)]
        local = conv(vm, m.dwc.weight, m.dwc.bias, padding=1, groups=C).flatten(2).transpose(1, 2)
        out[:, P:] += local
    return out @ m.proj.weight.T + m.proj.bias


def _padding(option: str, B: int, P: int, size) -> torch.Tensor | None:
    """Batch element 0 unpadded; element 1 padded at the end of the layout, far enough that some agents
    pool nothing but padding (the last region along the first axis)."""
    if "padding" not in option:
        return None
    N = math.prod(size)
    mask = torch.zeros(B, P + N, dtype=torch.bool)
    lead = size[0]
    cut = lead - max(1, lead // 3) if len(size) > 1 else lead - 4
    mask[1, P:] = (torch.arange(N) // (N // lead)) >= cut if len(size) > 1 else torch.arange(N) >= cut
    return mask


def _build(layout: str, option: str, dtype: torch.dtype):
    feat, size, grid = LAYOUTS[layout]
    P = 1 if "prefix" in option else 0
    kw = dict(feat_size=feat, num_prefix_tokens=P)
    if option == "learned":
        kw.update(agents="learned", agent_num=5)
    else:
        kw.update(agent_num=grid)
    if "cross" in option:
        kw.update(context_dim=20)
    torch.manual_seed(0)
    m = AgentAttention(C, H, **kw).to(dtype).eval()
    with torch.no_grad():  # unit-scale biases and conv so a misplaced term shows
        for p in m.bias_parameters():
            p.normal_()
        if m.dwc is not None:
            m.dwc.weight.normal_()
    return m, size, P


def _inputs(m, size, P, option, dtype, B=2):
    x = torch.randn(B, P + math.prod(size), C, dtype=dtype)
    ctx = torch.randn(B, 7, 20, dtype=dtype) if "cross" in option else None
    kpm, qpm = _padding(option, B, P, size), None
    if ctx is not None and kpm is not None:
        qpm, kpm = kpm, torch.tensor([[False] * 7, [False] * 4 + [True] * 3])
    return x, ctx, kpm, qpm


@pytest.mark.parametrize("option", OPTIONS)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)], ids=["fp64", "fp32"])
def test_layer_matches_naive_reference(layout, option, dtype, tol):
    m, size, P = _build(layout, option, dtype)
    x, ctx, kpm, qpm = _inputs(m, size, P, option, dtype)
    out = m(x, feat_size=size, key_padding_mask=kpm, context=ctx, query_padding_mask=qpm)
    ref = naive_layer(m, x, size, key_padding_mask=kpm, context=ctx, query_padding_mask=qpm)
    real = torch.ones(x.shape[:2], dtype=torch.bool) if (qpm if ctx is not None else kpm) is None else ~(qpm if ctx is not None else kpm)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[real], ref[real], rtol=tol, atol=tol)


@pytest.mark.parametrize("option", ["padding", "prefix-padding", "cross-padding"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_garbage_in_padded_positions_changes_no_real_output(layout, option):
    m, size, P = _build(layout, option, torch.float32)
    x, ctx, kpm, qpm = _inputs(m, size, P, option, torch.float32)
    out = m(x, feat_size=size, key_padding_mask=kpm, context=ctx, query_padding_mask=qpm)
    x_pad = qpm if ctx is not None else kpm
    x2 = x.masked_fill(x_pad[..., None], 0.0) + x_pad[..., None] * 1e4 * torch.randn_like(x)
    ctx2 = None if ctx is None else ctx.masked_fill(kpm[..., None], 0.0) + kpm[..., None] * 1e4 * torch.randn_like(ctx)
    out2 = m(x2, feat_size=size, key_padding_mask=kpm, context=ctx2, query_padding_mask=qpm)
    assert not torch.equal(x, x2)
    torch.testing.assert_close(out2[~x_pad], out[~x_pad], rtol=0, atol=1e-6)
    # NaN / inf in padded positions do not reach real outputs either
    x3 = x.masked_fill(x_pad[..., None], float("nan"))
    ctx3 = None if ctx is None else ctx.masked_fill(kpm[..., None], float("inf"))
    out3 = m(x3, feat_size=size, key_padding_mask=kpm, context=ctx3, query_padding_mask=qpm)
    torch.testing.assert_close(out3[~x_pad], out[~x_pad], rtol=0, atol=1e-6)


def test_all_padded_sequence_stays_finite_in_forward_and_backward():
    m = AgentAttention(C, H, feat_size=(8,), agent_num=4).train()
    x = torch.randn(2, 10, C, requires_grad=True)
    mask = torch.zeros(2, 10, dtype=torch.bool)
    mask[1] = True  # nothing real in the second sequence
    out = m(x, key_padding_mask=mask)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters())


@pytest.mark.parametrize("layout,option", [("1d", "prefix-padding"), ("2d", "learned"), ("3d", "cross-padding")])
def test_gradcheck_small_layer(layout, option):
    """Gradients of the layer (input and every parameter) through the fused path, in float64."""
    m, size, P = _build(layout, option, torch.float64)
    x, ctx, kpm, qpm = _inputs(m, size, P, option, torch.float64, B=2)
    x.requires_grad_()
    inputs = [x] + ([ctx.requires_grad_()] if ctx is not None else [])

    def f(*args):
        return m(args[0], feat_size=size, key_padding_mask=kpm, context=args[1] if len(args) > 1 else None,
                 query_padding_mask=qpm)

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-5, fast_mode=True)
    # parameter gradients agree with those of the naive reference
    real = ~(qpm if ctx is not None else kpm) if (qpm if ctx is not None else kpm) is not None else torch.ones(x.shape[:2], dtype=torch.bool)
    w = torch.randn(x.shape, dtype=torch.float64)
    params = [p for p in m.parameters()]
    g = torch.autograd.grad((f(*inputs) * w)[real].sum(), params)
    r = torch.autograd.grad((naive_layer(m, x, size, kpm, ctx, qpm) * w)[real].sum(), params)
    for name_p, a, b in zip([n for n, _ in m.named_parameters()], g, r):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10, msg=name_p)


def test_sequence_of_any_length_and_learned_agents_without_layout_size():
    m = AgentAttention(C, H, feat_size=(16,), agent_num=8).eval()
    for L in (5, 16, 320):  # the release's square reshape broke at 320 tokens
        x = torch.randn(1, L, C)
        out = m(x)
        assert out.shape == x.shape
        torch.testing.assert_close(out, naive_layer(m, x, (L,)), rtol=1e-5, atol=1e-5)


def test_3d_layer_loads_2d_biases():
    """The (h, w) parameters of a 3-D layer are the 2-D layer's: a map checkpoint inflates to video."""
    src = AgentAttention(C, H, feat_size=(4, 4), agent_num=(2, 2))
    dst = AgentAttention(C, H, feat_size=(3, 4, 4), agent_num=(1, 2, 2), dwc_kernel=0)
    sd = {k: v for k, v in src.state_dict().items() if not k.startswith("dwc")}
    missing, unexpected = dst.load_state_dict(sd, strict=False)
    assert sorted(missing) == ["ad_bias", "da_bias"] and not unexpected


def test_names_and_shapes_per_layout():
    names = lambda m: {k: tuple(v.shape) for k, v in m.state_dict().items() if k.endswith("_bias") and "." not in k}  # noqa: E731
    assert names(AgentAttention(C, H, feat_size=(9,), agent_num=4)) == {
        "an_bias": (H, 4, 7), "na_bias": (H, 4, 7), "al_bias": (1, H, 4, 9), "la_bias": (1, H, 9, 4)}
    two = names(AgentAttention(C, H, feat_size=(5, 6), agent_num=4, num_prefix_tokens=1))
    assert two == {"an_bias": (H, 4, 7, 7), "na_bias": (H, 4, 7, 7), "ah_bias": (1, H, 4, 5, 1),
                   "aw_bias": (1, H, 4, 1, 6), "ha_bias": (1, H, 5, 1, 4), "wa_bias": (1, H, 1, 6, 4),
                   "ac_bias": (1, H, 4, 1), "ca_bias": (1, H, 1, 4)}
    three = names(AgentAttention(C, H, feat_size=(2, 5, 6), agent_num=8))
    assert three["ad_bias"] == (1, H, 8, 2) and three["da_bias"] == (1, H, 2, 8) and three["ah_bias"] == (1, H, 8, 5, 1)
    cross = names(AgentAttention(C, H, feat_size=(5, 6), agent_num=4, context_dim=10))
    assert set(cross) == {"na_bias", "ha_bias", "wa_bias"}
    assert not names(AgentAttention(C, H, feat_size=(9,), agent_num=4, position_bias=False))


def test_layer_errors_name_the_bad_value():
    m = AgentAttention(C, H, feat_size=(8,), agent_num=4)
    x = torch.randn(2, 8, C)
    with pytest.raises(ValueError, match="attn_mask or is_causal"):
        m(x, is_causal=True)
    with pytest.raises(ValueError, match="bool tensor of shape"):
        m(x, key_padding_mask=torch.zeros(2, 8))
    with pytest.raises(ValueError, match="build it with context_dim"):
        m(x, context=torch.randn(2, 3, C))
    with pytest.raises(ValueError, match="has 2 sizes"):
        m(x, feat_size=(2, 4))
    cross = AgentAttention(C, H, feat_size=(8,), agent_num=4, context_dim=10)
    with pytest.raises(ValueError, match=r"needs context=\(B=2, M, 10\)"):
        cross(x)
    with pytest.raises(ValueError, match="learned agents need agent_num"):
        AgentAttention(C, H, agents="learned", agent_num=(2, 2))
    with pytest.raises(ValueError, match="'pooled' or 'learned'"):
        AgentAttention(C, H, agents="random")
    with pytest.raises(ValueError, match="not a cube"):
        AgentAttention(C, H, feat_size=(2, 4, 4), agent_num=9)
    with pytest.raises(ValueError, match="feat_size"):
        AgentAttention(C, H, feat_size=(2, 2, 2, 2))
    with pytest.raises(ValueError, match="local term"):
        q = torch.randn(1, 4, C)
        agent_attention_tokens(q, torch.randn(1, 5, C), torch.randn(1, 5, C), H, [4], [2],
                               dwc_weight=torch.randn(C, 1, 3))


@pytest.mark.parametrize("layout,option", [("1d", "learned"), ("3d", "prefix-padding"), ("2d", "cross-padding")])
def test_torchscript_matches_eager(layout, option):
    m, size, P = _build(layout, option, torch.float32)
    x, ctx, kpm, qpm = _inputs(m, size, P, option, torch.float32)
    scripted = torch.jit.script(m)
    kw = dict(key_padding_mask=kpm, context=ctx, query_padding_mask=qpm)
    torch.testing.assert_close(scripted(x, list(size), **kw), m(x, size, **kw))
