"""ImageNet in ImageFolder layout (`root/train/<class>/*.JPEG`, `root/val/<class>/*.JPEG`)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
LAYOUT = "root/train/<class>/<image> and root/val/<class>/<image> (torchvision ImageFolder layout)"


class ImageNetDataModule(L.LightningDataModule):
    """ImageNet with the standard augmentation: random resized crop + flip for training,
    resize + centre crop for evaluation. `batch_size` is per device."""

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
    ) -> None:
        super().__init__()
        for name, value in (("batch_size", batch_size), ("num_classes", num_classes), ("train_crop", train_crop),
                            ("eval_resize", eval_resize), ("eval_crop", eval_crop)):
            if value < 1:
                raise ValueError(f"ImageNetDataModule: {name}={value} is not allowed; expected an integer >= 1")
        if num_workers < 0:
            raise ValueError(f"ImageNetDataModule: num_workers={num_workers} is not allowed; expected >= 0")
        self.save_hyperparameters()
        self.num_classes = num_classes
        self.input_size = eval_crop
        self.datasets: dict[str, datasets.ImageFolder] = {}

    def _folder(self, split: str) -> Path:
        root = Path(self.hparams.root)
        folder = root / split
        if not folder.is_dir():
            what = "does not exist" if not root.exists() else f"has no {split}/ folder"
            raise FileNotFoundError(f"ImageNetDataModule: root {str(root)!r} {what}; expected {LAYOUT}")
        return folder

    def setup(self, stage: str | None = None) -> None:
        """Index the image folders (train for fit, val for everything)."""
        hp = self.hparams
        evaluate = transforms.Compose([
            transforms.Resize(hp.eval_resize), transforms.CenterCrop(hp.eval_crop),
            transforms.ToTensor(), transforms.Normalize(MEAN, STD),
        ])
        if stage in (None, "fit") and "train" not in self.datasets:
            train = transforms.Compose([
                transforms.RandomResizedCrop(hp.train_crop), transforms.RandomHorizontalFlip(),
                transforms.ToTensor(), transforms.Normalize(MEAN, STD),
            ])
            self.datasets["train"] = datasets.ImageFolder(str(self._folder("train")), train)
        if "val" not in self.datasets:
            self.datasets["val"] = datasets.ImageFolder(str(self._folder("val")), evaluate)
        found = len(self.datasets["val"].classes)
        if found != hp.num_classes:
            raise ValueError(
                f"ImageNetDataModule: {self._folder('val')} holds {found} class folders but num_classes="
                f"{hp.num_classes}; set data.num_classes to {found} or fix the folder"
            )

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        return DataLoader(
            self.datasets[split],
            batch_size=self.hparams.batch_size,
            shuffle=shuffle,
            drop_last=shuffle,
            num_workers=self.hparams.num_workers,
            pin_memory=self.hparams.pin_memory,
            persistent_workers=self.hparams.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches (Lightning adds the distributed sampler under DDP)."""
        return self._loader("train", True)

    def val_dataloader(self) -> DataLoader:
        """Validation batches."""
        return self._loader("val", False)

    def test_dataloader(self) -> DataLoader:
        """ImageNet has no public test labels: the validation split."""
        return self._loader("val", False)

    def predict_dataloader(self) -> DataLoader:
        """The validation split."""
        return self._loader("val", False)
