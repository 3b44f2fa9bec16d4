"""DY-Conv (Chen et al., 2020): K kernels mixed by a softmax attention with temperature."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ._common import check_int, check_positive, pool_input
from ._mixture import MixtureConv2d, MixtureLinearMixin


class DyConv2d(MixtureConv2d):
    """Dynamic convolution: W(x) = sum_k pi_k(x) W_k, pi = softmax(FC(ReLU(FC(GAP(x)))) / tau).

    `num_kernels` is K (4 in the paper's comparison); the temperature tau is a buffer, so it is
    saved in checkpoints and can be changed during training with `set_temperature` (the DY-Conv
    recipe anneals it from 30 to 1 over the first epochs).
    """

    temperature: Tensor
    madds_children = ("attention_fc1", "attention_fc2")

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 1,
        stride: int = 1,
        groups: int = 1,
        *,
        num_kernels: int = 4,
        reduction: int = 4,
        temperature: float = 1.0,
        mixing: str = "auto",
        bias: bool = False,
    ) -> None:
        super().__init__(
            in_channels, out_channels, kernel_size, stride, groups,
            num_kernels, "num_kernels", mixing, bias,
        )
        check_int(type(self).__name__, "reduction", reduction)
        check_positive(type(self).__name__, "temperature", temperature)
        hidden = max(1, in_channels // reduction)
        self.attention_fc1 = nn.Linear(in_channels, hidden)
        self.attention_fc2 = nn.Linear(hidden, num_kernels)
        self.register_buffer("temperature", torch.tensor(float(temperature)))

    def set_temperature(self, temperature: float) -> None:
        """Set the softmax temperature tau (> 0)."""
        check_positive(type(self).__name__, "temperature", temperature)
        self.temperature.fill_(float(temperature))

    def attention(self, x: Tensor) -> Tensor:
        """Attention over the K kernels, softmax(FC(ReLU(FC(GAP(x)))) / tau), shape (N, K)."""
        hidden = torch.relu(self.attention_fc1(pool_input(x, 1)))
        return torch.softmax(self.attention_fc2(hidden) / self.temperature, dim=1)

    def mixture_weights(self, x: Tensor) -> Tensor:
        """The attention pi(x)."""
        return self.attention(x)


class DyLinear(MixtureLinearMixin, DyConv2d):
    """DY-Conv classifier: W(x) = sum_k pi_k(x) W_k on inputs (N, in_features)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        num_kernels: int = 4,
        reduction: int = 4,
        temperature: float = 1.0,
        bias: bool = True,
    ) -> None:
        super().__init__(
            in_features, out_features, 1, 1, 1,
            num_kernels=num_kernels, reduction=reduction, temperature=temperature, bias=bias,
        )
        self.in_features, self.out_features = in_features, out_features
