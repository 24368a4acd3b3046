"""The fused CPU agent-attention op (agentlit.core.fused) against the naive reference, forward and gradients."""
from __future__ import annotations

import pytest
import torch

from agentlit.core import AgentAttention, agent_attention_reference
from agentlit.core.fused import agent_attention_fused
from agentlit.core.recompute import RecomputingLinear, mark_recomputable

B, H, N, M, n, d = 2, 3, 13, 11, 4, 5


def _qkv(N: int = N, M: int = M, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, ...]:
    """q (B, H, N, d), k, v (B, H, M, d) as strided head views of packed projections, like a layer's."""
    q = torch.randn(B, N, H, d, dtype=dtype).transpose(1, 2)
    kv = torch.randn(B, M, 2, H, d, dtype=dtype)
    k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
    return q, k, v


def _leaves(*tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    return [None if t is None else t.detach().clone().requires_grad_() for t in tensors]


BIASES = {
    "none": (None, None),
    "shared": ((1, H, n, M), (1, H, N, n)),
    "per_batch": ((B, H, n, M), (B, H, N, n)),
    "broadcast_axes": ((B, 1, 1, M), (1, 1, N, 1)),
    "broadcast_tokens": ((1, H, n, 1), (B, 1, 1, n)),  # one bias column for every key / query
    "two_dims": ((n, M), (N, n)),
}


def _broadcast_path(path: str, monkeypatch) -> None:
    """Route the broadcast step: agent-major token tiles ("tiles", layers of few agents) or flash calls
    with a token-major bias ("flash", layers of many agents)."""
    from agentlit.core import fused

    monkeypatch.setattr(fused, "_FLASH_BROADCAST", {"tiles": 1 << 30, "flash": 1}[path])


@pytest.mark.parametrize("broadcast", ["tiles", "flash"])
@pytest.mark.parametrize("loop", ["batch", "heads"])
@pytest.mark.parametrize("biases", list(BIASES))
def test_forward_and_gradients_equal_the_naive_reference(biases, loop, broadcast, monkeypatch):
    """Both loop axes (the op loops over the heads of a layer with few heads, else over the batch), both
    broadcast paths."""
    from agentlit.core import fused

    _broadcast_path(broadcast, monkeypatch)
    monkeypatch.setattr(fused, "_HEAD_LOOP", 0 if loop == "batch" else 4)  # as for many heads / few heads
    assert fused._loop_axis(H) == {"batch": 0, "heads": 1}[loop] == fused._loop_axis(2)
    torch.manual_seed(0)
    q, k, v = _qkv()
    a = torch.randn(B, H, n, d, dtype=torch.float64)
    if loop == "heads":  # 2 batch elements, 3 heads -> 3 batch elements, 2 heads
        q, k, v, a = (t.reshape(3, 2, t.shape[2], d) for t in (q.contiguous(), k.contiguous(), v.contiguous(), a))
    shapes = BIASES[biases]
    if loop == "heads":  # per-batch / per-head bias shapes of the new layout
        shapes = tuple(None if s is None else _swap(s) for s in shapes)
    b1, b2 = (None if s is None else torch.randn(*s, dtype=torch.float64) for s in shapes)
    s, bs = 0.43, 0.77
    grad = torch.randn(*q.shape, dtype=torch.float64)

    ref_in = _leaves(q, k, v, a, b1, b2)
    ref = agent_attention_reference(*ref_in[:4], agent_bias=ref_in[4], query_bias=ref_in[5], scale=s, broadcast_scale=bs)
    ref.backward(grad)
    ours_in = _leaves(q, k, v, a, b1, b2)
    ours = agent_attention_fused(*ours_in, s, bs)  # (B, N, H, d)
    assert ours.shape == (q.shape[0], N, q.shape[1], d)
    ours.transpose(1, 2).backward(grad)

    torch.testing.assert_close(ours.transpose(1, 2), ref, rtol=0, atol=1e-10)
    for name, r, o in zip(("q", "k", "v", "agents", "agent_bias", "query_bias"), ref_in, ours_in):
        if r is not None:
            torch.testing.assert_close(o.grad, r.grad, rtol=0, atol=1e-10, msg=f"gradient of {name}")


def _swap(shape: tuple[int, ...]) -> tuple[int, ...]:
    """A bias shape for 3 batch elements x 2 heads instead of 2 x 3 (shared axes stay shared)."""
    if len(shape) < 4:
        return tuple(shape)
    b, h = shape[0], shape[1]
    return ({2: 3}.get(b, b), {3: 2}.get(h, h), *shape[2:])


def test_gradcheck():
    torch.manual_seed(1)
    q, k, v = _qkv(N=6, M=5)
    a = torch.randn(B, H, 2, d, dtype=torch.float64)
    b1, b2 = torch.randn(1, H, 2, 5, dtype=torch.float64), torch.randn(B, 1, 6, 2, dtype=torch.float64)
    inputs = tuple(_leaves(q, k, v, a, b1, b2))
    assert torch.autograd.gradcheck(lambda *t: agent_attention_fused(*t, 0.6, 0.9), inputs)


def test_float32_within_1e5_of_the_float64_reference():
    torch.manual_seed(2)
    q, k, v = _qkv(N=64, M=64, dtype=torch.float32)
    a = torch.randn(B, H, 9, d)
    b1, b2 = torch.randn(1, H, 9, 64), torch.randn(1, H, 64, 9)
    ref = agent_attention_reference(q.double(), k.double(), v.double(), a.double(), agent_bias=b1.double(),
                                    query_bias=b2.double())
    ours = agent_attention_fused(q, k, v, a, b1, b2, d**-0.5, d**-0.5).transpose(1, 2)
    torch.testing.assert_close(ours.double(), ref, rtol=0, atol=1e-5)


def test_rebuildable_biases_are_not_kept_and_give_the_same_gradients():
    """Biases marked rebuildable are freed after the forward pass and rebuilt, equal, in the backward pass."""
    torch.manual_seed(3)
    q, k, v = _qkv()
    a = torch.randn(B, H, n, d, dtype=torch.float64)
    t1, t2 = torch.randn(1, H, n, M, dtype=torch.float64), torch.randn(1, H, n, N, dtype=torch.float64)
    grad = torch.randn(B, N, H, d, dtype=torch.float64)
    calls = []

    def run(rebuild: bool) -> list[torch.Tensor]:
        p1, p2 = (t.clone().requires_grad_() for t in (t1, t2))
        leaves = _leaves(q, k, v, a)

        def build() -> tuple[torch.Tensor, torch.Tensor]:
            calls.append(rebuild)
            return p1 * 2.0, (p2 * 3.0).transpose(-1, -2)  # from parameters alone; B2 agent-major

        b1, b2 = build()
        if rebuild:
            mark_recomputable(build, b1, b2)
        kept_storages: set[int] = set()

        def pack(t: torch.Tensor) -> torch.Tensor:
            kept_storages.add(t.untyped_storage().data_ptr())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = agent_attention_fused(*leaves, b1, b2, 0.5, 0.5)
        kept = [b.untyped_storage().data_ptr() in kept_storages for b in (b1, b2)]
        assert kept == [not rebuild, not rebuild]  # kept for the backward pass only when not rebuildable
        out.backward(grad)
        return [t.grad for t in (*leaves, p1, p2)]

    kept, rebuilt = run(False), run(True)
    assert calls == [False, True, True]  # built once each, rebuilt once in the backward pass
    for g_kept, g_rebuilt in zip(kept, rebuilt):
        torch.testing.assert_close(g_rebuilt, g_kept, rtol=0, atol=0)


@pytest.mark.parametrize("prefix, by_rows", [(0, False), (1, False), (0, True)])
def test_a_training_layer_stores_no_attention_map_nor_bias(prefix, by_rows):
    """What a 2-D layer keeps for its backward pass: nothing of size (N × n) (maps or biases), nor the
    (n, 7, w) cols of biases built by map rows (RowBias, above the size limit)."""
    torch.manual_seed(4)
    layer = AgentAttention(24, 4, feat_size=(6, 6), agent_num=16, num_prefix_tokens=prefix)  # C=24 != n=16
    if by_rows:
        layer.bias_cache_elements = 0
        assert layer.builds_biases_by_rows([6, 6], prefix)
    x = torch.randn(2, prefix + 36, 24, requires_grad=True)
    saved: list[tuple[int, ...]] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = layer(x)
    tokens = prefix + 36
    maps = [s for s in saved if len(s) >= 2 and {s[-1], s[-2]} == {tokens, 16}]
    assert not maps, f"saved (N x n) tensors: {maps}"
    cols = [s for s in saved if s == (4 * 16, layer.an_bias.shape[2], 6)]
    assert not cols, f"saved RowBias cols: {cols}"
    out.square().sum().backward()  # and the backward pass runs on what was kept
    assert all(p.grad is not None for p in layer.parameters())


def test_half_inputs_are_computed_in_float32():
    torch.manual_seed(5)
    q, k, v = (t.bfloat16() * 30 for t in _qkv(N=32, M=32))  # logits of order 1e3
    a = q[:, :, :4] * 1.0
    ref = agent_attention_reference(q.double(), k.double(), v.double(), a.double())
    out = agent_attention_fused(q, k, v, a, None, None, d**-0.5, d**-0.5)
    assert out.dtype == torch.bfloat16
    # only the output is rounded to bfloat16 (8 bits): logits rounded to bfloat16 would be off by whole units
    torch.testing.assert_close(out.transpose(1, 2).double(), ref, rtol=2**-7, atol=1e-3)


def test_backward_inside_an_autocast_region_runs_in_float32():
    """A training step that calls backward inside ``torch.autocast`` (bf16): the op's backward stays in
    float32 like its forward, and its gradients match the float64 layer's to bf16 input rounding."""
    torch.manual_seed(9)
    layer = AgentAttention(16, 2, feat_size=(4, 4), agent_num=4, num_prefix_tokens=1).train()
    x = torch.randn(2, 17, 16)
    reference = AgentAttention(16, 2, feat_size=(4, 4), agent_num=4, num_prefix_tokens=1).double().train()
    reference.load_state_dict(layer.state_dict())
    reference(x.double()).square().mean().backward()
    with torch.autocast("cpu", torch.bfloat16):
        out = layer(x)
        out.float().square().mean().backward()
    assert out.dtype == torch.bfloat16
    for (name, p), r in zip(layer.named_parameters(), reference.parameters()):
        assert p.grad.dtype == torch.float32, name
        torch.testing.assert_close(p.grad.double(), r.grad, rtol=0.1, atol=0.02, msg=name)


def test_evaluation_reuses_biases_until_a_parameter_or_the_mode_changes():
    """In eval mode without autograd the (n × N) biases are built once per size, then reused; any change
    of a bias parameter (load_state_dict, an optimizer step) or of the mode rebuilds them."""
    torch.manual_seed(6)
    layer = AgentAttention(16, 2, feat_size=(4, 4), agent_num=4).eval()
    with torch.no_grad():
        first = layer.position_biases([4, 4])
        assert all(a is b for a, b in zip(layer.position_biases([4, 4]), first))  # reused
        assert layer.position_biases([6, 6])[0].shape[-1] == 36  # another size: built for it
        state = {k: v + 1.0 if k.endswith("_bias") else v for k, v in layer.state_dict().items()}
        layer.load_state_dict(state)
        after_load = layer.position_biases([4, 4])
    # every parameter moved by 1: a resized template by 1 (resize weights sum to 1), plus the two axis terms
    torch.testing.assert_close(after_load[0], first[0] + 3.0)
    torch.testing.assert_close(after_load[1], first[1] + 3.0)
    layer.train()
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    layer(torch.randn(2, 16, 16)).square().sum().backward()
    opt.step()
    layer.eval()
    with torch.no_grad():
        stepped = layer.position_biases([4, 4])
        fresh = AgentAttention(16, 2, feat_size=(4, 4), agent_num=4).eval()
        fresh.load_state_dict(layer.state_dict())
        torch.testing.assert_close(stepped[0], fresh.position_biases([4, 4])[0], rtol=0, atol=0)
        torch.testing.assert_close(stepped[1], fresh.position_biases([4, 4])[1], rtol=0, atol=0)
    built = layer.position_biases([4, 4])  # autograd recording: never from the cache
    assert built[0].requires_grad and built[0] is not stepped[0]


def test_evaluation_keeps_no_bias_larger_than_the_cache_limit():
    """Whole biases above ``bias_cache_elements`` are built again in every evaluation call, equal, and
    nothing of them is held between calls (at detection resolution they would hold gigabytes)."""
    from agentlit.core import AgentPositionBias

    torch.manual_seed(15)
    layer = AgentAttention(16, 2, feat_size=(4, 4), agent_num=4).eval()
    x = torch.randn(2, 16, 16)
    whole = 2 * 2 * 4 * 16  # B1 and B2: heads x agents x tokens each
    assert AgentPositionBias.bias_cache_elements >= whole  # a small layer keeps its biases (class default)
    with torch.no_grad():
        kept_out = layer(x)
        assert "_bias_cache" in layer.__dict__
        layer.bias_cache_elements = whole - 1  # one layer's limit, below its biases
        first = layer.position_biases([4, 4])
        assert "_bias_cache" not in layer.__dict__  # the larger pair is not kept, the old entry dropped
        again = layer.position_biases([4, 4])
        assert again[0] is not first[0]
        torch.testing.assert_close(again[0], first[0], rtol=0, atol=0)
        torch.testing.assert_close(layer(x), kept_out, rtol=0, atol=0)
        assert "_bias_cache" not in layer.__dict__


@pytest.mark.parametrize("broadcast", ["tiles", "flash"])
@pytest.mark.parametrize("heads", [2, 6])  # the op loops over heads (few), else over the batch
def test_evaluation_builds_large_biases_by_map_rows_with_the_same_result(heads, broadcast, monkeypatch):
    """Above the cache limit an evaluating layer hands its biases to the op factored (RowBias), which
    builds them by chunks of whole map rows (here 2, 2, 2 and 1 of a 7-row map) and merges the
    aggregation over the chunks by log-sum-exp: equal to the naive reference with the whole biases.
    B2 is built agent-major for the token tiles, token-major for the flash calls."""
    from agentlit.core import RowBias, functional

    _broadcast_path(broadcast, monkeypatch)
    torch.manual_seed(16)
    h, w, C = 7, 5, heads * 4
    layer = AgentAttention(C, heads, feat_size=(4, 4), agent_num=4).double().eval()
    for p in layer.bias_parameters():
        p.data.normal_()  # biases that matter
    x = torch.randn(2, h * w, C, dtype=torch.float64)
    layer.bias_cache_elements = 2 * heads * 4 * h * w - 1  # just below the whole pair
    monkeypatch.setattr(RowBias, "CHUNK", heads * 4 * 2 * w)  # two map rows per chunk
    monkeypatch.setattr(RowBias, "MIN_TOKENS", 0)
    drawn: list[tuple[int, int, bool]] = []
    chunks = RowBias.chunks

    def spy(self, dtype, token_major=False):
        for start, end, part in chunks(self, dtype, token_major):
            drawn.append((start, end, token_major))
            yield start, end, part

    monkeypatch.setattr(RowBias, "chunks", spy)
    with torch.no_grad():
        out = layer(x, (h, w))
        rows = [(0, 10), (10, 20), (20, 30), (30, 35)]
        flash = broadcast == "flash"
        assert drawn == [(*r, False) for r in rows] + [(*r, flash) for r in rows]  # B1 (aggregation), then B2
        b1, b2 = layer.position_biases([h, w])
        q, k, v = layer.qkv(x)
        agents, _ = functional.pool_agents(q, [h, w], [2, 2])
        heads_of = (lambda t: t.reshape(2, t.shape[1], heads, 4).transpose(1, 2))
        o = agent_attention_reference(heads_of(q), heads_of(k), heads_of(v), heads_of(agents),
                                      agent_bias=b1, query_bias=b2)
        local = functional.depthwise_local(v, [h, w], layer.dwc.weight, layer.dwc.bias)
        o = o.transpose(1, 2).reshape(2, h * w, C) + local
        torch.testing.assert_close(out, layer.proj(o), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("span", ["all", "used"])
def test_row_biases_are_the_whole_biases_by_rows(span, monkeypatch):
    """RowBias chunks, concatenated, are B1 and B2 (agent-major) as position_biases builds them; a layer
    takes them for an (h, w) map without prefix tokens above the size limit. "used": each chunk is built
    from only the template rows its map rows lie between (at these sizes only when forced)."""
    from agentlit.core import RowBias, fused

    if span == "used":
        monkeypatch.setattr(fused, "_SMALL_BMM", 0)
    torch.manual_seed(17)
    layer = AgentAttention(12, 3, feat_size=(4, 4), agent_num=9).double()
    for p in layer.bias_parameters():
        p.data.normal_()
    layer.bias_cache_elements = 0
    b1, b2 = layer.position_biases([6, 11])
    with torch.no_grad():
        r1, r2 = layer.position_bias_rows([6, 11])
        for rows, whole in ((r1, b1), (r2, b2.transpose(-1, -2))):
            assert rows.shape == whole.shape
            rows.CHUNK = 3 * 9 * 11 * 4  # four map rows, then two
            rows.MIN_TOKENS = 0
            parts = [(start, end, part.clone()) for start, end, part in rows.chunks(torch.float64)]
            assert [(s, e) for s, e, _ in parts] == [(0, 44), (44, 66)]
            torch.testing.assert_close(torch.cat([p for _, _, p in parts], -1), whole, rtol=0, atol=1e-12)
            torch.testing.assert_close(rows.dense(), whole, rtol=0, atol=1e-12)
            # token-major: the transposed chunks, each token's agents contiguous
            parts = [(start, end, part.clone()) for start, end, part in rows.chunks(torch.float64, token_major=True)]
            assert [(s, e) for s, e, _ in parts] == [(0, 44), (44, 66)]
            assert all(p.stride(-1) == 1 for _, _, p in parts)
            torch.testing.assert_close(torch.cat([p for _, _, p in parts], -2), whole.transpose(-1, -2),
                                       rtol=0, atol=1e-12)
    assert layer.builds_biases_by_rows([6, 11], 0)
    assert not layer.builds_biases_by_rows([6, 11], 1)  # prefix tokens: whole biases with their column
    assert not layer.builds_biases_by_rows([66], 0)
    layer.bias_cache_elements = 2 * 3 * 9 * 66
    assert not layer.builds_biases_by_rows([6, 11], 0)  # small enough to build whole (and keep)


def test_row_bias_chunks_cover_at_least_min_tokens():
    """A chunk holds as many whole map rows as CHUNK elements allow, but never fewer than cover MIN_TOKENS
    tokens (the flash kernel's large query blocks): 3 heads × 9 agents, an (8, 11) map."""
    from agentlit.core import RowBias

    layer = AgentAttention(12, 3, feat_size=(4, 4), agent_num=9).double()
    layer.bias_cache_elements = 0
    with torch.no_grad():
        rows, _ = layer.position_bias_rows([8, 11])
    per_row = 3 * 9 * 11
    spans = lambda: [(s, e) for s, e, _ in rows.chunks(torch.float64)]  # noqa: E731
    rows.CHUNK, rows.MIN_TOKENS = 3 * per_row, 0
    assert rows.rows_per_chunk() == 3 and spans() == [(0, 33), (33, 66), (66, 88)]
    rows.MIN_TOKENS = 34  # 33 tokens are too few: 4 rows (44 tokens)
    assert rows.rows_per_chunk() == 4 and spans() == [(0, 44), (44, 88)]
    rows.CHUNK = 5 * per_row  # the element budget wins where it gives more rows
    assert rows.rows_per_chunk() == 5
    rows.CHUNK, rows.MIN_TOKENS = 1, 0  # at least one row
    assert rows.rows_per_chunk() == 1 and len(spans()) == 8
    assert RowBias.MIN_TOKENS == 768


@pytest.mark.parametrize("span", ["all", "used"])
@pytest.mark.parametrize("broadcast", ["tiles", "flash"])
@pytest.mark.parametrize("heads", [2, 6])
def test_training_with_row_biases_gives_the_reference_gradients(heads, broadcast, span, monkeypatch):
    """A training layer above the size limit builds its biases by chunks of map rows in both passes and
    reduces each chunk's gradient into the bias factors: output and every gradient (input, projections,
    conv, every bias parameter) equal autograd through the naive reference with whole biases (fp64).
    "used": each chunk's build and reduction read only the template rows its map rows lie between."""
    from agentlit.core import RowBias, functional, fused

    _broadcast_path(broadcast, monkeypatch)
    if span == "used":
        monkeypatch.setattr(fused, "_SMALL_BMM", 0)
    torch.manual_seed(18)
    h, w, C = 8, 5, heads * 4  # 8 map rows from 7 template rows: two weights per map row
    layer = AgentAttention(C, heads, feat_size=(4, 4), agent_num=4).double()
    for p in layer.bias_parameters():
        p.data.normal_()
    x = torch.randn(2, h * w, C, dtype=torch.float64)
    weights = torch.randn(2, h * w, C, dtype=torch.float64)

    def gradients(out: torch.Tensor, inp: torch.Tensor) -> dict[str, torch.Tensor]:
        (out * weights).sum().backward()
        grads = {name: p.grad.clone() for name, p in layer.named_parameters()}
        grads["x"] = inp.grad.clone()
        layer.zero_grad()
        return grads

    x_ref = x.clone().requires_grad_()
    b1, b2 = layer.position_biases([h, w])
    q, k, v = layer.qkv(x_ref)
    agents, _ = functional.pool_agents(q, [h, w], [2, 2])
    heads_of = (lambda t: t.reshape(2, t.shape[1], heads, 4).transpose(1, 2))
    o = agent_attention_reference(heads_of(q), heads_of(k), heads_of(v), heads_of(agents), agent_bias=b1, query_bias=b2)
    o = o.transpose(1, 2).reshape(2, h * w, C) + functional.depthwise_local(v, [h, w], layer.dwc.weight, layer.dwc.bias)
    expected = layer.proj(o)
    expected_grads = gradients(expected, x_ref)

    layer.bias_cache_elements = 2 * heads * 4 * h * w - 1
    monkeypatch.setattr(RowBias, "CHUNK", heads * 4 * 3 * w)  # three map rows per chunk: 3, 3, 2
    monkeypatch.setattr(RowBias, "MIN_TOKENS", 0)
    built = []
    monkeypatch.setattr(layer, "position_biases", lambda size: built.append(size))  # whole biases: never
    x_rows = x.clone().requires_grad_()
    out = layer(x_rows, (h, w))
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    for name, grad in gradients(out, x_rows).items():
        torch.testing.assert_close(grad, expected_grads[name], rtol=1e-10, atol=1e-10, msg=name)
    assert not built


@pytest.mark.parametrize("rank", [2, 1])  # conv2d writes token-major memory from channels-last input, conv1d not
@pytest.mark.parametrize("broadcast", ["tiles", "flash"])
@pytest.mark.parametrize("prefix", [0, 2])
def test_local_term_and_projection_fold_in_with_exact_gradients(prefix, broadcast, rank, monkeypatch):
    """O + DWC(V) then the output projection, inside the op: equal to the composition of the naive
    reference, a depthwise conv and a linear layer, forward (with and without autograd) and every
    gradient (fp64). Without a prefix the broadcast step adds O into the conv's output."""
    _broadcast_path(broadcast, monkeypatch)
    _check_local_term_and_projection(prefix, rank)


def _check_local_term_and_projection(prefix: int, rank: int = 2) -> None:
    torch.manual_seed(7)
    h, w, C = 3, 4, H * d
    layout = [h, w] if rank == 2 else [h * w]
    T = prefix + h * w
    qkv = torch.randn(B, T, 3, H, d, dtype=torch.float64)
    a = torch.randn(B, H, n, d, dtype=torch.float64)
    b1, b2 = torch.randn(1, H, n, T, dtype=torch.float64), torch.randn(1, H, T, n, dtype=torch.float64)
    conv_w, conv_b = torch.randn(C, 1, *[3] * rank, dtype=torch.float64), torch.randn(C, dtype=torch.float64)
    proj_w, proj_b = torch.randn(7, C, dtype=torch.float64), torch.randn(7, dtype=torch.float64)
    grad = torch.randn(B, T, 7, dtype=torch.float64)

    def naive(qkv, a, b1, b2, conv_w, conv_b, proj_w, proj_b):
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))  # (B, H, T, d)
        o = agent_attention_reference(q, k, v, a, agent_bias=b1, query_bias=b2).transpose(1, 2).reshape(B, T, C)
        v_map = v.transpose(1, 2).reshape(B, T, C)[:, prefix:].transpose(1, 2).reshape(B, C, *layout)
        conv = torch.nn.functional.conv2d if rank == 2 else torch.nn.functional.conv1d
        local = conv(v_map, conv_w, conv_b, padding=1, groups=C).flatten(2).transpose(1, 2)
        o = torch.cat([o[:, :prefix], o[:, prefix:] + local], dim=1)
        return torch.nn.functional.linear(o, proj_w, proj_b)

    def fused(qkv, a, b1, b2, conv_w, conv_b, proj_w, proj_b):
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
        return agent_attention_fused(q, k, v, a, b1, b2, d**-0.5, d**-0.5, dwc_weight=conv_w, dwc_bias=conv_b,
                                     layout=layout, num_prefix_tokens=prefix, proj_weight=proj_w, proj_bias=proj_b)

    inputs = (qkv, a, b1, b2, conv_w, conv_b, proj_w, proj_b)
    ref_in, ours_in = _leaves(*inputs), _leaves(*inputs)
    ref, ours = naive(*ref_in), fused(*ours_in)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-10)
    with torch.no_grad():
        torch.testing.assert_close(fused(*inputs), ref, rtol=0, atol=1e-10)
    ref.backward(grad)
    ours.backward(grad)
    for name, r, o in zip(("qkv", "agents", "B1", "B2", "conv weight", "conv bias", "proj weight", "proj bias"),
                          ref_in, ours_in):
        torch.testing.assert_close(o.grad, r.grad, rtol=0, atol=1e-10, msg=f"gradient of {name}")


