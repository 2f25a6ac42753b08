"""Per-task metrics (MultiDigits, Scenes) and the paper's multi-task score Δm.

Δm (Maninis et al., 2019; the paper's Eq. in Sec. 5) compares a multi-task model ``m`` with
the single-task models ``b``, task by task::

    Δm = (1/T) Σ_t (-1)^{l_t} (M_m,t - M_b,t) / M_b,t × 100 %,   l_t = 1 if lower is better

so Δm > 0 means better than the single-task models on average.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from mtl.data.base import Split, TaskSpec
from mtl.data.multidigits import TASKS
from mtl.models.multidigits import predict as multidigits_predict

Predict = Callable[[str, Tensor], Tensor]  # (task, head output) -> prediction


class Meter(ABC):
    """One metric pooled over a split: ``update`` per batch, ``value()`` at the end (NaN
    before any update). Sums are kept in float64 Python numbers, so the batch size does not
    change the result beyond rounding."""

    lower_is_better: bool

    @abstractmethod
    def update(self, prediction: Tensor, target: Tensor) -> None:
        """Add one batch (``prediction`` from ``predict``, same shape as ``target``)."""

    @abstractmethod
    def value(self) -> float:
        """The metric so far."""


class _Ratio(Meter):
    def __init__(self) -> None:
        self._num = 0.0
        self._den = 0.0

    def _ratio(self) -> float:
        return math.nan if self._den == 0 else self._num / self._den


class Accuracy(_Ratio):
    """% of predictions equal to the target."""

    lower_is_better = False

    def update(self, prediction: Tensor, target: Tensor) -> None:
        self._num += float((prediction == target).sum())
        self._den += target.numel()

    def value(self) -> float:
        return 100.0 * self._ratio()


class RMSE(_Ratio):
    """Root of the mean squared error over every element of the split."""

    lower_is_better = True

    def update(self, prediction: Tensor, target: Tensor) -> None:
        self._num += float(((prediction.double() - target.double()) ** 2).sum())
        self._den += target.numel()

    def value(self) -> float:
        return math.sqrt(self._ratio())


class AbsRel(_Ratio):
    """Mean of ``|prediction - target| / target`` over the elements with ``target > 0``."""

    lower_is_better = True

    def update(self, prediction: Tensor, target: Tensor) -> None:
        valid = target > 0
        p, t = prediction.double()[valid], target.double()[valid]
        self._num += float(((p - t).abs() / t).sum())
        self._den += int(valid.sum())

    def value(self) -> float:
        return self._ratio()


class BinaryIoU(_Ratio):
    """% intersection over union of the masks ``> 0.5``, pooled over the split."""

    lower_is_better = False

    def update(self, prediction: Tensor, target: Tensor) -> None:
        pred, true = prediction > 0.5, target > 0.5
        self._num += float((pred & true).sum())
        self._den += float((pred | true).sum())

    def value(self) -> float:
        return 100.0 * self._ratio()


class MeanIoU(Meter):
    """% mean over classes of the intersection over union, from the split's confusion matrix.

    Class ids in ``0..classes-1``; a class absent from both the predictions and the targets of
    the whole split is left out of the mean (its IoU is undefined).
    """

    lower_is_better = False

    def __init__(self, classes: int) -> None:
        if isinstance(classes, bool) or not isinstance(classes, int) or classes < 2:
            raise ValueError(f"classes must be an int >= 2, got {classes!r}")
        self.classes = classes
        self.confusion = torch.zeros(classes, classes, dtype=torch.int64)  # [true, predicted]

    def update(self, prediction: Tensor, target: Tensor) -> None:
        p, t = prediction.reshape(-1).long(), target.reshape(-1).long()
        if p.numel() and (int(t.min()) < 0 or int(max(t.max(), p.max())) >= self.classes):
            raise ValueError(f"class ids must lie in 0..{self.classes - 1}")
        counts = torch.bincount(t * self.classes + p, minlength=self.classes**2)
        self.confusion += counts.reshape(self.classes, self.classes).cpu()

    def per_class(self) -> Tensor:
        """float64 ``[classes]`` IoU in % (NaN for a class seen nowhere)."""
        c = self.confusion.double()
        inter = c.diagonal()
        union = c.sum(0) + c.sum(1) - inter
        return torch.where(union > 0, 100.0 * inter / union.clamp_min(1), math.nan)

    def value(self) -> float:
        iou = self.per_class()
        seen = iou[~iou.isnan()]
        return math.nan if seen.numel() == 0 else float(seen.mean())


class MeanAngle(_Ratio):
    """Mean angle in degrees between predicted and true vectors along dim 1 (``[B, 3, ...]``);
    both are normalised first, and pixels whose true vector is zero are left out."""

    lower_is_better = True

    def update(self, prediction: Tensor, target: Tensor) -> None:
        p, t = prediction.double(), target.double()
        valid = t.norm(dim=1) > 0
        cos = (nn.functional.normalize(p, dim=1) * nn.functional.normalize(t, dim=1)).sum(1)
        angle = torch.rad2deg(torch.acos(cos.clamp(-1.0, 1.0)))
        self._num += float(angle[valid].sum())
        self._den += int(valid.sum())

    def value(self) -> float:
        return self._ratio()


METRICS: dict[str, type[Meter]] = {
    "accuracy": Accuracy,
    "rmse": RMSE,
    "abs_rel": AbsRel,
    "iou": BinaryIoU,
    "miou": MeanIoU,
    "angle": MeanAngle,
}


def make_meter(metric: str, spec: TaskSpec) -> Meter:
    """A fresh meter of ``metric`` (a key of `METRICS`) for the task ``spec``."""
    if metric not in METRICS:
        raise ValueError(f"task {spec.name!r}: unknown metric {metric!r}; known {sorted(METRICS)}")
    if metric == "miou":
        return MeanIoU(spec.classes)
    return METRICS[metric]()  # type: ignore[call-arg]


def arrow(metric: str) -> str:
    """``"<metric> ↑"`` or ``"<metric> ↓"``."""
    return f"{metric} {'↓' if METRICS[metric].lower_is_better else '↑'}"


class TaskMeter:
    """Accumulates one task's metrics over batches; ``value()`` is the split-level figure of
    its primary metric, ``values()`` every metric's (see `METRICS`).

    ``spec`` describes the task; by default it is looked up in MultiDigits' task table.
    accuracy: % of correct classes; rmse: root of the mean squared error over all pixels of
    the split; iou: % intersection over union of the predicted and true masks, pooled over the
    split; miou: mean over classes of the IoU; abs_rel: mean relative error; angle: mean
    angular error in degrees.
    """

    def __init__(self, task: str, spec: TaskSpec | None = None) -> None:
        if spec is None:
            if task not in TASKS:
                raise ValueError(f"task must be one of {sorted(TASKS)}, got {task!r}")
            spec = TASKS[task]
        self.task = task
        self.spec = spec
        self.metric = spec.metric
        self.meters = {m: make_meter(m, spec) for m in spec.metrics}

    def update(self, prediction: Tensor, target: Tensor) -> None:
        """Add one batch (``predict`` output and the target, same shapes)."""
        if prediction.shape != target.shape:
            raise ValueError(
                f"prediction shape {tuple(prediction.shape)} != target {tuple(target.shape)}"
            )
        for meter in self.meters.values():
            meter.update(prediction, target)

    def value(self) -> float:
        """The primary metric so far (NaN before any update)."""
        return self.meters[self.metric].value()

    def values(self) -> dict[str, float]:
        """Every metric so far, the primary one first."""
        return {m: meter.value() for m, meter in self.meters.items()}


@torch.no_grad()
def evaluate_all(
    model: nn.Module,
    split: Split,
    tasks: Sequence[str],
    batch_size: int = 512,
    *,
    specs: Mapping[str, TaskSpec] | None = None,
    predict: Predict | None = None,
) -> dict[str, dict[str, float]]:
    """Every metric of every task on ``split`` (eval mode: each task's BatchNorm running
    stats): ``{task: {metric: value}}``, the primary metric first.

    ``specs`` and ``predict`` default to MultiDigits'. The model is put back into the
    training mode it had before.
    """
    predict = predict or multidigits_predict
    was_training = model.training
    model.eval()
    meters = {t: TaskMeter(t, specs[t] if specs is not None else None) for t in tasks}
    device = next(model.parameters()).device
    try:
        for start in range(0, len(split), batch_size):
            index = torch.arange(start, min(start + batch_size, len(split)), device=device)
            images, targets = split.batch(index)
            for task in tasks:
                meters[task].update(predict(task, model(images, task=task)), targets[task])
    finally:
        model.train(was_training)
    return {t: m.values() for t, m in meters.items()}


def evaluate(
    model: nn.Module,
    split: Split,
    tasks: Sequence[str],
    batch_size: int = 512,
    *,
    specs: Mapping[str, TaskSpec] | None = None,
    predict: Predict | None = None,
) -> dict[str, float]:
    """Every task's primary metric on ``split``; see `evaluate_all`."""
    every = evaluate_all(model, split, tasks, batch_size, specs=specs, predict=predict)
    return {t: next(iter(values.values())) for t, values in every.items()}


def lower_is_better(
    tasks: Sequence[str], specs: Mapping[str, TaskSpec] | None = None
) -> dict[str, bool]:
    """``l_t`` of every task, from ``specs`` (default: multidigits.TASKS)."""
    table = TASKS if specs is None else specs
    return {t: table[t].lower_is_better for t in tasks}


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
