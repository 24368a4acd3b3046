"""Model zoo: Agent-PVT / Agent-Swin / Agent-CSwin and their baselines in timm's registry."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F

import agentlit  # noqa: F401  (registers the models)
from agentlit.core import agent_attention_reference
from agentlit.models import agent_cswin, agent_pvt, agent_swin
from agentlit.utils import count_macs
from official_layout import MODELS, header_param_count, official_layout, official_param_count


AGENT = [f"agent_pvt_{s}" for s in ("tiny", "small", "medium", "large")] + [
    f"agent_{f}_{s}" for f in ("swin", "cswin") for s in ("tiny", "small", "base")
]
BASELINES = [f"pvt_v1_{s}" for s in ("tiny", "small", "medium", "large")] + [f"cswin_{s}" for s in ("tiny", "small", "base")]
# docs/reference.md, "Models" (paper Sec. 4): (params M, FLOPs G = MACs) at 224².
PAPER = {
    "agent_pvt_tiny": (11.6, 2.0), "agent_pvt_small": (20.6, 4.0), "agent_pvt_medium": (35.9, 7.0),
    "agent_pvt_large": (48.7, 10.4), "agent_swin_tiny": (29, 4.5), "agent_swin_small": (50, 8.7),
    "agent_swin_base": (88, 15.4), "agent_cswin_tiny": (21, 4.3), "agent_cswin_small": (33, 6.8),
    "agent_cswin_base": (73, 14.9),
}
FILTERS = {"pvt": agent_pvt.checkpoint_filter_fn, "swin": agent_swin.checkpoint_filter_fn,
           "cswin": agent_cswin.checkpoint_filter_fn}

# Small versions of every family that keep the per-stage attention pattern (e.g. AAMB2 needs 3+ blocks in stage 3).
SMALL = {
    "pvt": dict(img_size=64, depths=(1, 1, 2, 1), embed_dims=(16, 32, 40, 64)),
    "swin": dict(img_size=64, depths=(1, 1, 3, 2), embed_dim=24, window_size=2),
    "cswin": dict(img_size=64, depths=(1, 2, 2, 1), embed_dim=16, split_size=(1, 2, 2, 2)),
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # These models are tiny: with the cores shared, one intra-op thread is many times faster than two
    # threads spinning against each other.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def family(name: str) -> str:
    return "cswin" if "cswin" in name else "swin" if "swin" in name else "pvt"


def small(name: str, **kw) -> torch.nn.Module:
    return timm.create_model(name, **{**SMALL[family(name)], **kw})


def to_official(model: torch.nn.Module, name: str) -> dict[str, torch.Tensor]:
    """Our state dict renamed to the official release's layout (the inverse of the filters)."""
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    out = {}
    for k, v in sd.items():
        if family(name) == "pvt" and k.endswith(("attn.qkv.weight", "attn.qkv.bias")):
            attn, leaf = k.rsplit(".qkv.", 1)
            c = v.shape[0] // 3
            out[f"{attn}.q.{leaf}"], out[f"{attn}.kv.{leaf}"] = v[:c], v[c:]
        elif family(name) == "swin":
            k = re.sub(r"layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) - 1}.downsample", k)
            out[k.replace("head.fc.", "head.")] = v
        else:
            out[k] = v
    if family(name) == "swin":  # the official persistent buffers the model rebuilds itself
        for mod_name, mod in model.named_modules():
            if hasattr(mod, "relative_position_bias_table"):
                n = mod.relative_position_index.numel()
                out[f"{mod_name}.relative_position_index"] = torch.zeros(int(n**0.5), int(n**0.5), dtype=torch.long)
    return out


# ---------------------------------------------------------------------------------------------- registry


def test_every_model_is_registered_and_pvt_v1_does_not_clash():
    for name in AGENT + BASELINES:
        assert timm.is_model(name), name
    assert set(timm.list_models("pvt_v1_*")) == {f"pvt_v1_{s}" for s in ("tiny", "small", "medium", "large")}
    assert "pvt_v2_b0" in timm.list_models("pvt_v2_*")  # timm's own PVT v2 is untouched