def test_a_training_layer_keeps_only_its_input_and_projection():
    """A 2-D layer with a class token keeps for its backward pass its input, the qkv projection (viewed as
    Q, K, V) and (n × d)-sized agent tensors: no attention output, no local term, no map copy."""
    torch.manual_seed(8)
    layer = AgentAttention(24, 4, feat_size=(6, 6), agent_num=16, num_prefix_tokens=1)
    x = torch.randn(2, 37, 24, requires_grad=True)
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = layer(x)
    params = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    activations = {ptr: size for ptr, size in storages.items() if ptr not in params}
    big = sorted(size for size in activations.values() if size >= x.numel() * 4)
    assert big == [x.numel() * 4, 3 * x.numel() * 4], big  # x (for the qkv weight) and the qkv projection
    out.sum().backward()


def _project_normed(norm: torch.nn.Module, x: torch.Tensor, project, mark: bool) -> tuple:  # noqa: ANN001
    """``project(norm(x))``, the norm's output marked for rebuilding when ``mark``, under a hook that
    records what autograd keeps: (x as a leaf, the projection's output, whether it kept norm(x))."""
    from agentlit.core.recompute import rebuild_norm_later

    xi = x.clone().requires_grad_()
    kept: set[int] = set()

    def pack(t: torch.Tensor) -> torch.Tensor:
        kept.add(t.untyped_storage().data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = norm(xi)
        if mark:
            rebuild_norm_later(norm, xi, y)
        out = project(y)
    return xi, out, y.untyped_storage().data_ptr() in kept


def test_a_marked_norm_output_is_rebuilt_not_kept_by_the_qkv_projection():
    """rebuild_norm_later + RecomputingLinear: the same output and gradients as norm → nn.Linear, and
    the projection keeps no copy of the norm's output (only the norm keeps its input)."""
    torch.manual_seed(9)
    norm, linear = torch.nn.LayerNorm(12), RecomputingLinear(12, 36)
    plain = torch.nn.Linear(12, 36)
    plain.load_state_dict(linear.state_dict())
    x = torch.randn(3, 5, 12)
    grad = torch.randn(3, 5, 36)

    def run(project: torch.nn.Module, mark: bool) -> tuple[torch.Tensor, list, bool]:
        xi, out, was_kept = _project_normed(norm, x, project, mark)
        norm.zero_grad()
        project.zero_grad()
        out.backward(grad)
        return out, [xi.grad, norm.weight.grad, project.weight.grad, project.bias.grad], was_kept

    out_ref, grads_ref, kept_ref = run(plain, mark=False)
    out, grads, kept = run(linear, mark=True)
    assert kept_ref and not kept
    torch.testing.assert_close(out, out_ref, rtol=0, atol=0)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("marked", [False, True])
def test_split_projection_equals_linear_then_chunk(marked):
    """SplitLinear: Q, K, V as separate dense tensors, equal to nn.Linear + chunk, forward and gradients;
    with a marked input it keeps no copy of it."""
    from agentlit.core.recompute import SplitLinear

    torch.manual_seed(10)
    norm, split = torch.nn.LayerNorm(8), SplitLinear(8, 24, chunks=3)
    plain = torch.nn.Linear(8, 24)
    plain.load_state_dict(split.state_dict())
    x = torch.randn(2, 5, 8)
    grads = [torch.randn(2, 5, 8) for _ in range(3)]

    def run(project, module: torch.nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor], bool]:  # noqa: ANN001
        xi, parts, was_kept = _project_normed(norm, x, project, marked)
        norm.zero_grad()
        torch.autograd.backward(parts[:2], grads[:2])  # V unused: a missing gradient is zero
        return list(parts), [xi.grad, norm.weight.grad, *(p.grad for p in module.parameters())], was_kept

    ref_parts, ref_grads, _ = run(lambda y: plain(y).chunk(3, -1), plain)
    parts, grads_, kept = run(split, split)
    assert all(p.is_contiguous() for p in parts) and kept is not marked
    for p, r in zip(parts, ref_parts):
        torch.testing.assert_close(p, r, rtol=0, atol=1e-6)
    for g, r in zip(grads_, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-6, atol=1e-6)


