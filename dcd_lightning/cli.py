"""Command line: LightningCLI's fit/validate/test/predict, plus the project's own tools.

Lightning is imported only for its commands (the CLI class is in lightning_cli.py): `--help` and
the tools start without it (its import takes a few seconds).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

from .sweep import TRIAL_ENV

TOOLS: dict[str, tuple[str, str]] = {
    "profile": ("dcd_lightning.profile_cmd", "parameters and MAdds of a config's model, beside the paper's"),
    "bench": ("dcd_lightning.bench_models", "latency, training step and memory of each model vs static"),
    "bench-ops": ("dcd_lightning.bench_ops", "time each operator against the static convolution"),
    "bench-gpu": ("dcd_lightning.bench_gpu", "training throughput on a GPU (bf16, channels_last, compile)"),
    "export-onnx": ("dcd_lightning.export", "a model as ONNX with a dynamic batch axis, checked by onnxruntime"),
    "bench-data": ("dcd_lightning.bench_data", "images/s of the ImageFolder and shard loaders, and JPEG decoding"),
    "make-shards": ("dcd_lightning.data.shards", "write ImageNet (ImageFolder) as streaming shards, resumable"),
    "import-official": ("dcd_lightning.import_official", "convert an official DCD checkpoint to ours"),
    "make-paper-configs": ("dcd_lightning.paper_configs", "write configs/paper/ from the model registry"),
    "sweep": ("dcd_lightning.sweep", "run a W&B sweep file's trials here, without a W&B server"),
}

USAGE = """usage: python -m dcd_lightning COMMAND [options]

Train and evaluate (LightningCLI; stack configs with --config A --config B):
  fit          train a model, e.g. python -m dcd_lightning fit --config configs/quickstart.yaml
  validate     evaluate on the validation split
  test         evaluate on the test split
  predict      class probabilities of the predict split, saved to <default_root_dir>/predictions.pt

Tools:
{tools}

Run `python -m dcd_lightning COMMAND --help` for a command's options.
"""

# the exit status of a run stopped by SIGTERM (last.ckpt saved): 128 + the signal's number, as a shell reports
SIGTERM_STATUS = 143

# operator options that name an ablation: they become W&B tags
ABLATION_KEYS = ("latent_mult", "num_blocks", "channel_attention", "channel_fusion", "fusion", "num_kernels",
                 "num_experts", "layout", "reduction", "fc_squeeze")


def sweep_trial_folder() -> str | None:
    """Sub-folder of default_root_dir for a sweep trial: ours, or a W&B agent's (sweep and run id)."""
    if os.environ.get(TRIAL_ENV):
        return os.environ[TRIAL_ENV]
    if os.environ.get("WANDB_SWEEP_ID") and os.environ.get("WANDB_RUN_ID"):
        return os.path.join(f"sweep-{os.environ['WANDB_SWEEP_ID']}", os.environ["WANDB_RUN_ID"])
    return None


def _checkpoint_dir(root: str | None) -> str:
    return os.path.join(root or ".", "checkpoints")


def _walk_operators(node: Any, path: str = "") -> list[tuple[str, str, dict]]:
    """(placement, operator class, init_args) of every class_path in the backbone's init_args (the
    package's operators and any other: a user's own operator names the run too)."""
    found = []
    if isinstance(node, dict):
        if "class_path" in node:
            found.append((path, str(node["class_path"]).rsplit(".", 1)[-1], dict(node.get("init_args") or {})))
        for key, value in node.items():
            found += _walk_operators(value, key if key not in ("init_args", "class_path") else path)
    return found


def describe_run(config: dict) -> tuple[str, list[str]]:
    """A run name and tags from a resolved config: backbone, operators, ablation values."""
    backbone = ((config.get("model") or {}).get("init_args") or {}).get("backbone") or {}
    args = backbone.get("init_args") or {}
    label = str(backbone.get("class_path", "model")).rsplit(".", 1)[-1].lower()
    if "width_mult" in args:
        label += f"_x{args['width_mult']}"
    if "depth" in args:
        label += str(args["depth"])
    tags = [label]
    parts = [label]
    for placement, name, options in _walk_operators(args):
        if name.startswith("Static"):
            continue
        tags.append(f"{placement}:{name}")
        parts.append(f"{placement}-{name}")
        for key in ABLATION_KEYS:
            if key in options:
                tags.append(f"{key}={options[key]}")
    return "_".join(parts), sorted(set(tags))


def _tool(name: str) -> Callable[[list[str]], int]:
    import importlib

    return importlib.import_module(TOOLS[name][0]).main


def main(argv: list[str] | None = None) -> int:
    """Dispatch `python -m dcd_lightning ...` to LightningCLI or to one of the tools."""
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        tools = "\n".join(f"  {name:<19} {text}" for name, (_, text) in TOOLS.items())
        print(USAGE.format(tools=tools))
        return 0 if argv else 2
    if argv[0] in TOOLS:
        return _tool(argv[0])(argv[1:])
    from lightning.pytorch import LightningDataModule, LightningModule
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from .lightning_cli import DCDLightningCLI, DCDSaveConfig

    try:
        DCDLightningCLI(
            LightningModule,
            LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            args=None if from_command_line else argv,
            save_config_callback=DCDSaveConfig,
            save_config_kwargs={"overwrite": True},
        )
    except SIGTERMException:
        # Lightning stops a run on SIGTERM with a SystemExit that carries no code, which exits 0; a
        # scheduler or a `fit && next` script would take the interrupted run for a finished one.
        _close_process_group()
        return SIGTERM_STATUS
    _close_process_group()
    return 0


def _close_process_group() -> None:
    """Destroy the run's process group (DDP) before the interpreter exits.

    Lightning leaves it open; a gloo group still open at exit aborted the process
    ("terminate called without an active exception", exit -6) in about one of four
    two-process CPU runs here, after training had finished and saved.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
