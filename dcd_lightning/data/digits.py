"""The embedded default data set: scikit-learn's handwritten digits (ships with scikit-learn)."""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from .sampling import drop_last_batch, loader_sampling


class _TensorImages(Dataset):
    """Images and labels in memory, with an optional random translation for training."""

    def __init__(self, images: Tensor, labels: Tensor, shift: int = 0) -> None:
        self.images, self.labels, self.shift = images, labels, shift

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        image = self.images[index]
        if self.shift:
            padded = F.pad(image, [self.shift] * 4)
            dy, dx = torch.randint(0, 2 * self.shift + 1, (2,)).tolist()
            image = padded[:, dy : dy + image.shape[1], dx : dx + image.shape[2]]
        return image, self.labels[index]


class DigitsDataModule(L.LightningDataModule):
    """1,797 8x8 digit images in 10 classes, scaled up to `image_size`, split 70/15/15 with a fixed seed."""

    num_classes = 10

    def __init__(
        self,
        batch_size: int = 64,
        image_size: int = 16,
        channels: int = 3,
        num_workers: int = 0,
        split_seed: int = 0,
        augment: bool = True,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"DigitsDataModule: batch_size={batch_size} is not allowed; expected >= 1")
        if image_size < 8:
            raise ValueError(f"DigitsDataModule: image_size={image_size} is not allowed; expected >= 8")
        self.save_hyperparameters()
        self.input_size = image_size
        self.splits: dict[str, _TensorImages] = {}

    def setup(self, stage: str | None = None) -> None:
        """Load the digits from scikit-learn and split them (the same split on every rank)."""
        if self.splits:
            return
        from sklearn.datasets import load_digits

        hp = self.hparams
        digits = load_digits()
        images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
        images = F.interpolate(images, size=hp.image_size, mode="bilinear", align_corners=False)
        images = ((images - 0.3) / 0.4).expand(-1, hp.channels, -1, -1).contiguous()
        labels = torch.tensor(digits.target, dtype=torch.long)
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(hp.split_seed))
        n_val = n_test = len(labels) * 15 // 100
        parts = {"val": order[:n_val], "test": order[n_val : n_val + n_test], "train": order[n_val + n_test :]}
        shift = max(1, hp.image_size // 8) if hp.augment else 0
        for name, idx in parts.items():
            self.splits[name] = _TensorImages(images[idx], labels[idx], shift if name == "train" else 0)

    def _loader(self, split: str, shuffle: bool, evaluate: bool = False) -> DataLoader:
        data = self.splits[split]
        dataset, sampler = loader_sampling(self, data, self.hparams.split_seed, shuffle, evaluate)
        return DataLoader(
            dataset,
            batch_size=self.hparams.batch_size,
            sampler=sampler,
            num_workers=self.hparams.num_workers,
            persistent_workers=self.hparams.num_workers > 0,
            drop_last=shuffle and drop_last_batch(self, len(data), self.hparams.batch_size),
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches (the last partial batch dropped)."""
        return self._loader("train", True)

    def val_dataloader(self) -> DataLoader:
        """Validation batches (under DDP, each image counted once: EvalShard)."""
        return self._loader("val", False, evaluate=True)

    def test_dataloader(self) -> DataLoader:
        """Test batches (under DDP, each image counted once: EvalShard)."""
        return self._loader("test", False, evaluate=True)

    def predict_dataloader(self) -> DataLoader:
        """The test split, for predict."""
        return self._loader("test", False)
