"""The paper's dense multi-task architecture, small: a shared backbone whose norms are made
per-task by `cs_kernels.task_norms`, and one dense head per task (segmentation, depth,
surface normals).

    model = DenseMultiTaskNet(["seg", "depth", "normal"], num_classes=8, backbone="resnet18",
                              width=16)
    out = model(images, task="depth")  # [B, 1, H, W]

The backbone is written without tasks (ours in `mtl.models.backbones`, or a torchvision / timm
ResNet passed in, pretrained or not): `cs_kernels.task_norms` gives each of its norms one copy
per task, and the forward runs it inside `cs_kernels.task_scope`, so every shared conv is
followed by a BatchNorm of each task's own, as in the paper (Jeong & Yoon use ResNet/HRNet
backbones with task-specific BatchNorms on NYUD-v2 and PASCAL-Context).

Each head fuses the backbone's four scales the way HRNet's dense heads do (a small
MTI-Net/FPN-like decoder without the cross-task distillation): a 1x1 conv per scale to
``head_width`` channels, upsampled to the finest scale and summed, a 3x3 conv + BatchNorm +
ReLU, a 1x1 conv to the task's outputs, and bilinear upsampling to the input size. It works
at small resolutions (64x64: the finest backbone scale is 16x16) and for any width and depth.

Task kinds and outputs:

=========  ==========================  ======================================================
kind       output                      loss (`dense_loss`)
=========  ==========================  ======================================================
segment    ``[B, classes, H, W]``      cross-entropy, pixels labelled ``IGNORE_INDEX`` skipped
depth      ``[B, 1, H, W]``            L1 over pixels with depth > 0
normal     ``[B, 3, H, W]``            L1 between unit vectors, pixels with a zero target
                                       normal skipped (the prediction is normalised first)
binary     ``[B, 1, H, W]`` logits     binary cross-entropy, pixels labelled ``IGNORE_INDEX``
                                       skipped (edges, saliency)
=========  ==========================  ======================================================
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import cs_kernels as ck
from cs_kernels.training.per_task_norms import check_tasks
from mtl.models.backbones import HRNetLite, backbone_features, feature_channels, resnet18, resnet50

DEFAULT_TASKS = ("seg", "depth", "normal")
TASK_KINDS = {"seg": "segment", "depth": "depth", "normal": "normal"}
KINDS = ("segment", "depth", "normal", "binary")
IGNORE_INDEX = 255
BACKBONES = ("resnet18", "resnet50", "hrnet")


class DenseHead(nn.Module):
    """Multi-scale fusion head: ``forward(features, size) -> [B, out_channels, *size]``.

    Args:
        in_channels: channels of each backbone scale, finest first.
        width: channels of the fused map.
        out_channels: the task's outputs.
    """

    def __init__(self, in_channels: Sequence[int], width: int, out_channels: int) -> None:
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, width, 1, bias=False) for c in in_channels)
        self.fuse = nn.Sequential(
            nn.Conv2d(width, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
        )
        self.out = nn.Conv2d(width, out_channels, 1)

    def forward(self, features: Sequence[Tensor], size: tuple[int, int]) -> Tensor:
        finest = features[0].shape[-2:]
        x = self.lateral[0](features[0])
        for lateral, f in zip(self.lateral[1:], features[1:], strict=True):
            x = x + F.interpolate(lateral(f), size=finest, mode="bilinear", align_corners=False)
        x = self.out(self.fuse(x))
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def build_backbone(name: str, width: int | None = None, layers: Sequence[int] | None = None):
    """One of ``BACKBONES`` (ours, torchvision's layout for the ResNets).

    ``width``: first-stage channels (ResNets: 64 by default; HRNet-lite: 16). ``layers``:
    blocks per stage (ResNets, 4 numbers) or ``(modules, blocks)`` (HRNet-lite).
    """
    if name == "resnet18":
        return resnet18(width or 64, layers or (2, 2, 2, 2))
    if name == "resnet50":
        return resnet50(width or 64, layers or (3, 4, 6, 3))
    if name == "hrnet":
        modules, blocks = layers or (2, 1)
        return HRNetLite(width or 16, branches=3, modules=modules, blocks=blocks)
    raise ValueError(f"backbone must be one of {BACKBONES} or an nn.Module, got {name!r}")


class DenseMultiTaskNet(nn.Module):
    """Shared backbone with per-task norms, one `DenseHead` per task.

    Args:
        tasks: task names; each a key of ``TASK_KINDS`` or of ``kinds``.
        num_classes: segmentation classes.
        backbone: a name in ``BACKBONES``, or a backbone module: a torchvision-style ResNet
            (``layer1``..``layer4``; torchvision's or timm's, pretrained weights welcome) or a
            module with ``feature_channels`` whose forward returns its feature maps. It is
            converted in place by `cs_kernels.task_norms`; a ResNet's classifier ``fc`` is
            replaced by ``nn.Identity`` (unused here).
        width, layers: shape of a named backbone (see `build_backbone`).
        head_width: channels of each head's fused map.
        kinds: ``{task: kind}`` for task names outside ``TASK_KINDS``.
        outputs: ``{task: channels}`` overriding a task's output channels (e.g. each
            segmentation task's own number of classes); default from its kind.

    ``forward(x: [B, 3, H, W], task) -> [B, C_task, H, W]``.
    """

    def __init__(
        self,
        tasks: Sequence[str] = DEFAULT_TASKS,
        *,
        num_classes: int = 13,
        backbone: str | nn.Module = "resnet18",
        width: int | None = None,
        layers: Sequence[int] | None = None,
        head_width: int = 64,
        kinds: Mapping[str, str] | None = None,
        outputs: Mapping[str, int] | None = None,
    ) -> None:
        super().__init__()
        names = check_tasks(tasks)
        known = {**TASK_KINDS, **(kinds or {})}
        for t in names:
            if t not in known:
                raise ValueError(f"task {t!r} has no kind: pass kinds={{{t!r}: one of {KINDS}}}")
            if known[t] not in KINDS:
                raise ValueError(f"kinds[{t!r}] must be one of {KINDS}, got {known[t]!r}")
        if num_classes < 2 or head_width < 1:
            raise ValueError("num_classes must be >= 2 and head_width >= 1")
        self.tasks = names
        self.kinds = {t: known[t] for t in names}
        self.num_classes = num_classes
        net = build_backbone(backbone, width, layers) if isinstance(backbone, str) else backbone
        if not isinstance(net, nn.Module):
            raise TypeError(f"backbone must be a name or an nn.Module, got {type(net).__name__}")
        channels = feature_channels(net)
        if isinstance(getattr(net, "fc", None), nn.Module):
            net.fc = nn.Identity()
        self.backbone = ck.task_norms(net, names)
        per_kind = {"segment": num_classes, "depth": 1, "normal": 3, "binary": 1}
        channels_out = {t: per_kind[self.kinds[t]] for t in names}
        for t, count in (outputs or {}).items():
            if t not in channels_out or isinstance(count, bool) or not isinstance(count, int):
                raise ValueError(f"outputs[{t!r}] must be an int for one of {list(names)}")
            if count < 1:
                raise ValueError(f"outputs[{t!r}] must be >= 1, got {count}")
            channels_out[t] = count
        self.heads = nn.ModuleDict(
            {t: DenseHead(channels, head_width, channels_out[t]) for t in names}
        )

    def forward(self, x: Tensor, task: str) -> Tensor:
        if task not in self.heads:
            raise ValueError(f"task must be one of {list(self.tasks)}, got {task!r}")
        with ck.task_scope(self.backbone, task):
            features = backbone_features(self.backbone, x)
        out: Tensor = self.heads[task](features, (x.shape[-2], x.shape[-1]))
        return out

    def shared_parameters(self) -> list[nn.Parameter]:
        """The backbone's parameters outside its per-task norms (every task uses them)."""
        per_task = {
            id(p)
            for m in self.backbone.modules()
            if isinstance(m, ck.TaskNorm)
            for p in m.parameters()
        }
        return [p for p in self.backbone.parameters() if id(p) not in per_task]

    def task_parameters(self, task: str) -> list[nn.Parameter]:
        """Parameters only ``task`` uses: its norm copies and its head."""
        norms = [
            p
            for m in self.backbone.modules()
            if isinstance(m, ck.TaskNorm)
            for p in m[task].parameters()
        ]
        return norms + list(self.heads[task].parameters())


def dense_loss(kind: str, output: Tensor, target: Tensor) -> Tensor:
    """The training loss of a task of ``kind`` (see the module docstring), a scalar.

    Shapes: segment ``[B, K, H, W]`` logits and int64 ``[B, H, W]`` labels; depth
    ``[B, 1, H, W]`` and ``[B, 1, H, W]`` (or ``[B, H, W]``); normal ``[B, 3, H, W]`` each.
    """
    if kind == "segment":
        return F.cross_entropy(output, target, ignore_index=IGNORE_INDEX)
    if kind == "depth":
        target = target.view_as(output)
        valid = (target > 0).to(output.dtype)
        return ((output - target).abs() * valid).sum() / valid.sum().clamp_min(1.0)
    if kind == "normal":
        valid = (target.abs().sum(dim=1, keepdim=True) > 0).to(output.dtype)
        unit = F.normalize(output, dim=1)
        return ((unit - target).abs() * valid).sum() / (3.0 * valid.sum().clamp_min(1.0))
    if kind == "binary":
        target = target.view_as(output)
        valid = (target != IGNORE_INDEX).to(output.dtype)
        bce = F.binary_cross_entropy_with_logits(
            output, target.to(output.dtype) * valid, reduction="none"
        )
        return (bce * valid).sum() / valid.sum().clamp_min(1.0)
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


def predict(kind: str, output: Tensor) -> Tensor:
    """A head's output as a prediction: class ids, depth, or unit normals."""
    if kind == "segment":
        return output.argmax(dim=1)
    if kind == "depth":
        return output.clamp_min(0.0)
    if kind == "normal":
        return F.normalize(output, dim=1)
    if kind == "binary":
        return torch.sigmoid(output)
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


def random_batch(
    batch: int, size: int, num_classes: int, kinds: Mapping[str, str], seed: int = 0
) -> tuple[Tensor, dict[str, Tensor]]:
    """Random images ``[batch, 3, size, size]`` and a target per task of ``kinds``
    (``{task: kind}``, e.g. ``model.kinds``), of the right shapes: for benchmarks and tests."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, size, size, generator=gen)
    targets: dict[str, Tensor] = {}
    for t, kind in kinds.items():
        if kind == "segment":
            targets[t] = torch.randint(0, num_classes, (batch, size, size), generator=gen)
        elif kind == "depth":
            targets[t] = torch.rand(batch, 1, size, size, generator=gen) * 5 + 0.5
        elif kind == "binary":
            targets[t] = torch.randint(0, 2, (batch, 1, size, size), generator=gen).float()
        else:
            targets[t] = F.normalize(torch.randn(batch, 3, size, size, generator=gen), dim=1)
    return x, targets
