"""Agent-attention backbones registered in timm (``timm.create_model("agent_deit_tiny")``)."""
from ..core.attention import register_fx_leaves
from . import agent_deit  # noqa: F401  (registers agent_deit_*)
from . import agent_pvt  # noqa: F401  (registers agent_pvt_* / pvt_v1_*)
from . import agent_swin  # noqa: F401  (registers agent_swin_*)
from . import agent_cswin  # noqa: F401  (registers agent_cswin_* / cswin_*)
from ._helpers import adapt_agent_biases, create_model, load_weights, state_dict_mismatch, unwrap_checkpoint
from ._policy import no_weight_decay_names
from .agent_deit import AgentVisionTransformer
from .segmentation import SegmentationModel, build_backbone, palette, slide_inference

register_fx_leaves()  # the core's agent layers stay leaves in FX tracing

__all__ = [
    "AgentVisionTransformer", "SegmentationModel", "adapt_agent_biases", "build_backbone", "create_model",
    "load_weights", "no_weight_decay_names", "palette", "slide_inference", "state_dict_mismatch", "unwrap_checkpoint",
]
