"""The dense metrics (python/mtl/dense_metrics.py) on hand-computed cases, and Δm."""

from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "python"))

from mtl.data import fakes
from mtl.data.dense import SPECS, open_dense
from mtl.dense_metrics import DenseMetrics, delta_m

NYUD = SPECS["nyud"]


def spec_with(classes: int, absent: str = "zero") -> object:
    return dataclasses.replace(NYUD, num_classes={"semseg": classes}, absent_class=absent)


def one_hot_logits(labels: torch.Tensor, classes: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(labels, classes).permute(0, 3, 1, 2).float() * 5 - 1


# pairs (target, prediction): (0,0) (0,1) (1,1) (1,1) (2,0), and an ignored pixel
TARGET = torch.tensor([[[0, 0, 1], [1, 2, 255]]])
PRED = torch.tensor([[[0, 1, 1], [1, 0, 2]]])


def test_miou_pools_the_confusion_over_the_split() -> None:
    m = DenseMetrics(spec_with(3))
    m.update({"semseg": PRED}, {"semseg": TARGET})
    # IoU: class 0 1/(1+1+1), class 1 2/(2+1+0), class 2 0/(0+0+1)
    out = m.compute()
    assert out["semseg/mIoU"] == pytest.approx(100 * (1 / 3 + 2 / 3 + 0) / 3)
    assert out["semseg/pixel_acc"] == pytest.approx(100 * 3 / 5)
    # one pixel a batch, as logits: the same pooled figures
    m2 = DenseMetrics(spec_with(3))
    for i in range(2):
        for j in range(3):
            logits = one_hot_logits(PRED[:, i : i + 1, j : j + 1], 3)
            m2.update({"semseg": logits}, {"semseg": TARGET[:, i : i + 1, j : j + 1]})
    assert m2.compute()["semseg/mIoU"] == pytest.approx(out["semseg/mIoU"])


def test_a_class_absent_from_the_split_counts_zero_or_is_skipped() -> None:
    zero, skip = DenseMetrics(spec_with(4, "zero")), DenseMetrics(spec_with(4, "skip"))
    for m in (zero, skip):
        m.update({"semseg": PRED}, {"semseg": TARGET})
    assert zero.compute()["semseg/mIoU"] == pytest.approx(100 * 1 / 4)
    assert skip.compute()["semseg/mIoU"] == pytest.approx(100 * 1 / 3)


def test_labels_out_of_range_are_an_error() -> None:
    m = DenseMetrics(spec_with(3))
    m.update({"semseg": PRED}, {"semseg": torch.tensor([[[0, 0, 1], [1, 7, 255]]])})
    with pytest.raises(ValueError, match=r"outside \[0, 3\)"):
        m.compute()
    with pytest.raises(ValueError, match="shape"):
        m.update({"semseg": PRED[:, :1]}, {"semseg": TARGET})


def test_depth_errors_over_valid_pixels() -> None:
    target = torch.tensor([[[[1.0, 2.0], [0.0, 4.0]]]])
    pred = torch.tensor([[[[2.0, 2.0], [5.0, 2.0]]]])
    spec = dataclasses.replace(
        NYUD, metrics={**NYUD.metrics, "depth": ("rmse", "log_rmse", "abs_rel", "abs_err")}
    )
    m = DenseMetrics(spec)
    m.update({"depth": pred}, {"depth": target})
    out = m.compute()
    assert out["depth/rmse"] == pytest.approx(math.sqrt(5 / 3))
    assert out["depth/log_rmse"] == pytest.approx(math.log(2) * math.sqrt(2 / 3))
    assert out["depth/abs_rel"] == pytest.approx((1 + 0 + 0.5) / 3)
    assert out["depth/abs_err"] == pytest.approx(1.0)
    assert {k for k in out if k.startswith("depth/")} == {
        "depth/rmse", "depth/log_rmse", "depth/abs_rel", "depth/abs_err"
    }  # fmt: skip
    assert math.isnan(out["semseg/mIoU"])  # no data for it
    # a negative prediction is clamped to 1e-9 in log space, not NaN
    m.update({"depth": -pred}, {"depth": target})
    assert math.isfinite(m.compute()["depth/log_rmse"])


def test_normal_angles_mean_median_and_thresholds() -> None:
    t10 = math.tan(math.radians(10))
    target = torch.tensor([[1.0, 0, 0]] * 4 + [[0.0, 0, 0]]).T.reshape(1, 3, 1, 5)
    pred = torch.tensor([[2.0, 0, 0], [1, 1, 0], [0, 1, 0], [1, t10, 0], [1, 0, 0]])
    pred = pred.T.reshape(1, 3, 1, 5)  # angles 0, 45, 90, 10 and an invalid pixel
    m = DenseMetrics(NYUD)
    m.update({"normals": pred}, {"normals": target})
    out = m.compute()
    assert out["normals/mean"] == pytest.approx((0 + 45 + 90 + 10) / 4, abs=1e-6)
    assert out["normals/median"] == pytest.approx(27.5, abs=1e-3)
    assert out["normals/11.25"] == pytest.approx(50.0)
    assert out["normals/22.5"] == pytest.approx(50.0)
    assert out["normals/30"] == pytest.approx(50.0)
    m.update({"normals": pred[..., 2:3]}, {"normals": target[..., 2:3]})  # one more 90°
    assert m.compute()["normals/median"] == pytest.approx(45.0, abs=1e-3)


def test_saliency_max_f_comes_from_the_mean_precision_and_recall() -> None:
    pascal = SPECS["pascal"]
    target = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 255]]).reshape(2, 2, 2)
    prob = torch.tensor([[0.96, 0.52, 0.33, 0.12], [0.62, 0.73, 0.12, 0.99]]).reshape(2, 1, 2, 2)
    m = DenseMetrics(pascal, sal_probabilities=True)
    m.update({"sal": prob}, {"sal": target})
    out = m.compute()
    # best threshold 0.35..0.5: mean P = (1 + 1/2)/2, mean R = 1 → F = 6/7; mean IoU 3/4
    # (the mean of per-image F there would be 5/6)
    assert out["sal/maxF"] == pytest.approx(100 * 6 / 7)
    assert out["sal/mIoU"] == pytest.approx(75.0)
    logits = DenseMetrics(pascal)
    logits.update({"sal": torch.logit(prob.double())}, {"sal": target})
    assert logits.compute()["sal/maxF"] == pytest.approx(out["sal/maxF"])


