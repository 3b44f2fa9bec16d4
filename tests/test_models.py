"""Backbones, the registry, weight loading (torchvision, official release) and paper configs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision

import dcd_lightning
from dcd_lightning.classifier import ImageClassifier
from dcd_lightning.import_official import lightning_checkpoint
from dcd_lightning.models import MobileNetV2, ResNet, create_model, list_models, warm_start
from dcd_lightning.ops import DCDReleaseConv2d, DyConv2d
from dcd_lightning.paper_configs import config_files
from dcd_lightning.profile_cmd import model_from_config

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).parent / "data"

TABLE4_NAMES = [
    *(f"mobilenetv2_x1.0_{op}" for op in ("static", "dyconv", "condconv", "dcd")),
    *(f"mobilenetv2_x0.5_{op}" for op in ("static", "dyconv", "condconv", "dcd")),
    *(f"mobilenetv2_x0.35_{op}" for op in ("static", "dyconv", "dcd")),
    *(f"resnet10_{op}" for op in ("static", "dyconv", "dcd")),
    *(f"resnet18_{op}" for op in ("static", "dyconv", "dcd")),
    "resnet50_static",
    "resnet50_dcd",
]


@pytest.mark.parametrize(
    "name,reference",
    [
        ("mobilenetv2_x1.0_static", lambda: torchvision.models.mobilenet_v2()),
        ("mobilenetv2_x0.5_static", lambda: torchvision.models.mobilenet_v2(width_mult=0.5)),
        ("mobilenetv2_x0.35_static", lambda: torchvision.models.mobilenet_v2(width_mult=0.35)),
        ("resnet18_static", lambda: torchvision.models.resnet18()),
        ("resnet50_static", lambda: torchvision.models.resnet50()),
    ],
)
def test_torchvision_weights_load_strict_and_give_identical_logits(name: str, reference) -> None:
    torch.manual_seed(0)
    theirs = reference().eval()
    ours = create_model(name).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(ours(x), theirs(x))


def test_resnet34_layout_matches_torchvision() -> None:
    ours, theirs = ResNet(depth=34), torchvision.models.resnet34()
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}


def test_warm_start_loads_static_parts_and_reports_new_keys() -> None:
    theirs = torchvision.models.mobilenet_v2(width_mult=0.5)
    ours = create_model("mobilenetv2_x0.5_dcd")
    report = warm_start(ours, theirs.state_dict())
    assert not report.unused and not report.mismatched
    assert "features.2.conv.0.0.weight" in report.loaded  # W0 of a DCD layer
    assert torch.equal(ours.features[2].conv[0][0].weight, theirs.features[2].conv[0][0].weight)
    assert "features.2.conv.0.0.compress" in report.new and "classifier.1.branch.fc.weight" in report.new
    assert all(k in ours.state_dict() for k in report.new)
    # DY-Conv's K kernels do not fit a static kernel: reported, not loaded
    dy = create_model("resnet18_dyconv")
    report = warm_start(dy, torchvision.models.resnet18().state_dict())
    assert any(m.startswith("layer1.0.conv1.weight") for m in report.mismatched)
    assert "conv1.weight" in report.loaded and "bn1.weight" in report.loaded


def test_warm_start_reads_wrapped_keys_and_refuses_a_dict_that_loads_nothing() -> None:
    theirs = torchvision.models.resnet18().state_dict()
    wrapped = {f"model.module.{key}": value for key, value in theirs.items()}  # DDP inside a LightningModule
    ours = create_model("resnet18_dcd")
    report = warm_start(ours, wrapped)
    assert "layer1.0.conv1.weight" in report.loaded and not report.unused
    assert torch.equal(ours.layer1[0].conv1.weight, theirs["layer1.0.conv1.weight"])
    with pytest.raises(ValueError, match=r"warm_start: none of the state dict's 2 tensors fits.*'backbone\.a'.*'conv1\.weight'"):
        warm_start(ours, {"backbone.a": torch.zeros(1), "backbone.b": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"warm_start: none of .* tensors fits"):  # another model altogether
        warm_start(ours, torchvision.models.mobilenet_v2().state_dict())
    with pytest.raises(ValueError, match=r"warm_start: state_dict must be a dict of tensors .*'state_dict'"):
        warm_start(ours, {"state_dict": wrapped, "epoch": 3})


def test_registry_has_every_table4_name_and_builds_with_overrides() -> None:
    names = list_models()
    assert set(TABLE4_NAMES) <= set(names)
    model = create_model("resnet18_dcd", num_classes=7)
    assert model.fc.out_features == 7 and isinstance(model.layer1[0].conv1, DCDReleaseConv2d)
    assert isinstance(create_model("mobilenetv2_x0.5_dyconv").features[3].conv[1][0], DyConv2d)
    assert dcd_lightning.list_models("resnet50*") == ["resnet50_dcd", "resnet50_static"]
    with pytest.raises(ValueError, match=r"create_model: no model named 'resnet19_dcd'.*resnet18_dcd"):
        create_model("resnet19_dcd")


USER_MODULE = """
from torch import nn

