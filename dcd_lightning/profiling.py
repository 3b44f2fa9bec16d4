"""Parameters and multiply-adds (MAdds) of a model, per layer type, counted as the paper counts.

Counting rules (docs/profiling.md): convolutions and linear layers count C_out * C_in/groups * k^2
per output pixel; a dynamic operator counts its static kernel, its dynamic branch's linear layers,
and its dynamic part at the cheaper route (the operator's own `madds`; a layer that a subclass adds
to an operator counts in its own right); normalisation, activations,
pooling and additions are not counted. ResNet's parameters are counted without the final
classifier, MobileNetV2's with it (the paper's convention, see paper-tables.json's notes).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class LayerCount:
    """One counted layer: its name, its type label, parameters and MAdds per image."""

    name: str
    kind: str
    params: int
    madds: int


@dataclass
class Profile:
    """All counted layers of a model at one input size, with totals."""

    input_size: int
    layers: list[LayerCount] = field(default_factory=list)
    params: int = 0
    paper_params: int = 0
    classifier_params: int = 0

    @property
    def madds(self) -> int:
        """Total MAdds per image."""
        return sum(layer.madds for layer in self.layers)

    def by_kind(self) -> dict[str, tuple[int, int, int]]:
        """(count, params, MAdds) per layer type, in order of first appearance."""
        table: dict[str, tuple[int, int, int]] = OrderedDict()
        for layer in self.layers:
            count, params, madds = table.get(layer.kind, (0, 0, 0))
            table[layer.kind] = (count + 1, params + layer.params, madds + layer.madds)
        return table


def _kind(module: nn.Module) -> str:
    """Type label of a counted layer: class name, kernel size, and "depthwise" where it is."""
    name = type(module).__name__
    kernel = getattr(module, "kernel_size", None)
    kernel = kernel[0] if isinstance(kernel, tuple) else kernel
    if isinstance(module, nn.Linear) or hasattr(module, "in_features") or not isinstance(kernel, int):
        return name  # a classifier, or an operator of the user's that does not say its kernel size
    groups = getattr(module, "groups", 1)
    depthwise = " depthwise" if isinstance(groups, int) and groups > 1 and groups == getattr(module, "in_channels", None) else ""
    return f"{name} {kernel}x{kernel}{depthwise}"


def classifier_of(model: nn.Module) -> nn.Module | None:
    """The model's final classifier layer (ResNet's `fc`, MobileNetV2's `classifier[-1]`)."""
    if hasattr(model, "fc"):
        return model.fc
    head = getattr(model, "classifier", None)
    if isinstance(head, nn.Sequential):
        return head[-1]
    return head


def declared_input_channels(model: nn.Module) -> int | None:
    """The image channels a model says it takes: its `in_chans`, else the `in_channels` of its first
    module that has one (a dynamic operator's own, not that of a layer inside it), else None."""
    given = getattr(model, "in_chans", None)
    if isinstance(given, int):
        return given
    first = next((m for m in model.modules() if isinstance(getattr(m, "in_channels", None), int)), None)
    return first.in_channels if first is not None else None


def input_channels(model: nn.Module) -> int:
    """The image channels a model takes (declared_input_channels), 3 where it does not say."""
    declared = declared_input_channels(model)
    return 3 if declared is None else declared


def _counted_layers(module: nn.Module, prefix: str = "", seen: set[int] | None = None) -> list[tuple[str, nn.Module]]:
    """(name, module) of every layer whose MAdds are counted: modules with a `madds(height, width)`
    method and nn.Conv2d / nn.Linear. Inside a module with madds(), the children that its
    `madds_children` names are its own work; any other child (a subclass's addition) is counted in
    its own right. A madds() without `madds_children` counts everything inside it. An nn.Conv2d or
    nn.Linear owns none of its children, so a subclass's extra layer inside one is counted too."""
    seen = set() if seen is None else seen
    if id(module) in seen:
        return []
    seen.add(id(module))
    own: tuple[str, ...] | None = None
    if callable(getattr(module, "madds", None)):
        found, own = [(prefix, module)], getattr(module, "madds_children", None)
        if own is None:
            return found
    elif isinstance(module, (nn.Conv2d, nn.Linear)):
        found, own = [(prefix, module)], ()
    else:
        found = []
    for name, child in module.named_children():
        if own is None or name not in own:
            found += _counted_layers(child, f"{prefix}.{name}" if prefix else name, seen)
    return found


def profile_model(model: nn.Module, input_size: int = 224, in_chans: int | None = None) -> Profile:
    """Count parameters and per-image MAdds of every layer with one eval forward at batch 1."""
    counted = _counted_layers(model)
    shapes: dict[str, tuple[int, ...]] = {}
    hooks = [
        module.register_forward_hook(lambda mod, args, out, name=name: shapes.__setitem__(name, tuple(args[0].shape)))
        for name, module in counted
    ]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, in_chans or input_channels(model), input_size, input_size))
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    # a layer's parameters, less those of the layers inside it that are counted in their own right
    inside: dict[str, set[int]] = {name: set() for name, _ in counted}
    for name, module in counted:
        parts = name.split(".") if name else []
        ancestors = [".".join(parts[:i]) for i in range(len(parts))]
        for ancestor in (a for a in ancestors if a in inside):
            inside[ancestor].update(id(p) for p in module.parameters())
    profile = Profile(input_size)
    for name, module in counted:
        if name not in shapes:
            continue  # not on the forward path
        shape = shapes[name]
        if hasattr(module, "madds") and callable(module.madds):
            madds = module.madds(*shape[2:]) if len(shape) == 4 else module.madds(1, 1)
        elif isinstance(module, nn.Conv2d):
            h_out = (shape[2] + 2 * module.padding[0] - module.kernel_size[0]) // module.stride[0] + 1
            w_out = (shape[3] + 2 * module.padding[1] - module.kernel_size[1]) // module.stride[1] + 1
            madds = module.weight.numel() * h_out * w_out
        else:
            madds = module.in_features * module.out_features
        params = sum(p.numel() for p in module.parameters() if id(p) not in inside[name])
        profile.layers.append(LayerCount(name, _kind(module), params, madds))
    profile.params = sum(p.numel() for p in model.parameters())
    head = classifier_of(model)
    profile.classifier_params = sum(p.numel() for p in head.parameters()) if head is not None else 0
    excludes = getattr(model, "paper_counts_classifier", True) is False
    profile.paper_params = profile.params - (profile.classifier_params if excludes else 0)
    return profile
