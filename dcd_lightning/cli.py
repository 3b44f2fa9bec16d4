"""Command line: LightningCLI's fit/validate/test/predict, plus the project's own tools."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from typing import Any

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

from .callbacks import RestoreLoaderPosition, RunCheckpoint, RunLocations, TemperatureSchedule
from .sweep import TAGS_ENV, TRIAL_ENV

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
  predict      class probabilities for the predict split

Tools:
{tools}

Run `python -m dcd_lightning COMMAND --help` for a command's options.
"""

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
    """(placement, operator class, init_args) of every class_path in the backbone config."""
    found = []
    if isinstance(node, dict):
        if "class_path" in node and "dcd_lightning.ops." in str(node["class_path"]):
            found.append((path, str(node["class_path"]).rsplit(".", 1)[1], dict(node.get("init_args") or {})))
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


class DCDSaveConfig(SaveConfigCallback):
    """Write the resolved config beside the logs and send it, with params and MAdds, to W&B.

    When the log folder already holds a config of another run (loggers that do not version their
    folder), this run's config is written as config-<date>-<time>.yaml instead of replacing it.
    """

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """Pick a file name that does not clash, then save."""
        if not self.already_saved and self.save_to_log_dir:
            log_dir = trainer.log_dir  # a collective under DDP: every rank asks
            if log_dir is not None and os.path.exists(os.path.join(log_dir, self.config_filename)):
                stamp = trainer.strategy.broadcast(time.strftime("%Y%m%d-%H%M%S"))
                self.config_filename = f"config-{stamp}.yaml"
        super().setup(trainer, pl_module, stage)

    def save_config(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """Log the config and the model's size to every W&B logger."""
        from .loggers import _LightningWandbLogger
        from .profiling import profile_model

        loggers = [logger for logger in trainer.loggers if isinstance(logger, _LightningWandbLogger)]
        if not loggers:
            return
        size = getattr(trainer.datamodule, "input_size", 224) if trainer.datamodule is not None else 224
        model = getattr(pl_module, "model", pl_module)
        profile = profile_model(model, int(size))
        for logger in loggers:
            logger.log_hyperparams({"config": self.config.as_dict(), "params": profile.paper_params,
                                    "params_all": profile.params, "madds": profile.madds})


class DCDLightningCLI(LightningCLI):
    """LightningCLI with the project's defaults.

    - data.num_classes is linked into model.num_classes;
    - checkpoints go to <default_root_dir>/checkpoints: the best by val/acc1, `last.ckpt` at every
      epoch end, and `last.ckpt` again when a run stops on an exception, Ctrl-C or SIGTERM, so
      `--ckpt_path last` resumes it;
    - loggers without a save_dir write under default_root_dir, W&B runs get a name and tags from
      the config; DY-Conv layers follow the temperature schedule (`--temperature.*`).
    """

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Project-wide callbacks and links."""
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")
        parser.add_lightning_class_args(RunCheckpoint, "checkpoint")
        parser.set_defaults({
            "checkpoint.monitor": "val/acc1",
            "checkpoint.mode": "max",
            "checkpoint.save_last": True,
            "checkpoint.filename": "best-epoch{epoch:03d}-acc{val/acc1:.4f}",
            "checkpoint.auto_insert_metric_name": False,
            "checkpoint.save_on_exception": True,
        })
        parser.link_arguments("trainer.default_root_dir", "checkpoint.dirpath", compute_fn=_checkpoint_dir)
        parser.add_lightning_class_args(TemperatureSchedule, "temperature")
        parser.add_lightning_class_args(RunLocations, "run_locations")

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Any]) -> Any:
        """Drop the project's checkpoint callback when the config switches checkpointing off; add
        RestoreLoaderPosition (exact mid-epoch resume of stateful loaders)."""
        if config.get("enable_checkpointing") is False:
            callbacks = [c for c in callbacks if not isinstance(c, RunCheckpoint)]
        return super()._instantiate_trainer(config, [*callbacks, RestoreLoaderPosition()])

    def before_instantiate_classes(self) -> None:
        """Put loggers under default_root_dir and name W&B runs from the config."""
        config = self.config.get(self.subcommand) if self.subcommand else self.config
        if config is None:
            return
        trainer = config.get("trainer")
        root = trainer.get("default_root_dir") or "."
        trial = sweep_trial_folder()
        if trial:
            # each sweep trial is its own run: its own logs and checkpoints
            if config.get("checkpoint") is not None and config["checkpoint"].get("dirpath") == _checkpoint_dir(root):
                config["checkpoint"]["dirpath"] = _checkpoint_dir(os.path.join(root, trial))
            root = os.path.join(root, trial)
            trainer["default_root_dir"] = root
        loggers = trainer.get("logger")
        if not loggers or isinstance(loggers, bool):
            return
        loggers = loggers if isinstance(loggers, list) else [loggers]
        name, tags = describe_run(config.as_dict() if hasattr(config, "as_dict") else dict(config))
        for logger in loggers:
            init = logger.get("init_args") if hasattr(logger, "get") else None
            if init is None:
                continue
            if "save_dir" in init and init.get("save_dir") in (None, "."):
                init["save_dir"] = root
            if str(logger.get("class_path", "")).endswith("WandbLogger"):
                if not init.get("name") and not os.environ.get("WANDB_SWEEP_ID"):
                    init["name"] = name  # under a W&B agent the sweep names its runs
                sweep_tags = [t for t in os.environ.get(TAGS_ENV, "").split(",") if t]
                init["tags"] = sorted(set(init.get("tags") or tags) | set(sweep_tags))


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

    DCDLightningCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=None if from_command_line else argv,
        save_config_callback=DCDSaveConfig,
        save_config_kwargs={"overwrite": True},
    )
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
