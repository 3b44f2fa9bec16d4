"""MobileNetV2 with one injected operator per placement: pointwise, depthwise, classifier (Table 3b)."""

from __future__ import annotations

from torch import Tensor, nn

from ..ops import StaticConv2d, StaticLinear
from ..ops._common import check_int
from .factories import ConvFactory, LinearFactory, own_layers, recording

# t (expansion), c (channels), n (repeats), s (stride of the first repeat)
INVERTED_RESIDUAL_SETTING = [
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
]


def _make_divisible(value: float, divisor: int = 8) -> int:
    """Round `value` to a multiple of `divisor`, never more than 10% below it (MobileNet's rule)."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


def _conv_bn_relu(conv: nn.Module, channels: int) -> nn.Sequential:
    return nn.Sequential(conv, nn.BatchNorm2d(channels), nn.ReLU6(inplace=True))


class InvertedResidual(nn.Module):
    """Expand (1x1) -> depthwise (3x3) -> project (1x1), with a shortcut when shapes allow."""

    def __init__(
        self,
        inp: int,
        oup: int,
        stride: int,
        expand_ratio: int,
        pointwise: ConvFactory,
        depthwise: ConvFactory,
        project: ConvFactory,
    ) -> None:
        super().__init__()
        hidden = int(round(inp * expand_ratio))
        self.use_res_connect = stride == 1 and inp == oup
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(_conv_bn_relu(pointwise(inp, hidden, kernel_size=1, stride=1, groups=1), hidden))
        layers += [
            _conv_bn_relu(depthwise(hidden, hidden, kernel_size=3, stride=stride, groups=hidden), hidden),
            project(hidden, oup, kernel_size=1, stride=1, groups=1),
            nn.BatchNorm2d(oup),
        ]
        self.conv = nn.Sequential(*layers)
        self.out_channels = oup

    def forward(self, x: Tensor) -> Tensor:
        """Block forward."""
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 (Sandler et al., 2018) whose 1x1, depthwise and classifier layers are injected.

    With static operators its state-dict keys and shapes equal torchvision's `mobilenet_v2`.
    As in the official DCD release, the first block (expansion 1) and the last 1x1 convolution
    (to 1280 channels) use StaticConv2d unless `dynamic_first_block` / `dynamic_last_conv` is set,
    in which case they take the `pointwise` operator too ("all 1x1 layers", Section 5).
    `small_input=True` makes the stem stride 1, for 32x32 and smaller images.
    """

    def __init__(
        self,
        num_classes: int = 1000,
        width_mult: float = 1.0,
        pointwise: ConvFactory = StaticConv2d,
        depthwise: ConvFactory = StaticConv2d,
        classifier: LinearFactory = StaticLinear,
        dropout: float = 0.2,
        dynamic_first_block: bool = False,
        dynamic_last_conv: bool = False,
        small_input: bool = False,
        in_chans: int = 3,
    ) -> None:
        super().__init__()
        check_int("MobileNetV2", "num_classes", num_classes)
        check_int("MobileNetV2", "in_chans", in_chans)
        self.in_chans = in_chans  # the image channels it takes (profile, export and fit read it)
        if width_mult <= 0:
            raise ValueError(f"MobileNetV2: width_mult={width_mult} is not allowed; expected a number > 0")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"MobileNetV2: dropout={dropout} is not allowed; expected 0 <= dropout < 1")
        self.width_mult = width_mult
        operators: set[int] = set()  # what the factories build keeps its own initialisation
        pointwise, depthwise, classifier = (recording(f, operators) for f in (pointwise, depthwise, classifier))
        input_channel = _make_divisible(32 * width_mult)
        self.last_channel = _make_divisible(1280 * max(1.0, width_mult))
        stem = nn.Conv2d(in_chans, input_channel, 3, 1 if small_input else 2, 1, bias=False)
        features: list[nn.Module] = [_conv_bn_relu(stem, input_channel)]
        for t, c, n, s in INVERTED_RESIDUAL_SETTING:
            output_channel = _make_divisible(c * width_mult)
            for i in range(n):
                first = t == 1 and not dynamic_first_block
                project = StaticConv2d if first else pointwise
                features.append(
                    InvertedResidual(input_channel, output_channel, s if i == 0 else 1, t, pointwise, depthwise, project)
                )
                input_channel = output_channel
        last = pointwise if dynamic_last_conv else StaticConv2d
        features.append(_conv_bn_relu(last(input_channel, self.last_channel, kernel_size=1, stride=1, groups=1),
                                      self.last_channel))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(p=dropout), classifier(self.last_channel, num_classes))
        self.num_features = self.last_channel
        self._init_static_layers(operators)

    def _init_static_layers(self, operators: set[int]) -> None:
        """torchvision's initialisation for the static layers; operators (the ids of what the
        factories built) keep their own, and so do the layers inside them."""
        for module in own_layers(self, operators):
            if type(module) in (nn.Conv2d, StaticConv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out")
            elif type(module) is nn.BatchNorm2d:
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        head = self.classifier[1]
        if type(head) in (nn.Linear, StaticLinear):
            nn.init.normal_(head.weight, 0, 0.01)
            nn.init.zeros_(head.bias)

    def forward(self, x: Tensor) -> Tensor:
        """Logits (N, num_classes) for images (N, 3, H, W)."""
        x = nn.functional.adaptive_avg_pool2d(self.features(x), 1).flatten(1)
        return self.classifier(x)
