"""The LightningModule: an injected backbone trained for image classification."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from .data.sampling import sample_seed
from .models.weights import checkpoint_model_weights
from .profiling import declared_input_channels


def mix_batch(
    images: Tensor, targets: Tensor, mixup_alpha: float, cutmix_alpha: float, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor, Tensor, float]:
    """Mixup (Zhang et al., 2018) or CutMix (Yun et al., 2019), one chosen at random when both are on.

    Returns (mixed images, targets a, targets b, lambda): the loss is
    lambda * CE(logits, a) + (1 - lambda) * CE(logits, b).
    """
    use_cutmix = cutmix_alpha > 0 and (mixup_alpha <= 0 or torch.rand((), generator=generator).item() < 0.5)
    alpha = cutmix_alpha if use_cutmix else mixup_alpha
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    order = torch.randperm(images.shape[0], device=images.device)
    if not use_cutmix:
        return lam * images + (1 - lam) * images[order], targets, targets[order], lam
    h, w = images.shape[-2:]
    cut_h, cut_w = int(h * math.sqrt(1 - lam)), int(w * math.sqrt(1 - lam))
    cy, cx = int(torch.randint(h, ())), int(torch.randint(w, ()))
    top, bottom = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, h)
    left, right = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, w)
    mixed = images.clone()
    mixed[..., top:bottom, left:right] = images[order][..., top:bottom, left:right]
    lam = 1 - (bottom - top) * (right - left) / (h * w)
    return mixed, targets, targets[order], lam


UNBOUNDED_STEPS = 10**12  # the span of a fit that no max_epochs or max_steps bounds


def stepping(trainer: L.Trainer) -> tuple[int, int]:
    """(total optimizer steps, steps per epoch) of a fit. Steps per epoch come from the training
    loader's length (a max_steps that ends the fit early does not shorten the epochs); with
    max_epochs=-1 and no max_steps the total is unbounded (UNBOUNDED_STEPS)."""
    estimated = trainer.estimated_stepping_batches  # also sets the training loader up
    total = max(1, int(estimated)) if math.isfinite(estimated) else UNBOUNDED_STEPS
    batches = trainer.num_training_batches
    if isinstance(batches, (int, float)) and math.isfinite(batches) and batches > 0:
        return total, max(1, math.ceil(batches / max(1, trainer.accumulate_grad_batches)))
    return total, max(1, total // max(1, trainer.max_epochs or 1))  # a loader without a length


COMPILE_KEYS = {"backend", "mode", "fullgraph", "dynamic", "options"}
SCHEDULE_KEY = "dcd_lightning_schedule"  # in checkpoints: the LR schedule's span, to notice a resume that changes it


class ImageClassifier(L.LightningModule):
    """Backbone + cross-entropy (label smoothing, mixup, cutmix) + SGD with a per-step LR schedule.

    `backbone` is a factory called with the number of classes (in YAML: a class_path such as
    dcd_lightning.models.ResNet with its init_args; num_classes is linked from the data module).
    Schedules: "cosine" to 0, "step" (divide by 10 every `step_epochs`), "constant"; each after
    `warmup_epochs` of linear warm-up, updated every optimizer step. `decay_norm_and_bias=False`
    exempts normalisation weights and biases (every parameter with one dimension) from weight decay.
    Logs train/loss_step, train/loss_epoch, train/acc1_step, train/acc1_epoch, val/loss, val/acc1, val/acc5, test/acc1,
    test/acc5 (fractions) and lr; samples labelled -1 (EvalShard's padding under DDP) are not counted.

    For GPUs: `channels_last` stores the backbone's weights and feeds its images channels-last (the
    layout tensor cores' convolutions take; every operator keeps it), with `trainer.precision:
    bf16-mixed`. `compile` compiles the backbone with torch.compile: true, or torch.compile's keyword
    arguments such as {mode: reduce-overhead} (CUDA graphs: a DCD step issues many small kernels) or
    {backend: eager}. Compiling changes no parameter name, so checkpoints load either way.

    `init_weights` starts a run from the backbone's weights in a file, with a new optimizer and
    schedule (fine-tuning, or training on from `import-official`'s conversion): a checkpoint of
    `fit` or `import-official` (its `model.*` weights), or the backbone's own state dict. It is
    loaded strictly at setup, unless a checkpoint (`--ckpt_path`) restores the run instead.
    """

    def __init__(
        self,
        backbone: Callable[[int], nn.Module],
        num_classes: int = 1000,
        lr: float = 0.1,
        momentum: float = 0.9,
        nesterov: bool = False,
        weight_decay: float = 1e-4,
        decay_norm_and_bias: bool = True,
        label_smoothing: float = 0.0,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        schedule: Literal["cosine", "step", "constant"] = "cosine",
        warmup_epochs: float = 0.0,
        step_epochs: int = 30,
        channels_last: bool = False,
        compile: bool | dict[str, Any] = False,
        init_weights: str | None = None,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        if num_classes < 2:
            raise ValueError(f"{name}: num_classes={num_classes} is not allowed; expected >= 2")
        for key, value in (("lr", lr), ("step_epochs", step_epochs)):
            if value <= 0:
                raise ValueError(f"{name}: {key}={value} is not allowed; expected a number > 0")
        for key, value in (("momentum", momentum), ("weight_decay", weight_decay), ("mixup_alpha", mixup_alpha),
                           ("cutmix_alpha", cutmix_alpha), ("warmup_epochs", warmup_epochs)):
            if value < 0:
                raise ValueError(f"{name}: {key}={value} is not allowed; expected a number >= 0")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"{name}: label_smoothing={label_smoothing} is not allowed; expected 0 <= it < 1")
        if nesterov and momentum == 0:
            raise ValueError(f"{name}: nesterov=True needs momentum > 0")
        if isinstance(compile, dict):
            unknown = sorted(set(compile) - COMPILE_KEYS)
            if unknown:
                raise ValueError(f"{name}: compile={compile} has unknown key(s) {unknown}; expected true/false or "
                                 f"torch.compile keyword arguments among {sorted(COMPILE_KEYS)}")
        if init_weights is not None and not Path(init_weights).is_file():
            raise ValueError(f"{name}: init_weights={init_weights!r} is not a file; expected a checkpoint of fit or "
                             "import-official, or a state dict of the backbone")
        self.init_weights = init_weights
        # the file is read once, at setup; a checkpoint of this run must not need it. The backbone
        # is kept where LightningCLI gives its config (class_path / init_args), so that
        # ImageClassifier.load_from_checkpoint(path) rebuilds the model; a callable given in
        # Python is not (a lambda cannot be pickled into the checkpoint)
        self.save_hyperparameters(ignore=["init_weights"])
        if not isinstance(self.hparams.get("backbone"), dict):
            self.hparams.pop("backbone", None)
            getattr(self, "_hparams_initial", {}).pop("backbone", None)
        try:
            self.model = backbone(num_classes)
        except TypeError as error:
            text = str(error)
            if "'Namespace' object is not callable" in text:
                cause = "A backbone parameter"
            elif "got multiple values for argument" in text:  # also a backbone's own mistake: not certain
                cause = "If the backbone called an operator given as a class_path: a backbone parameter"
            else:
                raise
            raise TypeError(
                f"{name}: building the backbone failed: {text}. {cause} that takes an operator as a class_path must "
                "be annotated dcd_lightning.models.ConvFactory (Callable[[int, int, int, int, int], nn.Module]) or "
                "LinearFactory: jsonargparse passes an unannotated one the config itself (a Namespace), and a "
                "Callable of fewer ints takes no more positional arguments than it names"
            ) from error
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
        if compile:
            self.model.compile(**(compile if isinstance(compile, dict) else {}))  # in place: same state-dict names
        top5 = min(5, num_classes)
        self.metrics = nn.ModuleDict(
            {f"{stage}_acc1": MulticlassAccuracy(num_classes, top_k=1, average="micro") for stage in ("train", "val", "test")}
            | {f"{stage}_acc5": MulticlassAccuracy(num_classes, top_k=top5, average="micro") for stage in ("val", "test")}
            | {f"{stage}_loss": MeanMetric() for stage in ("train", "val", "test")}
        )

    def setup(self, stage: str) -> None:
        """Check that the data's image channels are the backbone's input channels; load
        `init_weights` into the backbone, unless a checkpoint restores the run."""
        self._check_channels()
        if self.init_weights is None or self.trainer.ckpt_path is not None:
            return
        state = torch.load(self.init_weights, map_location="cpu", weights_only=False)
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = checkpoint_model_weights(state["state_dict"])
        if not isinstance(state, dict) or not state or not all(isinstance(v, Tensor) for v in state.values()):
            raise ValueError(f"{type(self).__name__}: init_weights={self.init_weights!r} holds no weights; expected a "
                             "checkpoint of fit or import-official, or a state dict of the backbone")
        try:
            self.model.load_state_dict(state)
        except RuntimeError as error:
            raise ValueError(f"{type(self).__name__}: init_weights={self.init_weights!r} does not fit this config's "
                             f"model: {str(error).splitlines()[-1].strip()} (give the config of the model it was "
                             "saved from)") from None

    def _check_channels(self) -> None:
        """The data module's `channels` (3 where it has none: RGB folders) against the backbone's
        (its `in_chans`, else its first layer's `in_channels`); a mismatch otherwise fails inside it
        at the first batch."""
        data = getattr(self.trainer, "datamodule", None)
        if data is None:
            return
        channels = getattr(data, "hparams", {}).get("channels", 3)
        takes = declared_input_channels(self.model)
        if takes is not None and takes != channels:
            said_by = ("its in_chans" if isinstance(getattr(self.model, "in_chans", None), int)
                       else "the in_channels of its first layer")
            raise ValueError(
                f"{type(data).__name__} gives images with {channels} channels, but the backbone takes {takes} "
                f"({said_by}); set model.init_args.backbone.init_args.in_chans={channels} (or "
                f"data.init_args.channels={takes})"
            )

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """A weights-only checkpoint (import-official's) cannot resume a fit: say what to do instead.
        Keep the checkpoint's schedule span, which configure_optimizers compares with the resumed run's."""
        if self._trainer is not None and self.trainer.state.fn == "fit" and "optimizer_states" not in checkpoint:
            raise ValueError(
                f"{self.trainer.ckpt_path} holds weights only (import-official writes such files), so fit cannot "
                "resume from it; start a run from its weights with --model.init_args.init_weights FILE instead "
                "of --ckpt_path"
            )
        saved = checkpoint.get(SCHEDULE_KEY)
        self._resumed_schedule = (saved["total_steps"], saved["steps_per_epoch"], checkpoint.get("global_step", 0)) \
            if isinstance(saved, dict) else None

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Record the LR schedule's span (optimizer steps in all, and per epoch)."""
        if getattr(self, "_schedule", None) is not None:
            checkpoint[SCHEDULE_KEY] = {"total_steps": self._schedule[0], "steps_per_epoch": self._schedule[1]}

    def forward(self, images: Tensor) -> Tensor:
        """Logits of the backbone."""
        if self.hparams.channels_last and images.dim() == 4:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.model(images)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """In a seeded run (seed_everything), seed the global generator from (seed, rank, optimizer
        step, micro-batch): dropout, mixup and cutmix then draw what an uninterrupted run draws at
        that step, also after a resume (the generators' states are not in the checkpoint)."""
        seed = os.environ.get("PL_GLOBAL_SEED")
        if seed is not None:
            micro = batch_idx % max(1, self.trainer.accumulate_grad_batches)
            torch.manual_seed(sample_seed(int(seed), self.global_rank, self.global_step, micro))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        """One optimisation step's loss (on mixed images when mixup or cutmix is on)."""
        images, targets = batch[0], batch[1]  # a batch may carry sample ids after these
        hp = self.hparams
        smoothing = hp.label_smoothing
        if hp.mixup_alpha > 0 or hp.cutmix_alpha > 0:
            images, targets_a, targets_b, lam = mix_batch(images, targets, hp.mixup_alpha, hp.cutmix_alpha)
            logits = self(images)
            loss = lam * F.cross_entropy(logits, targets_a, label_smoothing=smoothing) + (1 - lam) * F.cross_entropy(
                logits, targets_b, label_smoothing=smoothing
            )
            targets = targets_a if lam >= 0.5 else targets_b
        else:
            logits = self(images)
            loss = F.cross_entropy(logits, targets, label_smoothing=smoothing)
        # the step's loss is this process's; the epoch's, a mean over every process's samples
        self.log("train/loss_step", loss, prog_bar=True, on_step=True, on_epoch=False)
        self.metrics["train_loss"].update(loss.detach(), weight=len(images))
        self.log("train/loss_epoch", self.metrics["train_loss"], on_step=False, on_epoch=True)
        self.metrics["train_acc1"](logits, targets)
        self.log("train/acc1", self.metrics["train_acc1"], prog_bar=True, on_step=True, on_epoch=True)
        self.log("lr", self.optimizers().param_groups[0]["lr"], on_step=True, on_epoch=False)
        return loss

    def _evaluate(self, batch: tuple[Tensor, Tensor] | None, stage: str) -> None:
        if batch is None:  # every image of the batch was unreadable and skipped (skip_corrupt); Lightning
            return  # itself skips such a training batch
        images, targets = batch[0], batch[1]
        logits = self(images)
        counted = targets >= 0  # label -1: a place a process repeats to fill its share under DDP (EvalShard)
        if not bool(counted.all()):
            logits, targets = logits[counted], targets[counted]
        # a metric, not self.log's sync_dist mean: that divides the summed sample counts by the
        # process count in integers (135 and 134 samples on two processes counted as 2 x 134)
        metric = self.metrics[f"{stage}_loss"]
        metric.update(F.cross_entropy(logits, targets, reduction="sum") / max(1, len(targets)), weight=len(targets))
        self.log(f"{stage}/loss", metric, prog_bar=True)
        for k in ("1", "5"):
            metric = self.metrics[f"{stage}_acc{k}"]
            metric(logits, targets)
            self.log(f"{stage}/acc{k}", metric, prog_bar=k == "1")

    def validation_step(self, batch: tuple[Tensor, Tensor] | None, batch_idx: int) -> None:
        """Validation loss and top-1/top-5 accuracy."""
        self._evaluate(batch, "val")

    def test_step(self, batch: tuple[Tensor, Tensor] | None, batch_idx: int) -> None:
        """Test loss and top-1/top-5 accuracy."""
        self._evaluate(batch, "test")

    def predict_step(self, batch: tuple[Tensor, Tensor] | Tensor | None, batch_idx: int) -> Tensor | None:
        """Class probabilities (None for a batch whose images were all unreadable and skipped)."""
        if batch is None:
            return None
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        return torch.softmax(self(images), dim=1)

    def parameter_groups(self) -> list[dict]:
        """Parameters for the optimizer: one group, or two when norms and biases get no weight decay."""
        if self.hparams.decay_norm_and_bias:
            return [{"params": [p for p in self.parameters() if p.requires_grad]}]
        decay, no_decay = [], []
        for param in self.parameters():
            if param.requires_grad:
                (no_decay if param.ndim <= 1 else decay).append(param)
        return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]

    def lr_factor(self, step: int, total_steps: int, steps_per_epoch: int) -> float:
        """Multiplier of the base LR at optimizer step `step` (warm-up, then the schedule)."""
        hp = self.hparams
        warmup = int(hp.warmup_epochs * steps_per_epoch)
        if step < warmup:
            return (step + 1) / warmup
        if hp.schedule == "cosine":
            progress = (step - warmup) / max(1, total_steps - warmup)
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        if hp.schedule == "step":
            return 0.1 ** (step // (hp.step_epochs * steps_per_epoch))
        return 1.0

    def configure_optimizers(self):  # noqa: ANN201 - Lightning's own return type
        """SGD with momentum and the per-step schedule."""
        hp = self.hparams
        optimizer = torch.optim.SGD(
            self.parameter_groups(), lr=hp.lr, momentum=hp.momentum, nesterov=hp.nesterov, weight_decay=hp.weight_decay
        )
        total, per_epoch = stepping(self.trainer)
        self._schedule = (total, per_epoch)
        if total == UNBOUNDED_STEPS and hp.schedule == "cosine":
            rank_zero_warn(
                f"{type(self).__name__}: the fit has no end in epochs or steps (max_epochs=-1 and no max_steps), so "
                "the cosine schedule has none either and the LR stays at its peak; set trainer.max_epochs or "
                "trainer.max_steps, or use schedule 'step' or 'constant'"
            )
        resumed = getattr(self, "_resumed_schedule", None)
        if resumed is not None and resumed[:2] != (total, per_epoch):
            old_total, old_per_epoch, step = resumed
            before = hp.lr * self.lr_factor(step, old_total, old_per_epoch)
            after = hp.lr * self.lr_factor(step, total, per_epoch)
            rank_zero_warn(
                f"{type(self).__name__}: the checkpoint's LR schedule spans {old_total} optimizer steps "
                f"({old_per_epoch} per epoch), this run's {total} ({per_epoch} per epoch): max_epochs, the data, the "
                f"batch size or the batch limits changed. The schedule goes on over the new span from step {step}, "
                f"so the LR moves from {before:.4g} to {after:.4g} there."
            )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: self.lr_factor(step, total, per_epoch))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
