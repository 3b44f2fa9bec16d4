"""`python -m dcd_lightning bench-gpu`: training throughput (images/s) on a GPU, one table.

    python -m dcd_lightning bench-gpu --out docs/gpu-throughput.md   # at most --time-limit, 450 s

Static, DCD, DY-Conv and CondConv versions of MobileNetV2 x1.0 and ResNet-50, trained with SGD in
bf16 autocast and channels_last, eager and (--compile-models) under torch.compile; each figure is
the median over timed steps after warm-up, and the table gives each warm-up's seconds (compilation,
cuDNN's algorithm search). All models run eager first, then the compiled ones, each in a child
process that is stopped when --time-limit (450 s) is up (a DCD MobileNetV2 took 185 s to compile
on an H100, so only MobileNetV2 x1.0's static and DCD models are compiled by default). The
ResNet-50 DY-Conv and CondConv models are not paper rows: they put the operator on every block
convolution, as resnet18_dyconv does.

A model name may end in settings of its layers, `NAME@route=kernel` (DCD's route: auto,
activations, kernel) or `NAME@mixing=output` (DY-Conv's and CondConv's: auto, kernel, output), to
time a route against the default in the same table. `--cuda-graph` adds a column where the whole
training step is captured once in a CUDA graph and replayed: the GPU's own time, without the cost
of launching each kernel from Python (what torch.compile's mode="reduce-overhead" aims at, with no
compilation). Where torch.compile skipped a CUDA graph (--compile-mode reduce-overhead), a note under
the table says so, with PyTorch's reason.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import torch

from ._args import positive_int
from .bench_models import _warm_up_libraries
from .bench_ops import machine
from .models import ResNet, create_model, get_model_spec
from .ops import CondConv2d, DyConv2d
from .profiling import input_channels

MODELS = [f"mobilenetv2_x1.0_{k}" for k in ("static", "dcd", "dyconv", "condconv")] + [
    f"resnet50_{k}" for k in ("static", "dcd", "dyconv", "condconv")
]

# layer settings a model name may carry after "@" (NAME@route=kernel), with their choices
SETTINGS = {"route": ("auto", "activations", "kernel"), "mixing": ("auto", "kernel", "output")}


def parse_name(name: str) -> tuple[str, list[tuple[str, str]]]:
    """NAME@key=value@... -> (NAME, [(key, value), ...]); ValueError naming what is wrong."""
    base, *settings = name.split("@")
    if base not in MODELS:
        try:
            get_model_spec(base)
        except ValueError as error:
            raise ValueError(f"unknown model {base!r}; choose from {', '.join(MODELS)} or a registry name ({error})") from None
    parsed = []
    for setting in settings:
        key, equals, value = setting.partition("=")
        if not equals or key not in SETTINGS or value not in SETTINGS[key]:
            choices = "; ".join(f"{k}={'|'.join(v)}" for k, v in SETTINGS.items())
            raise ValueError(f"{name!r}: setting {setting!r} is not one of {choices}")
        parsed.append((key, value))
    return base, parsed


def build(name: str) -> torch.nn.Module:
    """A registry model, or ResNet-50 with DY-Conv/CondConv block convolutions, with the layer
    settings that follow "@" in `name` applied to every layer that has them."""
    base, settings = parse_name(name)
    if base == "resnet50_dyconv":
        model = ResNet(depth=50, conv=partial(DyConv2d, num_kernels=4))
    elif base == "resnet50_condconv":
        model = ResNet(depth=50, conv=partial(CondConv2d, num_experts=8))
    else:
        model = create_model(base)
    for key, value in settings:
        layers = [layer for layer in model.modules() if isinstance(getattr(layer, key, None), str)]
        if not layers:
            raise ValueError(f"{name!r}: no layer of {base} has a {key} to set")
        for layer in layers:
            setattr(layer, key, value)
    return model


def throughput(name: str, batch: int, size: int, steps: int, warmup: int, device: str, compile_mode: str | None,
               bf16: bool, backend: str = "inductor", cuda_graph: bool = False) -> tuple[float, float]:
    """(images per second, seconds of the warm-up steps) of the training step (forward, backward,
    SGD) of one model; `compile_mode` None runs eager, else torch.compile's mode ("default", ...);
    `cuda_graph` captures the eager step once in a CUDA graph and times its replays."""
    torch.backends.cudnn.benchmark = True
    model = build(name).to(device).train()
    model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, input_channels(model), size, size, device=device).to(memory_format=torch.channels_last)
    with torch.no_grad():  # the model's own number of classes (a registry model may set num_classes)
        classes = model.eval()(x[:2]).shape[-1]
    model.train()
    y = torch.randint(0, classes, (batch,), device=device)
    forward = model
    if compile_mode is not None:
        torch._dynamo.reset()  # each model compiles afresh, never hitting the recompile limit of earlier ones
        forward = torch.compile(model, mode=None if compile_mode == "default" else compile_mode, backend=backend)

    def step(zero: bool = True) -> None:
        if zero:
            optimizer.zero_grad(set_to_none=True)
        # autocast's cache of cast weights cannot outlive a graph capture: off for the graph
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=bf16, cache_enabled=not cuda_graph):
            loss = torch.nn.functional.cross_entropy(forward(x), y)
        loss.backward()
        optimizer.step()

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    start = time.perf_counter()
    if cuda_graph:
        if device != "cuda" or compile_mode is not None:
            raise ValueError("cuda_graph needs device 'cuda' and an eager model")
        side = torch.cuda.Stream()  # warm-up on a side stream, as capture requires
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(max(warmup, 3)):
                step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        optimizer.zero_grad(set_to_none=True)  # the captured backward writes fresh gradients each replay
        with torch.cuda.graph(graph):
            step(zero=False)
        step = graph.replay  # the timed step is now the replay
    else:
        for _ in range(warmup):
            step()
    sync()
    warm = time.perf_counter() - start
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    return batch / statistics.median(times), warm


Result = tuple[float, float] | str  # (img/s, warm-up seconds) or why there is no figure

# a compiled model or a CUDA-graph capture is measured in a child process, which can be stopped
# when the time is up
_CHILD = "import sys; from dcd_lightning.bench_gpu import child; child(sys.argv[1])"


def child(arguments: str) -> None:
    """The child process: print RESULT [img/s, warm-up s, how often torch.compile skipped CUDA
    graphs]. mode="reduce-overhead" falls back to plain launches, silently, where it cannot capture
    a graph; PyTorch's logs say why (its "skipping cudagraphs" lines on stderr)."""
    from torch._dynamo.utils import counters

    for logs in ({"cudagraphs": True, "perf_hints": True}, {"perf_hints": True}):
        try:  # the log artifact that carries the reason differs between PyTorch versions
            torch._logging.set_logs(**logs)
            break
        except (TypeError, ValueError):
            continue
    speed, warm = throughput(*json.loads(arguments))
    print("RESULT", json.dumps([speed, warm, counters["inductor"]["cudagraph_skips"]]), flush=True)


