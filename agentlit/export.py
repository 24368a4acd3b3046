"""``agentlit export``: a trained classifier as a plain timm weights file.

The file holds the timm model's own state dict (no ``model.`` prefix, no optimizer), plus the
model name and arguments as safetensors metadata, so that

    timm.create_model(name, pretrained=True, num_classes=C, img_size=S, …,
                      pretrained_cfg_overlay=dict(file="model.safetensors", num_classes=C))

loads it with nothing from agentlit but ``import agentlit`` (which registers the agent models).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import lightning as L
import torch

from .models import state_dict_mismatch
from .utils.paths import ensure_writable_dir

__all__ = ["export_weights"]


def export_weights(module: L.LightningModule, ckpt_path: str, output: str | Path, use_ema: bool = True) -> Path:
    """Load ``ckpt_path`` into ``module`` and write its network (EMA copy if kept) to ``output``."""
    from safetensors.torch import save_file

    net = getattr(module, "model", None)
    if not isinstance(net, torch.nn.Module) or not hasattr(net, "pretrained_cfg"):
        raise ValueError(
            f"export writes a timm classifier; {type(module).__name__} has no timm `model` to export "
            "(use agentlit.tasks.ClassificationModule checkpoints)"
        )
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    state = ckpt.get("state_dict", ckpt)
    expected = module.state_dict()
    if state.keys() != expected.keys() or any(state[k].shape != expected[k].shape for k in expected):
        raise ValueError(f"checkpoint {ckpt_path} does not fit the configured model: {state_dict_mismatch(expected, state)}")
    module.load_state_dict(state)
    ema = getattr(module, "ema", None)
    if use_ema and ema is not None:
        net = ema
    output = Path(output)
    ensure_writable_dir(output.parent if str(output.parent) else Path("."), "--output folder")
    weights = {k: v.detach().contiguous().cpu() for k, v in net.state_dict().items()}
    hp = dict(getattr(module, "hparams", {}))
    metadata = {"format": "pt", "architecture": str(hp.get("model_name", type(net).__name__)),
                "num_classes": str(hp.get("num_classes", "")), "img_size": json.dumps(hp.get("img_size")),
                "model_kwargs": json.dumps(hp.get("model_kwargs") or {}), "source_checkpoint": os.path.basename(ckpt_path),
                "ema": str(bool(use_ema and ema is not None))}
    partial = output.with_name(output.name + ".partial")
    save_file(weights, str(partial), metadata=metadata)
    partial.replace(output)  # atomic: an interrupted export never leaves a half-written file behind
    print(f"wrote {output} ({len(weights)} tensors, {metadata['architecture']}, ema={metadata['ema']})")
    return output
