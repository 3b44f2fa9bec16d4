"""Shared fixtures: offline W&B, and a tiny ImageNet-layout image folder generated on the fly."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("MPLBACKEND", "Agg")

CLASSES = ("n01440764", "n01443537", "n01484850")


def write_image_folder(root: Path, per_class: int = 2, size: tuple[int, int] = (48, 56)) -> Path:
    """root/train/<class>/*.JPEG and root/val/<class>/*.JPEG with random JPEG images."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for name in CLASSES:
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                pixels = rng.integers(0, 255, (*size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{name}_{i}.JPEG", quality=90)
    return root


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-class image folder in ImageNet layout, shared by the tests that only read it."""
    return write_image_folder(tmp_path_factory.mktemp("imagenet"))


def tiny_imagenet_args(root: Path) -> list[str]:
    """CLI overrides that point an ImageNet config at a tiny folder, at small crops, on the CPU."""
    return [
        f"--data.init_args.root={root}",
        f"--data.init_args.num_classes={len(CLASSES)}",
        "--data.init_args.batch_size=2",
        "--data.init_args.num_workers=0",
        "--data.init_args.train_crop=64",
        "--data.init_args.eval_resize=72",
        "--data.init_args.eval_crop=64",
        "--trainer.accelerator=cpu",
        "--trainer.devices=1",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
    ]
