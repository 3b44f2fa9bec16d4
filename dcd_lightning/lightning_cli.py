"""The project's LightningCLI (fit/validate/test/predict) and its config-saving callback."""

from __future__ import annotations

import os
import re
import time
import types
import typing
import warnings
from pathlib import Path
from typing import Any

from jsonargparse import ArgumentError
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

from .callbacks import (
    PredictionWriter,
    RestoreLoaderPosition,
    RunCheckpoint,
    RunLocations,
    TemperatureSchedule,
)
from .cli import _checkpoint_dir, describe_run, sweep_trial_folder
from .sweep import TAGS_ENV


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
        config = self.config.as_dict()
        model_args = (config.get("model") or {}).get("init_args")
        hparams = getattr(pl_module, "hparams", {})
        if isinstance(model_args, dict) and "num_classes" in hparams:
            model_args["num_classes"] = hparams["num_classes"]  # linked from the data at instantiation
        for logger in loggers:
            logger.log_hyperparams({"config": config, "params": profile.paper_params,
                                    "params_all": profile.params, "madds": profile.madds})


def _int_before_float(parser: LightningArgumentParser) -> None:
    """Make each option typed as a union of int and float try int first.

    Lightning reads `limit_train_batches=1` as one batch and `1.0` as all of them, and jsonargparse
    tries a union's members in order. Python caches `Optional[Union[int, float]]` under a key that
    ignores the order of the inner union, so whichever order some library spelled first wins: with
    float first, `--trainer.limit_train_batches=1` became 1.0 and trained on every batch. With int
    first, the value keeps the type it was written with (1 -> 1, 1.0 -> 1.0, 0.5 -> 0.5)."""
    for action in parser._actions:
        hint = getattr(action, "_typehint", None)  # jsonargparse's ActionTypeHint
        if typing.get_origin(hint) not in (typing.Union, types.UnionType):
            continue
        members = typing.get_args(hint)
        if int in members and float in members and members.index(float) < members.index(int):
            action._typehint = typing.Union[(int, *(m for m in members if m is not int))]


def _constructor_message(text: str) -> str:
    """A constructor's own message out of jsonargparse's report on a Union (such as the model's
    class, LightningModule or None): its list of each subtype's error holds it beside "Expected a
    <class 'NoneType'>", followed by the whole namespace given; the rest as it was."""
    if "Does not validate against any of the Union subtypes" not in text:
        return text
    causes = [line.strip()[2:] for line in text.splitlines()
              if line.strip().startswith("- ") and "Expected a <class 'NoneType'>" not in line]
    return "; ".join(causes) or text


BACKBONE_SIGNS = ("unrecognized arguments", "is not accepted", "Expected a dot import path",
                  "the following arguments are required: in_channels")


def _backbone_hint(text: str) -> str:
    """jsonargparse's report, with what a backbone of the user's must look like where the report is
    about the backbone's operators: its signature decides how the parser reads them. Not for ours
    (a class_path in dcd_lightning): there the report is about a mistyped or unknown option."""
    if 'Parser key "backbone"' not in text or not any(sign in text for sign in BACKBONE_SIGNS):
        return text
    backbone = re.search(r"""Parser key "backbone".*?class_path=['"]([^'"]+)['"]""", text, re.DOTALL)
    if backbone and backbone.group(1).startswith("dcd_lightning."):
        return text
    return (f"{text}\nIf the backbone is your own: its first parameter must be num_classes, and each parameter "
            "that takes an operator must be annotated dcd_lightning.models.ConvFactory (LinearFactory for a "
            "classifier); README, 'Your own operators and models'.")


def _warn_of_positional_mismatch(config: Any) -> None:
    """A user's backbone may call its operators positionally, as ConvFactory and LinearFactory give
    their arguments: warn of an operator class_path in its config that takes them in another order
    (see positional_mismatch). Our backbones call by keyword, so theirs are not checked."""
    import importlib

    from .models.factories import positional_mismatch

    model = config.get("model") if hasattr(config, "get") else None
    backbone = (model.get("init_args") or {}).get("backbone") if hasattr(model, "get") else None
    if not hasattr(backbone, "get") or str(backbone.get("class_path", "")).startswith("dcd_lightning."):
        return
    init_args = backbone.get("init_args") or {}
    for name, value in (init_args if isinstance(init_args, dict) else vars(init_args)).items():  # not flattened
        path = value.get("class_path") if hasattr(value, "get") else None
        if not isinstance(path, str) or "." not in path:
            continue
        module, _, attribute = path.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module), attribute)
        except (ImportError, AttributeError):
            continue  # the parser has already said what it could not import
        problem = positional_mismatch(cls) if isinstance(cls, type) else None
        if problem:
            warnings.warn(f"backbone {backbone.get('class_path')}, parameter {name}: {problem}", stacklevel=2)


