"""One weight-decay rule for every model family and every task (agentlit.tasks.optim)."""
from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import timm
import torch
from torch import nn

import agentlit  # noqa: F401  (registers the models)
from agentlit.tasks import ClassificationModule, SegmentationModule
from agentlit.tasks.optim import create_optimizer, no_decay_names, param_groups

# Tiny members of each family; Swin/CSwin keep a baseline ("B") stage so both attention kinds appear.
FAMILIES = {
    "agent_deit_tiny": dict(img_size=32, patch_size=8, embed_dim=16, depth=2, num_heads=2, agent_num=4),
    "agent_pvt_tiny": dict(img_size=64, embed_dims=(8, 16, 24, 32), depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1),
                           agent_num=(4, 4, 4, 1)),
    "agent_swin_tiny": dict(img_size=64, depths=(1, 1, 1, 1), embed_dim=8, num_heads=(1, 1, 1, 1), window_size=2,
                            attn_type="AABB", agent_num=(4, 4, 4, 1)),
    "agent_cswin_tiny": dict(img_size=64, depths=(1, 1, 1, 1), embed_dim=8, num_heads=(1, 1, 1, 1),
                             split_size=(1, 2, 2, 2), attn_type="AABB", agent_num=(4, 4, 4, 1)),
}
AGENT_BIAS = re.compile(r"\.(an|na|ah|aw|ha|wa|ac|ca)_bias$")


def expected_no_decay(name: str, model: nn.Module) -> set[str]:
    """The rule written out by hand per family: 1-D parameters, biases, agent biases and the family's
    own position tables / tokens."""
    names = {n for n, p in model.named_parameters() if p.ndim <= 1 or n.endswith(".bias") or AGENT_BIAS.search(n)}
    if "deit" in name:
        names |= {"pos_embed", "cls_token"}
    elif "pvt" in name:
        names |= {f"pos_embed{i}" for i in range(1, 5)}
    elif "swin" in name and "cswin" not in name:  # timm's Swin blocks (the "B" stages) carry relative tables
        names |= {n for n, _ in model.named_parameters() if n.endswith("attn.relative_position_bias_table")}
    return names


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request):
    torch.manual_seed(0)
    return request.param, timm.create_model(request.param, num_classes=5, **FAMILIES[request.param])


def test_each_family_no_decay_set_is_agent_biases_position_tables_norms_and_biases(family):
    name, model = family
    expected = expected_no_decay(name, model)
    assert any(AGENT_BIAS.search(n) for n in expected), "the tiny model must contain agent layers"
    if "swin" in name and "cswin" not in name:
        assert any("relative_position_bias_table" in n for n in expected), "the tiny Swin must keep a baseline stage"
    assert no_decay_names(model) == expected
    # The model's own hook (read by timm's optimizer factory) lists exactly the multi-dimensional part.
    params = dict(model.named_parameters())
    nwd = {n for n in model.no_weight_decay() if n in params}
    assert nwd == {n for n in expected if params[n].ndim > 1}
    # timm's factory and ours split the parameters the same way.
    from timm.optim import param_groups_weight_decay

    timm_no_decay = {id(p) for g in param_groups_weight_decay(model, 0.05, no_weight_decay_list=model.no_weight_decay())
                     if g["weight_decay"] == 0.0 for p in g["params"]}
    decay, no_decay = param_groups(model, 0.05)
    assert {id(p) for p in no_decay["params"]} == timm_no_decay
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert len(decay["params"]) + len(no_decay["params"]) == len(params)


