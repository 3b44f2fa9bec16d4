"""Micro-benchmark of the operators: forward and forward+backward time, as ratios to static.

    python -m dcd_lightning bench-ops [--batch-size 8] [--rounds 7] [--threads N] [--only resnet]

Every operator of a row is timed in the same run as that row's static convolution, interleaved
round by round, and the medians are compared, so the ratios hold on a noisy machine even where
the absolute times do not.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .ops import (
    CondConv2d,
    DCDConv2d,
    DCDDepthwiseConv2d,
    DCDLinear,
    DCDReleaseConv2d,
    DCDReleaseLinear,
    DyConv2d,
    StaticConv2d,
    StaticLinear,
)


@dataclass(frozen=True)
class Shape:
    """One layer shape to benchmark."""

    family: str
    label: str
    in_channels: int
    out_channels: int
    kernel_size: int
    stride: int
    groups: int
    size: int  # input height = width; 0 for a classifier


SHAPES = [
    Shape("mobilenetv2", "pw 32->192 @28", 32, 192, 1, 1, 1, 28),
    Shape("mobilenetv2", "pw 192->32 @28", 192, 32, 1, 1, 1, 28),
    Shape("mobilenetv2", "dw 3x3 192 @28 s2", 192, 192, 3, 2, 192, 28),
    Shape("mobilenetv2", "pw 160->960 @7", 160, 960, 1, 1, 1, 7),
    Shape("mobilenetv2", "pw 960->160 @7", 960, 160, 1, 1, 1, 7),
    Shape("resnet", "3x3 64->64 @56", 64, 64, 3, 1, 1, 56),
    Shape("resnet", "3x3 128->256 @28 s2", 128, 256, 3, 2, 1, 28),
    Shape("resnet", "3x3 512->512 @7", 512, 512, 3, 1, 1, 7),
    Shape("classifier", "fc 1280->1000", 1280, 1000, 1, 1, 1, 0),
]

QUICK_SHAPES = [
    Shape("mobilenetv2", "pw 8->16 @6", 8, 16, 1, 1, 1, 6),
    Shape("mobilenetv2", "dw 3x3 8 @6", 8, 8, 3, 1, 8, 6),
    Shape("resnet", "3x3 8->16 @6 s2", 8, 16, 3, 2, 1, 6),
    Shape("classifier", "fc 16->10", 16, 10, 1, 1, 1, 0),
]

Factory = Callable[[Shape], nn.Module]


def operators_for(shape: Shape) -> dict[str, Factory]:
    """The operators compared at `shape`, the static one first."""
    args = lambda s: (s.in_channels, s.out_channels, s.kernel_size, s.stride, s.groups)  # noqa: E731
    if shape.size == 0:
        return {
            "static": lambda s: StaticLinear(s.in_channels, s.out_channels),
            "dcd": lambda s: DCDLinear(s.in_channels, s.out_channels),
            "dcd-release": lambda s: DCDReleaseLinear(s.in_channels, s.out_channels),
        }
    table: dict[str, Factory] = {"static": lambda s: StaticConv2d(*args(s))}
    if shape.groups > 1:
        table["dcd (kernel)"] = lambda s: DCDDepthwiseConv2d(*args(s), route="kernel")
        table["dcd (activations)"] = lambda s: DCDDepthwiseConv2d(*args(s), route="activations")
    else:
        table["dcd (auto)"] = lambda s: DCDConv2d(*args(s))
        table["dcd (activations)"] = lambda s: DCDConv2d(*args(s), route="activations")
        table["dcd (kernel)"] = lambda s: DCDConv2d(*args(s), route="kernel")
        if shape.kernel_size > 1:
            table["dcd joint"] = lambda s: DCDConv2d(*args(s), fusion="joint")
        layout = "mobilenetv2" if shape.family == "mobilenetv2" else "resnet_basic"
        table["dcd-release"] = lambda s: DCDReleaseConv2d(*args(s), layout=layout)
    table["condconv (kernel)"] = lambda s: CondConv2d(*args(s), mixing="kernel")
    table["condconv (output)"] = lambda s: CondConv2d(*args(s), mixing="output")
    table["dyconv (kernel)"] = lambda s: DyConv2d(*args(s), mixing="kernel")
    table["dyconv (output)"] = lambda s: DyConv2d(*args(s), mixing="output")
    return table


def _time(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_shape(shape: Shape, batch_size: int, rounds: int) -> list[dict[str, object]]:
    """Median forward (eval, no grad) and forward+backward (train) times of each operator."""
    torch.manual_seed(0)
    ops = {name: factory(shape) for name, factory in operators_for(shape).items()}
    if shape.size:
        x = torch.randn(batch_size, shape.in_channels, shape.size, shape.size)
    else:
        x = torch.randn(batch_size, shape.in_channels)

    def forward(op: nn.Module) -> None:
        op.eval()
        with torch.inference_mode():
            op(x)

    def train_step(op: nn.Module) -> None:
        op.train()
        op(x).sum().backward()

    times: dict[str, dict[str, list[float]]] = {n: {"fwd": [], "fwd+bwd": []} for n in ops}
    for round_index in range(rounds + 1):
        for name, op in ops.items():
            fwd, step = _time(lambda: forward(op)), _time(lambda: train_step(op))
            if round_index:  # round 0 warms up
                times[name]["fwd"].append(fwd)
                times[name]["fwd+bwd"].append(step)
    static = {k: statistics.median(v) for k, v in times["static"].items()}
    rows = []
    for name, op in ops.items():
        med = {k: statistics.median(v) for k, v in times[name].items()}
        rows.append(
            {
                "shape": shape.label,
                "operator": name,
                "params": sum(p.numel() for p in op.parameters()),
                "fwd_ms": med["fwd"] * 1e3,
                "fwd_ratio": med["fwd"] / static["fwd"],
                "step_ms": med["fwd+bwd"] * 1e3,
                "step_ratio": med["fwd+bwd"] / static["fwd+bwd"],
            }
        )
    return rows


def describe_cpu(cpuinfo: str, l2: str = "") -> str:
    """'model, vector ISA, L2 per core' from /proc/cpuinfo's text (its first processor) and the
    first core's L2 size; what is unknown is left out. Ratios to static depend on these (see
    docs/benchmarks.md, "Another machine")."""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        if not line.strip():
            break  # the first processor is enough
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    flags = set((fields.get("flags") or fields.get("Features") or "").split())
    isa = next((name for flag, name in (("avx512f", "AVX-512"), ("avx2", "AVX2"), ("avx", "AVX"),
                                        ("sve", "SVE"), ("asimd", "NEON")) if flag in flags), "")
    model = fields.get("model name") or fields.get("Model") or ""
    return ", ".join(part for part in (model, isa, f"L2 {l2} per core" if l2 else "") if part)


def _cpu() -> str:
    """describe_cpu for this machine ('' where /proc and /sys do not say)."""
    try:
        with open("/proc/cpuinfo") as info:
            cpuinfo = info.read()
    except OSError:
        return ""
    l2 = ""
    for cache in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            if (cache / "level").read_text().strip() == "2":
                l2 = (cache / "size").read_text().strip()
                break
        except OSError:
            continue
    return describe_cpu(cpuinfo, l2)


def machine() -> str:
    """A line naming this machine and software."""
    cpu = _cpu()
    return (
        f"{platform.processor() or platform.machine()}{f' ({cpu})' if cpu else ''}, {os.cpu_count()} logical CPUs, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, {platform.system()}"
    )


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print a markdown table per layer shape."""
    parser = argparse.ArgumentParser(prog="python -m dcd_lightning bench-ops", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds after one warm-up round")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    parser.add_argument("--only", choices=["mobilenetv2", "resnet", "classifier"], help="one family of shapes")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, for a smoke test")
    args = parser.parse_args(argv)
    if args.batch_size < 2 or args.rounds < 1 or args.threads < 0:
        parser.error(f"--batch-size {args.batch_size}, --rounds {args.rounds}, --threads {args.threads}: expected a "
                     "batch of at least 2 (a training step of the DCD layers with latent batch norms needs two "
                     "samples), at least 1 round, and 0 or more threads")
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = QUICK_SHAPES if args.quick else SHAPES
    if args.only:
        shapes = [s for s in shapes if s.family == args.only]
    print(f"machine: {machine()}")
    print(f"batch size {args.batch_size}, median of {args.rounds} interleaved rounds; "
          "fwd = eval forward without grad, step = train forward+backward\n")
    for shape in shapes:
        print(f"### {shape.family}: {shape.label}\n")
        print("| operator | params | fwd ms | fwd / static | step ms | step / static |")
        print("|---|---:|---:|---:|---:|---:|")
        for row in bench_shape(shape, args.batch_size, args.rounds):
            print(
                f"| {row['operator']} | {row['params']:,} | {row['fwd_ms']:.2f} | {row['fwd_ratio']:.2f} "
                f"| {row['step_ms']:.2f} | {row['step_ratio']:.2f} |"
            )
        print()
    return 0
