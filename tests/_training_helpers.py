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


class RecordSampleIds(Callback):
    """Append the sample ids of every training batch (the data module's with_ids=true) to
    <folder>/ids-rank<R>.txt, one line per batch, so tests can compare orders across runs."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        import os

        os.makedirs(self.folder, exist_ok=True)
        with open(os.path.join(self.folder, f"ids-rank{trainer.global_rank}.txt"), "a") as out:
            out.write(" ".join(str(int(i)) for i in batch[2]) + "\n")


class RecordLosses(Callback):
    """Append each training batch's loss and size to <folder>/loss-rank<R>.txt (one line per batch)."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        import os

        os.makedirs(self.folder, exist_ok=True)
        with open(os.path.join(self.folder, f"loss-rank{trainer.global_rank}.txt"), "a") as out:
            out.write(f"{float(outputs['loss']):.10g} {len(batch[1])}\n")
