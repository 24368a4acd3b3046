"""Shared pieces of the model zoo: checkpoint unwrapping, agent-bias adaptation, name lookup."""
from __future__ import annotations

import difflib
from typing import Any

import timm
from torch import Tensor, nn

from ..core import AgentPositionBias, adapt_agent_bias
from ..core.bias import AGENT_BIAS_AXES

__all__ = ["unwrap_checkpoint", "adapt_agent_biases", "create_model"]


def unwrap_checkpoint(checkpoint: dict[str, Any], use_ema: bool = False) -> dict[str, Tensor]:
    """The weights inside a training checkpoint: official ``{'model': …, 'state_dict_ema': …}``,
    Lightning ``{'state_dict': {'model.…': …}}`` or a bare state dict."""
    if use_ema and "state_dict_ema" in checkpoint:
        return checkpoint["state_dict_ema"]
    for key in ("model", "state_dict", "module"):
        if key in checkpoint and isinstance(checkpoint[key], dict):
            checkpoint = checkpoint[key]
            break
    if any(k.startswith("model.") for k in checkpoint):  # a LightningModule's "model." prefix
        checkpoint = {k[len("model."):]: v for k, v in checkpoint.items() if k.startswith("model.")}
    return checkpoint


def adapt_agent_biases(state_dict: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """Resize every agent bias in ``state_dict`` to the shape the matching layer of ``model`` has
    (other map size and/or other agent grid); other entries pass through."""
    modules = dict(model.named_modules())
    out = dict(state_dict)
    for key, value in state_dict.items():
        prefix, _, name = key.rpartition(".")
        layer = modules.get(prefix)
        if name not in AGENT_BIAS_AXES or not isinstance(layer, AgentPositionBias):
            continue
        target = getattr(layer, name, None)
        if target is None or target.shape == value.shape:
            continue
        h, w = layer.ah_bias.shape[3], layer.aw_bias.shape[4]
        out[key] = adapt_agent_bias(key, value, agent_grid=layer.agent_grid, feat_size=(h, w))
    return out


def create_model(model_name: str, **kwargs: Any) -> nn.Module:
    """``timm.create_model`` with a helpful error for unknown names (closest registered names)."""
    import agentlit.models  # noqa: F401  (registers our models)

    base = model_name.split(".", 1)[0]
    if not timm.is_model(base) and not model_name.startswith(("hf-hub:", "hf_hub:", "local-dir:")):
        close = difflib.get_close_matches(base, timm.list_models(), n=5, cutoff=0.5)
        ours = timm.list_models("agent_*")
        raise ValueError(
            f"unknown model name {model_name!r}; closest registered names: {close or 'none'}. "
            f"agentlit models: {ours}"
        )
    return timm.create_model(model_name, **kwargs)