def test_split_projection_writes_dense_parts_without_autograd_when_asked():
    """Without autograd SplitLinear runs one wide GEMM (strided parts) unless asked for dense parts;
    both give the values of nn.Linear + chunk."""
    from agentlit.core.recompute import SplitLinear

    torch.manual_seed(11)
    split, x = SplitLinear(8, 24, chunks=3), torch.randn(2, 5, 8)
    with torch.no_grad():
        wide, dense = split(x), split(x, True)
        ref = torch.nn.functional.linear(x, split.weight, split.bias).chunk(3, -1)
    assert not any(p.is_contiguous() for p in wide) and all(p.is_contiguous() for p in dense)
    for w, d, r in zip(wide, dense, ref):
        torch.testing.assert_close(w, r, rtol=0, atol=0)
        torch.testing.assert_close(d, r, rtol=0, atol=1e-6)


@pytest.mark.parametrize("prefix", [0, 1])
def test_an_evaluating_layer_without_prefix_reads_its_maps_in_place(prefix, monkeypatch):
    """Evaluation: a layer with no prefix token asks its qkv projection for dense Q, K, V, so the depthwise
    conv reads V's map as a view (no copy); behind a class token the map is a copy either way and the
    one wide GEMM runs. The output is the same either way."""
    import agentlit.core.fused as fused

    torch.manual_seed(12)
    layer = AgentAttention(16, 2, feat_size=(4, 4), agent_num=4, num_prefix_tokens=prefix).eval()
    x = torch.randn(2, 16 + prefix, 16)
    in_place = []
    real = fused.channels_last_map

    def spy(tokens, layout):  # noqa: ANN001, ANN202
        in_place.append(tokens.reshape([tokens.shape[0]] + layout + [tokens.shape[2]]).is_contiguous())
        return real(tokens, layout)

    monkeypatch.setattr(fused, "channels_last_map", spy)
    with torch.no_grad():
        out = layer(x)
    assert in_place == [prefix == 0]
    with torch.no_grad():  # the same layer on wide (strided) parts
        q, k, v = torch.nn.functional.linear(x, layer.qkv.weight, layer.qkv.bias).chunk(3, -1)
        ref = layer.attend(q, k, v, [4, 4], None, None, False, project=True)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("biases", ["shared", "per_batch", "broadcast_axes", "broadcast_tokens"])
