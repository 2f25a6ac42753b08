"""python/train_dense.py and its library (mtl.dense_train, mtl.loss_weights, mtl.dense_losses,
mtl.models.zoo) on tiny fake datasets written in each on-disk layout."""

from __future__ import annotations

import hashlib
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "python"))

from mtl.data import fakes  # noqa: E402
from mtl.data.dense import spec_of  # noqa: E402
from mtl.dense_losses import balanced_bce, task_loss  # noqa: E402
from mtl.dense_train import (  # noqa: E402
    CHECKPOINT,
    METRICS,
    DenseRunConfig,
    World,
    epoch_batches,
    lr_factor,
    make_plan,
    read_single_task_results,
    run,
)
from mtl.loss_weights import DynamicWeightAverage, make_weighting  # noqa: E402
from mtl.methods import BASELINES  # noqa: E402
from mtl.models.zoo import make_backbone  # noqa: E402

DATASETS = ("nyud", "pascal", "nyuv2-mtan", "cityscapes")
SMALL: dict[str, Any] = {
    "backbone": "resnet18",
    "backbone_source": "ours",
    "width": 4,
    "head_width": 4,
    "epochs": 1,
    "batch_size": 2,
    "image_size": (16, 16),
    "workers": 0,
    "progress": False,
}


def write_fake(name: str, root: Path) -> Path:
    """A tiny dataset ``name`` under ``root`` (4 train, 2 val samples); the folder to open."""
    if name == "nyud":
        return fakes.write_nyud(root, n_train=4, n_val=2).root
    if name == "pascal":
        return fakes.write_pascal(root, n_train=4, n_val=2).root
    return fakes.write_mtan(root, name, n_train=4, n_val=2).root


def tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def expected_metrics(name: str) -> set[str]:
    spec = spec_of(name)
    return {f"{t}/{m}" for t in spec.scored_tasks for m in spec.metrics[t]}


def program(*args: str | Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, str(ROOT / "python" / "train_dense.py"), *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )


SMALL_FLAGS = [
    "--backbone", "resnet18", "--backbone-source", "ours", "--width", "4", "--head-width", "4",
    "--epochs", "1", "--batch-size", "2", "--image-size", "16", "16", "--workers", "0",
]  # fmt: skip


# ------------------------------------------------------------------------ the program


