"""DCD of a k x k depthwise convolution (Eq. 8): W(x) = Lambda(x) W0 + P Phi(x) R^T."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._branch import DynamicBranch
from ._common import (
    Gate,
    check_choice,
    check_input,
    check_int,
    check_odd_kernel,
    check_positive,
    exporting,
    grouped_sample_conv,
    init_fan_out,
    linear_madds,
    output_size,
    per_sample_conv,
    pool_input,
    reshape_dims,
    scaled_latent,
)


class DCDDepthwiseConv2d(nn.Module):
    """Depthwise DCD: W0 and W(x) are C x k^2, R (k^2 x L_k) squeezes kernel elements, Phi(x) is
    L_k x L_k and fuses latent kernel elements (not channels), P is C x L_k.

    route="kernel" forms each sample's depthwise kernel (C x k^2 numbers, as cheap as W0 itself)
    and runs one grouped convolution over the batch; route="activations" convolves with the L_k
    basis kernels of R and mixes the results, costing L_k times a depthwise convolution more.
    "auto" takes the kernel route, which is always the cheaper in MAdds.
    """

    madds_children: tuple[str, ...] = ("branch",)  # the children whose work madds() counts

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        groups: int | None = None,
        *,
        channel_attention: bool = True,
        channel_fusion: bool = True,
        kernel_latent_dim: int | None = None,
        latent_mult: float = 1.0,
        reduction: int = 16,
        branch_hidden: int | None = None,
        gate: Gate = "sigmoid",
        squeeze_excite: bool = False,
        pool_size: int = 1,
        route: str = "auto",
        bias: bool = False,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        check_int(name, "in_channels", in_channels)
        check_int(name, "kernel_size", kernel_size)
        check_int(name, "stride", stride)
        check_odd_kernel(name, kernel_size, "a depthwise convolution with same padding")
        if out_channels != in_channels or (groups is not None and groups != in_channels):
            raise ValueError(
                f"{name}: a depthwise convolution needs out_channels == groups == in_channels "
                f"(= {in_channels}), got out_channels={out_channels}, groups={groups}"
            )
        check_positive(name, "latent_mult", latent_mult)
        check_int(name, "reduction", reduction)
        check_int(name, "pool_size", pool_size)
        check_choice(name, "gate", gate, ("sigmoid", "hard_sigmoid"))
        check_choice(name, "route", route, ("auto", "activations", "kernel"))
        if not (channel_attention or channel_fusion):
            raise ValueError(
                f"{name}: channel_attention=False with channel_fusion=False is a static convolution; "
                "use StaticConv2d, or switch one of them on"
            )
        elements = kernel_size * kernel_size
        if kernel_size == 1 and channel_fusion:
            raise ValueError(
                f"{name}: kernel_size=1 leaves no kernel elements to fuse; use kernel_size >= 3"
            )
        self.in_channels = self.out_channels = self.groups = in_channels
        self.kernel_size = kernel_size
        self.stride = stride
        self.padding = kernel_size // 2
        self.pool_size = pool_size
        self.route = route
        self.channel_attention = channel_attention
        self.channel_fusion = channel_fusion
        self.kernel_latent_dim = 0
        if kernel_latent_dim is not None:
            check_int(name, "kernel_latent_dim", kernel_latent_dim)
        if channel_fusion:
            if kernel_latent_dim is None:
                kernel_latent_dim = scaled_latent(
                    name, elements // 2, latent_mult, elements - 1, "k^2 - 1, the kernel elements less one"
                )
            elif kernel_latent_dim >= elements:
                raise ValueError(
                    f"{name}: kernel_latent_dim={kernel_latent_dim} is not allowed; "
                    f"expected 1 <= L_k < k^2 = {elements}"
                )
            self.kernel_latent_dim = kernel_latent_dim
            self.expand = nn.Parameter(torch.empty(in_channels, self.kernel_latent_dim))
            self.kernel_basis = nn.Parameter(torch.empty(elements, self.kernel_latent_dim))
        self.weight = nn.Parameter(torch.empty(in_channels, 1, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.empty(in_channels)) if bias else None
        pooled = in_channels * pool_size * pool_size
        self.branch = DynamicBranch(
            pooled,
            branch_hidden or max(1, pooled // reduction),
            attention_size=in_channels if channel_attention else 0,
            fusion_size=self.kernel_latent_dim**2,
            gate_kind=gate,
            squeeze_excite=squeeze_excite,
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """W0 like a depthwise convolution of MobileNetV2 (Kaiming normal, fan-out); R with the
        default fan-in rule and P = 0, so the layer starts as Lambda(x) W0."""
        init_fan_out(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)
        if self.channel_fusion:
            nn.init.zeros_(self.expand)
            nn.init.kaiming_uniform_(self.kernel_basis, a=math.sqrt(5))

    def extra_repr(self) -> str:
        """Summarise the configuration for print(model)."""
        return (
            f"{self.in_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"channel_attention={self.channel_attention}, kernel_latent_dim={self.kernel_latent_dim}"
        )

    def coefficients(self, x: Tensor) -> tuple[Tensor | None, Tensor | None]:
        """Lambda(x) as (N, C) and Phi(x) as (N, L_k, L_k)."""
        lam, phi = self.branch(pool_input(x, self.pool_size))
        if phi is not None:
            phi = phi.view(reshape_dims(x)[0], self.kernel_latent_dim, self.kernel_latent_dim)
        return lam, phi

    def _residual_coefficients(self, phi: Tensor) -> Tensor:
        """P Phi(x): per sample and channel, the weight of each of R's L_k basis kernels."""
        return torch.einsum("cm,nml->ncl", self.expand, phi)

    def sample_kernels(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """Each sample's depthwise kernel W(x) as (N, C, 1, k, k) and bias (N, C) or None."""
        lam, phi = self.coefficients(x)
        n, k = x.shape[0], self.kernel_size
        kernel = self.weight.unsqueeze(0).expand(n, -1, -1, -1, -1)
        if lam is not None:
            kernel = kernel * lam[:, :, None, None, None]
        if phi is not None:
            residual = torch.einsum("ncl,el->nce", self._residual_coefficients(phi), self.kernel_basis)
            kernel = kernel + residual.view(n, self.in_channels, 1, k, k)
        bias = None
        if self.bias is not None:
            bias = self.bias.expand(n, -1) if lam is None else lam * self.bias
        return kernel, bias

    def madds(self, height: int, width: int) -> int:
        """MAdds per sample for an input of height x width, the dynamic part at its cheaper route."""
        h_out, w_out = output_size(height, width, self.stride)
        pixels, area, kl, c = h_out * w_out, self.kernel_size**2, self.kernel_latent_dim, self.in_channels
        branch = linear_madds(self.branch)
        if self.channel_fusion:
            by_kernel = c * (kl * kl + kl * area + area)
            by_activations = c * kl * area * pixels + c * kl * kl + c * kl * pixels
            by_activations += c * pixels if self.channel_attention else 0  # Lambda on the output
            dynamic = min(by_kernel, by_activations)
        else:
            dynamic = min(c * area, c * pixels)
        return c * area * pixels + branch + dynamic

    def forward(self, x: Tensor) -> Tensor:
        """Apply the dynamic depthwise convolution to `x` of shape (N, C, H, W)."""
        check_input(type(self).__name__, x, 4, self.in_channels)
        n, c = x.shape[:2]
        if (self.route == "activations" and self.channel_fusion) or exporting():
            return self._forward_activations(x)
        kernels, bias = self.sample_kernels(x)
        return grouped_sample_conv(
            x,
            kernels.reshape(n * c, 1, self.kernel_size, self.kernel_size),
            None if bias is None else bias.reshape(-1),
            c,
            self.stride,
            self.padding,
            c,
        )

    def _forward_activations(self, x: Tensor) -> Tensor:
        """Static depthwise conv plus R's basis kernels applied to every channel, then mixed
        (no per-sample kernels, so no batch-dependent groups: also the route used for export)."""
        lam, phi = self.coefficients(x)
        n, c = reshape_dims(x)[0], self.in_channels
        k, kl = self.kernel_size, self.kernel_latent_dim
        out = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, groups=c)
        if lam is not None:
            out = out * lam.view(n, c, 1, 1)
        if phi is None:
            return out
        basis = self.kernel_basis.t().reshape(kl, 1, k, k).repeat(c, 1, 1, 1)
        u = F.conv2d(x, basis, stride=self.stride, padding=self.padding, groups=c)
        u = u.reshape(n, c, kl, *reshape_dims(out)[-2:])
        mix = self._residual_coefficients(phi)
        return out + (u * mix[:, :, :, None, None]).sum(dim=2)

    def reference_forward(self, x: Tensor) -> Tensor:
        """Slow reference: form each sample's kernel and run an ordinary depthwise convolution."""
        check_input(type(self).__name__, x, 4, self.in_channels)
        kernels, biases = self.sample_kernels(x)
        return per_sample_conv(x, kernels, biases, self.stride, self.padding, self.in_channels)
