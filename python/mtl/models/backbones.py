"""Backbones for the dense multi-task model, written without tasks (as third-party ones are).

- `ResNet` follows torchvision's ``resnet18``/``resnet50`` module for module: the same names
  (``conv1``, ``bn1``, ``relu``, ``maxpool``, ``layer1``..``layer4`` of ``BasicBlock`` /
  ``Bottleneck`` with ``conv1``/``bn1``/..., ``downsample = Sequential(conv 1x1, BatchNorm)``,
  ``avgpool``, ``fc``), the same BatchNorm placement and initialisation, so a torchvision
  ``state_dict`` loads into it strictly (tested where torchvision imports). ``width`` and
  ``layers`` shrink it for small experiments.
- `HRNetLite`: an HRNet-style multi-branch backbone (parallel resolutions exchanging features
  in fusion layers), small: ``branches`` resolutions, ``modules`` exchange units.

Both return multi-scale features through `backbone_features` (a list of ``[B, C_i, H_i, W_i]``,
finest first) and say their channel counts with `feature_channels`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


def conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs, each followed by a BatchNorm; identity or projected shortcut."""

    expansion = 1

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        out = self.relu(out)
        return out


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carrying the stride, as torchvision's "ResNet v1.5"), 1x1 expand."""

    expansion = 4

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.conv1 = conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        out = self.relu(out)
        return out


