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


# ----------------------------------------------------------------------------- PASCAL-Context


@pytest.mark.parametrize("semseg_dir", ["VOC12", "pascal-context"])
def test_pascal_reads_every_task_back(tmp_path: Path, semseg_dir: str) -> None:
    from mtl.data.fakes import PASCAL_FAKE_LABELS

    fake = fakes.write_pascal(tmp_path, n_train=1, n_val=2, semseg_dir=semseg_dir)
    assert detect("pascal", tmp_path) == semseg_dir
    ds = open_dense("pascal", tmp_path, "val", image_size=(12, 16))
    kept = [k for k, v in PASCAL_FAKE_LABELS.items() if v in ("wall", "tvmonitor")]
    for i, sample_id in enumerate(fake.ids["val"]):
        s, stored = ds[i], fake.arrays[sample_id]
        assert torch.equal(s["semseg"], torch.from_numpy(stored["semseg"].astype(np.int64)))
        assert set(s["semseg"].unique().tolist()) == {*range(21), IGNORE_INDEX}
        parts = torch.from_numpy(stored["parts_expected"])
        assert torch.equal(s["human_parts"], parts)
        if i == 0:
            assert set(parts.unique().tolist()) == {*range(7), IGNORE_INDEX}
        else:  # no person in the image: all ignore
            assert bool((s["human_parts"] == IGNORE_INDEX).all())
        assert torch.equal(s["sal"], torch.from_numpy((stored["sal"] / 255 > 0.5).astype(np.int64)))
        keep = torch.from_numpy(np.isin(stored["labelmap"], kept))
        assert torch.equal(s["normals"].abs().sum(0) > 0, keep)
        truth = torch.from_numpy(stored["normals"]).permute(2, 0, 1)
        assert float((s["normals"] - truth)[:, keep].abs().max()) < 0.01
        # the context map changes every 4 columns: one edge column per change, running from
        # the second row to the last but one (thinning takes a line's end pixels)
        edge = s["edge"][0]
        changes = int((np.diff(stored["labelmap"][0].astype(int)) != 0).sum())
        columns = edge.sum(0) > 0
        assert int(columns.sum()) == changes
        assert bool((edge[1:-1, columns] == 1).all()) and int(edge.sum()) == changes * 10


def test_pascal_augments_with_rotation_and_keeps_personless_images_ignore(tmp_path: Path) -> None:
    fake = fakes.write_pascal(tmp_path, n_train=2, n_val=1)
    ds = open_dense("pascal", tmp_path, "val", train=True, image_size=(12, 16), seed=1)
    plain = open_dense("pascal", tmp_path, "val", image_size=(12, 16))
    assert SPECS["pascal"].recipe.augment.rotation == 20.0
    s = ds[0]
    assert not torch.equal(s["image"], plain[0]["image"])
    assert bool((s["human_parts"] == IGNORE_INDEX).all())
    assert set(s["sal"].unique().tolist()) <= {0, 1}
    assert fake.ids["val"][0] == s["meta"]["id"]


def test_pascal_errors_name_what_is_missing(tmp_path: Path) -> None:
    fakes.write_pascal(tmp_path, n_train=2, n_val=1)
    base = tmp_path / "PASCAL_MT"
    (base / "pascal-context/labels.txt").unlink()
    with pytest.raises(ValueError, match=r"labels.txt.*normals_classes"):
        open_dense("pascal", tmp_path, "train")
    ds = open_dense("pascal", tmp_path, "val", normals_classes=[3], image_size=(12, 16))
    assert ds[0]["normals"].abs().sum() > 0
    open_dense("pascal", tmp_path, "train", tasks=["semseg", "sal"])  # normals not needed
    (base / "sal_distill/2008_001001.png").unlink()
    with pytest.raises(ValueError, match=r"'2008_001001'.*sal_distill/2008_001001.png"):
        open_dense("pascal", tmp_path, "train", tasks=["sal"])
    (base / "human_parts").rename(base / "parts")
    with pytest.raises(ValueError, match=r"PASCAL_MT layout.*missing \['human_parts'\]"):
        open_dense("pascal", tmp_path, "train", tasks=["human_parts"])


def test_pascal_bad_labels_name_the_file(tmp_path: Path) -> None:
    import scipy.io

    fakes.write_pascal(tmp_path, n_train=1, n_val=1, size=(12, 16))
    base = tmp_path / "PASCAL_MT"
    fakes._save_png(base / "semseg/VOC12/2008_001000.png", np.full((12, 16), 30, np.uint8))
    ds = open_dense("pascal", tmp_path, "train", tasks=["semseg"], image_size=(12, 16))
    with pytest.raises(ValueError, match=r"semseg/VOC12/2008_001000.png.*\[30\]"):
        ds[0]
    scipy.io.savemat(base / "pascal-context/trainval/2008_001000.mat", {"Label": np.zeros((2, 2))})
    ds = open_dense("pascal", tmp_path, "train", tasks=["edge"], image_size=(12, 16))
    with pytest.raises(ValueError, match=r"trainval/2008_001000.mat: no variable 'LabelMap'"):
        ds[0]
    scipy.io.savemat(base / "human_parts/2008_001000.mat", {"x": 1})
    ds = open_dense("pascal", tmp_path, "train", tasks=["human_parts"], image_size=(12, 16))
    with pytest.raises(ValueError, match=r"human_parts/2008_001000.mat: expected a PASCAL-Part"):
        ds[0]


