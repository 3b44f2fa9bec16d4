"""Analysis: how dynamic Phi(x) is per layer (Section 5.4), and runs collected into tables.

- `phi_normalized_variance(model, images)`: per DCD layer, the variance of each entry phi_ij over
  the images, averaged over the entries, divided by the variance of the layer's input feature map.
- `PhiVarianceMonitor`: the same over the validation set, logged as `phi_var/NN_<layer>` (a
  Lightning callback, defined in callbacks.py and found here too; this module itself does not import
  Lightning, so notebooks that only read runs start faster).
- `load_runs(folder)`: every CSV-logged run under a folder, one row each, with the config values
  that differ between the runs (the swept values) and the best/last validation accuracy.
- `load_history(run)`: a run's metrics per epoch. `load_wandb_runs(path)`: the same table from W&B.
"""

from __future__ import annotations

import csv
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor, nn

from .ops import DCDConv2d, DCDDepthwiseConv2d


def dcd_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every DCD layer with dynamic channel fusion, in forward order of definition."""
    return [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, (DCDConv2d, DCDDepthwiseConv2d)) and module.channel_fusion
    ]


class _PhiStatistics:
    """Running sums of Phi's entries over images and of the layer input's values."""

    def __init__(self, layers: list[tuple[str, nn.Module]]) -> None:
        self.layers = layers
        self.sums: dict[str, list[Tensor | float]] = {}
        self.handles: list[Any] = []
        # the images of the current batch to count (None: all): not EvalShard's repeats under DDP
        self.keep: Tensor | None = None

    def _kept(self, values: Tensor) -> Tensor:
        keep = self.keep
        if keep is None or keep.shape[0] != values.shape[0] or bool(keep.all()):
            return values
        return values[keep.to(values.device)]

    def attach(self) -> None:
        for name, module in self.layers:
            self.handles.append(module.register_forward_pre_hook(self._input_hook(name)))
            self.handles.append(module.branch.register_forward_hook(self._phi_hook(name)))

    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def _entry(self, name: str, width: int, device: torch.device) -> list[Any]:
        if name not in self.sums:
            zeros = torch.zeros(width, dtype=torch.float64, device=device)
            self.sums[name] = [0.0, zeros.clone(), zeros.clone(), 0.0, 0.0, 0.0]
        return self.sums[name]

    def _input_hook(self, name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Tensor, ...]) -> None:
            x = self._kept(args[0].detach()).double()
            self._pending_input = (name, x.numel(), x.sum().item(), x.square().sum().item())

        return hook

    def _phi_hook(self, name: str) -> Any:
        def hook(module: nn.Module, args: Any, output: tuple[Tensor | None, Tensor | None]) -> None:
            phi = self._kept(output[1].detach()).double()
            entry = self._entry(name, phi.shape[1], phi.device)
            entry[0] += phi.shape[0]
            entry[1] += phi.sum(dim=0)
            entry[2] += phi.square().sum(dim=0)
            pending = getattr(self, "_pending_input", None)
            if pending and pending[0] == name:
                entry[3] += pending[1]
                entry[4] += pending[2]
                entry[5] += pending[3]

        return hook

    def warn_unseen(self, caller: str) -> None:
        """Warn, naming them, of the layers whose Phi no forward has shown (they get no value)."""
        unseen = [name for name, _ in self.layers if name not in self.sums]
        if unseen:
            warnings.warn(
                f"{caller}: no Phi was seen for {len(unseen)} of {len(self.layers)} DCD layers ({', '.join(unseen)}), "
                "so they get no value: their `branch` module did not run. A subclass whose forward computes Phi "
                "without calling self.branch, a copy made by optimize_for_inference (measure the model before it), "
                "or a layer off the forward path has none to show.",
                stacklevel=3,
            )

    def as_tensor(self, name: str) -> Tensor:
        """All sums of one layer in one float64 tensor (for reduction across ranks)."""
        n, s1, s2, count, x1, x2 = self.sums[name]
        scalars = torch.tensor([n, count, x1, x2], dtype=torch.float64, device=s1.device)
        return torch.cat([scalars, s1, s2])

    @staticmethod
    def normalized_variance(packed: Tensor) -> float:
        """sigma_Phi / Var(input) from packed sums."""
        n, count, x1, x2 = packed[:4].tolist()
        width = (packed.numel() - 4) // 2
        s1, s2 = packed[4 : 4 + width], packed[4 + width :]
        phi_var = (s2 / n - (s1 / n).square()).clamp_min(0).mean().item()
        input_var = max(x2 / count - (x1 / count) ** 2, 1e-30)
        return phi_var / input_var


@torch.no_grad()
def phi_normalized_variance(model: nn.Module, batches: Iterable[Tensor | tuple[Tensor, ...]]) -> dict[str, float]:
    """Normalized variance of Phi per DCD layer over the images of `batches` (model in eval mode)."""
    stats = _PhiStatistics(dcd_layers(model))
    was_training = model.training
    model.eval()
    stats.attach()
    try:
        for batch in batches:
            images = batch[0] if isinstance(batch, (tuple, list)) else batch
            model(images)
    finally:
        stats.detach()
        model.train(was_training)
    stats.warn_unseen("phi_normalized_variance")
    return {name: stats.normalized_variance(stats.as_tensor(name)) for name, _ in stats.layers if name in stats.sums}


# -- runs -----------------------------------------------------------------------------------------

IGNORED_KEYS = ("default_root_dir", "save_dir", "dirpath", "root", "version", "ckpt_path", "num_workers", "logger")


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    if isinstance(node, list):
        out = {}
        for index, value in enumerate(node):
            out.update(_flatten(value, f"{prefix}{index}."))
        return out
    return {prefix[:-1]: node}


def _read_metrics(path: Path) -> list[dict[str, str]]:
    with open(path) as handle:
        return list(csv.DictReader(handle))


def load_history(run: str | Path) -> Any:
    """A run's metrics per epoch (pandas DataFrame indexed by epoch): train/val error and the rest."""
    import pandas as pd

    run = Path(run)
    metrics = run / "metrics.csv" if run.is_dir() else run
    frame = pd.DataFrame(_read_metrics(metrics)).apply(pd.to_numeric, errors="coerce")
    per_epoch = frame.groupby("epoch").last()
    if "val/acc1" in per_epoch:
        per_epoch["val/error"] = 1 - per_epoch["val/acc1"]
    if "train/acc1_epoch" in per_epoch:
        per_epoch["train/error"] = 1 - per_epoch["train/acc1_epoch"]
    return per_epoch