class ResNet(nn.Module):
    """torchvision's ResNet layout (see the module docstring).

    Args:
        block: `BasicBlock` (ResNet-18/34) or `Bottleneck` (ResNet-50).
        layers: blocks per stage, e.g. ``(2, 2, 2, 2)`` for ResNet-18.
        width: channels of the stem and the first stage (64 in torchvision); stage ``i`` has
            ``width * 2**i`` (times 4 after a Bottleneck).
        num_classes: outputs of ``fc``.
    """

    def __init__(
        self,
        block: type[BasicBlock | Bottleneck],
        layers: Sequence[int],
        width: int = 64,
        num_classes: int = 1000,
    ) -> None:
        super().__init__()
        if len(layers) != 4 or any(n < 1 for n in layers):
            raise ValueError(f"layers must be 4 positive block counts, got {list(layers)}")
        if width < 1:
            raise ValueError(f"width must be positive, got {width}")
        self.inplanes = width
        self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, width, layers[0])
        self.layer2 = self._make_layer(block, width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(block, width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(block, width * 8, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(width * 8 * block.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(
        self, block: type[BasicBlock | Bottleneck], planes: int, blocks: int, stride: int = 1
    ) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                conv1x1(self.inplanes, planes * block.expansion, stride),
                nn.BatchNorm2d(planes * block.expansion),
            )
        stage: list[nn.Module] = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        stage += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*stage)

    def forward(self, x: Tensor) -> Tensor:
        x = backbone_features(self, x)[-1]
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18(width: int = 64, layers: Sequence[int] = (2, 2, 2, 2), **kwargs: int) -> ResNet:
    """ResNet-18 (11.7M parameters at the default width)."""
    return ResNet(BasicBlock, layers, width, **kwargs)


def resnet50(width: int = 64, layers: Sequence[int] = (3, 4, 6, 3), **kwargs: int) -> ResNet:
    """ResNet-50 (25.6M parameters at the default width)."""
    return ResNet(Bottleneck, layers, width, **kwargs)


# ------------------------------------------------------------------------------- HRNet-lite


class _Branch(nn.Sequential):
    """``blocks`` BasicBlocks at one resolution."""

    def __init__(self, channels: int, blocks: int) -> None:
        super().__init__(*[BasicBlock(channels, channels) for _ in range(blocks)])


class _Exchange(nn.Module):
    """HRNet's exchange unit: each branch runs its blocks, then every output resolution sums
    every branch, brought to it by strided 3x3 convs (down) or a 1x1 conv and upsampling (up).
    """

    def __init__(self, channels: Sequence[int], blocks: int) -> None:
        super().__init__()
        self.branches = nn.ModuleList(_Branch(c, blocks) for c in channels)
        fuse: list[nn.ModuleList] = []
        for i, ci in enumerate(channels):
            row: list[nn.Module] = []
            for j, cj in enumerate(channels):
                if j == i:
                    row.append(nn.Identity())
                elif j > i:  # coarser branch j to finer i: 1x1 conv, BN, then upsample
                    row.append(nn.Sequential(conv1x1(cj, ci), nn.BatchNorm2d(ci)))
                else:  # finer j to coarser i: (i - j) strided 3x3 convs
                    steps: list[nn.Module] = []
                    for k in range(i - j):
                        last = k == i - j - 1
                        cout = ci if last else cj
                        steps += [conv3x3(cj, cout, 2), nn.BatchNorm2d(cout)]
                        if not last:
                            steps.append(nn.ReLU(inplace=False))
                    row.append(nn.Sequential(*steps))
            fuse.append(nn.ModuleList(row))
        self.fuse = nn.ModuleList(fuse)

    def forward(self, xs: list[Tensor]) -> list[Tensor]:
        xs = [branch(x) for branch, x in zip(self.branches, xs, strict=True)]
        out = []
        for i, row in enumerate(self.fuse):
            y = xs[i]
            for j, layer in enumerate(row):
                if j == i:
                    continue
                z = layer(xs[j])
                if j > i:
                    z = F.interpolate(
                        z, size=xs[i].shape[-2:], mode="bilinear", align_corners=False
                    )
                y = y + z
            out.append(F.relu(y))
        return out


class HRNetLite(nn.Module):
    """A small HRNet-style backbone: a stride-4 stem, then parallel branches at strides
    4, 8, 16, ... (``branches`` of them, widths ``width * 2**i``), ``modules`` exchange units.

    ``forward(x)`` returns the branch outputs, finest first (`feature_channels` lists them).
    """

    def __init__(self, width: int = 16, branches: int = 3, modules: int = 2, blocks: int = 1):
        super().__init__()
        if branches < 1 or modules < 1 or blocks < 1 or width < 1:
            raise ValueError("width, branches, modules and blocks must be positive")
        self.conv1 = conv3x3(3, width, 2)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width, 2)
        self.bn2 = nn.BatchNorm2d(width)
        self.feature_channels = [width * 2**i for i in range(branches)]
        self.transition = nn.ModuleList(
            nn.Sequential(conv3x3(self.feature_channels[i - 1], c, 2), nn.BatchNorm2d(c), nn.ReLU())
            for i, c in enumerate(self.feature_channels)
            if i > 0
        )
        self.stages = nn.ModuleList(
            _Exchange(self.feature_channels, blocks) for _ in range(modules)
        )

    def forward(self, x: Tensor) -> list[Tensor]:
        x = F.relu(self.bn1(self.conv1(x)))
        xs = [F.relu(self.bn2(self.conv2(x)))]
        for down in self.transition:
            xs.append(down(xs[-1]))
        for stage in self.stages:
            xs = stage(xs)
        return xs


# ------------------------------------------------------------------------- features protocol


def feature_channels(backbone: nn.Module) -> list[int]:
    """Channels of the feature maps `backbone_features` returns, finest first."""
    channels = getattr(backbone, "feature_channels", None)
    if channels is not None:
        return list(channels)
    stages = [getattr(backbone, f"layer{i}", None) for i in range(1, 5)]
    if all(isinstance(s, nn.Sequential) for s in stages):  # a torchvision-style ResNet
        out = []
        for stage in stages:
            last = stage[-1]  # type: ignore[index]
            conv = getattr(last, "conv3", None) or last.conv2
            out.append(int(conv.out_channels))
        return out
    raise TypeError(
        f"{type(backbone).__name__} is neither a torchvision-style ResNet (layer1..layer4) nor "
        "a backbone with a feature_channels attribute whose forward returns a feature list"
    )


def backbone_features(backbone: nn.Module, x: Tensor) -> list[Tensor]:
    """Multi-scale features ``[B, C_i, H_i, W_i]``, finest first.

    A torchvision-style ResNet (ours, torchvision's or timm's ``ResNet``) runs its stem and
    its four stages by module name; any other backbone's forward must return the list.
    """
    if hasattr(backbone, "feature_channels"):
        out: list[Tensor] = backbone(x)
        return out
    act = backbone.relu if hasattr(backbone, "relu") else backbone.act1  # timm: act1
    x = backbone.maxpool(act(backbone.bn1(backbone.conv1(x))))
    feats = []
    for i in range(1, 5):
        x = getattr(backbone, f"layer{i}")(x)
        feats.append(x)
    return feats
