"""LightningDataModules: folder layouts, shipped and generated sets."""
from .classification import DigitsDataModule, ImageFolderDataModule
from .prompts import PromptDataModule

__all__ = ["DigitsDataModule", "ImageFolderDataModule", "PromptDataModule"]
