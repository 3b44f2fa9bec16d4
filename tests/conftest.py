"""Shared fixtures: offline W&B, a tiny ImageNet-layout image folder generated on the fly, the
threads of each pytest-xdist worker, and the ONNX export of every registry model started in the
background (see pytest_collection_finish)."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("MPLBACKEND", "Agg")


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity where the platform tells it)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# pyproject's addopts run the suite on pytest-xdist workers (pytest_xdist_auto_num_workers). In a
# worker, PyTorch gets that worker's share of the CPUs for its threads, and so do the processes its
# tests start (they inherit OMP_NUM_THREADS): the workers then do not oversubscribe the cores
WORKER = os.environ.get("PYTEST_XDIST_WORKER")
if WORKER is not None:
    THREADS = max(1, available_cpus() // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    os.environ["OMP_NUM_THREADS"] = str(THREADS)
    import torch

    torch.set_num_threads(THREADS)


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """`-n auto`: one worker per CPU, at most four (each holds a PyTorch and its models in memory;
    on two cores the suite took 7-9.5 minutes this way, 10-10.5 in one process)."""
    return max(1, min(4, available_cpus()))


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


ONNX_TEST = "test_onnx_export_of_every_registry_model_runs_at_another_batch_size"


# fixtures that build something slow once per process (a module's training runs and sweep, the
# kernel with the other register block): under xdist the tests using one go to a single worker
# (--dist loadgroup), so that it is built once
SHARED_FIXTURES = ("small_runs", "blocking")


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run the ONNX test of every registry model last, its exports running in the background
    meanwhile; under xdist first, so that its worker starts on it while the other takes the rest.
    Tests using one of SHARED_FIXTURES share an xdist group."""
    for item in items:
        shared = [name for name in SHARED_FIXTURES if name in getattr(item, "fixturenames", ())]
        if shared:
            item.add_marker(pytest.mark.xdist_group(shared[0]))
    onnx = [item for item in items if item.name == ONNX_TEST]
    rest = [item for item in items if item.name != ONNX_TEST]
    items[:] = onnx + rest if WORKER is not None else rest + onnx


def pytest_collection_finish(session: pytest.Session) -> None:
    """When the ONNX test is to run in a single process (`-n 0`), start its exports now, in one
    child process: ~1.5 minutes of single-threaded work that then overlaps the rest of the suite
    instead of adding to it; the test collects and checks the results. Under xdist the test runs
    them itself, first on its worker (pytest_collection_modifyitems)."""
    if WORKER is None and not session.config.option.collectonly and any(item.name == ONNX_TEST for item in session.items):
        import test_deploy

        test_deploy.start_background_onnx_exports()


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Stop the background exports if the ONNX test did not collect them (a failure before it)."""
    import sys

    module = sys.modules.get("test_deploy")
    if module is not None:
        module.stop_background_onnx_exports()


@pytest.fixture
def registry_restored():
    """The model registry as it was before the test (tests register models of their own)."""
    from dcd_lightning.models import registry

    saved = dict(registry._REGISTRY)
    yield registry
    registry._REGISTRY.clear()
    registry._REGISTRY.update(saved)


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str, str], None]]:
    """write(name, text): a module of the user's in tmp_path, importable during this test only (it
    leaves sys.path and sys.modules as they were, so no later test imports it by chance)."""
    written: list[str] = []
    monkeypatch.syspath_prepend(str(tmp_path))

    def write(name: str, text: str) -> None:
        (tmp_path / f"{name}.py").write_text(text)
        written.append(name)

    yield write
    for name in written:
        sys.modules.pop(name, None)