@pytest.mark.parametrize("name", AGENT + BASELINES)
def test_forward_backward_small(name):
    model = small(name, num_classes=10, drop_path_rate=0.1)
    x = torch.randn(2, 3, 64, 64)
    out = model(x)
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    F.cross_entropy(out, torch.tensor([1, 2])).backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not no_grad, f"parameters without a finite gradient: {no_grad[:5]}"


def test_attention_types_per_stage():
    assert timm.create_model("agent_pvt_tiny", pretrained=False).attn_types == ["AA", "AA", "AA", "AA"]
    assert small("agent_swin_base").attn_types == ["A", "A", "AAB", "BB"]
    assert small("agent_swin_small").attn_types == ["A", "A", "BBB", "BB"]
    assert small("agent_swin_tiny").attn_types == ["A", "A", "AAA", "BB"]
    m = small("agent_cswin_tiny")
    assert m.attn_types == ["A", "AA", "BB", "B"]
    # agent blocks: one full-map branch with all heads; CSWin blocks: two half-width stripe branches
    assert [type(b).__name__ for b in m.stage1[0].attns] == ["AgentBranch"]
    assert [type(b).__name__ for b in m.stage3[0].attns] == ["LePEBranch", "LePEBranch"]
    assert len(m.stage4[0].attns) == 1
    # PVT agent blocks have no spatial reduction, baseline blocks do (sr 8-4-2-1)
    pvt = small("pvt_v1_tiny")
    assert [blk.attn.sr_ratio for i in range(4) for blk in getattr(pvt, f"block{i + 1}")] == [8, 4, 2, 2, 1]
    agent = small("agent_pvt_tiny")
    assert not any(hasattr(blk.attn, "sr") for i in range(4) for blk in getattr(agent, f"block{i + 1}"))
    with pytest.raises(ValueError, match="attn_type"):
        small("agent_swin_tiny", attn_type="AAX B")


# ---------------------------------------------------------------------------------------------- sizes


@pytest.mark.parametrize("name", AGENT)
def test_full_size_params_match_official_and_paper(name):
    with torch.device("meta"):
        model = timm.create_model(name)
    n = sum(p.numel() for p in model.parameters())
    assert n == official_param_count(name) == header_param_count(name)
    paper = PAPER[name][0]
    # Within 1%, or within the precision of a figure the paper gives in whole millions: CSwin-T is
    # 20.46M in the official code and "21M" in the paper.
    assert abs(n / 1e6 - paper) / paper < 0.01 or (paper == int(paper) and paper - 1 < n / 1e6 <= paper + 0.5)


@pytest.mark.parametrize(
    "name,published",
    # PVT (v1) paper: 13.2 / 24.5 / 44.2 / 61.4 M; CSWin paper: 23 / 35 / 78 M (rounded up there).
    [("pvt_v1_tiny", 13.2), ("pvt_v1_small", 24.5), ("pvt_v1_medium", 44.2), ("pvt_v1_large", 61.4),
     ("cswin_tiny", 23), ("cswin_small", 35), ("cswin_base", 78)],
)
def test_full_size_baseline_params(name, published):
    with torch.device("meta"):
        model = timm.create_model(name)
    n = sum(p.numel() for p in model.parameters()) / 1e6
    assert abs(n - published) / published < (0.01 if "pvt" in name else 0.035)


@pytest.mark.parametrize("name", ["agent_pvt_tiny", "agent_swin_tiny", "agent_cswin_tiny"])
def test_full_size_macs_match_paper(name):
    model = timm.create_model(name)
    macs, per_module = count_macs(model, torch.randn(1, 3, 224, 224))
    assert abs(macs / 1e9 - PAPER[name][1]) / PAPER[name][1] < 0.05
    # attention is counted: the agent layers' two attention products are in the total
    attn = [v for k, v in per_module.items() if k.endswith("attn") or k.endswith("attns.0")]
    assert attn and min(attn) > 0


# ---------------------------------------------------------------------------------------------- features


