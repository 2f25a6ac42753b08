"""The shared training harness of demo.py and reproduce.py: one method, one seed, one run.

A run trains on one benchmark (`mtl.benchmarks.Benchmark`: MultiDigits by default, or Scenes).
Every method gets the same model (the benchmark's), initialisation (``torch.manual_seed``),
batch order, optimizer (Adam), learning rate and number of epochs. ``single`` trains one
single-task model per task under the same budget and reports each on its own task. A method
ending in ``_uw`` scales the losses by uncertainty weighting (`mtl.methods.parse_method`); its
log-variances join the optimizer.

Timing. A run reports two figures, and they measure different things:

* ``step_ms``: the median time of one training step (forward, backward and update of one
  batch, every task), over the run's steps after its first ``WARMUP_STEPS``. The steps left out
  carry one-time costs (the thread pool, the allocator, first kernel calls, a method's own
  set-up) that only the first run of a process would otherwise pay. This is the figure to
  compare methods by.
* ``wall_s``: the whole run as a user waits for it: model construction, every step (warm-up
  steps included), and the per-epoch validation and the final evaluation.

``warm_up`` runs a few steps of each method once per process, so that the first method's
``wall_s`` does not carry the process's warm-up either (the demo and ``reproduce.py`` call it
before timing).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from mtl.benchmarks import Benchmark, get_benchmark
from mtl.data.base import Split
from mtl.methods import TrainStep, UncertaintyWeighting, make_step, parse_method
from mtl.metrics import evaluate, evaluate_all
from mtl.results import RunResult

Data = Any  # a benchmark's splits: ``.train``, ``.val``, ``.test`` (`mtl.data.base.Split`)

Progress = Callable[[int], None]  # called with the number of batches just done
Clock = Callable[[], float]  # seconds, monotonic

WARMUP_STEPS = 3  # steps per run left out of ``step_ms``


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

    def steps_per_epoch(self, train: Split | int) -> int:
        """Full batches per epoch of ``train`` (a split or its size); the last partial batch
        is dropped."""
        size = train if isinstance(train, int) else len(train)
        steps = size // self.batch_size
        if steps < 1:
            raise ValueError(f"batch_size {self.batch_size} exceeds the {size} training examples")
        return steps


class StepTimer:
    """Times training steps, leaving out the first ``warmup`` of each run.

    ``clock`` is injectable for tests. On a GPU the device is synchronised before each reading,
    so a step's time includes its kernels (one sync per step: acceptable for a report, and the
    only way to time a step without events the caller would have to thread through).
    """

    def __init__(
        self,
        warmup: int = WARMUP_STEPS,
        clock: Clock = time.perf_counter,
        device: torch.device | None = None,
    ) -> None:
        if warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {warmup}")
        self.warmup = warmup
        self.clock = clock
        self.sync = device is not None and device.type == "cuda"
        self.seen = 0  # steps timed or skipped
        self.durations: list[float] = []  # seconds, timed steps only

    def _now(self) -> float:
        if self.sync:
            torch.cuda.synchronize()
        return self.clock()

    def time(self, step: Callable[[], Any]) -> Any:
        """Run ``step()``; record its duration unless it is among the first ``warmup``."""
        start = self._now()
        result = step()
        elapsed = self._now() - start
        if self.seen >= self.warmup:
            self.durations.append(elapsed)
        self.seen += 1
        return result

    @property
    def skipped(self) -> int:
        return self.seen - len(self.durations)


def step_quartiles(durations: Iterable[float]) -> tuple[float, float, float]:
    """``(q1, median, q3)`` of ``durations`` (seconds) in milliseconds; NaN when empty."""
    ms = sorted(1e3 * d for d in durations)
    if not ms:
        return (float("nan"),) * 3
    if len(ms) == 1:
        return (ms[0],) * 3
    q1, median, q3 = statistics.quantiles(ms, n=4, method="inclusive")
    return q1, median, q3


def batch_orders(size: int, batch_size: int, epochs: int, seed: int) -> list[list[Tensor]]:
    """Per epoch, the index batches of a seeded shuffle (identical for every method)."""
    gen = torch.Generator().manual_seed(seed)
    steps = size // batch_size
    orders = []
    for _ in range(epochs):
        perm = torch.randperm(size, generator=gen)
        orders.append([perm[i * batch_size : (i + 1) * batch_size] for i in range(steps)])
    return orders


def _validate(bench: Benchmark, model: nn.Module, split: Split, tasks: Sequence[str]) -> Any:
    return evaluate(
        model, split, tasks, bench.eval_batch_size, specs=bench.specs, predict=bench.predict
    )


def _train_model(
    method: str,
    tasks: Sequence[str],
    data: Data,
    config: TrainConfig,
    seed: int,
    progress: Progress | None,
    timer: StepTimer | None = None,
    max_steps: int | None = None,
    bench: Benchmark | None = None,
) -> tuple[nn.Module, TrainStep, list[dict[str, dict[str, float]]], int, dict[str, float]]:
    """Train one model on ``tasks`` with ``method``; returns it, its step, its history, its
    optimizer steps and (``_uw`` methods) the final loss scales.

    ``timer`` times each step; ``max_steps`` stops after that many steps (for ``warm_up``),
    without validation.
    """
    bench = bench or get_benchmark("multidigits")
    base, scaling = parse_method(method)
    device = data.train.images.device
    torch.manual_seed(seed)
    model = bench.build_model(tasks, config.width).to(device)
    scaler = UncertaintyWeighting(tasks).to(device) if scaling == "uw" else None
    params = list(model.parameters()) + (list(scaler.parameters()) if scaler else [])
    optimizer = torch.optim.Adam(params, lr=config.lr)
    orders = batch_orders(len(data.train), config.batch_size, config.epochs, seed)
    sample, _ = data.train.batch(orders[0][0].to(device))
    step = make_step(
        base,
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
    task_loss = bench.task_loss
    count_steps = _step_counter(optimizer)
    timer = timer or StepTimer(warmup=0)
    done = 0
    model.train()
    for epoch, batches in enumerate(orders):
        sums = {t: torch.zeros((), device=device) for t in tasks}
        for index in batches:
            if max_steps is not None and done >= max_steps:
                return model, step, history, count_steps(), _scales(scaler)
            images, targets = data.train.batch(index.to(device))
            weighted: dict[str, Tensor] = {}  # the loss before uncertainty weighting

            def loss_fn(
                task: str,
                images: Tensor = images,
                targets: dict[str, Tensor] = targets,
                weighted: dict[str, Tensor] = weighted,
            ) -> Tensor:
                loss = task_loss(task, model(images, task=task), targets[task])
                loss = loss * weights[task] if weights[task] != 1.0 else loss
                if scaler is None:
                    return loss
                weighted[task] = loss.detach()
                return scaler(task, loss)

            if scaler is not None:  # Phase 2 zeroes only the model's gradients
                scaler.zero_grad(set_to_none=True)
            losses = timer.time(lambda fn=loss_fn, e=epoch: step(fn, e, config.epochs))
            done += 1
            for t in tasks:
                sums[t] += weighted[t] if scaler is not None else losses[t]
            if progress is not None:
                progress(1)
        loss = {t: float(v) / len(batches) for t, v in sums.items()}  # one sync per epoch
        history.append({"loss": loss, "val": _validate(bench, model, data.val, tasks)})
    return model, step, history, count_steps(), _scales(scaler)


def _scales(scaler: UncertaintyWeighting | None) -> dict[str, float]:
    return scaler.weights() if scaler is not None else {}


def _step_counter(optimizer: torch.optim.Optimizer) -> Callable[[], int]:
    """Count ``optimizer.step()`` calls (Phase 1 takes T per batch)."""
    calls = [0]

    def hook(*_: object) -> None:
        calls[0] += 1

    optimizer.register_step_post_hook(hook)
    return lambda: calls[0]


def total_batches(method: str, tasks: Sequence[str], data: Data, config: TrainConfig) -> int:
    """Batches a run of ``method`` processes (``single`` trains one model per task)."""
    return total_batches_of(method, tasks, len(data.train), config)


def total_batches_of(
    method: str, tasks: Sequence[str], train_size: int, config: TrainConfig
) -> int:
    """`total_batches` from the size of the training split."""
    models = len(tasks) if method == "single" else 1
    return models * config.epochs * config.steps_per_epoch(train_size)


_WARMED: set[tuple[str, str, tuple[str, ...], str]] = set()
WARM_UP_AS = {"ours_mixed": ("ours_phase1", "ours_phase2")}


def warm_up(
    methods: Iterable[str],
    tasks: Sequence[str],
    data: Data,
    config: TrainConfig,
    steps: int = WARMUP_STEPS,
    bench: Benchmark | None = None,
) -> list[str]:
    """Run ``steps`` training steps of each method not yet warmed up in this process, on a
    throwaway model, so that no timed run pays the process's one-time costs. Returns the
    methods it ran."""
    bench = bench or get_benchmark("multidigits")
    device = str(data.train.images.device)
    ran = []
    for method in methods:
        base, scaling = parse_method(method)
        suffix = f"_{scaling}" if scaling else ""
        # The mixed schedule runs only Phase 1 in its first epoch: warm both phases.
        for part in (p + suffix for p in WARM_UP_AS.get(base, (base,))):
            key = (bench.name, part, tuple(tasks), device)
            if key in _WARMED:
                continue
            run_tasks = list(tasks)[:1] if part == "single" else list(tasks)
            _train_model(part, run_tasks, data, config, 0, None, max_steps=steps, bench=bench)
            _WARMED.add(key)
            ran.append(part)
    return ran


def time_steps(
    method: str,
    tasks: Sequence[str],
    data: Data,
    config: TrainConfig,
    steps: int,
    *,
    clock: Clock = time.process_time,
    bench: Benchmark | None = None,
) -> list[float]:
    """Durations (seconds by ``clock``) of ``steps`` training steps of ``method``, after
    ``WARMUP_STEPS`` untimed ones, on a throwaway model: for budgeting a reproduction.

    The default clock is this process's CPU time, which other programs on a busy machine do
    not inflate the way they inflate wall time (with one torch thread per run, it is the wall
    time of the step on an otherwise idle core).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    timer = StepTimer(WARMUP_STEPS, clock)
    run_tasks = list(tasks)[:1] if method == "single" else list(tasks)
    _train_model(method, run_tasks, data, config, 0, None, timer, WARMUP_STEPS + steps, bench=bench)
    return timer.durations