class DCDLightningCLI(LightningCLI):
    """LightningCLI with the project's defaults.

    - data.num_classes is linked into model.num_classes;
    - checkpoints go to <default_root_dir>/checkpoints: the best by val/acc1, `last.ckpt` at every
      epoch end, and `last.ckpt` again when a run stops on an exception, Ctrl-C or SIGTERM, so
      `--ckpt_path last` resumes it;
    - loggers without a save_dir write under default_root_dir, W&B runs get a name and tags from
      the config; DY-Conv layers follow the temperature schedule (`--temperature.*`);
    - `predict` saves the class probabilities to <default_root_dir>/predictions.pt
      (`--predictions.path`), see PredictionWriter;
    - an int stays an int in options such as `--trainer.limit_train_batches=1` (one batch), see
      _int_before_float.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._derived: list[tuple[Any, str, Any]] = []  # see _derive
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Project-wide callbacks and links."""
        _int_before_float(parser)
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
        parser.add_lightning_class_args(PredictionWriter, "predictions")

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse as LightningCLI does; a report about the backbone's operators says what a user's
        backbone must look like (see _backbone_hint)."""
        action = getattr(parser, "_subcommands_action", None)
        parsers = [parser, *(getattr(action, "_name_parser_map", {}) or {}).values()]  # each subcommand's too
        exits = [each.exit_on_error for each in parsers]
        for each in parsers:
            each.exit_on_error = False
        try:
            super().parse_arguments(parser, args)
        except ArgumentError as error:
            for each, exit_on_error in zip(parsers, exits):
                each.exit_on_error = exit_on_error
            parser.error(_backbone_hint(str(error)), error)
        finally:
            for each, exit_on_error in zip(parsers, exits):
                each.exit_on_error = exit_on_error

    def instantiate_classes(self) -> None:
        """Build the model, data, callbacks and trainer; a ValueError from a constructor (a bad value
        that got past the parser, such as --temperature.epochs -1) is reported as a usage error."""
        exit_on_error, self.parser.exit_on_error = self.parser.exit_on_error, False
        try:
            super().instantiate_classes()
        except (ValueError, ArgumentError) as error:
            self.parser.exit_on_error = exit_on_error
            self.parser.error(_constructor_message(str(error)))
        finally:
            self.parser.exit_on_error = exit_on_error
        for init, key, given in reversed(self._derived):  # see _derive
            init[key] = given

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Any]) -> Any:
        """Drop the project's checkpoint callback when the config switches checkpointing off; add
        RestoreLoaderPosition (exact mid-epoch resume of stateful loaders)."""
        if config.get("enable_checkpointing") is False:
            callbacks = [c for c in callbacks if not isinstance(c, RunCheckpoint)]
        return super()._instantiate_trainer(config, [*callbacks, RestoreLoaderPosition()])

    def _resolve_evaluation_checkpoint(self) -> None:
        """`validate`/`test`/`predict --ckpt_path last|best`: this run folder's file, or an error.

        Lightning validates the untrained model with a warning when `last` finds no file, and
        cannot find `best` outside the fit that saved it.
        """
        config = self.config_init[self.subcommand]
        wanted = config.get("ckpt_path")
        callback = self.trainer.checkpoint_callback
        if wanted not in ("last", "best") or callback is None or not callback.dirpath:
            return
        folder = Path(callback.dirpath)
        if wanted == "last":
            found = [folder / "last.ckpt"] if (folder / "last.ckpt").is_file() else []
        else:  # best-epochNNN-accA.AAAA.ckpt; save_top_k=1 keeps one, take the most accurate if there are more
            found = sorted(folder.glob("best-*.ckpt"), key=lambda path: path.stem.rsplit("acc", 1)[-1])[-1:]
        if not found:
            raise FileNotFoundError(
                f"{self.subcommand} --ckpt_path {wanted}: no {'last.ckpt' if wanted == 'last' else 'best-*.ckpt'} in "
                f"{folder}; train with the same config and default_root_dir first, or give a checkpoint's path"
            )
        config["ckpt_path"] = str(found[0])

    def before_fit(self) -> None:
        """`fit --ckpt_path last` with no last.ckpt in this run's folder starts a new run (as an
        auto-resuming job's first launch needs) and says where it looked; Lightning's own warning
        suggests save_last, which is on."""
        config = self.config_init[self.subcommand]
        callback = self.trainer.checkpoint_callback
        if config.get("ckpt_path") != "last" or callback is None or not callback.dirpath:
            return
        folder = Path(callback.dirpath)
        if not (folder / "last.ckpt").is_file():
            config["ckpt_path"] = None
            if self.trainer.is_global_zero:
                print(f"[dcd-lightning] fit --ckpt_path last: no last.ckpt in {folder}, so this run starts from the "
                      "beginning (to continue a run, give the trainer.default_root_dir it was started with)",
                      flush=True)

    def before_validate(self) -> None:
        """Resolve --ckpt_path last/best (see _resolve_evaluation_checkpoint)."""
        self._resolve_evaluation_checkpoint()

    def before_test(self) -> None:
        """Resolve --ckpt_path last/best."""
        self._resolve_evaluation_checkpoint()

    def before_predict(self) -> None:
        """Resolve --ckpt_path last/best."""
        self._resolve_evaluation_checkpoint()

    def before_instantiate_classes(self) -> None:
        """Put loggers under default_root_dir and name W&B runs from the config; warn of operators
        that a user's backbone would misread if it called them positionally."""
        config = self.config.get(self.subcommand) if self.subcommand else self.config
        if config is None:
            return
        _warn_of_positional_mismatch(config)
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
                self._derive(init, "save_dir", root)
            if str(logger.get("class_path", "")).endswith("WandbLogger"):
                if not init.get("name") and not os.environ.get("WANDB_SWEEP_ID"):
                    self._derive(init, "name", name)  # under a W&B agent the sweep names its runs
                sweep_tags = [t for t in os.environ.get(TAGS_ENV, "").split(",") if t]
                self._derive(init, "tags", sorted(set(init.get("tags") or tags) | set(sweep_tags)))

    def _derive(self, init: Any, key: str, value: Any) -> None:
        """Set a logger argument derived from the rest of the config for instantiation only: the
        saved config.yaml keeps what was given, so that rerunning it with another default_root_dir
        (or model) writes there (and names the run anew) instead of into the old run's folder."""
        self._derived.append((init, key, init.get(key)))
        init[key] = value
