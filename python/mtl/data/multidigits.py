"""MultiDigits: a MultiMNIST-like multi-task data set built in memory from scikit-learn's digits.

scikit-learn ships 1,797 handwritten digits (8x8, values 0..16) inside the package, so nothing
is downloaded. Each example overlays two of them on one canvas, as MultiMNIST does:

* both digits are upsampled to ``DIGIT x DIGIT`` (16x16, bilinear) and scaled to ``[0, 1]``;
* the *left* digit sits at the top-left corner of a ``CANVAS x CANVAS`` (20x20) canvas, the
  *right* digit ``SHIFT`` (4) pixels down and right, so the two overlap over a 12x12 square;
* the image is their pixel-wise maximum.

Tasks (the paper's setting mixes classification and dense prediction):

=========  ================================  ==========================  ================
task       target                            loss                        metric
=========  ================================  ==========================  ================
``left``   class of the left digit, 0..9     cross-entropy               accuracy (%) ↑
``right``  class of the right digit, 0..9    cross-entropy               accuracy (%) ↑
``clean``  the left digit alone, [1, 20, 20]  mean squared error          RMSE ↓
``mask``   left digit's pixels > 0.5, 0/1     binary cross-entropy        IoU (%) ↑
=========  ================================  ==========================  ================

The splits are fixed by the seed: the 1,797 source digits are shuffled once and divided
60/20/20 into train, validation and test *source* digits, and each split's pairs are drawn
from its own source digits only, so no test digit is ever seen in training.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from mtl.data.base import Split, Splits, TaskSpec

DIGIT = 16  # side of one upsampled digit
SHIFT = 4  # offset of the right digit, down and right
CANVAS = DIGIT + SHIFT  # side of the composed image
MASK_THRESHOLD = 0.5
SOURCE_FRACTIONS = (0.6, 0.2, 0.2)

TASKS: dict[str, TaskSpec] = {
    "left": TaskSpec("left", "classify", "accuracy", lower_is_better=False),
    "right": TaskSpec("right", "classify", "accuracy", lower_is_better=False),
    "clean": TaskSpec("clean", "regress", "rmse", lower_is_better=True),
    "mask": TaskSpec("mask", "segment", "iou", lower_is_better=False),
}
DEFAULT_TASKS = ("left", "right", "clean")
NUM_CLASSES = 10

# A split (mtl.data.base.Split): ``images [n, 1, 20, 20]`` float32 in [0, 1];
# ``targets["left"]`` and ``["right"]``: int64 ``[n]`` in 0..9; ``targets["clean"]``: float32
# ``[n, 1, 20, 20]``; ``targets["mask"]``: float32 ``[n, 1, 20, 20]`` of 0s and 1s.


@dataclass(frozen=True)
class MultiDigits(Splits):
    """The three fixed splits of one seed."""

    train: Split
    val: Split
    test: Split
    seed: int


def _source_digits() -> tuple[Tensor, Tensor]:
    """scikit-learn's bundled digits: upsampled images ``[1797, 16, 16]`` and labels ``[1797]``."""
    from sklearn.datasets import load_digits  # bundled with scikit-learn: no download

    raw = load_digits()
    images = torch.as_tensor(raw.images, dtype=torch.float32) / 16.0  # [1797, 8, 8]
    labels = torch.as_tensor(raw.target, dtype=torch.int64)
    big = F.interpolate(images[:, None], size=(DIGIT, DIGIT), mode="bilinear", align_corners=False)
    return big[:, 0].clamp_(0.0, 1.0), labels


def _compose(digits: Tensor, labels: Tensor, count: int, generator: torch.Generator) -> Split:
    """``count`` random pairs of ``digits [m, 16, 16]`` composed on the canvas."""
    left = torch.randint(len(digits), (count,), generator=generator)
    right = torch.randint(len(digits), (count,), generator=generator)
    canvas_left = torch.zeros(count, 1, CANVAS, CANVAS)
    canvas_right = torch.zeros(count, 1, CANVAS, CANVAS)
    canvas_left[:, 0, :DIGIT, :DIGIT] = digits[left]
    canvas_right[:, 0, SHIFT:, SHIFT:] = digits[right]
    images = torch.maximum(canvas_left, canvas_right)
    targets = {
        "left": labels[left].clone(),
        "right": labels[right].clone(),
        "clean": canvas_left,
        "mask": (canvas_left > MASK_THRESHOLD).float(),
    }
    return Split(images, targets)


def make_multidigits(
    seed: int = 0, train_size: int = 4096, val_size: int = 1024, test_size: int = 2048
) -> MultiDigits:
    """Build the train/validation/test splits of one seed, in memory (well under a second).

    Deterministic: the same arguments give bitwise identical tensors. Sizes count composed
    pairs; the source digits are split 60/20/20 first (see the module docstring).
    """
    for name, value in (
        ("train_size", train_size),
        ("val_size", val_size),
        ("test_size", test_size),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    digits, labels = _source_digits()
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(digits), generator=generator)
    n_train = int(SOURCE_FRACTIONS[0] * len(digits))
    n_val = int(SOURCE_FRACTIONS[1] * len(digits))
    parts = (order[:n_train], order[n_train : n_train + n_val], order[n_train + n_val :])
    sizes = (train_size, val_size, test_size)
    splits = [
        _compose(digits[part], labels[part], size, generator)
        for part, size in zip(parts, sizes, strict=True)
    ]
    return MultiDigits(splits[0], splits[1], splits[2], seed=seed)


def check_tasks(tasks: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """Validate a task list against ``TASKS``; returns it as a tuple."""
    tasks = tuple(tasks)
    if not tasks:
        raise ValueError("tasks must name at least one task")
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"tasks: unknown {unknown}; choose from {sorted(TASKS)}")
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"tasks must not repeat a task, got {list(tasks)}")
    return tasks
