"""LightningModules: one per task, all built on the shared agent-attention core."""
from .classification import ClassificationModule
from .diffusion import DiffusionModule
from .detection import DetectionModule  # noqa: F401  (object detection / instance segmentation)
from .generation import GenerationModule, RandomConvFeatures
from .segmentation import SegmentationModule

__all__ = ["ClassificationModule", "DiffusionModule", "GenerationModule", "RandomConvFeatures", "SegmentationModule"]
