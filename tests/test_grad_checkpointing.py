"""Gradient checkpointing (timm's ``set_grad_checkpointing``) in every family agentlit registers, on the
classifier and on the feature-extraction path the dense tasks train, and the tasks' ``grad_checkpointing``.

Checkpointing may change memory and time only: with it on, a training step gives the same outputs and
the same gradient for every parameter (dropout and drop path included: the recomputation replays the
random draws), every block runs twice (forward, then again in backward), and the step's peak of live
tensor bytes is lower.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
import timm
import torch
from timm.models.swin_transformer import SwinTransformerBlock
from timm.models.vision_transformer import Block as ViTBlock
from torch import Tensor, nn

import agentlit  # noqa: F401  (registers the models)
from agentlit.errors import UserError
from agentlit.models.agent_cswin import CSwinBlock
from agentlit.models.agent_pvt import AgentPVT, PVTBlock
from agentlit.models.agent_swin import AgentSwinBlock
from agentlit.models.segmentation import build_backbone
from agentlit.tasks.detection import DetectionModule
from agentlit.tasks.segmentation import SegmentationModule
from agentlit.utils.memory import peak_memory

#: the units each family checkpoints (Agent-Swin: our agent blocks and timm's window blocks)
BLOCKS = (ViTBlock, PVTBlock, AgentSwinBlock, SwinTransformerBlock, CSwinBlock)
#: every family we register, reduced to two blocks per stage at 64² (maps 16/8/4/2; DeiT: 8×8 patches)
FAMILIES = {
    "agent_deit_tiny": dict(patch_size=8, embed_dim=48, depth=4, num_heads=2, agent_num=9),
    "agent_pvt_tiny": dict(embed_dims=(16, 32, 48, 64), num_heads=(1, 1, 2, 2), depths=(2, 2, 2, 2),
                           mlp_ratios=(2, 2, 2, 2), agent_num=(9, 16, 16, 4)),
    "pvt_v1_tiny": dict(embed_dims=(16, 32, 48, 64), num_heads=(1, 1, 2, 2), depths=(2, 2, 2, 2),
                        mlp_ratios=(2, 2, 2, 2)),
    "agent_swin_tiny": dict(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), window_size=2,
                            agent_num=(9, 9, 4, 1)),  # "AAAB": agent blocks in stages 1-3, Swin windows in 4
    "agent_cswin_tiny": dict(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(2, 2, 4, 4), agent_num=(9, 16, 4, 1)),
    "cswin_tiny": dict(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(2, 2, 4, 4)),
}
DROP = dict(drop_path_rate=0.2, proj_drop_rate=0.1, attn_drop_rate=0.1)  # random draws the recomputation must replay


def _classifier(name: str, img_size: int = 64, **kw) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, img_size=img_size, num_classes=5, **FAMILIES[name], **kw).train()


@contextmanager
def _block_calls(model: nn.Module) -> Iterator[list[int]]:
    """Counts forward calls of every checkpointing unit of ``model`` (wrapped on the instances:
    the recomputation in backward skips module hooks)."""
    blocks = [m for m in model.modules() if isinstance(m, BLOCKS)]
    assert blocks, f"{type(model).__name__} has none of {[b.__name__ for b in BLOCKS]}"
    calls = [0] * len(blocks)
    for i, blk in enumerate(blocks):
        def counted(*args, _i=i, _forward=blk.forward, **kwargs):
            calls[_i] += 1
            return _forward(*args, **kwargs)

        blk.forward = counted
    try:
        yield calls
    finally:
        for blk in blocks:
            del blk.forward


def _loss(out: Tensor | list[Tensor] | tuple[Tensor, ...]) -> Tensor:
    """A loss whose gradient differs per element (a plain sum would make many gradients equal)."""
    outs = out if isinstance(out, (list, tuple)) else [out]
    return sum((o * torch.linspace(-1, 2, o.numel()).reshape(o.shape)).square().mean() for o in outs)


Step = tuple[list[Tensor], dict[str, Tensor], list[int]]


def _step(model: nn.Module, forward: Callable[[], Tensor | list[Tensor]]) -> Step:
    """One training forward (``forward()``) + backward of ``model`` from a fixed random state:
    (outputs, every gradient, calls per block)."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    with _block_calls(model) as calls:
        out = forward()
        _loss(out).backward()
    outs = [o.detach() for o in (out if isinstance(out, (list, tuple)) else [out])]
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return outs, grads, calls


