"""Deployment paths: ONNX export with a dynamic batch, torch.compile without graph breaks,
channels_last and bf16 autocast, for the registry's models and the dynamic operators."""

from __future__ import annotations

import io
import json
import multiprocessing
import warnings
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest
import torch
from torch import nn

from dcd_lightning import create_model, list_models, optimize_for_inference
from dcd_lightning.export import BATCH_TRACED, check_onnx, export_onnx
from dcd_lightning.export import main as export_main
from dcd_lightning.inference import calibrate_batch_norms
from dcd_lightning.ops import (
    CondConv2d,
    DCDConv2d,
    DCDDepthwiseConv2d,
    DCDReleaseConv2d,
    DCDReleaseLinear,
    DyConv2d,
)

SIZE = 32


def calibrated(name: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A registry model whose batch norms hold the statistics of a random batch (a fresh model's
    running statistics, mean 0 and variance 1, make deep dynamic models overflow in eval mode)."""
    torch.manual_seed(0)
    model = create_model(name, num_classes=10).to(dtype)
    return calibrate_batch_norms(model, torch.randn(64, 3, SIZE, SIZE, dtype=dtype)).eval()


def test_calibrate_batch_norms_sets_one_batchs_statistics_and_nothing_else() -> None:
    """A fresh DCD ResNet overflows in eval mode; after calibrate_batch_norms each norm holds the
    statistics of the batch's activations at its input and the outputs are finite; momentum,
    weights and training modes are as they were."""
    torch.manual_seed(0)
    model = create_model("resnet10_dcd", num_classes=10).eval()
    images = torch.randn(16, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert not torch.isfinite(model(images)).all()  # why the benchmark and these tests calibrate
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    norms[1].momentum = 0.3
    model.layer1.train()  # a mixed state, to be kept
    modes = {name: m.training for name, m in model.named_modules()}
    weights = {name: t.clone() for name, t in model.state_dict().items() if "running" not in name and "tracked" not in name}
    seen = {}
    hooks = [norm.register_forward_pre_hook(lambda m, args: seen.setdefault(m, args[0].detach())) for norm in norms]
    assert calibrate_batch_norms(model, images) is model
    for hook in hooks:
        hook.remove()
    for norm in norms:
        x = seen[norm]
        assert torch.allclose(norm.running_mean, x.mean((0, 2, 3)), atol=1e-5)
        assert torch.allclose(norm.running_var, x.var((0, 2, 3)), rtol=1e-4)  # unbiased, as PyTorch keeps it
    assert [norm.momentum for norm in norms[:3]] == [0.1, 0.3, 0.1]
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert all(torch.equal(model.state_dict()[name], t) for name, t in weights.items())
    with torch.no_grad():
        assert torch.isfinite(model.eval()(images)).all()


def per_sample_error(actual: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    """Max |difference| of each sample's logits relative to that sample's largest logit."""
    return (actual - expected).abs().amax(dim=1) / expected.abs().amax(dim=1)


def onnx_error(name: str) -> float:
    """Median over 5 samples of onnxruntime's per-sample error against PyTorch, for a model exported at batch 2.

    The median is checked: a random dynamic model has the odd sample near a gate's kink, where
    float32 rounding differences between the two runtimes are amplified; a batch size baked into
    the graph fails every sample (or fails to run).
    """
    import onnxruntime

    torch.set_num_threads(1)
    model = calibrated(name)
    session = onnxruntime.InferenceSession(export_onnx(model, SIZE), providers=["CPUExecutionProvider"])
    images = torch.randn(5, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    assert images.shape[0] != BATCH_TRACED
    (logits,) = session.run(["logits"], {"images": images.numpy()})
    with torch.no_grad():
        expected = model(images)
    if logits.shape != (5, 10):
        return float("inf")
    return float(per_sample_error(torch.from_numpy(logits), expected).median())


_BACKGROUND: dict[str, object] = {}


def start_background_onnx_exports() -> None:
    """Submit onnx_error for every registry model to one child process (conftest calls this when
    the session is collected; the ONNX test, run last, collects the results)."""
    pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
    _BACKGROUND["pool"] = pool
    _BACKGROUND["futures"] = {name: pool.submit(onnx_error, name) for name in list_models()}


def stop_background_onnx_exports() -> None:
    pool = _BACKGROUND.pop("pool", None)
    _BACKGROUND.pop("futures", None)
    if pool is not None:
        pool.shutdown(wait=False, cancel_futures=True)


def test_onnx_export_of_every_registry_model_runs_at_another_batch_size() -> None:
    """Every registry model exports with a dynamic batch axis and runs at batch 5 in onnxruntime.
    The exports run in child processes (single-threaded work), started in the background when the
    session was collected (conftest, in a single-process run), or here with two workers otherwise
    (under xdist, where this test runs first on its worker)."""
    futures = _BACKGROUND.get("futures")
    if futures is None:
        names = list_models()
        with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
            errors = dict(zip(names, pool.map(onnx_error, names)))
    else:
        try:
            errors = {name: future.result() for name, future in futures.items()}
        finally:
            stop_background_onnx_exports()
    assert sorted(errors) == sorted(list_models())
    failed = {name: error for name, error in errors.items() if not error < 1e-4}
    assert not failed, f"onnxruntime differs from PyTorch (median per-sample relative error): {failed}"


def test_export_onnx_command(tmp_path, capsys) -> None:
    out = tmp_path / "model.onnx"
    assert export_main(["--model", "mobilenetv2_x0.35_dcd", "--num-classes", "7", "--image-size", "48",
                        "--out", str(out), "--check"]) == 0
    printed = capsys.readouterr().out
    assert out.stat().st_size > 1e6 and "N dynamic" in printed
    assert "onnxruntime vs PyTorch at batch 3" in printed and "PyTorch float32 vs float64" in printed
    assert printed.rstrip().endswith(": ok")


def test_exported_graph_is_the_folded_model_with_constant_sizes() -> None:
    """export_onnx exports optimize_for_inference's copy: no batch norm is left in a DCD MobileNetV2's
    graph, and no size is read off a tensor at run time (no Shape node: only the batch is dynamic,
    by -1 in constant shapes); the model given is left as it was, unfolded."""
    import onnx

    model = calibrated("mobilenetv2_x0.35_dcd")
    graph = onnx.load_from_string(export_onnx(model, SIZE)).graph
    ops = Counter(node.op_type for node in graph.node)
    assert ops["Shape"] == 0 and ops["BatchNormalization"] == 0 and ops["MatMul"] > 0, ops
    assert all(getattr(module, "_folded", None) is None for module in model.modules())
    assert sum(isinstance(module, nn.BatchNorm2d) for module in model.modules()) == 52


def test_own_onnx_export_keeps_sizes_read_off_tensors() -> None:
    """Constant sizes are export_onnx's alone: a user's torch.onnx.export of a dynamic operator with
    dynamic image sizes still runs at another size (DY-Conv, depthwise DCD)."""
    import onnxruntime

    for op in (DyConv2d(8, 16, 3), DCDDepthwiseConv2d(8, 8, 3, 1, 8)):
        op.eval()
        buffer = io.BytesIO()
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(op, (torch.randn(2, 8, 12, 12),), buffer, dynamo=False, input_names=["x"],
                              output_names=["y"], dynamic_axes={"x": {0: "n", 2: "h", 3: "w"}, "y": {0: "n", 2: "h", 3: "w"}})
        session = onnxruntime.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
        x = torch.randn(3, 8, 9, 7)
        (y,) = session.run(["y"], {"x": x.numpy()})
        with torch.no_grad():
            torch.testing.assert_close(torch.from_numpy(y), op(x), rtol=1e-4, atol=1e-5)


def test_a_trace_at_batch_1_runs_at_other_batch_sizes() -> None:
    """A user's jit.trace of a 1x1 DCD layer at batch 1 records the batched route, not batch 1's
    plain convolution (whose kernel's view bakes the batch in)."""
    for op in (DCDConv2d(8, 16, 1), DCDReleaseConv2d(8, 16, 1)):
        op.eval()
        torch.nn.init.normal_(op.expand, 0.0, 0.3)
        with torch.no_grad():
            traced = torch.jit.trace(op, (torch.randn(1, 8, 4, 4),), check_trace=False)
            x = torch.randn(3, 8, 4, 4)
            torch.testing.assert_close(traced(x), op(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("make", [
    lambda: DyConv2d(16, 16, 3, groups=2), lambda: CondConv2d(16, 16, 3, groups=2),
    lambda: DCDDepthwiseConv2d(16, 16, 3, groups=16), lambda: DCDConv2d(8, 16, 3, pool_size=2),
], ids=["dyconv", "condconv", "dcd_depthwise", "dcd_pooled_branch"])
def test_a_users_trace_runs_at_other_batch_sizes_and_passes_its_check(make) -> None:
    """torch.jit.trace at batch 2, with its default check, then run at batch 5: the mixtures' and the
    depthwise layer's per-sample groups baked the batch in, and a first trace of a layer with a
    pooled branch recorded the pooling matrix's construction, which the check's second run (the
    cached matrix) did not, and failed."""
    from dcd_lightning.ops import _common

    _common._POOLING.clear()
    op = make().eval()
    with torch.no_grad():
        traced = torch.jit.trace(op, (torch.randn(2, op.in_channels, 9, 9),))
        x = torch.randn(5, op.in_channels, 9, 9)
        torch.testing.assert_close(traced(x), op(x), rtol=1e-5, atol=1e-5)


class _HalfGate(DCDConv2d):
    """A user's variant: Lambda's gate halved and shifted."""

    def coefficients(self, x: torch.Tensor) -> tuple:
        lam, phi = super().coefficients(x)
        return (None if lam is None else lam * 0.5 + 0.5), phi


class _Gated(DCDConv2d):
    """A user's variant: the output gated after the layer."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * torch.sigmoid(x.mean(1, keepdim=True))[..., ::self.stride, ::self.stride]


@pytest.mark.parametrize("variant", [_HalfGate, _Gated])
def test_a_dcd_subclass_that_computes_otherwise_is_not_folded(variant: type) -> None:
    """The fold (and a batch norm moved into the layer) would compute as DCDConv2d does: a subclass
    that redefines how the layer computes keeps its own forward, with a warning naming why; the
    package's own subclasses fold."""
    model = nn.Sequential(variant(8, 16, 3), nn.BatchNorm2d(16), nn.ReLU()).double().eval()
    torch.nn.init.normal_(model[0].expand, 0.0, 0.3)
    model[1].running_mean.normal_()
    model[1].running_var.uniform_(0.5, 2.0)
    with pytest.warns(UserWarning, match=rf"{variant.__name__} is not folded for inference: it redefines"):
        optimized = optimize_for_inference(model)
    assert isinstance(optimized[1], nn.BatchNorm2d) and optimized[0]._folded is None
    x = torch.randn(3, 8, 9, 9, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(optimized(x), model(x), rtol=1e-12, atol=1e-12)
    assert DCDReleaseConv2d(8, 16, 3).redefined() == [] and DCDReleaseLinear(8, 4).redefined() == []


def test_a_dcd_subclass_that_only_counts_or_initialises_otherwise_still_folds() -> None:
    class Counted(DCDConv2d):
        def reset_parameters(self) -> None:
            super().reset_parameters()
            torch.nn.init.normal_(self.expand, 0.0, 0.3)

        def madds(self, height: int, width: int) -> int:
            return super().madds(height, width) + 1

    layer = Counted(8, 16, 3).double().eval()
    assert layer.redefined() == []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert layer.fold_for_inference()
    x = torch.randn(2, 8, 9, 9, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), layer.reference_forward(x), rtol=1e-10, atol=1e-10)


def test_export_and_profile_take_the_models_input_channels(capsys: pytest.CaptureFixture[str]) -> None:
    """A one-channel model (in_chans=1, e.g. the digits with data.channels=1): export, its check and
    profile fed it three channels."""
    from dcd_lightning.cli import main

    torch.manual_seed(0)
    model = calibrate_batch_norms(create_model("resnet10_dcd", num_classes=10, in_chans=1), torch.randn(8, 1, 32, 32))
    check_onnx(model, export_onnx(model, 32), 32)
    quickstart = str(Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml")
    assert main(["profile", "--config", quickstart, "--data.init_args.channels=1",
                 "--model.init_args.backbone.init_args.in_chans=1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["madds"] > 0


def test_export_check_notes_logits_that_do_not_depend_on_the_input(capsys: pytest.CaptureFixture[str]) -> None:
    """Constant logits (a classifier that sees nothing of its features) compare equal whatever the
    graph does: the check says so rather than a bare ok."""
    model = create_model("resnet10_static", num_classes=10).eval()
    nn.init.zeros_(model.fc.weight)
    nn.init.normal_(model.fc.bias)
    difference, _, _ = check_onnx(model, export_onnx(model, 32), 32)
    assert difference < 1e-6
    assert "note: PyTorch's logits are the same for all 3 random images" in capsys.readouterr().err
    check_onnx(model, export_onnx(model, 32), 32, batch=1)  # one image: nothing to differ from
    assert "note:" not in capsys.readouterr().err
    nn.init.normal_(model.fc.weight)
    check_onnx(model, export_onnx(model, 32), 32)
    assert "note:" not in capsys.readouterr().err


def test_export_leaves_the_model_in_its_mode() -> None:
    model = create_model("resnet10_static", num_classes=10).train()
    data = export_onnx(model, 32)
    assert model.training
    check_onnx(model, data, 32)
    assert model.training and all(m.training for m in model.modules())


def test_export_onnx_check_fails_where_it_cannot_compare_or_the_graph_differs(tmp_path, capsys, monkeypatch) -> None:
    # an untrained DCD ResNet overflows in eval mode: NaN logits are reported, not passed. Seeded:
    # with the global generator's state left by other tests, about one initialisation in twelve
    # stays finite (1e35), and the check then rightly passes
    torch.manual_seed(0)
    out = tmp_path / "resnet.onnx"
    assert export_main(["--model", "resnet10_dcd", "--num-classes", "7", "--image-size", "48",
                        "--out", str(out), "--check"]) == 1
    captured = capsys.readouterr()
    assert out.stat().st_size > 1e6 and "not finite" in captured.err and "--checkpoint" in captured.err
    # a graph that computes something else (here: another model's weights) fails the comparison
    other = export_onnx(create_model("mobilenetv2_x0.35_static", num_classes=7), 48)
    monkeypatch.setattr("dcd_lightning.export.export_onnx", lambda model, size, path: other)
    assert export_main(["--model", "mobilenetv2_x0.35_dcd", "--num-classes", "7", "--image-size", "48",
                        "--out", str(tmp_path / "m.onnx"), "--check"]) == 1
    captured = capsys.readouterr()
    assert captured.out.rstrip().endswith(": FAILED") and "more than --tolerance 0.001" in captured.err
    with pytest.raises(SystemExit):
        export_main(["--model", "mobilenetv2_x0.35_dcd", "--out", str(out), "--check", "--tolerance", "0"])
    assert "--tolerance must be positive" in capsys.readouterr().err


OPERATORS = {
    "dcd_release_1x1": lambda: DCDReleaseConv2d(16, 32, 1),
    "dcd_release_3x3": lambda: DCDReleaseConv2d(16, 32, 3, layout="resnet_basic"),
    "dcd_blocks_kernel": lambda: DCDConv2d(16, 32, 1, num_blocks=2, route="kernel"),
    "dcd_activations": lambda: DCDConv2d(16, 32, 1, route="activations"),
    "dcd_joint": lambda: DCDConv2d(16, 32, 3, fusion="joint"),
    "dcd_depthwise": lambda: DCDDepthwiseConv2d(16, 16, 3, 1, 16),
    "dyconv": lambda: DyConv2d(16, 32, 3),
    "condconv": lambda: CondConv2d(16, 32, 3),
}


@pytest.mark.parametrize("mode", ["train", "eval", "folded"])
@pytest.mark.parametrize("name", sorted(OPERATORS))
def test_operators_compile_without_graph_breaks(name: str, mode: str) -> None:
    """fullgraph=True raises on any graph break (the eager backend traces without code generation)."""
    torch._dynamo.reset()
    module = OPERATORS[name]()
    module = optimize_for_inference(module) if mode == "folded" else module.train(mode == "train")
    x = torch.randn(2, 16, 8, 8)
    compiled = torch.compile(module, backend="eager", fullgraph=True)
    with torch.set_grad_enabled(mode != "folded"):
        torch.testing.assert_close(compiled(x), module(x))


def test_model_training_step_compiles_without_graph_breaks_or_recompiles() -> None:
    """Two training steps, one graph: nothing the first step changes (a cache it fills, the batch
    norms' counters) may fail a guard of the second (each recompile of a DCD model costs minutes)."""
    torch._dynamo.reset()
    model = create_model("resnet10_dcd", num_classes=10).train()  # 2x2 branch pooling: a cached matrix
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(2):
            optimizer.zero_grad()
            loss = compiled(torch.randn(2, 3, SIZE, SIZE)).square().mean()
            loss.backward()
            assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
            optimizer.step()


def test_compiled_graph_builds_no_tensor_on_the_host() -> None:
    """The branch's pooling matrix is made in the graph from index arithmetic on the input's device:
    a tensor built from Python data lives on the host, and on a GPU its copy to the device would
    sync the stream on every step and keep CUDA graphs (mode="reduce-overhead") from capturing."""
    graphs = []

    def inspect(graph_module: torch.fx.GraphModule, example_inputs: list) -> object:
        graphs.append(graph_module)
        return graph_module.forward

    torch._dynamo.reset()
    layer = DCDReleaseConv2d(16, 32, 1).train()  # an expanding layer: 2x2 branch pooling
    assert layer.pool_size == 2
    torch.compile(layer, backend=inspect, fullgraph=True)(torch.randn(2, 16, 8, 8)).sum().backward()
    host_made = [node for graph in graphs for node in graph.graph.nodes
                 if node.op == "call_function" and node.target in (torch.tensor, torch.as_tensor)]
    assert graphs and not host_made, host_made


@pytest.mark.parametrize("name", ["mobilenetv2_x0.35_dcd", "mobilenetv2_x0.5_dyconv", "mobilenetv2_x0.5_condconv",
                                  "mobilenetv2_x0.5_dcd_dw_pw", "resnet10_dcd", "resnet18_dcd_joint"])
def test_channels_last_equals_contiguous(name: str) -> None:
    """model.to(memory_format=torch.channels_last) works (expert banks are 4-d) and changes nothing."""
    torch.manual_seed(0)
    model = create_model(name, num_classes=10).double().train()  # batch statistics: no calibration needed
    images = torch.randn(4, 3, SIZE, SIZE, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    results = []
    for fmt in (torch.contiguous_format, torch.channels_last):
        model.zero_grad()
        model.to(memory_format=fmt)
        torch.manual_seed(0)  # the same dropout mask
        out = model(images.contiguous(memory_format=fmt))
        out.square().sum().backward()
        results.append((out.detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-9, atol=1e-9)
    for grad_last, grad in zip(results[1][1], results[0][1]):
        torch.testing.assert_close(grad_last, grad, rtol=1e-5, atol=1e-7)  # a wrong layout errs by O(1)


# at batch 1 on a 9 x 7 map this one takes the C kernel's activation route (static convolution first)
AUTOCAST_OPERATORS = OPERATORS | {"dcd_3x3_stride_2_bias": lambda: DCDConv2d(16, 32, 3, 2, bias=True)}


@pytest.mark.parametrize("batch", [1, 4])  # one sample takes the fold's own paths (and the C kernel's)
@pytest.mark.parametrize("mode", ["train", "eval", "folded"])
@pytest.mark.parametrize("name", sorted(AUTOCAST_OPERATORS))
def test_operators_under_bf16_autocast(name: str, mode: str, batch: int) -> None:
    """Each operator under CPU bf16 autocast stays within bf16's precision of its float32 output."""
    torch.manual_seed(0)
    module = AUTOCAST_OPERATORS[name]()
    if name == "dcd_3x3_stride_2_bias":
        torch.nn.init.normal_(module.expand, 0.0, 0.3)  # P = 0 at initialisation: give the residual weight
    if mode == "train" and batch == 1 and any("latent_norm" in n for n, _ in module.named_modules()):
        return  # a latent batch norm in training needs two samples
    module = optimize_for_inference(module) if mode == "folded" else module.train(mode == "train")
    x = torch.randn(batch, 16, 9, 7)
    with torch.set_grad_enabled(mode != "folded"):
        expected = module(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = module(x)
    assert low.dtype in (torch.bfloat16, torch.float32)
    assert ((low.float() - expected).abs().max() / expected.abs().max()) < 3e-2


@pytest.mark.parametrize("name", ["mobilenetv2_x0.35_dcd", "mobilenetv2_x0.5_dyconv", "mobilenetv2_x0.5_condconv",
                                  "resnet10_dcd", "resnet18_dcd_joint"])
def test_bf16_autocast_trains(name: str) -> None:
    """A training step under CPU bf16 autocast: bf16 logits, finite loss and gradients.

    (Whole random models amplify bf16 rounding through their input-dependent gates, so their logits
    are compared with float32's per operator above, not here.)
    """
    model = calibrated(name).train()
    images = torch.randn(8, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(images)
        loss = torch.nn.functional.cross_entropy(logits, torch.arange(8) % 10)
    loss.backward()
    assert logits.dtype == torch.bfloat16 and torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("name", ["mobilenetv2_x0.35_dcd", "resnet10_dcd"])
def test_optimized_models_run_under_bf16_autocast_at_batch_1(name: str) -> None:
    """The fold and the C kernel are float32/64 only: under autocast the model computes as the eval
    model does (before, the fold's products mixed dtypes, and the C kernel wrote float32 values into
    a bf16 convolution's output)."""
    model = calibrated(name).eval()
    fast = optimize_for_inference(model)
    image = torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(4))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        low = fast(image)
    # values are held to float32 per operator above (whole random models amplify bf16's rounding)
    assert low.dtype == torch.bfloat16 and torch.isfinite(low).all()


def test_dcd_classifier_with_bf16_inputs() -> None:
    layer = DCDReleaseLinear(16, 10).eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.isfinite(layer(torch.randn(3, 16))).all()


def test_export_onnx_from_a_config_and_checkpoint(tmp_path, capsys) -> None:
    """--config + --checkpoint: the trained weights (prefix model.) are what gets exported."""
    from dcd_lightning.profile_cmd import model_from_config

    model, size = model_from_config(["configs/quickstart.yaml"], [])
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.01)  # weights a fresh model does not have
    calibrate_batch_norms(model, torch.randn(64, 3, size, size))  # and batch-norm statistics
    checkpoint = tmp_path / "last.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}}, checkpoint)
    out = tmp_path / "m.onnx"
    assert export_main(["--config", "configs/quickstart.yaml", "--checkpoint", str(checkpoint),
                        "--out", str(out)]) == 0
    import onnxruntime

    session = onnxruntime.InferenceSession(out.read_bytes(), providers=["CPUExecutionProvider"])
    images = torch.randn(3, 3, size, size)
    (logits,) = session.run(["logits"], {"images": images.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(logits), model.eval()(images), rtol=1e-4, atol=1e-4)
    torch.save({"state_dict": {}}, checkpoint)
    with pytest.raises(SystemExit):
        export_main(["--config", "configs/quickstart.yaml", "--checkpoint", str(checkpoint), "--out", str(out)])
    assert "holds no 'model.*' weights" in capsys.readouterr().err


def test_a_fold_is_dropped_when_the_layer_gets_new_tensors() -> None:
    """Assigning a new parameter, or load_state_dict(assign=True), replaces the tensors the fold
    watches: the layer must compute with the new ones."""
    torch.manual_seed(0)
    model = optimize_for_inference(nn.Sequential(DCDConv2d(16, 32, 1), nn.BatchNorm2d(32), DCDConv2d(32, 16, 3, 2)).eval())
    x = torch.randn(1, 16, 8, 8)
    with torch.no_grad():
        before = model(x)
        model[2].weight = nn.Parameter(model[2].weight.detach() * 2)
        after = model(x)
        assert not torch.allclose(after, before)
        state = {k: v * 3 if k.endswith(".weight") else v.clone() for k, v in model.state_dict().items()}
        model.load_state_dict(state, assign=True)
        fresh = optimize_for_inference(model)  # folded anew from the loaded tensors
        torch.testing.assert_close(model(x), fresh(x), rtol=1e-4, atol=1e-4)  # the plain path and a new fold


def test_optimize_for_inference_inside_inference_mode() -> None:
    """Called inside torch.inference_mode() (as in a serving loop), the result is the same model:
    inference tensors have no version counter, so the copy and folds are made outside that mode."""
    model = calibrated("resnet10_dcd")
    image = torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    outside = optimize_for_inference(model)
    with torch.inference_mode():
        inside = optimize_for_inference(model)
        assert not any(t.is_inference() for t in (*inside.parameters(), *inside.buffers()))
        assert torch.equal(inside(image), outside(image))


class _PreActivation(nn.Module):
    """bn1 runs before conv1: names alone must not make them a pair."""

    def __init__(self) -> None:
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.conv2(self.conv1(torch.relu(self.bn1(x)))))


def test_optimize_for_inference_folds_only_pairs_whose_order_it_knows() -> None:
    import torchvision

    generator = torch.Generator().manual_seed(0)
    for model in (_PreActivation(), torchvision.models.resnet18(num_classes=5)):
        for norm in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
            norm.running_mean.normal_(generator=generator)
            norm.running_var.uniform_(0.5, 2.0, generator=generator)
            norm.weight.data.uniform_(0.5, 2.0, generator=generator)
        model = model.double().eval()
        images = torch.randn(2, 3 if isinstance(model, torchvision.models.ResNet) else 4, 32, 32, dtype=torch.float64,
                             generator=generator)
        optimized = optimize_for_inference(model)
        with torch.no_grad():
            torch.testing.assert_close(optimized(images), model(images), rtol=1e-9, atol=1e-9)
        folded = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) - sum(
            isinstance(m, nn.BatchNorm2d) for m in optimized.modules())
        assert folded == (20 if isinstance(model, torchvision.models.ResNet) else 0)  # (unknown class: none)


@pytest.mark.parametrize("cls", [DyConv2d, CondConv2d])
@pytest.mark.parametrize("bias", [False, True])
def test_a_mixture_layers_batch_norm_folds_exactly_on_both_mixings(cls, bias: bool) -> None:
    """DY-Conv's norm shift goes into its K biases (softmax weights sum to 1); CondConv's into a
    static shift after the mixture (sigmoid weights do not). Both mixings and the reference agree
    with conv + norm in float64, and the layer's parameters do not change under the copy."""
    torch.manual_seed(0)
    conv = cls(8, 12, 3, 2, bias=bias)
    if bias:
        nn.init.normal_(conv.bias)
    norm = nn.BatchNorm2d(12)
    norm.running_mean.normal_(), norm.running_var.uniform_(0.5, 2.0), norm.weight.data.uniform_(0.5, 2.0)
    nn.init.normal_(norm.bias)
    model = nn.Sequential(conv, norm).double().eval()
    before = {key: value.clone() for key, value in model.state_dict().items()}
    optimized = optimize_for_inference(model)
    fused = optimized[0]
    assert isinstance(optimized[1], nn.Identity) and (fused.shift is not None) == (cls is CondConv2d)
    x = torch.randn(5, 8, 7, 7, dtype=torch.float64)
    with torch.no_grad():
        expected = model(x)
        for mixing in ("kernel", "output"):
            fused.mixing = mixing
            torch.testing.assert_close(fused(x), expected, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(fused.reference_forward(x), expected, rtol=1e-10, atol=1e-10)
    assert all(torch.equal(value, before[key]) for key, value in model.state_dict().items())


@pytest.mark.parametrize("name", ["mobilenetv2_x0.35_dcd", "mobilenetv2_x0.5_static", "resnet10_dcd", "resnet18_dcd_joint",
                                  "mobilenetv2_x0.5_dyconv", "resnet10_dyconv", "mobilenetv2_x0.5_condconv"])
def test_optimize_for_inference_folds_batch_norms_into_a_copy(name: str) -> None:
    """Every BatchNorm2d after a static or DCD convolution is folded; outputs are unchanged (float64),
    at batch 1 and 3; the model passed in keeps its structure and training behaviour."""
    model = calibrated(name, torch.float64)
    norms = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    optimized = optimize_for_inference(model)
    moved = sum(getattr(m, "output_norm", None) is not None for m in optimized.modules())
    left = sum(isinstance(m, nn.BatchNorm2d) for m in optimized.modules()) - moved
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == norms  # the original is untouched
    # every norm is folded (into DY-Conv's and CondConv's kernels too) except those after joint-fusion
    # DCD, which cannot take them
    unfoldable = sum(isinstance(m, DCDConv2d) and m.fusion == "joint" for m in model.modules())
    assert left == unfoldable and (moved > 0) == ("dcd" in name and "joint" not in name)
    images = torch.randn(3, 3, SIZE, SIZE, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        for batch in (images[:1], images):
            expected = model(batch)
            assert ((optimized(batch) - expected).abs().max() / expected.abs().max()) < 1e-9
