"""Shared pieces of the model zoo: weight loading (through :mod:`agentlit.checkpoint`), agent-bias adaptation, name lookup."""
from __future__ import annotations

import difflib
from typing import Any

import timm
from torch import Tensor, nn

from ..checkpoint import load_fitting, load_state_dict_file, state_dict_mismatch, unwrap_checkpoint
from ..core import AgentPositionBias, adapt_agent_bias
from ..core.bias import AGENT_BIAS_AXES

__all__ = ["adapt_agent_biases", "create_model", "pretrained_cfg", "load_weights", "state_dict_mismatch", "unwrap_checkpoint"]


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
    base = model_name.split(".", 1)[0]
    if not timm.is_model(base) and not model_name.startswith(("hf-hub:", "hf_hub:", "local-dir:")):
        close = difflib.get_close_matches(base, timm.list_models(), n=5, cutoff=0.5)
        ours = timm.list_models("agent_*")
        raise ValueError(
            f"unknown model name {model_name!r}; closest registered names: {close or 'none'}. "
            f"agentlit models: {ours}"
        )
    return timm.create_model(model_name, **kwargs)


def load_weights(model: nn.Module, path: str, use_ema: bool = False) -> nn.Module:
    """Load a weights file into a timm ``model`` through its family's ``checkpoint_filter_fn``
    (official layouts, other resolutions), keeping the model's own classifier when the class
    count differs. Anything else that does not fit is an error naming the keys — never a silent
    partial load.

    Args:
        model: a timm model of one of our families (or any timm model).
        path: the weights file (see :func:`agentlit.checkpoint.load_state_dict_file`).
        use_ema: load the EMA weights when the file has them.
    """
    import sys

    state = load_state_dict_file(path, use_ema=use_ema)
    filter_fn = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if filter_fn is not None:
        state = filter_fn(state, model)
    expected = model.state_dict()
    classifier = (getattr(model, "pretrained_cfg", None) or {}).get("classifier")
    heads = (classifier,) if isinstance(classifier, str) else tuple(classifier or ())
    for head in heads:
        for key in (f"{head}.weight", f"{head}.bias"):
            if key in state and key in expected and state[key].shape != expected[key].shape:
                del state[key]  # another class count: fine-tuning keeps the fresh head
    return load_fitting(model, state, f"checkpoint {path} does not fit {type(model).__name__}", fresh=heads)


def pretrained_cfg(first_conv: str, **kwargs: Any) -> dict[str, Any]:
    """A timm ``pretrained_cfg`` for an agent family at 224² / ImageNet-1K. No URL: the official
    weights are published outside the hub, so they come as ``pretrained_cfg_overlay=dict(file=…)``."""
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    return {
        "url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7), "crop_pct": 0.9,
        "interpolation": "bicubic", "fixed_input_size": False, "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD, "first_conv": first_conv, "classifier": "head", "license": "mit",
        "paper_ids": "arXiv:2312.08874", **kwargs,
    }