from dcd_lightning.models import ModelSpec, op, register_model
from dcd_lightning.ops import StaticConv2d


class ScaledConv2d(StaticConv2d):
    def __init__(self, in_channels, out_channels, kernel_size=1, stride=1, groups=1, scale=1.0):
        super().__init__(in_channels, out_channels, kernel_size, stride, groups)
        self.scale = scale

    def forward(self, x):
        return super().forward(x) * self.scale


class TwoLayers(nn.Module):
    def __init__(self, num_classes=1000, width=8, conv=StaticConv2d):
        super().__init__()
        self.conv = conv(3, width, 3, 1, 1)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.fc(self.conv(x).mean((2, 3)))


register_model(ModelSpec("{name}", "{module}.TwoLayers", (("width", 6),), (("conv", op("{module}.ScaledConv2d", scale=0.5)),)))
"""


def test_a_users_operator_and_backbone_register_and_reach_the_command_line(
    registry_restored, user_module, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Own classes (by class or dotted path) in a ModelSpec: built, written as a config that names
    them, and found by the tools as "module:name", which imports the module that registers it."""
    from dcd_lightning import profile_cmd
    from dcd_lightning.models import ModelSpec, get_model_spec, op, register_model

    user_module("my_dcd_models", USER_MODULE.format(name="two_layers_mine", module="my_dcd_models"))
    assert "two_layers_mine" not in list_models()
    model = create_model("my_dcd_models:two_layers_mine", num_classes=4)
    assert type(model).__name__ == "TwoLayers" and type(model.conv).__name__ == "ScaledConv2d" and model.conv.scale == 0.5
    assert model(torch.randn(2, 3, 8, 8)).shape == (2, 4)
    config = get_model_spec("two_layers_mine").backbone_config()
    assert config == {"class_path": "my_dcd_models.TwoLayers", "init_args": {
        "width": 6, "conv": {"class_path": "my_dcd_models.ScaledConv2d", "init_args": {"scale": 0.5}}}}

    # a package backbone with a user's operator class; the config names the class where it lives
    from my_dcd_models import ScaledConv2d

    spec = register_model(ModelSpec("resnet10_scaled", "resnet", (("depth", 10),), (("conv", op(ScaledConv2d, scale=2.0)),)))
    assert spec.backbone_config()["class_path"] == "dcd_lightning.models.ResNet"
    assert spec.backbone_config()["init_args"]["conv"]["class_path"] == "my_dcd_models.ScaledConv2d"
    assert create_model("resnet10_scaled").layer1[0].conv1.scale == 2.0

    # a class defined where no config can import it builds, but has no class_path to write
    class Local(ScaledConv2d):
        pass

    spec = register_model(ModelSpec("resnet10_local", "resnet", (("depth", 10),), (("conv", op(Local)),)))
    assert isinstance(create_model("resnet10_local").layer1[0].conv1, Local)
    with pytest.raises(ValueError, match=r"Local is defined inside a function, so a config cannot name it by an "
                                         r"importable class_path; define it at the top level of a module"):
        spec.backbone_config()
    Local.__module__, Local.__qualname__ = "__main__", "Local"
    with pytest.raises(ValueError, match=r"Local is defined in __main__ \(a script or notebook\), so a config"):
        spec.backbone_config()

    assert profile_cmd.main(["--model", "my_dcd_models:two_layers_mine", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["params_all"] == sum(p.numel() for p in create_model("two_layers_mine").parameters()) == 162 + 7000
    with pytest.raises(ValueError, match=r"cannot import 'no_such_module_here' for model 'x'"):
        create_model("no_such_module_here:x")
    with pytest.raises(ValueError, match=r"no model named 'other'"):
        create_model("my_dcd_models:other")


def test_a_wrong_model_spec_is_refused_where_it_is_written() -> None:
    from dcd_lightning.models import ModelSpec, op

    with pytest.raises(ValueError, match=r"backbone 'vgg' is not one of \['mobilenetv2', 'resnet'\]"):
        ModelSpec("vgg_dcd", "vgg", (), ())
    with pytest.raises(ValueError, match=r"op: 'DCDConv' is not an operator of dcd_lightning.ops \(closest: \[.*'DCDConv2d'"):
        op("DCDConv")
    with pytest.raises(ValueError, match=r"op: 'torch.nn.no_such': module 'torch.nn' has no 'no_such'"):
        op("torch.nn.no_such")
    with pytest.raises(TypeError, match=r"op: 'torch.nn.functional.relu' is <function relu.*not an nn.Module class"):
        op("torch.nn.functional.relu")
    with pytest.raises(ValueError, match=r"ResNet takes no argument \['pointwise'\]; its arguments are \['num_classes', 'depth'"):
        ModelSpec("resnet_pw", "resnet", (("depth", 18),), (("pointwise", op("DCDConv2d")),))
    with pytest.raises(TypeError, match=r"operator 'conv' is 'DCDConv2d'; write op\(name_or_class"):
        ModelSpec("resnet_str", "resnet", (), (("conv", "DCDConv2d"),))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"name must be a non-empty string without ':'"):
        ModelSpec("a:b", "resnet", (), ())
    with pytest.raises(ValueError, match=r"op: DCDConv2d takes no option \['reductoin'\] \(closest: \{'reductoin': \['reduction'\]\}\)"):
        op("DCDConv2d", reductoin=4)


def test_register_model_replaces_only_when_asked(registry_restored) -> None:
    from dcd_lightning.models import ModelSpec, op, register_model

    register_model(ModelSpec("resnet10_twice", "resnet", (("depth", 10),), (("conv", op("DCDConv2d", reduction=8)),)))
    again = ModelSpec("resnet10_twice", "resnet", (("depth", 10),), (("conv", op("DCDConv2d", reduction=4)),))
    with pytest.raises(ValueError, match=r"'resnet10_twice' is registered already; pass replace=True to replace it"):
        register_model(again)
    register_model(again, replace=True)
    assert create_model("resnet10_twice").layer1[0].conv1.branch.fc.out_features == 16  # 64 channels / 4


@pytest.mark.parametrize("name", list_models())
def test_every_registry_model_runs_forward_and_backward(name: str) -> None:
    model = create_model(name, num_classes=5).train()
    out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 5)
    out.square().mean().backward()


