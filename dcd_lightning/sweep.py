"""`python -m dcd_lightning sweep FILE [--dry-run] [--count N]`: run a W&B sweep file without a server.

The same files drive W&B (`wandb sweep FILE`, then `wandb agent ID` on every machine). Here the
grid (or `count` random draws) is expanded locally and each trial is run exactly as an agent would
run it: the file's `command` with ${env}, ${interpreter}, ${program} and ${args} filled in, where
${args} is `--key=value` for every parameter, value written with Python's str(). Each trial is its
own run: its files go to <default_root_dir>/<sweep>/trial-NNN and its W&B tags are the swept values.
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import random
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ._args import positive_int

DEFAULT_COMMAND = ["${env}", "${interpreter}", "${program}", "${args}"]
TRIAL_ENV = "DCD_SWEEP_TRIAL"  # "<sweep name>/trial-NNN": the CLI puts the run in that sub-folder
TAGS_ENV = "DCD_SWEEP_TAGS"  # comma-separated key=value tags for W&B
MAX_TAG = 64  # W&B refuses longer tags, and the run with them


@dataclass
class Trial:
    """One set of parameter values and the command that runs it."""

    index: int
    values: dict[str, Any]
    command: list[str]

    def tags(self) -> list[str]:
        """The swept values as W&B tags (at most 64 characters each): the last part of each dotted
        key, and a config file's name without its folder or suffix."""
        tags = []
        for key, value in self.values.items():
            text = str(value)
            if text.endswith((".yaml", ".yml")):
                text = Path(text).stem
            tags.append(f"{key.rsplit('.', 1)[-1]}={text}"[:MAX_TAG])
        return tags


def load_sweep(path: str | Path, method: str | None = None) -> dict[str, Any]:
    """Read and check a sweep file, with `method` in place of the file's if given; ValueError naming the problem."""
    if not Path(path).is_file():
        raise ValueError(f"sweep: {path} is not a file; expected a W&B sweep file such as "
                         "configs/sweeps/table2_latent_mult.yaml")
    try:
        spec = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as error:
        raise ValueError(f"sweep: {path} is not valid YAML: {error}") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("parameters"), dict) or not spec["parameters"]:
        raise ValueError(f"sweep: {path} has no 'parameters' mapping; see configs/sweeps/ for the format")
    if method is not None:
        spec["method"] = method
    method = spec.get("method")
    if method not in ("grid", "random", "bayes"):
        raise ValueError(f"sweep: {path}: method={method!r} is not allowed; expected 'grid', 'random' or 'bayes'")
    for name, param in spec["parameters"].items():
        if not isinstance(param, dict) or not ({"value", "values", "distribution", "min"} & set(param)):
            raise ValueError(f"sweep: {path}: parameter {name!r} needs 'value', 'values' or a distribution")
        for value in param.get("values", [param["value"]] if "value" in param else []):
            if value is None:
                raise ValueError(
                    f"sweep: {path}: parameter {name!r} has the value None, which an agent writes as "
                    "'None' and the CLI cannot parse; use the string 'null'"
                )
        if method == "grid" and "values" not in param and "value" not in param:
            raise ValueError(
                f"sweep: {path}: grid search needs 'values' for parameter {name!r}, which has a distribution; "
                "use random search (the file's method, or --method random)"
            )
    return spec


def _draw(param: dict[str, Any], rng: random.Random) -> Any:
    if "value" in param:
        return param["value"]
    if "values" in param:
        weights = param.get("probabilities")
        return rng.choices(param["values"], weights=weights)[0]
    low, high = param["min"], param["max"]
    kind = param.get("distribution") or ("int_uniform" if isinstance(low, int) and isinstance(high, int) else "uniform")
    if kind == "int_uniform":
        return rng.randint(low, high)
    if kind == "uniform":
        return rng.uniform(low, high)
    if kind == "log_uniform_values":
        return math.exp(rng.uniform(math.log(low), math.log(high)))
    if kind == "log_uniform":  # min and max are exponents
        return math.exp(rng.uniform(low, high))
    if kind == "q_uniform":
        step = param.get("q", 1)
        return round(rng.uniform(low, high) / step) * step
    raise ValueError(f"sweep: distribution {kind!r} is not supported locally; run it with a W&B agent")


def expand(spec: dict[str, Any], count: int | None = None, seed: int = 0) -> list[dict[str, Any]]:
    """Parameter values of every trial: the full grid, or `count` random draws."""
    params = spec["parameters"]
    if spec["method"] == "grid":
        names = list(params)
        choices = [params[n]["values"] if "values" in params[n] else [params[n]["value"]] for n in names]
        trials = [dict(zip(names, combo)) for combo in itertools.product(*choices)]
        return trials[:count] if count else trials
    if spec["method"] == "bayes":
        raise ValueError(
            "sweep: method 'bayes' needs the W&B sweep server (wandb sweep FILE; wandb agent ID); "
            "run it with --method random to explore locally"
        )
    rng = random.Random(seed)
    return [{name: _draw(param, rng) for name, param in params.items()} for _ in range(count or 10)]


