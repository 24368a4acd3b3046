"""agentlit: Agent Attention (Han et al., ECCV 2024) as a PyTorch Lightning pipeline."""
from . import models  # registers the agent backbones in timm
from .core import AgentAttention, agent_attention

__version__ = "0.1.0"
__all__ = ["AgentAttention", "agent_attention", "models", "__version__"]
