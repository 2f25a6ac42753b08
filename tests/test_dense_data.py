"""The on-disk dense loaders (python/mtl/data/): tiny fakes in every layout and variant, read
back exactly; recipe augmentation deterministic by seed; bad data named; the root untouched."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "python"))

from mtl.data import fakes
from mtl.data.dense import SPECS, detect, open_dense
from mtl.data.spec import IGNORE_INDEX, IMAGENET_MEAN, IMAGENET_STD

NYUD_VARIANTS = ("current", "mat", "png")


def snapshot(root: Path) -> dict[str, str]:
    """Every path under ``root`` with its content hash and modification time."""
    return {
        str(p.relative_to(root)): (
            f"{hashlib.sha256(p.read_bytes()).hexdigest()} {p.stat().st_mtime_ns}"
            if p.is_file()
            else "dir"
        )
        for p in sorted(root.rglob("*"))
    }


def unnormalise(image: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return image * std + mean


# ---------------------------------------------------------------------------------- NYUD-v2


@pytest.mark.parametrize("variant", NYUD_VARIANTS)
def test_nyud_reads_every_variant_back(tmp_path: Path, variant: str) -> None:
    fake = fakes.write_nyud(tmp_path, variant, n_train=2, n_val=2)
    assert detect("nyud", tmp_path) == variant
    ds = open_dense("nyud", tmp_path, "val", image_size=(12, 16))
    assert len(ds) == 2 and not ds.train
    for i, sample_id in enumerate(fake.ids["val"]):
        s = ds[i]
        stored = fake.arrays[sample_id]
        assert s["meta"] == {"id": sample_id}
        seg = torch.from_numpy(stored["semseg"].astype(np.int64))
        assert torch.equal(s["semseg"], torch.where(seg == 0, IGNORE_INDEX, seg - 1))
        assert set(s["semseg"].unique().tolist()) == {*range(40), IGNORE_INDEX}
        assert s["depth"].dtype == torch.float32 and s["depth"].shape == (1, 12, 16)
        torch.testing.assert_close(s["depth"][0], torch.from_numpy(stored["depth"]))
        normals = torch.from_numpy(stored["normals"]).permute(2, 0, 1)
        valid = normals.abs().sum(0) > 0
        tol = {"current": 0.0, "png": 0.01, "mat": 0.12}[variant]  # 8-bit, JPEG encodings
        err = (s["normals"] - normals)[:, valid].abs().max()
        assert float(err) <= tol + 1e-6
        if variant != "mat":  # JPEG normals have no invalid pixels
            assert torch.equal(s["normals"][:, ~valid], torch.zeros(3, int((~valid).sum())))
        torch.testing.assert_close(s["edge"][0], torch.from_numpy(stored["edge"]))
        image = torch.from_numpy(stored["image"]).permute(2, 0, 1).float() / 255
        img_tol = 1e-5 if variant == "png" else 0.25  # JPEG on random noise is rough
        assert float((unnormalise(s["image"]) - image).abs().mean()) < img_tol


def test_nyud_default_size_is_the_recipe_and_labels_are_resized(tmp_path: Path) -> None:
    fakes.write_nyud(tmp_path, "png", n_train=1, n_val=1, label_size=(6, 8))
    s = open_dense("nyud", tmp_path, "val")[0]
    assert SPECS["nyud"].recipe.image_size == (480, 640)
    assert s["image"].shape == (3, 480, 640) and s["semseg"].shape == (480, 640)
    assert s["normals"].shape == (3, 480, 640) and s["edge"].shape == (1, 480, 640)


def test_nyud_task_subset(tmp_path: Path) -> None:
    fakes.write_nyud(tmp_path, n_train=1, n_val=1)
    s = open_dense("nyud", tmp_path / "NYUD_MT", "val", tasks=["semseg"], image_size=(12, 16))[0]
    assert set(s) == {"image", "semseg", "meta"}
    with pytest.raises(ValueError, match="tasks must be"):
        open_dense("nyud", tmp_path, "val", tasks=["saliency"])


def test_nyud_augmentation_is_deterministic_and_worker_independent(tmp_path: Path) -> None:
    fakes.write_nyud(tmp_path, n_train=4, n_val=1)
    a = open_dense("nyud", tmp_path, "train", image_size=(12, 16), seed=3)
    b = open_dense("nyud", tmp_path, "train", image_size=(12, 16), seed=3)
    assert a.train
    for i in range(len(a)):
        for key in ("image", "semseg", "depth", "normals", "edge"):
            assert torch.equal(a[i][key], b[i][key]), (i, key)
    loader = torch.utils.data.DataLoader(b, batch_size=2, num_workers=2)
    batches = list(loader)
    for i in range(len(a)):
        assert torch.equal(batches[i // 2]["depth"][i % 2], a[i]["depth"])
    before = [a[i]["image"] for i in range(len(a))]
    a.set_epoch(1)
    assert any(not torch.equal(a[i]["image"], before[i]) for i in range(len(a)))
    other = open_dense("nyud", tmp_path, "train", image_size=(12, 16), seed=4)
    assert any(not torch.equal(other[i]["image"], before[i]) for i in range(len(a)))


def test_nyud_flip_and_scale_are_applied_to_depth_and_normals(tmp_path: Path) -> None:
    fake = fakes.write_nyud(tmp_path, n_train=6, n_val=1)
    plain = open_dense("nyud", tmp_path, "train", image_size=(12, 16), train=False)
    aug = open_dense("nyud", tmp_path, "train", image_size=(12, 16), seed=0)
    seen_flip = seen_scale = False
    for i, sample_id in enumerate(fake.ids["train"]):
        p, q = plain[i], aug[i]
        d0, d1 = p["depth"], q["depth"]
        if torch.equal(d1, d0.flip(-1)):
            seen_flip = True
            n = p["normals"].flip(-1)
            assert torch.equal(q["normals"][0], -n[0]) and torch.equal(q["normals"][1:], n[1:])
        elif not torch.equal(d1, d0):
            seen_scale = True  # zoomed: every valid depth value is a stored one over 1.2 or 1.5
            stored = torch.from_numpy(fake.arrays[sample_id]["depth"]).flatten()
            values = d1[d1 > 0]
            ok = [torch.isclose(values[:, None], stored[None] / s).any(1) for s in (1.2, 1.5)]
            assert bool(ok[0].all() or ok[1].all())
    assert seen_flip and seen_scale


def test_nyud_never_writes_into_the_root(tmp_path: Path) -> None:
    fakes.write_nyud(tmp_path, "mat", n_train=2, n_val=1)
    before = snapshot(tmp_path)
    for split in ("train", "val"):
        ds = open_dense("nyud", tmp_path, split, image_size=(12, 16))
        for i in range(len(ds)):
            ds[i]
    assert snapshot(tmp_path) == before


def test_nyud_root_in_no_layout_lists_what_is_missing(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    with pytest.raises(ValueError, match=r"NYUD_MT layout.*looked for.*missing.*gt_sets"):
        open_dense("nyud", tmp_path, "train")
    with pytest.raises(ValueError, match="is not a folder"):
        open_dense("nyud", tmp_path / "nowhere", "train")
    with pytest.raises(ValueError, match="split must be"):
        open_dense("nyud", tmp_path, "test")
    fakes.write_nyud(tmp_path / "x", n_train=1, n_val=1)
    (tmp_path / "x/NYUD_MT/normals/img_5001.npy").rename(tmp_path / "x/NYUD_MT/normals/a.txt")
    with pytest.raises(ValueError, match=r"no NYUD_MT variant.*current: missing.*normals"):
        open_dense("nyud", tmp_path / "x", "train")


def test_nyud_split_id_without_its_file_is_named(tmp_path: Path) -> None:
    fakes.write_nyud(tmp_path, n_train=3, n_val=1)
    missing = tmp_path / "NYUD_MT/depth/img_5002.npy"
    missing.unlink()
    with pytest.raises(ValueError, match=f"img_5002.*{missing}"):
        open_dense("nyud", tmp_path, "train")
    open_dense("nyud", tmp_path, "train", tasks=["semseg"])  # depth not needed: fine


@pytest.mark.parametrize(
    ("file", "array", "message"),
    [
        ("depth/img_5001.npy", np.ones((12, 16, 2), np.float32), r"shape \[H, W\].*\(12, 16, 2\)"),
        ("depth/img_5001.npy", -np.ones((12, 16), np.float32), r"depth values.*\[-1.0, -1.0\]"),
        ("normals/img_5001.npy", np.ones((12, 16), np.float32), r"\[H, W, 3\].*\(12, 16\)"),
        ("normals/img_5001.npy", np.full((12, 16, 3), 2.0, np.float32), r"normals.*2.0"),
        ("edge/img_5001.npy", np.full((12, 16), 3.0, np.float32), r"edge values"),
        ("segmentation/img_5001.png", np.full((12, 16), 41, np.uint8), r"segmentation.*\[41\]"),
    ],
)
def test_nyud_bad_label_names_file_and_shape_or_range(
    tmp_path: Path, file: str, array: np.ndarray, message: str
) -> None:
    fakes.write_nyud(tmp_path, n_train=1, n_val=1)
    path = tmp_path / "NYUD_MT" / file
    if path.suffix == ".png":
        fakes._save_png(path, array)
    else:
        np.save(path, array)
    ds = open_dense("nyud", tmp_path, "train", image_size=(12, 16))
    with pytest.raises(ValueError, match=message) as err:
        ds[0]
    assert str(path) in str(err.value)
