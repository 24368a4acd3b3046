"""FSDP wrapping for the model zoo: one FSDP unit per transformer block."""
from __future__ import annotations

from torch import nn

__all__ = ["transformer_blocks", "wrap_transformer_blocks"]


def transformer_blocks() -> tuple[type[nn.Module], ...]:
    """The block classes of every family agentlit builds on (timm's ViT/Swin and ours)."""
    from timm.models.swin_transformer import SwinTransformerBlock
    from timm.models.vision_transformer import Block

    from ..models.agent_cswin import CSwinBlock
    from ..models.agent_pvt import PVTBlock
    from ..models.agent_swin import AgentSwinBlock

    return Block, SwinTransformerBlock, PVTBlock, CSwinBlock, AgentSwinBlock


def wrap_transformer_blocks(module: nn.Module, recurse: bool, nonwrapped_numel: int) -> bool:
    """An FSDP ``auto_wrap_policy`` (the callable form): recurse everywhere, wrap each block.

    Usable from YAML as ``auto_wrap_policy: agentlit.utils.fsdp.wrap_transformer_blocks``.
    """
    return recurse or isinstance(module, transformer_blocks())
