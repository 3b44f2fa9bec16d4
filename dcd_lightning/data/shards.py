"""ImageNet as streaming shards (litdata): writing them from an ImageFolder tree, and training from them.

    python -m dcd_lightning make-shards --root data/imagenet --out data/imagenet-shards --workers 8
    python -m dcd_lightning fit --config configs/paper/table4_mobilenetv2_x0.5_dcd.yaml \\
        --config configs/presets/shards.yaml --data.init_args.root s3://bucket/imagenet-shards

Each split becomes a litdata StreamingDataset (`<out>/train`, `<out>/val`: chunk files and an
index) whose items hold the JPEG's bytes as stored (no re-encoding), its class index, its index in
the ImageFolder order and its path relative to the split, plus `<out>/manifest.json` with the class
names and the image count of each split and class. Why litdata (measured in docs/data.md): its
loader's state goes into Lightning's checkpoints, so a run stopped mid-epoch resumes at the next
unseen batch; it gives every DDP rank the same number of samples; and it reads local folders and
s3:// (gs://, azure://) URLs itself, caching chunks locally.
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import lightning as L
import litdata
import torch
from PIL import Image

from .imagenet import (
    LAYOUT,
    CorruptImageError,
    check_loader_args,
    collate_skipping_none,
    eval_transform,
    refuse_empty_batch_on_one_rank,
    train_transform,
)
from .sampling import processes_of, seeded_draws, warn_partial_batch

MANIFEST = "manifest.json"
FORMAT = "dcd-lightning ImageNet shards v1 (litdata)"
SPLITS = ("train", "val")


# -- writing ------------------------------------------------------------------------------------


def _source_samples(root: Path, split: str, classes: list[str] | None = None) -> tuple[list[str], list[tuple[str, int]]]:
    """(class names, [(path, class index)]) of a split, exactly as torchvision's ImageFolder orders them."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    folder = root / split
    if not folder.is_dir():
        raise FileNotFoundError(f"make-shards: {folder} does not exist; expected {LAYOUT}")
    found, mapping = find_classes(str(folder))
    if classes is not None and found != classes:
        raise ValueError(f"make-shards: {folder} holds other class folders than train/ ({len(found)} vs {len(classes)})")
    return found, make_dataset(str(folder), mapping, IMG_EXTENSIONS)


def _shard_item(item: list[Any]) -> dict[str, Any]:
    """One stored item: the file's bytes as they are, its class, its ImageFolder index and relative path."""
    index, path, label, relative = item
    with open(path, "rb") as handle:
        data = handle.read()
    return {"id": index, "image": data, "label": label, "path": relative}


def _write_text(url: str, text: str) -> None:
    if url.startswith("s3://"):
        import boto3

        bucket, _, key = url[5:].partition("/")
        boto3.client("s3").put_object(Bucket=bucket, Key=key, Body=text.encode())
        return
    Path(url).write_text(text)


def read_text(url: str) -> str | None:
    """A small file from a local path or an s3:// URL; None if it does not exist."""
    if url.startswith("s3://"):
        import boto3

        bucket, _, key = url[5:].partition("/")
        client = boto3.client("s3")
        try:
            return client.get_object(Bucket=bucket, Key=key)["Body"].read().decode()
        except client.exceptions.NoSuchKey:
            return None
    path = Path(url)
    return path.read_text() if path.exists() else None


def _is_remote(url: str) -> bool:
    """True for the object-store URLs litdata reads and writes itself."""
    return url.startswith(("s3://", "gs://", "azure://"))


def _join(base: str, name: str) -> str:
    return base.rstrip("/") + "/" + name


