"""DCD of the linear classifier: a pointwise DCD at 1x1 resolution (Section 5.2, "CLS")."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ._common import Gate, LatentRule, check_input, check_int
from .dcd_conv import DCDConv2d


class DCDLinear(DCDConv2d):
    """Dynamic classifier y = (Lambda(x) W0 + P Phi(x) Q^T) x + Lambda(x) b on inputs (N, C_in).

    The dynamic branch reads the input vector itself (there is nothing to pool). W0 is stored as
    nn.Linear stores its weight, so a static classifier's state dict loads into it.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        channel_attention: bool = True,
        channel_fusion: bool = True,
        latent_mult: float = 1.0,
        latent_dim: int | None = None,
        latent_rule: LatentRule = "halving",
        reduction: int = 16,
        branch_hidden: int | None = None,
        gate: Gate = "sigmoid",
        squeeze_excite: bool = False,
        latent_norm: bool = False,
        bias: bool = True,
    ) -> None:
        check_int(type(self).__name__, "in_features", in_features)
        check_int(type(self).__name__, "out_features", out_features)
        super().__init__(
            in_features,
            out_features,
            1,
            1,
            1,
            channel_attention=channel_attention,
            channel_fusion=channel_fusion,
            latent_mult=latent_mult,
            latent_dim=latent_dim,
            latent_rule=latent_rule,
            reduction=reduction,
            branch_hidden=branch_hidden,
            gate=gate,
            squeeze_excite=squeeze_excite,
            latent_norm=latent_norm,
            route="activations",
            bias=bias,
        )
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(self.weight.detach().view(out_features, in_features).clone())
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """W0 and its bias as nn.Linear initialises them; Q and P as in DCDConv2d, except that with
        latent batch norms (the release's DYCls) they come from N(0, 0.01), so logits start small."""
        super().reset_parameters()
        if self.latent_norm_in is not None:  # the release's classifier: N(0, 0.01) for Q and P
            nn.init.normal_(self.compress, 0.0, 0.01)
            nn.init.normal_(self.expand, 0.0, 0.01)
        if self.weight.dim() == 2:  # after construction: W0 is the classifier's matrix
            nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
            if self.bias is not None:
                bound = 1 / math.sqrt(self.in_features)
                nn.init.uniform_(self.bias, -bound, bound)

    def _check_vector(self, x: Tensor) -> Tensor:
        check_input(type(self).__name__, x, 2, self.in_features)
        return x[:, :, None, None]

    def forward(self, x: Tensor) -> Tensor:
        """Classify `x` of shape (N, in_features) into (N, out_features)."""
        return super().forward(self._check_vector(x)).flatten(1)

    def reference_forward(self, x: Tensor) -> Tensor:
        """Slow reference: form each sample's matrix W(x) and apply it with a plain matmul."""
        x4 = self._check_vector(x)
        self._check(x4)
        kernels, biases = self.sample_kernels(x4)
        out = torch.stack([kernels[i, :, :, 0, 0] @ x[i] for i in range(x.shape[0])])
        return out if biases is None else out + biases
