"""Static convolution and linear classifier: the baselines every dynamic operator is measured against."""

from __future__ import annotations

from torch import Tensor, nn

from ._common import check_conv_args, check_input, check_int


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
        if padding is None:
            padding = kernel_size // 2
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=bias
        )

    def forward(self, x: Tensor) -> Tensor:
        """Convolve `x` of shape (N, in_channels, H, W)."""
        check_input(type(self).__name__, x, 4, self.in_channels)
        return super().forward(x)


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