def make_shards(root: str | Path, out: str, workers: int = 1, chunk_bytes: str = "64MB") -> dict[str, Any]:
    """Write `root`'s train and val folders as shards under `out` and return the manifest.

    Resumable: a split recorded complete in the manifest is skipped, and litdata's checkpoints let
    an interrupted split continue where it stopped. Each split's shard count is checked against
    the source before it is recorded.
    """
    root = Path(root)
    classes, _ = _source_samples(root, "train")
    manifest = json.loads(read_text(_join(out, MANIFEST)) or "null") or {
        "format": FORMAT, "source": str(root.resolve()), "classes": classes, "splits": {},
    }
    if manifest.get("format") != FORMAT or manifest["classes"] != classes:
        raise ValueError(
            f"make-shards: {out} holds shards of another source or format; choose a new --out or delete it"
        )
    # Same classes but another folder (another subset, another copy) would be rewritten split by split
    # under the first folder's manifest. A relative path in an older manifest resolves against the cwd.
    if Path(manifest["source"]).resolve() != root.resolve():
        raise ValueError(
            f"make-shards: {out} holds shards of {manifest['source']}, not of {root}; to continue or check those, "
            f"pass --root {manifest['source']}; for {root}, choose a new --out or delete it"
        )
    if not _is_remote(out):
        Path(out).mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        _, samples = _source_samples(root, split, classes)
        per_class = Counter(label for _, label in samples)
        expected = {"images": len(samples), "per_class": [per_class.get(i, 0) for i in range(len(classes))]}
        done = manifest["splits"].get(split)
        if done and done["images"] == expected["images"] and done["per_class"] == expected["per_class"]:
            print(f"make-shards: {split}: {done['images']} images already written, skipped")
            continue
        # lists, not tuples: litdata's resume compares the items with their JSON copy in its checkpoint
        items = [[i, path, label, str(Path(path).relative_to(root / split))] for i, (path, label) in enumerate(samples)]
        print(f"make-shards: {split}: {len(items)} images of {len(classes)} classes -> {_join(out, split)}")
        start_method = multiprocessing.get_start_method(allow_none=True)
        try:
            litdata.optimize(
                fn=_shard_item, inputs=items, output_dir=_join(out, split), chunk_bytes=chunk_bytes,
                num_workers=max(1, workers), use_checkpoint=True,
                mode=None if _has_checkpoint(out, split) else "overwrite", keep_data_ordered=True, verbose=True,
                start_method=_start_method(out),
            )
        finally:  # litdata sets the process-wide start method (to spawn); data loaders after it would inherit it
            multiprocessing.set_start_method(start_method, force=True)
        written = len(litdata.StreamingDataset(_join(out, split)))
        if written != len(items):
            raise RuntimeError(f"make-shards: {split}: wrote {written} images but the source has {len(items)}")
        manifest["splits"][split] = expected
        _write_text(_join(out, MANIFEST), json.dumps(manifest, indent=1))
    return manifest


def _start_method(out: str) -> str | None:
    """fork for local output where the platform has it (workers start in milliseconds, not by
    re-importing torch); litdata's own choice (spawn) for remote output, which uploads from threads."""
    return "fork" if not _is_remote(out) and "fork" in multiprocessing.get_all_start_methods() else None


def _has_checkpoint(out: str, split: str) -> bool:
    """True when an interrupted litdata run left checkpoints for this split (a local folder only)."""
    folder = Path(_join(out, split))
    return not _is_remote(out) and (folder / ".checkpoints").is_dir()


# -- reading ------------------------------------------------------------------------------------


def _decode_pil(data: bytes) -> Any:
    return Image.open(io.BytesIO(data)).convert("RGB")


def _decode_tensor(data: bytes) -> torch.Tensor:
    """JPEG bytes -> uint8 (3, H, W) by libjpeg-turbo through torchvision; other formats through PIL."""
    from torchvision.io import ImageReadMode, decode_jpeg
    from torchvision.transforms.functional import pil_to_tensor

    try:
        return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except RuntimeError:  # not a JPEG (ImageNet has a few PNG and CMYK files named .JPEG)
        return pil_to_tensor(_decode_pil(data))


