"""ImageNet as streaming shards: make-shards, training from shards, DDP, exact mid-epoch resume."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_imagenet_args, write_image_folder
from torchvision.datasets import ImageFolder

from dcd_lightning.cli import main
from dcd_lightning.data.shards import ImageNetShardsDataModule, make_shards
from dcd_lightning.data.shards import main as make_shards_main

ROOT = Path(__file__).resolve().parents[1]
PAPER = str(ROOT / "configs" / "paper" / "table4_resnet10_static.yaml")
SHARDS_PRESET = str(ROOT / "configs" / "presets" / "shards.yaml")
PER_CLASS = 8  # 24 training images: 2 ranks x 2 workers x batch 2 x 3 batches, nothing dropped


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(image folder, its shards), several chunks per split so ranks and workers get their own."""
    base = tmp_path_factory.mktemp("shards")
    folder = write_image_folder(base / "folder", per_class=PER_CLASS, size=(40, 48))
    make_shards(folder, str(base / "shards"), workers=2, chunk_bytes="8KB")
    return folder, base / "shards"


def shard_args(shards: Path, *extra: str) -> list[str]:
    return ["--config", PAPER, "--config", SHARDS_PRESET, *tiny_imagenet_args(shards),
            "--data.init_args.train_crop=32", "--data.init_args.eval_resize=36", "--data.init_args.eval_crop=32",
            *extra]


def test_manifest_counts_and_classes_match_the_image_folder(shards: tuple[Path, Path]) -> None:
    folder, out = shards
    manifest = json.loads((out / "manifest.json").read_text())
    reference = ImageFolder(str(folder / "train"))
    assert manifest["classes"] == reference.classes
    for split in ("train", "val"):
        source = ImageFolder(str(folder / split))
        per_class = [sum(1 for _, label in source.samples if label == c) for c in range(len(source.classes))]
        assert manifest["splits"][split] == {"images": len(source), "per_class": per_class}


def test_shards_keep_the_image_folder_class_indices_and_bytes(shards: tuple[Path, Path]) -> None:
    """Every stored item is the ImageFolder sample of the same index: label, path and file bytes."""
    import litdata

    folder, out = shards
    for split in ("train", "val"):
        source = ImageFolder(str(folder / split))
        data = litdata.StreamingDataset(str(out / split))
        seen = set()
        for index in range(len(data)):
            item = data[index]
            path, label = source.samples[item["id"]]
            assert item["label"] == label and Path(path).relative_to(folder / split) == Path(item["path"])
            assert bytes(item["image"]) == Path(path).read_bytes()
            seen.add(item["id"])
        assert seen == set(range(len(source)))


