"""Metrics, Δm and the reproduction harness (python/mtl/metrics.py, mtl/train.py, reproduce.py)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "python"))

import reproduce
from mtl import train as mtl_train
from mtl.data.multidigits import DEFAULT_TASKS, make_multidigits
from mtl.methods import METHODS
from mtl.metrics import (
    TaskMeter,
    delta_m,
    lower_is_better,
    mean_std,
    relative_change,
)
from mtl.train import (
    WARMUP_STEPS,
    RunResult,
    StepTimer,
    TrainConfig,
    batch_orders,
    step_quartiles,
    train_run,
    warm_up,
)

LOWER = {"left": False, "right": False, "clean": True}


# ---------------------------------------------------------------------------------- Δm


def test_delta_m_matches_hand_computed_values() -> None:
    single = {"left": 80.0, "right": 50.0, "clean": 0.10}
    # left +10 %, right -4 %, clean: RMSE 0.12 is 20 % worse -> -20 %. Mean: -14/3.
    model = {"left": 88.0, "right": 48.0, "clean": 0.12}
    changes = relative_change(model, single, LOWER)
    assert changes == pytest.approx({"left": 10.0, "right": -4.0, "clean": -20.0})
    assert delta_m(model, single, LOWER) == pytest.approx(-14.0 / 3.0)
    # Lower RMSE is an improvement: 0.08 vs 0.10 -> +20 %.
    better = {"left": 80.0, "right": 50.0, "clean": 0.08}
    assert delta_m(better, single, LOWER) == pytest.approx(20.0 / 3.0)
    assert delta_m(single, single, LOWER) == 0.0


def test_delta_m_of_the_papers_two_task_example() -> None:
    # Two tasks, one of each kind: accuracy 70 vs 64 (+9.375 %), error 2.5 vs 2.0 (-25 %).
    got = delta_m({"a": 70.0, "e": 2.5}, {"a": 64.0, "e": 2.0}, {"a": False, "e": True})
    assert got == pytest.approx((9.375 - 25.0) / 2)


def test_lower_is_better_follows_the_task_table() -> None:
    assert lower_is_better(DEFAULT_TASKS) == LOWER
    assert lower_is_better(["mask"]) == {"mask": False}


@pytest.mark.parametrize(
    ("model", "single", "match"),
    [
        ({"left": 1.0}, {"left": 1.0, "right": 1.0}, "same tasks"),
        ({"left": 1.0}, {"left": 0.0}, "non-zero"),
        ({"left": math.nan}, {"left": 1.0}, "finite"),
        ({}, {}, "at least one"),
    ],
)
def test_delta_m_rejects_bad_input(model, single, match) -> None:  # type: ignore[no-untyped-def]
    lower = dict.fromkeys(model, False)
    with pytest.raises(ValueError, match=match):
        delta_m(model, single, lower)


def test_mean_std() -> None:
    assert mean_std([2.0]) == (2.0, 0.0)
    mean, std = mean_std([1.0, 2.0, 6.0])
    assert mean == pytest.approx(3.0)
    assert std == pytest.approx(math.sqrt((4 + 1 + 9) / 2))
    with pytest.raises(ValueError, match="empty"):
        mean_std([])


# ------------------------------------------------------------------------------ metrics


def test_task_meters_match_hand_computed_values() -> None:
    acc = TaskMeter("left")
    acc.update(torch.tensor([1, 2, 3]), torch.tensor([1, 0, 3]))
    acc.update(torch.tensor([4]), torch.tensor([5]))
    assert acc.value() == pytest.approx(50.0)

    rmse = TaskMeter("clean")
    rmse.update(torch.zeros(1, 1, 2, 2), torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]]))
    assert rmse.value() == pytest.approx(math.sqrt(2 / 4))

    iou = TaskMeter("mask")
    iou.update(torch.tensor([1.0, 1.0, 0.0, 0.0]), torch.tensor([1.0, 0.0, 1.0, 0.0]))
    assert iou.value() == pytest.approx(100.0 / 3)  # intersection 1, union 3

    assert math.isnan(TaskMeter("right").value())
    with pytest.raises(ValueError, match="shape"):
        acc.update(torch.zeros(2), torch.zeros(3))
    with pytest.raises(ValueError, match="task"):
        TaskMeter("depth")


def test_dense_meters_match_hand_computed_values() -> None:
    from mtl.data.base import TaskSpec
    from mtl.metrics import MeanIoU

    seg = TaskSpec("seg", "segment", "miou", lower_is_better=False, classes=3)
    meter = TaskMeter("seg", seg)
    # true 0 0 1 1 2 / predicted 0 1 1 1 0: IoU 0 = 1/3, 1 = 2/3, 2 = 0/1 (predicted never).
    meter.update(torch.tensor([[0, 1, 1, 1, 0]]), torch.tensor([[0, 0, 1, 1, 2]]))
    assert meter.value() == pytest.approx(100.0 * (1 / 3 + 2 / 3 + 0.0) / 3)
    pooled = MeanIoU(3)  # pooled over batches: the same confusion matrix in two parts
    pooled.update(torch.tensor([0, 1]), torch.tensor([0, 0]))
    pooled.update(torch.tensor([1, 1, 0]), torch.tensor([1, 1, 2]))
    assert pooled.value() == pytest.approx(meter.value())
    absent = MeanIoU(4)  # class 3 never appears: left out of the mean, not counted as 0
    absent.update(torch.tensor([0, 1, 2]), torch.tensor([0, 1, 2]))
    assert absent.value() == pytest.approx(100.0)
    assert math.isnan(absent.per_class()[3])
    with pytest.raises(ValueError, match="class ids"):
        absent.update(torch.tensor([4]), torch.tensor([0]))
    with pytest.raises(ValueError, match="classes"):
        MeanIoU(1)

    depth = TaskMeter("depth", TaskSpec("depth", "depth", "rmse", True, ("abs_rel",)))
    depth.update(torch.tensor([[1.0, 3.0, 5.0]]), torch.tensor([[2.0, 3.0, 4.0]]))
    values = depth.values()
    assert list(values) == ["rmse", "abs_rel"]
    assert values["rmse"] == pytest.approx(math.sqrt(2 / 3))
    assert values["abs_rel"] == pytest.approx((0.5 + 0.0 + 0.25) / 3)

    normal = TaskMeter("normal", TaskSpec("normal", "normal", "angle", True))
    truth = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0]]).T[None]
    guess = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 1.0], [0.0, -1.0, 0.0]]).T[None]
    normal.update(guess, truth)  # 0, 45 and 180 degrees; the length of a guess is ignored
    assert normal.value() == pytest.approx((0.0 + 45.0 + 180.0) / 3)
    with pytest.raises(ValueError, match="unknown metric"):
        TaskMeter("x", TaskSpec("x", "depth", "sirmse", True))


# ------------------------------------------------------------------------------ harness


def tiny() -> tuple[TrainConfig, object]:
    config = TrainConfig(epochs=1, batch_size=32, width=4)
    return config, make_multidigits(0, train_size=64, val_size=32, test_size=32)


def test_batch_orders_are_seeded_permutations() -> None:
    a, b = batch_orders(10, 3, 2, seed=5), batch_orders(10, 3, 2, seed=5)
    assert all(
        torch.equal(x, y) for ea, eb in zip(a, b, strict=True) for x, y in zip(ea, eb, strict=True)
    )
    assert not torch.equal(torch.cat(a[0]), torch.cat(batch_orders(10, 3, 2, seed=6)[0]))
    assert [len(epoch) for epoch in a] == [3, 3]  # the last partial batch is dropped
    for epoch in a:
        seen = torch.cat(epoch)
        assert len(set(seen.tolist())) == 9 and int(seen.max()) < 10


def test_same_seed_same_run() -> None:
    config, data = tiny()
    first, _ = train_run("gd", DEFAULT_TASKS, data, config, seed=1)  # type: ignore[arg-type]
    second, _ = train_run("gd", DEFAULT_TASKS, data, config, seed=1)  # type: ignore[arg-type]
    assert first.test == second.test and first.history == second.history
    assert first.optimizer_steps == 2


def test_single_trains_one_model_per_task() -> None:
    config, data = tiny()
    result, step = train_run("single", DEFAULT_TASKS, data, config, seed=0)  # type: ignore[arg-type]
    assert step is None
    assert set(result.test) == set(DEFAULT_TASKS)
    assert result.optimizer_steps == 2 * len(DEFAULT_TASKS)
    assert set(result.history[0]["loss"]) == set(DEFAULT_TASKS)


def test_config_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="epochs"):
        TrainConfig(epochs=0)
    with pytest.raises(ValueError, match="lr"):
        TrainConfig(lr=0.0)
    with pytest.raises(ValueError, match="loss_weights"):
        TrainConfig(loss_weights={"clean": 0.0})
    assert TrainConfig(loss_weights={"clean": 10.0}).weight("clean") == 10.0
    assert TrainConfig().weight("clean") == 1.0
    _, data = tiny()
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(batch_size=1000).steps_per_epoch(data.train)  # type: ignore[attr-defined]


def fake(method: str, seed: int, left: float, right: float, clean: float) -> RunResult:
    test = {"left": left, "right": right, "clean": clean}
    return RunResult(method, seed, list(DEFAULT_TASKS), test, test, 1.0, 10)


def test_summary_uses_the_mean_single_task_model_as_base() -> None:
    results = [
        fake("single", 0, 90.0, 80.0, 0.10),
        fake("single", 1, 92.0, 82.0, 0.14),  # base: 91, 81, 0.12
        fake("gd", 0, 91.0, 81.0, 0.12),  # Δm 0
        fake("gd", 1, 91.0 * 1.03, 81.0, 0.12),  # left +3 % -> Δm +1
        fake("ours_mixed", 0, 91.0, 81.0 * 1.06, 0.12 * 0.97),  # (+6 + 3)/3 = +3
        fake("ours_phase1", 0, 91.0, 81.0, 0.12),
        fake("ours_phase2", 0, 91.0, 81.0, 0.12 * 1.03),  # -1
    ]
    summary, base = reproduce.summarise(results, DEFAULT_TASKS)
    assert base == pytest.approx({"left": 91.0, "right": 81.0, "clean": 0.12})
    assert summary["gd"]["delta_m_per_seed"] == pytest.approx([0.0, 1.0])
    assert summary["gd"]["delta_m"] == pytest.approx((0.5, math.sqrt(0.5)))
    assert summary["ours_mixed"]["delta_m"][0] == pytest.approx(3.0)
    assert summary["single"]["delta_m"][0] == pytest.approx(0.0, abs=1e-12)
    statements = reproduce.ordering(summary)
    assert len(statements) == 2
    assert "**holds**" in statements[0] and "**holds**" in statements[1]
    summary["ours_phase1"]["delta_m"] = (-2.0, 0.0)
    assert "does not hold" in reproduce.ordering(summary)[0]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> dict:  # type: ignore[type-arg]
    """``reproduce.py --quick`` over every method, two runs at a time in worker processes."""
    out = tmp_path_factory.mktemp("reproduce")
    argv = ["--quick", "--out", str(out), "--no-progress", "--jobs", "2", "--threads", "1"]
    assert reproduce.main(argv) == 0
    payload: dict = json.loads((out / "reproduce.json").read_text())  # type: ignore[type-arg]
    payload["markdown"] = (out / "reproduce.md").read_text()
    return payload


def test_reproduce_quick_end_to_end(quick_run) -> None:  # type: ignore[no-untyped-def]
    payload = quick_run
    assert payload["methods"] == list(METHODS)
    assert [r["method"] for r in payload["runs"]] == list(METHODS)
    for method, entry in payload["summary"].items():
        assert math.isfinite(entry["delta_m"][0]), method
        assert entry["wall_s"][0] > 0
        assert entry["step_ms"][0] > 0  # quick runs have 4 steps: 3 warm-up, 1 timed
        assert set(entry["metrics"]) == set(DEFAULT_TASKS)
    assert payload["summary"]["single"]["delta_m"][0] == pytest.approx(0.0, abs=1e-9)
    # Phase 1 takes one optimizer step per task per batch; Phase 2 one per batch.
    steps = {m: payload["summary"][m]["optimizer_steps"] for m in ("ours_phase1", "ours_phase2")}
    assert steps["ours_phase1"] == len(DEFAULT_TASKS) * steps["ours_phase2"]
    text = payload["markdown"]
    assert "| method | Δm (%) ↑ |" in text and "| ms / step | wall s / run |" in text
    assert "mixed > Phase 1 only > Phase 2 only" in text
    for method in METHODS:  # MultiDigits runs the unscaled methods by default
        assert f"| {reproduce.LABELS[method]} |" in text


def test_in_process_runs_match_worker_runs(quick_run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    argv = ["--quick", "--methods", "single", "gd", "--out", str(tmp_path), "--no-progress"]
    assert reproduce.main([*argv, "--jobs", "1", "--threads", "1"]) == 0
    mine = json.loads((tmp_path / "reproduce.json").read_text())["runs"]
    theirs = {r["method"]: r for r in quick_run["runs"]}
    for run in mine:
        assert run["test"] == theirs[run["method"]]["test"], run["method"]
        assert run["history"] == theirs[run["method"]]["history"], run["method"]


def test_reproduce_method_and_seed_filters(tmp_path: Path) -> None:
    args = reproduce.parse_args(["--methods", "gd", "single", "--seeds", "3", "--quick"])
    assert args.methods == ["single", "gd"] and args.seeds == [3]
    assert args.out == reproduce.RESULTS / "quick"
    full = reproduce.parse_args([])
    assert full.seeds == [0, 1, 2] and full.methods == list(METHODS)
    assert full.out == reproduce.RESULTS
    with pytest.raises(SystemExit):
        reproduce.parse_args(["--methods", "adam"])
    weighted = reproduce.parse_args(["--loss-weights", "clean=10", "left=0.5"])
    assert weighted.loss_weights == {"clean": 10.0, "left": 0.5}
    for bad in ("depth=1", "clean", "clean=x"):
        with pytest.raises(SystemExit):
            reproduce.parse_args(["--loss-weights", bad])


def test_loss_weights_scale_the_training_loss() -> None:
    config, data = tiny()
    weighted = TrainConfig(epochs=1, batch_size=32, width=4, loss_weights={"clean": 100.0})
    plain, _ = train_run("gd", DEFAULT_TASKS, data, config, seed=0)  # type: ignore[arg-type]
    heavy, _ = train_run("gd", DEFAULT_TASKS, data, weighted, seed=0)  # type: ignore[arg-type]
    # The first batch's clean loss is the same model's loss, 100 times over; the epoch mean
    # (two batches) is dominated by it.
    ratio = heavy.history[0]["loss"]["clean"] / plain.history[0]["loss"]["clean"]
    assert 30.0 < ratio < 300.0


# -------------------------------------------------------------------------------- timing


class FakeClock:
    """A clock that only moves when told to: steps cost what the test says."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_step_timer_leaves_out_the_first_steps_of_each_run() -> None:
    clock = FakeClock()
    timer = StepTimer(warmup=2, clock=clock)
    for cost in (5.0, 4.0, 0.010, 0.012, 0.011):

        def step(cost: float = cost) -> str:
            clock.now += cost
            return "done"

        assert timer.time(step) == "done"
    assert timer.skipped == 2 and len(timer.durations) == 3
    assert step_quartiles(timer.durations) == pytest.approx((10.5, 11.0, 11.5))
    assert all(math.isnan(q) for q in step_quartiles([]))
    with pytest.raises(ValueError, match="warmup"):
        StepTimer(warmup=-1)