@pytest.mark.parametrize("name", [*list_models("*_lambda_only"), *list_models("*_fusion_only")])
def test_a_formulation_row_holds_its_formulation_in_every_dynamic_layer(name: str) -> None:
    """Table 1: a Lambda W0 row has no P Phi Q^T anywhere (its classifier included), and a
    W0 + P Phi Q^T row no Lambda."""
    dynamic = [m for m in create_model(name).modules() if hasattr(m, "channel_fusion")]
    assert dynamic
    lambda_only = name.endswith("_lambda_only")
    assert all(m.channel_attention and not m.channel_fusion for m in dynamic) if lambda_only else all(
        m.channel_fusion and not m.channel_attention for m in dynamic
    )


def test_backbones_initialise_their_own_layers_not_those_inside_an_operator() -> None:
    """torchvision's initialisation reaches the backbone's static layers; an operator of the user's
    keeps what its constructor set, in the layers inside it too."""
    from torch import nn

    from dcd_lightning.ops import DCDConv2d, StaticConv2d

    class ZeroGated(DCDConv2d):
        def __init__(self, in_channels, out_channels, kernel_size=1, stride=1, groups=1, **options):
            super().__init__(in_channels, out_channels, kernel_size, stride, groups, **options)
            self.gate = nn.Conv2d(out_channels, out_channels, 1)
            self.norm = nn.BatchNorm2d(out_channels)
            nn.init.zeros_(self.gate.weight)
            nn.init.zeros_(self.norm.weight)

    class OnesConv(StaticConv2d):  # a subclass of the static operator, with an init of its own
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            nn.init.ones_(self.weight)

    def ones_in_sequence(in_channels, out_channels, kernel_size=1, stride=1, groups=1):
        """An operator that is an nn.Sequential, with an init of its own."""
        conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, groups=groups, bias=False)
        nn.init.ones_(conv.weight)
        return nn.Sequential(conv, nn.Identity())

    torch.manual_seed(0)
    for model in (ResNet(depth=10, conv=ZeroGated, downsample_conv=ones_in_sequence),
                  MobileNetV2(width_mult=0.35, pointwise=ZeroGated, depthwise=OnesConv)):
        gated = [m for m in model.modules() if isinstance(m, ZeroGated)]
        assert gated and all(not m.gate.weight.any() and not m.norm.weight.any() for m in gated)
        assert all(bool((m.weight == 1).all()) for m in model.modules() if isinstance(m, OnesConv))
        ones = {id(m[0]) for m in model.modules() if isinstance(m, nn.Sequential) and isinstance(m[-1], nn.Identity)}
        assert len(ones) == (3 if isinstance(model, ResNet) else 0)
        assert all(bool((model.get_submodule(name).weight == 1).all())
                   for name, m in model.named_modules() if id(m) in ones)
        inside = {id(sub) for m in gated for sub in m.modules()}
        static = [m for m in model.modules() if type(m) in (nn.Conv2d, StaticConv2d) and id(m) not in ones | inside]
        assert static
        for conv in static:  # Kaiming (fan-out), not the ones above
            kaiming = (2 / (conv.out_channels * conv.weight[0, 0].numel())) ** 0.5
            assert 0.8 < float(conv.weight.std()) / kaiming < 1.2, (conv, float(conv.weight.std()), kaiming)
        assert all(bool((m.weight == 1).all()) for m in model.modules() if type(m) is nn.BatchNorm2d and id(m) not in inside)


