"""DCD with the structure of the official release (github liyunsheng13/dcd), as presets.

The release differs from the paper's formulation (docs/paper-vs-release.md lists every difference):
its dynamic branch is FC -> small squeeze-and-excitation gate -> heads, its gates are hard sigmoids
with range [0, 2], the latent space has batch norms with an identity path around Phi, expanding
layers pool the input to 2x2 for the branch, and L and the branch width follow rules of its own.
"""

from __future__ import annotations

import math
from typing import Literal

from ._common import Route, check_int, check_positive, scale_latent, scaled_latent
from .dcd_conv import DCDConv2d
from .dcd_linear import DCDLinear

ReleaseLayout = Literal["mobilenetv2", "resnet_basic", "resnet_bottleneck"]


def release_sizes(
    in_channels: int, out_channels: int, layout: ReleaseLayout, fc_squeeze: int = 8, latent_mult: float = 1.0
) -> tuple[int, int, int]:
    """(latent dim L, branch width, pool size) that the release uses for a layer of this shape.

    mobilenetv2: DYModule; resnet_basic: the 3x3 convs of BasicBlock (conv_basic_dy);
    resnet_bottleneck: the convs of Bottleneck (conv_dy). `fc_squeeze` only applies to mobilenetv2.
    The release computes the branch width from L, so a `latent_mult` (Table 2) scales L first and
    the width follows it; this is what reproduces Table 2's parameter counts (2.57M / 2.45M / 2.37M
    against the paper's 2.6M / 2.5M / 2.4M; keeping the unscaled L's width gives 2.70M / 2.57M /
    2.48M).
    """
    check_int("release_sizes", "fc_squeeze", fc_squeeze)
    if layout == "mobilenetv2":
        expanding = in_channels < out_channels
        mult, reduction, pool = (4, 8, 2) if expanding else (1, 2, 1)
        features, squeeze, least = in_channels * mult, fc_squeeze, 4
        latent = min(features // reduction, out_channels // reduction)
        while latent**2 > features * 2:
            reduction *= 2
            latent = min(features // reduction, out_channels // reduction)
        latent = max(latent, 4)
    elif layout == "resnet_basic":
        features, squeeze, least, pool = in_channels * 4, 16, 4, 2
        latent = int(math.sqrt(features))
    elif layout == "resnet_bottleneck":
        features, squeeze, least, pool = in_channels, 16, 1, 1
        latent = int(math.sqrt(in_channels))
    else:
        raise ValueError(
            f"release_sizes: layout={layout!r} is not allowed; "
            "expected one of ['mobilenetv2', 'resnet_basic', 'resnet_bottleneck']"
        )
    if latent_mult != 1.0:
        latent = scale_latent(latent, latent_mult)
    return latent, max(max(features, latent**2) // squeeze, least), pool


class DCDReleaseConv2d(DCDConv2d):
    """DCDConv2d configured as the official release builds the layer (channel fusion alone).

    The ablation switches of the paper (Tables 1-3) apply on top of the release's structure:
    `channel_attention`, `channel_fusion`, `latent_mult` (scales the release's L, and the branch
    width computed from it) and `num_blocks` (B blocks, each with the L the release's rule gives a
    C_in/B -> C_out/B layer); `pool_size` replaces the release's choice of branch pooling.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 1,
        stride: int = 1,
        groups: int = 1,
        *,
        layout: ReleaseLayout = "mobilenetv2",
        fc_squeeze: int = 8,
        channel_attention: bool = True,
        channel_fusion: bool = True,
        latent_mult: float = 1.0,
        num_blocks: int = 1,
        pool_size: int | None = None,
        route: Route = "auto",
    ) -> None:
        name = type(self).__name__
        check_positive(name, "latent_mult", latent_mult)
        check_int(name, "num_blocks", num_blocks)
        check_int(name, "fc_squeeze", fc_squeeze)
        if pool_size is not None:
            check_int(name, "pool_size", pool_size)
        _, hidden, pool = release_sizes(in_channels, out_channels, layout, fc_squeeze, latent_mult)
        if in_channels % num_blocks or out_channels % num_blocks:
            raise ValueError(
                f"{name}: num_blocks={num_blocks} must divide in_channels={in_channels} and "
                f"out_channels={out_channels}; choose a common divisor"
            )
        # each diagonal block is sized as a layer of its own (C_in / B -> C_out / B)
        block_latent = release_sizes(in_channels // num_blocks, out_channels // num_blocks, layout, fc_squeeze)[0]
        wider = max(in_channels, out_channels) // num_blocks
        per_block = " per block" if num_blocks > 1 else ""
        latent = scaled_latent(name, block_latent, latent_mult, wider, f"the wider side's channels{per_block}")
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride,
            groups,
            channel_attention=channel_attention,
            channel_fusion=channel_fusion,
            num_blocks=num_blocks,
            latent_dim=latent,
            branch_hidden=hidden,
            pool_size=pool if pool_size is None else pool_size,
            gate="hard_sigmoid",
            squeeze_excite=True,
            latent_norm=True,
            route=route,
        )
        self.layout = layout


class DCDReleaseLinear(DCDLinear):
    """DCDLinear configured as the release's dynamic classifier (DYCls: L = 32, branch width 32)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        latent_dim: int = 32,
        branch_hidden: int = 32,
        channel_attention: bool = True,
        channel_fusion: bool = True,
    ) -> None:
        super().__init__(
            in_features,
            out_features,
            latent_dim=latent_dim,
            branch_hidden=branch_hidden,
            channel_attention=channel_attention,
            channel_fusion=channel_fusion,
            gate="hard_sigmoid",
            squeeze_excite=True,
            latent_norm=True,
            bias=True,
        )
