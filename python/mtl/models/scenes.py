"""The Scenes benchmark's model, losses and predictions, on the dense multi-task network.

The model is `mtl.models.dense.DenseMultiTaskNet` (the paper's architecture, small): a ResNet
backbone whose every BatchNorm is made per task by `cs_kernels.task_norms`, so each shared conv
is followed by a BatchNorm of each task's own, and one multi-scale dense head per task. The
reproduction shrinks it to fit its CPU budget: ``BACKBONE`` with ``LAYERS`` blocks per stage,
first-stage width ``width`` (channels ``w, 2w, 4w, 8w``), heads of ``HEAD_WIDTH_FACTOR * w``
channels. A single-task baseline is the same network built with one task.

Losses (`mtl.models.dense.dense_loss`): cross-entropy for ``seg``, L1 in metres for ``depth``, L1
between unit vectors (mean over the 3 components) for ``normal``. The depth head's output is
read as metres relative to ``DEPTH_SHIFT`` (the depth ``output + DEPTH_SHIFT``): a head starts
near 0, and Adam's steps of about ``lr`` would otherwise spend thousands of steps moving its
bias to the scenes' typical depth.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from mtl.data.scenes import CLASSES, TASKS, check_tasks
from mtl.models.dense import DenseMultiTaskNet, dense_loss
from mtl.models.dense import predict as dense_predict

BACKBONE = "resnet18"
DEPTH_SHIFT = 2.5  # metres: about the mean depth of the rendered scenes
LAYERS = (2, 2, 2, 2)
HEAD_WIDTH_FACTOR = 2


def build_scenes_model(tasks: Sequence[str], width: int) -> DenseMultiTaskNet:
    """The dense multi-task network for ``tasks`` (names from `scenes.TASKS`)."""
    names = check_tasks(list(tasks))
    return DenseMultiTaskNet(
        names,
        num_classes=len(CLASSES),
        backbone=BACKBONE,
        width=width,
        layers=LAYERS,
        head_width=HEAD_WIDTH_FACTOR * width,
        kinds={t: TASKS[t].kind for t in names},
    )


def describe_scenes_model(tasks: Sequence[str], width: int) -> str:
    """One line for reports."""
    blocks = "-".join(map(str, LAYERS))
    return (
        f"DenseMultiTaskNet, {BACKBONE} backbone ({blocks} blocks, width {width}) with per-task "
        f"BatchNorms, a {HEAD_WIDTH_FACTOR * width}-channel dense head per task"
    )


def task_loss(task: str, output: Tensor, target: Tensor) -> Tensor:
    """The training loss of ``task`` (mean over pixels; see the module docstring)."""
    kind = TASKS[task].kind
    return dense_loss(kind, output + DEPTH_SHIFT if kind == "depth" else output, target)


def predict(task: str, output: Tensor) -> Tensor:
    """Class ids ``[B, H, W]``, depth ``[B, 1, H, W]`` (>= 0) or unit normals ``[B, 3, H, W]``."""
    kind = TASKS[task].kind
    return dense_predict(kind, output + DEPTH_SHIFT if kind == "depth" else output)
