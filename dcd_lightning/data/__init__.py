"""LightningDataModules: the embedded digits set, and ImageNet as image folders or streaming shards."""

from .digits import DigitsDataModule
from .imagenet import ImageNetDataModule
from .shards import ImageNetShardsDataModule

__all__ = ["DigitsDataModule", "ImageNetDataModule", "ImageNetShardsDataModule"]
