"""LightningDataModules: folder layouts, shipped and generated sets."""
from .classification import DigitsDataModule, ImageFolderDataModule
from .coco import COCODetectionDataModule, InstanceShapesDataModule  # noqa: F401  (detection data)
from .prompts import PromptDataModule
from .segmentation import ADE20KDataModule, FolderSegmentationDataModule, ShapesDataModule

__all__ = [
    "ADE20KDataModule",
    "DigitsDataModule",
    "FolderSegmentationDataModule",
    "ImageFolderDataModule",
    "PromptDataModule",
    "ShapesDataModule",
]
