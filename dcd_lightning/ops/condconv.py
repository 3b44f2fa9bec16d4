"""CondConv (Yang et al., 2019): K experts mixed by sigmoid routing."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ._common import pool_input
from ._mixture import MixtureConv2d, MixtureLinearMixin


class CondConv2d(MixtureConv2d):
    """Conditionally parameterised convolution: W(x) = sum_k r_k(x) W_k, r = sigmoid(FC(GAP(x))).

    `num_experts` is the paper's K (8 in the DCD paper's comparison).
    """

    madds_children = ("routing",)

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 1,
        stride: int = 1,
        groups: int = 1,
        *,
        num_experts: int = 8,
        mixing: str = "auto",
        bias: bool = False,
    ) -> None:
        super().__init__(
            in_channels, out_channels, kernel_size, stride, groups,
            num_experts, "num_experts", mixing, bias,
        )
        self.routing = nn.Linear(in_channels, num_experts)

    def mixture_weights(self, x: Tensor) -> Tensor:
        """Routing weights sigmoid(FC(GAP(x))), shape (N, K)."""
        return torch.sigmoid(self.routing(pool_input(x, 1)))


class CondLinear(MixtureLinearMixin, CondConv2d):
    """CondConv classifier: W(x) = sum_k r_k(x) W_k on inputs (N, in_features)."""

    def __init__(self, in_features: int, out_features: int, *, num_experts: int = 8, bias: bool = True) -> None:
        super().__init__(in_features, out_features, 1, 1, 1, num_experts=num_experts, bias=bias)
        self.in_features, self.out_features = in_features, out_features
