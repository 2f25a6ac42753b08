"""The recipes' joint transforms (python/mtl/data/transforms.py): geometry moves every map,
flips negate the normals' x, zooming divides depth, borders and ignore regions."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "python"))

from mtl.data import transforms as tf
from mtl.data.spec import IGNORE_INDEX, Augment, Recipe


def make_sample(h: int = 9, w: int = 12, seed: int = 0) -> dict[str, object]:
    g = torch.Generator().manual_seed(seed)
    normals = torch.randn(3, h, w, generator=g)
    normals = normals / normals.norm(dim=0, keepdim=True)
    normals[:, 0, 0] = 0.0  # one invalid pixel
    return {
        "image": torch.rand(3, h, w, generator=g),
        "semseg": torch.randint(0, 5, (h, w), generator=g),
        "depth": torch.rand(1, h, w, generator=g) + 1.0,
        "normals": normals,
        "edge": (torch.rand(1, h, w, generator=g) < 0.3).float(),
        "meta": {"id": "x"},
    }


def test_hflip_mirrors_every_map_and_negates_normals_x() -> None:
    s = make_sample()
    before = {k: v.clone() for k, v in s.items() if isinstance(v, torch.Tensor)}
    out = tf.hflip(s)
    n = before["normals"]
    assert torch.equal(out["normals"][0], -n[0].flip(-1))
    assert torch.equal(out["normals"][1:], n[1:].flip(-1))
    for key in ("image", "semseg", "depth", "edge"):
        assert torch.equal(out[key], before[key].flip(-1)), key
    assert out["meta"] == {"id": "x"}
    for key, value in before.items():  # the input is left alone
        assert torch.equal(s[key], value), key


@pytest.mark.parametrize("scale", [1.2, 1.5, 0.75])
def test_zoom_divides_depth_by_the_scale(scale: float) -> None:
    s = make_sample(10, 14)
    s["depth"] = torch.full((1, 10, 14), 3.0)
    out = tf.affine(s, scale)
    depth = out["depth"]
    assert depth.shape == (1, 10, 14)
    inside = depth > 0
    assert inside.any()
    torch.testing.assert_close(depth[inside], torch.full_like(depth[inside], 3.0 / scale))
    if scale > 1:  # zooming in brings nothing in from outside
        assert inside.all()
    else:  # borders: invalid depth, zero (invalid) normals, background labels
        assert not inside[0, 0, 0]
        assert torch.equal(out["normals"][:, 0, 0], torch.zeros(3))
        assert int(out["semseg"][0, 0]) == 0


def test_zoom_keeps_label_values_and_unit_normals() -> None:
    s = make_sample()
    out = tf.affine(s, 1.3, angle=15.0)
    assert set(out["semseg"].unique().tolist()) <= set(s["semseg"].unique().tolist())
    assert out["semseg"].dtype == torch.int64
    norm = out["normals"].norm(dim=0)
    assert torch.all(((norm - 1).abs() < 1e-5) | (norm == 0))


def test_rotation_by_180_degrees_turns_labels_around() -> None:
    s = make_sample(7, 7)
    out = tf.affine(s, 1.0, angle=180.0)
    assert torch.equal(out["semseg"], s["semseg"].flip(-1).flip(-2))
    torch.testing.assert_close(out["depth"], s["depth"].flip(-1).flip(-2))


def test_a_map_entirely_ignore_stays_ignore() -> None:
    s = make_sample()
    s["human_parts"] = torch.full((9, 12), IGNORE_INDEX)
    out = tf.affine(s, 0.8, angle=10.0)
    assert bool((out["human_parts"] == IGNORE_INDEX).all())


def test_crop_scale_divides_depth_and_keeps_the_size() -> None:
    s = make_sample(8, 12)
    out = tf.crop_scale(s, 1.5, top=1, left=2)
    assert out["image"].shape == (3, 8, 12)
    # nearest resize of the crop: every value comes from the crop, divided by the scale
    crop = s["depth"][..., 1 : 1 + 5, 2 : 2 + 8] / 1.5
    assert set(out["depth"].flatten().tolist()) <= set(crop.flatten().tolist())
    with pytest.raises(ValueError, match="leaves"):
        tf.crop_scale(s, 1.5, top=5, left=0)


def test_resize_uses_nearest_for_labels_and_renormalises_normals() -> None:
    s = make_sample(9, 12)
    out = tf.resize(s, (20, 25))
    assert out["semseg"].shape == (20, 25) and out["depth"].shape == (1, 20, 25)
    assert set(out["semseg"].unique().tolist()) <= set(s["semseg"].unique().tolist())
    assert set(out["depth"].flatten().tolist()) <= set(s["depth"].flatten().tolist())
    norm = out["normals"].norm(dim=0)
    assert torch.all(((norm - 1).abs() < 1e-5) | (norm == 0))
    assert float(norm[0, 0]) == 0.0  # the invalid pixel stays invalid
    assert float(out["image"].min()) >= 0.0 and float(out["image"].max()) <= 1.0


def test_ignore_regions_marks_what_cannot_be_scored() -> None:
    s = make_sample(3, 3)
    s["semseg"] = torch.tensor([[0, 4, 5], [-1, 2, 255], [1, 1, 1]])
    s["depth"] = torch.tensor([[[1.0, -2.0, float("nan")], [0.0, 3.0, 4.0], [1.0, 1.0, 1.0]]])
    out = tf.ignore_regions(s, {"semseg": 5})
    assert out["semseg"].tolist() == [[0, 4, 255], [255, 2, 255], [1, 1, 1]]
    assert out["depth"][0].tolist() == [[1.0, 0.0, 0.0], [0.0, 3.0, 4.0], [1.0, 1.0, 1.0]]


def test_recipe_transform_is_deterministic_by_generator() -> None:
    recipe = Recipe(
        image_size=(6, 8), epochs=1, batch_size=1, optimizer="adam", lr=1e-4,
        weight_decay=0.0, schedule="poly", loss_weights={}, backbone="resnet18",
        augment=Augment(flip=True, scale_range=(0.75, 1.25), rotation=20.0),
    )  # fmt: skip
    t = tf.RecipeTransform(recipe, {"semseg": 5}, train=True)
    a = t(make_sample(), tf.sample_generator(0, 0, 3))
    b = t(make_sample(), tf.sample_generator(0, 0, 3))
    c = t(make_sample(), tf.sample_generator(0, 1, 3))
    for key in ("image", "semseg", "depth", "normals"):
        assert torch.equal(a[key], b[key]), key
    assert a["image"].shape == (3, 6, 8)
    assert not torch.equal(a["image"], c["image"])  # another epoch, another augmentation
