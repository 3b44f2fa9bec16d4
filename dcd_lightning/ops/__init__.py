"""Pluggable convolution operators: static, CondConv, DY-Conv and every form of DCD.

Each operator's constructor begins (in_channels, out_channels, kernel_size, stride, groups) and
each dynamic one has a fast `forward` and a slow `reference_forward` that form every sample's
kernel explicitly; tests hold the two equal.
"""

from ._common import latent_dim_rule
from .condconv import CondConv2d, CondLinear
from .dcd_conv import DCDConv2d
from .dcd_depthwise import DCDDepthwiseConv2d
from .dcd_linear import DCDLinear
from .dcd_release import DCDReleaseConv2d, DCDReleaseLinear, release_sizes
from .dyconv import DyConv2d, DyLinear
from .static import StaticConv2d, StaticLinear

__all__ = [
    "CondConv2d",
    "CondLinear",
    "DCDConv2d",
    "DCDDepthwiseConv2d",
    "DCDLinear",
    "DCDReleaseConv2d",
    "DCDReleaseLinear",
    "DyConv2d",
    "DyLinear",
    "StaticConv2d",
    "StaticLinear",
    "latent_dim_rule",
    "release_sizes",
]
