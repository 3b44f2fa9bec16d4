"""LightningDataModules: the embedded digits set (and, later, ImageNet)."""

from .digits import DigitsDataModule

__all__ = ["DigitsDataModule"]
