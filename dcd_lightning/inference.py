"""`optimize_for_inference(model)`: an eval-mode copy of a model with its DCD layers' constants folded."""

from __future__ import annotations

import contextlib
import copy
import itertools
from collections.abc import Iterator

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from .ops._folded import share_version_counter


@torch.inference_mode(False)  # callable inside inference mode: the copy and folds are ordinary tensors
def optimize_for_inference(model: nn.Module, fold_batch_norms: bool = True, native: bool = True) -> nn.Module:
    """Return `model` for inference: eval mode, each DCD layer's eval-mode constants folded.

    Outputs are unchanged (to rounding). Each DCD layer's latent batch norms, gate range and the
    two heads of its dynamic branch are folded into a few tensors (see ops/_folded.py), which
    forward() uses under torch.no_grad() or torch.inference_mode(); one sample of a 1x1 layer runs
    as a few small matrix products and one convolution. With `fold_batch_norms` (default) every
    BatchNorm2d that directly follows a convolution is folded into it as well, in static
    convolutions (as torch.nn.utils.fusion does), DCD layers, DY-Conv and CondConv layers alike
    (CondConv's sigmoid weights do not sum to 1, so a norm's shift is added after its mixture rather
    than entering its K biases): consecutive entries of an
    nn.Sequential, and the convN / bnN pairs of the ResNet blocks known to apply bnN right after
    convN (this package's and torchvision's); another class's convN / bnN are left alone, as their
    order is unknown. That changes the model's structure, so the model is copied first and the
    argument is left as it was (with fold_batch_norms=False the argument itself is put in eval mode
    and returned). Call it again after changing the weights. The result is for inference only:
    .train() on it drops the DCD folds, but its folded batch norms stay folded and a training step
    through DCD layers that absorbed a batch norm fails in backward; train the original.

    With `native` (default), a folded layer given one sample on the CPU runs its branch and kernel
    formation in one call of a small C kernel (ops/_native.c, compiled on first use with the
    system's C compiler and cached; without a compiler, or with DCD_LIGHTNING_NATIVE=0, the layers
    use PyTorch calls, with the same results). Where the C kernel computes a DCD 1x1 layer's
    convolution itself, it computes a plain 1x1 convolution of the same size too, and a plain
    linear layer as a DCD classifier computes its W0' x: with both options (the default) the copy's
    plain 1x1, stride-1 convolutions and linear layers become InferenceConv1x1 and InferenceLinear
    (ops/static.py), so that a static model and its DCD model compute such layers alike.

    It may be called inside torch.inference_mode(): the copy and the folds are made as ordinary
    tensors either way (inference tensors have no version counter for the folds to watch).
    """
    if fold_batch_norms:
        model = copy.deepcopy(model).eval()
        for parent in list(model.modules()):
            for conv_name, norm_name in _conv_norm_pairs(parent):
                _fold_pair(parent, conv_name, norm_name)
        if native:
            _plain_layers_in_c(model)
    model.eval()
    for module in model.modules():
        fold = getattr(module, "fold_for_inference", None)
        if callable(fold):
            if fold_batch_norms:  # a copy of our own: one version counter per layer (see share_version_counter)
                share_version_counter(module, model)
            fold(native=native)
    return model


