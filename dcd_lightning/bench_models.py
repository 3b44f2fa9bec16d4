"""`python -m dcd_lightning bench`: whole-model cost of the dynamic models against their static ones.

    python -m dcd_lightning bench [--part latency,train,memory] [--models GROUP,...] [--rounds 10]
                                  [--latency-rounds 30] [--train-group mobilenetv2_x0.5]
                                  [--batch-size 32] [--device cpu|cuda] [--reads-floor]

(a) latency: batch-1, single-thread CPU inference at 224x224 of each Table 4 model, interleaved with
    its static model round by round, after optimize_for_inference on both (batch norms folded into
    the convolutions before them; DCD layers' constants folded, one sample through the C kernel of
    ops/_native.c where it builds; in both models, 1x1 convolutions that a DCD layer of the same
    size would compute in the C kernel are computed there too, as are linear layers and the ResNet
    stem's max pooling). Beside them, the same DCD model with optimize_for_inference(native=False):
    its DCD, 1x1 and linear layers in PyTorch calls (the stem's pooling still in C), its ratio
    still to the static model above. With
    --reads-floor, also "static + DCD's reads": the static model reading, at each DCD layer's
    place, as many floats as that layer holds beyond the static one (12 MB for ResNet-18), with
    none of DCD's arithmetic. Where DCD's layers keep PyTorch's convolution (the ResNets), that is
    the floor that reading DCD's weights once per image sets under its ratio on this machine. It is
    not one for MobileNetV2, whose DCD layers the C kernel computes whole, convolution included,
    and where the reads' own calls (a module and a sum per layer, some microseconds each) weigh
    on a 13-25 ms model. Every
    model's batch norms first take the statistics of one random batch (calibrate_batch_norms), as
    a trained model's would be: with a fresh model's mean 0 and variance 1 the dynamic ResNets
    overflow to inf and NaN in eval mode, and would be timed on those.
(b) train: one training step (forward, backward, SGD step) at a realistic batch, ratio to static.
(c) memory: peak memory of two training steps, ratio to static. On the CPU each model runs in a
    child process and the figure is its peak resident memory (Linux VmHWM, reset before the model
    is built) above what it held then: weights, gradients, optimizer state, the batch and the
    activations, not the interpreter and libraries (a tiny network's training steps first set those
    up); on a GPU, torch.cuda's peak allocation. One figure per model, no interval.
Times are medians; a ratio is the median over rounds of the model's time / its static model's time
in the same round, which cancels a shared machine's slow drifts; beside it, a distribution-free
confidence interval of that median (median_interval: two order statistics of the rounds' ratios;
its header gives its exact coverage, at least 95% from 6 rounds on, 94% at 5, 50% at 2), so a ratio
near a target reads as above it, below it, or not told apart by these rounds. On Linux,
glibc malloc's thresholds are pinned first (steady_allocator), or page faults from whichever model
allocated first would weigh on one side. Ratios are the numbers to read; absolute times on a
shared machine are not stable.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from .bench_ops import machine
from .inference import calibrate_batch_norms, optimize_for_inference
from .models import create_model
from .ops._folded import layer_tensors
from .ops._native import compiler, library, register_block, vector_bytes

GROUPS = {
    "mobilenetv2_x1.0": ["dcd", "dyconv", "condconv"],
    "mobilenetv2_x0.5": ["dcd", "dyconv", "condconv"],
    "mobilenetv2_x0.35": ["dcd", "dyconv"],
    "resnet18": ["dcd", "dyconv"],
    "resnet10": ["dcd", "dyconv"],
    "resnet50": ["dcd"],
}
TRAIN_GROUP = "mobilenetv2_x0.5"


def steady_allocator() -> bool:
    """Pin glibc malloc's thresholds (Linux) so that each forward reuses heap memory.

    By default glibc serves large buffers with fresh memory maps and moves its threshold as the
    process allocates, so whether a model's activations are page-faulted in again on every forward
    depends on what else the process allocated before: one static MobileNetV2 x1.0 took 16 ms
    alone and 20-31 ms after another model was built in the same process (~2600 page faults per
    forward). Pinning the map threshold (32 MiB, glibc's largest) and the trim threshold removes
    that from the comparison. Returns False where it does not apply.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
    return bool(libc.mallopt(m_mmap_threshold, 32 << 20)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))


def _interval_ranks(n: int, z: float = 1.96) -> tuple[int, int]:
    half = z * math.sqrt(n) / 2
    return min(max(round(n / 2 - half), 1), n), min(max(round(1 + n / 2 + half), 1), n)


