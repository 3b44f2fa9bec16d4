"""On a CUDA device: every operator's fast path equals its per-sample-kernel reference there (float64,
train and eval), computes what it computes on the CPU, and the models train in bf16 autocast.

CI has no GPU, so these tests are skipped there; run them on a GPU machine with
`pytest tests/test_gpu.py` (their results are in docs/benchmarks.md).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from test_ops import (
    CIN,
    CONV_VARIANTS,
    FOLDABLE,
    LINEAR_VARIANTS,
    assert_close_relative,
    compare,
    float64,  # noqa: F401  (autouse: float64 by default, as in test_ops)
    randomise,
)

from dcd_lightning import create_model, optimize_for_inference
from dcd_lightning.inference import calibrate_batch_norms

DEVICE = torch.device("cuda")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none here)")


def assert_same_on_cpu(module: torch.nn.Module, x: torch.Tensor) -> None:
    """Eval-mode output on the GPU == the output of a CPU copy of the module."""
    module.eval()
    on_cpu = copy.deepcopy(module).cpu()
    with torch.no_grad():
        assert_close_relative(module(x).cpu(), on_cpu(x.cpu()))


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("name", sorted(CONV_VARIANTS))
def test_conv_fast_equals_reference_on_cuda(name: str, stride: int, training: bool, layout: torch.memory_format) -> None:
    module = randomise(CONV_VARIANTS[name](stride)).to(DEVICE)
    x = torch.randn(3, CIN, 8, 8, generator=torch.Generator().manual_seed(8)).to(DEVICE, memory_format=layout)
    compare(module, x, training)
    assert_same_on_cpu(module, x)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", sorted(LINEAR_VARIANTS))
def test_linear_fast_equals_reference_on_cuda(name: str, training: bool) -> None:
    module = randomise(LINEAR_VARIANTS[name]()).to(DEVICE)
    x = torch.randn(5, CIN, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    compare(module, x, training)
    assert_same_on_cpu(module, x)


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("name", FOLDABLE)
def test_folded_inference_on_cuda(name: str, batch: int) -> None:
    """The folds on a GPU (the C kernel is CPU-only: its batch-1 path must not engage here)."""
    module = optimize_for_inference(randomise(CONV_VARIANTS[name](1)).to(DEVICE))
    x = torch.randn(batch, CIN, 7, 7, generator=torch.Generator().manual_seed(7)).to(DEVICE)
    with torch.no_grad():
        assert_close_relative(module(x), module.reference_forward(x))
        assert_close_relative(module(x.contiguous(memory_format=torch.channels_last)), module.reference_forward(x))


@pytest.mark.parametrize("name", ["mobilenetv2_x0.5_dcd", "resnet18_dcd", "mobilenetv2_x1.0_dyconv",
                                  "mobilenetv2_x1.0_condconv"])
def test_model_on_cuda_equals_cpu_and_trains_in_bf16(name: str) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    # bf16 autocast training steps from the model's own initialisation, channels_last, float32 weights
    model = create_model(name, num_classes=10).float().to(DEVICE).train().to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    x = x.float().to(memory_format=torch.channels_last)
    for _ in range(2):
        optimizer.zero_grad()
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), torch.tensor([1, 2], device=DEVICE))
        loss.backward()
        assert torch.isfinite(loss)
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        optimizer.step()
    # the trained model in float64: the same on the CPU, and its folds on the GPU. Its batch norms'
    # running statistics are set from this batch first: after two steps they are still near their
    # initial (0, 1), and then a DCD ResNet's outputs grow without bound in eval mode (its dynamic
    # coefficients grow with the input, so each layer's output with the input's square)
    model, x = model.double(), x.double()
    calibrate_batch_norms(model, x).eval()
    assert_same_on_cpu(model, x)
    with torch.no_grad():
        assert_close_relative(optimize_for_inference(model)(x), model(x))