def _assert_same_steps(plain: Step, ckpt: Step, model: nn.Module) -> None:
    """A step without and with checkpointing (see :func:`_step`): equal outputs and gradients, a gradient
    for every parameter of ``model``, every block run once, then twice."""
    (plain_out, plain_grads, plain_calls), (ckpt_out, ckpt_grads, ckpt_calls) = plain, ckpt
    assert set(plain_calls) == {1} and set(ckpt_calls) == {2}, (plain_calls, ckpt_calls)
    assert len(plain_grads) == len(list(model.parameters())), "some parameters got no gradient"
    assert plain_grads.keys() == ckpt_grads.keys()
    for a, b in zip(ckpt_out, plain_out, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    for key in plain_grads:
        torch.testing.assert_close(ckpt_grads[key], plain_grads[key], rtol=0, atol=1e-6, msg=key)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_classifier_trains_the_same_with_checkpointing(name):
    model = _classifier(name, **DROP)
    x = torch.randn(2, 3, 64, 64)
    plain = _step(model, lambda: model(x))
    model.set_grad_checkpointing(True)
    _assert_same_steps(plain, _step(model, lambda: model(x)), model)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_feature_extractor_trains_the_same_with_checkpointing(name):
    """The dense tasks' path: ``features_only`` (timm's getter over ``forward_intermediates``)."""
    torch.manual_seed(0)
    kw = {**FAMILIES[name], **DROP, "img_size": 64}
    if name == "agent_deit_tiny":
        kw["out_indices"] = (1, 2, 3)  # the blocks the simple pyramid reads
    plain = build_backbone(name, **kw).train()
    ckpt = build_backbone(name, grad_checkpointing=True, **kw).train()
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 64, 64)
    plain_step = _step(plain, lambda: plain(x))
    assert len(plain_step[0]) == len(plain.feature_info.channels())
    _assert_same_steps(plain_step, _step(ckpt, lambda: ckpt(x)), plain)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_checkpointing_lowers_the_peak_memory_of_a_training_step(name):
    model = _classifier(name, img_size=96)
    x = torch.randn(4, 3, 96, 96)

    def step() -> None:
        model.zero_grad(set_to_none=True)
        _loss(model(x)).backward()

    step()  # gradients exist in both measurements: only the activations differ
    model.set_grad_checkpointing(False)
    plain = peak_memory(step)
    model.set_grad_checkpointing(True)
    ckpt = peak_memory(step)
    assert ckpt < 0.9 * plain, f"{name}: peak {ckpt / 2**20:.2f} MiB with checkpointing, {plain / 2**20:.2f} MiB without"


def test_inference_is_unchanged_and_runs_each_block_once():
    model = _classifier("agent_pvt_tiny")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        plain = model.eval()(x)
        model.set_grad_checkpointing(True)
        with _block_calls(model) as calls:
            ckpt = model(x)
    assert set(calls) == {1}
    torch.testing.assert_close(ckpt, plain, rtol=0, atol=0)


def test_segmentation_setting_checkpoints_the_backbone_with_the_same_loss_and_less_memory():
    kw = dict(num_classes=4, backbone_kwargs=dict(img_size=64, **FAMILIES["agent_pvt_tiny"], **DROP),
              head_channels=16, neck_channels=16)
    torch.manual_seed(0)
    plain = SegmentationModule("agent_pvt_tiny", **kw).train()
    torch.manual_seed(0)
    ckpt = SegmentationModule("agent_pvt_tiny", grad_checkpointing=True, **kw).train()
    assert ckpt.model.backbone.model.grad_checkpointing and not plain.model.backbone.model.grad_checkpointing
    batch = ckpt.example_batch(4, (64, 64))
    steps = [_step(m, lambda m=m: m.training_loss(batch)) for m in (plain, ckpt)]
    _assert_same_steps(*steps, plain)
    memory = [peak_memory(lambda m=m: _step(m, lambda: m.training_loss(batch))) for m in (plain, ckpt)]
    assert memory[1] < 0.9 * memory[0], memory


def test_detection_setting_checkpoints_the_backbone_with_the_same_losses():
    kw = dict(num_classes=3, detector="faster_rcnn", fpn_channels=16, representation_size=32, min_size=64,
              max_size=64, anchor_sizes=[8, 16, 32, 64, 128],
              backbone_kwargs=dict(img_size=64, **FAMILIES["agent_swin_tiny"], **DROP))
    torch.manual_seed(0)
    plain = DetectionModule("agent_swin_tiny", **kw).train()
    torch.manual_seed(0)
    ckpt = DetectionModule("agent_swin_tiny", grad_checkpointing=True, **kw).train()
    assert all(stage.grad_checkpointing for stage in ckpt.model.backbone.body.model.layers)
    assert not any(stage.grad_checkpointing for stage in plain.model.backbone.body.model.layers)
    batch = ckpt.example_batch(2, (64, 64))
    steps = [_step(m, lambda m=m: m.training_loss(batch)) for m in (plain, ckpt)]
    _assert_same_steps(*steps, plain)


def test_backbone_without_checkpointing_is_a_clear_error(monkeypatch):
    monkeypatch.delattr(AgentPVT, "set_grad_checkpointing")
    with pytest.raises(UserError, match=r"backbone 'agent_pvt_tiny' \(AgentPVT\) has no set_grad_checkpointing"):
        build_backbone("agent_pvt_tiny", grad_checkpointing=True, img_size=64, **FAMILIES["agent_pvt_tiny"])


def test_full_size_dense_configs_turn_it_on_and_quickstarts_stay_off():
    """The ADE20K / COCO recipes train at 512² / 800×1333 where activations dominate the memory; the
    quickstarts must stay fast on a CPU."""
    import yaml

    from cli_helpers import ROOT

    for kind in ("segmentation", "detection"):
        for path in sorted((ROOT / "configs" / kind).glob("*.yaml")):
            init = yaml.safe_load(path.read_text())["model"]["init_args"]
            assert init.get("grad_checkpointing", False) is (path.stem != "quickstart"), path.name
