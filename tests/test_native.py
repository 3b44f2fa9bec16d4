"""The batch-1 C kernel of folded DCD layers (ops/_native.c) and the branch's pooling.

Every route of the kernel is held to the per-sample-kernel reference in float64; the PyTorch path
that replaces it (no compiler, DCD_LIGHTNING_NATIVE=0, tracing) is held to the same reference.
"""

from __future__ import annotations

import copy
import io
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_ops import (
    CIN,
    CONV_VARIANTS,
    LINEAR_VARIANTS,
    assert_close_relative,
    float64,  # noqa: F401  (autouse: float64 by default, as in test_ops)
    randomise,
)

from dcd_lightning import create_model, optimize_for_inference
from dcd_lightning.ops import DCDConv2d, _folded, _native
from dcd_lightning.ops._common import pool_input
from dcd_lightning.ops.static import InferenceConv1x1, InferenceLinear

# channel fusion in one block: what the kernel covers
NATIVE = sorted(
    n
    for n in CONV_VARIANTS
    if n.startswith(("dcd_1x1", "dcd_3x3", "release"))
    and not any(k in n for k in ("joint", "blocks", "attention_only"))
)
HAS_COMPILER = _native.compiler() is not None


@pytest.fixture(scope="session")
def built_library() -> Path | None:
    """This process's build of the kernel (made on first use), or None without a compiler."""
    lib = _native.library() if HAS_COMPILER else None
    return Path(lib._name) if lib is not None else None