def test_metrics_of_a_perfect_prediction_on_a_fake_split(tmp_path: Path) -> None:
    fakes.write_nyud(tmp_path, n_train=1, n_val=3)
    ds = open_dense("nyud", tmp_path, "val", image_size=(12, 16))
    m = DenseMetrics(NYUD)
    assert all(math.isnan(v) for v in m.compute().values())
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=3)))
    pred = {"semseg": one_hot_logits(batch["semseg"].clamp_max(39), 40)}
    pred |= {"depth": batch["depth"], "normals": 3 * batch["normals"]}
    m.update(pred, batch)
    out = m.compute()
    assert set(out) == {f"{t}/{n}" for t in NYUD.scored_tasks for n in NYUD.metrics[t]}
    assert out["semseg/mIoU"] == pytest.approx(100.0)  # every class is present in the fake
    assert out["depth/rmse"] == 0.0 and out["normals/mean"] == pytest.approx(0.0, abs=0.05)
    assert out["normals/11.25"] == pytest.approx(100.0)


def test_delta_m_averages_signed_relative_changes() -> None:
    single = {"depth/rmse": 0.60, "semseg/mIoU": 40.0, "normals/mean": 20.0}
    multi = {"depth/rmse": 0.54, "semseg/mIoU": 44.0, "normals/mean": 21.0, "extra": 1.0}
    # depth 10% lower (+10), seg 10% higher (+10), normals 5% worse (-5)
    assert delta_m(multi, single, NYUD) == pytest.approx((10 + 10 - 5) / 3)
    assert delta_m(single, single, NYUD) == 0.0
    with pytest.raises(ValueError, match="results has no finite 'semseg/mIoU'"):
        delta_m({"depth/rmse": 1.0, "normals/mean": 1.0}, single, NYUD)
    with pytest.raises(ValueError, match="is 0"):
        delta_m(multi, {**single, "depth/rmse": 0.0}, NYUD)