@pytest.mark.parametrize("name", ["agent_pvt_tiny", "pvt_v1_tiny", "agent_cswin_tiny", "cswin_tiny", "agent_swin_tiny"])
def test_features_only_any_size(name):
    kw = dict(SMALL[family(name)])
    size = (64, 96)  # non-square; PVT / CSwin take it whatever img_size is, Swin is built for it
    if family(name) == "swin":
        kw["img_size"] = size
    model = timm.create_model(name, features_only=True, out_indices=(0, 1, 2, 3), **kw)
    feats = model(torch.randn(1, 3, *size))
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    assert [f.shape[1] for f in feats] == model.feature_info.channels()
    assert [tuple(f.shape[-2:]) for f in feats] == [(size[0] // r, size[1] // r) for r in (4, 8, 16, 32)]
    two = timm.create_model(name, features_only=True, out_indices=(1, 3), **kw)
    assert [f.shape[1] for f in two(torch.randn(1, 3, *size))] == two.feature_info.channels()


def test_segmentation_backbone_call():
    # the call the segmentation task makes, full width, at a non-training resolution and non-square input
    model = timm.create_model("agent_pvt_tiny", features_only=True, out_indices=(0, 1, 2, 3), img_size=128)
    feats = model(torch.randn(1, 3, 128, 192))
    assert [tuple(f.shape) for f in feats] == [(1, 64, 32, 48), (1, 128, 16, 24), (1, 320, 8, 12), (1, 512, 4, 6)]
    swin = timm.create_model("agent_swin_tiny", features_only=True, img_size=(128, 160), **{"depths": (2, 2, 2, 2)})
    assert [tuple(f.shape) for f in swin(torch.randn(1, 3, 128, 160))][-1] == (1, 768, 4, 5)


# ---------------------------------------------------------------------------------------------- dense setting


def test_dense_agent_grids_and_no_weight_decay():
    model = small("agent_pvt_tiny", agent_num=[(12, 12), (16, 16), (28, 28), (28, 28)], num_classes=0)
    attn = model.block3[0].attn
    assert attn.agent_grid == (28, 28) and attn.an_bias.shape[1] == 784
    assert model(torch.randn(1, 3, 96, 64)).shape == (1, 64)
    nwd = model.no_weight_decay()
    bias_params = {n for n, _ in model.named_parameters() if re.search(r"\.(an|na|ah|aw|ha|wa)_bias$", n)}
    assert bias_params and bias_params <= nwd and {f"pos_embed{i}" for i in range(1, 5)} <= nwd
    assert not any(n.endswith("weight") for n in nwd)
    swin = small("agent_swin_tiny", agent_num=[(9, 9), (12, 12), (14, 14), (7, 7)])
    nwd = swin.no_weight_decay()
    assert "layers.0.blocks.0.attn.an_bias" in nwd and any("relative_position_bias_table" in n for n in nwd)
    cswin = small("agent_cswin_tiny")
    assert "stage1.0.attns.0.wa_bias" in cswin.no_weight_decay()


def test_checkpoint_to_dense_agent_grid():
    """Classification weights (agents 9-16-49-49) → dense model (larger agent grids, other map size)."""
    src = small("agent_pvt_tiny")
    dst = small("agent_pvt_tiny", img_size=96, agent_num=[(4, 4), (4, 4), (4, 4), (2, 2)])
    dst.load_state_dict(agent_pvt.checkpoint_filter_fn(to_official(src, "agent_pvt_tiny"), dst), strict=True)
    assert dst.block1[0].attn.ah_bias.shape == (1, 1, 16, 24, 1)
    assert dst.pos_embed1.shape == (1, 24 * 24, 16)


# ---------------------------------------------------------------------------------------------- numerics


def test_pvt_agent_block_matches_official_formula():
    """Agent-PVT attention with official q / kv weights equals the paper's formula written out."""
    model = small("agent_pvt_tiny").eval()
    official = to_official(model, "agent_pvt_tiny")
    attn = model.block2[0].attn
    B, h, w, C, H = 2, *attn.feat_size, 32, attn.num_heads
    x = torch.randn(B, h * w, C)
    q = x @ official["block2.0.attn.q.weight"].T + official["block2.0.attn.q.bias"]
    kv = (x @ official["block2.0.attn.kv.weight"].T + official["block2.0.attn.kv.bias"]).reshape(B, -1, 2, C)
    k, v = kv[:, :, 0], kv[:, :, 1]
    agents = F.adaptive_avg_pool2d(q.transpose(1, 2).reshape(B, C, h, w), attn.agent_grid).flatten(2).transpose(1, 2)
    heads = lambda t: t.reshape(B, -1, H, C // H).transpose(1, 2)  # noqa: E731
    b1, b2 = attn.position_biases([h, w])
    o = agent_attention_reference(heads(q), heads(k), heads(v), heads(agents), agent_bias=b1, query_bias=b2)
    o = o.transpose(1, 2).reshape(B, h * w, C) + attn.dwc(v.transpose(1, 2).reshape(B, C, h, w)).flatten(2).transpose(1, 2)
    expected = attn.proj(o)
    torch.testing.assert_close(attn(x, (h, w)), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("idx,size", [(0, (6, 6)), (1, (6, 6)), (0, (5, 7)), (1, (7, 4)), (-1, (5, 6))])
def test_cswin_stripe_branch_matches_loop_reference(idx, size):
    """LePE stripe attention (padded where the stripes do not tile the map) vs a per-stripe loop."""
    torch.manual_seed(0)
    split, C, H, B = 2, 8, 2, 2
    branch = agent_cswin.LePEBranch(C, H, idx=idx, split_size=split).eval()
    h, w = size
    q, k, v = (torch.randn(B, h * w, C) for _ in range(3))
    out = branch(q, k, v, (h, w))
    qm, km, vm = (t.transpose(1, 2).reshape(B, C, h, w) for t in (q, k, v))
    expected = torch.zeros(B, C, h, w)
    hs, ws = {-1: (h, w), 0: (h, split), 1: (split, w)}[idx]
    for r in range(0, h, hs):
        for c in range(0, w, ws):
            sl = (slice(None), slice(None), slice(r, r + hs), slice(c, c + ws))
            tq, tk, tv = (t[sl].flatten(2).transpose(1, 2).reshape(B, -1, H, C // H).transpose(1, 2) for t in (qm, km, vm))
            att = ((tq @ tk.transpose(-1, -2)) * (C // H) ** -0.5).softmax(-1) @ tv  # (B, H, n, d)
            lepe = branch.get_v(vm[sl])  # zero padding at the stripe border, as per-window conv
            expected[sl] = att.transpose(1, 2).reshape(B, -1, C).transpose(1, 2).reshape(lepe.shape) + lepe
    torch.testing.assert_close(out, expected.flatten(2).transpose(1, 2), rtol=1e-4, atol=1e-5)


def test_cswin_agent_branch_matches_reference():
    torch.manual_seed(0)
    B, C, H, h, w = 2, 16, 4, 6, 5
    br = agent_cswin.AgentBranch(C, H, feat_size=(6, 6), agent_num=4).eval()
    q, k, v = (torch.randn(B, h * w, C) for _ in range(3))
    agents = F.adaptive_avg_pool2d(q.transpose(1, 2).reshape(B, C, h, w), 2).flatten(2).transpose(1, 2)
    heads = lambda t: t.reshape(B, -1, H, C // H).transpose(1, 2)  # noqa: E731
    b1, b2 = br.position_biases([h, w])
    o = agent_attention_reference(heads(q), heads(k), heads(v), heads(agents), agent_bias=b1, query_bias=b2)
    lepe = br.get_v(v.transpose(1, 2).reshape(B, C, h, w)).flatten(2).transpose(1, 2)
    torch.testing.assert_close(br(q, k, v, (h, w)), o.transpose(1, 2).reshape(B, h * w, C) + lepe, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("name", ["agent_pvt_tiny", "pvt_v1_tiny", "agent_swin_base", "agent_cswin_tiny", "cswin_tiny"])
def test_official_naming_round_trip_without_files(name, tmp_path):
    """A state dict renamed to the official layout loads strictly through the timm pretrained path and
    reproduces the model's outputs (our own weights, so outputs can be compared)."""
    src = small(name).eval()
    official = to_official(src, name)
    if family(name) == "pvt" and name.startswith("agent"):
        assert "block1.0.attn.q.weight" in official and "block1.0.attn.qkv.weight" not in official
    if family(name) == "swin":
        assert "layers.0.downsample.reduction.weight" in official and "head.weight" in official
    path = tmp_path / "official.pth"
    torch.save({"model": official, "epoch": 299}, path)
    dst = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **SMALL[family(name)]).eval()
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(dst(x), src(x))


def test_official_listings_cover_every_agent_model():
    """The layouts ship with the repository, one per agent model, and their rows agree with their headers."""
    deit = [f"agent_deit_{s}" for s in ("tiny", "small", "base")]
    assert MODELS == sorted(AGENT + deit)
    for name in MODELS:
        header = (Path(__file__).parent / "data" / "official_keys" / f"{name}.tsv").read_text().splitlines()[0]
        entries = int(re.search(r"\| (\d+) entries", header).group(1))
        assert header.startswith(f"# {name} |") and len(official_layout(name)) == entries, name


@pytest.mark.parametrize("name", AGENT)
def test_official_layout_keys_and_shapes_load_strictly(name):
    """Every official key/shape listing loads strictly into our full-size model (meta tensors: shapes only)."""
    with torch.device("meta"):
        model = timm.create_model(name)
    sd = {k: torch.empty(s, device="meta") for k, s in official_layout(name).items()}
    model.load_state_dict(FILTERS[family(name)](sd, model), strict=True)
    bad = dict(sd)
    key = next(k for k in bad if k.endswith("mlp.fc1.weight"))
    bad[key] = torch.empty(bad[key].shape[0] + 1, bad[key].shape[1], device="meta")
    with pytest.raises(RuntimeError, match="size mismatch"):
        model.load_state_dict(FILTERS[family(name)](bad, model), strict=True)


@pytest.mark.parametrize("name", ["agent_pvt_tiny", "agent_swin_tiny", "agent_cswin_tiny"])
def test_official_checkpoint_file_other_resolution_and_classes(name, tmp_path):
    """Random weights in the official layout → file → timm pretrained path at 288² and 10 classes."""
    shapes = official_layout(name)
    sd = {k: torch.randn(s) if "index" not in k else torch.zeros(s, dtype=torch.long) for k, s in shapes.items()}
    path = tmp_path / f"{name}.pth"
    torch.save({"model": sd, "state_dict_ema": sd}, path)
    model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                              img_size=288, num_classes=10).eval()
    ours = model.state_dict()
    if family(name) == "pvt":
        fused = torch.cat([sd["block1.0.attn.q.weight"], sd["block1.0.attn.kv.weight"]])  # q rows, then k, v
        torch.testing.assert_close(ours["block1.0.attn.qkv.weight"], fused)
        assert ours["pos_embed1"].shape == (1, 72 * 72, 64)
        bias = "block1.0.attn.ah_bias"
    elif family(name) == "swin":
        torch.testing.assert_close(ours["layers.1.downsample.reduction.weight"], sd["layers.0.downsample.reduction.weight"])
        bias = "layers.0.blocks.0.attn.ah_bias"
    else:
        torch.testing.assert_close(ours["stage1.0.attns.0.get_v.weight"], sd["stage1.0.attns.0.get_v.weight"])
        bias = "stage1.0.attns.0.ah_bias"
    assert ours[bias].shape[3] == 72 and sd[bias].shape[3] == 56  # resized 56 → 72
    torch.testing.assert_close(ours[bias.replace("ah_", "an_")], sd[bias.replace("ah_", "an_")])  # template unchanged
    assert model.get_classifier().out_features == 10
    with torch.no_grad():
        assert model(torch.randn(1, 3, 288, 288)).shape == (1, 10)


def test_runtime_resolution_change():
    """A model built for 64² runs at other sizes; at its own size the interpolation is the identity."""
    for name in ("agent_pvt_tiny", "agent_cswin_tiny", "cswin_tiny"):
        model = small(name, num_classes=5).eval()
        with torch.no_grad():
            assert model(torch.randn(1, 3, 96, 80)).shape == (1, 5)
    model = small("agent_pvt_tiny").eval()
    assert model._pos_embed(0, (16, 16)) is model.pos_embed1
    big = model._pos_embed(0, (32, 32))
    assert big.shape == (1, 32 * 32, 16)
