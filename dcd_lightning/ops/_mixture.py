"""Shared machinery of vanilla dynamic convolution: W(x) = sum_k a_k(x) W_k over K kernels."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._common import (
    check_choice,
    check_conv_args,
    check_input,
    check_int,
    check_odd_kernel,
    exporting,
    grouped_sample_conv,
    in_layout_of,
    init_fan_out,
    linear_madds,
    output_size,
    per_sample_conv,
    reshape_dims,
)


class MixtureConv2d(nn.Module):
    """Base of CondConv2d and DyConv2d: K kernels mixed per sample by `mixture_weights(x)`.

    mixing="kernel" forms each sample's kernel sum_k a_k W_k and runs one grouped convolution over
    the batch; mixing="output" convolves with all K kernels and mixes the K outputs. "auto" takes
    the kernel route, which won every shape of the operator benchmark at batch 8 (docs/benchmarks.md),
    except on the CPU where the batch is at least K times the output's pixels (`prefers_output`).
    """

    num_kernels: int
    shift: Tensor | None
    madds_children: tuple[str, ...] = ()  # the children whose work madds() counts: the routing head

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int,
        groups: int,
        num_kernels: int,
        kernel_arg: str,
        mixing: str,
        bias: bool,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        check_conv_args(name, in_channels, out_channels, kernel_size, stride, groups)
        check_odd_kernel(name, kernel_size, "same padding")
        check_int(name, kernel_arg, num_kernels)
        check_choice(name, "mixing", mixing, ("auto", "kernel", "output"))
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.stride = stride
        self.padding = kernel_size // 2
        self.groups = groups
        self.num_kernels = num_kernels
        self.mixing = mixing
        # The K kernels stacked along dim 0, (K * C_out, C_in / groups, k, k): a 4-d bank converts
        # with model.to(memory_format=torch.channels_last); experts() gives the (K, C_out, ...) view.
        shape = (num_kernels * out_channels, in_channels // groups, kernel_size, kernel_size)
        self.weight = nn.Parameter(torch.empty(shape))
        self.bias = nn.Parameter(torch.empty(num_kernels, out_channels)) if bias else None
        # a static per-channel shift added after the mixture: set only where optimize_for_inference
        # folds the batch norm after a CondConv layer in (its sigmoid weights do not sum to 1, so
        # the norm's shift cannot go into the K biases as DY-Conv's does)
        self.register_buffer("shift", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise each of the K kernels as torchvision initialises a convolution (Kaiming, fan-out)."""
        for index in range(self.num_kernels):
            init_fan_out(self.experts().data[index])
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        """Summarise the configuration for print(model)."""
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, groups={self.groups}, K={self.num_kernels}"
        )

    def experts(self) -> Tensor:
        """The K kernels as (K, C_out, C_in / groups, k, k) (a view of the stacked weight)."""
        return self.weight.view(self.num_kernels, self.out_channels, *self.weight.shape[1:])

    def mixture_weights(self, x: Tensor) -> Tensor:
        """Per-sample weights of the K kernels, shape (N, K)."""
        raise NotImplementedError

    def madds(self, height: int, width: int) -> int:
        """MAdds per sample for an input of height x width, at the cheaper of the two mixings."""
        h_out, w_out = output_size(height, width, self.stride)
        kernel = self.weight.numel() // self.num_kernels
        static = kernel * h_out * w_out
        by_kernel = static + self.num_kernels * kernel
        by_output = self.num_kernels * (static + self.out_channels * h_out * w_out)
        branch = sum(linear_madds(getattr(self, name)) for name in self.madds_children)
        return min(by_kernel, by_output) + branch

    def forward(self, x: Tensor) -> Tensor:
        """Apply the dynamic convolution to `x` of shape (N, C_in, H, W)."""
        check_input(type(self).__name__, x, 4, self.in_channels)
        weights = self.mixture_weights(x)
        if (
            self.mixing == "output"
            or exporting()  # no batch-dependent groups in an exported graph
            or (self.mixing == "auto" and self.prefers_output(x))
        ):
            return self._forward_output_mixing(x, weights)
        return self._forward_kernel_mixing(x, weights)

    def prefers_output(self, x: Tensor) -> bool:
        """Whether mixing="auto" mixes the K outputs for this input: on the CPU, where the batch is
        at least K times the number of output pixels (small maps, large batches).

        The kernel route writes N kernels and runs a convolution of N groups, a cost that grows with
        the batch; the output route runs K convolutions, a cost that grows with the map. Measured on
        the CPU (docs/benchmarks.md): a 3x3 512 -> 512 layer at 1x1, batch 64, trained 14x faster by
        mixing outputs, a 1280 -> 1000 classifier at batch 32 3x faster (K = 8) and 11x (K = 4),
        128 -> 128 at 4x4, batch 64, 2.5-5x; no measured shape was slower under this rule. GPUs are
        not measured: they keep the kernel route.
        """
        if x.device.type != "cpu":
            return False
        h_out, w_out = output_size(x.shape[-2], x.shape[-1], self.stride)
        return x.shape[0] >= self.num_kernels * h_out * w_out

    def mixed_bias(self, weights: Tensor) -> Tensor | None:
        """Each sample's bias sum_k a_k b_k plus the static `shift`, (N, C_out); None without either."""
        bias = None if self.bias is None else weights @ self.bias
        if self.shift is not None:
            bias = self.shift.expand(weights.shape[0], -1) if bias is None else bias + self.shift
        return bias

    def _forward_kernel_mixing(self, x: Tensor, weights: Tensor) -> Tensor:
        n = x.shape[0]
        kernels = (weights @ self.weight.reshape(self.num_kernels, -1)).view(
            n * self.out_channels, self.in_channels // self.groups, self.kernel_size, self.kernel_size
        )
        bias = self.mixed_bias(weights)
        bias = None if bias is None else bias.reshape(-1)
        return grouped_sample_conv(x, kernels, bias, self.out_channels, self.stride, self.padding, self.groups)

    def _forward_output_mixing(self, x: Tensor, weights: Tensor) -> Tensor:
        n, groups, k = reshape_dims(x)[0], self.groups, self.num_kernels
        per_group = self.out_channels // groups
        # Order the stacked kernels (group, kernel, channel) so each group reads its own inputs.
        stacked = self.weight.view(k, groups, per_group, *self.weight.shape[1:]).transpose(0, 1)
        out = F.conv2d(
            x, stacked.reshape(groups * k * per_group, *self.weight.shape[1:]), None,
            self.stride, self.padding, groups=groups,
        )
        h, w = reshape_dims(out)[-2:]
        out = torch.einsum("ngkohw,nk->ngohw", out.view(n, groups, k, per_group, h, w), weights)
        out = out.reshape(n, self.out_channels, h, w)
        bias = self.mixed_bias(weights)
        if bias is not None:
            out = out + bias[:, :, None, None]
        return in_layout_of(out, x)

    def sample_kernels(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """Each sample's kernel sum_k a_k(x) W_k, (N, C_out, C_in/groups, k, k), and bias or None."""
        weights = self.mixture_weights(x)
        kernels = torch.einsum("nk,koihw->noihw", weights, self.experts())
        return kernels, self.mixed_bias(weights)

    def reference_forward(self, x: Tensor) -> Tensor:
        """Slow reference: form each sample's kernel and run an ordinary convolution with it."""
        check_input(type(self).__name__, x, 4, self.in_channels)
        kernels, biases = self.sample_kernels(x)
        return per_sample_conv(x, kernels, biases, self.stride, self.padding, self.groups)


class MixtureLinearMixin:
    """Turns a MixtureConv2d subclass into a classifier on (N, C) inputs (a 1x1 conv at 1x1)."""

    in_channels: int

    def forward(self, x: Tensor) -> Tensor:
        """Map `x` of shape (N, in_features) to (N, out_features)."""
        check_input(type(self).__name__, x, 2, self.in_channels)
        return super().forward(x[:, :, None, None]).flatten(1)  # type: ignore[misc]

    def reference_forward(self, x: Tensor) -> Tensor:
        """Slow reference: form each sample's matrix and apply it with a plain matmul."""
        check_input(type(self).__name__, x, 2, self.in_channels)
        kernels, biases = self.sample_kernels(x[:, :, None, None])  # type: ignore[attr-defined]
        out = torch.stack([kernels[i, :, :, 0, 0] @ x[i] for i in range(x.shape[0])])
        return out if biases is None else out + biases
