"""The agent-attention core against naive references written from the paper's formulas."""
from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from agentlit.core import (
    AgentAttention,
    adapt_agent_bias,
    agent_attention,
    agent_attention_reference,
    resize_agent_axis,
    resize_axis,
    to_grid,
)


def _rand(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


@pytest.mark.parametrize(
    "B,H,N,M,n,d",
    [(2, 3, 50, 50, 9, 16), (1, 4, 64, 37, 16, 8), (3, 2, 17, 101, 4, 32), (2, 1, 5, 5, 5, 4)],
)
def test_op_matches_naive_reference(B, H, N, M, n, d):
    q, k, v, a = _rand(B, H, N, d), _rand(B, H, M, d), _rand(B, H, M, d), _rand(B, H, n, d)
    out = agent_attention(q, k, v, a)
    assert out.shape == (B, H, N, d)
    torch.testing.assert_close(out, agent_attention_reference(q, k, v, a), rtol=1e-5, atol=1e-5)


def test_op_written_out_by_hand():
    """softmax(bs·Q Aᵀ + B2) · (softmax(s·A Kᵀ + B1) · V) with explicit loops over heads."""
    B, H, N, M, n, d = 2, 2, 12, 10, 3, 4
    q, k, v, a = _rand(B, H, N, d), _rand(B, H, M, d), _rand(B, H, M, d), _rand(B, H, n, d)
    b1, b2 = _rand(1, H, n, M), _rand(B, 1, N, n)
    s, bs = 0.37, 0.81
    out = agent_attention(q, k, v, a, agent_bias=b1, query_bias=b2, scale=s, broadcast_scale=bs)
    for bi in range(B):
        for h in range(H):
            s1 = torch.softmax(s * a[bi, h] @ k[bi, h].T + b1[0, h], dim=-1)  # (n, M)
            s2 = torch.softmax(bs * q[bi, h] @ a[bi, h].T + b2[bi, 0], dim=-1)  # (N, n)
            torch.testing.assert_close(out[bi, h], s2 @ (s1 @ v[bi, h]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "agent_bias_shape,query_bias_shape",
    [((1, 1, 1, 30), (1, 1, 20, 1)), ((2, 3, 6, 30), (2, 3, 20, 6)), ((6, 30), (20, 6)), ((3, 1, 30), (1, 20, 6))],
)
def test_broadcast_biases(agent_bias_shape, query_bias_shape):
    q, k, v, a = _rand(2, 3, 20, 8), _rand(2, 3, 30, 8), _rand(2, 3, 30, 8), _rand(2, 3, 6, 8)
    b1, b2 = _rand(*agent_bias_shape), _rand(*query_bias_shape)
    torch.testing.assert_close(
        agent_attention(q, k, v, a, agent_bias=b1, query_bias=b2),
        agent_attention_reference(q, k, v, a, agent_bias=b1, query_bias=b2),
        rtol=1e-5, atol=1e-5,
    )


def test_default_scales():
    q, k, v, a = _rand(1, 2, 9, 16), _rand(1, 2, 9, 16), _rand(1, 2, 9, 16), _rand(1, 2, 4, 16)
    torch.testing.assert_close(agent_attention(q, k, v, a), agent_attention(q, k, v, a, scale=0.25, broadcast_scale=0.25))
    # a different broadcast scale must change the result (AgentSD's sharper second softmax)
    assert not torch.allclose(agent_attention(q, k, v, a), agent_attention(q, k, v, a, broadcast_scale=0.25**0.3))


def test_gradcheck_float64():
    dt = torch.float64
    q, k, v, a = (_rand(1, 2, 6, 4, dtype=dt), _rand(1, 2, 5, 4, dtype=dt), _rand(1, 2, 5, 4, dtype=dt),
                  _rand(1, 2, 3, 4, dtype=dt))
    b1, b2 = _rand(1, 2, 3, 5, dtype=dt), _rand(1, 2, 6, 3, dtype=dt)
    inputs = [t.requires_grad_() for t in (q, k, v, a, b1, b2)]
    assert torch.autograd.gradcheck(
        lambda q, k, v, a, b1, b2: agent_attention(q, k, v, a, agent_bias=b1, query_bias=b2), inputs
    )
    # and the gradients agree with those of the naive formula
    out = agent_attention(*inputs[:4], agent_bias=b1, query_bias=b2).sum()
    ref = agent_attention_reference(*inputs[:4], agent_bias=b1, query_bias=b2).sum()
    for g, r in zip(torch.autograd.grad(out, inputs), torch.autograd.grad(ref, inputs)):
        torch.testing.assert_close(g, r)


def test_equivalent_to_generalised_linear_attention():
    """docs/reference.md §1 (item 7): O = φ_q(Q) (φ_k(K)ᵀ V) with φ_q(Q) = σ(s·Q Aᵀ), φ_k(K) = σ(s·A Kᵀ)ᵀ."""
    B, H, N, M, n, d = 2, 2, 40, 40, 5, 8
    s = d**-0.5
    q, k, v, a = _rand(B, H, N, d), _rand(B, H, M, d), _rand(B, H, M, d), _rand(B, H, n, d)
    phi_q = torch.softmax(s * q @ a.transpose(-1, -2), dim=-1)  # (B, H, N, n)
    phi_k = torch.softmax(s * a @ k.transpose(-1, -2), dim=-1).transpose(-1, -2)  # (B, H, M, n)
    linear = phi_q @ (phi_k.transpose(-1, -2) @ v)  # linear-attention order: O(N·n·d)
    out = agent_attention(q, k, v, a)
    torch.testing.assert_close(out, linear, rtol=1e-5, atol=1e-5)
    # The implied N×M attention map is a proper (row-stochastic) attention of rank ≤ n.
    attn = phi_q @ phi_k.transpose(-1, -2)
    torch.testing.assert_close(attn.sum(-1), torch.ones(B, H, N))
    assert torch.linalg.matrix_rank((phi_q[0, 0].double() @ phi_k[0, 0].double().T)).item() <= n
    torch.testing.assert_close(out, attn @ v, rtol=1e-5, atol=1e-5)


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("with_bias", [False, True])
def test_never_materialises_token_by_token_matrix(with_bias):
    B, H, N, n, d = 1, 2, 1024, 16, 8
    q, k, v, a = _rand(B, H, N, d), _rand(B, H, N, d), _rand(B, H, N, d), _rand(B, H, n, d)
    kw = dict(agent_bias=_rand(1, H, n, N), query_bias=_rand(1, H, N, n)) if with_bias else {}
    with _LargestTensor() as probe:
        agent_attention(q, k, v, a, **kw)
    assert probe.largest <= B * H * N * max(n, d), probe.largest  # (B, H, N, n) at most, never N×N
    with _LargestTensor() as probe:
        agent_attention_reference(q, k, v, a, **kw)
    assert probe.largest < B * H * N * N  # sanity: the probe sees intermediates


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match="head dim"):
        agent_attention(_rand(1, 1, 4, 8), _rand(1, 1, 4, 4), _rand(1, 1, 4, 4), _rand(1, 1, 2, 8))
    with pytest.raises(ValueError, match="4-D"):
        agent_attention(_rand(4, 8), _rand(1, 1, 4, 8), _rand(1, 1, 4, 8), _rand(1, 1, 2, 8))


# ---------------------------------------------------------------------------------------------
# The layer, against a naive re-statement of docs/reference.md §1 (official layout, einsum + softmax)
# ---------------------------------------------------------------------------------------------
def naive_biases(m: AgentAttention, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """B1 (H, n, P + h·w) and B2 (H, P + h·w, n), built term by term from the bias parameters."""
    H, P = m.num_heads, m.num_prefix_tokens
    n = m.agent_grid[0] * m.agent_grid[1]
    an = F.interpolate(m.an_bias, size=(h, w), mode="bilinear", align_corners=False).reshape(H, n, h * w)
    na = F.interpolate(m.na_bias, size=(h, w), mode="bilinear", align_corners=False).reshape(H, n, h * w)
    ah = resize_axis(m.ah_bias, h, 3)[0, :, :, :, 0]  # (H, n, h)
    aw = resize_axis(m.aw_bias, w, 4)[0, :, :, 0, :]  # (H, n, w)
    ha = resize_axis(m.ha_bias, h, 2)[0, :, :, 0, :]  # (H, h, n)
    wa = resize_axis(m.wa_bias, w, 3)[0, :, 0, :, :]  # (H, w, n)
    b1 = torch.empty(H, n, P + h * w)
    b2 = torch.empty(H, P + h * w, n)
    for i in range(h):
        for j in range(w):
            t = P + i * w + j
            b1[:, :, t] = an[:, :, i * w + j] + ah[:, :, i] + aw[:, :, j]
            b2[:, t, :] = na[:, :, i * w + j] + ha[:, i, :] + wa[:, j, :]
    if P:
        b1[:, :, :P] = m.ac_bias[0]
        b2[:, :P, :] = m.ca_bias[0]
    return b1, b2


def naive_agent_layer(m: AgentAttention, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    B, L, C = x.shape
    H, d, P = m.num_heads, m.head_dim, m.num_prefix_tokens
    ph, pw = m.agent_grid
    n = ph * pw
    q, k, v = (x @ m.qkv.weight.T + m.qkv.bias).split(C, dim=-1)
    # agents: average pooling of the patch queries over the (ph, pw) cells
    grid = q[:, P:].reshape(B, h, w, C)
    agents = torch.stack(
        [grid[:, (i * h) // ph: -(-(i + 1) * h // ph), (j * w) // pw: -(-(j + 1) * w // pw)].mean((1, 2))
         for i in range(ph) for j in range(pw)], dim=1)  # (B, n, C)
    split = lambda t: t.reshape(B, -1, H, d).permute(0, 2, 1, 3)  # noqa: E731
    q, k, v, agents = map(split, (q, k, v, agents))
    b1, b2 = naive_biases(m, h, w)
    s = d**-0.5
    agent_v = torch.softmax(s * agents @ k.transpose(-1, -2) + b1, -1) @ v  # (B, H, n, d)
    out = torch.softmax(s * q @ agents.transpose(-1, -2) + b2, -1) @ agent_v  # (B, H, L, d)
    out = out.permute(0, 2, 1, 3).reshape(B, L, C)
    v_map = v[:, :, P:].permute(0, 2, 1, 3).reshape(B, h, w, C).permute(0, 3, 1, 2)
    local = F.conv2d(v_map, m.dwc.weight, m.dwc.bias, padding=1, groups=C).flatten(2).transpose(1, 2)
    out = torch.cat([out[:, :P], out[:, P:] + local], dim=1)
    return out @ m.proj.weight.T + m.proj.bias


@pytest.mark.parametrize(
    "feat_size,run_size,agents,prefix",
    [((8, 8), (8, 8), 16, 1), ((8, 8), (12, 12), 16, 1), ((6, 10), (6, 10), (2, 3), 0), ((8, 8), (5, 9), 9, 2)],
)
def test_layer_matches_naive_reference(feat_size, run_size, agents, prefix):
    torch.manual_seed(1)
    m = AgentAttention(48, 4, feat_size=feat_size, agent_num=agents, num_prefix_tokens=prefix).eval()
    h, w = run_size
    x = torch.randn(2, prefix + h * w, 48)
    out = m(x, feat_size=run_size)
    assert out.shape == x.shape
    torch.testing.assert_close(out, naive_agent_layer(m, x, h, w), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("feat_size,run_size,prefix", [((8, 8), (8, 8), 0), ((8, 8), (13, 20), 1), ((10, 6), (3, 5), 0)])
def test_position_biases_match_term_by_term(feat_size, run_size, prefix):
    # unit-scale parameters (not the 0.02 init) so any misplaced term shows; upsampled and downsampled maps
    torch.manual_seed(2)
    m = AgentAttention(24, 3, feat_size=feat_size, agent_num=(2, 3), num_prefix_tokens=prefix)
    with torch.no_grad():
        for prm in m.bias_parameters():
            prm.normal_()
    b1, b2 = m.position_biases(list(run_size))
    e1, e2 = naive_biases(m, *run_size)
    torch.testing.assert_close(b1[0], e1, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b2[0], e2, rtol=1e-5, atol=1e-5)
    b1.sum().add(b2.square().sum()).backward()  # every template gets a gradient through the fused build
    assert all(prm.grad is not None and prm.grad.abs().sum() > 0 for prm in m.bias_parameters())


def test_one_head_layer_matches_naive_reference():
    # one head: the pooled agents are a transposed view (stride n along d), made contiguous for SDPA
    torch.manual_seed(3)
    m = AgentAttention(16, 1, feat_size=(6, 8), agent_num=(2, 2)).eval()
    with torch.no_grad():
        for prm in m.bias_parameters():
            prm.normal_()
    x = torch.randn(2, 48, 16)
    torch.testing.assert_close(m(x, feat_size=(6, 8)), naive_agent_layer(m, x, 6, 8), rtol=1e-4, atol=1e-5)


def test_layer_biases_matter_and_init():
    m = AgentAttention(32, 2, feat_size=4, agent_num=4, num_prefix_tokens=1)
    for name in ("an_bias", "na_bias", "ah_bias", "aw_bias", "ha_bias", "wa_bias", "ac_bias", "ca_bias"):
        p = getattr(m, name)
        # trunc_normal(std=0.02) as in the official code (truncated at ±2, i.e. effectively normal)
        assert 0.01 < p.std().item() < 0.03 and abs(p.mean().item()) < 0.01, name
    x = torch.randn(1, 17, 32)
    before = m(x)
    with torch.no_grad():
        m.an_bias.add_(3 * torch.randn_like(m.an_bias))
    assert not torch.allclose(before, m(x))


def test_layer_backward_and_dropout():
    m = AgentAttention(32, 2, feat_size=(4, 6), agent_num=(2, 2), attn_drop=0.5)
    x = torch.randn(3, 24, 32, requires_grad=True)
    m.train()
    y1, y2 = m(x), m(x)
    assert not torch.allclose(y1, y2)  # attention dropout active in training
    y1.sum().backward()
    assert x.grad is not None and all(p.grad is not None for p in m.parameters())
    m.eval()
    torch.testing.assert_close(m(x), m(x))


def test_layer_errors():
    with pytest.raises(ValueError, match="not a square"):
        AgentAttention(32, 2, agent_num=50)
    with pytest.raises(ValueError, match="divisible"):
        AgentAttention(30, 4)
    m = AgentAttention(32, 2, feat_size=4, agent_num=4)
    with pytest.raises(ValueError, match="expected 0 prefix"):
        m(torch.randn(1, 17, 32))
    with pytest.raises(ValueError, match="attn_mask"):
        m(torch.randn(1, 16, 32), attn_mask=torch.zeros(16, 16))


def test_to_grid():
    assert to_grid(49) == (7, 7) and to_grid((3, 5)) == (3, 5)
    with pytest.raises(ValueError, match="49 or 64"):
        to_grid(50)


def test_resize_helpers_are_identity_at_same_size_and_interpolate_linearly():
    t = torch.randn(1, 2, 9, 5, 1)
    assert resize_axis(t, 5, 3) is t
    ramp = torch.arange(4.0).reshape(1, 1, 4, 1)
    up = resize_axis(ramp, 8, 2).flatten()
    assert torch.all(up[1:] >= up[:-1])  # monotone, as a linear resample of a ramp must be
    g = torch.arange(9.0).reshape(1, 9)  # 3x3 agent grid along dim 1
    torch.testing.assert_close(resize_agent_axis(g, 1, (3, 3), (3, 3)), g)
    assert resize_agent_axis(g, 1, (3, 3), (4, 4)).shape == (1, 16)


def test_adapted_biases_load_into_other_grid_and_size():
    """A layer trained at 8x8 with 16 agents, moved to 12x10 with 3x3 agents."""
    src = AgentAttention(32, 2, feat_size=8, agent_num=16, num_prefix_tokens=1)
    dst = AgentAttention(32, 2, feat_size=(12, 10), agent_num=9, num_prefix_tokens=1)
    sd = {}
    for k, v in src.state_dict().items():
        sd[k] = adapt_agent_bias(k, v, agent_grid=(3, 3), feat_size=(12, 10)) if k.endswith("_bias") and "proj" not in k and "qkv" not in k and "dwc" not in k else v
    dst.load_state_dict(sd, strict=True)
    x = torch.randn(1, 1 + 120, 32)
    assert torch.isfinite(dst(x)).all()
    # a constant bias stays constant under resampling (interpolation is a weighted mean)
    c = torch.full((1, 2, 16, 8, 1), 0.5)
    torch.testing.assert_close(adapt_agent_bias("ah_bias", c, agent_grid=(3, 3), feat_size=(12, 10)), torch.full((1, 2, 9, 12, 1), 0.5))


def test_layer_under_low_precision_autocast():
    m = AgentAttention(32, 2, feat_size=4, agent_num=4, num_prefix_tokens=1)
    x = torch.randn(2, 17, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    torch.testing.assert_close(y.float(), m(x), rtol=0.05, atol=0.05)


def test_float16_large_logits_stay_finite():
    """Logits far beyond float16's range (65504): a plain fp16 computation overflows, ours does not."""
    torch.manual_seed(0)
    B, H, N, n, d = 1, 2, 64, 4, 64
    q, k, v = (torch.randn(B, H, N, d) * 60 for _ in range(3))
    a = q[:, :, :n] * 1.0
    ref = agent_attention_reference(q.double(), k.double(), v.double(), a.double()).float()
    naive_half = agent_attention_reference(q.half(), k.half(), v.half(), a.half())
    assert not torch.isfinite(naive_half).all()  # the overflow is real
    out = agent_attention(q.half(), k.half(), v.half(), a.half())
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=0.5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_layer_under_autocast_with_large_activations(dtype):
    m = AgentAttention(64, 2, feat_size=4, agent_num=4, num_prefix_tokens=1)
    with torch.no_grad():
        m.qkv.weight.mul_(40)  # logits of order 1e5
    x = torch.randn(2, 17, 64) * 4
    with torch.autocast("cpu", dtype=dtype):
        y = m(x)
    assert y.dtype == dtype and torch.isfinite(y).all()
    torch.testing.assert_close(y.float(), m(x), rtol=0.1, atol=0.1 * m(x).abs().max().item())


def test_importing_the_core_before_timm_keeps_the_registry_whole():
    """The core never imports timm: timm's arrival then registers the models and the FX leaves."""
    import subprocess
    import sys
    from pathlib import Path

    code = ("import agentlit.core, timm\n"
            "from timm.models import get_notrace_modules\n"
            "assert timm.is_model('agent_deit_tiny')\n"
            "assert agentlit.core.AgentAttention in get_notrace_modules()\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
