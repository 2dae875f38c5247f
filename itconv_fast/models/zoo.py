"""torchvision-like ResNet-18 and ResNet-50 (He et al. 2016), written here so that the benchmarks and
examples of `itconv_fast.nn` run on models that are not ours without a torchvision dependency.

Same layers and shapes as torchvision's `resnet18` / `resnet50` (7x7 stride-2 stem, max-pool, four stages
of BasicBlock [2, 2, 2, 2] / Bottleneck [3, 4, 6, 3] with the stride on the 3x3 conv, 1x1 projection
shortcuts, global average pool, fc), with the base width as a parameter (64 is torchvision's).
"""

from __future__ import annotations

from torch import nn

__all__ = ["resnet18", "resnet50", "BasicBlock", "Bottleneck", "ResNet"]


def _conv_bn(c_in: int, c_out: int, k: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, k, stride=stride, padding=k // 2, bias=False), nn.BatchNorm2d(c_out)]


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, c_in: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1, self.bn1 = _conv_bn(c_in, planes, 3, stride)
        self.conv2, self.bn2 = _conv_bn(planes, planes, 3)
        self.relu = nn.ReLU(inplace=True)
        out = planes * self.expansion
        self.downsample = nn.Sequential(*_conv_bn(c_in, out, 1, stride)) if stride != 1 or c_in != out else None

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, c_in: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1, self.bn1 = _conv_bn(c_in, planes, 1)
        self.conv2, self.bn2 = _conv_bn(planes, planes, 3, stride)
        self.conv3, self.bn3 = _conv_bn(planes, planes * self.expansion, 1)
        self.relu = nn.ReLU(inplace=True)
        out = planes * self.expansion
        self.downsample = nn.Sequential(*_conv_bn(c_in, out, 1, stride)) if stride != 1 or c_in != out else None

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


class ResNet(nn.Module):
    def __init__(self, block, layers, num_classes: int = 1000, width: int = 64, in_channels: int = 3) -> None:
        super().__init__()
        self.conv1, self.bn1 = _conv_bn(in_channels, width, 7, 2)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        c = width
        stages = []
        for i, n in enumerate(layers):
            planes = width * 2**i
            blocks = []
            for j in range(n):
                blocks.append(block(c, planes, 2 if (j == 0 and i > 0) else 1))
                c = planes * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.avgpool(x).flatten(1))


def resnet18(num_classes: int = 1000, width: int = 64, in_channels: int = 3) -> ResNet:
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes, width, in_channels)


def resnet50(num_classes: int = 1000, width: int = 64, in_channels: int = 3) -> ResNet:
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes, width, in_channels)
