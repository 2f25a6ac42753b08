"""How the task losses are weighted before a method combines them (``--loss-weights``).

=========  ==================================================================================
name       weight of task ``t``'s loss
=========  ==================================================================================
``recipe`` the dataset recipe's fixed weight (NYUD: seg 1, depth 1, normals 10, edge 50, ...)
``equal``  1
``uw``     uncertainty weighting (Kendall et al., 2018): ``exp(-s_t) L_t / 2 + s_t / 2``, with
           ``s_t`` learnt (`mtl.methods.UncertaintyWeighting`)
``dwa``    dynamic weight average (Liu et al., 2019, MTAN): ``T softmax(r / 2)_t`` with
           ``r_t = L_t(e-1) / L_t(e-2)`` the ratio of the task's mean training loss over the two
           previous epochs; 1 in the first two epochs
=========  ==================================================================================

A weighting is per model: ``scale(task, loss) -> loss`` on the hot path (no host sync: the
weights are tensors or Python floats fixed for the epoch), ``end_epoch({task: mean loss})`` once
per epoch, and ``state_dict``/``load_state_dict`` for a bit-identical resume.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor, nn

from mtl.methods import UncertaintyWeighting

WEIGHTINGS = ("recipe", "equal", "uw", "dwa")
DWA_TEMPERATURE = 2.0


class LossWeighting(nn.Module):
    """Fixed weights ``{task: w}`` (``recipe`` and ``equal``); base of the others."""

    def __init__(self, tasks: Sequence[str], weights: Mapping[str, float] | None = None) -> None:
        super().__init__()
        self.tasks = tuple(tasks)
        self.weights = {t: float((weights or {}).get(t, 1.0)) for t in self.tasks}
        for task, w in self.weights.items():
            if not (math.isfinite(w) and w > 0):
                raise ValueError(f"loss weight of {task!r} must be positive, got {w!r}")

    def scale(self, task: str, loss: Tensor) -> Tensor:
        """The weighted loss of ``task`` (a scalar tensor)."""
        return loss * self.weights[task]

    def end_epoch(self, mean_losses: Mapping[str, float]) -> None:
        """Update from the epoch's mean (unweighted) training loss per task."""

    def extra_state(self) -> dict[str, Any]:
        return {"weights": dict(self.weights)}

    def load_extra_state(self, state: Mapping[str, Any]) -> None:
        self.weights = {t: float(state["weights"][t]) for t in self.tasks}

    def current(self) -> dict[str, float]:
        """The factor each task's loss is multiplied by now."""
        return dict(self.weights)


class UncertaintyLossWeighting(LossWeighting):
    """``uw``: learnt log-variances (their parameters join the optimizer)."""

    def __init__(self, tasks: Sequence[str]) -> None:
        super().__init__(tasks)
        self.uw = UncertaintyWeighting(self.tasks)

    def scale(self, task: str, loss: Tensor) -> Tensor:
        out: Tensor = self.uw(task, loss)
        return out

    def current(self) -> dict[str, float]:
        return self.uw.weights()


class DynamicWeightAverage(LossWeighting):
    """``dwa``: weights from the ratios of each task's last two epoch losses."""

    def __init__(self, tasks: Sequence[str], temperature: float = DWA_TEMPERATURE) -> None:
        super().__init__(tasks)
        self.temperature = temperature
        self.history: list[dict[str, float]] = []

    def end_epoch(self, mean_losses: Mapping[str, float]) -> None:
        self.history = [*self.history[-1:], {t: float(mean_losses[t]) for t in self.tasks}]
        if len(self.history) < 2:
            return
        before, last = self.history
        ratios = {t: last[t] / before[t] if before[t] > 0 else 1.0 for t in self.tasks}
        top = max(ratios.values())
        exps = {t: math.exp((r - top) / self.temperature) for t, r in ratios.items()}
        total = sum(exps.values())
        self.weights = {t: len(self.tasks) * e / total for t, e in exps.items()}

    def extra_state(self) -> dict[str, Any]:
        return {"weights": dict(self.weights), "history": [dict(h) for h in self.history]}

    def load_extra_state(self, state: Mapping[str, Any]) -> None:
        super().load_extra_state(state)
        self.history = [{t: float(h[t]) for t in self.tasks} for h in state["history"]]


def make_weighting(
    name: str, tasks: Sequence[str], recipe: Mapping[str, float] | None = None
) -> LossWeighting:
    """The weighting ``name`` (one of ``WEIGHTINGS``) of ``tasks``; ``recipe``: the recipe's
    ``{task: weight}`` (tasks it omits weigh 1)."""
    if name == "recipe":
        return LossWeighting(tasks, recipe or {})
    if name == "equal":
        return LossWeighting(tasks)
    if name == "uw":
        return UncertaintyLossWeighting(tasks)
    if name == "dwa":
        return DynamicWeightAverage(tasks)
    raise ValueError(f"loss weights must be one of {WEIGHTINGS}, got {name!r}")
