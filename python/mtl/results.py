"""The record of one training run (`mtl.train.train_run`), shared by the harness, the reports
and the plots (kept apart from `mtl.train` so that plotting never imports the harness)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class RunResult:
    """What one (method, seed) run produced.

    ``test``/``val``: final metric per task; ``history``: per epoch, the mean training loss
    per task (``loss``) and the validation metrics (``val``); ``wall_s``: the whole run
    (model construction, all steps, validation and evaluation); ``step_ms``: quartiles
    ``(q1, median, q3)`` of the time of one training step, over ``timed_steps`` steps after
    the first ``warmup_steps`` of each model (see the module docstring);
    ``optimizer_steps``: ``optimizer.step()`` calls (summed over the models of ``single``);
    ``test_all``: every metric of every task on the test split (the primary one first);
    ``loss_scales``: for a ``_uw`` method, the final factor of each task's loss.
    """

    method: str
    seed: int
    tasks: list[str]
    test: dict[str, float]
    val: dict[str, float]
    wall_s: float
    optimizer_steps: int
    history: list[dict[str, dict[str, float]]] = field(default_factory=list)
    step_ms: tuple[float, float, float] = (float("nan"),) * 3
    timed_steps: int = 0
    warmup_steps: int = 0
    test_all: dict[str, dict[str, float]] = field(default_factory=dict)
    loss_scales: dict[str, float] = field(default_factory=dict)

    @property
    def step_ms_median(self) -> float:
        return self.step_ms[1]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)