def agent_command(spec: dict[str, Any], values: dict[str, Any]) -> list[str]:
    """The argv a W&B agent runs for these values (macros filled as the agent fills them)."""
    args = [f"--{key}={value}" for key, value in values.items()]
    command: list[str] = []
    for item in spec.get("command") or DEFAULT_COMMAND:
        if item == "${env}":
            command.append("/usr/bin/env")
        elif item == "${interpreter}":
            command.append("python")
        elif item == "${program}":
            command.append(str(spec.get("program", "")))
        elif item == "${args}":
            command += args
        elif item == "${args_no_hyphens}":
            command += [a[2:] for a in args]
        else:
            command.append(str(item))
    return command


def trials(spec: dict[str, Any], count: int | None = None, seed: int = 0) -> list[Trial]:
    """Every trial of the sweep with its command."""
    return [Trial(i, values, agent_command(spec, values)) for i, values in enumerate(expand(spec, count, seed))]


def shared_root(planned: list[Trial]) -> str | None:
    """For a sweep whose trials run different config files (`--config=FILE` swept): the folder
    that holds every file's trainer.default_root_dir, so that all trials land under one
    <root>/<sweep>; None where the trials share one default_root_dir (or set none)."""
    roots = set()
    for trial in planned:
        for key, value in trial.values.items():
            if key == "config" and Path(str(value)).is_file():
                config = yaml.safe_load(Path(str(value)).read_text()) or {}
                roots.add(str((config.get("trainer") or {}).get("default_root_dir") or "."))
    if len(roots) < 2:
        return None
    return os.path.commonpath([os.path.normpath(root) for root in roots]) or "."


def missing_configs(command: list[str]) -> list[str]:
    """The config files a trial's command names (`--config FILE`, `--config=FILE`) that do not
    exist from the current folder, against which the command's relative paths are read (a
    --config given as YAML text rather than a file name is not one)."""
    named = [command[i + 1] for i, item in enumerate(command[:-1]) if item == "--config"]
    named += [item.split("=", 1)[1] for item in command if item.startswith("--config=")]
    return [path for path in named if path.endswith((".yaml", ".yml", ".json")) and "\n" not in path
            and not Path(path).is_file()]


def main(argv: list[str] | None = None) -> int:
    """List and run the trials of a sweep file."""
    parser = argparse.ArgumentParser(prog="python -m dcd_lightning sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("file", help="a W&B sweep file (configs/sweeps/*.yaml)")
    parser.add_argument("--dry-run", action="store_true", help="print the trials and their commands only")
    parser.add_argument("--count", type=positive_int, help="run at most N trials (random search: draw N)")
    parser.add_argument("--method", choices=["grid", "random"], help="override the file's method")
    parser.add_argument("--seed", type=int, default=0, help="seed of random search (default 0)")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                        help="arguments appended to every trial's command (e.g. --trainer.fast_dev_run=1)")
    args = parser.parse_args(argv)
    try:
        spec = load_sweep(args.file, args.method)
        planned = trials(spec, args.count, args.seed)
    except ValueError as error:
        parser.error(str(error))
    name = spec.get("name") or Path(args.file).stem
    root = shared_root(planned)
    common = [f"--trainer.default_root_dir={root}"] if root is not None else []  # before --extra: it may override
    print(f"sweep {name}: {spec['method']} search, {len(planned)} trial(s)")
    if root is not None:
        print(f"sweep {name}: the trials' configs differ in default_root_dir; every trial goes under {root}/{name}")
    for trial in planned:
        print(f"[trial {trial.index:03d}] {shlex.join(trial.command + common + args.extra)}")
    missing = sorted({path for trial in planned for path in missing_configs(trial.command + common + args.extra)})
    if missing:
        message = (f"the trials' config file(s) {missing} do not exist from this folder ({os.getcwd()}); a sweep "
                   "file's paths are read from the folder the trials run in, as `wandb agent` runs them: run it "
                   "from the repository root (or the folder they are relative to)")
        if not args.dry_run:
            parser.error(message)
        print(f"sweep {name}: note: {message}")
    if args.dry_run:
        return 0
    failed = 0
    for trial in planned:
        env = dict(os.environ, **{TRIAL_ENV: f"{name}/trial-{trial.index:03d}", TAGS_ENV: ",".join(trial.tags())})
        command = trial.command + common + args.extra
        if command[:2] == ["/usr/bin/env", "python"]:
            command = [sys.executable] + command[2:]  # the interpreter running this, as `python` would be
        print(f"[trial {trial.index:03d}] running", flush=True)
        result = subprocess.run(command, env=env)
        if result.returncode:
            failed += 1
            print(f"[trial {trial.index:03d}] failed with exit code {result.returncode}", flush=True)
    print(f"sweep {name}: {len(planned) - failed} of {len(planned)} trial(s) finished")
    return 1 if failed else 0
