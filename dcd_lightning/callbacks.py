"""Training callbacks: DY-Conv's temperature schedule, a report of where a run wrote its files, the
file `predict` writes, and Phi's variance per DCD layer at each validation (PhiVarianceMonitor, also
named from analysis.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.data import _set_sampler_epoch
from lightning.pytorch.callbacks import BasePredictionWriter, Callback, ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

from .analysis import _PhiStatistics, dcd_layers
from .classifier import stepping
from .ops import DyConv2d


class TemperatureSchedule(Callback):
    """Anneal the softmax temperature of every DY-Conv layer linearly per step, `start` -> `end`
    over the first `epochs` epochs, then hold `end` (DY-Conv's recipe: 30 -> 1 over 10 epochs).

    The temperature is a buffer of each layer, so it is saved in checkpoints; the schedule is a
    function of the global step, so a resumed run continues it where it stopped.
    """

    def __init__(self, start: float = 30.0, end: float = 1.0, epochs: float = 10.0) -> None:
        super().__init__()
        if start <= 0 or end <= 0:
            raise ValueError(f"TemperatureSchedule: start={start}, end={end}: both must be > 0")
        if epochs < 0:
            raise ValueError(f"TemperatureSchedule: epochs={epochs} is not allowed; expected >= 0")
        self.start, self.end, self.epochs = start, end, epochs

    def temperature(self, step: int, steps_per_epoch: int) -> float:
        """The temperature at optimizer step `step`."""
        total = self.epochs * steps_per_epoch
        if total <= 0 or step >= total:
            return self.end
        return self.start + (self.end - self.start) * step / total

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Find the DY-Conv layers and the steps per epoch once per fit."""
        self._layers = [m for m in pl_module.modules() if isinstance(m, DyConv2d)]
        self._steps_per_epoch = stepping(trainer)[1] if self._layers else 1

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        """Set the temperature for this step and log it."""
        layers = getattr(self, "_layers", [])
        if not layers:
            return
        value = self.temperature(trainer.global_step, self._steps_per_epoch)
        for layer in layers:
            layer.set_temperature(value)
        pl_module.log("train/temperature", value, on_step=True, on_epoch=False)

    def state_dict(self) -> dict[str, float]:
        """The schedule's settings (the temperatures themselves are model buffers)."""
        return {"start": self.start, "end": self.end, "epochs": self.epochs}


class ResumeMismatchError(ValueError):
    """A mid-epoch checkpoint resumed with another number of processes or batch size."""


class RunCheckpoint(ModelCheckpoint):
    """ModelCheckpoint that writes `last.ckpt` at the end of every training epoch (and wherever
    ModelCheckpoint saves, after a validation), whether or not the monitored score improved, and,
    when a run stops on an exception (Ctrl-C, SIGTERM, a crash), the state of the last completed
    step to `last.ckpt` only, so `--ckpt_path last` resumes from it.

    Lightning 2.6 writes `last.ckpt` only at a step where a best-k checkpoint was also written: an
    epoch that did not improve `val/acc1`, or one without validation, left `last.ckpt` behind.
    """

    _last_saved_step: int | None = None

    def _save_last_checkpoint(self, trainer: L.Trainer, monitor_candidates: dict[str, Any]) -> None:
        super()._save_last_checkpoint(trainer, monitor_candidates)
        if self.save_last:
            self._last_saved_step = trainer.global_step

    @staticmethod
    def _fitting(trainer: L.Trainer) -> bool:
        """Whether a checkpoint may be written now: fitting, outside the sanity check and fast_dev_run."""
        return trainer.state.fn == "fit" and not trainer.sanity_checking and not trainer.fast_dev_run

    def _save_last_if_missed(self, trainer: L.Trainer) -> None:
        if self._fitting(trainer) and self.save_last and self._last_saved_step != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """ModelCheckpoint's save after a validation, then `last.ckpt` if it was not written."""
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._save_last_if_missed(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """ModelCheckpoint's save at the epoch's end, then `last.ckpt` if it was not written."""
        super().on_train_epoch_end(trainer, pl_module)
        self._save_last_if_missed(trainer)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        """Save last.ckpt unless nothing new happened since the last save (then say it holds it).

        With several processes, only on Ctrl-C or SIGTERM, which reach every process: saving takes
        all of them (barriers, and rank 0 writes), so a crash of one process would wait forever for
        the others, which are still inside a training step, and the run would hang without a word.
        """
        if isinstance(exception, ResumeMismatchError):  # stopped before training: the checkpoint stands
            return
        if trainer.world_size > 1 and not isinstance(exception, (KeyboardInterrupt, SIGTERMException)):
            held = (f"{self.last_model_path} holds the last save; resume with --ckpt_path last" if self.last_model_path
                    else "no checkpoint was written before it")
            print(f"[dcd-lightning] rank {trainer.global_rank}: {type(exception).__name__} in one of "
                  f"{trainer.world_size} processes; not saving a checkpoint (the others are not at the same "
                  f"step); {held}", flush=True)
            return
        if not self._should_save_on_exception(trainer):
            current = self.save_last and self._last_saved_step == trainer.global_step
            if current and self._fitting(trainer) and trainer.is_global_zero:
                print(f"[dcd-lightning] {type(exception).__name__}: {self.last_model_path} already holds the last "
                      f"completed step (epoch {trainer.current_epoch}, step {trainer.global_step}); resume with "
                      "--ckpt_path last", flush=True)
            return
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        if trainer.is_global_zero:
            print(f"[dcd-lightning] {type(exception).__name__}: saved the last completed step "
                  f"(epoch {trainer.current_epoch}, step {trainer.global_step}) to {self.last_model_path}; "
                  "resume with --ckpt_path last", flush=True)


class RunLocations(Callback):
    """Print where the run's logs, checkpoints and resolved config are (rank 0, at fit start and end)."""

    def _report(self, trainer: L.Trainer, when: str) -> None:
        log_dir = trainer.log_dir  # a collective under DDP: every rank must ask
        if not trainer.is_global_zero:
            return
        lines = [f"[dcd-lightning] {when}:"]
        for logger in trainer.loggers:
            where = getattr(logger, "log_dir", None) or getattr(logger, "save_dir", None)
            lines.append(f"  logs ({type(logger).__name__}): {where}")
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.dirpath:
                lines.append(f"  checkpoints: {callback.dirpath}")
                if callback.best_model_path:
                    lines.append(f"  best checkpoint: {callback.best_model_path} (val/acc1 {callback.best_model_score})")
        # this run's own file: DCDSaveConfig writes config-<stamp>.yaml beside another run's config.yaml
        name = next((c.config_filename for c in trainer.callbacks if hasattr(c, "config_filename")), "config.yaml")
        config = Path(log_dir or trainer.default_root_dir) / name
        if config.exists():
            lines.append(f"  resolved config: {config}")
        print("\n".join(lines), flush=True)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Report at the start."""
        self._report(trainer, "run started")

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Report at the end."""
        self._report(trainer, "run finished")


class PredictionWriter(BasePredictionWriter):
    """Save what `predict` computes: `path` (default <default_root_dir>/predictions.pt; with several
    processes one file per rank, `predictions-rank<R>.pt`) holds a dict of

    - "probabilities": (N, classes) float32, one row per predicted image, in the loader's order;
    - "targets": (N,) the labels, where the batches carry them;
    - "index": (N,) each row's index in the predict split (ImageFolder order for the folder data),
      where it is known: sample ids carried by the batch, else the sampler's indices when no image
      of a batch was skipped as unreadable;
    - "classes": the class names, where the data module has them.

    Load it with `torch.load(path)`.
    """

    def __init__(self, path: str | None = None) -> None:
        super().__init__(write_interval="batch")
        self.path = path
        self._rows: dict[str, list[Any]] = {}

    def on_predict_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Start empty (a second predict call writes its own file)."""
        self._rows = {"probabilities": [], "targets": [], "index": []}

    def write_on_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, prediction: Any,
                           batch_indices: Any, batch: Any, batch_idx: int, dataloader_idx: int) -> None:
        """Keep one batch's rows (a batch of unreadable images only has none)."""
        if prediction is None:
            return
        rows = len(prediction)
        self._rows["probabilities"].append(prediction.detach().float().cpu())
        if isinstance(batch, (tuple, list)) and len(batch) >= 2:
            self._rows["targets"].append(torch.as_tensor(batch[1]).cpu())
        if isinstance(batch, (tuple, list)) and len(batch) >= 3:
            self._rows["index"].append(torch.as_tensor(batch[2]).cpu())
        elif batch_indices is not None and len(batch_indices) == rows:
            self._rows["index"].append(torch.as_tensor(list(batch_indices)))

    def destination(self, trainer: L.Trainer) -> Path:
        """The file this process writes."""
        path = Path(self.path or Path(trainer.default_root_dir) / "predictions.pt")
        if trainer.world_size > 1:
            path = path.with_name(f"{path.stem}-rank{trainer.global_rank}{path.suffix}")
        return path

    def on_predict_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Write the file and say where it is."""
        rows = self._rows
        if not rows["probabilities"]:
            return
        saved: dict[str, Any] = {"probabilities": torch.cat(rows["probabilities"])}
        count = len(saved["probabilities"])
        for key in ("targets", "index"):  # kept where every batch gave them (a batch without falls short)
            if rows[key]:
                values = torch.cat(rows[key])
                if len(values) == count:
                    saved[key] = values
        classes = getattr(trainer.datamodule, "classes", None)
        if classes:
            saved["classes"] = list(classes)
        path = self.destination(trainer)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(saved, path)
        print(f"[dcd-lightning] predict: wrote {count} images' class probabilities to {path} "
              f"({', '.join(saved)})", flush=True)


class _SkipOnce:
    """A sampler that leaves out the first `count` indices of its next pass only (a resumed epoch's
    batches already trained on), then passes through."""

    def __init__(self, sampler: Any, count: int) -> None:
        self.sampler, self.count = sampler, count

    def __iter__(self) -> Any:
        indices = iter(self.sampler)
        count, self.count = self.count, 0
        for _ in range(count):
            next(indices, None)
        return indices

    def __len__(self) -> int:
        return len(self.sampler)


class RestoreLoaderPosition(Callback):
    """Give a resumed run's training loader the position where the run stopped (exact mid-epoch
    resume), and the resumed epoch's order.

    - Stateful loaders (the shards): Lightning restores a loader's state_dict when it sets up the
      training data after loading the checkpoint; but a LightningModule whose configure_optimizers
      asks trainer.estimated_stepping_batches (ours does, for the LR schedule) makes Lightning set
      up the data earlier, before the checkpoint is read, and the saved position is then never
      applied. This applies it at train start, before the first batch is drawn.
    - Other loaders (folders, digits) keep no position. A run resumed mid-epoch leaves the batches
      that Lightning's restored progress counts as finished out of the epoch's first pass (the
      loader's batch sampler skips their indices), so it goes on with the batches it had not seen.
    - A loader with workers takes its first indices from the sampler when its iterator is made, at
      that early setup, before Lightning sets the sampler's epoch, and Lightning keeps that iterator
      on a resume: the first resumed epoch would run epoch 0's order. So those loaders' samplers get
      the resumed epoch here.

    In each case the iterator is then made again.

    A mid-epoch position is one of a number of processes and a batch size: the checkpoint records
    both, and a run resumed mid-epoch with others stops with a ResumeMismatchError (the samples it
    would skip are not the ones the stopped run trained on) before it trains; the checkpoint is
    left as it was.
    """

    _saved: dict[str, int] | None = None

    @staticmethod
    def _shape(trainer: L.Trainer) -> dict[str, int]:
        """The processes and the per-process training batch size a loader position depends on."""
        loaders = trainer.fit_loop._combined_loader
        first = loaders.flattened[0] if loaders is not None and loaders.flattened else None
        return {"world_size": trainer.world_size, "batch_size": int(getattr(first, "batch_size", 0) or 0)}

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        """Record the number of processes and the batch size beside the loader's position."""
        checkpoint["dcd_lightning_loader"] = self._shape(trainer)

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        """Keep what the checkpoint recorded (absent in checkpoints of older versions)."""
        self._saved = checkpoint.get("dcd_lightning_loader")

    def _refuse_another_shape(self, trainer: L.Trainer) -> None:
        now = self._shape(trainer)
        if not self._saved or all(not self._saved.get(k) or self._saved[k] == now[k] for k in now):
            return
        raise ResumeMismatchError(
            f"{trainer.ckpt_path} was written mid-epoch (epoch {trainer.current_epoch}, step {trainer.global_step}) "
            f"by {self._saved['world_size']} process(es) at batch_size {self._saved['batch_size']}; this run has "
            f"{now['world_size']} at batch_size {now['batch_size']}, and would skip other samples than the ones "
            "trained on. Resume with the same trainer.devices x trainer.num_nodes and data.init_args.batch_size, "
            "or from a checkpoint written at an epoch's end (checkpoints/best-*.ckpt)"
        )

    @staticmethod
    def _batches_done(trainer: L.Trainer) -> int:
        """Training batches of the resumed epoch finished before the stop, as Lightning's epoch loop
        will count them when it resets (0 unless the run resumed mid-epoch)."""
        loop = trainer.fit_loop
        if not getattr(loop, "restarted_mid_epoch", False):  # (Lightning versions without restart stages: 0)
            return 0
        epoch_loop = loop.epoch_loop
        # a stop in on_train_batch_end: Lightning counts that batch as finished when it resets
        finished = int(getattr(epoch_loop, "restarted_on_train_batch_end", False))
        done = epoch_loop.batch_progress.current.completed + finished
        return done if done < trainer.num_training_batches else 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Apply the saved position, or skip the finished batches, and the epoch; restart the iterator."""
        loop = trainer.fit_loop
        done = self._batches_done(trainer)
        if loop._combined_loader is None or loop._data_fetcher is None:
            return
        states = getattr(loop, "_combined_loader_states_to_load", None)
        if done:
            self._refuse_another_shape(trainer)
        if states:
            loop._combined_loader._load_state_dicts(states)
            loop._combined_loader_states_to_load = []
        elif trainer.ckpt_path is not None and (done or loop.epoch_progress.current.processed > 0):
            for loader in loop._combined_loader.flattened:
                _set_sampler_epoch(loader, loop.epoch_progress.current.processed)
                batches = getattr(loader, "batch_sampler", None)
                if done and batches is not None and getattr(batches, "batch_size", None):
                    batches.sampler = _SkipOnce(batches.sampler, done * batches.batch_size)
        else:
            return
        iter(loop._data_fetcher)  # a new iterator: from the restored position, or of the resumed epoch


class PhiVarianceMonitor(Callback):
    """Log the normalized variance of Phi of every DCD layer over the validation set, each epoch,
    as `phi_var/NN_<layer name>` (NN: the layer's index, so columns sort by depth)."""

    def __init__(self, max_batches: int | None = None) -> None:
        super().__init__()
        self.max_batches = max_batches
        self._stats: _PhiStatistics | None = None
        self._batches = 0

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Start collecting (not during the sanity check)."""
        if trainer.sanity_checking:
            return
        self._stats = _PhiStatistics(dcd_layers(pl_module))
        self._stats.attach()
        self._batches = 0

    def on_validation_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                                  batch_idx: int, dataloader_idx: int = 0) -> None:
        """Count the batch's images once: not those labelled -1 (EvalShard's repeats under DDP)."""
        if self._stats is not None:
            labels = batch[1] if isinstance(batch, (tuple, list)) and len(batch) > 1 else None
            self._stats.keep = labels >= 0 if isinstance(labels, torch.Tensor) else None

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        """Stop collecting after max_batches."""
        self._batches += 1
        if self._stats is not None and self.max_batches and self._batches >= self.max_batches:
            self._stats.detach()

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Reduce the sums over ranks and log one value per layer."""
        if self._stats is None:
            return
        self._stats.detach()
        if self._batches and trainer.is_global_zero:
            self._stats.warn_unseen("PhiVarianceMonitor")
        for index, (name, _) in enumerate(self._stats.layers):
            if name not in self._stats.sums:
                continue
            packed = trainer.strategy.reduce(self._stats.as_tensor(name), reduce_op="sum")
            value = self._stats.normalized_variance(packed)
            pl_module.log(f"phi_var/{index:02d}_{name.replace('.', '_')}", value, sync_dist=False, rank_zero_only=True)
        self._stats = None
