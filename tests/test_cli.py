"""The command line: help, config printing and errors, and the benchmarks (the quickstart's full run is
in test_training.py)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from dcd_lightning import bench_ops
from dcd_lightning.bench_gpu import throughput_in_child
from dcd_lightning.bench_models import extra_floats, median_interval, with_reads
from dcd_lightning.cli import main
from dcd_lightning.inference import optimize_for_inference
from dcd_lightning.models import create_model
from dcd_lightning.ops import DCDReleaseConv2d, DCDReleaseLinear
from dcd_lightning.ops._native import compiler

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dcd_lightning", *args], cwd=cwd, capture_output=True, text=True, timeout=600, check=False
    )


def test_help_lists_commands(tmp_path: Path) -> None:
    result = run_cli("--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for command in ("fit", "validate", "test", "predict", "bench-ops"):
        assert f"  {command}" in result.stdout


def test_no_command_is_an_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "usage: python -m dcd_lightning COMMAND" in capsys.readouterr().out


def test_print_config_resolves_operator_factories(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stop:
        main(["fit", "--config", str(ROOT / "configs" / "quickstart.yaml"),
              "--model.init_args.backbone.init_args.conv.init_args.latent_mult=0.5", "--print_config"])
    assert stop.value.code in (0, None)
    out = capsys.readouterr().out
    assert "class_path: dcd_lightning.ops.DCDConv2d" in out
    assert "latent_mult: 0.5" in out


def test_gpu_presets_stack_on_a_paper_config(capsys: pytest.CaptureFixture[str]) -> None:
    """The multi-GPU presets merge into a paper config: DDP with synchronised batch norm, channels_last."""
    for preset in ("ddp.yaml", "multi-node.yaml"):
        with pytest.raises(SystemExit) as stop:
            main(["fit", "--config", str(ROOT / "configs" / "paper" / "table4_resnet18_dcd.yaml"),
                  "--config", str(ROOT / "configs" / "presets" / preset), "--print_config"])
        assert stop.value.code in (0, None)
        config = yaml.safe_load(capsys.readouterr().out)
        assert config["model"]["class_path"] == "dcd_lightning.classifier.ImageClassifier"
        assert config["model"]["init_args"]["channels_last"] is True
        assert config["model"]["init_args"]["backbone"]["init_args"]["depth"] == 18
        assert config["trainer"]["strategy"] == "ddp" and config["trainer"]["sync_batchnorm"] is True


def test_bad_operator_option_is_reported_at_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # the operator's own check, raised while the model is built: a usage error, exit status 2
    with pytest.raises(SystemExit) as stop:
        main(["fit", "--config", str(ROOT / "configs" / "quickstart.yaml"),
              "--model.init_args.backbone.init_args.conv.init_args.latent_mult=-1", "--trainer.fast_dev_run=1",
              f"--trainer.default_root_dir={tmp_path}"])
    assert stop.value.code == 2
    assert re.search(r"error: DCDConv2d: latent_mult=-1(\.0)? is not allowed; expected a number > 0", capsys.readouterr().err)


OWN_BACKBONES = """
from torch import nn

from dcd_lightning.models import ConvFactory
from dcd_lightning.ops import DCDConv2d, StaticConv2d


class Gated(DCDConv2d):  # a layer inside the first operator has other channels than the image
    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1, stride: int = 1, groups: int = 1,
                 *, gate_bias: float = 0.0, **options):
        super().__init__(in_channels, out_channels, kernel_size, stride, groups, **options)
        self.gate = nn.Conv2d(self.out_channels, self.out_channels, 1)
        nn.init.constant_(self.gate.bias, gate_bias)

    def forward(self, x):
        y = super().forward(x)
        return y * self.gate(y).sigmoid()


class ScaleFirst(StaticConv2d):  # kernel_size fourth: a positional call gives it to scale
    def __init__(self, in_channels: int, out_channels: int, scale: float = 1.0, kernel_size: int = 1,
                 stride: int = 1, groups: int = 1):
        super().__init__(in_channels, out_channels, kernel_size, stride, groups)


class Annotated(nn.Module):
    def __init__(self, num_classes: int = 1000, in_chans: int = 3, conv: ConvFactory = StaticConv2d):
        super().__init__()
        self.conv = conv(in_chans, 8, 3, 1, 1)  # positional, as nn.Conv2d is called
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        return self.fc(self.conv(x).mean((2, 3)))


