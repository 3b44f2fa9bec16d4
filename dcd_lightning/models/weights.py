"""Loading weights: torchvision state dicts (strict or as a warm start) and the official DCD release.

The official release (github liyunsheng13/dcd) publishes checkpoints of `mobilenetv2_dcd` (width
1.0) and `resnet50_dcd`. `load_official_checkpoint` maps their keys onto our models built with
DCDReleaseConv2d / DCDReleaseLinear, which compute the same function.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from .registry import create_model


@dataclass
class LoadReport:
    """What a non-strict load did: keys loaded, keys new to the model, keys that did not fit."""

    loaded: list[str] = field(default_factory=list)
    new: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line for logs."""
        return (f"loaded {len(self.loaded)} tensors; {len(self.new)} new to the model; "
                f"{len(self.mismatched)} of another shape; {len(self.unused)} unused")


WRAPPER_PREFIXES = ("module.", "model.")  # DDP / DataParallel; a LightningModule holding the backbone


def warm_start(model: nn.Module, state_dict: dict[str, Tensor]) -> LoadReport:
    """Load every tensor of `state_dict` whose key and shape the model has (e.g. W0 and the norms
    of a dynamic model from a torchvision static one) and report the rest.

    Keys that all carry a wrapper's prefix (`module.` from DDP, `model.` from a checkpoint of `fit`)
    are read without it. A state dict of which nothing fits raises a ValueError: a warm start that
    loads nothing is a mistake (another model, or a prefix of another kind)."""
    if not isinstance(state_dict, dict) or not all(isinstance(v, Tensor) for v in state_dict.values()):
        raise ValueError("warm_start: state_dict must be a dict of tensors (a checkpoint of fit holds one "
                         "under 'state_dict')")
    own = model.state_dict()
    while state_dict and not own.keys() & state_dict.keys():
        prefix = next((p for p in WRAPPER_PREFIXES if all(key.startswith(p) for key in state_dict)), None)
        if prefix is None:
            break
        state_dict = {key.removeprefix(prefix): value for key, value in state_dict.items()}
    report = LoadReport()
    usable = {}
    for key, value in state_dict.items():
        if key not in own:
            report.unused.append(key)
        elif own[key].shape != value.shape:
            report.mismatched.append(f"{key}: checkpoint {tuple(value.shape)}, model {tuple(own[key].shape)}")
        else:
            usable[key] = value
            report.loaded.append(key)
    report.new = [key for key in own if key not in state_dict]
    if not usable:
        model_key = next(iter(own), None)
        given_key = next(iter(state_dict), None)
        raise ValueError(
            f"warm_start: none of the state dict's {len(state_dict)} tensors fits the model by key and shape "
            f"(its keys look like {given_key!r}, the model's like {model_key!r}); give the weights of this "
            "backbone or of its static counterpart"
        )
    model.load_state_dict(usable, strict=False)
    return report


# -- the official release ---------------------------------------------------------------------

_DYNAMIC_PARTS = [  # release name inside a DCD layer -> ours
    (r"conv\.weight", "weight"),
    (r"cls\.(weight|bias)", r"\1"),
    (r"(?:conv_q|cls_q|q)\.weight", "compress"),
    (r"(?:conv_p|cls_p|p)\.weight", "expand"),
    (r"fc\.0\.weight", "branch.fc.weight"),
    (r"fc\.1\.fc\.0\.weight", "branch.se.weight"),
    (r"fc_phi\.weight", "branch.fusion.weight"),
    (r"fc_scale\.weight", "branch.attention.weight"),
    (r"bn1\.(\w+)", r"latent_norm_in.\1"),
    (r"bn2\.(\w+)", r"latent_norm_out.\1"),
]


def _map_dynamic(prefix: str, rest: str) -> str:
    for pattern, replacement in _DYNAMIC_PARTS:
        if re.fullmatch(pattern, rest):
            return f"{prefix}.{re.sub(pattern, replacement, rest)}"
    return f"{prefix}.{rest}"