def test_small_input_backbones() -> None:
    assert ResNet(num_classes=10, depth=10, small_input=True)(torch.randn(2, 3, 16, 16)).shape == (2, 10)
    assert MobileNetV2(num_classes=10, width_mult=0.5, small_input=True)(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ValueError, match="ResNet: depth=20 is not allowed"):
        ResNet(depth=20)


@pytest.mark.parametrize("name", ["resnet18_dcd", "mobilenetv2_x0.5_dcd"])
@pytest.mark.parametrize(("argument", "value"), [("num_classes", 0), ("num_classes", 2.5), ("in_chans", 0)])
def test_backbone_sizes_are_checked_by_name(name: str, argument: str, value: object) -> None:
    """The backbone names what it was given, not the classifier's or stem's derived argument."""
    backbone = "ResNet" if name.startswith("resnet") else "MobileNetV2"
    with pytest.raises(ValueError, match=rf"{backbone}: {argument}={value} is not allowed; expected an integer >= 1"):
        create_model(name, **{argument: value})


# -- the official release -------------------------------------------------------------------


def official_state_dict(name: str, seed: int = 0) -> dict[str, torch.Tensor]:
    shapes = json.loads((DATA / "official_checkpoint_keys.json").read_text())[name]
    generator = torch.Generator().manual_seed(seed)
    return {
        key: torch.randint(0, 5, shape, generator=generator) if key.endswith("num_batches_tracked")
        else torch.rand(shape, generator=generator) + 0.5
        for key, shape in shapes.items()
    }


