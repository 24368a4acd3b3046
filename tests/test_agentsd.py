"""AgentSD for diffusers: token matching, the attention processor, patch/unpatch and the schedule."""
import math

import pytest
import torch

import agentlit.diffusion.patch as patch_mod
from agentlit.core import agent_attention_reference
from agentlit.core import functional as core_functional
from agentlit.diffusion import (
    apply_patch,
    bipartite_soft_matching_random2d,
    build_tiny_pipeline,
    get_state,
    remove_patch,
)


# ----------------------------------------------------------------------------- token matching
def _naive_merge(x, h, w, sx, sy, r):
    """ToMe-for-SD merge with top-left destinations, written with loops from the description."""
    B, N, C = x.shape
    dst = [i * w + j for i in range(0, (h // sy) * sy, sy) for j in range(0, (w // sx) * sx, sx)]
    src = [p for p in range(N) if p not in set(dst)]
    merged, owner = [], []
    for b in range(B):
        m = x[b] / x[b].norm(dim=-1, keepdim=True)
        sim = m[src] @ m[dst].T  # (Ns, Nd)
        best, arg = sim.max(-1)
        order = sorted(range(len(src)), key=lambda i: -best[i].item())
        moved, kept = order[:r], order[r:]
        groups = {j: [dst[j]] for j in range(len(dst))}
        for i in moved:
            groups[arg[i].item()].append(src[i])
        out = [x[b, src[i]] for i in kept] + [x[b, groups[j]].mean(0) for j in range(len(dst))]
        merged.append(torch.stack(out))
        own = {}
        for k, i in enumerate(kept):
            own[src[i]] = k
        for j in range(len(dst)):
            for p in groups[j]:
                own[p] = len(kept) + j
        owner.append([own[p] for p in range(N)])
    return torch.stack(merged), torch.tensor(owner)


@pytest.mark.parametrize("h,w,sx,sy", [(8, 8, 2, 2), (6, 10, 2, 3), (7, 9, 4, 4)])
def test_merge_matches_naive_reference(h, w, sx, sy):
    x = torch.randn(3, h * w, 5)
    num_dst = (h // sy) * (w // sx)
    r = min(int(h * w * 0.4), h * w - num_dst)
    m = bipartite_soft_matching_random2d(x, w, h, sx, sy, r, use_rand=False)
    expected, owner = _naive_merge(x, h, w, sx, sy, r)
    merged = m.merge(x)
    assert merged.shape == (3, h * w - r, 5)
    torch.testing.assert_close(merged, expected)
    # unmerge: every position takes the merged token it went into
    torch.testing.assert_close(m.unmerge(merged), torch.stack([expected[b, owner[b]] for b in range(3)]))


def test_round_trip_keeps_destinations_and_unmerged_tokens():
    h, w, C = 8, 12, 6
    x = torch.randn(2, h * w, C)
    m = bipartite_soft_matching_random2d(x, w, h, 2, 2, r=30, agent_r=60, generator=torch.Generator().manual_seed(1))
    assert m.merge(x).shape == (2, h * w - 30, C)
    assert m.agents(x).shape == (2, h * w - 60, C)
    back = m.unmerge(m.merge(x))
    assert back.shape == x.shape
    # tokens merged nowhere come back exactly; destinations of nothing come back exactly
    same = (back == x).all(-1)  # (B, N)
    assert same.sum(-1).min() >= h * w - 2 * 30  # at most r sources and r destinations changed
    # a map that is constant on every cell merges losslessly: unmerge(merge(x)) == x
    cells = torch.randn(2, h // 2, w // 2, C)
    flat = cells.repeat_interleave(2, 1).repeat_interleave(2, 2).reshape(2, h * w, C) + 0.0
    m2 = bipartite_soft_matching_random2d(flat + 1e-4 * torch.randn_like(flat), w, h, 2, 2, r=h * w * 3 // 4)
    torch.testing.assert_close(m2.unmerge(m2.merge(flat)), flat)


def test_random_destinations_one_per_cell():
    h, w, sx, sy = 9, 10, 4, 4  # border row/columns are outside complete cells
    x = torch.randn(1, h * w, 4)
    m = bipartite_soft_matching_random2d(x, w, h, sx, sy, r=10, generator=torch.Generator().manual_seed(3))
    dst = m.dst_pos.flatten().tolist()
    assert len(dst) == (h // sy) * (w // sx)
    cells = {((p // w) // sy, (p % w) // sx) for p in dst}
    assert len(cells) == len(dst) and all(p // w < (h // sy) * sy and p % w < (w // sx) * sx for p in dst)
    # agent count: r_a clamps to the number of sources, leaving one agent per cell
    m = bipartite_soft_matching_random2d(x, w, h, sx, sy, r=10, agent_r=10_000)
    assert m.num_agents == len(dst) and m.use_agents


def test_matching_bad_map_size():
    with pytest.raises(ValueError, match="h=5 x w=5"):
        bipartite_soft_matching_random2d(torch.randn(1, 24, 4), 5, 5, 2, 2, 3)


# ----------------------------------------------------------------------------- the processor
def _paper_attn1(attn, xm, xa, heads=4, head_dim=8):
    """to_out(σ(s^0.3 Q Aᵀ) σ(s A Kᵀ) V + 0.075 V) on merged tokens ``xm`` (B, n, C) with agent tokens
    ``xa`` (B, a, C), written from the formulas (the oracle of the patched self-attention)."""
    def split(t):
        return t.view(t.shape[0], -1, heads, head_dim).transpose(1, 2)

    q, k, v, a = split(attn.to_q(xm)), split(attn.to_k(xm)), split(attn.to_v(xm)), split(attn.to_q(xa))
    s = head_dim ** -0.5
    o = agent_attention_reference(q, k, v, a, scale=s, broadcast_scale=s ** 0.3) + 0.075 * v
    return attn.to_out[0](o.transpose(1, 2).reshape(xm.shape[0], -1, heads * head_dim))


def test_processor_matches_paper_formula():
    """attn1 under the patch == unmerge(to_out(σ(s^0.3 QAᵀ) σ(s AKᵀ) V + 0.075 V)) on merged tokens."""
    from diffusers.models.attention import BasicTransformerBlock

    block = BasicTransformerBlock(32, 4, 8, cross_attention_dim=16).eval()
    apply_patch(_Wrap(block))  # patch through a UNet-like container
    h, w = 8, 8
    x = torch.randn(2, h * w, 32)
    state = get_state(block._wrap)
    state.size = (h, w)
    state.step = 0
    state.generator = torch.Generator().manual_seed(0)
    m = state.matching(x)
    assert m is not None and m.use_agents  # N=64: r=25, 4 agents
    proc = block.attn1.processor
    proc.matching = m
    attn = block.attn1
    with torch.no_grad():
        got = attn(x)
        expected = m.unmerge(_paper_attn1(attn, m.merge(x), m.agents(x)))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    remove_patch(block._wrap)
    assert type(block.attn1.processor).__name__ == "AttnProcessor2_0"


def test_processor_plain_path_matches_diffusers_sdpa():
    """The processor's own softmax path (used for attn_precision='fp32') equals diffusers' AttnProcessor2_0."""
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.attention_processor import AttnProcessor2_0

    block = BasicTransformerBlock(32, 4, 8, cross_attention_dim=16).eval()
    wrap = _Wrap(block)
    apply_patch(wrap, attn_precision="fp32")
    x = torch.randn(3, 40, 32)
    with torch.no_grad():
        ours = block.attn1.processor._attend(block.attn1, x, None)
        theirs = AttnProcessor2_0()(block.attn1, x)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    remove_patch(wrap)


class _Wrap(torch.nn.Module):
    # a stand-in UNet holding one block (apply_patch takes any module with BasicTransformerBlocks)
    def __init__(self, block):
        super().__init__()
        self.block = block
        block._wrap = self

    def forward(self, sample, timestep):
        return self.block(sample)


def test_apply_patch_errors():
    with pytest.raises(TypeError, match="pipeline with a `.unet`"):
        apply_patch("not a model")
    with pytest.raises(ValueError, match="no diffusers BasicTransformerBlock"):
        apply_patch(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="ratio must be in"):
        apply_patch(torch.nn.Linear(2, 2), ratio=1.5)
    with pytest.raises(ValueError, match="attn_precision"):
        apply_patch(torch.nn.Linear(2, 2), attn_precision="bf16")


# ----------------------------------------------------------------------------- whole pipeline
@pytest.fixture(scope="module")
def pipe():
    return build_tiny_pipeline(seed=0)


def _run(pipe, prompts=("a cat", "a dog"), steps=3, size=(32, 32), guidance=7.5, **kw):
    g = torch.Generator().manual_seed(0)
    out = pipe(list(prompts), num_inference_steps=steps, height=size[0], width=size[1], guidance_scale=guidance,
               generator=g, output_type="pt", **kw)
    return out.images


def test_apply_remove_is_bit_identical(pipe):
    before = _run(pipe)
    processors = {n: p for n, p in pipe.unet.attn_processors.items()}
    apply_patch(pipe)
    apply_patch(pipe, ratio=0.3)  # re-patching replaces, never stacks
    ours = [p for p in pipe.unet.attn_processors.values() if isinstance(p, patch_mod.AgentSDAttnProcessor)]
    n_blocks = sum(type(m).__name__ == "BasicTransformerBlock" for m in pipe.unet.modules())
    assert len(ours) == n_blocks == 4  # every self-attention, each wrapping the original once
    assert not any(isinstance(p.original, patch_mod.AgentSDAttnProcessor) for p in ours)
    # cross-attention keeps its own processor objects
    assert all(pipe.unet.attn_processors[n] is p for n, p in processors.items() if ".attn2." in n)
    patched = _run(pipe)
    remove_patch(pipe)
    remove_patch(pipe)  # idempotent
    after = _run(pipe)
    assert not torch.equal(patched, before)  # the patch did change the computation
    assert torch.equal(after, before)
    assert all(pipe.unet.attn_processors[n] is p for n, p in processors.items())
    assert get_state(pipe) is None
    assert not pipe.unet._forward_pre_hooks


def test_ratio_zero_without_agents_is_unpatched(pipe):
    before = _run(pipe)
    apply_patch(pipe, ratio=0.0, agent_ratio=0.0, late_agent_ratio=0.0, attn_precision="fp32")
    try:
        after = _run(pipe)
    finally:
        remove_patch(pipe)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "prompts,size,guidance",
    [(("a cat",), (32, 48), 7.5), (("a", "b", "c"), (48, 32), 1.0), (("a red house", "b"), (40, 24), 5.0)],
    ids=["nonsquare-cfg", "odd-batch-nocfg", "nondivisible-cfg"],
)
def test_patched_runs_and_uses_agents(pipe, monkeypatch, prompts, size, guidance):
    calls = []

    def spy(q, k, v, agents, upcast=None, dropout_p=0.0, **kw):
        calls.append((q.shape, agents.shape, kw["broadcast_scale"] / kw["scale"]))
        return agent_attention_reference(q, k, v, agents, **kw)

    monkeypatch.setattr(core_functional, "agent_attention", spy)
    apply_patch(pipe, agent_steps=100)
    try:
        out = _run(pipe, prompts, steps=2, size=size, guidance=guidance)
    finally:
        remove_patch(pipe)
    assert out.shape == (len(prompts), 3, *size) and torch.isfinite(out).all()
    N = (size[0] // 2) * (size[1] // 2)  # the tiny VAE downsamples by 2
    batch = len(prompts) * (2 if guidance > 1 else 1)
    q_shape, a_shape, ratio = calls[0]
    assert q_shape[0] == batch and q_shape[2] == N - int(0.4 * N)
    assert a_shape[2] == (size[0] // 2 // 4) * (size[1] // 2 // 4)  # one agent per 4x4 cell
    assert ratio == pytest.approx((8 ** -0.5) ** 0.3 / 8 ** -0.5)
    # the 3 full-resolution blocks (1 down, 2 up) at every UNet call; the mid block is left alone
    assert len(calls) >= 6 and len(calls) % 3 == 0


def test_schedule_switches_at_agent_steps(pipe, monkeypatch):
    state_steps, merged_calls = [], []
    real = patch_mod.AgentSDAttnProcessor.__call__

    def spy(q, k, v, agents, upcast=None, dropout_p=0.0, **kw):
        state_steps.append(get_state(pipe).step)
        return agent_attention_reference(q, k, v, agents, **kw)

    def counting_call(self, attn, hidden_states, *a, **kw):
        if self.matching is not None:
            merged_calls.append((self.state.step, self.matching.use_agents, self.matching.r))
        return real(self, attn, hidden_states, *a, **kw)

    monkeypatch.setattr(core_functional, "agent_attention", spy)
    monkeypatch.setattr(patch_mod.AgentSDAttnProcessor, "__call__", counting_call)
    apply_patch(pipe, agent_steps=2)
    try:
        seen = []
        _run(pipe, steps=4, callback_on_step_end=lambda p, i, t, kw: seen.append(get_state(p).step) or kw)
        assert get_state(pipe).step == 3  # PNDM: 5 UNet calls, 4 distinct timesteps
        assert seen == [0, 1, 1, 2, 3]
        assert sorted(set(state_steps)) == [0, 1]
        N = 256
        assert {s for s, agents, _ in merged_calls if agents} == {0, 1}
        assert {s for s, agents, _ in merged_calls if not agents} == {2, 3}  # ToMe only afterwards
        assert all(r == int(0.4 * N) for *_, r in merged_calls)
        # a new generation starts the schedule over
        state_steps.clear()
        _run(pipe, steps=2)
        assert sorted(set(state_steps)) == [0, 1]
    finally:
        remove_patch(pipe)


def test_fp32_precision_under_low_precision(monkeypatch):
    from diffusers import UNet2DConditionModel

    from agentlit.diffusion import tiny_unet_config

    dtypes = []

    def spy(q, k, v, agents, upcast=None, dropout_p=0.0, **kw):
        dtypes.append((q.dtype, k.dtype, agents.dtype))
        return agent_attention_reference(q, k, v, agents, **kw)

    monkeypatch.setattr(core_functional, "agent_attention", spy)
    unet = UNet2DConditionModel(**tiny_unet_config()).eval()
    sample = torch.randn(2, 4, 16, 16)
    ctx = torch.randn(2, 77, 32)
    try:
        apply_patch(unet, attn_precision="fp32")
        with torch.no_grad():
            ref = unet(sample, 500, ctx).sample
        unet.to(torch.bfloat16)
        with torch.no_grad():
            low = unet(sample.bfloat16(), 500, ctx.bfloat16()).sample
        assert low.dtype == torch.bfloat16
        assert dtypes and all(d == (torch.float32,) * 3 for d in dtypes)
        assert math.isfinite(float((low.float() - ref).abs().max()))
        dtypes.clear()
        apply_patch(unet)  # default precision: the attention runs in the model dtype
        with torch.no_grad():
            unet(sample.bfloat16(), 500, ctx.bfloat16())
        assert dtypes and all(d == (torch.bfloat16,) * 3 for d in dtypes)
    finally:
        remove_patch(unet)


def test_fp32_precision_same_result_in_fp32(pipe):
    """In an fp32 model the fp32 option changes nothing but the code path (own SDPA for ToMe steps)."""
    outs = []
    for precision in (None, "fp32"):
        apply_patch(pipe, agent_steps=1, attn_precision=precision)
        try:
            torch.manual_seed(0)
            outs.append(_run(pipe, steps=3))
        finally:
            remove_patch(pipe)
    torch.testing.assert_close(outs[0], outs[1], atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- fast paths vs naive references
def _naive_perm(h, w, sx, sy, pick):
    """src positions then dst positions in raster order, from per-cell picks (the stable-argsort definition)."""
    dst = {(i * sy + int(pick[i, j]) // sx) * w + j * sx + int(pick[i, j]) % sx
           for i in range(h // sy) for j in range(w // sx)}
    return [p for p in range(h * w) if p not in dst], sorted(dst)


@pytest.mark.parametrize("h,w,sx,sy", [(8, 8, 2, 2), (9, 10, 4, 4), (6, 10, 2, 3)])
def test_device_side_split_matches_naive(h, w, sx, sy):
    x = torch.randn(2, h * w, 4)
    m = bipartite_soft_matching_random2d(x, w, h, sx, sy, r=5, generator=torch.Generator().manual_seed(7))
    pick = torch.randint(sy * sx, (h // sy, w // sx), generator=torch.Generator().manual_seed(7))
    src, dst = _naive_perm(h, w, sx, sy, pick)
    assert m.src_pos.flatten().tolist() == src and m.dst_pos.flatten().tolist() == dst


@pytest.mark.parametrize("r,agent_r", [(10, 40), (0, 30), (25, 25), (30, 10)])
def test_agents_from_merged_match_naive(r, agent_r):
    h, w = 8, 12
    x = torch.randn(3, h * w, 6)
    m = bipartite_soft_matching_random2d(x, w, h, 2, 2, r=r, agent_r=agent_r, use_rand=False)
    expected, _ = _naive_merge(x, h, w, 2, 2, m.agent_r)
    torch.testing.assert_close(m.agents(x, m.merge(x)), expected)
    torch.testing.assert_close(m.agents(x), expected)
    if m.agent_r > m.r:  # fp16: counts and means stay in range
        half = m.agents(x.half(), m.merge(x.half()))
        torch.testing.assert_close(half.float(), expected, atol=2e-3, rtol=2e-3)


def test_patched_attn1_matches_naive_agentsd():
    """attn1 under the default patch == the method written out with the loop-based merge above."""
    from diffusers.models.attention import BasicTransformerBlock

    block = BasicTransformerBlock(32, 4, 8, cross_attention_dim=16).eval()
    wrap = _Wrap(block)
    apply_patch(wrap, use_rand=False)
    h, w = 8, 8
    x = torch.randn(2, h * w, 32)
    state = get_state(wrap)
    state.new_call((h, w))
    state.step = 0
    block.attn1.processor.matching = m = state.matching(x)
    attn = block.attn1
    with torch.no_grad():
        got = attn(x)
        xm, owner = _naive_merge(x, h, w, 4, 4, int(0.4 * h * w))
        xa, _ = _naive_merge(x, h, w, 4, 4, m.agent_r)
        o = _paper_attn1(attn, xm, xa)
        expected = torch.stack([o[b, owner[b]] for b in range(2)])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    # diffusers' fused QKV projection gives the same output
    attn.fuse_projections()
    with torch.no_grad():
        torch.testing.assert_close(attn(x), got, atol=1e-5, rtol=1e-5)
    remove_patch(wrap)


# ----------------------------------------------------------------------------- tomesd-compatible API
def test_tomesd_call_shapes(pipe):
    assert apply_patch(pipe, 0.5) is pipe and get_state(pipe).config.ratio == 0.5
    assert apply_patch(pipe.unet, 0.3, 1, 2, 2, False, True, True, True) is pipe.unet
    c = get_state(pipe).config
    assert (c.ratio, c.max_downsample, c.sx, c.sy, c.use_rand, c.merge_crossattn, c.merge_mlp) == (
        0.3, 1, 2, 2, False, True, True)
    assert remove_patch(pipe.unet) is pipe.unet and get_state(pipe) is None
    cfg = patch_mod.AgentSDConfig(ratio=0.2)
    assert get_state(apply_patch(pipe, cfg)).config is cfg
    assert get_state(apply_patch(pipe, config={"ratio": 0.1}, agent_steps=3)).config.agent_steps == 3
    assert remove_patch(pipe) is pipe
    with pytest.raises(ValueError, match="merge_mlp must be true or false"):
        apply_patch(pipe, merge_mlp="yes")
    with pytest.raises(ValueError, match="max_downsample must be an integer"):
        apply_patch(pipe, max_downsample=0)


@pytest.mark.parametrize("extra", [{}, {"merge_crossattn": True}, {"merge_mlp": True},
                                   {"merge_crossattn": True, "merge_mlp": True}], ids=["attn", "cross", "mlp", "all"])
def test_tome_phase_equals_tomesd(extra):
    """Our ToMe phase (sx=sy=2, no agents) computes what the tomesd package computes, option for option."""
    tomesd = pytest.importorskip("tomesd")
    from diffusers import UNet2DConditionModel

    from agentlit.diffusion import tiny_unet_config

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**tiny_unet_config()).eval()
    x, ctx = torch.randn(2, 4, 16, 16), torch.randn(2, 77, 32)
    with torch.no_grad():
        plain = unet(x, 500, ctx).sample
        tomesd.apply_patch(unet, ratio=0.5, use_rand=False, **extra)
        theirs = unet(x, 500, ctx).sample
        tomesd.remove_patch(unet)
        apply_patch(unet, 0.5, sx=2, sy=2, use_rand=False, agent_steps=0, **extra)
        ours = unet(x, 500, ctx).sample
        remove_patch(unet)
        assert torch.equal(unet(x, 500, ctx).sample, plain)
    assert (theirs - plain).abs().max() > 1e-2  # the merge did change the computation
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_merge_mlp_runs_the_mlp_on_merged_tokens(pipe):
    ff = next(m for m in pipe.unet.modules() if type(m).__name__ == "BasicTransformerBlock").ff
    apply_patch(pipe, 0.5, merge_mlp=True)
    seen = []
    # forward pre-hooks run in registration order: this one sees what the MLP gets after the patch's merge
    handle = ff.register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape[1]))
    try:
        _run(pipe, steps=1)
    finally:
        handle.remove()
        remove_patch(pipe)
    assert seen and all(n == 256 - 128 for n in seen)  # 16² latent, ratio 0.5


# ----------------------------------------------------------------------------- SDXL and shared matching
@pytest.fixture(scope="module")
def xl_pipe():
    return build_tiny_pipeline(seed=0, kind="sdxl")


def test_sdxl_default_patches_the_first_attention_level_and_restores_bit_exactly(xl_pipe, monkeypatch):
    pipe = xl_pipe
    assert type(pipe).__name__ == "StableDiffusionXLPipeline"
    before = _run(pipe, steps=2)
    apply_patch(pipe, max_downsample=1)  # tomesd's default: SDXL has no attention at full resolution
    try:
        assert torch.equal(_run(pipe, steps=2), before)
    finally:
        remove_patch(pipe)
    tokens = []

    def spy(q, k, v, agents, upcast=None, dropout_p=0.0, **kw):
        tokens.append((q.shape[2], agents.shape[2]))
        return agent_attention_reference(q, k, v, agents, **kw)

    monkeypatch.setattr(core_functional, "agent_attention", spy)
    assert apply_patch(pipe) is pipe
    patched = _run(pipe, steps=2)
    assert get_state(pipe).level == 2
    assert remove_patch(pipe) is pipe
    after = _run(pipe, steps=2)
    N = 8 * 8  # 32 px -> 16² latent -> the 2x downsampled level
    assert tokens and set(tokens) == {(N - int(0.4 * N), 4)}
    assert not torch.equal(patched, before)
    assert torch.equal(after, before)


def test_share_matching_one_matching_per_resolution(pipe, monkeypatch):
    calls = []
    real = patch_mod.bipartite_soft_matching_random2d

    def counting(*a, **kw):
        calls.append(a[0].shape[1])
        return real(*a, **kw)

    monkeypatch.setattr(patch_mod, "bipartite_soft_matching_random2d", counting)
    outs = {}
    for shared in (False, True):
        calls.clear()
        apply_patch(pipe, share_matching=shared)
        try:
            torch.manual_seed(0)
            outs[shared] = _run(pipe, steps=2)  # PNDM: 3 UNet calls
        finally:
            remove_patch(pipe)
        assert len(calls) == (3 if shared else 9)  # 3 full-resolution blocks per call
    diff = (outs[True] - outs[False]).abs()
    assert 0 < diff.max() < 0.5  # changes outputs, a little (docs/agentsd.md quotes the numbers)


def test_generation_module_takes_a_tiny_sdxl_pipeline(tmp_path):
    from agentlit.tasks import GenerationModule

    module = GenerationModule(tiny_kind="sdxl", agentsd={"ratio": 0.5}, num_inference_steps=2, height=32, width=32,
                              warmup=False, output_dir=str(tmp_path))
    assert type(module.pipe).__name__ == "StableDiffusionXLPipeline"
    assert module.text_encoder_2 is module.pipe.text_encoder_2  # registered: moves with the module
    assert get_state(module.pipe).config.ratio == 0.5
    images, seconds = module.generate(["a cat", "a dog"], [0, 1], output_type="pt")
    assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all() and seconds > 0
    assert get_state(module.pipe).level == 2  # the SDXL-shaped UNet's first attention level
    with pytest.raises(ValueError, match="kind must be 'sd' or 'sdxl'"):
        build_tiny_pipeline(kind="sd3")