def interval_coverage(n: int) -> float:
    """The exact probability that median_interval of n independent values holds their median: 0
    for 1 value, 50% for 2, 94% for 5, at least 95% from 6 on."""
    low, high = _interval_ranks(n)
    return sum(math.comb(n, k) for k in range(low, high)) / 2**n


def median_interval(values: list[float], z: float = 1.96) -> tuple[float, float]:
    """A distribution-free confidence interval of the median of `values` (95% for z = 1.96): the
    order statistics of ranks n/2 - z sqrt(n)/2 and 1 + n/2 + z sqrt(n)/2 (1-based, rounded, within
    1..n), from the binomial count of values below the median. Assumes nothing about the shape of
    the distribution, only independent rounds; with few values it is their whole range (n = 5:
    94% coverage)."""
    if not values:
        raise ValueError("median_interval: no values")
    ordered = sorted(values)
    low, high = _interval_ranks(len(values), z)
    return ordered[low - 1], ordered[high - 1]


class _ReadsFirst(torch.nn.Module):
    """`inner`, after reading `numel` floats of its own from memory (a sum, discarded)."""

    def __init__(self, inner: torch.nn.Module, numel: int) -> None:
        super().__init__()
        self.inner = inner
        # written values (pages of zeros could all map to one page, which would read from cache)
        self.register_buffer("extra", torch.randn(numel, generator=torch.Generator().manual_seed(0)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.extra.sum()
        return self.inner(x)


def _floats(module: torch.nn.Module) -> int:
    """How many values a module's parameters and floating buffers hold (layer_tensors: what a fold reads)."""
    return sum(t.numel() for t in layer_tensors(module))


def extra_floats(static: torch.nn.Module, dynamic: torch.nn.Module) -> dict[str, int]:
    """Per layer of `dynamic` that differs from `static`'s at the same place (the outermost such
    modules), how many floats it holds beyond the static layer: branch, P and Q, latent norms."""
    extra: dict[str, int] = {}
    static_modules = dict(static.named_modules())
    for name, module in dynamic.named_modules():
        other = static_modules.get(name)
        if other is not None and type(other) is not type(module) and not any(name.startswith(p + ".") for p in extra):
            extra[name] = _floats(module) - _floats(other)
    return extra


def with_reads(model: torch.nn.Module, extra: dict[str, int]) -> torch.nn.Module:
    """`model` (changed in place and returned) reading, before each layer named in `extra`, that
    many floats of its own. With extra_floats of a static model and its dynamic one, on a copy of
    the static model: the memory traffic the dynamic model adds per image, with none of its
    arithmetic. Its time over the static model's is the floor that reading those weights once per
    image puts under the dynamic model's on this machine (at batch 1 they come from memory: the
    models' weights are larger than the caches)."""
    for name, numel in extra.items():
        if numel > 0:
            parent, _, child = name.rpartition(".")
            holder = model.get_submodule(parent)
            setattr(holder, child, _ReadsFirst(getattr(holder, child), numel))
    return model


def _interleaved(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, tuple[float, float, tuple[float, float]]]:
    """Run every function once per round (one warm-up round first); per function, the median time,
    the median over rounds of its time / the first function's time in the same round, and that
    median's 95% interval (median_interval).

    Pairing each time with the baseline's in the same round cancels the slow drifts of a shared
    machine (other tenants, frequency), which a ratio of two medians would keep."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for round_index in range(rounds + 1):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            if round_index:
                times[name].append(time.perf_counter() - start)
    base = times[next(iter(fns))]
    results = {}
    for name, values in times.items():
        ratios = [v / b for v, b in zip(values, base)]
        results[name] = (statistics.median(values), statistics.median(ratios), median_interval(ratios))
    return results


def latency(groups: dict[str, list[str]], rounds: int, reads_floor: bool = False) -> list[dict[str, object]]:
    """Batch-1 single-thread eval latency, each dynamic model against its static one (and with
    `reads_floor`, the static model reading DCD's extra weights: see with_reads)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rows = []
    try:
        x = torch.randn(1, 3, 224, 224)
        # batch-norm statistics for every model from one batch (at half the size: a fraction of a second)
        calibration = torch.randn(8, 3, 112, 112, generator=torch.Generator().manual_seed(0))
        for prefix, kinds in groups.items():
            built = {
                kind: calibrate_batch_norms(create_model(f"{prefix}_{kind}").eval(), calibration)
                for kind in ["static", *kinds]
            }
            models = {kind: optimize_for_inference(model) for kind, model in built.items()}
            if "dcd" in built and library() is not None:  # the same model without the C kernel, beside it
                models["dcd (PyTorch calls)"] = optimize_for_inference(built["dcd"], native=False)
            if reads_floor and "dcd" in built:  # the static model reading DCD's extra weights
                extra = extra_floats(built["static"], built["dcd"])
                models["static + DCD's reads"] = with_reads(optimize_for_inference(built["static"]), extra)

            with torch.inference_mode():
                overflowing = [kind for kind, m in models.items() if not torch.isfinite(m(x)).all()]
            if overflowing:
                warnings.warn(
                    f"bench: {', '.join(f'{prefix}_{kind}' for kind in overflowing)} gave inf or NaN outputs after "
                    "calibrate_batch_norms; their times are of that arithmetic",
                    RuntimeWarning,
                    stacklevel=2,
                )

            def runner(model: torch.nn.Module) -> Callable[[], object]:
                def run() -> object:
                    with torch.inference_mode():
                        return model(x)
                return run

            results = _interleaved({kind: runner(m) for kind, m in models.items()}, rounds)
            for kind, (seconds, ratio, interval) in results.items():
                rows.append({"model": f"{prefix}_{kind}", "ms": seconds * 1e3, "ratio": ratio, "interval": interval,
                             "rounds": rounds})
    finally:
        torch.set_num_threads(threads)
    return rows


def _train_step_fn(name: str, batch_size: int, device: str) -> Callable[[], object]:
    model = create_model(name).to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch_size, 3, 224, 224, device=device)
    y = torch.randint(0, 1000, (batch_size,), device=device)

    def step() -> object:
        optimizer.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)
        return loss

    return step


def train(prefix: str, kinds: list[str], batch_size: int, rounds: int, device: str) -> list[dict[str, object]]:
    """Training step time of each model, against the static one, interleaved."""
    names = [f"{prefix}_{kind}" for kind in ["static", *kinds]]
    results = _interleaved({n: _train_step_fn(n, batch_size, device) for n in names}, rounds)
    return [{"model": n, "ms": results[n][0] * 1e3, "ratio": results[n][1], "interval": results[n][2], "rounds": rounds}
            for n in names]


_CHILD = """
import json, sys, torch
from dcd_lightning.bench_models import _train_step_fn, _rss_kib, _warm_up_libraries
name, batch, device = sys.argv[1], int(sys.argv[2]), sys.argv[3]
cuda = torch.device(device).type == "cuda"
_warm_up_libraries(device)
base = _rss_kib("VmRSS")
try:
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # reset the peak (VmHWM) to the current resident size
except OSError:
    pass
step = _train_step_fn(name, batch, device)
if cuda:
    torch.cuda.reset_peak_memory_stats(device)
step(); step()
peak = torch.cuda.max_memory_allocated(device) if cuda else (_rss_kib("VmHWM") - base) * 1024
print(json.dumps({"peak_bytes": peak}))
"""


def _warm_up_libraries(device: str, bf16: bool = False, channels_last: bool = False) -> None:
    """Two training steps of a tiny network (a few KiB of tensors), so that what the libraries set
    up on first use (thread pools, oneDNN's kernels, autograd's engine: ~160-200 MiB of resident
    memory on the CPU; on a GPU the CUDA context, cuBLAS and cuDNN) is not counted as the first
    model's memory or time. Its tensors are too small for the model's allocations to reuse their
    memory."""
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
        torch.nn.Conv2d(4, 4, 1, groups=4), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 2),
    ).to(device)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    net = net.to(memory_format=layout)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    for _ in range(2):
        optimizer.zero_grad(set_to_none=True)
        x = torch.randn(2, 3, 8, 8, device=device).to(memory_format=layout)
        y = torch.tensor([0, 1], device=device)
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
            loss = torch.nn.functional.cross_entropy(net(x), y)
        loss.backward()
        optimizer.step()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _rss_kib(field: str) -> int:
    """A memory figure of this process from /proc/self/status (VmRSS: now, VmHWM: peak), in KiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"bench: /proc/self/status has no {field}; memory is measured on Linux only")


def memory(prefix: str, kinds: list[str], batch_size: int, device: str) -> list[dict[str, object]]:
    """Peak training memory of each model (a child process each), against the static one."""
    rows = []
    for kind in ["static", *kinds]:
        name = f"{prefix}_{kind}"
        child = subprocess.run([sys.executable, "-c", _CHILD, name, str(batch_size), device],
                               capture_output=True, text=True, check=False)
        if child.returncode != 0:
            raise RuntimeError(f"bench: the memory measurement of {name} failed:\n{child.stderr[-2000:]}")
        rows.append({"model": name, "peak_mib": json.loads(child.stdout.strip().splitlines()[-1])["peak_bytes"] / 2**20})
    for row in rows:
        row["ratio"] = row["peak_mib"] / rows[0]["peak_mib"]
    return rows


def _table(title: str, rows: list[dict[str, object]], value: str, unit: str) -> None:
    """A markdown table; where the rows have intervals (timed parts), a column with each ratio's."""
    timed = all("interval" in row for row in rows)
    coverage = f"{interval_coverage(rows[0]['rounds']):.0%}" if timed else ""
    head = f"| model | {unit} | / static |" + (f" {coverage} interval |" if timed else "")
    print(f"### {title}\n\n{head}\n|---|---:|---:|" + ("---:|" if timed else ""))
    for row in rows:
        cells = f"| {row['model']} | {row[value]:.1f} | {row['ratio']:.3f} |"
        if timed:
            low, high = row["interval"]
            cells += f" {low:.3f}-{high:.3f} |"
        print(cells)
    print()


