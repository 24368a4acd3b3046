"""Convert a pretrained softmax model to agent attention, keeping its weights (docs/any-model.md).

:func:`convert` finds the softmax attention layers of a model and replaces each, in place, with an
agent-attention layer that carries the same projection weights (the very Parameter objects):

- timm's ViT/DeiT ``Attention`` (fused ``qkv`` + ``proj``) → :class:`~agentlit.core.AgentAttention`
  over the model's patch grid with its class/register tokens as prefix tokens (a 1-D sequence when
  the layer is not inside a timm ``VisionTransformer``);
- ``torch.nn.MultiheadAttention`` (batch_first or not; ``in_proj_weight`` or separate q/k/v weights)
  → :class:`~agentlit.core.AgentMultiheadAttention`, the same call and parameter names;
- diffusers' ``Attention`` used as self-attention → its processor becomes an
  :class:`~agentlit.diffusion.AgentAttnProcessor` on the layer's own ``to_q`` / ``to_k`` / ``to_v`` / ``to_out``.

Agent position biases and the depthwise conv start at zero, so the converted model differs from the
original only by the attention itself (softmax over agents instead of over all tokens); a short
distillation (:class:`agentlit.tasks.DistillationModule`) recovers the accuracy.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import math
import sys
from collections.abc import Sequence
from typing import Any

from torch import nn

from .core import AgentAttention, AgentMultiheadAttention, to_grid

__all__ = ["ConversionError", "ConversionReport", "convert"]


class ConversionError(ValueError):
    """A layer the caller asked for cannot be converted, or nothing could be."""


@dataclasses.dataclass
class ConversionReport:
    """What :func:`convert` did.

    Args:
        converted: ``{module name: what it was}`` for every replaced layer, in model order.
        skipped: ``{module name: why}`` for softmax attention layers left as they are.
    """

    converted: dict[str, str] = dataclasses.field(default_factory=dict)
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def num_converted(self) -> int:
        return len(self.converted)

    def __str__(self) -> str:
        lines = [f"converted {len(self.converted)} attention layer(s) to agent attention"]
        lines += [f"  {name} ({kind})" for name, kind in self.converted.items()]
        if self.skipped:
            lines.append(f"left {len(self.skipped)} layer(s) as softmax attention:")
            lines += [f"  {name}: {why}" for name, why in self.skipped.items()]
        return "\n".join(lines)


def convert(
    model: nn.Module,
    agent_num: int | tuple[int, ...] = 49,
    layers: int | Sequence[str] | None = None,
    *,
    feat_size: tuple[int, ...] | None = None,
    agents: str = "pooled",
    dwc_kernel: int = 3,
) -> ConversionReport:
    """Replace the softmax attention layers of ``model`` (in place) by agent attention with the same weights.

    Args:
        model: any ``nn.Module`` tree (a timm model, a model built of ``nn.MultiheadAttention`` /
            ``nn.TransformerEncoder``, a diffusers UNet …).
        agent_num: agents per layer: for pooled agents a grid of the layout's rank (an int is a square
            on maps, the count on sequences), for learned agents a count.
        layers: which layers: None (all it can convert), an int k (the first k in model order, as the
            paper converts the first blocks of DeiT-B), or module names / ``fnmatch`` patterns
            (``"blocks.[0-3].attn"``). A layer named exactly that cannot be converted is an error.
        feat_size: the layout the biases are laid out for, for every converted layer: (L,) for a
            sequence, (h, w), (t, h, w). None: a timm ViT's patch grid, a UNet level's latent size,
            (64,) for other sequences (any length runs; this is only where per-position terms live).
        agents: "pooled" (queries pooled over the layout, the paper) or "learned".
        dwc_kernel: depthwise conv kernel on V (started at zero; 0: none).

    Returns:
        A :class:`ConversionReport`; ``print(report)`` lists what was converted and what was left.

    Raises:
        ConversionError: a named layer cannot be converted, a pattern matches nothing, or the model
            has no softmax attention that could be.
    """
    if isinstance(layers, str):
        layers = [layers]
    candidates = [(name, mod, kind) for name, mod in model.named_modules() if (kind := _kind(mod)) is not None]
    if isinstance(layers, int):
        if layers < 0:
            raise ConversionError(f"layers={layers} must be >= 0 (the number of leading attention layers)")
    elif layers is not None:
        unmatched = [p for p in layers if not any(fnmatch.fnmatchcase(n, p) for n, _, _ in candidates)]
        if unmatched:
            names = ", ".join(n for n, _, _ in candidates[:6]) or "none"
            raise ConversionError(f"layers {unmatched} match no softmax attention layer; found: {names}")
    report = ConversionReport()
    modules = dict(model.named_modules())
    for name, mod, kind in candidates:
        if isinstance(layers, int) and len(report.converted) >= layers:
            break
        if isinstance(layers, Sequence) and not any(fnmatch.fnmatchcase(name, p) for p in layers):
            continue
        try:
            new = _CONVERTERS[kind](name, mod, model, modules, agent_num, feat_size, agents, dwc_kernel)
        except _Skip as why:
            if isinstance(layers, Sequence) and name in layers:
                raise ConversionError(f"cannot convert {name} ({kind}): {why}") from None
            report.skipped[name] = str(why)
            continue
        if new is not None:  # None: converted in place (diffusers processors)
            _set_module(model, name, new)
        report.converted[name] = kind
    if not report.converted:
        detail = "; ".join(f"{n}: {w}" for n, w in report.skipped.items()) or "no timm Attention, " \
            "nn.MultiheadAttention or diffusers Attention found"
        raise ConversionError(f"nothing to convert in {type(model).__name__} ({detail})")
    _turn_off_fused_encoder_paths(model)
    return report


class _Skip(Exception):
    """Why a layer stays softmax attention."""


def _kind(mod: nn.Module) -> str | None:
    if isinstance(mod, (AgentAttention,)):
        return None
    if isinstance(mod, nn.MultiheadAttention):
        return "nn.MultiheadAttention"
    timm_layers = sys.modules.get("timm.layers.attention")
    if timm_layers is not None and type(mod) is getattr(timm_layers, "Attention", None):
        return "timm Attention"
    diffusers_attn = sys.modules.get("diffusers.models.attention_processor")
    if diffusers_attn is not None and isinstance(mod, getattr(diffusers_attn, "Attention", ())):
        return "diffusers Attention"
    return None


def _zero_extras(layer: nn.Module) -> nn.Module:
    """Biases and depthwise conv at zero: the converted layer is plain agent attention at first."""
    for p in layer.bias_parameters():
        nn.init.zeros_(p)
    dwc = getattr(layer, "dwc", None)
    if dwc is not None:
        nn.init.zeros_(dwc.weight)
        nn.init.zeros_(dwc.bias)
    return layer


def _enclosing(name: str, modules: dict[str, nn.Module], test: Any) -> tuple[str, nn.Module] | None:
    """The innermost module above ``name`` for which ``test(module)`` holds, with its name."""
    parts = name.split(".")
    for i in range(len(parts) - 1, -1, -1):
        prefix = ".".join(parts[:i])
        mod = modules.get(prefix)
        if mod is not None and test(mod):
            return prefix, mod
    return None


def _is_vit(mod: nn.Module) -> bool:
    return any(c.__name__ == "VisionTransformer" for c in type(mod).__mro__) and hasattr(mod, "patch_embed")


def _is_unet(mod: nn.Module) -> bool:  # a diffusers UNet2DModel / UNet2DConditionModel
    config = getattr(mod, "config", None)
    return config is not None and hasattr(config, "get") and "block_out_channels" in config and \
        "down_block_types" in config


def _layout_grid(agent_num: Any, agents: str, size: tuple[int, ...], where: str) -> None:
    """Refuse a pooled agent grid larger than the layout along some axis."""
    if agents != "pooled":
        return
    grid = to_grid(agent_num, rank=len(size))
    if any(g > s for g, s in zip(grid, size)):
        raise _Skip(f"agent grid {grid} does not fit the {size} {where}; use at most {math.prod(size)} agents")


def _from_timm(name, mod, model, modules, agent_num, feat_size, agents, dwc_kernel):  # noqa: ANN001
    for attr, why in (("q_norm", "qk_norm"), ("k_norm", "qk_norm"), ("norm", "scale_norm")):
        if not isinstance(getattr(mod, attr, nn.Identity()), nn.Identity):
            raise _Skip(f"{why} is not supported (agents are pooled before any per-head norm)")
    if getattr(mod, "gate", None) is not None:
        raise _Skip("gated attention is not supported")
    dim = mod.qkv.in_features
    if mod.qkv.out_features != 3 * dim:
        raise _Skip(f"attention width {mod.qkv.out_features // 3} differs from the model width {dim}")
    prefix, vit = 0, _enclosing(name, modules, _is_vit)
    size = feat_size
    if vit is not None:
        prefix = int(getattr(vit[1], "num_prefix_tokens", 0))
        if size is None:
            size = tuple(vit[1].patch_embed.grid_size)
        _layout_grid(agent_num, agents, tuple(size), "patch grid")
    size = size or (64,)
    new = AgentAttention(
        dim, mod.num_heads, feat_size=size, agent_num=agent_num, agents=agents, num_prefix_tokens=prefix,
        qkv_bias=mod.qkv.bias is not None, attn_drop=mod.attn_drop.p, dwc_kernel=dwc_kernel,
    )
    # the same Parameter objects; the qkv module stays the layer's SplitLinear (Q, K, V as dense tensors)
    new.qkv.weight, new.qkv.bias = mod.qkv.weight, mod.qkv.bias
    new.proj, new.proj_drop = mod.proj, mod.proj_drop
    new = _zero_extras(new).to(device=mod.qkv.weight.device, dtype=mod.qkv.weight.dtype)
    if vit is not None and getattr(vit[1], "dynamic_img_size", False):
        _follow_dynamic_grid(vit[1])
    return new


def _follow_dynamic_grid(vit: nn.Module) -> None:
    """A ViT with ``dynamic_img_size`` tells its agent layers the patch grid of every input."""
    if getattr(vit, "_agent_grid_hook", False):
        return

    def hook(module: nn.Module, args: tuple) -> None:
        grid = tuple(module.patch_embed.dynamic_feat_size(args[0].shape[-2:]))
        for m in module.modules():
            if isinstance(m, AgentAttention):
                m.feat_size = grid

    vit.register_forward_pre_hook(hook)
    vit._agent_grid_hook = True


def _from_mha(name, mod, model, modules, agent_num, feat_size, agents, dwc_kernel):  # noqa: ANN001
    if mod.bias_k is not None or mod.add_zero_attn:
        raise _Skip("add_bias_kv / add_zero_attn have no agent-attention equivalent")
    parent_name, _, attr = name.rpartition(".")
    parent = modules.get(parent_name)
    cross = False
    if parent is not None and isinstance(parent, nn.TransformerDecoderLayer):
        if attr == "self_attn":
            raise _Skip("a decoder's self-attention is causal (tgt_mask); agents pool every position")
        cross = attr == "multihead_attn"
    size = feat_size or (64,)
    return _zero_extras(AgentMultiheadAttention.from_mha(
        mod, feat_size=size, agent_num=agent_num, agents=agents, dwc_kernel=dwc_kernel, cross_attention=cross))


def _from_diffusers(name, mod, model, modules, agent_num, feat_size, agents, dwc_kernel):  # noqa: ANN001
    from .diffusion.agent_processor import AgentAttnProcessor, attention_levels, check_agent_grid, latent_size_cell

    if mod.is_cross_attention or getattr(mod, "only_cross_attention", False):
        raise _Skip("cross-attention (keys from the encoder states); only self-attention is converted")
    if getattr(mod, "is_causal", False):
        raise _Skip("causal attention; agents pool every position")
    if getattr(mod, "added_kv_proj_dim", None) is not None:
        raise _Skip("joint attention with added key/value projections is not supported")
    if agents != "pooled":
        raise _Skip("diffusers layers take pooled agents only")
    if mod.to_k.out_features != mod.to_q.out_features:
        raise _Skip("grouped key/value heads are not supported")
    unet = _enclosing(name, modules, _is_unet)
    size = feat_size
    if size is None and unet is not None:
        rel = name[len(unet[0]) + 1:] if unet[0] else name
        factor = attention_levels(unet[1]).get(rel, (None,))[0]
        if factor is not None:
            sample = unet[1].config.sample_size
            sample = (sample, sample) if isinstance(sample, int) else tuple(sample)
            size = (math.ceil(sample[0] / factor), math.ceil(sample[1] / factor))
    if size is None or len(size) != 2:
        raise _Skip("its latent map size is unknown: pass feat_size=(h, w)")
    grid = to_grid(agent_num)
    try:
        check_agent_grid(grid, tuple(size))
    except ValueError as e:
        raise _Skip(str(e)) from None
    proc = AgentAttnProcessor(mod.to_q.out_features, mod.heads, tuple(size), grid, dwc_kernel=dwc_kernel,
                              zero_init=True).to(device=mod.to_q.weight.device, dtype=mod.to_q.weight.dtype)
    if unet is not None:
        proc.latent_size = latent_size_cell(unet[1])
    mod.set_processor(proc)
    return None


_CONVERTERS = {
    "timm Attention": _from_timm,
    "nn.MultiheadAttention": _from_mha,
    "diffusers Attention": _from_diffusers,
}


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)


def _turn_off_fused_encoder_paths(model: nn.Module) -> None:
    # nn.TransformerEncoder turns padded batches into nested tensors for its fused kernels (decided at
    # construction, from the softmax layers); the agent layers need the padded batch and its mask.
    for mod in model.modules():
        if isinstance(mod, nn.TransformerEncoder):
            mod.use_nested_tensor = False