@pytest.mark.parametrize("official,ours", [("mobilenetv2_dcd_x1.0", "mobilenetv2_x1.0_dcd"),
                                           ("resnet50_dcd", "resnet50_dcd")])
@pytest.mark.parametrize("wrapped", [True, False], ids=["state_dict", "bare"])
def test_official_checkpoint_loads_with_no_missing_or_unexpected_keys(tmp_path: Path, official: str, ours: str,
                                                                      wrapped: bool) -> None:
    state = official_state_dict(official)
    if not wrapped:
        state = {k.removeprefix("module."): v for k, v in state.items()}
    torch.save({"epoch": 3, "state_dict": state} if wrapped else state, tmp_path / "official.pth")
    model = dcd_lightning.load_official_checkpoint(tmp_path / "official.pth")
    assert {k: v.shape for k, v in model.state_dict().items()} == {
        k: v.shape for k, v in create_model(ours).state_dict().items()
    }
    # every tensor of the checkpoint went somewhere: total element counts agree
    assert sum(v.numel() for v in model.state_dict().values()) == sum(v.numel() for v in state.values())
    key = "module.features.2.conv.0.conv_q.weight" if official.startswith("mobile") else "module.layer1.0.conv2.q.weight"
    target = model.features[2].conv[0][0].compress if official.startswith("mobile") else model.layer1[0].conv2.compress
    assert torch.equal(target, state[key if wrapped else key.removeprefix("module.")].flatten(1))


def test_official_checkpoint_of_another_architecture_names_the_keys(tmp_path: Path) -> None:
    state = official_state_dict("mobilenetv2_dcd_x1.0")
    state["module.features.5.conv.6.fc_phi.weight"] = torch.zeros(7, 3)
    del state["module.classifier.1.cls_q.weight"]
    torch.save({"state_dict": state}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match=r"(?s)fits none of.*features\.5\.conv\.6\.fc_phi\.weight: shape \(7, 3\)"
                                         r".*classifier\.1\.compress: missing from the checkpoint"):
        dcd_lightning.load_official_checkpoint(tmp_path / "other.pth")


def test_a_static_checkpoint_is_not_taken_for_an_official_one(tmp_path: Path) -> None:
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "resnet18.pth")
    with pytest.raises(ValueError, match=r"has no layer of the release's DCD .*torchvision state dict.*warm_start"):
        dcd_lightning.load_official_checkpoint(tmp_path / "resnet18.pth")


