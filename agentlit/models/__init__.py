"""Agent-attention backbones registered in timm (``timm.create_model("agent_deit_tiny")``)."""
from . import agent_deit
from ._helpers import adapt_agent_biases, create_model, unwrap_checkpoint
from .agent_deit import AgentVisionTransformer

__all__ = ["AgentVisionTransformer", "adapt_agent_biases", "create_model", "unwrap_checkpoint"]
