"""count_macs: matrix products, convolutions and SDPA attention, per module."""
import torch
import torch.nn.functional as F
from torch import nn

from agentlit.core import AgentAttention
from agentlit.utils import count_macs


class _Attn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, q, k, v):
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))


def test_linear_and_conv_macs():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Flatten(1), nn.Linear(4 * 5 * 5, 7))
    total, per = count_macs(model, torch.randn(2, 3, 5, 5))
    conv = 2 * 4 * 5 * 5 * 3 * 3 * 3  # B · C_out · H · W · C_in · k²
    lin = 2 * 100 * 7
    assert per["0"] == conv and per["2"] == lin and total == conv + lin == per[""]


def test_sdpa_is_counted_on_the_math_path():
    B, H, N, M, d = 2, 2, 6, 5, 4
    q, k, v = torch.randn(B, H, N, d), torch.randn(B, H, M, d), torch.randn(B, H, M, d)
    total, per = count_macs(_Attn(), q, k, v)
    attn = 2 * B * H * N * M * d  # QKᵀ and (softmax)V
    assert total == attn + B * N * 8 * 8 and per["proj"] == B * N * 64


def test_agent_attention_macs_follow_the_formula_and_mode_is_restored():
    C, H, h, w, n = 16, 2, 6, 6, 4
    layer = AgentAttention(C, H, feat_size=(h, w), agent_num=n).train()
    N = h * w
    total, per = count_macs(layer, torch.randn(1, N, C))
    expected = N * C * 3 * C + N * C * C  # qkv, proj
    expected += 2 * n * N * C + 2 * N * n * C  # aggregation (A Kᵀ, S1 V) and broadcast (Q Aᵀ, S2 V_A)
    expected += N * C * 9  # 3×3 depthwise conv on V (run by the core function from the layer's weights)
    # the output projection runs inside the core function (from the layer's weights), like the conv:
    # its MACs are the layer's own
    assert total == expected and per["qkv"] == N * C * 3 * C and per[""] == expected
    assert per.get("proj", 0) == 0 and per[""] - per["qkv"] == expected - N * C * 3 * C
    assert layer.training


class _Accumulate(nn.Module):
    """Products accumulated in place (the CPU op adds the broadcast step into the local term)."""

    def forward(self, a, b, c, d):
        acc = torch.zeros(a.shape[0], a.shape[1], b.shape[2]).baddbmm_(a, b)
        return acc, torch.zeros(c.shape[0], d.shape[1]).addmm_(c, d)


def test_in_place_products_count_as_their_out_of_place_forms():
    a, b, c, d = torch.randn(2, 3, 4), torch.randn(2, 4, 5), torch.randn(3, 6), torch.randn(6, 7)
    total, _ = count_macs(_Accumulate(), a, b, c, d)
    assert total == 2 * 3 * 4 * 5 + 3 * 6 * 7


class _ConstantWork(nn.Module):
    """Products of parameters / buffers / new tensors alone, one with the input, one with noise."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.randn(4, 6))
        self.register_buffer("b", torch.randn(6, 5))

    def forward(self, x):
        folded = (self.a @ self.b) @ torch.eye(5)  # the same for every input: folded away, not counted
        noise = torch.randn(x.shape[0], 4) @ self.a  # a fresh random draw: counted
        return x @ folded, noise


def test_work_on_parameters_and_buffers_alone_is_not_counted():
    model = _ConstantWork()
    total, per = count_macs(model, torch.randn(3, 4))
    assert total == per[""] == 3 * 4 * 5 + 3 * 4 * 6
    assert not any(hasattr(t, "_agentlit_constant") for t in (*model.parameters(), *model.buffers()))