class Unannotated(Annotated):
    def __init__(self, num_classes=1000, in_chans=3, conv=StaticConv2d):
        super().__init__(num_classes, in_chans, conv)


class ClassesLast(Annotated):
    def __init__(self, conv: ConvFactory = StaticConv2d, in_chans: int = 3, num_classes: int = 1000):
        super().__init__(num_classes, in_chans, conv)
"""


@pytest.mark.parametrize("backbone", ["Annotated", "Unannotated", "ClassesLast"])
def test_an_own_backbone_takes_operators_from_yaml(backbone: str, tmp_path: Path, user_module,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """A backbone of the user's whose operator parameter is annotated ConvFactory trains with a
    class_path operator of the user's called positionally (the data's channels checked against the
    operator's, not a layer's inside it); an unannotated one, or one whose first parameter is not
    num_classes, is an error that says what to write."""
    user_module("own_backbones", OWN_BACKBONES)
    config = tmp_path / "own.yaml"
    config.write_text(yaml.safe_dump({"model": {"init_args": {"backbone": {
        "class_path": f"own_backbones.{backbone}",
        "init_args": {"conv": {"class_path": "own_backbones.Gated", "init_args": {"reduction": 4, "gate_bias": 2.5}}},
    }}}}))
    args = ["fit", "--config", str(ROOT / "configs" / "quickstart.yaml"), "--config", str(config),
            "--trainer.fast_dev_run=1", "--trainer.logger=false", f"--trainer.default_root_dir={tmp_path}"]
    if backbone == "Annotated":
        with pytest.raises(SystemExit):
            main([*args, "--print_config"])
        assert "gate_bias: 2.5" in capsys.readouterr().out  # the operator's own option reaches it
        assert main(args) == 0
        return
    with pytest.raises(SystemExit) as stop:
        main(args)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    if backbone == "Unannotated":  # found when the backbone is built
        assert "'Namespace' object is not callable. A backbone parameter that takes an operator as a class_path " \
               "must be annotated dcd_lightning.models.ConvFactory" in err
    else:  # found by the parser
        assert "If the backbone is your own: its first parameter must be num_classes, and each parameter that takes " \
               "an operator must be annotated dcd_lightning.models.ConvFactory" in err


def test_an_operator_that_a_positional_call_would_misread_is_warned_of(
    tmp_path: Path, user_module, recwarn: pytest.WarningsRecorder
) -> None:
    """ConvFactory's five ints given positionally to an operator whose kernel_size is its fourth
    parameter shift without an error (kernel_size 3 became `scale`): a user's backbone is warned
    of it; ours call by keyword and are not."""
    user_module("own_backbones", OWN_BACKBONES)
    args = ["fit", "--config", str(ROOT / "configs" / "quickstart.yaml"), "--trainer.fast_dev_run=1",
            "--trainer.logger=false", f"--trainer.default_root_dir={tmp_path}",
            "--model.init_args.backbone.init_args.conv.class_path=own_backbones.ScaleFirst"]
    assert main(args) == 0  # dcd_lightning.models.ResNet
    assert not [w for w in recwarn if "positionally" in str(w.message)]
    with pytest.warns(UserWarning, match=r"backbone own_backbones.Annotated, parameter conv: ScaleFirst takes "
                                         r"kernel_size as parameter 4, where ConvFactory .* gives it as argument 3: a "
                                         r"backbone that calls it positionally passes kernel_size to its parameter "
                                         r"'scale'"):
        assert main([*args, "--model.init_args.backbone.class_path=own_backbones.Annotated"]) == 0


def test_the_own_backbone_hint_is_not_given_for_ours(capsys: pytest.CaptureFixture[str]) -> None:
    """A mistyped option of one of our backbones is reported as jsonargparse reports it, without
    the advice on how a user's backbone must look."""
    with pytest.raises(SystemExit) as stop:
        main(["fit", "--config", str(ROOT / "configs" / "quickstart.yaml"),
              "--model.init_args.backbone.init_args.dpeth=10"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "Option 'dpeth' is not accepted" in err
    assert "If the backbone is your own" not in err


def _tiny_folder(root: Path, train_images: int) -> Path:
    from PIL import Image

    for split, count in (("train", train_images), ("val", 1)):
        (root / split / "a").mkdir(parents=True)
        for index in range(count):
            Image.new("RGB", (8, 8)).save(root / split / "a" / f"{index}.jpg")
    return root


@pytest.mark.parametrize(("args", "message"), [
    (["profile", "--model", "resnet18_dcd", "--input-size", "0"], "argument --input-size: 0 is too small"),
    (["profile", "--model", "resnet18_dcdd"], "--model: create_model: no model named 'resnet18_dcdd'"),
    (["export-onnx", "--model", "resnet10_static", "--image-size", "-5", "--out", "x.onnx"],
     "argument --image-size: -5 is too small; expected 1 or more"),
    (["export-onnx", "--model", "nope", "--out", "x.onnx"], "--model: create_model: no model named 'nope'"),
    (["export-onnx", "--model", "resnet10_static", "--checkpoint", "missing.ckpt", "--out", "x.onnx"],
     "--checkpoint missing.ckpt: no such file"),
    (["bench-data", "--folder", "missing"], "--folder missing: expected an ImageFolder tree with train/ and val/"),
    (["bench-data", "--folder", "small", "--batch-size", "2"], "--folder's 3 training images give fewer than 2 batches"),
    (["bench-data", "--images", "0"], "argument --images: 0 is too small"),
    (["bench-data", "--workers", "2,-1"], "--workers '2,-1': expected a comma-separated list of worker counts"),
    (["bench-ops", "--threads", "-1"], "0 or more threads"),
    (["bench-ops", "--quick", "--batch-size", "1"], "--batch-size 1, --rounds 7, --threads 0: expected a batch of at least 2"),
    (["bench-gpu", "--batch-size", "0"], "argument --batch-size: 0 is too small"),
    (["bench-gpu", "--device", "cpu", "--out", "missing/x.md"], "--out missing/x.md: its folder does not exist"),
])
def test_tools_report_bad_input_as_usage_errors(args: list[str], message: str, tmp_path: Path, monkeypatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    _tiny_folder(tmp_path / "small", train_images=3)
    with pytest.raises(SystemExit) as stop:
        main(args)
    assert stop.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x.onnx").exists()


def test_export_names_a_checkpoint_of_another_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = create_model("resnet10_static", num_classes=10)
    state = {f"model.{key}": value for key, value in model.state_dict().items()}
    torch.save({"state_dict": state}, tmp_path / "ten.ckpt")
    with pytest.raises(SystemExit) as stop:
        main(["export-onnx", "--model", "resnet10_static", "--checkpoint", str(tmp_path / "ten.ckpt"),
              "--out", str(tmp_path / "x.onnx")])
    assert stop.value.code == 2
    assert "does not fit this model (with --model, the checkpoint must be of that registry model, with " \
           "--num-classes its classes" in capsys.readouterr().err


def test_bench_ops_prints_ratios_to_static(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench-ops", "--quick", "--rounds", "1", "--batch-size", "2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("machine: ")
    for shape in bench_ops.QUICK_SHAPES:
        assert f"### {shape.family}: {shape.label}" in out
    rows = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| operator")]
    static_rows = [r for r in rows if r.startswith("| static |")]
    assert len(static_rows) == len(bench_ops.QUICK_SHAPES)
    assert all(r.split("|")[4].strip() == "1.00" for r in static_rows)
    names = {r.split("|")[1].strip() for r in rows}
    assert {"dcd (kernel)", "dcd (activations)", "condconv (kernel)", "condconv (output)", "dyconv (output)"} <= names
    assert {"dcd", "dcd-release", "dcd joint"} <= names


def test_bench_models_prints_ratios_to_static(capsys: pytest.CaptureFixture[str], recwarn) -> None:
    assert main(["bench", "--models", "resnet10", "--train-group", "mobilenetv2_x0.35", "--rounds", "1",
                 "--batch-size", "2"]) == 0
    out = capsys.readouterr().out
    for title in ("(a) batch-1 single-thread CPU latency", "(b) training step, mobilenetv2_x0.35",
                  "(c) peak training memory, mobilenetv2_x0.35"):
        assert title in out
    lines = out.splitlines()
    for group, parts in (("resnet10", 1), ("mobilenetv2_x0.35", 2)):  # latency; training step and memory
        static_rows = [line for line in lines if line.startswith(f"| {group}_static |")]
        assert len(static_rows) == parts and all(line.strip("| ").split(" | ")[2] == "1.000" for line in static_rows)
        assert out.count(f"| {group}_dcd |") == parts and out.count(f"| {group}_dyconv |") == parts
    # the timed parts give each ratio's interval, which holds the ratio, headed by its exact coverage
    # (3 latency rounds: 75%; 1 training round: none); memory has no rounds
    assert "| model | ms | / static | 75% interval |" in out and "| model | ms | / static | 0% interval |" in out
    assert "| model | MiB | / static |\n" in out
    rows = [line.strip("| ").split(" | ") for line in lines if line.startswith(("| resnet10_", "| mobilenetv2_x0.35_"))]
    timed = [row for row in rows if len(row) == 4]
    assert len(timed) == len(rows) - 3 == (7 if compiler() is not None else 6)
    assert "DCD's reads" not in out  # only with --reads-floor
    for _, _, ratio, interval in timed:
        low, high = (float(v) for v in interval.split("-"))
        assert low <= float(ratio) <= high
    memory = [line.split(" | ") for line in lines[lines.index("### (c) peak training memory, mobilenetv2_x0.35, batch 2"):]
              if line.startswith("| mobilenetv2_x0.35_")]
    assert [row[0] for row in memory] == [f"| mobilenetv2_x0.35_{kind}" for kind in ("static", "dcd", "dyconv")]
    assert all(float(row[1]) > 0 for row in memory)  # each child's own peak, in the order of the models
    assert "batch-1 C kernel of folded DCD layers" in out
    # the models are timed on finite activations (a fresh resnet10_dcd overflows without calibration)
    assert not [w for w in recwarn if "inf or NaN" in str(w.message)]
    if compiler() is not None:
        # how it was built (the vector width and register block decide its speed), and the same DCD
        # model without the kernel beside it
        assert re.search(r"built with \S+, (16|32|64)-byte vectors, (4 x 4|6 x 2) register blocks", out), out
        assert out.count("| resnet10_dcd (PyTorch calls) |") == 1


def test_bench_interval_coverage_and_bad_options(capsys: pytest.CaptureFixture[str]) -> None:
    from dcd_lightning.bench_models import interval_coverage

    assert [interval_coverage(n) for n in (1, 2, 5)] == [0.0, 0.5, 0.9375]
    assert all(interval_coverage(n) >= 0.95 for n in range(6, 200))
    for argv, message in (
        (["--rounds", "0"], "expected at least 1"),
        (["--latency-rounds", "0"], "expected at least 1"),
        (["--part", "train", "--batch-size", "1"], "--batch-size 1: expected at least 2"),
        (["--device", "tpu9"], "--device 'tpu9'"),
        (["--models", "resnet18,resnet99"], "unknown group(s) ['resnet99']; expected a comma-separated list of"),
        (["--part", "latency,speed"], "expected a comma-separated list of latency, train, memory"),
    ):
        with pytest.raises(SystemExit):
            main(["bench", *argv])
        assert message in capsys.readouterr().err, argv
    assert main(["bench", "--part", " latency", "--models", "resnet10 ", "--latency-rounds", "1"]) == 0  # spaces


def test_bench_reads_floor_times_the_static_model_reading_dcds_weights(capsys) -> None:
    assert main(["bench", "--part", "latency", "--models", "resnet10", "--latency-rounds", "2", "--reads-floor"]) == 0
    rows = [line.strip("| ").split(" | ") for line in capsys.readouterr().out.splitlines() if line.startswith("| resnet10")]
    assert rows[-1][0] == "resnet10_static + DCD's reads" and float(rows[-1][2]) > 0
    assert [row[0] for row in rows[:3]] == ["resnet10_static", "resnet10_dcd", "resnet10_dyconv"]


def test_static_model_with_dcds_reads_reads_exactly_the_extra_weights() -> None:
    static, dcd = create_model("resnet10_static", num_classes=10), create_model("resnet10_dcd", num_classes=10)
    extra = extra_floats(static, dcd)
    dynamic = [name for name, m in dcd.named_modules() if isinstance(m, (DCDReleaseConv2d, DCDReleaseLinear))]
    assert sorted(extra) == sorted(dynamic)  # the outermost dynamic layers only, not their branches
    floats = [t for t in (*dcd.parameters(), *dcd.buffers()) if t.dtype.is_floating_point]
    static_floats = [t for t in (*static.parameters(), *static.buffers()) if t.dtype.is_floating_point]
    assert sum(extra.values()) == sum(t.numel() for t in floats) - sum(t.numel() for t in static_floats)
    folded = optimize_for_inference(static)
    reading = with_reads(optimize_for_inference(static), extra)
    readers = {name: m for name, m in reading.named_modules() if type(m).__name__ == "_ReadsFirst"}
    assert sorted(readers) == sorted(extra) and all(readers[n].extra.numel() == extra[n] for n in extra)
    assert all(bool(reader.extra.abs().sum() > 0) for reader in readers.values())  # written memory, not zero pages
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(reading(images), folded(images))  # reads only: the static model's outputs


def test_bench_gpu_model_settings_reach_every_layer_and_bad_ones_are_refused(capsys) -> None:
    from dcd_lightning.bench_gpu import build

    mixing = {layer.mixing for layer in build("mobilenetv2_x0.5_condconv@mixing=output").modules()
              if hasattr(layer, "mixing")}
    routes = [layer.route for layer in build("resnet10_dcd@route=kernel@route=activations").modules()
              if isinstance(getattr(layer, "route", None), str)]
    assert mixing == {"output"} and routes and set(routes) == {"activations"}  # settings apply in order
    for models, expected in (("resnet10_dcd@route=fast", "route=auto|activations|kernel"),
                             ("resnet10_dcd@width=2", "is not one of"),
                             ("resnet10_static@route=kernel", "no layer of resnet10_static has a route"),
                             ("resnet11_dcd@route=kernel", "unknown model 'resnet11_dcd'")):
        with pytest.raises(SystemExit):
            main(["bench-gpu", "--models", models, "--no-compile"])
        assert expected in capsys.readouterr().err
    with pytest.raises(SystemExit):  # CUDA graphs need a CUDA device
        main(["bench-gpu", "--models", "resnet10_dcd", "--no-compile", "--cuda-graph", "--device", "cpu"])
    assert "--cuda-graph needs --device cuda" in capsys.readouterr().err


def test_bench_gpu_trains_a_registered_model_on_its_own_classes(registry_restored) -> None:
    """Targets are drawn from the model's classes (a registered model may have 10), and its images
    have its channels."""
    from dcd_lightning.bench_gpu import throughput
    from dcd_lightning.models import ModelSpec, register_model

    register_model(ModelSpec("resnet10_ten_grey", "resnet", (("depth", 10), ("num_classes", 10), ("in_chans", 1)), ()))
    images_per_second, _ = throughput("resnet10_ten_grey", 2, 32, 1, 1, "cpu", None, False)
    assert images_per_second > 0


def test_bench_gpu_writes_a_table_on_any_device(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "gpu.md"
    assert main(["bench-gpu", "--models", "mobilenetv2_x0.35_static,mobilenetv2_x0.35_dcd,mobilenetv2_x0.35_dcd@route=kernel",
                 "--batch-size", "2", "--size", "32", "--steps", "1", "--warmup", "1", "--no-compile",
                 "--out", str(out)]) == 0
    table = out.read_text()
    printed = capsys.readouterr()
    assert printed.out.startswith("machine: ")  # the header comes first, before any model is timed
    if not torch.cuda.is_available():  # the default device is then the CPU, and the run says so
        assert "bench-gpu: no CUDA device here, so this measures on the CPU" in printed.err
    assert "| mobilenetv2_x0.35_static | " in table and "| 1.00 |" in table
    assert "failed" not in table and table.count("\n| ") == 4  # header and three models
    variant = next(row for row in table.splitlines() if row.startswith("| mobilenetv2_x0.35_dcd@route=kernel |"))
    assert variant.split(" | ")[2] not in ("", "1.00")  # timed, with a ratio to the static model
    # compiled too (with the eager backend here: inductor's CPU build takes minutes), in a child
    # process; a compiled model not in --models joins the table
    assert main(["bench-gpu", "--models", "resnet10_dcd", "--compile-models", "mobilenetv2_x0.35_static",
                 "--compile-backend", "eager", "--batch-size", "2", "--size", "32", "--steps", "1", "--warmup", "1",
                 "--out", str(out)]) == 0
    rows = out.read_text().splitlines()
    assert "compile [eager] img/s" in rows[3] and "eager warm-up s" in rows[3]
    static = next(row for row in rows if row.startswith("| mobilenetv2_x0.35_static |")).split(" | ")
    assert static[2] == "1.00" and static[5] == "1.00"  # eager and compiled ratios to the static model
    dcd = next(row for row in rows if row.startswith("| resnet10_dcd |")).split(" | ")
    assert dcd[1] != "" and dcd[4] == "" and "failed" not in out.read_text()  # resnet10_dcd: eager only
    # with the time up, nothing more is measured and the table says so
    assert main(["bench-gpu", "--models", "mobilenetv2_x0.35_static", "--time-limit", "0", "--out", str(out)]) == 0
    assert "| mobilenetv2_x0.35_static | not run: time limit |" in out.read_text()
    # a compilation still running when the time is up is stopped (its child process killed)
    arguments = ["mobilenetv2_x0.35_static", 2, 32, 1, 1, "cpu", "default", False, "eager"]
    assert throughput_in_child(arguments, 0.5) == "stopped at the time limit (0 s)"


def test_bench_gpu_notes_where_torch_compile_skipped_cuda_graphs(monkeypatch) -> None:
    # the child reports PyTorch's skip counter; its "skipping cudagraphs" log lines give the reasons
    import subprocess

    from dcd_lightning import bench_gpu

    stderr = ("W1127 10:00:00 cudagraph_utils.py:401] skipping cudagraphs due to mutated inputs (2 instances)\n"
              "W1127 10:00:01 cudagraph_utils.py:401] skipping cudagraphs due to mutated inputs (2 instances)\n")
    note = ("resnet10_dcd, compile (reduce-overhead): torch.compile skipped CUDA graphs 2 time(s): "
            "skipping cudagraphs due to mutated inputs (2 instances)")
    for skips, expected in ((2, [note]), (0, [])):
        done = subprocess.CompletedProcess([], 0, f"RESULT [120.0, 3.5, {skips}]\n", stderr)
        monkeypatch.setattr(bench_gpu.subprocess, "run", lambda *args, done=done, **kwargs: done)
        notes: list[str] = []
        arguments = ["resnet10_dcd", 2, 32, 1, 1, "cuda", "reduce-overhead", True, "inductor", False]
        assert bench_gpu.throughput_in_child(arguments, 60, notes) == (120.0, 3.5)
        assert notes == expected
    table = bench_gpu.table(["header", ""], ["resnet10_dcd"], ["eager"], {("resnet10_dcd", "eager"): (1.0, 2.0)},
                            ["a note"])
    assert table.endswith("| resnet10_dcd | 1 |  | 2 |\n\n- a note\n")


def test_machine_line_names_the_cpu_its_vectors_and_l2() -> None:
    from dcd_lightning.bench_ops import describe_cpu, machine

    intel = ("processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Platinum 8481C\n"
             "flags\t\t: fpu sse2 avx avx2 avx512f avx512bw\n\nprocessor\t: 1\nmodel name\t: other\n")
    amd = "model name\t: AMD EPYC\nflags\t\t: fpu sse2 avx avx2 fma\n"
    arm = "processor\t: 0\nFeatures\t: fp asimd evtstrm\nCPU part\t: 0xd0c\n"
    assert describe_cpu(intel, "2048K") == "Intel(R) Xeon(R) Platinum 8481C, AVX-512, L2 2048K per core"
    assert describe_cpu(amd, "512K") == "AMD EPYC, AVX2, L2 512K per core"
    assert describe_cpu(arm) == "NEON" and describe_cpu("") == ""
    line = machine()
    assert "logical CPUs" in line and "torch " in line


def test_median_interval_is_the_binomial_order_statistics() -> None:
    # ranks n/2 -/+ 1.96 sqrt(n)/2: for 60 rounds the 22nd and 39th values, in any input order
    assert median_interval([float(v) for v in reversed(range(1, 61))]) == (22.0, 39.0)
    assert median_interval([3.0, 1.0, 2.0, 5.0, 4.0]) == (1.0, 5.0)  # few rounds: their whole range
    assert median_interval([1.5]) == (1.5, 1.5)
    with pytest.raises(ValueError, match="no values"):
        median_interval([])