def test_import_official_writes_a_checkpoint_the_lightning_module_loads(tmp_path: Path) -> None:
    torch.save({"state_dict": official_state_dict("mobilenetv2_dcd_x1.0")}, tmp_path / "official.pth")
    name, checkpoint = lightning_checkpoint(tmp_path / "official.pth")
    assert name == "mobilenetv2_x1.0_dcd"
    module = ImageClassifier(lambda n: create_model(name, num_classes=n), num_classes=1000)
    module.load_state_dict(checkpoint["state_dict"], strict=True)
    result = subprocess.run(
        [sys.executable, "-m", "dcd_lightning", "import-official", str(tmp_path / "official.pth"),
         "--out", str(tmp_path / "ours.ckpt")], capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "official weights of mobilenetv2_x1.0_dcd" in result.stdout
    assert torch.load(tmp_path / "ours.ckpt", weights_only=True)["dcd_lightning_model"] == name


# -- configs/paper -----------------------------------------------------------------------------


def test_paper_configs_are_the_generated_ones() -> None:
    files = config_files()
    on_disk = {p.name: p.read_text() for p in (ROOT / "configs" / "paper").glob("*.yaml")}
    assert on_disk == files, "run `python -m dcd_lightning make-paper-configs`"


@pytest.mark.parametrize("filename", sorted({f.split("_", 1)[1]: f for f in sorted(config_files())}.values()))
def test_every_paper_config_builds_its_registry_model(filename: str) -> None:
    model, size = model_from_config([str(ROOT / "configs" / "paper" / filename)], [])
    expected = create_model(filename.split("_", 1)[1].removesuffix(".yaml"))
    assert size == 224
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in expected.state_dict().items()}
    assert [type(m).__name__ for m in model.modules()] == [type(m).__name__ for m in expected.modules()]


def test_profile_json_for_a_paper_config(capsys: pytest.CaptureFixture[str]) -> None:
    from dcd_lightning.cli import main

    config = ROOT / "configs" / "paper" / "table4_resnet18_dcd.yaml"
    assert main(["profile", "--config", str(config), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    spec_params = sum(p.numel() for p in create_model("resnet18_dcd").parameters())
    assert isinstance(data["params"], int) and isinstance(data["madds"], int)
    assert data["params"] == spec_params - data["classifier_params"]  # ResNet: counted without fc
    assert data["paper"][0]["params_m"] == 14.0
    # with a GPU preset on a machine without a GPU (only the model is needed): the same figures
    assert main(["profile", "--config", str(config), "--config", str(ROOT / "configs" / "presets" / "ddp.yaml"),
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["madds"] == data["madds"]
    # another input size than the paper's 224: its rows are not compared
    assert main(["profile", "--model", "resnet18_dcd", "--input-size", "16", "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["paper"] == [] and "none is compared at 16x16" in captured.err
    assert main(["profile", "--model", "mobilenetv2_x0.5_dcd"]) == 0
    text = capsys.readouterr().out
    assert "DCDReleaseConv2d 1x1" in text and "paper table4a_mobilenetv2[7]: params 3.1M" in text
    # an override that changes the model: that file's row is not the model's, so none is compared
    table2 = ROOT / "configs" / "paper" / "table2_mobilenetv2_x0.5_dcd_pw.yaml"
    assert main(["profile", "--config", str(table2), "--json",
                 "--model.init_args.backbone.init_args.pointwise.init_args.latent_mult=0.25"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["paper"] == [] and "no paper row is compared" in captured.err
    assert main(["profile", "--config", str(table2), "--json", "--trainer.max_epochs=3"]) == 0  # not the model
    rows = json.loads(capsys.readouterr().out)["paper"]
    assert "table2_mobilenetv2_x0.5_latent_multiplier" in {row["table"] for row in rows}


def test_every_operator_takes_the_factory_arguments_in_the_factory_order() -> None:
    """A backbone may call an operator positionally with ConvFactory's (in_channels, out_channels,
    kernel_size, stride, groups) or LinearFactory's (in_features, out_features): ours take them
    so; nn.Conv2d does not (its fifth parameter is padding), and positional_mismatch says so."""
    import inspect

    from torch import nn

    from dcd_lightning import ops
    from dcd_lightning.models.factories import positional_mismatch

    operators = [cls for cls in vars(ops).values() if inspect.isclass(cls) and issubclass(cls, nn.Module)]
    assert len(operators) > 8
    assert {cls.__name__: positional_mismatch(cls) for cls in operators} == {cls.__name__: None for cls in operators}
    assert "Conv2d takes groups as parameter 7" in positional_mismatch(nn.Conv2d)
    assert "passes groups to its parameter 'padding'" in positional_mismatch(nn.Conv2d)
    assert positional_mismatch(nn.Linear) is None
