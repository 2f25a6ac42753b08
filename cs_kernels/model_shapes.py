"""Shared-layer shapes of well-known backbones, for benchmarks, demos and tests.

Every conv of a ResNet backbone becomes a connection layer (the paper puts a task-specific
BatchNorm after every shared conv). No download: the shapes follow the architecture
definitions (He et al., 2016) directly.
"""

from __future__ import annotations

from cs_kernels.plan import Phase2Plan

Shape = tuple[int, ...]


def _conv(out_channels: int, in_channels: int, kernel: int) -> Shape:
    return (out_channels, in_channels, kernel, kernel)


def resnet18_conv_shapes() -> list[Shape]:
    """The 20 conv weights of ResNet-18 (11,166,912 elements)."""
    shapes = [_conv(64, 3, 7)]
    in_ch = 64
    for width, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        for block in range(2):
            shapes.append(_conv(width, in_ch, 3))
            shapes.append(_conv(width, width, 3))
            if block == 0 and (stride != 1 or in_ch != width):
                shapes.append(_conv(width, in_ch, 1))  # downsample
            in_ch = width
    return shapes


def resnet50_conv_shapes() -> list[Shape]:
    """The 53 conv weights of ResNet-50 (23,454,912 elements)."""
    shapes = [_conv(64, 3, 7)]
    in_ch = 64
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for block in range(blocks):
            shapes.append(_conv(width, in_ch, 1))
            shapes.append(_conv(width, width, 3))
            shapes.append(_conv(4 * width, width, 1))
            if block == 0:
                shapes.append(_conv(4 * width, in_ch, 1))  # downsample
            in_ch = 4 * width
    return shapes


MODELS = {"resnet18": resnet18_conv_shapes, "resnet50": resnet50_conv_shapes}


def model_plan(name: str) -> Phase2Plan:
    """A `Phase2Plan` whose connection layers are the named backbone's convs, end to end."""
    if name not in MODELS:
        raise ValueError(f"name must be one of {sorted(MODELS)}, got {name!r}")
    return Phase2Plan.from_shapes(MODELS[name]())