def load_runs(folder: str | Path, keys: list[str] | None = None) -> Any:
    """One row per CSV-logged training run under `folder`: its name, swept config values, and accuracies.

    The swept values are the config entries that differ between the runs (or `keys`, dotted
    config paths); columns take the last part of each path (e.g. `latent_mult`). Logger settings
    (W&B names and tags) are not among them. A run resumed with `--ckpt_path` (a new log version
    in the same run folder) is one row with the two parts' epochs; `validate` and `test` runs,
    which log no training metrics, are left out.
    """
    import pandas as pd

    parts: dict[tuple[str, str], list[list[tuple[dict[str, Any], Any, Path]]]] = {}
    unlogged = []
    for config_path in sorted(Path(folder).rglob("config*.yaml")):
        metrics_path = config_path.parent / "metrics.csv"
        if not metrics_path.exists():
            unlogged.append(str(config_path.parent))
            continue
        history = load_history(metrics_path)
        if not any(str(column).startswith("train/") for column in history.columns):
            continue  # validate / test / predict
        config = _flatten(yaml.safe_load(config_path.read_text()) or {})
        run = (str(config.get("trainer.default_root_dir")), str(config_path.parent.parent))
        parts.setdefault(run, []).append((config, history, config_path.parent))
    if unlogged:  # stopped or failed before the CSV logger wrote its first rows
        warnings.warn(f"load_runs: left out {len(unlogged)} run folder(s) with a config but no metrics.csv "
                      f"(stopped before their first logged step): {', '.join(sorted(set(unlogged)))}", stacklevel=2)
    rows, configs, histories = [], [], []
    for pieces in parts.values():
        pieces.sort(key=lambda piece: (piece[1].index.min() if len(piece[1]) else -1, piece[2].stat().st_mtime))
        for index, (config, history, path) in enumerate(pieces):
            if index and config.get("ckpt_path") is not None:  # resumed: the same run goes on
                histories[-1].append(history)
                configs[-1] = config
                continue
            rows.append({"run": str(path), "name": path.parent.name})
            configs.append(config)
            histories.append([history])
    for row, parts_of_run in zip(rows, histories):
        history = pd.concat(parts_of_run).groupby(level=0).last()  # a mid-epoch resume logs that epoch again
        val = history["val/acc1"].dropna() if "val/acc1" in history else pd.Series(dtype=float)
        row.update({
            "val/acc1_best": float(val.max()) if len(val) else float("nan"),
            "val/acc1_last": float(val.iloc[-1]) if len(val) else float("nan"),
            "val/acc5_best": float(history["val/acc5"].max()) if "val/acc5" in history else float("nan"),
            "epochs": int(history.index.max()) + 1 if len(history) else 0,
        })
    if keys is None:
        every = set().union(*configs) if configs else set()
        keys = sorted(
            k for k in every
            if not any(part in k.split(".") for part in IGNORED_KEYS)
            and len({repr(c.get(k)) for c in configs}) > 1
        )
    for row, config in zip(rows, configs):
        for key in keys:
            row[_short(key, keys)] = config.get(key)
    return pd.DataFrame(rows)