def official_key(key: str, head: str = "classifier.1") -> str:
    """Our state-dict key for a key of the official release's MobileNetV2 / ResNet; `head` is our
    classifier's name ("classifier.1" in MobileNetV2, "fc" in ResNet)."""
    key = key.removeprefix("module.")
    match = re.match(r"features\.(\d+)\.conv\.(\d+)\.(.+)$", key)
    if match:  # inverted residual blocks
        block, index, rest = int(match[1]), int(match[2]), match[3]
        expand_first = block == 1
        if expand_first:  # t = 1: dw conv, bn, relu, pw conv, bn
            target = {0: "conv.0.0", 1: "conv.0.1", 3: "conv.1", 4: "conv.2"}[index]
        else:  # pw (DCD), bn, relu, dw, bn, relu, pw (DCD), bn
            target = {0: "conv.0.0", 1: "conv.0.1", 3: "conv.1.0", 4: "conv.1.1", 6: "conv.2", 7: "conv.3"}[index]
        prefix = f"features.{block}.{target}"
        if index in (0, 6) and not expand_first:
            return _map_dynamic(prefix, rest)
        return f"{prefix}.{rest}"
    match = re.match(r"conv\.(\d)\.(.+)$", key)
    if match:  # the last 1x1 conv of MobileNetV2
        return f"features.18.{match[1]}.{match[2]}"
    match = re.match(r"classifier\.\d\.(.+)$", key)
    if match:
        return _map_dynamic(head, match[1])
    match = re.match(r"(layer\d\.\d+\.conv\d)\.(.+)$", key)
    if match:  # ResNet block convolutions (all DCD in the release)
        return _map_dynamic(match[1], match[2])
    return key


def _candidates(keys: set[str]) -> list[str]:
    if any(k.startswith("features.") for k in keys):
        return ["mobilenetv2_x1.0_dcd", "mobilenetv2_x0.5_dcd", "mobilenetv2_x0.35_dcd"]
    if any(".conv3." in k for k in keys):
        return ["resnet50_dcd"]
    return ["resnet18_dcd", "resnet10_dcd"]


def checkpoint_model_weights(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """The backbone's weights in the state dict of a checkpoint of `fit` or `import-official`: its
    `model.*` entries without the prefix ({} where it has none)."""
    return {key.removeprefix("model."): value for key, value in state_dict.items() if key.startswith("model.")}


def read_official_state_dict(path: str | Path) -> dict[str, Tensor]:
    """The state dict of an official checkpoint file (with or without its `state_dict` wrapper)."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(checkpoint, dict) and "state_dict" in checkpoint:
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, dict) or not all(isinstance(v, Tensor) for v in checkpoint.values()):
        raise ValueError(f"load_official_checkpoint: {path} holds no state dict of tensors")
    return {key.removeprefix("module."): value for key, value in checkpoint.items()}


def convert_official_state_dict(state_dict: dict[str, Tensor]) -> tuple[str, nn.Module, dict[str, Tensor]]:
    """(registry name, model, our state dict) for an official state dict; ValueError when none fits."""
    if not any(re.search(r"(^|\.)(fc_phi|fc_scale)\.weight$", key) for key in state_dict):
        raise ValueError(
            "load_official_checkpoint: the checkpoint has no layer of the release's DCD (no fc_phi or fc_scale "
            "weights), so it is not one of its checkpoints. A torchvision state dict loads into a static model "
            "with load_state_dict, or into a dynamic one with dcd_lightning.models.warm_start; a checkpoint of "
            "fit needs no conversion (--ckpt_path, or --model.init_args.init_weights)"
        )
    best: tuple[int, str, list[str]] | None = None
    for name in _candidates(set(state_dict)):
        model = create_model(name, num_classes=_num_classes(state_dict))
        own = model.state_dict()
        head = "fc" if "fc.weight" in own else "classifier.1"
        mapped: dict[str, Tensor] = {}
        problems: list[str] = []
        for key, value in state_dict.items():
            ours = official_key(key, head)
            if ours not in own:
                problems.append(f"{key} (-> {ours}): not in {name}")
                continue
            if own[ours].numel() != value.numel():
                problems.append(f"{key}: shape {tuple(value.shape)}, {name} has {tuple(own[ours].shape)}")
                continue
            mapped[ours] = value.reshape(own[ours].shape)
        problems += [f"{key}: missing from the checkpoint" for key in own if key not in mapped]
        if not problems:
            return name, model, mapped
        if best is None or len(problems) < best[0]:
            best = (len(problems), name, problems)
    assert best is not None
    shown = "\n  ".join(best[2][:20])
    more = f"\n  ... and {len(best[2]) - 20} more" if len(best[2]) > 20 else ""
    raise ValueError(
        f"load_official_checkpoint: the checkpoint fits none of {_candidates(set(state_dict))}; "
        f"closest is {best[1]}, where these keys did not fit:\n  {shown}{more}"
    )


def _num_classes(state_dict: dict[str, Tensor]) -> int:
    for key, value in state_dict.items():
        if re.match(r"classifier\.\d\.cls\.bias$", key):
            return int(value.shape[0])
    return 1000


def load_official_checkpoint(path: str | Path) -> nn.Module:
    """A model of ours holding the weights of an official DCD checkpoint, in eval mode."""
    _, model, mapped = convert_official_state_dict(read_official_state_dict(path))
    model.load_state_dict(mapped, strict=True)
    return model.eval()
