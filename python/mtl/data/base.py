"""Containers every benchmark's data shares: a task's description and one split of examples.

A benchmark (MultiDigits, Scenes) describes each task with a `TaskSpec` and stores each split as
a `Split`: the input images and one target tensor per task, indexed on the first dimension.
A split may keep its tensors in a compact storage type (e.g. ``uint8`` images) and turn a batch
into the model's types in ``decode``; the harness only ever reads batches through ``batch``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import Tensor

SPLITS = ("train", "val", "test")
S = TypeVar("S", bound="Splits")


@dataclass(frozen=True)
class TaskSpec:
    """What one task predicts and how it is scored.

    ``metric`` is the task's figure in Δm; ``extra_metrics`` are reported beside it. Metric
    names are those of `mtl.metrics.METRICS`. ``classes``: the number of classes of a
    per-pixel classification task (0 otherwise).
    """

    name: str
    kind: str
    metric: str
    lower_is_better: bool
    extra_metrics: tuple[str, ...] = ()
    classes: int = 0

    @property
    def metrics(self) -> tuple[str, ...]:
        """The primary metric, then the extra ones."""
        return (self.metric, *self.extra_metrics)


@dataclass(frozen=True)
class Split:
    """One split: ``images [n, ...]`` and a target per task (``targets[task]: [n, ...]``)."""

    images: Tensor
    targets: dict[str, Tensor]

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def to(self, device: torch.device | str) -> Split:
        """A copy on ``device`` (same class, same storage types)."""
        return type(self)(
            self.images.to(device), {k: v.to(device) for k, v in self.targets.items()}
        )

    def decode(
        self, images: Tensor, targets: dict[str, Tensor]
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Turn stored tensors into the model's inputs and the losses' targets (identity here)."""
        return images, targets

    def batch(self, index: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Images and targets of the examples at ``index`` (int64 ``[b]``), decoded."""
        return self.decode(self.images[index], {k: v[index] for k, v in self.targets.items()})


class Splits:
    """A benchmark's three splits: base of a frozen dataclass with ``train``, ``val`` and
    ``test`` fields (`Split`s) and any other fields (seed, resolution) kept as they are."""

    def split(self, name: str) -> Any:
        """``"train"``, ``"val"`` or ``"test"``."""
        if name not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {name!r}")
        return getattr(self, name)

    def to(self: S, device: torch.device | str) -> S:
        """A copy with every split on ``device``."""
        moved = {name: getattr(self, name).to(device) for name in SPLITS}
        return dataclasses.replace(self, **moved)  # type: ignore[type-var]
