"""LightningDataModules: the embedded digits set and ImageNet."""

from .digits import DigitsDataModule
from .imagenet import ImageNetDataModule

__all__ = ["DigitsDataModule", "ImageNetDataModule"]
