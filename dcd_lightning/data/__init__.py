"""LightningDataModules: the embedded digits set, and ImageNet as image folders or streaming shards."""

from typing import Any

from .digits import DigitsDataModule
from .imagenet import ImageNetDataModule

__all__ = ["DigitsDataModule", "ImageNetDataModule", "ImageNetShardsDataModule"]


def __getattr__(name: str) -> Any:
    """ImageNetShardsDataModule on first use: litdata takes ~1.6 s to import, which runs without it skip."""
    if name == "ImageNetShardsDataModule":
        from .shards import ImageNetShardsDataModule

        return ImageNetShardsDataModule
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