class ShardImages(litdata.StreamingDataset):
    """Shard items decoded and transformed like the ImageFolder form's: (image, label[, id]).

    decoder="pil" decodes with PIL and applies the PIL transforms; "torchvision" decodes with
    torchvision.io.decode_jpeg to a uint8 tensor and applies the same transforms to tensors.
    """

    def __init__(self, url: str, transform: Any, skip_corrupt: bool, with_ids: bool, decoder: str = "pil",
                 augment_seed: int | None = None, **kwargs: Any) -> None:
        super().__init__(url, **kwargs)
        self.url, self.image_transform, self.augment_seed = url, transform, augment_seed
        self.skip_corrupt, self.with_ids = skip_corrupt, with_ids
        self.decode = _decode_tensor if decoder == "torchvision" else _decode_pil

    def __getitem__(self, index: Any) -> tuple[Any, ...] | None:
        item = super().__getitem__(index)
        try:
            image = self.decode(bytes(item["image"]))
        except (OSError, ValueError, SyntaxError) as error:
            where = f"{item['path']} (image {item['id']}) in the shards at {self.url}"
            if self.skip_corrupt:
                warnings.warn(f"ImageNetShardsDataModule: skipped unreadable image {where}: {error}", stacklevel=2)
                return None
            raise CorruptImageError(
                f"ImageNetShardsDataModule: cannot read image {where}: {error}. Rewrite the shards from a "
                "fixed source, or set data.init_args.skip_corrupt=true to skip unreadable images (each is reported)"
            ) from error
        if self.augment_seed is None:
            sample = (self.image_transform(image), int(item["label"]))
        else:  # each image's draws from (seed, epoch, id) alone, as EpochSeeded does for the folders
            with seeded_draws(self.augment_seed, self.current_epoch, int(item["id"])):
                sample = (self.image_transform(image), int(item["label"]))
        return (*sample, int(item["id"])) if self.with_ids else sample


