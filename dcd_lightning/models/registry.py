"""Model registry in the timm manner: every model of the paper's tables by name.

    create_model("mobilenetv2_x0.5_dcd", num_classes=10)
    list_models("resnet*")

Each entry records the backbone, its arguments and one operator per placement, so the same
spec builds the model in Python and writes its LightningCLI config (configs/paper/).

Your own models register the same way, with the package's backbones and operators or your own
classes (README, "Your own operators and models"):

    register_model(ModelSpec("resnet18_mine", "resnet", (("depth", 18),),
                             (("conv", op(MyConv2d, reduction=8)),)))

A name "package.module:model" imports package.module first, so the command-line tools reach a
model that a module of yours registers on import.
"""

from __future__ import annotations

import difflib
import fnmatch
import importlib
import inspect
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from torch import nn

from .. import ops
from .mobilenetv2 import MobileNetV2
from .resnet import ResNet

BACKBONES: dict[str, type[nn.Module]] = {"mobilenetv2": MobileNetV2, "resnet": ResNet}


def _import_object(path: str, what: str) -> Any:
    """The object that the dotted `path` ("package.module.Name") names; ValueError otherwise."""
    module, _, attr = path.rpartition(".")
    if not module:
        raise ValueError(f"{what} {path!r} is not a dotted path such as 'package.module.Name'")
    try:
        return getattr(importlib.import_module(module), attr)
    except ImportError as error:
        raise ValueError(f"{what} {path!r}: cannot import {module!r} ({error})") from error
    except AttributeError as error:
        raise ValueError(f"{what} {path!r}: module {module!r} has no {attr!r}") from error


def _class_path(cls: type) -> str:
    """The dotted path a LightningCLI config names `cls` by (the package's own by their short path)."""
    if getattr(ops, cls.__name__, None) is cls:
        return f"dcd_lightning.ops.{cls.__name__}"
    if cls in BACKBONES.values():
        return f"dcd_lightning.models.{cls.__name__}"
    where = ("inside a function" if "<locals>" in cls.__qualname__
             else "in __main__ (a script or notebook)" if cls.__module__ == "__main__" else "")
    if where:
        raise ValueError(f"{cls.__qualname__} is defined {where}, so a config cannot name it by an importable "
                         f"class_path; define it at the top level of a module (mypackage/ops.py, say) and import it "
                         "from there")
    return f"{cls.__module__}.{cls.__qualname__}"


@dataclass(frozen=True)
class OpSpec:
    """An operator with keyword options: a class of dcd_lightning.ops by name, a dotted path
    ("package.module.MyConv2d") or a class."""

    name: str | type[nn.Module]
    options: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        # resolve now, so that a wrong name or option fails where it is written
        cls = self.cls
        try:
            parameters = inspect.signature(cls).parameters
        except (TypeError, ValueError):  # no signature to read
            return
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
            unknown = [key for key, _ in self.options if key not in parameters]
            if unknown:
                near = {key: difflib.get_close_matches(key, list(parameters), n=1) for key in unknown}
                raise ValueError(f"op: {cls.__name__} takes no option {unknown} (closest: {near}); "
                                 f"its parameters are {list(parameters)}")

    @property
    def cls(self) -> type[nn.Module]:
        """The operator class."""
        if isinstance(self.name, type):
            found: Any = self.name
        elif "." in self.name:
            found = _import_object(self.name, "op:")
        elif isinstance(getattr(ops, self.name, None), type):
            found = getattr(ops, self.name)
        else:
            near = difflib.get_close_matches(self.name, ops.__all__, n=4, cutoff=0.5)
            raise ValueError(
                f"op: {self.name!r} is not an operator of dcd_lightning.ops (closest: {near}); give one of "
                f"{ops.__all__}, a dotted path such as 'mypackage.ops.MyConv2d', or the class itself"
            )
        if not (isinstance(found, type) and issubclass(found, nn.Module)):
            raise TypeError(f"op: {self.name!r} is {found!r}, not an nn.Module class")
        return found

    def factory(self) -> Any:
        """A callable taking the positional operator arguments."""
        return partial(self.cls, **dict(self.options)) if self.options else self.cls

    def config(self) -> dict[str, Any]:
        """class_path / init_args form for a LightningCLI config."""
        spec: dict[str, Any] = {"class_path": _class_path(self.cls)}
        if self.options:
            spec["init_args"] = dict(self.options)
        return spec


