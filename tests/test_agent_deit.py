"""Agent-DeiT: timm registry, published sizes, official checkpoint layout, resolution changes."""
from __future__ import annotations

import pytest
import timm
import torch

import agentlit  # noqa: F401  (registers the models)
from agentlit.core import AgentAttention
from agentlit.models import create_model
from official_layout import official_layout, random_official_state_dict


@pytest.mark.parametrize(
    "name,paper_m", [("agent_deit_tiny", 6.0), ("agent_deit_small", 22.7), ("agent_deit_base", 87.2)]
)
def test_published_parameter_counts(name, paper_m):
    with torch.device("meta"):
        model = timm.create_model(name)
    n = sum(p.numel() for p in model.parameters()) / 1e6
    assert abs(n - paper_m) / paper_m < 0.01, (name, n)


@pytest.mark.parametrize("name", ["agent_deit_tiny", "agent_deit_small", "agent_deit_base"])
def test_keys_match_official(name):
    with torch.device("meta"):
        model = timm.create_model(name)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == official_layout(name)


def test_agent_layers_follow_the_paper():
    with torch.device("meta"):
        base = timm.create_model("agent_deit_base")
        tiny = timm.create_model("agent_deit_tiny")
    assert [isinstance(b.attn, AgentAttention) for b in base.blocks] == [True] * 4 + [False] * 8
    assert all(isinstance(b.attn, AgentAttention) for b in tiny.blocks)
    assert base.blocks[0].attn.agent_num == 81 and tiny.blocks[0].attn.agent_num == 49


def test_forward_backward_small_and_non_square():
    model = timm.create_model("agent_deit_tiny", img_size=(32, 48), patch_size=8, depth=2, agent_num=(2, 3), num_classes=7)
    x = torch.randn(2, 3, 32, 48)
    y = model(x)
    assert y.shape == (2, 7)
    y.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_dynamic_img_size_runs_agent_layers_at_the_input_map():
    model = timm.create_model("agent_deit_tiny", img_size=32, patch_size=8, depth=2, agent_num=4,
                              num_classes=5, dynamic_img_size=True).eval()
    assert model(torch.randn(1, 3, 48, 64)).shape == (1, 5)
    assert model.blocks[0].attn.feat_size == (6, 8)


def _save(tmp_path, sd, wrap=True):
    path = tmp_path / "official.pth"
    torch.save({"model": sd, "epoch": 299} if wrap else sd, path)
    return str(path)


def test_official_checkpoint_loads_strictly(tmp_path):
    """A file with exactly the release's keys and shapes (random values) loads strictly, every tensor intact."""
    sd = random_official_state_dict("agent_deit_tiny")
    assert {k: tuple(v.shape) for k, v in sd.items()} == official_layout("agent_deit_tiny")
    model = timm.create_model("agent_deit_tiny", pretrained=True, pretrained_cfg_overlay=dict(file=_save(tmp_path, sd)))
    loaded = model.state_dict()
    assert loaded.keys() == sd.keys()
    for k in sd:
        torch.testing.assert_close(loaded[k], sd[k], msg=k)


def test_official_checkpoint_finetunes_at_other_size_and_classes(tmp_path):
    sd = random_official_state_dict("agent_deit_tiny")
    path = _save(tmp_path, sd)
    model = timm.create_model(
        "agent_deit_tiny", pretrained=True, pretrained_cfg_overlay=dict(file=path),
        img_size=288, num_classes=10, agent_num=64,
    )
    grid = 288 // 16
    attn = model.blocks[0].attn
    assert model.pos_embed.shape == (1, 1 + grid * grid, 192)
    assert attn.ah_bias.shape == (1, 3, 64, grid, 1) and attn.ha_bias.shape == (1, 3, grid, 1, 64)
    assert attn.an_bias.shape == (3, 64, 7, 7)
    # untouched weights arrive unchanged; the class-token position embedding too
    torch.testing.assert_close(model.blocks[3].mlp.fc1.weight, sd["blocks.3.mlp.fc1.weight"])
    torch.testing.assert_close(model.pos_embed[:, :1], sd["pos_embed"][:, :1])
    assert model.head.weight.shape == (10, 192)
    assert model(torch.randn(1, 3, 288, 288)).shape == (1, 10)


def test_unknown_model_name_suggests_closest():
    with pytest.raises(ValueError, match=r"agent_deit_tiny"):
        create_model("agent_deit_tiyn")


def test_bad_sizes_are_named():
    with pytest.raises(ValueError, match=r"img_size=100 is not divisible by patch_size=16.*\[96, 112\]"):
        timm.create_model("agent_deit_tiny", img_size=100)
    with pytest.raises(ValueError, match=r"does not fit the 4x4 token grid"):
        timm.create_model("agent_deit_tiny", img_size=64)


def test_no_weight_decay_covers_agent_biases():
    with torch.device("meta"):
        model = timm.create_model("agent_deit_tiny")
    nwd = model.no_weight_decay()
    assert {"pos_embed", "cls_token", "blocks.0.attn.an_bias", "blocks.11.attn.ca_bias"} <= nwd
    assert "blocks.0.attn.dwc.weight" not in nwd