def main(argv: list[str] | None = None) -> int:
    """Run the chosen parts and print markdown tables."""
    parser = argparse.ArgumentParser(prog="python -m dcd_lightning bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", default="latency,train,memory", help="comma-separated: latency, train, memory")
    parser.add_argument("--models", default=",".join(GROUPS),
                        help=f"groups for latency (default: all of {list(GROUPS)}); train and memory use --train-group")
    parser.add_argument("--train-group", default=TRAIN_GROUP, help="group for train and memory (default %(default)s)")
    parser.add_argument("--rounds", type=int, default=10, help="rounds of the training step (default 10)")
    parser.add_argument("--latency-rounds", type=int, default=None,
                        help="rounds of batch-1 latency (default: 3 x --rounds; each is milliseconds)")
    parser.add_argument("--reads-floor", action="store_true",
                        help="latency: also time each static model reading its DCD model's extra weights "
                             "(branch, P, Q) at the DCD layers' places, none of DCD's arithmetic")
    parser.add_argument("--batch-size", type=int, default=32, help="training batch (default 32)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="device of the training step and memory parts: cpu or cuda[:N] (default: cuda where "
                             "there is one); latency is always on the CPU")
    args = parser.parse_args(argv)
    parts = {p.strip() for p in args.part.split(",") if p.strip()}
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if not parts or parts - {"latency", "train", "memory"}:
        parser.error(f"--part {args.part!r}: expected a comma-separated list of latency, train, memory")
    if not models or set(models) - set(GROUPS):
        parser.error(f"--models {args.models!r}: unknown group(s) {sorted(set(models) - set(GROUPS))}; "
                     f"expected a comma-separated list of {', '.join(GROUPS)}")
    if args.train_group not in GROUPS:
        parser.error(f"--train-group {args.train_group!r}: expected one of {', '.join(GROUPS)}")
    if args.rounds < 1 or (args.latency_rounds is not None and args.latency_rounds < 1):
        parser.error(f"--rounds {args.rounds} / --latency-rounds {args.latency_rounds}: expected at least 1 "
                     "(at least 6 for a 95% interval)")
    if parts & {"train", "memory"} and args.batch_size < 2:
        parser.error(f"--batch-size {args.batch_size}: expected at least 2 (DCD's latent batch norms need two "
                     "samples in training)")
    try:
        device = torch.device(args.device)
    except RuntimeError as error:
        parser.error(f"--device {args.device!r}: {error}")
    if device.type not in ("cpu", "cuda") or (device.type == "cuda" and not torch.cuda.is_available()):
        parser.error(f"--device {args.device!r}: expected cpu, or cuda[:N] on a machine with a CUDA GPU")
    allocator = "glibc malloc thresholds pinned" if steady_allocator() else "default allocator"
    print(f"machine: {machine()}; device {args.device}; {allocator}\n")
    if "latency" in parts:
        kernel = "not available (PyTorch calls only)"
        if library() is not None:
            rows, vectors = register_block()
            kernel = (f"built with {Path(compiler()).name}, {vector_bytes()}-byte vectors, "
                      f"{rows} x {vectors} register blocks")
        print(f"batch-1 C kernel of folded DCD layers (ops/_native.c): {kernel}\n")
        groups = {g: GROUPS[g] for g in models}
        rounds = args.latency_rounds if args.latency_rounds is not None else 3 * args.rounds
        _table("(a) batch-1 single-thread CPU latency, 224x224", latency(groups, rounds, args.reads_floor), "ms", "ms")
    kinds = GROUPS[args.train_group]
    if "train" in parts:
        _table(f"(b) training step, {args.train_group}, batch {args.batch_size}, 224x224",
               train(args.train_group, kinds, args.batch_size, args.rounds, args.device), "ms", "ms")
    if "memory" in parts:
        _table(f"(c) peak training memory, {args.train_group}, batch {args.batch_size}",
               memory(args.train_group, kinds, args.batch_size, args.device), "peak_mib", "MiB")
    return 0
