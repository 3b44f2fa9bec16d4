"""Hold a dynamic operator's fast path to its slow reference, as this package's tests hold ours.

    from dcd_lightning.testing import check_operator
    check_operator(GatedDCD(16, 32, 3, stride=2), torch.randn(3, 16, 9, 9))

A dynamic operator here has `forward` (fast) and `reference_forward` (slow and obviously right:
every sample's kernel formed, then a plain convolution each). `check_operator` runs both on a
float64 copy of the operator with random parameters and batch-norm statistics (so that no
identity hides a mistake), in train and in eval mode, and compares the outputs and the gradients
of the input and of every parameter. Where the operator folds for inference
(`fold_for_inference` returns True), the folded eval path is held to the reference too, at batch 1
and at the batch given; where it declines (a DCD subclass that redefines forward is not folded),
there is no folded path to check. It returns the names of the checks it made. Where it can give each sample's kernels (`sample_kernels`), a warning says so when
they hardly differ between the samples (the comparison then proves little: give inputs that make
them differ). A difference raises AssertionError naming what differed and by how much, relative to
the reference's largest value.

A subclass that changes what the layer computes (a gate after it, say) must change
`reference_forward` to match; this check is how to find out that it has not.
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import Tensor, nn

__all__ = ["assert_close_relative", "check_operator", "compare_with_reference", "randomise"]


def randomise(module: nn.Module, seed: int = 0) -> nn.Module:
    """Give every parameter and batch-norm statistic of `module` random values (in place), so that
    no identity or zero hides a mistake; returns the module."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=generator, dtype=param.dtype) * 0.5)
        for sub in module.modules():
            if isinstance(sub, nn.modules.batchnorm._BatchNorm) and sub.running_mean is not None:
                sub.running_mean.copy_(torch.randn(sub.running_mean.shape, generator=generator))
                sub.running_var.copy_(torch.rand(sub.running_var.shape, generator=generator) + 0.5)
    return module


def assert_close_relative(actual: Tensor, expected: Tensor, rel: float = 1e-6, what: str = "outputs") -> None:
    """AssertionError unless the largest |actual - expected| is within `rel` of expected's largest |value|."""
    if actual.shape != expected.shape:
        raise AssertionError(f"{what}: shape {tuple(actual.shape)} against the reference's {tuple(expected.shape)}")
    scale = expected.abs().max().clamp_min(1e-12)
    error = float((actual - expected).abs().max() / scale)
    if not error <= rel:  # NaN fails too
        raise AssertionError(f"{what}: relative error {error:.3e} > {rel} against the reference")


def compare_with_reference(module: nn.Module, x: Tensor, training: bool, rel: float = 1e-6,
                           distinct_kernels: bool = False) -> None:
    """module.forward == module.reference_forward on `x` in the given mode: outputs, the gradient of
    `x` and that of every parameter (one backward of a fixed random weighting of the output).
    Samples' kernels that hardly differ get a warning, or with `distinct_kernels` an AssertionError."""
    module.train(training)
    mode = "train" if training else "eval"
    weights = torch.randn(module(x.detach()).shape, dtype=x.dtype, generator=torch.Generator().manual_seed(1))
    weights = weights.to(x.device)
    results = []
    for path in (module.reference_forward, module.forward):
        module.zero_grad()
        given = x.detach().clone().requires_grad_(True)
        out = path(given)
        (out * weights).sum().backward()
        named = {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}
        results.append((out.detach(), given.grad.clone(), named))
    (expected, expected_input, expected_params), (out, input_grad, params) = results
    assert_close_relative(out, expected, rel, f"{mode} mode, outputs")
    sample = x if x.dim() == 4 else x[:, :, None, None]
    if hasattr(module, "sample_kernels") and x.shape[0] > 1:
        with torch.no_grad():
            kernels = module.sample_kernels(sample)[0]
        spread = (kernels - kernels.mean(dim=0, keepdim=True)).abs().max()
        if not spread > 1e-3 * kernels.abs().max():
            message = (f"{mode} mode: the samples' kernels differ by at most {float(spread):.1e}, so the comparison "
                       "proves little; give inputs that make them differ")
            if distinct_kernels:
                raise AssertionError(message)
            warnings.warn(f"check_operator: {message}", stacklevel=3)
    assert_close_relative(input_grad, expected_input, rel, f"{mode} mode, gradient of the input")
    if params.keys() != expected_params.keys():
        raise AssertionError(f"{mode} mode: gradients reach {sorted(params)}, the reference's {sorted(expected_params)}")
    for name, grad in expected_params.items():
        assert_close_relative(params[name], grad, rel, f"{mode} mode, gradient of {name}")


def check_operator(module: nn.Module, x: Tensor, rel: float = 1e-6, seed: int = 0,
                   distinct_kernels: bool = False) -> list[str]:
    """Hold `module`'s fast path to its reference_forward on input `x` (a batch of at least two
    samples): a float64 copy with random parameters, train and eval mode, outputs and gradients,
    and the folded inference path where the operator folds. `module` itself is left as it was.
    Returns what was checked, e.g. ["train mode", "eval mode", "folded inference at batch 1",
    "folded inference at batch 3"]: no "folded" entries where the operator has no fold or
    declines it (fold_for_inference() returning False). Samples' kernels that hardly differ get a
    warning, or with `distinct_kernels` an AssertionError."""
    if not callable(getattr(module, "reference_forward", None)):
        raise TypeError(f"check_operator: {type(module).__name__} has no reference_forward to hold its forward to; "
                        "give it one that forms every sample's kernel and runs a plain convolution with it")
    if x.shape[0] < 2:
        raise ValueError(f"check_operator: x has {x.shape[0]} sample; give at least 2, so that kernels can differ")
    copied = randomise(copy.deepcopy(module).double(), seed)
    x = x.double()
    checked = []
    for training in (True, False):
        compare_with_reference(copied, x, training, rel, distinct_kernels)
        checked.append("train mode" if training else "eval mode")
    if callable(getattr(copied, "fold_for_inference", None)):
        copied.eval()
        if copied.fold_for_inference() is not False:
            with torch.no_grad():
                for batch in (x[:1], x):
                    what = f"folded inference at batch {batch.shape[0]}"
                    assert_close_relative(copied(batch), copied.reference_forward(batch), rel, f"{what}, outputs")
                    checked.append(what)
    return checked
