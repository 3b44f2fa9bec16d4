"""`python -m dcd_lightning profile`: parameters and MAdds of a config's model, beside the paper's.

    python -m dcd_lightning profile --config configs/paper/table4_mobilenetv2_x0.5_dcd.yaml [--json]
    python -m dcd_lightning profile --model resnet18_dcd

Counts follow the paper's conventions (dcd_lightning.profiling, docs/profiling.md). For a config
in configs/paper/ (or a registry name) the paper's numbers of that row are printed beside ours.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._args import positive_int
from .models.registry import _REGISTRY, get_model_spec
from .paper import paper_row
from .profiling import Profile, profile_model


def model_from_config(configs: list[str], overrides: list[str]) -> tuple[nn.Module, int]:
    """(backbone, input size) of the model a LightningCLI config describes, num_classes linked."""
    from lightning.pytorch import LightningDataModule, LightningModule

    from .lightning_cli import DCDLightningCLI

    args: list[str] = []
    for config in configs:
        args += ["--config", config]
    # only the model is used: a trainer on this machine's CPU, whatever devices the configs ask for
    # (a GPU preset would otherwise fail here on a machine without one)
    args += list(overrides) + ["--trainer.logger=false", "--trainer.enable_progress_bar=false",
                               "--trainer.enable_checkpointing=false", "--trainer.accelerator=cpu",
                               "--trainer.devices=1", "--trainer.num_nodes=1", "--trainer.strategy=auto",
                               "--trainer.precision=32-true"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # LightningCLI warns when args differ from sys.argv
        cli = DCDLightningCLI(LightningModule, LightningDataModule, subclass_mode_model=True,
                              subclass_mode_data=True, args=args, run=False)
    backbone = getattr(cli.model, "model", cli.model)
    size = getattr(cli.datamodule, "input_size", 224)
    return backbone, int(size)


def registry_name(config: str) -> str | None:
    """The registry model a configs/paper/<table>_<name>.yaml file stands for, if any."""
    stem = Path(config).stem
    name = stem.split("_", 1)[1] if "_" in stem else stem
    return name if name in _REGISTRY else None


PAPER_SIZE = 224


def same_architecture(model: nn.Module, name: str) -> bool:
    """Whether `model` has the parameters and buffers, by name and shape, of the registry model
    `name` built for as many classes."""
    try:
        with torch.no_grad():
            classes = int(copy.deepcopy(model).eval()(torch.zeros(1, 3, 32, 32)).shape[-1])
    except (RuntimeError, ValueError):  # another input layout altogether
        return False

    def shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
        return {key: tuple(value.shape) for key, value in module.state_dict().items()}

    return shapes(model) == shapes(get_model_spec(name).build(num_classes=classes))


def report(profile: Profile, name: str | None) -> dict[str, Any]:
    """The profile as a JSON-ready dict, with the paper's rows for a registry model."""
    rows = []
    if name is not None and profile.input_size == PAPER_SIZE:  # the paper counts at 224x224
        for table, index in get_model_spec(name).paper:
            row = paper_row(table, index)
            rows.append({"table": table, "row": index, "params_m": row["params"], "madds_m": row["madds"],
                         "top1": row.get("top1")})
    return {
        "model": name,
        "input_size": profile.input_size,
        "params": profile.paper_params,
        "params_all": profile.params,
        "classifier_params": profile.classifier_params,
        "madds": profile.madds,
        "by_type": {kind: {"count": c, "params": p, "madds": m} for kind, (c, p, m) in profile.by_kind().items()},
        "paper": rows,
    }


def print_report(data: dict[str, Any]) -> None:
    """Human-readable table of a report."""
    size = data["input_size"]
    print(f"model: {data['model'] or '(not a registry model)'}, input {size}x{size}\n")
    print(f"{'layer type':<40} {'count':>5} {'params':>12} {'MAdds':>14}")
    for kind, row in data["by_type"].items():
        print(f"{kind:<40} {row['count']:>5} {row['params']:>12,} {row['madds']:>14,}")
    print(f"{'counted layers':<40} {'':>5} {sum(r['params'] for r in data['by_type'].values()):>12,} "
          f"{data['madds']:>14,}")
    print(f"\nparameters: {data['params']:,} as the paper counts "
          f"({'without' if data['params'] != data['params_all'] else 'with'} the classifier's "
          f"{data['classifier_params']:,}); {data['params_all']:,} in all")
    print(f"MAdds: {data['madds'] / 1e6:.1f}M per image")
    for row in data["paper"]:
        params = data["params"] / 1e6
        madds = data["madds"] / 1e6
        print(f"paper {row['table']}[{row['row']}]: params {row['params_m']}M (ours {params:.2f}M, "
              f"{params / row['params_m'] - 1:+.1%}), MAdds {row['madds_m']}M (ours {madds:.1f}M, "
              f"{madds / row['madds_m'] - 1:+.1%}), top-1 {row['top1']}")


def main(argv: list[str] | None = None) -> int:
    """Profile a config or a registry model."""
    parser = argparse.ArgumentParser(prog="python -m dcd_lightning profile", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", action="append", help="LightningCLI config (repeat to stack)")
    source.add_argument("--model", help="a registry name (see dcd_lightning.list_models())")
    parser.add_argument("--input-size", type=positive_int, help="image side (default: the data module's, else 224)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args, overrides = parser.parse_known_args(argv)
    if args.model:
        if overrides:
            parser.error(f"unrecognized arguments: {' '.join(overrides)}")
        try:
            model, size, name = get_model_spec(args.model).build(), 224, args.model
        except ValueError as error:
            parser.error(f"--model: {error}")
    else:
        for config in args.config:
            if not Path(config).is_file():
                parser.error(f"--config {config}: no such file")
        model, size = model_from_config(args.config, overrides)
        name = registry_name(args.config[-1])
        if name is not None and not same_architecture(model, name):
            # overrides (or stacked configs) changed the model: that file's paper row is not its row
            print(f"note: the model differs from {name}'s (overrides or other configs change it), so no paper row "
                  "is compared", file=sys.stderr)
            name = None
    if args.input_size is not None:
        size = args.input_size
    if name is not None and size != PAPER_SIZE and get_model_spec(name).paper:
        print(f"note: the paper's rows count {PAPER_SIZE}x{PAPER_SIZE} images; none is compared at {size}x{size}",
              file=sys.stderr)
    data = report(profile_model(model, size), name)
    if args.json:
        print(json.dumps(data))
    else:
        print_report(data)
    return 0