def test_pascal_never_writes_into_the_root(tmp_path: Path) -> None:
    fakes.write_pascal(tmp_path, n_train=2, n_val=1)
    before = snapshot(tmp_path)
    for split in ("train", "val"):
        ds = open_dense("pascal", tmp_path, split, image_size=(12, 16))
        for i in range(len(ds)):
            ds[i]
    assert snapshot(tmp_path) == before


# ------------------------------------------------------------------------------ MTAN arrays


@pytest.mark.parametrize(
    ("name", "label_folder"),
    [("nyuv2-mtan", "label"), ("cityscapes", "label_7"), ("cityscapes", "label")],
)
def test_mtan_reads_the_arrays_back(tmp_path: Path, name: str, label_folder: str) -> None:
    fake = fakes.write_mtan(tmp_path, name, n_train=2, n_val=2, label_folder=label_folder)
    assert detect(name, tmp_path) == ("mtan" if name == "nyuv2-mtan" else label_folder)
    spec = SPECS[name]
    ds = open_dense(name, tmp_path, "val")
    assert len(ds) == 2 and spec.recipe.normalize is False
    for i in range(2):
        s, stored = ds[i], fake.arrays[f"val/{i}"]
        assert s["meta"] == {"id": str(i)}
        assert s["image"].shape == (3, 8, 12)  # the stored size
        torch.testing.assert_close(s["image"], torch.from_numpy(stored["image"]).permute(2, 0, 1))
        label = torch.from_numpy(stored["semseg"]).long()
        assert torch.equal(s["semseg"], torch.where(label < 0, IGNORE_INDEX, label))
        classes = spec.num_classes["semseg"]
        assert set(s["semseg"].unique().tolist()) == {*range(classes), IGNORE_INDEX}
        key = "depth" if name == "nyuv2-mtan" else "disparity"
        torch.testing.assert_close(s[key], torch.from_numpy(stored["depth"]).permute(2, 0, 1))
        if name == "nyuv2-mtan":
            normals = torch.from_numpy(stored["normals"]).permute(2, 0, 1)
            torch.testing.assert_close(s["normals"], normals)


def test_mtan_augmentation_crops_scales_and_flips(tmp_path: Path) -> None:
    fakes.write_mtan(tmp_path, "nyuv2-mtan", n_train=6, n_val=1)
    plain = open_dense("nyuv2-mtan", tmp_path, "train", train=False)
    aug = open_dense("nyuv2-mtan", tmp_path, "train", seed=0)
    changed = 0
    for i in range(len(plain)):
        p, q = plain[i], aug[i]
        assert q["image"].shape == p["image"].shape
        if torch.equal(q["depth"], p["depth"].flip(-1)):
            assert torch.equal(q["normals"][0], -p["normals"][0].flip(-1))
        elif not torch.equal(q["depth"], p["depth"]):
            changed += 1
            stored = p["depth"].flatten()
            values = q["depth"][q["depth"] > 0]
            ok = [torch.isclose(values[:, None], stored[None] / s).any(1) for s in (1.2, 1.5)]
            assert bool(ok[0].all() or ok[1].all())
    assert changed > 0


def test_mtan_errors_name_the_file(tmp_path: Path) -> None:
    fakes.write_mtan(tmp_path, "cityscapes", n_train=2, n_val=1)
    with pytest.raises(ValueError, match=r"MTAN nyuv2-mtan layout.*missing.*normal"):
        open_dense("nyuv2-mtan", tmp_path, "train")
    (tmp_path / "train/depth/1.npy").unlink()
    with pytest.raises(ValueError, match=r"split id '1'.*train/depth/1.npy"):
        open_dense("cityscapes", tmp_path, "train")
    open_dense("cityscapes", tmp_path, "train", tasks=["semseg"])
    np.save(tmp_path / "val/label_7/0.npy", np.full((8, 12), 7.0, np.float32))
    ds = open_dense("cityscapes", tmp_path, "val")
    with pytest.raises(ValueError, match=r"val/label_7/0.npy: label values.*\[7\]"):
        ds[0]
    np.save(tmp_path / "val/image/0.npy", np.zeros((8, 12), np.float32))
    with pytest.raises(ValueError, match=r"val/image/0.npy: image must have shape \[H, W, 3\]"):
        ds[0]
    with pytest.raises(ValueError, match="dataset must be one of"):
        open_dense("cifar", tmp_path, "train")


# ------------------------------------------------------------------------------------- docs

DOCS = Path(__file__).resolve().parent.parent / "docs" / "datasets"
PAGES = {"nyud": "nyud.md", "pascal": "pascal.md", "nyuv2-mtan": "nyuv2-mtan.md",
         "cityscapes": "cityscapes.md"}  # fmt: skip


