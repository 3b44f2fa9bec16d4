"""Command line: LightningCLI's fit/validate/test/predict, plus the project's own tools."""

from __future__ import annotations

import sys
from collections.abc import Callable

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

TOOLS: dict[str, tuple[str, str]] = {
    "profile": ("dcd_lightning.profile_cmd", "parameters and MAdds of a config's model, beside the paper's"),
    "bench-ops": ("dcd_lightning.bench_ops", "time each operator against the static convolution"),
    "import-official": ("dcd_lightning.import_official", "convert an official DCD checkpoint to ours"),
    "make-paper-configs": ("dcd_lightning.paper_configs", "write configs/paper/ from the model registry"),
}

USAGE = """usage: python -m dcd_lightning COMMAND [options]

Train and evaluate (LightningCLI; stack configs with --config A --config B):
  fit          train a model, e.g. python -m dcd_lightning fit --config configs/quickstart.yaml
  validate     evaluate on the validation split
  test         evaluate on the test split
  predict      class probabilities for the predict split

Tools:
{tools}

Run `python -m dcd_lightning COMMAND --help` for a command's options.
"""


class DCDLightningCLI(LightningCLI):
    """LightningCLI whose data module's class count is linked into the model."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Link data.num_classes -> model.num_classes."""
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")


def _tool(name: str) -> Callable[[list[str]], int]:
    import importlib

    return importlib.import_module(TOOLS[name][0]).main


def main(argv: list[str] | None = None) -> int:
    """Dispatch `python -m dcd_lightning ...` to LightningCLI or to one of the tools."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        tools = "\n".join(f"  {name:<12} {text}" for name, (_, text) in TOOLS.items())
        print(USAGE.format(tools=tools))
        return 0 if argv else 2
    if argv[0] in TOOLS:
        return _tool(argv[0])(argv[1:])
    from lightning.pytorch import LightningDataModule, LightningModule

    DCDLightningCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=argv,
        save_config_kwargs={"overwrite": True},
    )
    return 0
