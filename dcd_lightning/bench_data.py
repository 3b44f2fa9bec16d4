"""`python -m dcd_lightning bench-data`: training-loader throughput of the ImageFolder and the shard forms.

    python -m dcd_lightning bench-data [--images 1024] [--workers 1,2,8] [--batch-size 64] [--folder DIR]

Writes a generated ImageNet-like set (natural-looking 500x375 JPEGs at quality 90, ~60 KB each,
like ImageNet's) to a temporary folder unless --folder names an ImageFolder tree, writes its
shards, then times a training epoch (decode + random resized crop + flip + normalise, batches
collated) of each form at each worker count: images/s over a second epoch, from the moment its
iterator is made to its last batch (the first epoch starts the workers and is not timed). It also
times JPEG decoding alone with PIL and with torchvision.io.decode_jpeg.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ._args import positive_int
from .bench_ops import machine


def write_jpegs(root: Path, images: int, classes: int = 4, size: tuple[int, int] = (500, 375)) -> Path:
    """root/{train,val}/<class>/*.JPEG: smooth random scenes with grain, the size and entropy of photos."""
    rng = np.random.default_rng(0)
    width, height = size
    for split, count in (("train", images), ("val", max(classes, images // 10))):
        for index in range(count):
            folder = root / split / f"n{index % classes:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            coarse = Image.fromarray(rng.integers(0, 255, (height // 16, width // 16, 3), dtype=np.uint8))
            pixels = np.asarray(coarse.resize(size, Image.BICUBIC)).astype(np.int16)
            pixels = np.clip(pixels + rng.integers(-12, 12, pixels.shape), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{index:06d}.JPEG", quality=90)
    return root


def _epoch_rate(loader: torch.utils.data.DataLoader) -> float:
    """Images per second over a second epoch, from the moment its iterator is made to its last batch.

    The first epoch is not timed (processes start, files reach the page cache). Timing from the
    first batch's arrival instead would leave out everything the workers prepared while the clock
    waited: with 8 workers on 2 cores it read 1347 images/s against 157 with one."""
    for _ in loader:
        pass
    start, count = time.perf_counter(), 0
    for batch in loader:
        count += len(batch[1])
    elapsed = time.perf_counter() - start
    return count / elapsed if elapsed > 0 else float("nan")


def _jpegs(folder: Path) -> list[Path]:
    """The JPEG files under `folder` (.JPEG, .jpeg, .jpg, any case), in name order."""
    return sorted(path for path in folder.rglob("*") if path.suffix.lower() in (".jpeg", ".jpg"))


def decode_rates(folder: Path, limit: int = 200) -> dict[str, float]:
    """JPEG decoding alone (one thread): images/s of PIL and of torchvision.io.decode_jpeg."""
    from torchvision.io import decode_jpeg

    blobs = [path.read_bytes() for path in _jpegs(folder)[:limit]]
    rates = {}
    start = time.perf_counter()
    for blob in blobs:
        Image.open(io.BytesIO(blob)).convert("RGB").load()
    rates["PIL"] = len(blobs) / (time.perf_counter() - start)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        start = time.perf_counter()
        for blob in blobs:
            decode_jpeg(torch.frombuffer(bytearray(blob), dtype=torch.uint8))
        rates["torchvision.io.decode_jpeg"] = len(blobs) / (time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    return rates


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dcd_lightning bench-data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    cpus = os.cpu_count() or 1
    parser.add_argument("--images", type=positive_int, default=1024, help="training images to generate (default 1024)")
    parser.add_argument("--workers", default=",".join(str(w) for w in sorted({1, 2, cpus})),
                        help="comma-separated loader worker counts (default 1, 2 and this machine's CPUs)")
    parser.add_argument("--batch-size", type=positive_int, default=64)
    parser.add_argument("--folder", help="an existing ImageFolder tree to read instead of a generated one")
    args = parser.parse_args(argv)
    try:
        workers = [int(w) for w in args.workers.split(",") if w.strip()]
    except ValueError:
        workers = []
    if not workers or min(workers) < 0:
        parser.error(f"--workers {args.workers!r}: expected a comma-separated list of worker counts, each 0 or more")
    sizes = None  # of the training images, in bytes
    if args.folder:
        train = Path(args.folder) / "train"
        if not train.is_dir() or not (Path(args.folder) / "val").is_dir():
            parser.error(f"--folder {args.folder}: expected an ImageFolder tree with train/ and val/ class folders")
        sizes = [path.stat().st_size for path in train.rglob("*") if path.is_file()]
        args.images = len(sizes)
    if args.images < 2 * args.batch_size:
        given = f"--folder's {args.images} training images give" if args.folder else f"--images {args.images} gives"
        parser.error(f"{given} fewer than 2 batches of {args.batch_size}; the first batch is not timed, so use "
                     f"{'a larger folder' if args.folder else f'--images >= {2 * args.batch_size}'} or a smaller "
                     "--batch-size")
    from .data.imagenet import ImageNetDataModule
    from .data.shards import ImageNetShardsDataModule, make_shards

    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(args.folder) if args.folder else write_jpegs(Path(scratch) / "images", args.images)
        shards = str(Path(scratch) / "shards")
        with contextlib.redirect_stdout(io.StringIO()):  # litdata's progress and notices, before the tables
            make_shards(folder, shards, workers=max(1, max(workers)))
        classes = len([p for p in (folder / "train").iterdir() if p.is_dir()])
        if sizes is None:
            sizes = [p.stat().st_size for p in (folder / "train").rglob("*") if p.is_file()]
        print(f"machine: {machine()}\n\n{args.images} training images from {'--folder' if args.folder else 'the generator'}"
              f" (mean {np.mean(sizes) / 1024:.0f} KB), "
              f"batch {args.batch_size}, train transforms at 224\n")
        print("| loader | workers | images/s |\n|---|---:|---:|")
        for count in workers:
            common = {"batch_size": args.batch_size, "num_workers": count, "num_classes": classes, "pin_memory": False}
            forms = {
                "ImageFolder (PIL)": ImageNetDataModule(root=str(folder), **common),
                "shards (litdata, PIL)": ImageNetShardsDataModule(root=shards, decoder="pil", **common),
                "shards (litdata, decode_jpeg)": ImageNetShardsDataModule(root=shards, decoder="torchvision", **common),
            }
            for name, data in forms.items():
                data.setup("fit")
                print(f"| {name} | {count} | {_epoch_rate(data.train_dataloader()):.0f} |", flush=True)
        print("\n| JPEG decoding alone, one thread | images/s |\n|---|---:|")
        for name, rate in decode_rates(folder / "train").items():
            print(f"| {name} | {rate:.0f} |")
    return 0
