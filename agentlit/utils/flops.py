"""Multiply-accumulate counting with ``torch.utils.flop_counter.FlopCounterMode``.

The counter only sees matrix products and convolutions (softmax, norms and pooling are free, pooling
written as a product with an averaging matrix included), and
leaves out those computed from parameters and buffers alone (the agent bias templates resized to
the map, position embeddings): that work is the same for every input of a size and an inference
graph folds it away; what involves the inputs or random draws (sampling noise) counts. That is the
convention of the paper's "FLOPs" column: MACs = FLOPs / 2. Fused SDPA kernels on the CPU are
invisible to torch's counter, so the count runs under the math backend, where attention decomposes
into counted ``bmm``s; the CPU flash kernel that the fused agent op calls directly is counted by
SDPA's formula.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

__all__ = ["count_macs", "mac_breakdown"]

_CONSTANT = "_agentlit_constant"  # marks parameters, buffers and what is computed from them alone
#: marks an averaging matrix: a product with it is pooling written as a matmul, which the convention
#: leaves out as it leaves out pooling (agentlit.core.functional pools agents this way)
POOLING = "_agentlit_pooling"


class _VariableFlopCounter(FlopCounterMode):
    """FlopCounterMode that leaves out ops computed from constants alone: parameters, buffers, new
    tensors that are not random draws, and results of such ops (marked as constants in turn).
    Every op passes through ``_count_flops`` (decomposed ones as their parts)."""

    def __init__(self, **kwargs: Any) -> None:
        # the CPU flash kernel (agentlit.core.fused calls it for the aggregation step) has no formula in torch,
        # nor do the in-place products (the fused op accumulates the broadcast step into the local term)
        aten = torch.ops.aten
        extra = {aten._scaled_dot_product_flash_attention_for_cpu: _flash_cpu_flop,
                 aten.baddbmm_: _accumulating_product_flop, aten.addmm_: _accumulating_product_flop}
        super().__init__(custom_mapping={**extra, **kwargs.pop("custom_mapping", {})}, **kwargs)

    def _count_flops(self, func_packet, out, args, kwargs):
        operands = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if any(getattr(t, POOLING, False) for t in operands):
            if func_packet not in self.flop_registry:  # a view / expand of the matrix: still one
                for t in tree_leaves(out):
                    if isinstance(t, torch.Tensor):
                        setattr(t, POOLING, True)
            return out  # the product itself: pooling, not counted
        random = any(torch.Tag.nondeterministic_seeded in op.tags for op in _overloads(func_packet))
        if not random and all(getattr(t, _CONSTANT, False) for t in operands):
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    setattr(t, _CONSTANT, True)
            return out
        for t in tree_leaves(out):  # e.g. a buffer overwritten in place with data from the input
            # (also the base of a view written through, such as an empty buffer filled by out= ops)
            for alias in (t, getattr(t, "_base", None)) if isinstance(t, torch.Tensor) else ():
                if alias is not None and getattr(alias, _CONSTANT, False):
                    delattr(alias, _CONSTANT)
        return super()._count_flops(func_packet, out, args, kwargs)


def _flash_cpu_flop(query_shape, key_shape, value_shape, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    """FLOPs of ``softmax(Q Kᵀ) V``: q (B, H, L, d), k (B, H, S, d), v (B, H, S, dv)."""
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _accumulating_product_flop(self_shape, a_shape, b_shape, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    """FLOPs of ``self += a @ b`` (``addmm_``: (m, k) @ (k, n); ``baddbmm_``: batched), as torch counts them
    for the out-of-place ``addmm`` / ``baddbmm``: the product's, the addition being free."""
    *batch, m, k = a_shape
    n = b_shape[-1]
    flops = 2 * m * k * n
    for size in batch:
        flops *= size
    return flops


def _overloads(packet) -> list:
    return [getattr(packet, name) for name in packet.overloads()]


@torch.no_grad()
def count_macs(model: nn.Module, *inputs: Any, **kwargs: Any) -> tuple[int, dict[str, int]]:
    """MACs of one ``model(*inputs, **kwargs)`` call.

    Returns:
        (total MACs, {module name: MACs}) where names are ``named_modules()`` names ("" is the
        whole model) and each entry includes its submodules.
    """
    was_training = model.training
    model.eval()
    counter = _VariableFlopCounter(display=False)
    constants = [*model.parameters(), *model.buffers()]
    try:
        for t in constants:
            setattr(t, _CONSTANT, True)
        with sdpa_kernel(SDPBackend.MATH), counter:
            model(*inputs, **kwargs)
    finally:
        for t in constants:
            if hasattr(t, _CONSTANT):
                delattr(t, _CONSTANT)
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


def _pattern(name: str) -> str:
    """``model.blocks.3.attn`` → ``model.blocks.*.attn`` (repeated blocks are summed)."""
    return ".".join("*" if part.isdigit() else part for part in name.split("."))


def mac_breakdown(per_module: dict[str, int], total: int, top: int = 12) -> list[dict[str, Any]]:
    """Every MAC attributed once: to the deepest module whose own ``forward`` performed it.

    A module's own share is its inclusive count minus its counted children's; a module that also
    has children is listed as ``name [direct]`` (e.g. the attention products inside an attention
    layer besides its linears). Rows of repeated blocks are merged (``blocks.*``).

    Args:
        per_module: inclusive MACs per module name (``count_macs``' second output).
        total: MACs of the whole call.
        top: rows to keep; the rest are summed into an ``(other)`` row.
    Returns:
        rows ``{"module", "instances", "macs", "share"}`` that sum to ``total``.
    """
    own = dict(per_module)
    own.setdefault("", total)  # the root's own share: everything not below a counted child
    parents: set[str] = set()
    for n, macs in per_module.items():
        if n == "":
            continue
        parts = n.split(".")
        parent = next((".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1) if ".".join(parts[:i]) in own), "")
        own[parent] -= macs
        parents.add(parent)
    groups: dict[str, dict[str, int]] = {}
    for n, macs in own.items():
        if macs <= 0:
            continue
        label = "(root)" if n == "" else _pattern(n) + (" [direct]" if n in parents else "")
        g = groups.setdefault(label, {"macs": 0, "instances": 0})
        g["macs"] += macs
        g["instances"] += 1
    rows = sorted(({"module": k, **v} for k, v in groups.items()), key=lambda r: -r["macs"])
    shown = rows[:top]
    rest = total - sum(r["macs"] for r in shown)
    if rest > 0:
        shown.append({"module": "(other)", "macs": rest, "instances": sum(r["instances"] for r in rows[top:])})
    for r in shown:
        r["share"] = r["macs"] / total if total else 0.0
    return shown
