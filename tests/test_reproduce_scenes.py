"""The Scenes reproduction: python/reproduce.py --benchmark scenes on tiny data, its model
adapter (python/mtl/models/scenes.py) and its report, figure and budget estimate."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "python"))

import reproduce
from mtl.benchmarks import get_benchmark
from mtl.data import scenes
from mtl.models import scenes as scenes_model
from mtl.train import TrainConfig, train_run

METHODS = ["single", "gd", "pcgrad", "ours_mixed", "ours_mixed_uw"]
TASKS = list(scenes.DEFAULT_TASKS)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("scenes-cache")


@pytest.fixture(autouse=True)
def private_cache(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CS_KERNELS_CACHE", str(cache))


@pytest.fixture(scope="module")
def quick_run(cache: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:  # type: ignore[type-arg]
    """``reproduce.py --benchmark scenes --quick`` on a few methods, two workers."""
    out = tmp_path_factory.mktemp("reproduce-scenes")
    argv = ["--benchmark", "scenes", "--quick", "--methods", *METHODS, "--out", str(out)]
    argv += ["--no-progress", "--jobs", "2", "--threads", "1"]
    with pytest.MonkeyPatch.context() as mp:  # the workers inherit the environment
        mp.setenv("CS_KERNELS_CACHE", str(cache))
        assert reproduce.main(argv) == 0
    payload: dict = json.loads((out / "reproduce.json").read_text())  # type: ignore[type-arg]
    payload["markdown"] = (out / "reproduce.md").read_text()
    payload["out"] = str(out)
    return payload


def test_scenes_quick_end_to_end(quick_run) -> None:  # type: ignore[no-untyped-def]
    payload = quick_run
    assert payload["benchmark"] == "scenes" and payload["methods"] == METHODS
    assert payload["tasks"] == TASKS and payload["config"]["resolution"] == 16
    summary = payload["summary"]
    for method, entry in summary.items():
        assert math.isfinite(entry["delta_m"][0]), method
        assert set(entry["metrics"]) == set(TASKS)
        assert set(entry["extra_metrics"]) == {"depth"}  # abs-rel beside the RMSE
        assert math.isfinite(entry["extra_metrics"]["depth"]["abs_rel"][0])
    assert summary["single"]["delta_m"][0] == pytest.approx(0.0, abs=1e-9)
    scales = summary["ours_mixed_uw"]["loss_scales"]
    assert set(scales) == set(TASKS) and all(0 < v[0] < 5 for v in scales.values())
    assert "loss_scales" not in summary["gd"]
    run = next(r for r in payload["runs"] if r["method"] == "gd")
    assert list(run["test_all"]["depth"]) == ["rmse", "abs_rel"]
    assert run["test"]["depth"] == run["test_all"]["depth"]["rmse"]
    assert 0.0 <= run["test"]["seg"] <= 100.0 and 0.0 <= run["test"]["normal"] <= 180.0
    text = payload["markdown"]
    assert text.startswith("# Scenes reproduction")
    assert "| seg miou ↑ | depth rmse ↓ | depth abs_rel ↓ | normal angle ↓ |" in text
    for method in METHODS:
        assert f"| {reproduce.LABELS[method]} |" in text
    assert "Final uncertainty-weighting factors" in text
    assert "ours (mixed) above GD and every baseline run" in text
    # The figure: GD's and ours' seed-0 predictions beside the ground truth.
    figure = Path(payload["out"]) / "predictions.png"
    assert payload["figure"] == "predictions.png" and figure.stat().st_size > 10_000


def test_scenes_in_process_runs_match_worker_runs(quick_run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    argv = ["--benchmark", "scenes", "--quick", "--methods", "gd", "ours_mixed_uw"]
    argv += ["--out", str(tmp_path), "--no-progress", "--jobs", "1", "--threads", "1"]
    assert reproduce.main(argv) == 0
    mine = json.loads((tmp_path / "reproduce.json").read_text())["runs"]
    theirs = {r["method"]: r for r in quick_run["runs"]}
    for run in mine:
        assert run["test_all"] == theirs[run["method"]]["test_all"], run["method"]
        assert run["history"] == theirs[run["method"]]["history"], run["method"]


def test_scenes_arguments() -> None:
    args = reproduce.parse_args(["--benchmark", "scenes"])
    assert args.methods == list(reproduce.ALL_METHODS) and args.tasks == TASKS
    assert args.resolution == 64 and args.out == reproduce.RESULTS / "scenes"
    assert reproduce.parse_args(["--benchmark", "scenes", "--quick"]).out.name == "quick"
    assert reproduce.parse_args([]).resolution is None  # MultiDigits: a fixed canvas
    assert reproduce.parse_args(["--benchmark", "scenes", "--tasks", "depth", "seg"]).tasks == [
        "depth",
        "seg",
    ]
    for bad in (["--tasks", "left"], ["--methods", "dwa"]):
        with pytest.raises(SystemExit):
            reproduce.parse_args(["--benchmark", "scenes", *bad])
    with pytest.raises(SystemExit):
        reproduce.parse_args(["--resolution", "32"])  # not on MultiDigits


def test_estimate_projects_the_duration(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    argv = ["--benchmark", "scenes", "--quick", "--methods", "single", "gd", "--estimate", "2"]
    assert reproduce.main([*argv, "--out", str(tmp_path), "--jobs", "2", "--threads", "1"]) == 0
    text = capsys.readouterr().out
    assert "| single |" in text and "| gd |" in text and "on a quiet machine" in text
    assert not (tmp_path / "reproduce.json").exists()  # nothing trained, nothing written


def test_the_model_adapter_trains_every_task() -> None:
    """The dense network on Scenes: shapes, the depth offset, and one epoch that lowers the
    loss of every task."""
    bench = get_benchmark("scenes")
    data = bench.make_data(0, (32, 8, 8), 16)
    torch.manual_seed(0)
    model = bench.build_model(TASKS, 4)
    images, targets = data.train.batch(torch.arange(4))
    outputs = {t: model(images, task=t) for t in TASKS}
    assert outputs["seg"].shape == (4, len(scenes.CLASSES), 16, 16)
    assert outputs["depth"].shape == (4, 1, 16, 16) and outputs["normal"].shape == (4, 3, 16, 16)
    depth = bench.predict("depth", torch.zeros(1, 1, 2, 2))
    assert torch.equal(depth, torch.full((1, 1, 2, 2), scenes_model.DEPTH_SHIFT))
    zero_error = bench.task_loss(
        "depth", targets["depth"] - scenes_model.DEPTH_SHIFT, targets["depth"]
    )
    assert float(zero_error) == pytest.approx(0.0, abs=1e-6)
    assert model.shared_parameters() and all(
        p not in set(model.task_parameters("seg")) for p in model.shared_parameters()
    )
    config = TrainConfig(epochs=3, batch_size=8, width=4, lr=3e-3)
    result, step = train_run("gd", TASKS, data, config, seed=0, bench=bench)
    first, last = result.history[0]["loss"], result.history[-1]["loss"]
    assert all(last[t] < first[t] for t in TASKS), (first, last)
    assert step is not None and step.model is not None