def _short(key: str, keys: list[str]) -> str:
    last = key.rsplit(".", 1)[-1]
    return last if sum(k.rsplit(".", 1)[-1] == last for k in keys) == 1 else key


def load_wandb_runs(path: str, api: Any = None) -> Any:
    """The same table from W&B: `path` is entity/project/sweep_id (a sweep) or entity/project."""
    import pandas as pd

    if api is None:
        import wandb

        api = wandb.Api()
    parts = path.strip("/").split("/")
    runs = api.sweep(path).runs if len(parts) == 3 else api.runs(path)
    rows = []
    for run in runs:
        config = _flatten({k: v for k, v in dict(run.config).items() if not k.startswith("_")})
        summary = dict(run.summary)
        row = {"run": run.id, "name": run.name, "val/acc1_best": summary.get("val/acc1_best", summary.get("val/acc1")),
               "val/acc1_last": summary.get("val/acc1"), "tags": list(run.tags)}
        row.update({k: v for k, v in config.items() if k.startswith(("model.", "data.", "trainer.max_epochs"))})
        rows.append(row)
    return pd.DataFrame(rows)


def paper_comparison(runs: Any, table: str) -> Any:
    """Runs beside the paper's row of `table` that each one reproduces (top-1 in percent)."""
    import pandas as pd

    from .models.registry import _REGISTRY
    from .paper import paper_tables

    tables = paper_tables()
    if table not in tables:  # a unique prefix, e.g. "table2" or "table4a"
        matches = [key for key in tables if key.startswith(table + "_") and isinstance(tables[key], list)]
        if len(matches) != 1:
            known = [key for key, value in tables.items() if isinstance(value, list) and key.startswith("table")]
            raise KeyError(f"paper_comparison: no table {table!r}; expected one of {known} (or a unique prefix)")
        table = matches[0]
    rows = tables[table]
    out = []
    for _, run in runs.iterrows():
        index = _paper_index(run, table, rows, _REGISTRY)
        paper = rows[index] if index is not None else {}
        swept = {k: run[k] for k in runs.columns if k not in ("run", "val/acc1_best", "val/acc1_last", "val/acc5_best", "epochs")}
        out.append({**swept, "top1 (ours)": 100 * run["val/acc1_best"], "top1 (paper)": paper.get("top1"),
                    "params M (paper)": paper.get("params"), "MAdds M (paper)": paper.get("madds"),
                    "paper row": index, "run": run["run"]})
    return pd.DataFrame(out).sort_values("paper row", na_position="last").reset_index(drop=True)


def _paper_index(run: Any, table: str, rows: list[dict], registry: dict) -> int | None:
    name = str(run.get("name", ""))
    static = name.endswith("_static")
    if table.startswith(("table2", "table3a")) and name in registry and not name.startswith("mobilenetv2_x0.5_"):
        return None  # a registry model of another backbone: these tables are MobileNetV2 x0.5's
    if table.startswith("table2"):
        mult = None if static else float(run.get("latent_mult", 1.0) if run.get("latent_mult") is not None else 1.0)
        return next((i for i, r in enumerate(rows) if r["latent_mult"] == mult), None)
    if table.startswith("table3a"):
        if static:
            return 0
        blocks = int(run.get("num_blocks", 1) or 1)
        attention = str(run.get("channel_attention", True)).lower() != "false"
        model = "Lambda W0 + P Phi Q^T" if attention else "W0 + P Phi Q^T"
        return next((i for i, r in enumerate(rows) if r["blocks"] == blocks and r["model"] == model), None)
    spec = registry.get(name)
    if spec is None:
        return None
    return next((index for key, index in spec.paper if key == table), None)


def __getattr__(name: str) -> Any:
    """`dcd_lightning.analysis.PhiVarianceMonitor`, the name configs use, imported on first use."""
    if name == "PhiVarianceMonitor":
        from .callbacks import PhiVarianceMonitor

        return PhiVarianceMonitor
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
