"""What a dense dataset is: its tasks, classes, metrics and the paper's training recipe.

`DenseDatasetSpec` is the contract between a dataset module (`mtl.data.nyud`, `.pascal`,
`.mtan`), the metrics (`mtl.dense_metrics`) and the training program: it says which tasks a
sample carries, how each is scored and which metric of each task enters Δm.

Sample conventions shared by every loader (``H, W`` the output size)::

    image        float32 [3, H, W]  (ImageNet-normalised unless the recipe says otherwise)
    semseg       int64   [H, W]     class ids, 255 = ignore
    human_parts  int64   [H, W]     class ids, 255 = ignore
    sal          int64   [H, W]     0/1, 255 = ignore
    depth        float32 [1, H, W]  metres, 0 = invalid
    disparity    float32 [1, H, W]  (Cityscapes) 0 = invalid
    normals      float32 [3, H, W]  unit vectors, the zero vector = invalid
    edge         float32 [1, H, W]  0/1
    meta         {"id": str}
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

IGNORE_INDEX = 255
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

CLASSIFICATION_TASKS = ("semseg", "human_parts", "sal")
LOWER_IS_BETTER = frozenset({"rmse", "log_rmse", "abs_rel", "abs_err", "rel_err", "mean", "median"})


def lower_is_better(metric: str) -> bool:
    """Whether a metric (``"task/metric"`` or bare ``"metric"``) improves downwards."""
    return metric.rsplit("/", 1)[-1] in LOWER_IS_BETTER


@dataclass(frozen=True)
class Augment:
    """The recipe's random train-time geometry (applied in this order: flip, scale/rotate).

    ``scales``: a discrete set to pick from (NYUD, MTAN) or, with ``scale_range``, a uniform
    range (PASCAL). ``rotation``: maximum degrees of a uniform rotation about the centre.
    ``crop_scale``: the MTAN style (a random crop of size (H/s, W/s) resized back) instead of
    a zoom about the centre.
    """

    flip: bool = True
    scales: tuple[float, ...] = (1.0,)
    scale_range: tuple[float, float] | None = None
    rotation: float = 0.0
    crop_scale: bool = False


@dataclass(frozen=True)
class Recipe:
    """The paper's (or the reference codebase's) training recipe for a dataset.

    ``image_size``: the fixed (H, W) every sample is resized to (``None``: keep the stored size).
    ``schedule``: ``"poly"`` (lr·(1 - e/E)^0.9 per epoch) or ``"step"`` (× ``gamma`` every
    ``step_size`` epochs). ``interpolation``: the resize mode per key (``image``, each task).
    """

    image_size: tuple[int, int] | None
    epochs: int
    batch_size: int
    optimizer: str
    lr: float
    weight_decay: float
    schedule: str
    loss_weights: Mapping[str, float]
    backbone: str
    normalize: bool = True
    augment: Augment = field(default_factory=Augment)
    interpolation: Mapping[str, str] = field(default_factory=dict)
    step_size: int = 0
    gamma: float = 1.0
    poly_power: float = 0.9


@dataclass(frozen=True)
class DenseDatasetSpec:
    """A dense multi-task dataset.

    ``tasks``: the paper's tasks in order (auxiliary ones last, also listed in ``auxiliary``:
    trained, never scored). ``num_classes``: per classification task. ``metrics``: every
    metric reported per task (keys of `mtl.dense_metrics.DenseMetrics.compute` are
    ``"task/metric"``). ``delta_metrics``: the ``"task/metric"`` entries averaged by Δm, each
    with its direction from `lower_is_better`. ``absent_class``: how mIoU treats a class absent
    from both prediction and target over the whole split (``"zero"``: counts 0, as MTLP;
    ``"skip"``: left out of the mean, as MTAN's confusion matrix).
    """

    name: str
    tasks: tuple[str, ...]
    num_classes: Mapping[str, int]
    metrics: Mapping[str, tuple[str, ...]]
    delta_metrics: tuple[str, ...]
    recipe: Recipe
    auxiliary: tuple[str, ...] = ()
    absent_class: str = "zero"
    ignore_index: int = IGNORE_INDEX

    @property
    def scored_tasks(self) -> tuple[str, ...]:
        """The tasks with metrics (``tasks`` without the auxiliary ones)."""
        return tuple(t for t in self.tasks if t not in self.auxiliary)

    def check_tasks(self, tasks: tuple[str, ...] | list[str] | None) -> tuple[str, ...]:
        """``tasks`` validated against this dataset (``None``: all of them)."""
        if tasks is None:
            return self.tasks
        unknown = [t for t in tasks if t not in self.tasks]
        if unknown or not tasks:
            raise ValueError(
                f"tasks must be a non-empty subset of {self.tasks} for {self.name}, got {tasks!r}"
            )
        return tuple(tasks)
