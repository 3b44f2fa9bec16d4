"""Callbacks the training tests plug into the CLI by class_path."""

from __future__ import annotations

from lightning.pytorch.callbacks import Callback


class InterruptAtEpoch(Callback):
    """Raise KeyboardInterrupt (as Ctrl-C would) when epoch `epoch` starts."""

    def __init__(self, epoch: int = 1) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module) -> None:  # noqa: ANN001
        if trainer.current_epoch == self.epoch:
            raise KeyboardInterrupt


class InterruptAtStep(Callback):
    """Raise KeyboardInterrupt after optimizer step `step` (mid-epoch)."""

    def __init__(self, step: int = 2) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        if trainer.global_step == self.step:
            raise KeyboardInterrupt
