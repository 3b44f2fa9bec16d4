"""ImageNet in ImageFolder layout (`root/train/<class>/*.JPEG`, `root/val/<class>/*.JPEG`)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from PIL import Image
from torch.utils.data import DataLoader, default_collate
from torchvision import datasets, transforms

from .sampling import drop_last_batch, loader_sampling

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
LAYOUT = "root/train/<class>/<image> and root/val/<class>/<image> (torchvision ImageFolder layout)"


def train_transform(crop: int, tensors: bool = False) -> transforms.Compose:
    """The standard ImageNet training augmentation: random resized crop, flip, normalise.

    With tensors=True the same steps take a uint8 (3, H, W) tensor (antialiased resizing).
    """
    to_float = transforms.ConvertImageDtype(torch.float32) if tensors else transforms.ToTensor()
    return transforms.Compose([
        transforms.RandomResizedCrop(crop, antialias=True), transforms.RandomHorizontalFlip(),
        to_float, transforms.Normalize(MEAN, STD),
    ])


def eval_transform(resize: int, crop: int, tensors: bool = False) -> transforms.Compose:
    """The standard ImageNet evaluation transform: resize, centre crop, normalise (tensors: as above)."""
    to_float = transforms.ConvertImageDtype(torch.float32) if tensors else transforms.ToTensor()
    return transforms.Compose([
        transforms.Resize(resize, antialias=True), transforms.CenterCrop(crop), to_float, transforms.Normalize(MEAN, STD),
    ])


def check_loader_args(
    owner: str, batch_size: int, num_workers: int, num_classes: int, train_crop: int, eval_resize: int, eval_crop: int
) -> None:
    """Raise a ValueError naming `owner` and the argument for sizes < 1 or a negative worker count."""
    for name, value in (("batch_size", batch_size), ("num_classes", num_classes), ("train_crop", train_crop),
                        ("eval_resize", eval_resize), ("eval_crop", eval_crop)):
        if value < 1:
            raise ValueError(f"{owner}: {name}={value} is not allowed; expected an integer >= 1")
    if num_workers < 0:
        raise ValueError(f"{owner}: num_workers={num_workers} is not allowed; expected >= 0")


class CorruptImageError(RuntimeError):
    """An image file that cannot be decoded."""


class CheckedImageFolder(datasets.ImageFolder):
    """ImageFolder that names the file when an image cannot be read, or skips it (returning None)."""

    def __init__(self, root: str, transform: Any, skip_corrupt: bool = False) -> None:
        super().__init__(root, transform)
        self.skip_corrupt = skip_corrupt

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int] | None:
        path, target = self.samples[index]
        try:
            with open(path, "rb") as handle:
                image = Image.open(handle).convert("RGB")
        except (OSError, ValueError, SyntaxError) as error:
            if self.skip_corrupt:
                warnings.warn(f"ImageNetDataModule: skipped unreadable image {path}: {error}", stacklevel=2)
                return None
            raise CorruptImageError(
                f"ImageNetDataModule: cannot read image {path}: {error}. Replace or delete the file, or set "
                "data.init_args.skip_corrupt=true to skip unreadable files (each one is reported)"
            ) from error
        return self.transform(image), target


def collate_skipping_none(batch: list[Any]) -> Any:
    """default_collate over the samples that are not None (skipped unreadable images); None where no
    image of the batch was readable: Lightning skips such a training batch, ImageClassifier's
    evaluation steps skip it too."""
    kept = [sample for sample in batch if sample is not None]
    return default_collate(kept) if kept else None


def refuse_empty_batch_on_one_rank(datamodule: L.LightningDataModule, batch: Any) -> Any:
    """The data modules' on_before_batch_transfer: a training batch with no readable image cannot be
    skipped by one process of several (the others would wait for its gradients forever), so stop."""
    trainer = datamodule.trainer
    if batch is None and trainer is not None and trainer.training and trainer.world_size > 1:
        raise CorruptImageError(
            f"{type(datamodule).__name__}, rank {trainer.global_rank}: every image of a training batch was "
            "unreadable (see the warnings above); one process of several cannot skip a batch: remove or fix "
            "those images, or use a larger data.init_args.batch_size"
        )
    return batch


class ImageNetDataModule(L.LightningDataModule):
    """ImageNet with the standard augmentation: random resized crop + flip for training,
    resize + centre crop for evaluation.

    `batch_size` is per device (global batch = batch_size x devices x nodes). An unreadable image
    stops the run with an error naming the file; `skip_corrupt=True` skips such files instead and
    warns once per file. Shuffling depends only on (seed, epoch), so resumed runs see the same order.
    """

    def __init__(
        self,
        root: str = "data/imagenet",
        batch_size: int = 256,
        num_workers: int = 8,
        num_classes: int = 1000,
        train_crop: int = 224,
        eval_resize: int = 256,
        eval_crop: int = 224,
        pin_memory: bool = True,
        skip_corrupt: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        check_loader_args(type(self).__name__, batch_size, num_workers, num_classes, train_crop, eval_resize, eval_crop)
        self.save_hyperparameters()
        self.num_classes = num_classes
        self.input_size = eval_crop
        self.datasets: dict[str, CheckedImageFolder] = {}

    def _folder(self, split: str) -> Path:
        root = Path(self.hparams.root)
        folder = root / split
        if not folder.is_dir():
            what = "does not exist" if not root.exists() else f"has no {split}/ folder"
            raise FileNotFoundError(f"ImageNetDataModule: root {str(root)!r} {what}; expected {LAYOUT}")
        return folder

    def setup(self, stage: str | None = None) -> None:
        """Index the image folders (train for fit, val for everything) and check the class count."""
        hp = self.hparams
        evaluate = eval_transform(hp.eval_resize, hp.eval_crop)
        if stage in (None, "fit") and "train" not in self.datasets:
            train = train_transform(hp.train_crop)
            self.datasets["train"] = CheckedImageFolder(str(self._folder("train")), train, hp.skip_corrupt)
        if "val" not in self.datasets:
            self.datasets["val"] = CheckedImageFolder(str(self._folder("val")), evaluate, hp.skip_corrupt)
        for split, data in self.datasets.items():
            if len(data.classes) != hp.num_classes:
                raise ValueError(
                    f"ImageNetDataModule: {self._folder(split)} holds {len(data.classes)} class folders but "
                    f"num_classes={hp.num_classes}; set data.init_args.num_classes={len(data.classes)} or fix the folder"
                )
        if "train" in self.datasets and self.datasets["train"].classes != self.datasets["val"].classes:
            raise ValueError(f"ImageNetDataModule: train/ and val/ under {hp.root!r} hold different class folders")

    @property
    def classes(self) -> list[str] | None:
        """The class folder names, once set up (predict saves them with the probabilities)."""
        return self.datasets["val"].classes if "val" in self.datasets else None

    def _loader(self, split: str, shuffle: bool, evaluate: bool = False) -> DataLoader:
        data = self.datasets[split]
        dataset, sampler = loader_sampling(self, data, self.hparams.seed, shuffle, evaluate)
        return DataLoader(
            dataset,
            batch_size=self.hparams.batch_size,
            sampler=sampler,
            drop_last=shuffle and drop_last_batch(self, len(data), self.hparams.batch_size),
            num_workers=self.hparams.num_workers,
            pin_memory=self.hparams.pin_memory and torch.cuda.is_available(),
            persistent_workers=self.hparams.num_workers > 0,
            collate_fn=collate_skipping_none if self.hparams.skip_corrupt else None,
        )

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Stop where one process of several would have to skip a training batch (no readable image)."""
        return refuse_empty_batch_on_one_rank(self, batch)

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches (Lightning shards them across ranks under DDP)."""
        return self._loader("train", True)

    def val_dataloader(self) -> DataLoader:
        """Validation batches (under DDP, each image counted once: EvalShard)."""
        return self._loader("val", False, evaluate=True)

    def test_dataloader(self) -> DataLoader:
        """ImageNet has no public test labels: the validation split."""
        return self._loader("val", False, evaluate=True)

    def predict_dataloader(self) -> DataLoader:
        """The validation split."""
        return self._loader("val", False)
