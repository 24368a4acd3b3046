"""LightningModules: one per task, all built on the shared agent-attention core."""
from .classification import ClassificationModule
from .diffusion import DiffusionModule
from .distillation import DistillationModule
from .detection import DetectionModule
from .generation import GenerationModule, RandomConvFeatures
from .segmentation import SegmentationModule

__all__ = ["ClassificationModule", "DetectionModule", "DiffusionModule", "DistillationModule", "GenerationModule",
           "RandomConvFeatures", "SegmentationModule"]