class ImageNetShardsDataModule(L.LightningDataModule):
    """ImageNet from shards written by `make-shards`, streamed from a local folder or a URL.

    The same transforms, class indices and corrupt-image policy as ImageNetDataModule. Training
    data are shuffled by (seed, epoch) and every DDP rank and worker gets the same number of
    samples: a sample count that does not divide evenly drops at most world_size x num_workers x
    batch_size - 1 training images per epoch (validation drops none). The loader's position is in
    Lightning's checkpoints, so a run resumed from a mid-epoch checkpoint continues with the next
    unseen batch. Remote shards are cached under `cache_dir` (litdata's default if None).
    `with_ids=True` adds each image's index in the ImageFolder order to the batches. `decoder`:
    "pil" (the folder form's), "torchvision" (torchvision.io.decode_jpeg and the same transforms on
    tensors) or "auto": torchvision for training, where bench-data measured it faster, and PIL for
    evaluation, so that validation preprocessing equals the folder form's exactly.
    """

    def __init__(
        self,
        root: str = "data/imagenet-shards",
        batch_size: int = 256,
        num_workers: int = 8,
        num_classes: int = 1000,
        train_crop: int = 224,
        eval_resize: int = 256,
        eval_crop: int = 224,
        pin_memory: bool = True,
        skip_corrupt: bool = False,
        seed: int = 0,
        cache_dir: str | None = None,
        with_ids: bool = False,
        decoder: str = "auto",
    ) -> None:
        super().__init__()
        check_loader_args(type(self).__name__, batch_size, num_workers, num_classes, train_crop, eval_resize, eval_crop)
        if decoder not in ("auto", "pil", "torchvision"):
            raise ValueError(
                f"ImageNetShardsDataModule: decoder={decoder!r} is not allowed; expected 'auto', 'pil' or 'torchvision'"
            )
        self.save_hyperparameters()
        self.num_classes = num_classes
        self.input_size = eval_crop
        self.datasets: dict[str, Any] = {}

    def _manifest(self) -> dict[str, Any]:
        root = self.hparams.root
        text = read_text(_join(root, MANIFEST))
        if text is None:
            raise FileNotFoundError(
                f"ImageNetShardsDataModule: no {MANIFEST} under {root!r}; write the shards with "
                "`python -m dcd_lightning make-shards --root IMAGENET --out DIR` (and copy DIR there)"
            )
        manifest = json.loads(text)
        missing = [split for split in SPLITS if split not in manifest.get("splits", {})]
        if missing:
            raise ValueError(f"ImageNetShardsDataModule: the shards under {root!r} lack {missing}; rerun make-shards")
        return manifest

    def setup(self, stage: str | None = None) -> None:
        """Open the train (for fit) and val shards and check the class count against the manifest."""
        hp = self.hparams
        manifest = self._manifest()
        if len(manifest["classes"]) != hp.num_classes:
            raise ValueError(
                f"ImageNetShardsDataModule: the shards under {hp.root!r} hold {len(manifest['classes'])} classes "
                f"but num_classes={hp.num_classes}; set data.init_args.num_classes={len(manifest['classes'])}"
            )
        dataset = ShardImages
        options = {"cache_dir": hp.cache_dir, "skip_corrupt": hp.skip_corrupt, "with_ids": hp.with_ids}
        # auto: decode_jpeg for training (faster, measured by bench-data), PIL for evaluation, whose
        # preprocessing then equals the folder form's pixel for pixel
        train_decoder = "torchvision" if hp.decoder == "auto" else hp.decoder
        eval_decoder = "pil" if hp.decoder == "auto" else hp.decoder
        if stage in (None, "fit") and "train" not in self.datasets:
            transform = train_transform(hp.train_crop, train_decoder == "torchvision")
            self.datasets["train"] = dataset(_join(hp.root, "train"), transform, shuffle=True, drop_last=True,
                                             seed=hp.seed, decoder=train_decoder, augment_seed=hp.seed, **options)
        if "val" not in self.datasets:
            transform = eval_transform(hp.eval_resize, hp.eval_crop, eval_decoder == "torchvision")
            self.datasets["val"] = dataset(_join(hp.root, "val"), transform, shuffle=False, drop_last=False,
                                           decoder=eval_decoder, **options)
        self.classes = manifest["classes"]

    def _loader(self, split: str, drop_last: bool | None = None) -> Any:
        hp = self.hparams
        loader = litdata.StreamingDataLoader(
            self.datasets[split], batch_size=hp.batch_size, num_workers=hp.num_workers,
            pin_memory=hp.pin_memory and torch.cuda.is_available(),
            drop_last=split == "train" if drop_last is None else drop_last,
            collate_fn=collate_skipping_none if hp.skip_corrupt else None,
        )
        if split != "train" or drop_last is not None or len(loader) > 0:
            return loader
        # fewer images per process than a batch: dropping the partial batch would leave none, and
        # the fit would stop at once ("no training batches"); train on the partial batch instead
        images = self._manifest()["splits"][split]["images"]
        processes = processes_of(self)
        if images < processes:
            raise ValueError(
                f"{type(self).__name__}: the {images} training images under {hp.root!r} leave some of the "
                f"{processes} processes none; train on fewer processes (trainer.devices, trainer.num_nodes)"
            )
        loader = self._loader(split, drop_last=False)
        warn_partial_batch(self, images, loader.dataset.get_len(hp.num_workers, hp.batch_size), hp.batch_size)
        return loader

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Stop where one process of several would have to skip a training batch (no readable image)."""
        return refuse_empty_batch_on_one_rank(self, batch)

    def train_dataloader(self) -> Any:
        """Shuffled training batches; the same number on every rank."""
        return self._loader("train")

    def val_dataloader(self) -> Any:
        """Validation batches."""
        return self._loader("val")

    def test_dataloader(self) -> Any:
        """ImageNet has no public test labels: the validation split."""
        return self._loader("val")

    def predict_dataloader(self) -> Any:
        """The validation split."""
        return self._loader("val")


# -- command ------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dcd_lightning make-shards", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", required=True, help=f"the ImageNet folder: {LAYOUT}")
    parser.add_argument("--out", required=True, help="where the shards go: a folder, or an s3:// URL")
    parser.add_argument("--workers", type=int, default=1, help="processes reading the source (default 1)")
    parser.add_argument("--chunk-bytes", default="64MB", help="shard (chunk) size (default 64MB)")
    args = parser.parse_args(argv)
    try:
        manifest = make_shards(args.root, args.out, args.workers, args.chunk_bytes)
    except (FileNotFoundError, ValueError) as error:
        parser.error(str(error))
    for split, counts in manifest["splits"].items():
        print(f"{split}: {counts['images']} images, {len(manifest['classes'])} classes "
              f"(checked against {args.root}/{split})")
    print(f"manifest: {_join(args.out, MANIFEST)}")
    return 0


__all__ = ["ImageNetShardsDataModule", "main", "make_shards", "read_text"]