@torch.no_grad()
def calibrate_batch_norms(model: nn.Module, images: torch.Tensor) -> nn.Module:
    """Set every batch norm's running statistics to those of one batch, in place; returns `model`.

    A model fresh from its initializer holds mean 0 and variance 1, which makes a deep dynamic
    ResNet overflow in eval mode (an untrained DCD ResNet-18's activations grow layer by layer past
    1e11, then to inf and NaN); after one training-mode forward of `images` each norm holds that
    batch's statistics and the activations stay in range, as in a trained model. For timing and
    export checks of untrained models, not for a trained one (its statistics would be replaced).
    Weights, momentum and the model's training mode are left as they were.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    momenta = [norm.momentum for norm in norms]
    try:
        with kept_modes(model):
            for norm in norms:
                norm.reset_running_stats()
                norm.momentum = None  # a cumulative average: one batch sets the statistics
            model.train()(images)
    finally:
        for norm, momentum in zip(norms, momenta):
            norm.momentum = momentum
    return model


@contextlib.contextmanager
def kept_modes(model: nn.Module) -> Iterator[nn.Module]:
    """Inside, `model` may be put in train or eval mode; on leaving, every module is back in the
    mode it was in (each its own, where they differed)."""
    modes = [(module, module.training) for module in model.modules()]
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


def _plain_layers_in_c(model: nn.Module) -> None:
    """Replace every plain 1x1, stride-1, unpadded, ungrouped convolution inside `model` by an
    InferenceConv1x1, and every plain linear layer by an InferenceLinear, sharing their parameters:
    the model's own layers, not subclasses (whose forwards differ) and not the layers inside dynamic
    operators (those with a reference_forward: their branches and routing heads)."""
    from .ops import StaticConv2d, StaticLinear
    from .ops.static import InferenceConv1x1, InferenceLinear

    for name, child in list(model._modules.items()):
        if child is None or callable(getattr(child, "reference_forward", None)):
            continue
        if type(child) in (nn.Conv2d, StaticConv2d) and InferenceConv1x1.covers(child):
            model._modules[name] = InferenceConv1x1.from_conv(child)
        elif type(child) in (nn.Linear, StaticLinear):
            model._modules[name] = InferenceLinear.from_linear(child)
        else:
            _plain_layers_in_c(child)


def _blocks_with_named_pairs() -> tuple[type, ...]:
    """Module classes whose forward applies each bnN right after convN (theirs, as the code reads):
    this package's ResNets (stem and blocks) and torchvision's ResNet blocks. A name alone says
    nothing about the order (a pre-activation block runs bn1 before conv1), so no other class's
    convN / bnN are folded."""
    from .models.resnet import BasicBlock, Bottleneck, ResNet

    blocks: tuple[type, ...] = (BasicBlock, Bottleneck, ResNet)
    try:
        from torchvision.models import resnet as tv
    except ImportError:  # pragma: no cover - torchvision is a dependency
        return blocks
    return (*blocks, tv.BasicBlock, tv.Bottleneck, tv.ResNet)


def _conv_norm_pairs(parent: nn.Module) -> list[tuple[str, str]]:
    """(convolution, batch norm) child names that run one after the other: consecutive entries of
    an nn.Sequential, and the convN / bnN attributes of the ResNet blocks that run them in that order."""
    names = list(parent._modules)
    if isinstance(parent, nn.Sequential):
        return list(itertools.pairwise(names))
    if type(parent) not in _blocks_with_named_pairs():
        return []
    return [(name, "bn" + name[4:]) for name in names if name.startswith("conv") and "bn" + name[4:] in names]


def _fuse_mixture_bn(conv: nn.Module, norm: nn.BatchNorm2d) -> nn.Module:
    """A copy of a DY-Conv or CondConv layer with the eval-mode batch norm after it folded in: each
    of its K kernels and biases scaled per output channel. DY-Conv's softmax weights sum to 1, so
    the norm's shift goes into every bias (sum_k a_k (s b_k + t) = s sum_k a_k b_k + t); CondConv's
    sigmoid weights do not, so there it becomes the layer's static `shift`, added after the mixture."""
    from .ops import DyConv2d

    fused = copy.deepcopy(conv)
    scale = torch.rsqrt(norm.running_var + norm.eps)
    if norm.weight is not None:
        scale = scale * norm.weight
    shift = -norm.running_mean * scale + (norm.bias if norm.bias is not None else 0)
    scale, shift = scale.detach().to(fused.weight.dtype), shift.detach().to(fused.weight.dtype)
    with torch.no_grad():
        fused.experts().mul_(scale.view(1, -1, 1, 1, 1))
        if isinstance(conv, DyConv2d):
            bias = fused.bias if fused.bias is not None else fused.weight.new_zeros(conv.num_kernels, conv.out_channels)
            fused.bias = nn.Parameter(bias * scale + shift, requires_grad=False)
        else:
            if fused.bias is not None:
                fused.bias = nn.Parameter(fused.bias * scale, requires_grad=False)
            fused.shift = shift if fused.shift is None else fused.shift * scale + shift
    return fused


def _fold_pair(parent: nn.Module, conv_name: str, norm_name: str) -> None:
    from .ops import CondConv2d, DCDConv2d, DyConv2d, StaticConv2d

    conv, norm = parent._modules[conv_name], parent._modules[norm_name]
    if not isinstance(norm, nn.BatchNorm2d) or norm.running_mean is None:
        return
    if isinstance(conv, DCDConv2d) and conv.fusion == "channel" and conv.output_norm is None and not conv.redefined():
        conv.output_norm = norm  # the layer applies it, and its fold absorbs it
    elif type(conv) in (nn.Conv2d, StaticConv2d):  # plain convolutions (not subclasses with other forwards)
        parent._modules[conv_name] = fuse_conv_bn_eval(conv, norm)
    elif type(conv) in (DyConv2d, CondConv2d):  # not subclasses, whose forward may differ
        parent._modules[conv_name] = _fuse_mixture_bn(conv, norm)
    else:
        return
    parent._modules[norm_name] = nn.Identity()
