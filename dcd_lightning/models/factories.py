"""The types of a backbone's operator parameters.

A backbone takes its operators as factories. Annotate each such parameter with one of these, so
that LightningCLI (jsonargparse) builds a `class_path` operator from YAML into a callable that
takes these arguments positionally or by keyword, with the config's `init_args` for the rest.
An unannotated parameter receives the config itself (a Namespace), and a Callable of fewer ints
takes no more positional arguments than it names.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator

from torch import nn

ConvFactory = Callable[[int, int, int, int, int], nn.Module]
"""(in_channels, out_channels, kernel_size, stride, groups) -> a convolution operator."""

LinearFactory = Callable[[int, int], nn.Module]
"""(in_features, out_features) -> a classifier operator."""


FACTORY_PARAMETERS = {"ConvFactory": ("in_channels", "out_channels", "kernel_size", "stride", "groups"),
                      "LinearFactory": ("in_features", "out_features")}


def positional_mismatch(cls: type) -> str | None:
    """Where an operator class takes one of a factory's arguments (by its name) at another place
    than the factory's: a backbone that calls it positionally, as a factory's arguments are given,
    hands that argument to another parameter without an error. A sentence saying so, else None."""
    try:
        parameters = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        return None
    positional = [name for name, p in parameters.items()
                  if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    for factory, order in FACTORY_PARAMETERS.items():
        for place, name in enumerate(order):
            if name in positional and positional.index(name) != place:
                taker = positional[place] if place < len(positional) else None
                given = f"to its parameter {taker!r}" if taker else "to none of its parameters"
                return (f"{cls.__qualname__} takes {name} as parameter {positional.index(name) + 1}, where "
                        f"{factory} {order} gives it as argument {place + 1}: a backbone that calls it positionally "
                        f"passes {name} {given}. Put {', '.join(order)} first, in that order")
    return None


def recording(factory: Callable[..., nn.Module], built: set[int]) -> Callable[..., nn.Module]:
    """`factory`, noting in `built` the id of every module it returns: a backbone's operators,
    which own_layers does not enter, whatever their class (an nn.Sequential included)."""

    def build(*args: object, **kwargs: object) -> nn.Module:
        module = factory(*args, **kwargs)
        built.add(id(module))
        return module

    return build


def own_layers(backbone: nn.Module, operators: set[int] | frozenset[int] = frozenset()) -> Iterator[nn.Module]:
    """The backbone's own layers, for its initialisation: every module reached through its structure
    (nn.Sequential and this package's model classes), not the layers inside the operators that its
    factories built (`operators`, ids noted by recording), which keep their own initialisation."""
    for child in backbone.children():
        yield child
        if id(child) in operators:
            continue
        if isinstance(child, (nn.Sequential, nn.ModuleList)) or type(child).__module__.startswith(__package__ or "-"):
            yield from own_layers(child, operators)
