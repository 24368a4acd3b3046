"""AgentSD for diffusers: training-free agent attention + token merging in Stable Diffusion."""
from .merge import TokenMatching, bipartite_soft_matching_random2d
from .patch import AgentSDAttnProcessor, AgentSDConfig, AgentSDState, apply_patch, get_state, remove_patch
from .tiny import build_sd15_pipeline, build_tiny_pipeline, sd15_unet_config, tiny_unet_config

__all__ = [
    "AgentSDAttnProcessor",
    "AgentSDConfig",
    "AgentSDState",
    "TokenMatching",
    "apply_patch",
    "bipartite_soft_matching_random2d",
    "build_sd15_pipeline",
    "build_tiny_pipeline",
    "get_state",
    "remove_patch",
    "sd15_unet_config",
    "tiny_unet_config",
]