@pytest.mark.parametrize("name", sorted(PAGES))
def test_each_dataset_page_covers_source_layout_recipe_and_metrics(name: str) -> None:
    text = (DOCS / PAGES[name]).read_text()
    for heading in ("## Where to obtain it", "## Layout expected", "## Recipe", "## Metrics"):
        assert heading in text, (name, heading)
    assert f"--dataset {name}" in text
    for metric in SPECS[name].delta_metrics:
        assert f"`{metric}`" in text, (name, metric)
    assert PAGES[name] in (DOCS / "index.md").read_text()


def test_dataset_docs_examples_run(monkeypatch: pytest.MonkeyPatch) -> None:
    import re

    monkeypatch.chdir(DOCS.parent.parent)
    monkeypatch.setattr(sys, "path", list(sys.path))
    blocks = [
        (page.name, code)
        for page in sorted(DOCS.glob("*.md"))
        for code in re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)
    ]
    assert blocks
    for page, code in blocks:
        assert "../shared" not in code
        exec(compile(code, f"docs/datasets/{page}", "exec"), {})
    for page in DOCS.glob("*.md"):
        text = page.read_text()
        assert "../shared" not in text and not re.search(r"[Ii]ssue \d", text), page.name


def test_edges_are_thinned_to_a_subset_and_stable() -> None:
    from mtl.data.pascal import laplacian_edges, thin

    rng = np.random.default_rng(0)
    for shape in [(1, 7), (5, 1), (9, 13), (16, 16)]:
        labels = rng.integers(0, 3, shape).repeat(2, 0).repeat(2, 1)
        x = labels.astype(float)
        p = np.pad(x, 1, mode="reflect") if min(x.shape) > 1 else np.pad(x, 1, mode="edge")
        raw = np.abs(4 * x - p[:-2, 1:-1] - p[2:, 1:-1] - p[1:-1, :-2] - p[1:-1, 2:]) > 0
        edges = laplacian_edges(labels).astype(bool)
        assert not (edges & ~raw).any()  # thinning only removes
        assert np.array_equal(thin(edges), edges)  # and has converged
    assert laplacian_edges(np.ones((4, 5))).sum() == 0


def test_spawned_dataloader_workers_give_the_same_samples(tmp_path: Path) -> None:
    fakes.write_nyud(tmp_path, n_train=2, n_val=1)
    ds = open_dense("nyud", tmp_path, "train", image_size=(12, 16), seed=5)
    loader = torch.utils.data.DataLoader(
        ds, batch_size=2, num_workers=1, multiprocessing_context="spawn"
    )
    batch = next(iter(loader))
    for i in range(2):
        assert torch.equal(batch["normals"][i], ds[i]["normals"])
        assert torch.equal(batch["semseg"][i], ds[i]["semseg"])


@pytest.mark.parametrize("name", ["nyud", "pascal", "nyuv2-mtan", "cityscapes"])
def test_an_empty_root_names_what_was_looked_for(tmp_path: Path, name: str) -> None:
    (tmp_path / "unrelated.txt").write_text("x")
    with pytest.raises(ValueError, match=r"not in the .*layout: looked for .*; missing") as err:
        open_dense(name, tmp_path, "train")
    assert str(tmp_path) in str(err.value)
    with pytest.raises(ValueError, match="not in the"):
        detect(name, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["unrelated.txt"]


@pytest.mark.parametrize(
    "file", ["images/img_5001.jpg", "depth/img_5001.npy", "segmentation/img_5001.png"]
)
def test_a_damaged_file_is_named(tmp_path: Path, file: str) -> None:
    fakes.write_nyud(tmp_path, n_train=1, n_val=1)
    path = tmp_path / "NYUD_MT" / file
    path.write_bytes(b"not what it claims to be")
    ds = open_dense("nyud", tmp_path, "train", image_size=(12, 16))
    with pytest.raises(ValueError, match="cannot be read as") as err:
        ds[0]
    assert str(path) in str(err.value)


def test_a_damaged_mat_file_is_named(tmp_path: Path) -> None:
    fakes.write_nyud(tmp_path, "mat", n_train=1, n_val=1)
    path = tmp_path / "NYUD_MT/depth/img_5001.mat"
    path.write_bytes(b"\x00" * 200)
    ds = open_dense("nyud", tmp_path, "train", image_size=(12, 16))
    with pytest.raises(ValueError, match=r"img_5001.mat: cannot be read as a MATLAB"):
        ds[0]


@pytest.mark.parametrize("name", ["nyuv2-mtan", "cityscapes"])
def test_mtan_never_writes_into_the_root(tmp_path: Path, name: str) -> None:
    fakes.write_mtan(tmp_path, name, n_train=2, n_val=1)
    before = snapshot(tmp_path)
    for split in ("train", "val"):
        ds = open_dense(name, tmp_path, split)
        for i in range(len(ds)):
            ds[i]
    assert snapshot(tmp_path) == before
