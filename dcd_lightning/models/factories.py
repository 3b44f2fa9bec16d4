"""The types of a backbone's operator parameters.

A backbone takes its operators as factories. Annotate each such parameter with one of these, so
that LightningCLI (jsonargparse) builds a `class_path` operator from YAML into a callable that
takes these arguments positionally or by keyword, with the config's `init_args` for the rest.
An unannotated parameter receives the config itself (a Namespace), and a Callable of fewer ints
takes no more positional arguments than it names.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

ConvFactory = Callable[[int, int, int, int, int], nn.Module]
"""(in_channels, out_channels, kernel_size, stride, groups) -> a convolution operator."""

LinearFactory = Callable[[int, int], nn.Module]
"""(in_features, out_features) -> a classifier operator."""
