"""The LightningModule: an injected backbone trained for image classification."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy


class ImageClassifier(L.LightningModule):
    """Backbone + cross-entropy (with label smoothing) + SGD with a per-step LR schedule.

    `backbone` is a factory called with the number of classes (in YAML: a class_path such as
    dcd_lightning.models.ResNet with its init_args; num_classes is linked from the data module).
    Logs train/loss, train/acc1, val/loss, val/acc1, val/acc5, test/acc1, test/acc5 as fractions.
    """

    def __init__(
        self,
        backbone: Callable[[int], nn.Module],
        num_classes: int = 1000,
        lr: float = 0.1,
        momentum: float = 0.9,
        nesterov: bool = False,
        weight_decay: float = 1e-4,
        label_smoothing: float = 0.0,
        schedule: Literal["cosine", "step", "constant"] = "cosine",
        warmup_epochs: float = 0.0,
        step_epochs: int = 30,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"ImageClassifier: num_classes={num_classes} is not allowed; expected >= 2")
        if lr <= 0:
            raise ValueError(f"ImageClassifier: lr={lr} is not allowed; expected a number > 0")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"ImageClassifier: label_smoothing={label_smoothing} is not allowed; expected [0, 1)")
        self.save_hyperparameters(ignore=["backbone"])
        self.model = backbone(num_classes)
        top5 = min(5, num_classes)
        self.metrics = nn.ModuleDict(
            {
                f"{stage}_acc{k}": MulticlassAccuracy(num_classes, top_k=topk, average="micro")
                for stage in ("train", "val", "test")
                for k, topk in (("1", 1), ("5", top5))
            }
        )

    def forward(self, images: Tensor) -> Tensor:
        """Logits of the backbone."""
        return self.model(images)

    def _step(self, batch: tuple[Tensor, Tensor], stage: str) -> Tensor:
        images, targets = batch
        logits = self(images)
        smoothing = self.hparams.label_smoothing if stage == "train" else 0.0
        loss = F.cross_entropy(logits, targets, label_smoothing=smoothing)
        on_step = stage == "train"
        self.log(f"{stage}/loss", loss, prog_bar=True, on_step=on_step, on_epoch=True, sync_dist=not on_step)
        for k in ("1", "5") if stage != "train" else ("1",):
            metric = self.metrics[f"{stage}_acc{k}"]
            metric(logits, targets)
            self.log(f"{stage}/acc{k}", metric, prog_bar=k == "1", on_step=on_step, on_epoch=True)
        return loss

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        """One optimisation step's loss."""
        return self._step(batch, "train")

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        """Validation loss and accuracy."""
        self._step(batch, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        """Test loss and accuracy."""
        self._step(batch, "test")

    def predict_step(self, batch: tuple[Tensor, Tensor] | Tensor, batch_idx: int) -> Tensor:
        """Class probabilities."""
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        return torch.softmax(self(images), dim=1)

    def configure_optimizers(self):  # noqa: ANN201 - Lightning's own return type
        """SGD with momentum and a per-step schedule (linear warm-up, then cosine or step)."""
        hp = self.hparams
        optimizer = torch.optim.SGD(
            self.parameters(), lr=hp.lr, momentum=hp.momentum, nesterov=hp.nesterov, weight_decay=hp.weight_decay
        )
        total = max(1, int(self.trainer.estimated_stepping_batches))
        epochs = max(1, self.trainer.max_epochs or 1)
        per_epoch = max(1, total // epochs)
        warmup = int(hp.warmup_epochs * per_epoch)

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            if hp.schedule == "cosine":
                progress = (step - warmup) / max(1, total - warmup)
                return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
            if hp.schedule == "step":
                return 0.1 ** (step // (hp.step_epochs * per_epoch))
            return 1.0

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