def throughput_in_child(arguments: list, seconds: float, notes: list[str] | None = None) -> Result:
    """throughput(*arguments) in a fresh interpreter, given at most `seconds`; where torch.compile
    skipped CUDA graphs, a line saying so (with PyTorch's reasons) is added to `notes`."""
    if seconds <= 0:
        return "not run: time limit"
    try:
        done = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(arguments)], capture_output=True,
                              text=True, timeout=seconds, check=False)
    except subprocess.TimeoutExpired:
        return f"stopped at the time limit ({seconds:.0f} s)"
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        print(done.stderr[-4000:], file=sys.stderr)
        return f"failed (exit {done.returncode})"
    speed, warm, skips = json.loads(lines[-1][len("RESULT "):])
    if skips and notes is not None:
        reasons = dict.fromkeys(line[line.index("skipping cudagraphs"):].strip()
                                for line in done.stderr.splitlines() if "skipping cudagraphs" in line)
        notes.append(f"{arguments[0]}, compile ({arguments[6]}): torch.compile skipped CUDA graphs "
                     f"{skips} time(s)" + (": " + "; ".join(reasons) if reasons else ""))
    return speed, warm


def table(header: list[str], models: list[str], modes: list[str], results: dict[tuple[str, str], Result],
          notes: Sequence[str] = ()) -> str:
    """The markdown table of what has been measured so far (a cell not measured is left empty),
    then the notes, one per line."""
    lines = [*header, "| model | " + " | ".join(f"{m} img/s | {m} / static | {m} warm-up s" for m in modes) + " |",
             "|---|" + "---:|---:|---:|" * len(modes)]
    for name in models:
        family = name.rsplit("_", 1)[0]
        cells = []
        for mode in modes:
            value = results.get((name, mode), "")
            static = results.get((f"{family}_static", mode))
            if isinstance(value, tuple):
                ratio = f"{value[0] / static[0]:.2f}" if isinstance(static, tuple) else ""
                cells += [f"{value[0]:.0f}", ratio, f"{value[1]:.0f}"]
            else:
                cells += [value, "", ""]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if notes:
        lines += ["", *(f"- {note}" for note in notes)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Measure and write the markdown table, rewritten after every measurement (a run stopped early
    still leaves what it measured)."""
    parser = argparse.ArgumentParser(prog="python -m dcd_lightning bench-gpu", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS),
                        help="comma-separated; a name may carry layer settings, e.g. resnet50_dcd@route=kernel")
    parser.add_argument("--compile-models", default="mobilenetv2_x1.0_static,mobilenetv2_x1.0_dcd",
                        help="models also measured under torch.compile ('' for none, 'all' for every model)")
    parser.add_argument("--compile-mode", default="default",
                        help="torch.compile's mode: default, reduce-overhead (CUDA graphs), max-autotune, ...")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile's backend")
    parser.add_argument("--batch-size", type=positive_int, default=128)
    parser.add_argument("--size", type=positive_int, default=224)
    parser.add_argument("--steps", type=positive_int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--no-compile", action="store_true", help="eager only (as --compile-models '')")
    parser.add_argument("--cuda-graph", action="store_true",
                        help="also time each model's whole eager step captured in one CUDA graph (CUDA only)")
    parser.add_argument("--no-bf16", action="store_true", help="float32 instead of bf16 autocast")
    parser.add_argument("--device", help="cuda (the default where a CUDA device is present) or cpu")
    parser.add_argument("--out", help="also write the table to this markdown file (after every measurement)")
    parser.add_argument("--time-limit", type=float, default=450.0,
                        help="seconds for the whole run: later measurements are skipped, and a compiled model "
                             "(measured in a child process) is stopped, when they are up")
    args = parser.parse_args(argv)
    if args.batch_size < 2 or args.warmup < 0:
        parser.error(f"--batch-size {args.batch_size} / --warmup {args.warmup}: expected a batch of at least 2 (DCD's "
                     "latent batch norms need two samples in training) and 0 or more warm-up steps")
    if args.out and not Path(args.out).resolve().parent.is_dir():
        parser.error(f"--out {args.out}: its folder does not exist")
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
        if args.device == "cpu":
            print("bench-gpu: no CUDA device here, so this measures on the CPU: minutes per model at the default "
                  "sizes (--device cpu silences this note; --batch-size 4 --size 64 --steps 2 for a quick look)",
                  file=sys.stderr, flush=True)
    started = time.perf_counter()
    models = args.models.split(",")
    compiled = [] if args.no_compile or not args.compile_models else (
        models if args.compile_models == "all" else args.compile_models.split(","))
    for name in sorted({*models, *compiled}):
        try:
            if parse_name(name)[1]:  # settings: check that some layer takes them (built without memory)
                with torch.device("meta"):
                    build(name)
        except ValueError as error:
            parser.error(str(error))
    if args.cuda_graph and args.device != "cuda":
        parser.error(f"--cuda-graph needs --device cuda (a CUDA device), got --device {args.device}")
    models += [name for name in compiled if name not in models]
    compile_name = "compile" if args.compile_mode == "default" else f"compile ({args.compile_mode})"
    if args.compile_backend != "inductor":
        compile_name += f" [{args.compile_backend}]"
    graphed = models if args.cuda_graph else []
    modes = ["eager"] + (["cuda graph"] if graphed else []) + ([compile_name] if compiled else [])
    header = [f"machine: {machine()}; device {args.device}"
              + (f" ({torch.cuda.get_device_name()})" if args.device == "cuda" else ""),
              (f"batch {args.batch_size}, {args.size}x{args.size}, {'bf16 autocast' if not args.no_bf16 else 'fp32'}, "
               f"channels_last, SGD, median of {args.steps} steps after {args.warmup}"), ""]
    results: dict[tuple[str, str], Result] = {}
    notes: list[str] = []
    text = table(header, models, modes, results)
    print("\n".join(header), flush=True)
    # the process's one-time set-up (CUDA context, cuBLAS and cuDNN handles) before the first eager
    # model, whose warm-up seconds would otherwise hold it (25-31 s against 6-8 s for the others)
    _warm_up_libraries(args.device, bf16=not args.no_bf16, channels_last=True)
    for mode, names in (("eager", models), ("cuda graph", graphed), (compile_name, compiled)):
        for name in names:
            # compiled models and graph captures run in child processes (stopped at the time limit)
            arguments = [name, args.batch_size, args.size, args.steps, args.warmup, args.device,
                         args.compile_mode if mode == compile_name else None, not args.no_bf16,
                         args.compile_backend, mode == "cuda graph"]
            left = args.time_limit - (time.perf_counter() - started)
            if mode != "eager":
                results[(name, mode)] = throughput_in_child(arguments, left, notes)
            elif left <= 0:
                results[(name, mode)] = "not run: time limit"
            else:
                try:
                    results[(name, mode)] = throughput(*arguments)
                except Exception as error:  # noqa: BLE001 - a failing model is reported, the rest still run
                    traceback.print_exc()
                    results[(name, mode)] = f"failed: {type(error).__name__}"
            value = results[(name, mode)]
            print(f"{name} {mode}: " + (f"{value[0]:.0f} img/s, warm-up {value[1]:.0f} s"
                                        if isinstance(value, tuple) else value), flush=True)
            text = table(header, models, modes, results, notes)
            if args.out:
                with open(args.out, "w") as handle:
                    handle.write(text)
            if args.device == "cuda":
                torch.cuda.empty_cache()
    print("\n" + text)
    return 0