def train_run(
    method: str,
    tasks: Sequence[str],
    data: Data,
    config: TrainConfig,
    seed: int,
    progress: Progress | None = None,
    clock: Clock = time.perf_counter,
    bench: Benchmark | None = None,
) -> tuple[RunResult, TrainStep | None]:
    """Train and evaluate ``method`` with ``seed`` on ``data`` (already on its device) of
    ``bench`` (default MultiDigits).

    Returns the result and, for a multi-task method, the training step (its ``model``; its
    ``cs`` holds the connection-strength controller and telemetry for ``ours_*``). ``clock``
    times the run and its steps (injectable for tests).
    """
    bench = bench or get_benchmark("multidigits")
    tasks = list(tasks)

    def test_metrics(model: nn.Module, run_tasks: Sequence[str]) -> dict[str, dict[str, float]]:
        return evaluate_all(
            model,
            data.test,
            run_tasks,
            bench.eval_batch_size,
            specs=bench.specs,
            predict=bench.predict,
        )

    config.steps_per_epoch(data.train)
    device = data.train.images.device
    start = clock()
    durations: list[float] = []
    skipped = 0

    def timer() -> StepTimer:
        return StepTimer(WARMUP_STEPS, clock, device)

    def timed(run_timer: StepTimer) -> None:
        nonlocal skipped
        durations.extend(run_timer.durations)
        skipped += run_timer.skipped

    step: TrainStep | None = None
    scales: dict[str, float] = {}
    if method == "single":  # one model per task, each scored on its own task
        val: dict[str, float] = {}
        test_all: dict[str, dict[str, float]] = {}
        history: list[dict[str, dict[str, float]]] = [
            {"loss": {}, "val": {}} for _ in range(config.epochs)
        ]
        steps = 0
        for task in tasks:
            model_timer = timer()
            model, _, hist, n, _ = _train_model(
                method, [task], data, config, seed, progress, model_timer, bench=bench
            )
            timed(model_timer)
            test_all.update(test_metrics(model, [task]))
            val.update(_validate(bench, model, data.val, [task]))
            for mine, theirs in zip(history, hist, strict=True):
                mine["loss"].update(theirs["loss"])
                mine["val"].update(theirs["val"])
            steps += n
    else:
        run_timer = timer()
        model, step, history, steps, scales = _train_model(
            method, tasks, data, config, seed, progress, run_timer, bench=bench
        )
        timed(run_timer)
        test_all = test_metrics(model, tasks)
        val = _validate(bench, model, data.val, tasks)
    test = {t: test_all[t][bench.specs[t].metric] for t in tasks}
    result = RunResult(
        method,
        seed,
        tasks,
        test,
        val,
        clock() - start,
        steps,
        history,
        step_quartiles(durations),
        len(durations),
        skipped,
        test_all,
        scales,
    )
    return result, step
