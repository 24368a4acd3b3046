"""The one agent-attention core shared by every task: the functional ops, biases and the layer."""
from .attention import AgentAttention, AgentMultiheadAttention
from .bias import AgentPositionBias, adapt_agent_bias, resize_agent_axis, resize_axis, to_grid
from .fused import RowBias
from .functional import (
    agent_attention, agent_attention_reference, agent_attention_tokens, as_sizes, depthwise_local, pool_agents,
)

__all__ = [
    "AgentAttention",
    "AgentMultiheadAttention",
    "AgentPositionBias",
    "RowBias",
    "adapt_agent_bias",
    "agent_attention",
    "agent_attention_reference",
    "agent_attention_tokens",
    "as_sizes",
    "depthwise_local",
    "pool_agents",
    "resize_agent_axis",
    "resize_axis",
    "to_grid",
]
