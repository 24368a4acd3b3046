"""LightningDataModules: folder layouts, shipped and generated sets."""
from .classification import DigitsDataModule, ImageFolderDataModule

__all__ = ["DigitsDataModule", "ImageFolderDataModule"]
