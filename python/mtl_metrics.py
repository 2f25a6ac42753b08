"""Per-task metrics on MultiDigits and the paper's multi-task score Δm.

Δm (Maninis et al., 2019; the paper's Eq. in Sec. 5) compares a multi-task model ``m`` with
the single-task models ``b``, task by task::

    Δm = (1/T) Σ_t (-1)^{l_t} (M_m,t - M_b,t) / M_b,t × 100 %,   l_t = 1 if lower is better

so Δm > 0 means better than the single-task models on average.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from mtl_models import predict
from multidigits import TASKS, Split
from torch import Tensor, nn


class TaskMeter:
    """Accumulates one task's metric over batches; ``value()`` is the split-level figure.

    accuracy: % of correct classes; rmse: root of the mean squared error over all pixels of
    the split; iou: % intersection over union of the predicted and true masks, pooled over the
    split.
    """

    def __init__(self, task: str) -> None:
        if task not in TASKS:
            raise ValueError(f"task must be one of {sorted(TASKS)}, got {task!r}")
        self.task = task
        self.metric = TASKS[task].metric
        self._num = 0.0
        self._den = 0.0

    def update(self, prediction: Tensor, target: Tensor) -> None:
        """Add one batch (``predict`` output and the target, same shapes)."""
        if prediction.shape != target.shape:
            raise ValueError(
                f"prediction shape {tuple(prediction.shape)} != target {tuple(target.shape)}"
            )
        if self.metric == "accuracy":
            self._num += float((prediction == target).sum())
            self._den += target.numel()
        elif self.metric == "rmse":
            self._num += float(((prediction - target) ** 2).sum())
            self._den += target.numel()
        else:  # iou
            pred, true = prediction > 0.5, target > 0.5
            self._num += float((pred & true).sum())
            self._den += float((pred | true).sum())

    def value(self) -> float:
        """The metric so far (NaN before any update)."""
        if self._den == 0:
            return math.nan
        ratio = self._num / self._den
        if self.metric == "rmse":
            return math.sqrt(ratio)
        return 100.0 * ratio


@torch.no_grad()
def evaluate(
    model: nn.Module, split: Split, tasks: Sequence[str], batch_size: int = 512
) -> dict[str, float]:
    """Every task's metric on ``split`` (eval mode: each task's BatchNorm running stats).

    The model is put back into the training mode it had before.
    """
    was_training = model.training
    model.eval()
    meters = {t: TaskMeter(t) for t in tasks}
    device = next(model.parameters()).device
    try:
        for start in range(0, len(split), batch_size):
            index = torch.arange(start, min(start + batch_size, len(split)), device=device)
            images, targets = split.batch(index)
            for task in tasks:
                meters[task].update(predict(task, model(images, task=task)), targets[task])
    finally:
        model.train(was_training)
    return {t: m.value() for t, m in meters.items()}


def lower_is_better(tasks: Sequence[str]) -> dict[str, bool]:
    """``l_t`` of every task, from multidigits.TASKS."""
    return {t: TASKS[t].lower_is_better for t in tasks}


def relative_change(
    metrics: Mapping[str, float],
    single: Mapping[str, float],
    lower_better: Mapping[str, bool],
) -> dict[str, float]:
    """Per task, ``(-1)^{l_t} (M_m,t - M_b,t) / M_b,t × 100`` (percent; higher is better)."""
    if set(metrics) != set(single) or set(metrics) != set(lower_better):
        raise ValueError(
            "metrics, single and lower_better must name the same tasks, got "
            f"{sorted(metrics)}, {sorted(single)}, {sorted(lower_better)}"
        )
    if not metrics:
        raise ValueError("metrics must name at least one task")
    out = {}
    for task, value in metrics.items():
        base = float(single[task])
        if not math.isfinite(base) or base == 0.0:
            raise ValueError(f"single[{task!r}] must be finite and non-zero, got {base}")
        if not math.isfinite(float(value)):
            raise ValueError(f"metrics[{task!r}] must be finite, got {value}")
        sign = -1.0 if lower_better[task] else 1.0
        out[task] = sign * (float(value) - base) / base * 100.0
    return out


def delta_m(
    metrics: Mapping[str, float],
    single: Mapping[str, float],
    lower_better: Mapping[str, bool],
) -> float:
    """Δm in percent: the mean over tasks of ``relative_change`` (see the module docstring)."""
    changes = relative_change(metrics, single, lower_better)
    return sum(changes.values()) / len(changes)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    if not values:
        raise ValueError("values must not be empty")
    mean = sum(values) / len(values)
    if len(values) == 1:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, math.sqrt(var)
