"""AgentSD for diffusers: training-free agent attention + token merging in Stable Diffusion."""
from .agent_processor import AgentAttnProcessor, agent_processors, set_agent_attention
from .merge import TokenMatching, bipartite_soft_matching_random2d
from .patch import AgentSDAttnProcessor, AgentSDConfig, AgentSDState, apply_patch, get_state, remove_patch
from .tiny import (
    build_sd15_pipeline, build_tiny_pipeline, sd15_unet_config, sdxl_unet_config, tiny_sdxl_unet_config,
    tiny_unet_config,
)

__all__ = [
    "AgentAttnProcessor",
    "AgentSDAttnProcessor",
    "AgentSDConfig",
    "AgentSDState",
    "TokenMatching",
    "apply_patch",
    "bipartite_soft_matching_random2d",
    "build_sd15_pipeline",
    "build_tiny_pipeline",
    "agent_processors",
    "get_state",
    "remove_patch",
    "set_agent_attention",
    "sd15_unet_config",
    "sdxl_unet_config",
    "tiny_sdxl_unet_config",
    "tiny_unet_config",
]
