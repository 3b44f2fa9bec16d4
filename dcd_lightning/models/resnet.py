"""ResNet-10/18/50 with one injected operator for the block convolutions and one for the classifier."""

from __future__ import annotations

from torch import Tensor, nn

from ..ops import StaticConv2d, StaticLinear
from ..ops._common import check_int
from ..ops.pooling import MaxPool2d
from .factories import ConvFactory, LinearFactory, own_layers, recording

DEPTHS: dict[int, tuple[str, list[int]]] = {
    10: ("basic", [1, 1, 1, 1]),
    18: ("basic", [2, 2, 2, 2]),
    34: ("basic", [3, 4, 6, 3]),
    50: ("bottleneck", [3, 4, 6, 3]),
}


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a shortcut (state-dict names as torchvision's)."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int, conv: ConvFactory, downsample: nn.Module | None) -> None:
        super().__init__()
        self.conv1 = conv(inplanes, planes, kernel_size=3, stride=stride, groups=1)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv(planes, planes, kernel_size=3, stride=1, groups=1)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        """Residual block forward."""
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (strided) -> 1x1 bottleneck with a shortcut (torchvision v1.5 layout)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int, conv: ConvFactory, downsample: nn.Module | None) -> None:
        super().__init__()
        width = planes
        self.conv1 = conv(inplanes, width, kernel_size=1, stride=1, groups=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv(width, width, kernel_size=3, stride=stride, groups=1)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = conv(width, planes * self.expansion, kernel_size=1, stride=1, groups=1)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        """Residual block forward."""
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """ResNet of depth 10, 18, 34 or 50; `conv` builds every block convolution, `classifier` the head.

    `small_input=True` uses a 3x3 stride-1 stem without max-pool, for 32x32 and smaller images.
    """

    paper_counts_classifier = False  # the paper's ResNet parameter counts leave out `fc`

    def __init__(
        self,
        num_classes: int = 1000,
        depth: int = 18,
        conv: ConvFactory = StaticConv2d,
        classifier: LinearFactory = StaticLinear,
        downsample_conv: ConvFactory = StaticConv2d,
        small_input: bool = False,
        dropout: float = 0.0,
        in_chans: int = 3,
    ) -> None:
        super().__init__()
        check_int("ResNet", "num_classes", num_classes)
        check_int("ResNet", "in_chans", in_chans)
        self.in_chans = in_chans  # the image channels it takes (profile, export and fit read it)
        if depth not in DEPTHS:
            raise ValueError(f"ResNet: depth={depth} is not allowed; expected one of {sorted(DEPTHS)}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"ResNet: dropout={dropout} is not allowed; expected 0 <= dropout < 1")
        kind, layers = DEPTHS[depth]
        block = BasicBlock if kind == "basic" else Bottleneck
        operators: set[int] = set()  # what the factories build keeps its own initialisation
        conv, classifier, downsample_conv = (recording(f, operators) for f in (conv, classifier, downsample_conv))
        self.inplanes = 64
        if small_input:
            self.conv1 = nn.Conv2d(in_chans, 64, kernel_size=3, stride=1, padding=1, bias=False)
            self.maxpool: nn.Module = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(in_chans, 64, kernel_size=7, stride=2, padding=3, bias=False)
            self.maxpool = MaxPool2d(kernel_size=3, stride=2, padding=1)  # nn.MaxPool2d, a C kernel at inference
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        stages = []
        for index, (planes, count) in enumerate(zip((64, 128, 256, 512), layers)):
            stride = 1 if index == 0 else 2
            blocks = []
            for i in range(count):
                downsample = None
                if i == 0 and (stride != 1 or self.inplanes != planes * block.expansion):
                    downsample = nn.Sequential(
                        downsample_conv(self.inplanes, planes * block.expansion, kernel_size=1, stride=stride, groups=1),
                        nn.BatchNorm2d(planes * block.expansion),
                    )
                blocks.append(block(self.inplanes, planes, stride if i == 0 else 1, conv, downsample))
                self.inplanes = planes * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = classifier(self.inplanes, num_classes)
        self.num_features = self.inplanes
        # torchvision's initialisation of the static layers; operators keep their own (and so do
        # the layers inside them)
        for module in own_layers(self, operators):
            if type(module) in (nn.Conv2d, StaticConv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif type(module) is nn.BatchNorm2d and module.affine:
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        """Logits (N, num_classes) for images (N, 3, H, W)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.avgpool(x).flatten(1)
        return self.fc(self.dropout(x))
