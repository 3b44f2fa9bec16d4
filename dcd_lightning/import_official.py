"""`python -m dcd_lightning import-official CKPT --out FILE`: an official DCD checkpoint, ours.

Reads a checkpoint of the official release (its `state_dict`, with or without DataParallel's
`module.` prefix; torch.load with weights_only=True), builds the matching registry model, checks
that it loads strictly, and writes a Lightning checkpoint of the weights, for the model's paper
config: `validate`/`test`/`predict` take it as `--ckpt_path`; `fit` starts from its weights with
`--model.init_args.init_weights` (it holds no optimizer state to resume):

    python -m dcd_lightning import-official mobilenetv2_dcd.pth.tar --out mv2_dcd.ckpt
    python -m dcd_lightning validate --config configs/paper/table4_mobilenetv2_x1.0_dcd.yaml \\
        --ckpt_path mv2_dcd.ckpt --data.init_args.root /path/to/imagenet
    python -m dcd_lightning fit --config configs/paper/table4_mobilenetv2_x1.0_dcd.yaml \\
        --model.init_args.init_weights mv2_dcd.ckpt --data.init_args.root /path/to/imagenet
"""

from __future__ import annotations

import argparse
from pathlib import Path

import lightning
import torch

from .models.weights import convert_official_state_dict, read_official_state_dict


def lightning_checkpoint(path: str | Path) -> tuple[str, dict]:
    """(registry name, Lightning checkpoint dict) for an official checkpoint file."""
    name, model, mapped = convert_official_state_dict(read_official_state_dict(path))
    model.load_state_dict(mapped, strict=True)
    checkpoint = {
        "state_dict": {f"model.{key}": value for key, value in model.state_dict().items()},
        "pytorch-lightning_version": lightning.__version__,
        "dcd_lightning_model": name,
    }
    return name, checkpoint


def main(argv: list[str] | None = None) -> int:
    """Convert one official checkpoint."""
    parser = argparse.ArgumentParser(prog="python -m dcd_lightning import-official", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="official checkpoint (.pth / .pth.tar)")
    parser.add_argument("--out", required=True, help="where to write the Lightning checkpoint")
    args = parser.parse_args(argv)
    if not Path(args.checkpoint).is_file():
        parser.error(f"{args.checkpoint}: no such file")
    name, checkpoint = lightning_checkpoint(args.checkpoint)
    torch.save(checkpoint, args.out)
    print(f"{args.checkpoint}: official weights of {name}; wrote {args.out}")
    print(f"use it with: python -m dcd_lightning validate --config configs/paper/table4_{name}.yaml "
          f"--ckpt_path {args.out}\n(to train from it: fit ... --model.init_args.init_weights {args.out})")
    return 0