def op(name: str | type[nn.Module], **options: Any) -> OpSpec:
    """Shorthand for OpSpec(name, options)."""
    return OpSpec(name, tuple(sorted(options.items())))


@dataclass(frozen=True)
class ModelSpec:
    """A registered model: backbone, its arguments and its operators per placement.

    `backbone` is "mobilenetv2" or "resnet" (the package's), a dotted path or a class whose
    constructor takes the arguments and one operator factory per placement by keyword."""

    name: str
    backbone: str | type[nn.Module]
    args: tuple[tuple[str, Any], ...]
    operators: tuple[tuple[str, OpSpec], ...]
    description: str = ""
    paper: tuple[tuple[str, int], ...] = ()  # (table key in paper-tables.json, row index) pairs
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name or ":" in self.name:
            raise ValueError(f"ModelSpec: name must be a non-empty string without ':', not {self.name!r}")
        where = f"ModelSpec {self.name!r}"
        for placement, spec in self.operators:
            if not isinstance(spec, OpSpec):
                raise TypeError(f"{where}: operator {placement!r} is {spec!r}; write op(name_or_class, **options)")
        parameters = inspect.signature(self.backbone_cls).parameters
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
            names = [*(key for key, _ in self.args), *(placement for placement, _ in self.operators)]
            unknown = [key for key in names if key not in parameters]
            if unknown:
                raise ValueError(
                    f"{where}: {self.backbone_cls.__name__} takes no argument {unknown}; its arguments are {list(parameters)}"
                )

    @property
    def backbone_cls(self) -> type[nn.Module]:
        """The backbone class: MobileNetV2, ResNet or your own."""
        if isinstance(self.backbone, type):
            found: Any = self.backbone
        elif self.backbone in BACKBONES:
            found = BACKBONES[self.backbone]
        elif "." in self.backbone:
            found = _import_object(self.backbone, f"ModelSpec {self.name!r}: backbone")
        else:
            raise ValueError(
                f"ModelSpec {self.name!r}: backbone {self.backbone!r} is not one of {sorted(BACKBONES)}; give one of "
                "those, a dotted path such as 'mypackage.models.MyNet', or the class itself"
            )
        if not (isinstance(found, type) and issubclass(found, nn.Module)):
            raise TypeError(f"ModelSpec {self.name!r}: backbone {self.backbone!r} is {found!r}, not an nn.Module class")
        return found

    def build(self, **overrides: Any) -> nn.Module:
        """Instantiate the model; `overrides` replace backbone arguments (e.g. num_classes)."""
        kwargs = dict(self.args)
        kwargs.update({placement: spec.factory() for placement, spec in self.operators})
        kwargs.update(overrides)
        return self.backbone_cls(**kwargs)

    def backbone_config(self) -> dict[str, Any]:
        """The backbone as class_path / init_args (num_classes left to the data module)."""
        init_args: dict[str, Any] = dict(self.args)
        init_args.update({placement: spec.config() for placement, spec in self.operators})
        return {"class_path": _class_path(self.backbone_cls), "init_args": init_args}


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(spec: ModelSpec, replace: bool = False) -> ModelSpec:
    """Add `spec` to the registry under its name; `replace` lets it take the place of a model
    registered under that name before (a notebook cell or a module run again)."""
    if spec.name in _REGISTRY and not replace:
        raise ValueError(f"register_model: a model named {spec.name!r} is registered already; "
                         "pass replace=True to replace it")
    _REGISTRY[spec.name] = spec
    return spec


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching a shell-style `pattern`, sorted."""
    return sorted(name for name in _REGISTRY if fnmatch.fnmatch(name, pattern))


def get_model_spec(name: str) -> ModelSpec:
    """The spec registered as `name`; "package.module:model" imports package.module first (where
    model registers itself). A ValueError lists close names when there is none."""
    if name not in _REGISTRY and ":" in name:
        module, _, name = name.partition(":")
        try:
            importlib.import_module(module)
        except ImportError as error:
            raise ValueError(f"create_model: cannot import {module!r} for model {name!r} ({error})") from error
    if name not in _REGISTRY:
        near = difflib.get_close_matches(name, list(_REGISTRY), n=6, cutoff=0.5)
        raise ValueError(
            f"create_model: no model named {name!r}; closest registered names: {near} "
            "(dcd_lightning.list_models() lists all; \"package.module:name\" imports the module that registers name)"
        )
    return _REGISTRY[name]


def create_model(name: str, **overrides: Any) -> nn.Module:
    """Build the registered model `name`; keyword overrides replace its backbone arguments."""
    return get_model_spec(name).build(**overrides)


# -- the paper's models ------------------------------------------------------------------------

STATIC_CONV = op("StaticConv2d")
STATIC_LINEAR = op("StaticLinear")
# MobileNetV2 recipe (Section 5): r = 16 for x1.0, 8 for smaller widths; the release's fc_squeeze
# plays r's role in its branch (16 in its x1.0 commands, 8 by default).
SQUEEZE = {1.0: 16, 0.5: 8, 0.35: 8}
WIDTH_NAME = {1.0: "x1.0", 0.5: "x0.5", 0.35: "x0.35"}


def _mobilenetv2(
    width: float, suffix: str, description: str, paper: tuple[tuple[str, int], ...], *,
    pointwise: OpSpec = STATIC_CONV, depthwise: OpSpec = STATIC_CONV, classifier: OpSpec = STATIC_LINEAR,
    all_pointwise: bool = False,
) -> ModelSpec:
    args: tuple[tuple[str, Any], ...] = (("width_mult", width), ("dropout", 0.1))
    if all_pointwise:
        args += (("dynamic_first_block", True), ("dynamic_last_conv", True))
    return register_model(
        ModelSpec(
            name=f"mobilenetv2_{WIDTH_NAME[width]}_{suffix}",
            backbone="mobilenetv2",
            args=args,
            operators=(("pointwise", pointwise), ("depthwise", depthwise), ("classifier", classifier)),
            description=description,
            paper=paper,
        )
    )


def _resnet(depth: int, suffix: str, description: str, paper: tuple[tuple[str, int], ...], *,
            conv: OpSpec = STATIC_CONV, classifier: OpSpec = STATIC_LINEAR) -> ModelSpec:
    return register_model(
        ModelSpec(
            name=f"resnet{depth}_{suffix}",
            backbone="resnet",
            args=(("depth", depth), ("dropout", 0.1 if depth == 50 else 0.0)),
            operators=(("conv", conv), ("classifier", classifier)),
            description=description,
            paper=paper,
        )
    )


def _dcd_pw(width: float, **options: Any) -> OpSpec:
    return op("DCDReleaseConv2d", layout="mobilenetv2", fc_squeeze=SQUEEZE[width], **options)


def _dcd_dw(width: float) -> OpSpec:
    # The release has no depthwise DCD; its branch style (SE gate, hard sigmoid) with r as above.
    return op("DCDDepthwiseConv2d", reduction=SQUEEZE[width], squeeze_excite=True, gate="hard_sigmoid")


DCD_CLS = op("DCDReleaseLinear")


def _register_paper_models() -> None:
    t4a = {(r["width"], r["model"]): i for i, r in enumerate(_rows("table4a_mobilenetv2"))}
    t4b = {(r["depth"], r["model"]): i for i, r in enumerate(_rows("table4b_resnet"))}
    for width in (1.0, 0.5, 0.35):
        k = SQUEEZE[width]
        static_rows = [("table4a_mobilenetv2", t4a[(width, "static")])]
        if width == 0.5:
            static_rows += [("table1a_mobilenetv2_x0.5_formulations", 0), ("table2_mobilenetv2_x0.5_latent_multiplier", 0),
                            ("table3a_mobilenetv2_x0.5_blocks", 0), ("table3b_mobilenetv2_x0.5_placement", 0)]
        _mobilenetv2(width, "static", "static MobileNetV2", tuple(static_rows))
        _mobilenetv2(
            width, "dyconv", "DY-Conv (K=4) on every convolution but the stem, the first block's projection and the "
            "last 1x1 convolution; static classifier",
            (("table4a_mobilenetv2", t4a[(width, "DY-Conv")]),),
            pointwise=op("DyConv2d", num_kernels=4), depthwise=op("DyConv2d", num_kernels=4),
        )
        if (width, "CondConv") in t4a:
            _mobilenetv2(
                width, "condconv", "CondConv (K=8) on every convolution but the stem, and the classifier",
                (("table4a_mobilenetv2", t4a[(width, "CondConv")]),),
                pointwise=op("CondConv2d", num_experts=8), depthwise=op("CondConv2d", num_experts=8),
                classifier=op("CondLinear", num_experts=8), all_pointwise=True,
            )
        dcd_rows = [("table4a_mobilenetv2", t4a[(width, "DCD")])]
        if width == 0.5:
            dcd_rows.append(("table3b_mobilenetv2_x0.5_placement", 6))
        _mobilenetv2(width, "dcd", "DCD on the pointwise convolutions and the classifier (Table 4)",
                     tuple(dcd_rows), pointwise=_dcd_pw(width), classifier=DCD_CLS)
        del k

    # Tables 1a, 2, 3a, 3b: MobileNetV2 x0.5
    w = 0.5
    _mobilenetv2(w, "dcd_pw", "Lambda W0 + P Phi Q^T on the pointwise convolutions (Tables 1a, 2, 3a, 3b)",
                 (("table1a_mobilenetv2_x0.5_formulations", 3), ("table2_mobilenetv2_x0.5_latent_multiplier", 4),
                  ("table3a_mobilenetv2_x0.5_blocks", 5), ("table3b_mobilenetv2_x0.5_placement", 2)),
                 pointwise=_dcd_pw(w))
    _mobilenetv2(w, "dcd_lambda_only", "Lambda W0 on the pointwise convolutions (Table 1a)",
                 (("table1a_mobilenetv2_x0.5_formulations", 1),), pointwise=_dcd_pw(w, channel_fusion=False))
    _mobilenetv2(w, "dcd_fusion_only", "W0 + P Phi Q^T on the pointwise convolutions (Tables 1a, 3a)",
                 (("table1a_mobilenetv2_x0.5_formulations", 2), ("table3a_mobilenetv2_x0.5_blocks", 1)),
                 pointwise=_dcd_pw(w, channel_attention=False))
    for index, mult in ((1, 0.25), (2, 0.5), (3, 0.75)):
        _mobilenetv2(w, f"dcd_pw_l{mult}", f"DCD on the pointwise convolutions, latent multiplier {mult} (Table 2)",
                     (("table2_mobilenetv2_x0.5_latent_multiplier", index),), pointwise=_dcd_pw(w, latent_mult=mult))
    for offset, blocks in ((0, 2), (1, 4), (2, 8)):
        _mobilenetv2(w, f"dcd_fusion_only_b{blocks}", f"W0 + P Phi Q^T with B={blocks} diagonal blocks (Table 3a)",
                     (("table3a_mobilenetv2_x0.5_blocks", 2 + offset),),
                     pointwise=_dcd_pw(w, channel_attention=False, num_blocks=blocks))
        _mobilenetv2(w, f"dcd_pw_b{blocks}", f"Lambda W0 + P Phi Q^T with B={blocks} diagonal blocks (Table 3a)",
                     (("table3a_mobilenetv2_x0.5_blocks", 6 + offset),), pointwise=_dcd_pw(w, num_blocks=blocks))
    placements = {  # Table 3b rows (pw + cls is mobilenetv2_x0.5_dcd, pw alone is dcd_pw)
        "dcd_dw": (1, True, False, False),
        "dcd_cls": (3, False, False, True),
        "dcd_dw_cls": (4, True, False, True),
        "dcd_dw_pw": (5, True, True, False),
        "dcd_dw_pw_cls": (7, True, True, True),
    }
    for suffix, (index, dw, pw, cls) in placements.items():
        _mobilenetv2(
            w, suffix, f"DCD at {'+'.join(p for p, on in (('DW', dw), ('PW', pw), ('CLS', cls)) if on)} (Table 3b)",
            (("table3b_mobilenetv2_x0.5_placement", index),),
            pointwise=_dcd_pw(w) if pw else STATIC_CONV, depthwise=_dcd_dw(w) if dw else STATIC_CONV,
            classifier=DCD_CLS if cls else STATIC_LINEAR,
        )

    # ResNets (Table 4b, Table 1b, the 3x3 extension)
    for depth in (10, 18, 50):
        layout = "resnet_bottleneck" if depth == 50 else "resnet_basic"
        rows = [("table4b_resnet", t4b[(depth, "static")])]
        if depth == 18:
            rows.append(("table1b_resnet18_formulations", 0))
        _resnet(depth, "static", "static ResNet", tuple(rows))
        rows = [("table4b_resnet", t4b[(depth, "DCD")])]
        if depth == 18:
            rows.append(("table1b_resnet18_formulations", 3))
        _resnet(depth, "dcd", "DCD (channel fusion alone) on every block convolution, and the classifier", tuple(rows),
                conv=op("DCDReleaseConv2d", layout=layout), classifier=DCD_CLS)
        if (depth, "DY-Conv") in t4b:
            _resnet(depth, "dyconv", "DY-Conv (K=4) on every block convolution; static classifier",
                    (("table4b_resnet", t4b[(depth, "DY-Conv")]),), conv=op("DyConv2d", num_kernels=4))
    # Table 1b's last row is Table 4's resnet18_dcd (73.1 in both), whose classifier is dynamic; the
    # other rows take their formulation there too, so that no Lambda-only row holds a P Phi Q^T
    _resnet(18, "dcd_lambda_only", "Lambda W0 on every block convolution and the classifier (Table 1b)",
            (("table1b_resnet18_formulations", 1),),
            conv=op("DCDReleaseConv2d", layout="resnet_basic", channel_fusion=False, pool_size=1),
            classifier=op("DCDReleaseLinear", channel_fusion=False))
    _resnet(18, "dcd_fusion_only", "W0 + P Phi Q^T on every block convolution and the classifier (Table 1b)",
            (("table1b_resnet18_formulations", 2),),
            conv=op("DCDReleaseConv2d", layout="resnet_basic", channel_attention=False),
            classifier=op("DCDReleaseLinear", channel_attention=False))
    # Section 5.2 compares joint fusion (71.3) with channel fusion alone (73.1, the release-structured
    # resnet18_dcd). The release has no joint fusion, so the joint model's block convolutions take the
    # paper's own form (Eq. 9, its defaults for L and L_k, the paper's branch); resnet18_dcd_channel is
    # channel fusion in that same form, so that the two differ in the fusion alone. Both keep
    # resnet18_dcd's classifier, the release's dynamic one.
    _resnet(18, "dcd_joint", "DCD by joint fusion of channels and kernel elements (Eq. 9; Section 5.2)", (),
            conv=op("DCDConv2d", fusion="joint"), classifier=DCD_CLS)
    _resnet(18, "dcd_channel", "DCD by channel fusion alone in the paper's form, resnet18_dcd_joint's counterpart "
            "(Section 5.2)", (), conv=op("DCDConv2d", fusion="channel"), classifier=DCD_CLS)


def _rows(key: str) -> list[dict[str, Any]]:
    from ..paper import paper_tables

    return paper_tables()[key]


_register_paper_models()