def test_the_first_method_run_is_not_charged_for_the_process_warm_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The process's first steps are slow (thread pool, allocator, first kernels): whichever
    method runs first must not report them as its own cost."""
    clock = FakeClock()
    process_steps = [0]
    make_step = mtl_train.make_step

    def slow_first_steps(*args, **kwargs):  # type: ignore[no-untyped-def]
        step = make_step(*args, **kwargs)

        def timed(*a, **k):  # type: ignore[no-untyped-def]
            process_steps[0] += 1
            clock.now += 1.0 if process_steps[0] <= WARMUP_STEPS else 0.002
            return step(*a, **k)

        return timed

    monkeypatch.setattr(mtl_train, "make_step", slow_first_steps)
    config = TrainConfig(epochs=2, batch_size=16, width=4)
    data = make_multidigits(0, train_size=64, val_size=16, test_size=16)
    tasks = list(DEFAULT_TASKS)
    first, _ = train_run("gd", tasks, data, config, seed=0, clock=clock)
    second, _ = train_run("ours_mixed", tasks, data, config, seed=0, clock=clock)
    assert first.warmup_steps == second.warmup_steps == WARMUP_STEPS
    assert first.timed_steps == second.timed_steps == 8 - WARMUP_STEPS
    assert first.step_ms == pytest.approx((2.0, 2.0, 2.0))
    assert second.step_ms == pytest.approx((2.0, 2.0, 2.0))
    # The wall time is the user's whole wait: it keeps the warm-up of the run that paid it.
    assert first.wall_s == pytest.approx(WARMUP_STEPS * 1.0 + 5 * 0.002)


def test_warm_up_runs_each_method_once_per_process_and_both_phases_of_mixed() -> None:
    config, data = tiny()
    tasks = list(DEFAULT_TASKS)
    mtl_train._WARMED.clear()
    assert warm_up(["gd", "ours_mixed"], tasks, data, config, steps=1) == [
        "gd",
        "ours_phase1",
        "ours_phase2",
    ]
    assert warm_up(["gd", "ours_mixed", "ours_phase2"], tasks, data, config, steps=1) == []
    assert warm_up(["single"], tasks, data, config, steps=1) == ["single"]


def test_demo_warms_every_method_up_before_timing_any(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import demo

    calls: list[str] = []
    monkeypatch.setattr(
        mtl_train, "warm_up", lambda methods, *a, **k: calls.append(f"warm {sorted(methods)}")
    )
    real_run = mtl_train.train_run

    def run(method, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(f"run {method}")
        return real_run(method, *args, **kwargs)

    monkeypatch.setattr(mtl_train, "train_run", run)
    demo.train_demo(torch.device("cpu"), quick=True, epochs=1, out=tmp_path)
    assert calls == ["warm ['gd', 'ours_mixed']", "run ours_mixed", "run gd"]