@pytest.fixture
def fresh_library(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """The kernel library state forgotten, and its cache in a temporary folder (restored after)."""
    monkeypatch.setattr(_native, "_state", {})
    monkeypatch.setenv("DCD_LIGHTNING_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("pool", [1, 2, 3])
@pytest.mark.parametrize("size", [(7, 7), (8, 8), (13, 6), (14, 14)])
def test_pool_input_equals_adaptive_average_pooling(
    size: tuple[int, int], pool: int, channels_last: bool
) -> None:
    """The branch's pooling (one product with an averaging matrix) is adaptive_avg_pool2d's, with
    overlapping cells where the size does not divide, in values and gradients."""
    x = torch.randn(3, 5, *size, generator=torch.Generator().manual_seed(pool))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weights = torch.randn(3, 5 * pool * pool, generator=torch.Generator().manual_seed(9))
    results = []
    for pooling in (lambda t: pool_input(t, pool), lambda t: F.adaptive_avg_pool2d(t, pool).flatten(1)):
        inp = x.detach().clone().requires_grad_(True)
        out = pooling(inp)
        (out * weights).sum().backward()
        results.append((out.detach(), inp.grad))
    assert_close_relative(results[0][0], results[1][0], 1e-12)
    assert_close_relative(results[0][1], results[1][1], 1e-12)


def test_the_kernel_builds_where_a_compiler_is() -> None:
    """CI and this project's machines have a C compiler: there the kernel must build and load."""
    if not HAS_COMPILER:
        pytest.skip("no C compiler on this machine: folded layers use their PyTorch path")
    assert _native.enabled() and _native.library() is not None


def _folded_layer(name: str, stride: int, seed: int = 0) -> DCDConv2d:
    module = optimize_for_inference(randomise(CONV_VARIANTS[name](stride), seed))
    assert module.fold_for_inference()
    return module


@pytest.mark.parametrize("route", ["form", "activations"])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("name", NATIVE)
def test_native_one_sample_equals_reference(
    name: str, stride: int, route: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both of the kernel's routes at batch 1 == the per-sample-kernel reference (float64): the
    kernel formed in C for one convolution, and the static convolution with the residual added to
    its output in C (the activation route); also with a following batch norm folded in."""
    if not HAS_COMPILER:
        pytest.skip("no C compiler on this machine")
    monkeypatch.setattr(_folded.FoldedDCD, "forms_kernel", lambda self, h, w: route != "activations")
    module = _folded_layer(name, stride)
    assert module._folded.native is not None
    calls = []
    native = module._folded.one_sample_native
    monkeypatch.setattr(module._folded, "one_sample_native", lambda x: calls.append(1) or native(x))
    for size in (7, 8, 16):
        x = torch.randn(1, CIN, size, size, generator=torch.Generator().manual_seed(size))
        with torch.no_grad():
            assert_close_relative(module(x), module.reference_forward(x), 1e-10)
    assert len(calls) == 3  # the C kernel ran, not a fallback
    module.output_norm = randomise(torch.nn.BatchNorm2d(module.out_channels), seed=7).eval()
    x = torch.randn(1, CIN, 9, 9, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = module.reference_forward(x)  # the reference applies output_norm too
        module.fold_for_inference()
        assert_close_relative(module(x), expected, 1e-10)


_BLOCKINGS: dict[str, object] = {}


@pytest.fixture(params=["4x4", "6x2"])
def blocking(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, tmp_path_factory) -> str:
    """The kernel built with the given register block of its products (MR rows x WV vectors: 4 x 4
    is AVX-512's and the default elsewhere, 6 x 2 AVX2's), whatever this machine's default; the
    other block's build made once per session, in a folder of its own."""
    if not HAS_COMPILER:
        pytest.skip("no C compiler on this machine")
    rows, vectors = request.param.split("x")
    if _native.register_block() == (int(rows), int(vectors)):
        return request.param  # this machine's build (built once per session anyway)
    if request.param not in _BLOCKINGS:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(_native, "FLAGS", [*_native.FLAGS, f"-DMR={rows}", f"-DWV={vectors}"])
            patch.setattr(_native, "_state", {})
            patch.setenv("DCD_LIGHTNING_CACHE", str(tmp_path_factory.mktemp(f"blocking{request.param}")))
            _BLOCKINGS[request.param] = _native.library()
    assert _BLOCKINGS[request.param] is not None
    monkeypatch.setattr(_native, "_state", {"library": _BLOCKINGS[request.param]})
    assert _native.register_block() == (int(rows), int(vectors))
    return request.param


@pytest.mark.parametrize("whole", [False, True])
@pytest.mark.parametrize("route", ["form", "activations"])
@pytest.mark.parametrize("kernel_size", [1, 3])
def test_native_blocked_products_at_uneven_sizes(
    route: str, kernel_size: int, whole: bool, blocking: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sizes that leave partial blocks everywhere in the C kernel's blocked products, with either
    register block: 70 or 150 input and 39 output channels, latent 5 (rows: 6 x 6 + 2 + 1 and 4 + 1
    with blocks of 6 rows, 9 x 4 + 3 and 4 + 1 with blocks of 4), maps of 9x9 and 10x10 (81 and 100
    columns: whole blocks of vectors, then smaller ones, the last partial), stride 1 and 2
    (float64). With `whole`, a 1x1 stride-1 layer does its convolution in the kernel too: a product
    that reads x itself (its last vector copied, padded) over 150 rows in two parts (KC = 128), in
    both loop orders."""
    monkeypatch.setattr(_folded.FoldedDCD, "forms_kernel", lambda self, h, w: route == "form")
    monkeypatch.setattr(_folded, "WHOLE_MADDS", 10**12 if whole else 0)
    monkeypatch.setattr(_native, "vector_bytes", lambda: 64)  # the route whatever this machine's vectors
    for stride, c_in in ((1, 70), (2, 70), (1, 150)):
        layer = DCDConv2d(c_in, 39, kernel_size, stride, latent_dim=5, latent_norm=True, gate="hard_sigmoid")
        module = optimize_for_inference(randomise(layer.double(), seed=stride))
        calls = count_whole_calls(module._folded)
        for size in (9, 10):
            x = torch.randn(1, c_in, size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(size))
            with torch.no_grad():
                assert_close_relative(module(x), module.reference_forward(x), 1e-10)
        assert len(calls) == (2 if whole and kernel_size == 1 and stride == 1 else 0)


def count_whole_calls(folded: _folded.FoldedDCD) -> list[int]:
    """Record each call of the fold's dcd_one_sample_1x1 (the list of its `forms` arguments)."""
    assert folded.native is not None
    calls: list[int] = []
    whole_function = folded.native[3]

    def counted(*args: object) -> int:
        calls.append(args[4])
        return whole_function(*args)

    folded.native = (*folded.native[:3], counted, *folded.native[4:])
    return calls


def test_whole_layer_limit_shrinks_with_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 1x1 layer runs whole in the C kernel up to WHOLE_MADDS at one or two threads; at four, only
    up to half of it (the C kernel runs on one thread, PyTorch's convolution on all). The route is
    planned at the first call for an input size."""
    if not HAS_COMPILER:
        pytest.skip("no C compiler on this machine")
    module = optimize_for_inference(randomise(DCDConv2d(32, 16, 1, latent_dim=4).double(), seed=0))
    calls = count_whole_calls(module._folded)
    x = torch.randn(1, 32, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert _native.vector_bytes() in (16, 32, 64)  # this build's vectors: the route is AVX-512's and AVX2's
    assert module._folded.plan(8, 8)[1] == (_native.vector_bytes() in (32, 64) and torch.get_num_threads() <= 40)
    monkeypatch.setattr(_folded, "WHOLE_MADDS", 32 * 16 * 8 * 8)  # exactly this layer's convolution
    monkeypatch.setattr(_native, "vector_bytes", lambda: 64)
    threads = torch.get_num_threads()
    try:
        for count, expected in ((1, 1), (2, 2), (4, 2)):
            torch.set_num_threads(count)
            module._folded.plans.clear()
            with torch.no_grad():
                assert_close_relative(module(x), module.reference_forward(x), 1e-10)
            assert len(calls) == expected, count
    finally:
        torch.set_num_threads(threads)


def test_whole_layer_route_leaves_maps_that_waste_vector_lanes(monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole-layer route computes whole vectors of pixels, the last at most a quarter full one
    pixel at a time: a 6x6 map (36 pixels: 4 vectors of 8 doubles and 4 pixels in a fifth) wastes
    c_out c_in 4 multiply-adds, and the layer leaves its convolution to PyTorch beyond
    WHOLE_WASTE_MADDS; 8x8 and 7x7 maps (49 = 6 x 8 + 1, the last pixel by dot products) waste
    none. Either way the result is the reference's."""
    if not HAS_COMPILER:
        pytest.skip("no C compiler on this machine")
    module = optimize_for_inference(randomise(DCDConv2d(32, 16, 1, latent_dim=4).double(), seed=1))
    calls = count_whole_calls(module._folded)
    monkeypatch.setattr(_native, "vector_bytes", lambda: 64)
    monkeypatch.setattr(_folded, "WHOLE_MADDS", 10**12)
    for limit, size, whole in ((16 * 32 * 4, 6, True), (16 * 32 * 4 - 1, 6, False), (0, 8, True), (0, 7, True)):
        monkeypatch.setattr(_folded, "WHOLE_WASTE_MADDS", limit)
        module._folded.plans.clear()
        calls.clear()
        x = torch.randn(1, 32, size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(size))
        with torch.no_grad():
            assert_close_relative(module(x), module.reference_forward(x), 1e-10)
        assert len(calls) == int(whole), (limit, size)


def test_plan_without_the_c_kernel_keeps_convolutions_in_pytorch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where no C kernel is built (vector width 0) a 1x1 layer's plan is never whole, for any map."""
    module = optimize_for_inference(randomise(DCDConv2d(32, 16, 1, latent_dim=4), seed=2))
    monkeypatch.setattr(_native, "vector_bytes", lambda: 0)
    for size in (1, 6, 7, 8):
        assert module._folded.plan(size, size)[1] is False


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("name", NATIVE)
def test_pytorch_one_sample_equals_reference(name: str, stride: int) -> None:
    """The path that stands in for the kernel (native=False, or no compiler) at batch 1."""
    module = optimize_for_inference(randomise(CONV_VARIANTS[name](stride)), native=False)
    assert module._folded.native is None
    for size in (7, 8, 16):
        x = torch.randn(1, CIN, size, size, generator=torch.Generator().manual_seed(size))
        with torch.no_grad():
            assert_close_relative(module(x), module.reference_forward(x), 1e-10)


@pytest.mark.parametrize("name", sorted(n for n in LINEAR_VARIANTS if n.startswith(("dcd", "release"))))
def test_native_linear_equals_reference(name: str) -> None:
    """A dynamic linear layer at batch 1 (dcd_one_vector: no kernel formed) == the reference."""
    module = optimize_for_inference(randomise(LINEAR_VARIANTS[name]()))
    assert (module._folded.native is not None) == (HAS_COMPILER and "attention_only" not in name)
    x = torch.randn(1, CIN, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert_close_relative(module(x), module.reference_forward(x), 1e-10)


def test_float32_kernel_matches_the_pytorch_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """float32 (the type models run in) through the C kernel and through PyTorch calls agree."""
    if not HAS_COMPILER:
        pytest.skip("no C compiler on this machine")
    torch.set_default_dtype(torch.float32)
    module = randomise(create_model("mobilenetv2_x0.35_dcd"), seed=3).eval()
    native = optimize_for_inference(module)
    plain = optimize_for_inference(module)
    for layer in plain.modules():
        if isinstance(layer, DCDConv2d) and layer._folded is not None:
            assert layer._folded.native is not None
            layer._folded.native = None
    x = torch.randn(1, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert_close_relative(native(x), plain(x), 1e-4)
        assert_close_relative(native(x), module(x), 1e-4)


def test_disabled_or_missing_compiler_falls_back(
    fresh_library: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DCD_LIGHTNING_NATIVE=0, or no compiler, leaves the PyTorch path, with the same results."""
    monkeypatch.setenv("DCD_LIGHTNING_NATIVE", "0")
    module = _folded_layer("release_mobilenetv2_expand_kernel", 1)
    assert module._folded.native is None
    x = torch.randn(1, CIN, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert_close_relative(module(x), module.reference_forward(x), 1e-10)
    monkeypatch.setattr(_native, "_state", {})
    monkeypatch.delenv("DCD_LIGHTNING_NATIVE")
    monkeypatch.setattr(_native, "compiler", lambda: None)
    assert _native.library() is None
    assert not fresh_library.exists()


def test_failed_build_warns_and_falls_back(fresh_library: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    false = shutil.which("false")
    if false is None:
        pytest.skip("no `false` command to stand in for a failing compiler")
    monkeypatch.setenv("CC", false)
    with pytest.warns(RuntimeWarning, match="could not be built"):
        assert _native.library() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _native.library() is None  # decided once per process: no second attempt, no warning


def test_build_is_cached_per_source_and_machine(fresh_library: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if not HAS_COMPILER:
        pytest.skip("no C compiler on this machine")
    assert _native.library() is not None
    builds = list(fresh_library.glob("dcd_native_*.so"))
    assert len(builds) == 1
    attempts = []

    def failing_compiler(command, **kwargs):
        attempts.append(command)
        return subprocess.CompletedProcess(command, 1, "", "no compiler here")

    monkeypatch.setattr(_native.subprocess, "run", failing_compiler)
    monkeypatch.setattr(_native, "_state", {})  # a later process: loads the cached build
    assert _native.library() is not None and not attempts
    monkeypatch.setattr(_native, "_state", {})  # another CPU: its own build, not this one's
    monkeypatch.setattr(_native, "_cpu_identity", lambda: "another cpu")
    with pytest.warns(RuntimeWarning, match="could not be built"):
        assert _native.library() is None
    assert len(attempts) == 1


def test_unusable_cache_folder_builds_for_the_process(
    built_library: Path | None, fresh_library: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if built_library is None:
        pytest.skip("no C compiler on this machine")

    def copying_compiler(command, **kwargs):  # this process's build, copied: the test is where it goes
        shutil.copy(built_library, command[command.index("-o") + 1])
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(_native.subprocess, "run", copying_compiler)
    blocker = tmp_path / "a file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("DCD_LIGHTNING_CACHE", str(blocker / "cache"))
    fallback = tmp_path / "for this process"
    make_temporary = tempfile.mkdtemp

    def temporary_folder(suffix=None, prefix=None, dir=None):  # the fallback, kept under tmp_path
        if dir is None:
            fallback.mkdir()
            return str(fallback)
        return make_temporary(suffix, prefix, dir)

    monkeypatch.setattr(_native.tempfile, "mkdtemp", temporary_folder)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _native.library() is not None
    assert len(list(fallback.glob("dcd_native_*.so"))) == 1


def test_copies_and_pickles_keep_the_kernel() -> None:
    """deepcopy / torch.save of an optimised model: the copy points the kernel at its own tensors."""
    if not HAS_COMPILER:
        pytest.skip("no C compiler on this machine")
    model = optimize_for_inference(randomise(create_model("mobilenetv2_x0.35_dcd"), seed=1).eval())
    copied = copy.deepcopy(model)
    layers = [m for m in copied.modules() if isinstance(m, DCDConv2d) and m._folded is not None]
    assert layers and all(m._folded.native is not None for m in layers)
    assert all(m._folded.is_current() for m in layers)  # the copy's folds are used, not stale
    original = next(m for m in model.modules() if isinstance(m, DCDConv2d))
    assert layers[0]._folded.native[-1]["weight"].data_ptr() != original._folded.native[-1]["weight"].data_ptr()
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert_close_relative(copied(x), model(x), 1e-12)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert all(m._folded.is_current() for m in loaded.modules() if isinstance(m, DCDConv2d) and m._folded is not None)
    with torch.no_grad():
        assert_close_relative(loaded(x), model(x), 1e-10)


@pytest.mark.parametrize("batch", [1, 3])
def test_traced_graph_does_not_bake_the_sample_in(batch: int) -> None:
    """Tracing a folded model at batch 1 records PyTorch calls of the batched routes, not the C
    kernel's result for the traced input: the graph serves other inputs and other batch sizes."""
    model = optimize_for_inference(randomise(create_model("mobilenetv2_x0.35_dcd"), seed=2).eval())
    traced_input = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    other = torch.randn(batch, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", FutureWarning)  # jit.trace is deprecated; it still traces
        traced = torch.jit.trace(model, traced_input, check_trace=False)
        assert_close_relative(traced(other), model(other), 1e-10)


# -- static 1x1 convolutions through the same product (ops/static.py) ----------------------------


@pytest.fixture
def conv_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int, int]]:
    """(c_out, c_in, pixels) of each call of the C kernel's plain 1x1 convolution (planned after
    this fixture is set up)."""
    calls: list[tuple[int, int, int]] = []
    lookup = _native.conv_1x1

    def recording(dtype: torch.dtype):
        function = lookup(dtype)
        if function is None:
            return None
        return lambda *args: calls.append(args[3:6]) or function(*args)

    monkeypatch.setattr(_native, "conv_1x1", recording)
    return calls


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("size", [(7, 7), (8, 8), (13, 6), (14, 14), (1, 1)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_inference_conv_1x1_equals_the_convolution(
    size: tuple[int, int], bias: bool, dtype: torch.dtype, conv_calls: list, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One sample through the C product equals the convolution; it is taken where the rule of DCD's
    whole layers takes theirs (forced here, whatever this machine's vectors)."""
    monkeypatch.setattr(_native, "vector_bytes", lambda: 64 if HAS_COMPILER else 0)
    conv = torch.nn.Conv2d(24, 20, 1, bias=bias, dtype=dtype)
    layer = InferenceConv1x1.from_conv(conv)
    assert layer.weight is conv.weight and layer.bias is conv.bias
    x = torch.randn(1, 24, *size, generator=torch.Generator().manual_seed(0), dtype=dtype)
    with torch.no_grad():
        assert_close_relative(layer(x), conv(x), 1e-12 if dtype == torch.float64 else 1e-5)
    assert conv_calls == ([(20, 24, size[0] * size[1])] if HAS_COMPILER else [])


def test_inference_conv_1x1_leaves_other_cases_to_pytorch(conv_calls: list, monkeypatch: pytest.MonkeyPatch) -> None:
    """Batches, gradients, channels-last inputs and convolutions over WHOLE_MADDS are PyTorch's."""
    monkeypatch.setattr(_native, "vector_bytes", lambda: 64)
    conv = torch.nn.Conv2d(16, 8, 1)
    layer = InferenceConv1x1.from_conv(conv)
    x = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert_close_relative(layer(x), conv(x), 1e-12)
        assert_close_relative(layer(x[:1].contiguous(memory_format=torch.channels_last)), conv(x[:1]), 1e-12)
    out = layer(x[:1])
    out.sum().backward()
    assert conv.weight.grad is not None
    assert conv_calls == []
    monkeypatch.setattr(_folded, "WHOLE_MADDS", 0)
    with torch.no_grad():
        assert_close_relative(layer(x[:1, :, :4]), conv(x[:1, :, :4]), 1e-12)  # a new size plans anew
    assert conv_calls == []
    with pytest.raises(ValueError, match="not a 1x1, stride-1"):
        InferenceConv1x1.from_conv(torch.nn.Conv2d(16, 8, 3, padding=1))


def test_optimize_for_inference_gives_static_1x1_layers_the_product(conv_calls: list) -> None:
    """The copy's plain 1x1 stride-1 convolutions (static MobileNetV2's pointwise layers) become
    InferenceConv1x1 and keep the model's outputs; the model passed in is untouched; copies and
    pickles plan anew; with native=False, or without a copy, they stay PyTorch's."""
    model = randomise(create_model("mobilenetv2_x0.35_static"), seed=3).eval()
    pointwise = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (1, 1)]
    optimized = optimize_for_inference(model)
    replaced = [n for n, m in optimized.named_modules() if isinstance(m, InferenceConv1x1)]
    assert replaced == pointwise and len(replaced) == 34
    assert not any(isinstance(m, InferenceConv1x1) for m in model.modules())
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(x)
        assert_close_relative(optimized(x), expected, 1e-10)
        copied = copy.deepcopy(optimized)
        buffer = io.BytesIO()
        torch.save(optimized, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)
        assert_close_relative(copied(x), expected, 1e-10)
        assert_close_relative(loaded(x), expected, 1e-10)
    if HAS_COMPILER and _native.vector_bytes() in (32, 64):
        assert len(conv_calls) > 0
    assert [n for n, m in optimized.named_modules() if isinstance(m, InferenceLinear)] == ["classifier.1"]
    for options in ({"native": False}, {"fold_batch_norms": False}):
        kept = optimize_for_inference(copy.deepcopy(model), **options)
        assert not any(isinstance(m, (InferenceConv1x1, InferenceLinear)) for m in kept.modules())


def test_optimize_for_inference_leaves_dynamic_operators_layers() -> None:
    """Linear and 1x1 layers inside dynamic operators (DCD branches, CondConv routing) stay as they
    are; the model's own plain layers are replaced."""
    for name, own in (("mobilenetv2_x0.35_dcd", ["features.1.conv.1", "features.18.0"]), ("mobilenetv2_x0.5_condconv", [])):
        optimized = optimize_for_inference(create_model(name).eval())
        replaced = [n for n, m in optimized.named_modules() if isinstance(m, (InferenceConv1x1, InferenceLinear))]
        assert replaced == own, name


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_inference_linear_equals_the_linear_layer(bias: bool, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    """One sample through the C matrix-vector product equals the linear layer; batches, gradients
    and non-contiguous inputs are PyTorch's."""
    calls = []
    lookup = _native.linear
    monkeypatch.setattr(_native, "linear", lambda d: (lambda *a: calls.append(a[3:5]) or lookup(d)(*a)) if lookup(d) else None)
    linear = torch.nn.Linear(37, 29, bias=bias, dtype=dtype)
    layer = InferenceLinear.from_linear(linear)
    assert layer.weight is linear.weight and layer.bias is linear.bias
    x = torch.randn(3, 37, generator=torch.Generator().manual_seed(0), dtype=dtype)
    rel = 1e-12 if dtype == torch.float64 else 1e-5
    with torch.no_grad():
        assert_close_relative(layer(x[:1]), linear(x[:1]), rel)
        assert calls == ([(29, 37)] if HAS_COMPILER else [])
        assert_close_relative(layer(x), linear(x), rel)
        assert_close_relative(layer(x.t().contiguous().t()[:1]), linear(x[:1]), rel)
    layer(x[:1]).sum().backward()
    assert linear.weight.grad is not None
    assert len(calls) == (1 if HAS_COMPILER else 0)


def test_inference_layers_follow_their_weights_dtype_and_device(conv_calls: list, monkeypatch: pytest.MonkeyPatch) -> None:
    """A layer planned in float32 and then converted to float64 uses the float64 product; weights
    on another device are never handed to the C kernel (PyTorch's device error instead)."""
    monkeypatch.setattr(_native, "vector_bytes", lambda: 64 if HAS_COMPILER else 0)
    conv = torch.nn.Conv2d(12, 10, 1, bias=False, dtype=torch.float32)  # no bias: the weight's device alone
    layer = InferenceConv1x1.from_conv(conv)
    x = torch.randn(1, 12, 5, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float32)
    with torch.no_grad():
        assert_close_relative(layer(x), conv(x), 1e-5)
        layer.double(), conv.double()
        assert_close_relative(layer(x.double()), conv(x.double()), 1e-12)
    assert len(conv_calls) == (2 if HAS_COMPILER else 0)
    linear = InferenceLinear.from_linear(torch.nn.Linear(12, 10, bias=False))
    layer.plans.clear()
    unreachable = lambda dtype: pytest.fail("the C kernel was looked up for weights off the CPU")
    monkeypatch.setattr(_native, "conv_1x1", unreachable)
    monkeypatch.setattr(_native, "linear", unreachable)
    for module, shape in ((layer.to("meta"), (1, 12, 5, 5)), (linear.to("meta"), (1, 12))):
        with torch.no_grad():
            try:
                module(torch.randn(shape, dtype=module.weight.dtype))
            except (RuntimeError, NotImplementedError):
                pass  # PyTorch's own answer to mixed devices; what matters is that C never saw them