def test_segmentation_task_uses_the_same_rule_through_the_feature_wrapper():
    kw = dict(FAMILIES["agent_pvt_tiny"])
    task = SegmentationModule("agent_pvt_tiny", num_classes=3, backbone_kwargs=kw, head_channels=8, neck_channels=8)
    backbone = timm.create_model("agent_pvt_tiny", num_classes=0, **kw)
    names = {id(p): n for n, p in task.model.named_parameters()}
    decay, no_decay = task.param_groups()
    got = {names[id(p)] for p in no_decay["params"]}
    head = {n for n, p in task.model.named_parameters() if not n.startswith("backbone.") and (p.ndim <= 1)}
    # features_only drops the final norm / head: compare the backbone part on the names both have.
    inner = {n.removeprefix("backbone.model.") for n in got if n.startswith("backbone.model.")}
    kept = {n.removeprefix("backbone.model.") for n in names.values() if n.startswith("backbone.model.")}
    assert inner == expected_no_decay("agent_pvt_tiny", backbone) & kept
    assert got - {f"backbone.model.{n}" for n in inner} == head
    assert {names[id(p)] for p in decay["params"]} == set(names.values()) - got


def test_classification_task_optimizer_has_the_rule_and_lr():
    task = ClassificationModule("agent_deit_tiny", num_classes=5, model_kwargs=FAMILIES["agent_deit_tiny"] | {"img_size": 32},
                                weight_decay=0.05, lr=1e-3, warmup_epochs=0)
    task._trainer = SimpleNamespace(estimated_stepping_batches=10, max_epochs=1, world_size=1,
                                    accumulate_grad_batches=1, datamodule=None)
    opt = task.configure_optimizers()["optimizer"]
    names = {id(p): n for n, p in task.model.named_parameters()}
    zero = {names[id(p)] for g in opt.param_groups if g["weight_decay"] == 0.0 for p in g["params"]}
    assert zero == expected_no_decay("agent_deit_tiny", task.model)
    assert {g["weight_decay"] for g in opt.param_groups} == {0.0, 0.05}


def test_several_models_frozen_parameters_and_extra_patterns():
    a, b = nn.Linear(3, 4), nn.Sequential(nn.Conv2d(3, 4, 3), nn.LayerNorm(4))
    b[0].weight.requires_grad_(False)
    names = no_decay_names({"unet": a, "text": b}, no_decay_extra=["unet.weight"])
    assert names == {"unet.weight", "unet.bias", "text.0.bias", "text.1.weight", "text.1.bias"}
    decay, no_decay = param_groups({"unet": a, "text": b}, 0.1)
    assert [p.shape for p in decay["params"]] == [a.weight.shape]  # the frozen conv weight is in no group
    opt = create_optimizer(a, lr=0.1, weight_decay=0.1, no_decay_extra=["weig*"])
    assert isinstance(opt, torch.optim.AdamW) and opt.param_groups[0]["lr"] == 0.1
    assert opt.param_groups[0]["params"] == [] and len(opt.param_groups[1]["params"]) == 2


def test_extra_pattern_that_matches_nothing_is_an_error():
    with pytest.raises(ValueError, match=r"no_decay_extra \['\*\.gamma'\] match no trainable parameter"):
        param_groups(nn.Linear(2, 2), 0.1, no_decay_extra=["*.gamma"])
    with pytest.raises(TypeError, match="nn.Module or a mapping"):
        param_groups([nn.Linear(2, 2)], 0.1)


def test_ema_update_warms_up_then_uses_the_decay():
    from agentlit.tasks._ema import ema_update

    torch.manual_seed(0)
    model, ema = nn.BatchNorm1d(3), nn.BatchNorm1d(3)
    model.weight.data.normal_()
    model.running_mean.normal_()
    e0, p = ema.weight.detach().clone(), model.weight.detach().clone()
    ema_update(ema, model, step=0, max_decay=0.999)  # warm-up decay (1 + 0) / (10 + 0) = 0.1
    torch.testing.assert_close(ema.weight, 0.1 * e0 + 0.9 * p)
    assert torch.equal(ema.running_mean, model.running_mean)  # buffers copied, not averaged
    e1 = ema.weight.detach().clone()
    ema_update(ema, model, step=10**6, max_decay=0.999)  # warmed up: the configured decay
    torch.testing.assert_close(ema.weight, 0.999 * e1 + 0.001 * p)
