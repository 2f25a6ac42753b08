"""The training loss and the network output of each task of the paper's dense datasets.

===============  =========  ======================================================
task             kind       loss (recipe of the reference codebases)
===============  =========  ======================================================
``semseg``       segment    cross-entropy, label 255 ignored (0 if every pixel is)
``human_parts``  segment    likewise (an image without a person is all 255)
``depth``        depth      L1 over pixels with depth > 0
``disparity``    depth      L1 over pixels with disparity > 0
``normals``      normal     L1 between the L2-normalised prediction and the target, over
                            pixels whose target is not the zero vector
``edge``         binary     balanced binary cross-entropy, positive weight 0.95
``sal``          binary     binary cross-entropy balanced by each batch's share of negatives
===============  =========  ======================================================

The binary losses skip pixels labelled 255 and average over every other pixel. Targets have
the loaders' shapes (``[B, H, W]`` class ids, ``[B, 1, H, W]`` depth / edges, ``[B, 3, H, W]``
normals, ``[B, H, W]`` saliency 0/1).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch.nn.functional as F
from torch import Tensor

from mtl.models.dense import IGNORE_INDEX, dense_loss

TASK_KINDS = {
    "semseg": "segment",
    "human_parts": "segment",
    "depth": "depth",
    "disparity": "depth",
    "normals": "normal",
    "edge": "binary",
    "sal": "binary",
}
EDGE_POS_WEIGHT = 0.95


def task_outputs(tasks: tuple[str, ...], num_classes: Mapping[str, int]) -> dict[str, int]:
    """Output channels of each task's head: its classes (``sal`` and ``edge``: one logit)."""
    out = {}
    for t in tasks:
        if t not in TASK_KINDS:
            raise ValueError(f"task must be one of {tuple(TASK_KINDS)}, got {t!r}")
        kind = TASK_KINDS[t]
        out[t] = num_classes[t] if kind == "segment" else {"depth": 1, "normal": 3}.get(kind, 1)
    return out


def balanced_bce(logits: Tensor, target: Tensor, pos_weight: Tensor | float) -> Tensor:
    """``-(w y log p + (1 - w)(1 - y) log(1 - p))`` averaged over pixels whose label is not
    255; ``logits``, ``target``: ``[B, 1, H, W]``."""
    target = target.view_as(logits).to(logits.dtype)
    valid = (target != IGNORE_INDEX).to(logits.dtype)
    y = target * valid
    pos = F.logsigmoid(logits)  # log p
    neg = F.logsigmoid(-logits)  # log (1 - p)
    loss = -(pos_weight * y * pos + (1 - pos_weight) * (1 - y) * neg) * valid
    return loss.sum() / valid.sum().clamp_min(1.0)


def task_loss(task: str, output: Tensor, target: Tensor) -> Tensor:
    """The loss of ``task`` (a key of ``TASK_KINDS``), a scalar."""
    if task == "edge":
        return balanced_bce(output, target, EDGE_POS_WEIGHT)
    if task == "sal":
        target = target.view_as(output)
        valid = target != IGNORE_INDEX
        positives = ((target == 1) & valid).sum()
        share_negative = 1.0 - positives / valid.sum().clamp_min(1)
        return balanced_bce(output, target, share_negative.to(output.dtype))
    if task not in TASK_KINDS:
        raise ValueError(f"task must be one of {tuple(TASK_KINDS)}, got {task!r}")
    if TASK_KINDS[task] == "segment":  # a mean that stays 0 when every pixel is ignored
        total = F.cross_entropy(output, target, ignore_index=IGNORE_INDEX, reduction="sum")
        return total / (target != IGNORE_INDEX).sum().clamp_min(1).to(output.dtype)
    return dense_loss(TASK_KINDS[task], output, target)
