"""The dense datasets' metrics, pooled over a whole split, and the paper's Δm.

`DenseMetrics(spec)` accumulates batches (``update``) and reports (``compute``) a dict keyed
``"task/metric"``. Units: mIoU, pixel accuracy, saliency maxF and mIoU and the normals'
threshold shares are in percent; depth errors in the target's units (metres; disparity for
Cityscapes); angles in degrees.

    semseg, human_parts  mIoU: per-class TP, FP, FN summed over the split (ignore 255 left
                         out), IoU = TP / max(TP + FP + FN, 1e-8), the mean over classes; a class
                         absent from prediction and target counts 0 (``spec.absent_class ==
                         "zero"``, MTLP) or is left out of the mean (``"skip"``, MTAN).
                         pixel_acc: correct / valid pixels.
    depth, disparity     over valid pixels (target > 0) of the split: rmse, log_rmse (prediction
                         clamped ≥ 1e-9), abs_rel = mean |p − g| / g; MTAN's abs_err = mean
                         |p − g| and rel_err = abs_rel.
    normals              prediction L2-normalised; angle = arccos(clip(<p, g>, −1, 1)) over valid
                         pixels (target ≠ 0), pooled: mean, median (from a 0.001° histogram:
                         within 0.0005° of the exact median), % of pixels below 11.25, 22.5, 30°.
    sal                  sigmoid(pred) (or probabilities) at 15 thresholds linspace(0.2, 0.9);
                         per image IoU, precision, recall, averaged over images per threshold;
                         F = 2PR / (P + R) from the mean P and R; maxF and mIoU the maxima over
                         thresholds.
    edge                 not scored (odsF needs an external toolbox).

Totals are accumulated on the inputs' device in float64 / int64 (sums, not means, so batch
boundaries do not matter); ``compute`` reads them once. Evaluation is off the training hot path:
masking valid pixels may synchronise with the device.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from mtl.data.spec import DenseDatasetSpec, lower_is_better

SAL_THRESHOLDS = torch.linspace(0.2, 0.9, 15, dtype=torch.float64)
ANGLE_BINS_PER_DEGREE = 1000
NORMAL_THRESHOLDS = (11.25, 22.5, 30.0)
EPS = 1e-8


def _classes(pred: Tensor, target: Tensor, task: str) -> tuple[Tensor, Tensor]:
    """Predicted and target labels ``[B, H, W]`` (``pred``: logits ``[B, C, H, W]`` or labels)."""
    labels = pred.argmax(1) if pred.is_floating_point() else pred
    if target.ndim == 4 and target.shape[1] == 1:
        target = target[:, 0]
    if labels.shape != target.shape:
        raise ValueError(
            f"pred[{task!r}] gives labels of shape {tuple(labels.shape)}, target[{task!r}] has "
            f"{tuple(target.shape)}"
        )
    return labels, target


def _dense(pred: Tensor, target: Tensor, task: str, channels: int) -> None:
    if pred.ndim != 4 or pred.shape[1] != channels or pred.shape != target.shape:
        raise ValueError(
            f"pred[{task!r}] and target[{task!r}] must both be [B, {channels}, H, W], got "
            f"{tuple(pred.shape)} and {tuple(target.shape)}"
        )


class _Confusion:
    """Pooled per-class TP / FP / FN and the pixel accuracy."""

    def __init__(self, classes: int, ignore_index: int, absent: str) -> None:
        self.classes, self.ignore, self.absent = classes, ignore_index, absent
        self.matrix: Tensor | None = None  # [C, C]: rows target, columns prediction
        self.bad: Tensor | None = None  # labels out of range, reported by compute (no sync)

    def update(self, labels: Tensor, target: Tensor) -> None:
        valid = target != self.ignore
        t, p = target[valid].long(), labels[valid].long()
        c = self.classes
        ok = (t >= 0) & (t < c) & (p >= 0) & (p < c)
        bad = (~ok).sum()
        counts = torch.bincount((t * c + p)[ok], minlength=c * c).reshape(c, c)
        self.matrix = counts if self.matrix is None else self.matrix + counts
        self.bad = bad if self.bad is None else self.bad + bad

    def compute(self) -> dict[str, float]:
        if self.matrix is None:
            return {"mIoU": math.nan, "pixel_acc": math.nan}
        if self.bad is not None and int(self.bad):
            raise ValueError(
                f"{int(self.bad)} labels (prediction or target) were outside [0, {self.classes})"
                f" and not {self.ignore} (ignore)"
            )
        m = self.matrix.double().cpu()
        tp = m.diag()
        union = m.sum(0) + m.sum(1) - tp
        iou = tp / union.clamp_min(EPS)
        miou = iou.mean() if self.absent == "zero" else iou[union > 0].mean()
        acc = tp.sum() / m.sum().clamp_min(EPS)
        return {"mIoU": 100.0 * float(miou), "pixel_acc": 100.0 * float(acc)}


class _DepthErrors:
    """Pooled sums over valid pixels of squared, log-squared, absolute and relative errors."""

    def __init__(self) -> None:
        self.sums: Tensor | None = None  # [n, sq, logsq, abs, rel]

    def update(self, pred: Tensor, target: Tensor) -> None:
        valid = torch.isfinite(target) & (target > 0)
        g = target[valid].double()
        p = pred[valid].double()
        diff = p - g
        logdiff = torch.log(p.clamp_min(1e-9)) - torch.log(g)
        sums = torch.stack(
            [
                valid.sum().double(),
                (diff * diff).sum(),
                (logdiff * logdiff).sum(),
                diff.abs().sum(),
                (diff.abs() / g).sum(),
            ]
        )
        self.sums = sums if self.sums is None else self.sums + sums

    def compute(self) -> dict[str, float]:
        if self.sums is None or float(self.sums[0]) == 0:
            return dict.fromkeys(("rmse", "log_rmse", "abs_rel", "abs_err", "rel_err"), math.nan)
        n, sq, logsq, ab, rel = (float(v) for v in self.sums.cpu())
        return {
            "rmse": math.sqrt(sq / n),
            "log_rmse": math.sqrt(logsq / n),
            "abs_rel": rel / n,
            "abs_err": ab / n,
            "rel_err": rel / n,
        }


class _Angles:
    """Pooled angle sum, threshold counts and a fine histogram (for the median)."""

    def __init__(self) -> None:
        self.bins = 180 * ANGLE_BINS_PER_DEGREE + 1
        self.hist: Tensor | None = None
        self.sums: Tensor | None = None  # [n, sum, <11.25, <22.5, <30]

    def update(self, pred: Tensor, target: Tensor) -> None:
        valid = target.abs().sum(1) > 0  # [B, H, W]
        p = pred.double().permute(0, 2, 3, 1)[valid]  # [n, 3]
        g = target.double().permute(0, 2, 3, 1)[valid]
        p = p / p.norm(dim=1, keepdim=True).clamp_min(1e-12)
        cos = (p * g).sum(1).clamp(-1.0, 1.0)
        angle = torch.rad2deg(torch.arccos(cos))
        index = (angle * ANGLE_BINS_PER_DEGREE).long().clamp(0, self.bins - 1)
        hist = torch.bincount(index, minlength=self.bins)
        sums = torch.stack(
            [valid.sum().double(), angle.sum()]
            + [(angle < t).sum().double() for t in NORMAL_THRESHOLDS]
        )
        self.hist = hist if self.hist is None else self.hist + hist
        self.sums = sums if self.sums is None else self.sums + sums

    def _median(self, hist: Tensor, n: int) -> float:
        cum = hist.cumsum(0)
        lo = int(torch.searchsorted(cum, torch.tensor((n - 1) // 2 + 1)))
        hi = int(torch.searchsorted(cum, torch.tensor(n // 2 + 1)))
        return ((lo + hi) / 2 + 0.5) / ANGLE_BINS_PER_DEGREE

    def compute(self) -> dict[str, float]:
        names = ("mean", "median", *(f"{t:g}" for t in NORMAL_THRESHOLDS))
        if self.sums is None or self.hist is None or float(self.sums[0]) == 0:
            return dict.fromkeys(names, math.nan)
        n, total, *within = (float(v) for v in self.sums.cpu())
        values = [total / n, self._median(self.hist.cpu(), int(n))]
        values += [100.0 * w / n for w in within]
        return dict(zip(names, values, strict=True))


class _Saliency:
    """Per-threshold sums over images of IoU, precision and recall."""

    def __init__(self, ignore_index: int, probabilities: bool) -> None:
        self.ignore, self.probabilities = ignore_index, probabilities
        self.sums: Tensor | None = None  # [3, 15]: IoU, precision, recall summed over images
        self.images: Tensor | None = None

    def update(self, pred: Tensor, target: Tensor) -> None:
        if target.ndim == 3:
            target = target[:, None]
        _dense(pred, target, "sal", 1)
        prob = pred.double() if self.probabilities else torch.sigmoid(pred.double())
        valid = (target != self.ignore).flatten(1)  # [B, P]
        gt = (target == 1).flatten(1) & valid
        thresholds = SAL_THRESHOLDS.to(prob.device)
        fg = (prob.flatten(1)[:, None] > thresholds[None, :, None]) & valid[:, None]  # [B,15,P]
        tp = (fg & gt[:, None]).sum(-1).double()
        fp = (fg & ~gt[:, None]).sum(-1).double()
        fn = (~fg & gt[:, None] & valid[:, None]).sum(-1).double()
        iou = tp / (tp + fp + fn).clamp_min(EPS)
        precision = tp / (tp + fp).clamp_min(EPS)
        recall = tp / (tp + fn).clamp_min(EPS)
        sums = torch.stack([iou.sum(0), precision.sum(0), recall.sum(0)])
        images = torch.tensor(float(pred.shape[0]), dtype=torch.float64, device=pred.device)
        self.sums = sums if self.sums is None else self.sums + sums
        self.images = images if self.images is None else self.images + images

    def compute(self) -> dict[str, float]:
        if self.sums is None or self.images is None:
            return {"maxF": math.nan, "mIoU": math.nan}
        iou, p, r = (self.sums / self.images).cpu()
        f = 2 * p * r / (p + r).clamp_min(EPS)
        return {"maxF": 100.0 * float(f.max()), "mIoU": 100.0 * float(iou.max())}


class DenseMetrics:
    """A split's metrics for every scored task of ``spec``.

    ``update(pred, target)``: ``pred[task]`` is the model's output (``semseg``/``human_parts``
    logits ``[B, C, H, W]`` or labels ``[B, H, W]``; ``depth``/``disparity`` ``[B, 1, H, W]``;
    ``normals`` ``[B, 3, H, W]``, any length; ``sal`` logits ``[B, 1, H, W]``, or probabilities
    with ``sal_probabilities=True``), ``target[task]`` the batch's labels as the loaders give
    them. Tasks missing from either dict, and auxiliary tasks, are skipped. Inputs are read,
    never modified.
    """

    def __init__(self, spec: DenseDatasetSpec, sal_probabilities: bool = False) -> None:
        self.spec = spec
        self.sal_probabilities = sal_probabilities
        self.reset()

    def reset(self) -> None:
        """Forget every batch seen."""
        spec = self.spec
        self._meters: dict[str, _Confusion | _DepthErrors | _Angles | _Saliency] = {}
        for task in spec.scored_tasks:
            if task == "sal":
                self._meters[task] = _Saliency(spec.ignore_index, self.sal_probabilities)
            elif task in spec.num_classes:
                self._meters[task] = _Confusion(
                    spec.num_classes[task], spec.ignore_index, spec.absent_class
                )
            elif task in ("depth", "disparity"):
                self._meters[task] = _DepthErrors()
            elif task == "normals":
                self._meters[task] = _Angles()
            else:
                raise ValueError(f"no metric for task {task!r} of {spec.name}")

    @torch.no_grad()
    def update(self, pred: Mapping[str, Tensor], target: Mapping[str, Tensor]) -> None:
        """Add one batch."""
        for name, table in (("pred", pred), ("target", target)):
            if not isinstance(table, Mapping):
                raise TypeError(
                    f"{name} must be a mapping task -> Tensor, got {type(table).__name__}"
                )
        for task, meter in self._meters.items():
            if task not in pred or task not in target:
                continue
            for name, table in (("pred", pred), ("target", target)):
                if not isinstance(table[task], Tensor):
                    kind = type(table[task]).__name__
                    raise TypeError(f"{name}[{task!r}] must be a Tensor, got {kind}")
            p, t = pred[task].detach(), target[task].detach()
            if isinstance(meter, _Confusion):
                meter.update(*_classes(p, t, task))
            elif isinstance(meter, _DepthErrors):
                _dense(p, t, task, 1)
                meter.update(p, t)
            elif isinstance(meter, _Angles):
                _dense(p, t, task, 3)
                meter.update(p, t)
            else:
                meter.update(p, t)

    def compute(self) -> dict[str, float]:
        """``{"task/metric": value}`` for every metric of ``spec.metrics`` (NaN: no data)."""
        out = {}
        for task, meter in self._meters.items():
            values = meter.compute()
            for name in self.spec.metrics[task]:
                out[f"{task}/{name}"] = values[name]
        return out


def delta_m(
    results: Mapping[str, float], single_task: Mapping[str, float], spec: DenseDatasetSpec
) -> float:
    """Δm in percent: the mean over ``spec.delta_metrics`` of ``(−1)^l (M − M_single) /
    M_single``, ``l = 1`` for a lower-is-better metric (one metric per task for NYUD and PASCAL;
    Cityscapes' four metrics, two per task, averaged plainly: the same as averaging per task)."""
    terms = []
    for key in spec.delta_metrics:
        for name, table in (("results", results), ("single_task", single_task)):
            if key not in table or not math.isfinite(table[key]):
                raise ValueError(f"{name} has no finite {key!r} (needed by Δm for {spec.name})")
        base = single_task[key]
        if base == 0:
            raise ValueError(f"single_task[{key!r}] is 0: Δm divides by it")
        sign = -1.0 if lower_is_better(key) else 1.0
        terms.append(sign * (results[key] - base) / base)
    return 100.0 * sum(terms) / len(terms)