def test_delta_m_on_cityscapes_is_the_plain_mean_of_four_metrics() -> None:
    spec = SPECS["cityscapes"]
    assert spec.delta_metrics == (
        "semseg/mIoU", "semseg/pixel_acc", "disparity/abs_err", "disparity/rel_err"
    )  # fmt: skip
    single = {"semseg/mIoU": 50.0, "semseg/pixel_acc": 80.0, "disparity/abs_err": 0.02,
              "disparity/rel_err": 40.0}  # fmt: skip
    multi = {"semseg/mIoU": 55.0, "semseg/pixel_acc": 80.0, "disparity/abs_err": 0.03,
             "disparity/rel_err": 30.0}  # fmt: skip
    assert delta_m(multi, single, spec) == pytest.approx((10 + 0 - 50 + 25) / 4)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_predictions_score_like_fp32(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    target = {
        "semseg": torch.randint(0, 40, (2, 5, 7), generator=g),
        "depth": torch.rand(2, 1, 5, 7, generator=g) + 0.5,
        "normals": torch.nn.functional.normalize(torch.randn(2, 3, 5, 7, generator=g), dim=1),
    }
    pred = {
        "semseg": torch.randn(2, 40, 5, 7, generator=g),
        "depth": torch.rand(2, 1, 5, 7, generator=g) + 0.5,
        "normals": torch.randn(2, 3, 5, 7, generator=g),
    }
    ref, low = DenseMetrics(NYUD), DenseMetrics(NYUD)
    ref.update(pred, target)
    low.update({k: v.to(dtype) for k, v in pred.items()}, target)
    tol = {torch.float64: 1e-9, torch.float32: 1e-9, torch.bfloat16: 2e-2, torch.float16: 2e-3}
    expected, got = ref.compute(), low.compute()
    for key in ("depth/rmse", "depth/abs_rel", "normals/mean"):
        assert got[key] == pytest.approx(expected[key], rel=tol[dtype]), key


def test_update_leaves_the_callers_tensors_alone() -> None:
    g = torch.Generator().manual_seed(1)
    pred = {"normals": torch.randn(1, 3, 4, 4, generator=g), "sal": torch.randn(1, 1, 4, 4)}
    target = {
        "normals": torch.nn.functional.normalize(torch.randn(1, 3, 4, 4, generator=g), dim=1),
        "sal": torch.randint(0, 2, (1, 4, 4), generator=g),
    }
    copies = {k: (pred[k].clone(), target[k].clone()) for k in pred}
    m = DenseMetrics(SPECS["pascal"])
    m.update(pred, target)
    m.compute()
    for k, (p, t) in copies.items():
        assert torch.equal(pred[k], p) and torch.equal(target[k], t), k


def test_batches_pool_like_one_batch() -> None:
    g = torch.Generator().manual_seed(2)
    target = {"depth": torch.rand(4, 1, 3, 5, generator=g), "semseg": TARGET.repeat(4, 1, 1)}
    pred = {"depth": torch.rand(4, 1, 3, 5, generator=g), "semseg": PRED.repeat(4, 1, 1).flip(0)}
    whole, parts = DenseMetrics(spec_with(3)), DenseMetrics(spec_with(3))
    whole.update(pred, target)
    for i in range(4):
        parts.update({k: v[i : i + 1] for k, v in pred.items()},
                     {k: v[i : i + 1] for k, v in target.items()})  # fmt: skip
    a, b = whole.compute(), parts.compute()
    assert a == pytest.approx(b, rel=1e-12, nan_ok=True)


def test_inputs_of_the_wrong_kind_are_named() -> None:
    m = DenseMetrics(NYUD)
    with pytest.raises(TypeError, match="pred must be a mapping"):
        m.update([torch.zeros(1)], {})  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"target\['depth'\] must be a Tensor, got list"):
        m.update({"depth": torch.zeros(1, 1, 2, 2)}, {"depth": [0.0]})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match=r"pred\['normals'\] and target\['normals'\] must both"):
        m.update({"normals": torch.zeros(1, 2, 2, 2)}, {"normals": torch.zeros(1, 3, 2, 2)})