def test_token_tiles_give_the_same_result(biases, monkeypatch):
    """Large maps run tile by tile along the tokens (cache-sized logits); forced tiny tiles here, the
    forward pass and every gradient still equal the naive reference. A bias gradient is written by the
    first tile and slice that reach it and added to by the rest (no zero fill): shared biases are reached
    by every slice, one broadcast along the tokens by every tile."""
    import agentlit.core.fused as fused

    monkeypatch.setattr(fused, "_TILE", 8)
    monkeypatch.setattr(fused, "_MIN_TILE", 3)  # 13 queries / 11 keys in tiles of 3 or 4 tokens
    assert len(fused._tiles(N, 2)) > 2
    for loop in ("batch", "heads"):
        for broadcast in ("tiles", "flash"):  # the backward pass runs by tiles after either
            test_forward_and_gradients_equal_the_naive_reference(biases, loop, broadcast, monkeypatch)


@pytest.mark.parametrize("prefix", [0, 2])
def test_token_tiles_with_local_term_and_projection(prefix, monkeypatch):
    import agentlit.core.fused as fused

    monkeypatch.setattr(fused, "_TILE", 8)
    monkeypatch.setattr(fused, "_MIN_TILE", 3)
    _check_local_term_and_projection(prefix)


def test_a_layer_of_many_agents_broadcasts_by_flash_calls(monkeypatch):
    """From 64 agents the broadcast step is a flash call with B2 token-major (rows of n agents are long
    enough for it); output and every gradient equal autograd through the naive reference (fp64)."""
    from agentlit.core import fused, functional

    calls = []
    flash = fused._broadcast_flash
    monkeypatch.setattr(fused, "_broadcast_flash", lambda *args: calls.append(args[1].shape) or flash(*args))
    torch.manual_seed(19)
    C, heads, size = 8, 2, (10, 12)
    layer = AgentAttention(C, heads, feat_size=(8, 8), agent_num=64).double()
    for p in layer.bias_parameters():
        p.data.normal_()
    x = torch.randn(2, size[0] * size[1], C, dtype=torch.float64, requires_grad=True)
    out = layer(x, size)
    assert calls == [(2, heads, 64, C // heads)]
    grads = torch.autograd.grad(out.square().sum(), [x, *layer.parameters()])

    b1, b2 = layer.position_biases(list(size))
    q, k, v = layer.qkv(x)
    agents, _ = functional.pool_agents(q, list(size), [8, 8])
    heads_of = (lambda t: t.reshape(2, t.shape[1], heads, C // heads).transpose(1, 2))
    o = agent_attention_reference(heads_of(q), heads_of(k), heads_of(v), heads_of(agents), agent_bias=b1, query_bias=b2)
    o = o.transpose(1, 2).reshape(x.shape) + functional.depthwise_local(v, list(size), layer.dwc.weight, layer.dwc.bias)
    expected = layer.proj(o)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    for got, want in zip(grads, torch.autograd.grad(expected.square().sum(), [x, *layer.parameters()])):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("tiles", ["one", "tiny"])
def test_the_broadcast_step_keeps_each_tokens_log_sum_exp_for_the_backward_pass(tiles, monkeypatch):
    """When training, the agent-major tiles keep every token's log-sum-exp over the agents (what the flash
    calls keep from 64 agents on), so the backward pass rebuilds P2 as exp(logits − lse); without it
    (evaluation) nothing is kept. Both loop axes; O is the same either way."""
    import agentlit.core.fused as fused

    if tiles == "tiny":
        monkeypatch.setattr(fused, "_TILE", 8)
        monkeypatch.setattr(fused, "_MIN_TILE", 3)
    torch.manual_seed(23)
    B, n, d, M, Nq = 2, 5, 4, 11, 13
    for H in (2, 6):  # loops over heads, then over the batch
        q, k, v = (torch.randn(B, H, m, d, dtype=torch.float64) for m in (Nq, M, M))
        a = torch.randn(B, H, n, d, dtype=torch.float64)
        b1, b2t = torch.randn(1, H, n, M, dtype=torch.float64), torch.randn(B, H, n, Nq, dtype=torch.float64)
        out, _, _, lse2 = fused._forward(q, k, v, a, b1, b2t, 0.3, 0.7, keep_lse=True)
        logits = 0.7 * q @ a.transpose(-1, -2) + b2t.transpose(-1, -2)  # (B, H, N, n)
        torch.testing.assert_close(lse2, torch.logsumexp(logits, -1), rtol=1e-12, atol=1e-12)
        plain, _, _, none = fused._forward(q, k, v, a, b1, b2t, 0.3, 0.7)
        assert none is None
        torch.testing.assert_close(out, plain, rtol=1e-12, atol=1e-12)
        ref = agent_attention_reference(q, k, v, a, agent_bias=b1, query_bias=b2t.transpose(-1, -2), scale=0.3,
                                        broadcast_scale=0.7)
        torch.testing.assert_close(out.transpose(1, 2), ref, rtol=1e-10, atol=1e-10)
