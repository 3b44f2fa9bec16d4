"""ops.pooling.MaxPool2d: nn.MaxPool2d's outputs, through the C kernel where no gradient is needed."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dcd_lightning import create_model
from dcd_lightning.ops import _native
from dcd_lightning.ops.pooling import MAX_THREADS, MaxPool2d

HAS_COMPILER = _native.compiler() is not None


@pytest.fixture
def kernel_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, ...]]:
    """The sizes of each call of the C kernel's max pooling (planes, h, w, kh, kw, sh, sw, ph, pw)."""
    calls: list[tuple[int, ...]] = []
    lookup = _native.max_pool

    def recording(dtype: torch.dtype):
        function = lookup(dtype)
        if function is None:
            return None
        return lambda x, *sizes_and_out: calls.append(sizes_and_out[:-1]) or function(x, *sizes_and_out)

    monkeypatch.setattr(_native, "max_pool", recording)
    return calls


def awkward_values(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Random values with ties (a coarse grid), signed zeros, infinities and a few NaNs."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randint(-4, 5, shape, generator=generator).to(dtype) / 2
    flat = x.view(-1)
    picks = torch.randperm(flat.numel(), generator=generator)
    flat[picks[:3]] = float("nan")
    flat[picks[3:9]] = float("-inf")
    flat[picks[9:12]] = float("inf")
    flat[picks[12:20]] = -0.0
    return x


CASES = [  # shape, kernel, stride, padding
    ((1, 64, 112, 112), 3, 2, 1),  # the ResNet stem
    ((2, 3, 15, 17), 3, 2, 1),
    ((1, 4, 9, 8), 3, 1, 1),
    ((2, 2, 10, 11), 2, 2, 0),
    ((1, 3, 12, 13), 4, 3, 2),
    ((1, 2, 7, 9), (3, 2), (2, 1), (1, 0)),
    ((1, 3, 5, 5), 5, 1, 2),
    ((1, 2, 6, 6), 1, 2, 0),
    ((3, 11, 10), 3, 2, 1),  # unbatched (C, H, W)
    ((1, 1, 3, 3), 3, [], 1),  # stride as the kernel
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_max_pool_equals_pytorch(case: int, dtype: torch.dtype, kernel_calls: list) -> None:
    """Equal to PyTorch's max pooling, NaN, infinities and ties included; the C kernel computes it
    where a compiler is, under no_grad and for inputs that record no gradient alike."""
    shape, kernel, stride, padding = CASES[case]
    x = awkward_values(shape, dtype, seed=case)
    pool = MaxPool2d(kernel, stride, padding)
    expected = F.max_pool2d(x, kernel, stride, padding)
    with torch.no_grad():
        torch.testing.assert_close(pool(x), expected, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(pool(x), expected, rtol=0, atol=0, equal_nan=True)  # x needs no gradient
    assert len(kernel_calls) == (2 if HAS_COMPILER else 0)


STEM = {"kernel_size": 3, "stride": 2, "padding": 1}
FALLBACKS = {
    "channels_last": (STEM, lambda x: x.contiguous(memory_format=torch.channels_last)),
    "strided view": (STEM, lambda x: x[..., ::2]),
    "dilation": ({**STEM, "stride": 1, "dilation": 2}, lambda x: x),
    "ceil_mode": ({**STEM, "ceil_mode": True}, lambda x: x),
    "integers": (STEM, lambda x: (x * 10).to(torch.int32)),
    "half": (STEM, lambda x: x.to(torch.bfloat16)),
}


@pytest.mark.parametrize("name", sorted(FALLBACKS))
def test_max_pool_leaves_other_inputs_to_pytorch(name: str, kernel_calls: list) -> None:
    """Layouts, types and arguments the kernel does not cover go to PyTorch, with its results."""
    arguments, make = FALLBACKS[name]
    x = make(torch.randn(2, 4, 12, 14, generator=torch.Generator().manual_seed(0)))
    with torch.no_grad():
        out = MaxPool2d(**arguments)(x)
    expected = nn.MaxPool2d(**arguments)(x)
    assert torch.equal(out, expected)
    assert out.stride() == expected.stride()
    assert kernel_calls == []


def test_max_pool_indices_and_gradients_are_pytorchs(kernel_calls: list) -> None:
    """With indices, or an input that records a gradient, the result and gradient are nn.MaxPool2d's."""
    x = torch.randn(2, 4, 12, 14, generator=torch.Generator().manual_seed(0))
    out, indices = MaxPool2d(3, 2, 1, return_indices=True)(x)
    expected, expected_indices = nn.MaxPool2d(3, 2, 1, return_indices=True)(x)
    assert torch.equal(out, expected) and torch.equal(indices, expected_indices)
    ours, theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    MaxPool2d(3, 2, 1)(ours).square().sum().backward()
    nn.MaxPool2d(3, 2, 1)(theirs).square().sum().backward()
    assert torch.equal(ours.grad, theirs.grad)
    assert kernel_calls == []


@pytest.mark.parametrize(
    "arguments, size, message",
    [
        ({"kernel_size": 3, "stride": 2, "padding": 2}, 8, "pad should be"),
        ({"kernel_size": 5, "stride": 1, "padding": 0}, 4, "Output size is too small"),
        ({"kernel_size": 3, "stride": 0, "padding": 1}, 8, "stride should"),
    ],
)
def test_max_pool_bad_arguments_raise_pytorchs_errors(arguments: dict, size: int, message: str) -> None:
    """Arguments PyTorch refuses are refused with its own message, not computed by the kernel."""
    x = torch.randn(1, 2, size, size)
    with torch.no_grad(), pytest.raises(RuntimeError, match=message):
        MaxPool2d(**arguments)(x)


def test_max_pool_without_the_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """DCD_LIGHTNING_NATIVE=0: PyTorch's pooling, the same outputs."""
    monkeypatch.setattr(_native, "_state", {})
    monkeypatch.setenv("DCD_LIGHTNING_NATIVE", "0")
    assert _native.max_pool(torch.float32) is None
    x = awkward_values((1, 3, 16, 16), torch.float32, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(MaxPool2d(3, 2, 1)(x), F.max_pool2d(x, 3, 2, 1), rtol=0, atol=0, equal_nan=True)


def test_resnet_stem_pools_through_the_kernel(kernel_calls: list) -> None:
    """The ResNets' stem uses it: an eval-mode forward gives the outputs of the same model with
    nn.MaxPool2d, and the kernel pooled the stem's map."""
    model = create_model("resnet10_static", num_classes=10).eval()
    plain = copy.deepcopy(model)
    plain.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(x), plain(x))
    assert kernel_calls == ([(2 * 64, 32, 32, 3, 3, 2, 2, 1, 1)] if HAS_COMPILER else [])


def test_max_pool_leaves_many_threads_to_pytorch(monkeypatch: pytest.MonkeyPatch, kernel_calls: list) -> None:
    """Beyond MAX_THREADS PyTorch threads, PyTorch's pooling (threaded) is used, with the same outputs."""
    x = awkward_values((2, 4, 12, 14), torch.float32, seed=3)
    monkeypatch.setattr(torch, "get_num_threads", lambda: MAX_THREADS + 1)
    with torch.no_grad():
        torch.testing.assert_close(MaxPool2d(3, 2, 1)(x), F.max_pool2d(x, 3, 2, 1), rtol=0, atol=0, equal_nan=True)
    assert kernel_calls == []
    monkeypatch.setattr(torch, "get_num_threads", lambda: MAX_THREADS)
    with torch.no_grad():
        MaxPool2d(3, 2, 1)(x)
    assert len(kernel_calls) == (1 if HAS_COMPILER else 0)
