"""`python -m dcd_lightning bench-gpu`: training throughput (images/s) on a GPU, one table.

    python -m dcd_lightning bench-gpu --out docs/gpu-throughput.md   # about 6 minutes on one H100

Static, DCD, DY-Conv and CondConv versions of MobileNetV2 x1.0 and ResNet-50, trained with SGD in
bf16 autocast and channels_last, eager and under torch.compile; each figure is the median over
timed steps after warm-up. The ResNet-50 DY-Conv and CondConv models are not paper rows: they put
the operator on every block convolution, as resnet18_dyconv does.
"""

from __future__ import annotations

import argparse
import statistics
import time
import traceback
from functools import partial

import torch

from .bench_ops import machine
from .models import ResNet, create_model, list_models
from .ops import CondConv2d, DyConv2d


def build(name: str) -> torch.nn.Module:
    """A registry model, or ResNet-50 with DY-Conv/CondConv block convolutions."""
    if name == "resnet50_dyconv":
        return ResNet(depth=50, conv=partial(DyConv2d, num_kernels=4))
    if name == "resnet50_condconv":
        return ResNet(depth=50, conv=partial(CondConv2d, num_experts=8))
    return create_model(name)


MODELS = [f"mobilenetv2_x1.0_{k}" for k in ("static", "dcd", "dyconv", "condconv")] + [
    f"resnet50_{k}" for k in ("static", "dcd", "dyconv", "condconv")
]


def throughput(name: str, batch: int, size: int, steps: int, warmup: int, device: str, compile_model: bool,
               bf16: bool) -> float:
    """Images per second of the training step (forward, backward, SGD) of one model."""
    model = build(name).to(device).train()
    model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, 3, size, size, device=device).to(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (batch,), device=device)
    if compile_model:
        torch._dynamo.reset()  # each model compiles afresh, never hitting the recompile limit of earlier ones
    forward = torch.compile(model) if compile_model else model

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=bf16):
            loss = torch.nn.functional.cross_entropy(forward(x), y)
        loss.backward()
        optimizer.step()

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    for _ in range(warmup):
        step()
    sync()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    return batch / statistics.median(times)


def table(header: list[str], models: list[str], modes: list[str], results: dict[tuple[str, str], str | float]) -> str:
    """The markdown table of what has been measured so far (a missing cell is left empty)."""
    lines = [*header, "| model | " + " | ".join(f"{m} img/s | {m} / static" for m in modes) + " |",
             "|---|" + "---:|---:|" * len(modes)]
    for name in models:
        family = name.rsplit("_", 1)[0]
        cells = []
        for mode in modes:
            value = results.get((name, mode), "")
            static = results.get((f"{family}_static", mode))
            if isinstance(value, float):
                ratio = f"{value / static:.2f}" if isinstance(static, float) else ""
                cells += [f"{value:.0f}", ratio]
            else:
                cells += [value, ""]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Measure and write the markdown table.

    All models run eager first, then compiled (compilation takes most of the time), and the table is
    rewritten after every measurement, so a run stopped early still leaves what it measured."""
    parser = argparse.ArgumentParser(prog="python -m dcd_lightning bench-gpu", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--no-compile", action="store_true", help="eager only")
    parser.add_argument("--no-bf16", action="store_true", help="float32 instead of bf16 autocast")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", help="also write the table to this markdown file (after every measurement)")
    args = parser.parse_args(argv)
    torch.backends.cudnn.benchmark = True
    modes = ["eager"] + ([] if args.no_compile else ["compile"])
    models = args.models.split(",")
    unknown = [name for name in models if name not in MODELS and name not in list_models()]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(MODELS)} or a registry name")
    header = [f"machine: {machine()}; device {args.device}"
              + (f" ({torch.cuda.get_device_name()})" if args.device == "cuda" else ""),
              f"batch {args.batch_size}, {args.size}x{args.size}, {'bf16 autocast' if not args.no_bf16 else 'fp32'}, "
              f"channels_last, SGD, median of {args.steps} steps after {args.warmup}", ""]
    results: dict[tuple[str, str], str | float] = {}
    for mode in modes:
        for name in models:
            try:
                results[(name, mode)] = throughput(name, args.batch_size, args.size, args.steps, args.warmup,
                                                   args.device, mode == "compile", not args.no_bf16)
            except Exception as error:  # noqa: BLE001 - a failing model is reported, the rest still run
                traceback.print_exc()
                results[(name, mode)] = f"failed: {type(error).__name__}"
            value = results[(name, mode)]
            print(f"{name} {mode}: " + (f"{value:.0f} img/s" if isinstance(value, float) else value), flush=True)
            text = table(header, models, modes, results)
            if args.out:
                with open(args.out, "w") as handle:
                    handle.write(text)
            if args.device == "cuda":
                torch.cuda.empty_cache()
    print("\n" + text)
    return 0
