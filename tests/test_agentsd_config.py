"""AgentSD settings: one AgentSDConfig, validated in one place, held by the patch state."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from agentlit.diffusion import AgentSDConfig, apply_patch, get_state, remove_patch


class _Wrap(torch.nn.Module):
    """A UNet-like container around one diffusers transformer block."""

    def __init__(self) -> None:
        super().__init__()
        from diffusers.models.attention import BasicTransformerBlock

        self.block = BasicTransformerBlock(16, 2, 8, cross_attention_dim=8)

    def forward(self, sample, timestep):
        return self.block(sample)


def test_config_object_kwargs_and_mapping_give_the_same_state():
    unet = _Wrap()
    cfg = AgentSDConfig(ratio=0.3, agent_steps=5)
    assert get_state(apply_patch(unet, cfg)).config is cfg  # the object itself, not a copy read back by keys
    assert get_state(apply_patch(unet, ratio=0.3, agent_steps=5)).config == cfg
    assert get_state(apply_patch(unet, {"ratio": 0.3, "agent_steps": 5})).config == cfg
    on_top = get_state(apply_patch(unet, cfg, agent_steps=7)).config
    assert on_top == dataclasses.replace(cfg, agent_steps=7) and cfg.agent_steps == 5
    assert get_state(apply_patch(unet)).config == AgentSDConfig()
    assert get_state(apply_patch(unet, 0.3, agent_steps=5)).config == cfg  # tomesd's positional ratio
    state = get_state(unet)
    state.step = 0
    assert state.phase() == (4, 4, 0.95)
    state.step = 20
    assert state.phase() == (2, 2, 0.5)
    remove_patch(unet)
    assert get_state(unet) is None


@pytest.mark.parametrize("bad,match", [
    (dict(ratio=1.5), r"ratio must be in \[0, 1\], got 1.5"),
    (dict(late_agent_ratio=-0.1), r"late_agent_ratio must be in \[0, 1\]"),
    (dict(sx=0), r"sx must be an integer >= 1, got 0"),
    (dict(late_sy=1.5), r"late_sy must be an integer >= 1"),
    (dict(agent_steps=-1), r"agent_steps must be >= 0"),
    (dict(attn_precision="bf16"), r"attn_precision must be None or 'fp32'"),
])
def test_every_way_in_is_validated_by_the_config(bad, match):
    with pytest.raises(ValueError, match=match):
        AgentSDConfig(**bad)
    with pytest.raises(ValueError, match=match):
        apply_patch(_Wrap(), **bad)
    with pytest.raises(ValueError, match=match):
        apply_patch(_Wrap(), config=AgentSDConfig(), **bad)
    with pytest.raises(ValueError, match=match):
        AgentSDConfig.build(bad)


def test_unknown_setting_names_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown AgentSD setting\(s\) \['ratoi'\]; valid: \['agent_ratio'"):
        apply_patch(_Wrap(), ratoi=0.5)
    with pytest.raises(ValueError, match=r"\['merge'\]"):
        apply_patch(_Wrap(), {"merge": 1})
    with pytest.raises(TypeError, match="AgentSDConfig or a mapping"):
        AgentSDConfig.build(0.5)
    with pytest.raises(ValueError, match="pass the settings once"):
        apply_patch(_Wrap(), AgentSDConfig(), config=AgentSDConfig())
