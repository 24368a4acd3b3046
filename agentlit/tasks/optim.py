"""The optimiser every task builds: AdamW over two parameter groups, decayed and not decayed.

One rule for all tasks (classification, segmentation and any task to come), whatever the module
tree (a timm classifier, a ``features_only`` backbone under a decode head, a UNet beside a text
encoder): a trainable parameter is *not* decayed when

- it is one-dimensional or a bias (timm's ``param_groups_weight_decay`` rule: norms, biases), or
- a sub-module's ``no_weight_decay()`` names it (timm's hook; agentlit's families fill it with
  :func:`agentlit.models.no_weight_decay_names`), or
- :func:`~agentlit.models.no_weight_decay_names` of the whole tree names it (agent biases
  by module type, position embeddings / tables and class tokens by name), which also covers
  wrappers that hide the model's own ``no_weight_decay()`` (timm's feature extractors), or
- it matches a pattern of ``no_decay_extra`` (``fnmatch`` wildcards, as in timm).
"""
from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from ..models import no_weight_decay_names

__all__ = ["create_optimizer", "no_decay_names", "param_groups"]


def _roots(modules: nn.Module | Mapping[str, nn.Module]) -> list[tuple[str, nn.Module]]:
    if isinstance(modules, nn.Module):
        return [("", modules)]
    if isinstance(modules, Mapping) and all(isinstance(m, nn.Module) for m in modules.values()):
        return [(str(k), m) for k, m in modules.items()]
    raise TypeError(f"expected an nn.Module or a mapping name -> nn.Module, got {type(modules).__name__}")


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def no_decay_names(modules: nn.Module | Mapping[str, nn.Module], no_decay_extra: Iterable[str] = ()) -> set[str]:
    """Names (as :func:`param_groups` prefixes them) of the trainable parameters kept out of weight decay.

    Args:
        modules: one module, or a mapping name -> module (names become prefixes: ``"unet.conv_in.bias"``).
        no_decay_extra: further parameter names or ``fnmatch`` patterns never decayed (e.g. ``"*.gamma"``).
    """
    extra = tuple(no_decay_extra)
    listed: set[str] = set()
    params: dict[str, torch.Tensor] = {}
    for prefix, root in _roots(modules):
        for mod_name, mod in root.named_modules():
            hook = getattr(mod, "no_weight_decay", None)
            if callable(hook):
                listed |= {_join(prefix, mod_name, n) for n in hook()}
        listed |= {_join(prefix, n) for n in no_weight_decay_names(root)}
        params.update((_join(prefix, n), p) for n, p in root.named_parameters() if p.requires_grad)
    unmatched = [pat for pat in extra if not any(fnmatch.fnmatchcase(n, pat) for n in params)]
    if unmatched:
        sample = ", ".join(list(params)[:5])
        raise ValueError(
            f"no_decay_extra {unmatched} match no trainable parameter; give full names or fnmatch patterns "
            f"such as '*.gamma' (parameter names look like: {sample}, …)"
        )
    return {
        n for n, p in params.items()
        if p.ndim <= 1 or n.endswith(".bias") or n in listed or any(fnmatch.fnmatchcase(n, pat) for pat in extra)
    }


def param_groups(
    modules: nn.Module | Mapping[str, nn.Module],
    weight_decay: float,
    no_decay_extra: Iterable[str] = (),
    decay_all: bool = False,
) -> list[dict[str, Any]]:
    """Two optimiser groups, ``[decayed, not decayed]`` (both always present, possibly empty).

    Args:
        modules: one module, or a mapping name -> module whose parameters are all optimised.
        weight_decay: decay of the first group (the second has 0).
        no_decay_extra: further parameter names or ``fnmatch`` patterns never decayed.
        decay_all: decay every trainable parameter (recipes that do, e.g. Agent-PVT's detection recipe);
            ``no_decay_extra`` must then be empty.
    """
    if decay_all and tuple(no_decay_extra):
        raise ValueError(f"decay_all decays every parameter; no_decay_extra {list(no_decay_extra)} contradicts it")
    skip = set() if decay_all else no_decay_names(modules, no_decay_extra)
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    seen: set[int] = set()
    for prefix, root in _roots(modules):
        for name, p in root.named_parameters():
            if not p.requires_grad or id(p) in seen:  # frozen, or shared between roots
                continue
            seen.add(id(p))
            (no_decay if _join(prefix, name) in skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def create_optimizer(
    modules: nn.Module | Mapping[str, nn.Module],
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.999),
    no_decay_extra: Iterable[str] = (),
    decay_all: bool = False,
) -> torch.optim.Optimizer:
    """AdamW over :func:`param_groups` (the optimiser of every agentlit recipe).

    Args:
        modules: one module, or a mapping name -> module whose parameters are all optimised.
        lr: learning rate (the schedule multiplies it).
        weight_decay: decoupled weight decay of the decayed group.
        betas: AdamW's moment coefficients.
        no_decay_extra: further parameter names or ``fnmatch`` patterns never decayed.
        decay_all: decay every trainable parameter (see :func:`param_groups`).
    """
    groups = param_groups(modules, weight_decay, no_decay_extra, decay_all)
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas))
