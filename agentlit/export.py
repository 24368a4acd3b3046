"""``agentlit export``: a trained classifier as a plain timm weights file that reloads in one line.

The file holds the timm model's own state dict (no ``model.`` prefix, no optimizer) and, as
safetensors metadata (strings; JSON where structured):

- ``architecture``: the timm model name;
- ``model_kwargs``: the constructor arguments (``num_classes``, ``img_size``, ``model_kwargs`` …);
- ``pretrained_cfg``: the data config (``input_size``, ``mean``, ``std``, ``interpolation``,
  ``crop_pct``, ``num_classes``, ``label_names`` when the class names are known).

So either of these rebuilds the trained network (``import agentlit`` registers the agent models)::

    model = agentlit.load_exported("model.safetensors")

    meta = safetensors.safe_open("model.safetensors", "pt").metadata()
    model = timm.create_model(meta["architecture"], pretrained=True, **json.loads(meta["model_kwargs"]),
                              pretrained_cfg_overlay=dict(file="model.safetensors", **json.loads(meta["pretrained_cfg"])))

The ``pretrained_cfg`` overlay matters: without its ``num_classes`` timm drops a classifier whose
class count differs from the family's default (1000), and ``timm.data.resolve_data_config(model=model)``
reads mean/std/input size from it.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn

from .checkpoint import CheckpointError, check_fit, file_mode, load_checkpoint
from .utils.paths import ensure_writable_dir

__all__ = ["export_weights", "load_exported", "read_export_metadata"]

_DATA_KEYS = ("mean", "std", "interpolation", "crop_pct")


def _timm_settings(module: L.LightningModule) -> dict[str, Any]:
    """The ``timm.create_model`` settings the task built its network with: its flat settings, or the
    ``init_args`` of a ``net`` given as :class:`~agentlit.tasks.networks.TimmClassifier`."""
    from .tasks.networks import TimmClassifier

    hp = dict(getattr(module, "hparams", {}))
    net = hp.get("net")
    if net is None and not getattr(module, "_network_object", False):
        return hp
    path = f"{TimmClassifier.__module__}.{TimmClassifier.__qualname__}"
    if isinstance(net, Mapping) and net.get("class_path") == path:
        return {**dict(net.get("init_args") or {}), "num_classes": hp.get("num_classes")}
    raise CheckpointError(f"export writes a timm model that reloads by its registry name; this task's network was given "
                          f"as `net` ({net.get('class_path') if isinstance(net, Mapping) else 'an object'}): give it as "
                          f"{path} or by the flat model_name settings to export it")


def _constructor_kwargs(hp: dict[str, Any]) -> dict[str, Any]:
    """The ``timm.create_model`` arguments the network was built with (minus training-only ones:
    ``drop_path_rate`` is inert at inference)."""
    kwargs = dict(hp.get("model_kwargs") or {})
    kwargs["num_classes"] = int(hp["num_classes"])
    if hp.get("img_size") is not None:
        kwargs["img_size"] = hp["img_size"]
    return kwargs


def _data_config(net: nn.Module, kwargs: dict[str, Any], datamodule: Any, class_names: list[str] | None) -> dict[str, Any]:
    """timm ``pretrained_cfg`` fields describing the inputs the network was trained on."""
    base = dict(getattr(net, "pretrained_cfg", None) or {})
    cfg: dict[str, Any] = {k: base[k] for k in ("input_size", *_DATA_KEYS) if base.get(k) is not None}
    for key in _DATA_KEYS:  # the data the run actually used wins over the family's ImageNet defaults
        value = getattr(datamodule, key, None)
        if value is not None:
            cfg[key] = list(value) if isinstance(value, (tuple, list)) else value
    size = kwargs.get("img_size") or getattr(datamodule, "img_size", None)
    if size is not None:
        h, w = (size, size) if isinstance(size, int) else tuple(size)[-2:]
        cfg["input_size"] = [int(kwargs.get("in_chans", 3)), int(h), int(w)]
    cfg["num_classes"] = kwargs["num_classes"]
    if class_names:
        cfg["label_names"] = [str(n) for n in class_names]
    return {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}


def export_weights(
    module: L.LightningModule,
    ckpt_path: str,
    output: str | Path,
    use_ema: bool = True,
    datamodule: L.LightningDataModule | None = None,
    checkpoint: Mapping[str, Any] | None = None,
) -> Path:
    """Load ``ckpt_path`` into ``module`` and write its network (EMA copy if kept) to ``output``.

    Args:
        module: the classification task built from the run's config.
        ckpt_path: the Lightning checkpoint to export (loaded as data only).
        output: the ``.safetensors`` file to write (atomically; mode follows the umask).
        use_ema: export the EMA weights when the run kept them.
        datamodule: the run's data, for mean/std/interpolation (None: the model family's defaults).
        checkpoint: the checkpoint's contents when the caller has read them already (``agentlit export``
            hands over what it read once for ``--ckpt_path``); None: ``ckpt_path`` is read here.

    Returns:
        The written path.
    """
    from safetensors.torch import save_file

    net = getattr(module, "model", None)
    if not isinstance(net, torch.nn.Module) or not hasattr(net, "pretrained_cfg"):
        raise ValueError(
            f"export writes a timm classifier; {type(module).__name__} has no timm `model` to export "
            "(use agentlit.tasks.ClassificationModule checkpoints)"
        )
    ckpt = load_checkpoint(ckpt_path, what="--ckpt_path") if checkpoint is None else checkpoint
    if not isinstance(ckpt, Mapping):
        raise CheckpointError(f"--ckpt_path {ckpt_path} holds a {type(ckpt).__name__}, not a Lightning checkpoint")
    state = ckpt.get("state_dict", ckpt)
    check_fit(module.state_dict(), state, f"checkpoint {ckpt_path} does not fit the configured model")
    module.load_state_dict(state)
    ema = getattr(module, "ema", None)
    if use_ema and ema is not None:
        net = ema
    output = Path(output)
    ensure_writable_dir(output.parent if str(output.parent) else Path("."), "--output folder")
    weights = {k: v.detach().contiguous().cpu() for k, v in net.state_dict().items()}
    hp = _timm_settings(module)
    kwargs = _constructor_kwargs(hp)
    names = ckpt.get("class_names") or getattr(module, "class_names", None) or getattr(datamodule, "class_names", None)
    names = list(names) if names and len(names) == kwargs["num_classes"] else None
    data_cfg = _data_config(net, kwargs, datamodule, names)
    metadata = {
        "format": "pt", "architecture": str(hp.get("model_name", type(net).__name__)),
        "model_kwargs": json.dumps(kwargs), "pretrained_cfg": json.dumps(data_cfg),
        "source_checkpoint": os.path.basename(str(ckpt_path)), "ema": str(bool(use_ema and ema is not None)),
    }
    partial = output.with_name(output.name + ".partial")
    save_file(weights, str(partial), metadata=metadata)
    os.chmod(partial, file_mode())  # like any file the user writes (the writer may create it owner-only)
    partial.replace(output)  # atomic: an interrupted export never leaves a half-written file behind
    print(f"wrote {output} ({len(weights)} tensors, {metadata['architecture']}, ema={metadata['ema']})")
    return output


def read_export_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The metadata of an exported file: ``architecture``, ``model_kwargs`` and ``pretrained_cfg`` (decoded).

    Args:
        path: a file written by ``agentlit export``.
    """
    from safetensors import safe_open

    from .checkpoint import check_checkpoint_file

    check_checkpoint_file(path, what="exported file")
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
    if "architecture" not in meta or "model_kwargs" not in meta:
        raise ValueError(
            f"{path} has no agentlit export metadata (architecture, model_kwargs); load it with "
            "timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=...)) and the model's arguments"
        )
    out: dict[str, Any] = dict(meta)
    out["model_kwargs"] = json.loads(meta["model_kwargs"])
    out["pretrained_cfg"] = json.loads(meta.get("pretrained_cfg") or "{}")
    return out


def load_exported(path: str | os.PathLike[str], **kwargs: Any) -> nn.Module:
    """Rebuild an exported network with timm and load its weights, in eval mode.

    Args:
        path: a ``.safetensors`` file written by ``agentlit export``.
        **kwargs: extra ``timm.create_model`` arguments, overriding the stored ones (e.g. ``img_size`` for another resolution).

    Returns:
        The timm model; ``model.pretrained_cfg`` carries mean/std/input size/class names.
    """
    import timm

    import agentlit.models  # noqa: F401  (registers the agent models)

    meta = read_export_metadata(path)
    # JSON gives lists; timm's configs hold tuples (input_size, mean, std, label_names)
    overlay = {k: tuple(v) if isinstance(v, list) else v for k, v in meta["pretrained_cfg"].items()}
    overlay["file"] = str(path)
    model = timm.create_model(
        meta["architecture"], pretrained=True, pretrained_cfg_overlay=overlay, **{**meta["model_kwargs"], **kwargs}
    )
    return model.eval()