def test_make_shards_resumes_and_skips_finished_splits(shards: tuple[Path, Path], tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    folder, written = shards
    out = tmp_path / "shards"
    shutil.copytree(written, out)
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["splits"]["val"]  # as if the run had stopped after train
    (out / "manifest.json").write_text(json.dumps(manifest))
    capsys.readouterr()
    assert make_shards_main(["--root", str(folder), "--out", str(out), "--chunk-bytes", "8KB"]) == 0
    printed = capsys.readouterr().out
    assert f"train: {3 * PER_CLASS} images already written, skipped" in printed
    assert f"make-shards: val: {3 * PER_CLASS} images" in printed
    assert json.loads((out / "manifest.json").read_text()) == json.loads((written / "manifest.json").read_text())
    other = write_image_folder(tmp_path / "other", per_class=2)  # the same classes, other images
    with pytest.raises(SystemExit):
        make_shards_main(["--root", str(other), "--out", str(out)])
    assert f"holds shards of {folder.resolve()}, not of {other}; to continue" in capsys.readouterr().err
    assert json.loads((out / "manifest.json").read_text()) == json.loads((written / "manifest.json").read_text())
    for split in ("train", "val"):
        (other / split / "extra_class").mkdir()
        next((other / split / "n01440764").glob("*.JPEG")).rename(other / split / "extra_class" / "moved.JPEG")
    with pytest.raises(SystemExit):
        make_shards_main(["--root", str(other), "--out", str(out)])
    assert "holds shards of another source" in capsys.readouterr().err


@pytest.mark.parametrize("decoder", ["auto", "pil", "torchvision"])
def test_fit_from_shards(shards: tuple[Path, Path], tmp_path: Path, decoder: str) -> None:
    _, out = shards
    assert main(["fit", *shard_args(out, "--trainer.fast_dev_run=2", f"--data.init_args.decoder={decoder}",
                                    f"--trainer.default_root_dir={tmp_path}")]) == 0
    data = ImageNetShardsDataModule(root=str(out), num_classes=3, train_crop=32, eval_resize=36, eval_crop=32,
                                    decoder=decoder, num_workers=0)
    data.setup("fit")
    image, label = data.datasets["val"][0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and label == 0
    assert -3 < float(image.mean()) < 3  # normalised


def test_shards_fewer_than_a_batch_train_on_one_partial_batch(shards: tuple[Path, Path], tmp_path: Path) -> None:
    """24 training images at batch_size 32: dropping the partial batch would leave no batch (the fit
    would end at once and exit 0); it trains on the 24 and says why."""
    _, out = shards
    with pytest.warns(UserWarning, match=r"24 training samples give 24 per process, fewer than batch_size=32"):
        assert main(["fit", *shard_args(out, "--data.init_args.batch_size=32", "--trainer.max_epochs=2",
                                        "--trainer.limit_val_batches=1", "--trainer.logger=false",
                                        f"--trainer.default_root_dir={tmp_path}")]) == 0
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 2


def test_missing_shards_are_named(tmp_path: Path) -> None:
    data = ImageNetShardsDataModule(root=str(tmp_path / "nowhere"), num_classes=3)
    with pytest.raises(FileNotFoundError, match=r"no manifest.json under .*nowhere.*make-shards"):
        data.setup("fit")


def _read_ids(folder: Path, rank: int) -> list[list[int]]:
    lines = (folder / f"ids-rank{rank}.txt").read_text().splitlines()
    return [[int(i) for i in line.split()] for line in lines]


def test_ddp_ranks_get_equal_batches_and_cover_the_data(shards: tuple[Path, Path], tmp_path: Path) -> None:
    """Two processes (gloo), two workers each: the same number of steps, every image once."""
    _, out = shards
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, "-m", "dcd_lightning", "fit", *shard_args(out), "--trainer.strategy=ddp",
         "--trainer.devices=2", "--data.init_args.num_workers=2", "--data.init_args.with_ids=true",
         "--trainer.max_epochs=1", "--trainer.limit_val_batches=2", "--trainer.logger=false",
         "--trainer.callbacks+=_training_helpers.RecordSampleIds", f"--trainer.callbacks.folder={tmp_path / 'ids'}",
         f"--trainer.default_root_dir={tmp_path}"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env, check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [_read_ids(tmp_path / "ids", rank) for rank in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 6
    seen = [i for rank in ranks for batch in rank for i in batch]
    assert sorted(seen) == list(range(3 * PER_CLASS))
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)  # saved once, by rank 0
    assert (checkpoint["epoch"], checkpoint["global_step"]) == (0, 6)


def test_ddp_validation_on_shards_equals_one_process(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """15 validation images (not a multiple of the 2 processes or of the batch): under DDP the
    shards' validation counts every image once, as one process does (loss and accuracy equal; the
    seeded, untrained model's losses differ from image to image)."""
    import re

    folder = write_image_folder(tmp_path / "folder", per_class=5, size=(40, 48))
    make_shards(folder, str(tmp_path / "shards"), workers=1, chunk_bytes="8KB")
    common = ["validate", *shard_args(tmp_path / "shards"), "--trainer.logger=false",
              f"--trainer.default_root_dir={tmp_path}"]

    def results(text: str) -> dict[str, float]:
        return {key: float(value) for key, value in re.findall(r"(val/\w+)[\s│|]+([0-9.e+-]+)", text)}

    capsys.readouterr()
    assert main(common) == 0
    one = results(capsys.readouterr().out)
    run = subprocess.run([sys.executable, "-m", "dcd_lightning", *common, "--trainer.devices=2", "--trainer.strategy=ddp"],
                         capture_output=True, text=True, timeout=600, cwd=tmp_path, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    assert set(one) == {"val/loss", "val/acc1", "val/acc5"}
    assert results(run.stdout) == pytest.approx(one, rel=1e-6)


def test_mid_epoch_resume_continues_with_the_next_unseen_batch(shards: tuple[Path, Path], tmp_path: Path) -> None:
    """Stopped (Ctrl-C) after 3 of 6 steps of the second epoch and resumed from last.ckpt, the run sees
    exactly the batches an uninterrupted run sees, in the same order (two loader workers)."""
    _, out = shards
    common = shard_args(out, "--data.init_args.num_workers=2", "--data.init_args.with_ids=true",
                        "--data.init_args.batch_size=4", "--trainer.max_epochs=2", "--trainer.limit_val_batches=1",
                        "--trainer.logger=false", "--trainer.callbacks+=_training_helpers.RecordSampleIds")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main(["fit", *common, f"--trainer.callbacks.folder={straight / 'ids'}",
                 f"--trainer.default_root_dir={straight}"]) == 0
    handler = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit):
            main(["fit", *common, f"--trainer.callbacks.folder={resumed / 'ids'}",
                  "--trainer.callbacks+=_training_helpers.InterruptAtStep", "--trainer.callbacks.step=9",
                  f"--trainer.default_root_dir={resumed}"])
    finally:
        signal.signal(signal.SIGINT, handler)
    stopped = torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=False)
    assert (stopped["epoch"], stopped["global_step"]) == (1, 9)
    assert main(["fit", *common, f"--trainer.callbacks.folder={resumed / 'ids'}", "--ckpt_path=last",
                 f"--trainer.default_root_dir={resumed}"]) == 0
    expected = _read_ids(straight / "ids", 0)
    assert len(expected) == 12
    assert _read_ids(resumed / "ids", 0) == expected
    # each image's augmentation is seeded by (seed, epoch, id): the same draws, so the same weights
    a, b = (torch.load(root / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"] for root in (straight, resumed))
    for key, value in a.items():
        assert torch.allclose(value.float(), b[key].float(), atol=1e-6), key


@pytest.mark.parametrize("decoder", ["pil", "torchvision"])
def test_corrupt_image_in_a_shard_is_named_or_skipped(shards: tuple[Path, Path], tmp_path: Path, decoder: str) -> None:
    """An image whose bytes are damaged inside a shard file is named (path, id, shards) or skipped."""
    folder, written = shards
    out = tmp_path / "shards"
    shutil.copytree(written, out)
    bad = min((folder / "train" / "n01443537").glob("*.JPEG"))
    original = bad.read_bytes()
    for chunk in (out / "train").glob("*.bin"):
        data = chunk.read_bytes()
        if original in data:  # overwrite the JPEG's start-of-image marker and header in place
            chunk.write_bytes(data.replace(original, b"\0" * 16 + original[16:]))
            break
    else:
        raise AssertionError("the image's bytes are not in any shard")
    args = shard_args(out, "--data.init_args.batch_size=24", "--trainer.fast_dev_run=1", f"--data.init_args.decoder={decoder}",
                      f"--trainer.default_root_dir={tmp_path / 'run'}")
    relative = "n01443537/" + bad.name
    with pytest.raises(RuntimeError, match=rf"cannot read image {relative} \(image \d+\) in the shards at .*skip_corrupt=true"):
        main(["fit", *args])
    with pytest.warns(UserWarning, match=rf"skipped unreadable image {relative}"):
        assert main(["fit", *args, "--data.init_args.skip_corrupt=true"]) == 0


@pytest.mark.parametrize("module", ["ImageNetDataModule", "ImageNetShardsDataModule"])
def test_both_imagenet_forms_name_a_bad_loader_argument(module: str) -> None:
    from dcd_lightning import data

    cls = getattr(data, module)
    with pytest.raises(ValueError, match=rf"{module}: batch_size=0 is not allowed; expected an integer >= 1"):
        cls(batch_size=0)
    with pytest.raises(ValueError, match=rf"{module}: num_workers=-1 is not allowed; expected >= 0"):
        cls(num_workers=-1)