@pytest.mark.parametrize(
    ("name", "method", "workers"),
    [
        ("nyud", "ours_mixed", 2),
        ("pascal", "gd", 0),
        ("nyuv2-mtan", "ours_phase2", 0),
        ("cityscapes", "gd", 0),
    ],
)
def test_one_epoch_of_the_program_per_dataset(
    tmp_path: Path, name: str, method: str, workers: int
) -> None:
    root = write_fake(name, tmp_path / "data")
    before = tree_digest(tmp_path / "data")
    out = tmp_path / "run"
    done = program(
        "--dataset", name, "--root", root, "--method", method, "--out", out, *SMALL_FLAGS,
        "--workers", str(workers),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert tree_digest(tmp_path / "data") == before  # nothing written into the data root
    result = json.loads((out / METRICS).read_text())
    assert result["dataset"] == name and result["method"] == method
    assert set(result["metrics"]) == expected_metrics(name)
    assert all(math.isfinite(v) for v in result["metrics"].values()), result["metrics"]
    assert result["delta_m"] is None
    assert result["plan"]["epochs"] == 1 and result["plan"]["tasks"] == list(spec_of(name).tasks)
    assert (out / CHECKPOINT).is_file()
    assert "epoch 1/1: loss" in done.stdout


def test_recipe_defaults_fill_every_unset_option(tmp_path: Path) -> None:
    spec = spec_of("nyud")
    plan = make_plan(DenseRunConfig("nyud", tmp_path, tmp_path), spec)
    recipe = spec.recipe
    assert (plan.epochs, plan.batch_size, plan.lr) == (recipe.epochs, recipe.batch_size, recipe.lr)
    assert plan.image_size == recipe.image_size and plan.schedule == recipe.schedule
    assert plan.recipe_weights == {t: recipe.loss_weights.get(t, 1.0) for t in spec.tasks}
    assert plan.backbone == recipe.backbone == "hrnet18"
    mine = make_plan(DenseRunConfig("nyud", tmp_path, tmp_path, epochs=3, batch_size=4), spec)
    assert (mine.epochs, mine.batch_size) == (3, 4)
    with pytest.raises(ValueError, match="divisible by the 3 ranks"):
        make_plan(DenseRunConfig("nyud", tmp_path, tmp_path, batch_size=4), spec, world_size=3)


def test_poly_schedule() -> None:
    spec = spec_of("nyud")
    assert lr_factor(spec, 0, 100) == 1.0
    assert lr_factor(spec, 50, 100) == pytest.approx(0.5**0.9)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--method", "sgd"], "invalid choice"),
        (["--weights", "no-such-weights.pth"], "no-such-weights.pth does not exist"),
        (["--resume"], "no checkpoint at"),
        (["--single-task-results", "nope.json"], "nope.json does not exist"),
    ],
)
def test_bad_options_are_errors_naming_them(tmp_path: Path, flags: list[str], message: str) -> None:
    root = write_fake("nyud", tmp_path / "data")
    done = program(
        "--dataset", "nyud", "--root", root, "--out", tmp_path / "run", *SMALL_FLAGS, *flags
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert message in done.stderr


# ------------------------------------------------------------------------ resume, Δm


def _states(out: Path) -> dict[str, Any]:
    state = torch.load(out / CHECKPOINT, weights_only=False)
    return {"members": state["members"], "rng": state["rng"], "epoch": state["epoch"]}


def _assert_identical(a: Any, b: Any, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert set(a) == set(b), where
        for k in a:
            _assert_identical(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b or (a != a and b != b), f"{where}: {a!r} != {b!r}"


@pytest.mark.parametrize(("method", "weights"), [("ours_mixed", "dwa"), ("gd", "uw")])
def test_resume_is_bit_identical(tmp_path: Path, method: str, weights: str) -> None:
    root = write_fake("nyud", tmp_path / "data")
    common = {**SMALL, "epochs": 3, "method": method, "loss_weights": weights, "seed": 3}
    whole = run(DenseRunConfig("nyud", root, tmp_path / "whole", **common))
    part = DenseRunConfig("nyud", root, tmp_path / "part", **common, stop_after=1)
    assert run(part) == {"stopped_after": 1}
    assert _states(tmp_path / "part")["epoch"] == 1
    resumed = run(DenseRunConfig("nyud", root, tmp_path / "part", **common, resume=True))
    _assert_identical(_states(tmp_path / "whole"), _states(tmp_path / "part"))
    assert resumed["metrics"] == whole["metrics"]
    losses = [[h["loss"] for h in r["history"]] for r in (whole, resumed)]
    assert losses[0] == losses[1]
    other = DenseRunConfig("nyud", root, tmp_path / "part", **{**common, "seed": 4})
    with pytest.raises(ValueError, match=r"another run \(differs in \['seed'\]\)"):
        run(DenseRunConfig(**{**other.__dict__, "resume": True}))


def test_single_task_runs_and_delta_m(tmp_path: Path) -> None:
    root = write_fake("nyud", tmp_path / "data")
    single = run(DenseRunConfig("nyud", root, tmp_path / "single", method="single", **SMALL))
    assert set(single["metrics"]) == expected_metrics("nyud")
    states = torch.load(tmp_path / "single" / CHECKPOINT, weights_only=False)["members"]
    assert [s["tasks"] for s in states] == [[t] for t in spec_of("nyud").tasks]
    path = tmp_path / "single" / METRICS
    assert read_single_task_results(path) == single["metrics"]
    again = run(
        DenseRunConfig(
            "nyud", root, tmp_path / "again", method="single", single_task_results=path, **SMALL
        )
    )
    assert again["metrics"] == single["metrics"]  # deterministic: the same bits
    assert again["delta_m"] == 0.0
    multi = run(
        DenseRunConfig(
            "nyud", root, tmp_path / "gd", method="gd", single_task_results=path, **SMALL
        )
    )
    assert isinstance(multi["delta_m"], float) and math.isfinite(multi["delta_m"])
    assert multi["delta_m"] != 0.0
    written = json.loads((tmp_path / "gd" / METRICS).read_text())
    assert written["delta_m"] == multi["delta_m"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"metrics": {"semseg/mIoU": 0.1}}))
    with pytest.raises(ValueError, match=r"bad.json lacks \['depth/rmse'"):
        run(
            DenseRunConfig(
                "nyud", root, tmp_path / "x", method="gd", single_task_results=bad, **SMALL
            )
        )


# ------------------------------------------------------------------------ backbones, weights


def test_local_weights_load_and_bad_files_are_named(tmp_path: Path) -> None:
    net, origin = make_backbone("resnet18", source="ours", width=4)
    assert origin == "ours"
    for p in net.parameters():
        torch.nn.init.normal_(p)
    good = tmp_path / "good.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}, good)
    loaded, _ = make_backbone("resnet18", source="ours", width=4, weights=good)
    for (k, a), (_, b) in zip(net.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    wider = tmp_path / "wider.pth"
    torch.save(make_backbone("resnet18", source="ours", width=8)[0].state_dict(), wider)
    with pytest.raises(ValueError, match=r"wider.pth does not match backbone resnet18: .*shape"):
        make_backbone("resnet18", source="ours", width=4, weights=wider)
    partial = tmp_path / "partial.pth"
    torch.save({k: v for k, v in net.state_dict().items() if "layer4" not in k}, partial)
    with pytest.raises(ValueError, match=r"partial.pth does not match .* missing"):
        make_backbone("resnet18", source="ours", width=4, weights=partial)
    junk = tmp_path / "junk.pth"
    junk.write_text("not a checkpoint")
    with pytest.raises(ValueError, match=r"junk\.pth is not a torch checkpoint"):
        make_backbone("resnet18", source="ours", width=4, weights=junk)
    with pytest.raises(ValueError, match="backbone must be one of"):
        make_backbone("vgg16")


def test_hrnet18_and_resnet50_of_our_layouts_give_four_scales() -> None:
    from mtl.models.backbones import backbone_features, feature_channels

    for name in ("hrnet18", "resnet50"):
        net, _ = make_backbone(name, source="ours", width=4)
        feats = backbone_features(net, torch.randn(2, 3, 64, 64))
        assert [f.shape[1] for f in feats] == feature_channels(net)
        assert len(feats) >= 3 and feats[0].shape[-1] > feats[-1].shape[-1]


# ------------------------------------------------------------------------ losses, weights


def test_balanced_bce_by_hand() -> None:
    logits = torch.tensor([0.0, 2.0, -1.0, 5.0]).view(1, 1, 2, 2)
    target = torch.tensor([1.0, 0.0, 1.0, 255.0]).view(1, 1, 2, 2)
    p = torch.sigmoid(logits.flatten()[:3])
    w = 0.95
    by_hand = -(w * math.log(p[0]) + (1 - w) * math.log(1 - p[1]) + w * math.log(p[2])) / 3
    assert float(balanced_bce(logits, target, w)) == pytest.approx(by_hand, rel=1e-6)
    assert float(task_loss("edge", logits, target)) == pytest.approx(by_hand, rel=1e-6)
    sal = torch.tensor([[1, 0], [1, 255]])[None]  # 2 positives of 3 valid: w = 1/3
    by_hand_sal = -(math.log(p[0]) / 3 + 2 / 3 * math.log(1 - p[1]) + math.log(p[2]) / 3) / 3
    assert float(task_loss("sal", logits, sal)) == pytest.approx(by_hand_sal, rel=1e-6)


def test_an_all_ignored_label_map_costs_zero_not_nan() -> None:
    logits = torch.randn(2, 7, 4, 4, requires_grad=True)
    loss = task_loss("human_parts", logits, torch.full((2, 4, 4), 255))
    assert float(loss.detach()) == 0.0
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_dwa_by_hand() -> None:
    dwa = DynamicWeightAverage(["a", "b"])
    dwa.end_epoch({"a": 2.0, "b": 1.0})
    assert dwa.current() == {"a": 1.0, "b": 1.0}
    dwa.end_epoch({"a": 1.0, "b": 1.0})  # ratios 0.5 and 1
    ea, eb = math.exp(0.5 / 2), math.exp(1.0 / 2)
    assert dwa.current() == pytest.approx({"a": 2 * ea / (ea + eb), "b": 2 * eb / (ea + eb)})
    assert float(dwa.scale("b", torch.tensor(3.0))) == pytest.approx(3 * 2 * eb / (ea + eb))


def test_weightings() -> None:
    recipe = make_weighting("recipe", ["semseg", "normals"], {"normals": 10.0})
    assert recipe.current() == {"semseg": 1.0, "normals": 10.0}
    assert make_weighting("equal", ["semseg", "normals"]).current() == {
        "semseg": 1.0,
        "normals": 1.0,
    }
    uw = make_weighting("uw", ["a", "b"])
    assert len(list(uw.parameters())) == 2 and uw.current() == {"a": 0.5, "b": 0.5}
    with pytest.raises(ValueError, match="loss weights must be one of"):
        make_weighting("gradnorm", ["a"])


def test_epoch_batches_shard_every_batch_over_the_ranks() -> None:
    one = epoch_batches(10, 4, epoch=2, seed=1, world=World())
    assert one == epoch_batches(10, 4, epoch=2, seed=1, world=World())
    assert one != epoch_batches(10, 4, epoch=3, seed=1, world=World())
    assert len(one) == 2 and all(len(b) == 4 for b in one)
    halves = [epoch_batches(10, 4, 2, 1, World(rank, 2)) for rank in (0, 1)]
    for whole, first, second in zip(one, *halves, strict=True):
        assert first + second == whole
    with pytest.raises(ValueError, match="exceeds the 3 training samples"):
        epoch_batches(3, 4, 0, 0, World())


# ------------------------------------------------------------------------ DDP


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ddp_worker(rank: int, port: int, root: str, out: str, method: str) -> None:
    os.environ.update(
        {
            "WORLD_SIZE": "2",
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
    )
    torch.set_num_threads(1)
    try:
        run(
            DenseRunConfig(
                "nyud", Path(root), Path(out), method=method, **{**SMALL, "batch_size": 4}
            )
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def _needs_baseline_package(method: str) -> None:
    """The baselines are TorchJD's aggregators: `make test` installs it (strictly under CI);
    the GPU image lacks it, and there these cases skip."""
    if method in BASELINES:
        pytest.importorskip("torchjd", reason=f"{method} needs torchjd (requirements-dev.txt)")


@pytest.mark.parametrize("method", ["ours_mixed", "pcgrad"])
def test_two_gloo_ranks_train_and_agree(tmp_path: Path, method: str) -> None:
    _needs_baseline_package(method)
    root = write_fake("nyud", tmp_path / "data")
    out = tmp_path / "run"
    mp.spawn(_ddp_worker, args=(_free_port(), str(root), str(out), method), nprocs=2, join=True)
    result = json.loads((out / METRICS).read_text())
    assert result["world_size"] == 2 and result["ranks_agree"] is True
    assert set(result["metrics"]) == expected_metrics("nyud")


@pytest.mark.parametrize("method", ["cagrad", "mgda", "aligned_mtl", "ours_phase1"])
def test_every_other_method_trains_an_epoch(tmp_path: Path, method: str) -> None:
    _needs_baseline_package(method)
    root = write_fake("nyud", tmp_path / "data")
    result = run(DenseRunConfig("nyud", root, tmp_path / "run", method=method, **SMALL))
    assert set(result["metrics"]) == expected_metrics("nyud")
    assert all(math.isfinite(v) for v in result["history"][0]["loss"].values())
