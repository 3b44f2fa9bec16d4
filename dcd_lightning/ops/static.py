"""Static convolution and linear classifier: the baselines every dynamic operator is measured against."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from . import _folded, _native
from ._common import check_conv_args, check_input, check_int, check_odd_kernel


class StaticConv2d(nn.Conv2d):
    """Ordinary k x k convolution with "same" padding; state-dict keys equal nn.Conv2d's."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 1,
        stride: int = 1,
        groups: int = 1,
        bias: bool = False,
        padding: int | None = None,
    ) -> None:
        name = type(self).__name__
        check_conv_args(name, in_channels, out_channels, kernel_size, stride, groups)
        if padding is None:  # "same" padding (an even kernel needs an explicit padding)
            check_odd_kernel(name, kernel_size, "same padding (padding=None)")
            padding = kernel_size // 2
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=bias
        )

    def forward(self, x: Tensor) -> Tensor:
        """Convolve `x` of shape (N, in_channels, H, W)."""
        check_input(type(self).__name__, x, 4, self.in_channels)
        return super().forward(x)


def one_cpu_sample(x: Tensor, rank: int, channels: int, weight: Tensor, bias: Tensor | None) -> bool:
    """True for one contiguous sample of this rank and channel count, with no gradient to record,
    outside torch.compile, tracing and autocast, where it, a contiguous weight and the bias (if any) are CPU
    tensors of one dtype: where the C kernel's routes apply."""
    return (
        not torch.is_grad_enabled()
        and x.dim() == rank
        and x.shape[0] == 1
        and x.shape[1] == channels
        and x.device.type == weight.device.type == "cpu"
        and x.dtype == weight.dtype
        and x.is_contiguous()
        and weight.is_contiguous()
        and (bias is None or (bias.device.type == "cpu" and bias.dtype == x.dtype and bias.is_contiguous()))
        and not torch.compiler.is_compiling()
        and not torch.jit.is_tracing()
        and not torch.is_autocast_enabled("cpu")  # autocast computes in bf16: PyTorch's convolution
    )


class InferenceConv1x1(StaticConv2d):
    """A 1x1, stride-1 convolution for inference, computed as DCD's whole 1x1 layers compute theirs.

    optimize_for_inference puts it in place of its copy's plain 1x1, stride-1 convolutions (static
    models' and the static layers of dynamic ones), sharing their parameters. One sample on the CPU,
    with no gradient to record, goes through the C kernel's blocked product (dcd_conv_1x1 in
    ops/_native.c) where _folded.whole_in_c sends a DCD layer of the same size: the product that a
    folded DCD layer of that size uses for its own convolution. A DCD model and its static baseline
    then compute such layers alike, where before a DCD layer's product could be faster or slower
    than the static layer's PyTorch convolution of the same size. On an AVX2 CPU (one thread) a
    static MobileNetV2 took 0.96-0.99 of its time with them. Everywhere else (batches, gradients,
    other layouts, tracing, torch.compile, export, no C compiler) it is StaticConv2d's forward.
    """

    @staticmethod
    def covers(conv: nn.Conv2d) -> bool:
        """Whether `conv` is a 1x1, stride-1, unpadded, ungrouped convolution (what from_conv takes)."""
        return (
            conv.kernel_size == (1, 1)
            and conv.stride == (1, 1)
            and conv.groups == 1
            and conv.padding in ((0, 0), "valid")
        )

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> InferenceConv1x1:
        """The same layer as `conv` (a 1x1, stride-1, unpadded, ungrouped convolution), its
        parameters shared."""
        if not cls.covers(conv):
            raise ValueError(f"InferenceConv1x1: {conv} is not a 1x1, stride-1, unpadded, ungrouped convolution")
        layer = cls(conv.in_channels, conv.out_channels, bias=conv.bias is not None)
        layer.weight, layer.bias = conv.weight, conv.bias
        layer.train(conv.training)
        return layer

    def __init__(self, in_channels: int, out_channels: int, bias: bool = False) -> None:
        super().__init__(in_channels, out_channels, kernel_size=1, bias=bias)
        self.plans: dict[tuple[int, int, torch.dtype], object] = {}  # the C product, or None, per input

    def __getstate__(self) -> dict:
        """Copies and pickles plan anew (the plans hold the C kernel's functions)."""
        state = self.__dict__.copy()
        state["plans"] = {}
        return state

    def forward(self, x: Tensor) -> Tensor:
        """Convolve `x` of shape (N, in_channels, H, W)."""
        if one_cpu_sample(x, 4, self.in_channels, self.weight, self.bias):
            key = (x.shape[2], x.shape[3], x.dtype)
            if key in self.plans:
                function = self.plans[key]
            else:  # made at the first call with that input, for the PyTorch threads then (as DCD's plans)
                function = self.plans[key] = self._plan(*key)
            if function is not None:
                h, w = key[:2]
                out = x.new_empty(1, self.out_channels, h, w)
                bias = None if self.bias is None else self.bias.data_ptr()
                status = function(
                    self.weight.data_ptr(), bias, x.data_ptr(), self.out_channels, self.in_channels, h * w, out.data_ptr()
                )
                if status:
                    _native.check(status)
                return out
        return super().forward(x)

    def _plan(self, height: int, width: int, dtype: torch.dtype) -> object:
        """The C product for an input of this size and dtype, or None where PyTorch's convolution runs."""
        if not _folded.whole_in_c(self.out_channels, self.in_channels, height, width, dtype.itemsize):
            return None
        return _native.conv_1x1(dtype)


class StaticLinear(nn.Linear):
    """Ordinary linear classifier; state-dict keys equal nn.Linear's."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        check_int(type(self).__name__, "in_features", in_features)
        check_int(type(self).__name__, "out_features", out_features)
        super().__init__(in_features, out_features, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        """Map `x` of shape (N, in_features) to (N, out_features)."""
        check_input(type(self).__name__, x, 2, self.in_features)
        return super().forward(x)


class InferenceLinear(StaticLinear):
    """A linear layer for inference, computed as a folded DCD classifier computes its W0' x.

    optimize_for_inference puts it in place of its copy's plain linear layers, sharing their
    parameters. One sample on the CPU, with no gradient to record, goes through the C kernel's
    matrix-vector product (dcd_linear in ops/_native.c), the one a folded DCD classifier uses for
    its static part, wherever the C kernel is built, as for those. With cold weights on an AVX2 CPU
    it took 435 us for 1280 -> 1000 against PyTorch's 539. Everywhere else (batches, gradients,
    other layouts, tracing, torch.compile, export, no C compiler) it is StaticLinear's forward.
    """

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> InferenceLinear:
        """The same layer as `linear`, its parameters shared."""
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None)
        layer.weight, layer.bias = linear.weight, linear.bias
        layer.train(linear.training)
        return layer

    def forward(self, x: Tensor) -> Tensor:
        """Map `x` of shape (N, in_features) to (N, out_features)."""
        if one_cpu_sample(x, 2, self.in_features, self.weight, self.bias):
            function = _native.linear(x.dtype)
            if function is not None:
                out = x.new_empty(1, self.out_features)
                bias = None if self.bias is None else self.bias.data_ptr()
                function(self.weight.data_ptr(), bias, x.data_ptr(), self.out_features, self.in_features, out.data_ptr())
                return out
        return super().forward(x)
