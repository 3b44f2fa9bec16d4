"""Max pooling whose inference on the CPU runs in the C kernel of _native.c (the ResNet stem's)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _native

# the C kernel pools on one thread, PyTorch's kernel on all of PyTorch's threads: measured on one
# AVX2 core, PyTorch's took 19x the C kernel's time on the stem's map (9.4 ms against 0.49; 4.8 ms
# at two threads), so beyond about that many threads PyTorch's could be the faster
MAX_THREADS = 16


class MaxPool2d(nn.MaxPool2d):
    """nn.MaxPool2d, the same module (arguments, state dict, outputs), faster where no gradient is needed.

    For a contiguous (N, C, H, W) or (C, H, W) float tensor on the CPU, with no gradient to record,
    no dilation, no indices and outputs rounded down, it pools in one call of the C kernel of
    ops/_native.c. PyTorch's CPU kernel pools such a tensor with indices, in scalar loops: the
    ResNet stem's 64 x 112 x 112 map, 3 x 3 at stride 2, took it 9 ms of a static ResNet-18's
    70-80 at batch 1 on one thread of an AVX2 CPU (the C kernel: 0.4-0.5 ms). Everywhere else
    (gradients, other layouts, types or devices, more than MAX_THREADS PyTorch threads, tracing,
    torch.compile, export, no C compiler) it is nn.MaxPool2d's forward. Outputs are equal to
    PyTorch's, NaN included.
    """

    def forward(self, x: Tensor) -> Tensor:
        """Max-pool `x` of shape (N, C, H, W) or (C, H, W)."""
        if (
            x.device.type == "cpu"
            and not (torch.is_grad_enabled() and x.requires_grad)
            and not self.return_indices
            and not self.ceil_mode
            and x.dim() in (3, 4)
            and x.is_contiguous()
            and not torch.jit.is_tracing()
            and not torch.jit.is_scripting()
            and not torch.compiler.is_compiling()
            and torch.get_num_threads() <= MAX_THREADS
        ):
            sizes = self._native_sizes(x)
            function = _native.max_pool(x.dtype) if sizes is not None else None
            if function is not None:
                h, w, (kh, kw), (sh, sw), (ph, pw) = sizes
                out_h, out_w = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
                out = x.new_empty((*x.shape[:-2], out_h, out_w))
                planes = x.numel() // (h * w)
                _native.check(function(x.data_ptr(), planes, h, w, kh, kw, sh, sw, ph, pw, out.data_ptr()))
                return out
        return F.max_pool2d(
            x, self.kernel_size, self.stride, self.padding, self.dilation, self.ceil_mode, self.return_indices
        )

    def _native_sizes(self, x: Tensor) -> tuple[int, int, tuple[int, int], tuple[int, int], tuple[int, int]] | None:
        """(H, W, kernel, stride, padding) where the C kernel computes what PyTorch would, else None
        (PyTorch's forward then runs, and raises for arguments it does not allow)."""
        stride = self.stride
        if not isinstance(stride, int) and len(stride) == 0:  # PyTorch's "as the kernel"
            stride = self.kernel_size
        kernel, stride, padding, dilation = (pair(v) for v in (self.kernel_size, stride, self.padding, self.dilation))
        if kernel is None or stride is None or padding is None or dilation != (1, 1):
            return None
        h, w = x.shape[-2:]
        if (
            min(*kernel, *stride) < 1
            or min(padding) < 0
            or padding[0] > kernel[0] // 2
            or padding[1] > kernel[1] // 2
            or h + 2 * padding[0] < kernel[0]
            or w + 2 * padding[1] < kernel[1]
            or x.numel() == 0
        ):
            return None
        return h, w, kernel, stride, padding


def pair(value: object) -> tuple[int, int] | None:
    """A pooling argument in PyTorch's forms (an int, or one or two ints) as a pair, else None."""
    values = (value,) if isinstance(value, int) else tuple(value) if isinstance(value, (tuple, list)) else ()
    if len(values) not in (1, 2) or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return None
    return (values[0], values[-1])
