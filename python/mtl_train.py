"""The shared training harness of demo.py and reproduce.py: one method, one seed, one run.

Every method gets the same model (``MultiDigitsNet``), initialisation (``torch.manual_seed``),
batch order, optimizer (Adam), learning rate and number of epochs. ``single`` trains one
single-task model per task under the same budget and reports each on its own task.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from mtl_methods import TrainStep, make_step
from mtl_metrics import evaluate
from mtl_models import MultiDigitsNet, task_loss
from multidigits import MultiDigits, Split
from torch import Tensor

Progress = Callable[[int], None]  # called with the number of batches just done


@dataclass(frozen=True)
class TrainConfig:
    """The budget and optimizer every method shares."""

    epochs: int = 8
    batch_size: int = 128
    lr: float = 1e-3
    width: int = 32
    loss_weights: dict[str, float] = field(default_factory=dict)  # task -> weight (default 1)
    cs_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "width"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr!r}")
        for task, weight in self.loss_weights.items():
            if not weight > 0:
                raise ValueError(f"loss_weights[{task!r}] must be positive, got {weight!r}")

    def weight(self, task: str) -> float:
        """The loss weight of ``task`` (1 unless set)."""
        return float(self.loss_weights.get(task, 1.0))

    def steps_per_epoch(self, train: Split) -> int:
        """Full batches per epoch (the last partial batch is dropped)."""
        steps = len(train) // self.batch_size
        if steps < 1:
            raise ValueError(
                f"batch_size {self.batch_size} exceeds the {len(train)} training examples"
            )
        return steps


@dataclass
class RunResult:
    """What one (method, seed) run produced.

    ``test``/``val``: final metric per task; ``history``: per epoch, the mean training loss
    per task (``loss``) and the validation metrics (``val``); ``wall_s``: training and
    evaluation time; ``optimizer_steps``: ``optimizer.step()`` calls (summed over the models
    of ``single``).
    """

    method: str
    seed: int
    tasks: list[str]
    test: dict[str, float]
    val: dict[str, float]
    wall_s: float
    optimizer_steps: int
    history: list[dict[str, dict[str, float]]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def batch_orders(size: int, batch_size: int, epochs: int, seed: int) -> list[list[Tensor]]:
    """Per epoch, the index batches of a seeded shuffle (identical for every method)."""
    gen = torch.Generator().manual_seed(seed)
    steps = size // batch_size
    orders = []
    for _ in range(epochs):
        perm = torch.randperm(size, generator=gen)
        orders.append([perm[i * batch_size : (i + 1) * batch_size] for i in range(steps)])
    return orders


def _train_model(
    method: str,
    tasks: Sequence[str],
    data: MultiDigits,
    config: TrainConfig,
    seed: int,
    progress: Progress | None,
) -> tuple[MultiDigitsNet, TrainStep, list[dict[str, dict[str, float]]], int]:
    """Train one model on ``tasks`` with ``method``; returns it, its step and its history."""
    device = data.train.images.device
    torch.manual_seed(seed)
    model = MultiDigitsNet(tasks, width=config.width).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    orders = batch_orders(len(data.train), config.batch_size, config.epochs, seed)
    sample = data.train.images[orders[0][0].to(device)]
    step = make_step(
        method,
        model,
        tasks,
        optimizer,
        shared=model.shared_parameters(),
        sample_input=sample,
        seed=seed,
        cs_options=config.cs_options,
    )
    history = []
    weights = {t: config.weight(t) for t in tasks}
    count_steps = _step_counter(optimizer)
    model.train()
    for epoch, batches in enumerate(orders):
        sums = {t: torch.zeros((), device=device) for t in tasks}
        for index in batches:
            images, targets = data.train.batch(index.to(device))

            def loss_fn(
                task: str, images: Tensor = images, targets: dict[str, Tensor] = targets
            ) -> Tensor:
                loss = task_loss(task, model(images, task=task), targets[task])
                return loss * weights[task] if weights[task] != 1.0 else loss

            losses = step(loss_fn, epoch, config.epochs)
            for t in tasks:
                sums[t] += losses[t]
            if progress is not None:
                progress(1)
        loss = {t: float(v) / len(batches) for t, v in sums.items()}  # one sync per epoch
        history.append({"loss": loss, "val": evaluate(model, data.val, tasks)})
    return model, step, history, count_steps()


def _step_counter(optimizer: torch.optim.Optimizer) -> Callable[[], int]:
    """Count ``optimizer.step()`` calls (Phase 1 takes T per batch)."""
    calls = [0]

    def hook(*_: object) -> None:
        calls[0] += 1

    optimizer.register_step_post_hook(hook)
    return lambda: calls[0]


def total_batches(method: str, tasks: Sequence[str], data: MultiDigits, config: TrainConfig) -> int:
    """Batches a run of ``method`` processes (``single`` trains one model per task)."""
    models = len(tasks) if method == "single" else 1
    return models * config.epochs * config.steps_per_epoch(data.train)


def train_run(
    method: str,
    tasks: Sequence[str],
    data: MultiDigits,
    config: TrainConfig,
    seed: int,
    progress: Progress | None = None,
) -> tuple[RunResult, TrainStep | None]:
    """Train and evaluate ``method`` with ``seed`` on ``data`` (already on its device).

    Returns the result and, for a multi-task method, the training step (its ``cs`` holds the
    connection-strength controller and telemetry for ``ours_*``).
    """
    tasks = list(tasks)
    config.steps_per_epoch(data.train)
    start = time.perf_counter()
    if method == "single":
        test: dict[str, float] = {}
        val: dict[str, float] = {}
        history: list[dict[str, dict[str, float]]] = [
            {"loss": {}, "val": {}} for _ in range(config.epochs)
        ]
        steps = 0
        for task in tasks:
            model, _, hist, n = _train_model(method, [task], data, config, seed, progress)
            test.update(evaluate(model, data.test, [task]))
            val.update(evaluate(model, data.val, [task]))
            for mine, theirs in zip(history, hist, strict=True):
                mine["loss"].update(theirs["loss"])
                mine["val"].update(theirs["val"])
            steps += n
        wall = time.perf_counter() - start
        return RunResult(method, seed, tasks, test, val, wall, steps, history), None
    model, step, history, steps = _train_model(method, tasks, data, config, seed, progress)
    test = evaluate(model, data.test, tasks)
    val = evaluate(model, data.val, tasks)
    wall = time.perf_counter() - start
    return RunResult(method, seed, tasks, test, val, wall, steps, history), step
