"""Weights & Biases logging that falls back to offline mode when there is nowhere to send to."""

from __future__ import annotations

import netrc
import os
from typing import Any

from lightning.pytorch.loggers import WandbLogger as _LightningWandbLogger


def wandb_can_sync() -> bool:
    """True when W&B has an API key (environment or ~/.netrc) and WANDB_MODE is not offline/disabled."""
    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "dryrun", "disabled"):
        return False
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


class WandbLogger(_LightningWandbLogger):
    """Lightning's WandbLogger with `offline=None` meaning: online when an API key is configured,
    offline otherwise (sync later with `wandb sync`). Run name and tags left empty are filled by
    the CLI from the config (backbone, operator, ablation values)."""

    def __init__(
        self,
        project: str = "dcd-lightning",
        name: str | None = None,
        save_dir: str = ".",
        offline: bool | None = None,
        tags: list[str] | None = None,
        group: str | None = None,
        log_model: bool = False,
        **kwargs: Any,
    ) -> None:
        if offline is None:
            offline = not wandb_can_sync()
        super().__init__(
            project=project, name=name, save_dir=save_dir, offline=offline, tags=tags, group=group,
            log_model=log_model, **kwargs,
        )
