"""Multiply-accumulate counting with ``torch.utils.flop_counter.FlopCounterMode``.

The counter only sees matrix products and convolutions (softmax, norms, pooling and bias
interpolation are free), which is the convention of the paper's "FLOPs" column: MACs = FLOPs / 2.
Fused SDPA kernels on the CPU are invisible to the counter, so the count runs under the math
backend, where attention decomposes into counted ``bmm``s.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["count_macs"]


@torch.no_grad()
def count_macs(model: nn.Module, *inputs: Any, **kwargs: Any) -> tuple[int, dict[str, int]]:
    """MACs of one ``model(*inputs, **kwargs)`` call.

    Returns:
        (total MACs, {module name: MACs}) where names are ``named_modules()`` names ("" is the
        whole model) and each entry includes its submodules.
    """
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    try:
        with sdpa_kernel(SDPBackend.MATH), counter:
            model(*inputs, **kwargs)
    finally:
        model.train(was_training)
    # FlopCounterMode names modules "<RootClass>.<path>"; map back to named_modules() names.
    root = type(model).__name__
    per_module: dict[str, int] = {}
    for name, ops in counter.get_flop_counts().items():
        if name == "Global":
            continue
        path = "" if name == root else name[len(root) + 1:] if name.startswith(root + ".") else name
        per_module[path] = sum(ops.values()) // 2
    return counter.get_total_flops() // 2, per_module
