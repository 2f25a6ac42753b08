"""NYUD-v2 in the ``NYUD_MT`` folder layout: segmentation (40 classes), depth, normals, edges.

Three variants of the layout exist; the one on disk is detected from the files of the split's
first id (`detect`)::

    NYUD_MT/gt_sets/{train,val}.txt          ids, one a line
    variant    images  segmentation  depth  normals            edge
    "current"  .jpg    .png          .npy   .npy (H, W, 3)     .npy (0/1)
    "mat"      .jpg    .mat          .mat   .jpg (2v/255 - 1)  .png (/255)
    "png"      .png    .png          .npy   .png (2v/255 - 1)  .png (/255)

Segmentation: 0 = unlabelled → 255 (ignore), 1..40 → classes 0..39. Depth in metres, 0 invalid.
Normals unit vectors, channel 0 horizontal, the zero vector invalid. Edges are auxiliary
(trained, never scored). ``root`` may be the ``NYUD_MT`` folder or the folder holding it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mtl.data.disk import (
    DenseDataset,
    as_map,
    check_labels,
    check_range,
    mat_array,
    read_ids,
    read_npy,
    read_png,
    read_rgb,
    require_files,
    to_sample,
)
from mtl.data.spec import Augment, DenseDatasetSpec, Recipe
from mtl.data.transforms import Sample

FOLDER = "NYUD_MT"
SPLITS = ("train", "val")
NUM_CLASSES = 40
# The file extension of each task's folder, per layout variant (in detection order).
VARIANTS: dict[str, dict[str, str]] = {
    "current": {"image": "jpg", "semseg": "png", "depth": "npy", "normals": "npy", "edge": "npy"},
    "mat": {"image": "jpg", "semseg": "mat", "depth": "mat", "normals": "jpg", "edge": "png"},
    "png": {"image": "png", "semseg": "png", "depth": "npy", "normals": "png", "edge": "png"},
}
DIRS = {
    "image": "images",
    "semseg": "segmentation",
    "depth": "depth",
    "normals": "normals",
    "edge": "edge",
}

SPEC = DenseDatasetSpec(
    name="nyud",
    tasks=("depth", "semseg", "normals", "edge"),
    auxiliary=("edge",),
    num_classes={"semseg": NUM_CLASSES},
    metrics={
        "depth": ("rmse", "log_rmse", "abs_rel"),
        "semseg": ("mIoU", "pixel_acc"),
        "normals": ("mean", "median", "11.25", "22.5", "30"),
    },
    delta_metrics=("depth/rmse", "semseg/mIoU", "normals/mean"),
    absent_class="zero",
    recipe=Recipe(
        image_size=(480, 640),
        epochs=100,
        batch_size=8,
        optimizer="adam",
        lr=1e-4,
        weight_decay=1e-4,
        schedule="poly",
        loss_weights={"semseg": 1.0, "depth": 1.0, "normals": 10.0, "edge": 50.0},
        backbone="hrnet18",
        normalize=True,
        augment=Augment(flip=True, scales=(1.0, 1.2, 1.5)),
        interpolation={"image": "bicubic", "normals": "bicubic"},
    ),
)


def find_root(root: str | Path) -> Path:
    """The ``NYUD_MT`` folder: ``root`` itself or ``root/NYUD_MT``."""
    path = Path(root)
    if not path.is_dir():
        raise ValueError(f"root {path} is not a folder")
    return path / FOLDER if (path / FOLDER).is_dir() else path


def _files(root: Path, variant: str, sample_id: str, keys: Sequence[str]) -> dict[str, Path]:
    ext = VARIANTS[variant]
    return {k: root / DIRS[k] / f"{sample_id}.{ext[k]}" for k in keys}


def detect(root: str | Path, split: str = "train", tasks: Sequence[str] | None = None) -> str:
    """The layout variant under ``root`` (``"current"``, ``"mat"`` or ``"png"``), read from the
    files of the first id of ``split``; a ValueError listing what was looked for otherwise."""
    base = find_root(root)
    keys = ["image", *SPEC.check_tasks(None if tasks is None else tuple(tasks))]
    wanted = [base / "gt_sets" / f"{split}.txt", *(base / DIRS[k] for k in keys)]
    missing = [p for p in wanted if not p.exists()]
    if missing:
        raise ValueError(
            f"root {Path(root)} is not in the {FOLDER} layout: looked for "
            f"{[str(p.relative_to(base)) for p in wanted]} under {base}; missing "
            f"{[str(p.relative_to(base)) for p in missing]}"
        )
    first = read_ids(base / "gt_sets" / f"{split}.txt")[0]
    report = []
    for variant in VARIANTS:
        files = _files(base, variant, first, keys)
        absent = [str(p.relative_to(base)) for p in files.values() if not p.is_file()]
        if not absent:
            return variant
        report.append(f"{variant}: missing {absent}")
    raise ValueError(
        f"root {base}: the files of id {first!r} match no {FOLDER} variant ({'; '.join(report)})"
    )


def decode_rgb_normals(path: Path) -> np.ndarray:
    """An 8-bit normals image as ``[H, W, 3]`` vectors 2v/255 − 1; a vector shorter than 0.5
    (no unit vector decodes so) is taken as invalid (the zero vector), *our reading*."""
    n = read_rgb(path).astype(np.float32) * (2.0 / 255.0) - 1.0
    n[np.linalg.norm(n, axis=-1) < 0.5] = 0.0
    return n


class NYUD(DenseDataset):
    """One split of NYUD-v2 (`open_dataset` builds it)."""

    def __init__(self, root: str | Path, split: str, **kwargs: object) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        tasks = kwargs.pop("tasks", None)
        base = find_root(root)
        self.variant = detect(root, split, tasks)  # type: ignore[arg-type]
        ids = read_ids(base / "gt_sets" / f"{split}.txt")
        super().__init__(SPEC, base, split, ids, tasks, **kwargs)  # type: ignore[arg-type]
        self.files = [_files(base, self.variant, i, ["image", *self.tasks]) for i in ids]
        for sample_id, files in zip(ids, self.files, strict=True):
            require_files(list(files.values()), sample_id)

    def load(self, index: int) -> Sample:
        files = self.files[index]
        image = read_rgb(files["image"])
        maps: dict[str, np.ndarray] = {}
        for task in self.tasks:
            maps[task] = getattr(self, f"_read_{task}")(files[task])
        return to_sample(image, maps, self.ids[index])

    def _read_semseg(self, path: Path) -> np.ndarray:
        raw = mat_array(path, "segmentation") if path.suffix == ".mat" else read_png(path)
        seg = as_map(raw, path, 1, "segmentation")
        check_labels(seg, path, range(NUM_CLASSES + 1), "segmentation")
        seg = seg.astype(np.int64)
        return np.where(seg == 0, 255, seg - 1)

    def _read_depth(self, path: Path) -> np.ndarray:
        raw = mat_array(path, "depth") if path.suffix == ".mat" else read_npy(path)
        depth = as_map(np.asarray(raw, dtype=np.float32), path, 1, "depth")
        check_range(depth, path, 0.0, float("inf"), "depth")
        return depth

    def _read_normals(self, path: Path) -> np.ndarray:
        if path.suffix == ".npy":
            raw = read_npy(path).astype(np.float32)
        else:
            raw = decode_rgb_normals(path)
        normals = as_map(raw, path, 3, "normals")
        check_range(normals, path, -1.001, 1.001, "normals")
        return normals

    def _read_edge(self, path: Path) -> np.ndarray:
        if path.suffix == ".npy":
            raw = read_npy(path).astype(np.float32)
        else:
            raw = read_png(path).astype(np.float32) / 255.0
        edge = as_map(raw, path, 1, "edge")
        check_range(edge, path, 0.0, 1.0, "edge")
        return edge


def open_dataset(
    root: str | Path,
    split: str,
    *,
    tasks: Sequence[str] | None = None,
    train: bool | None = None,
    image_size: tuple[int, int] | None = None,
    seed: int = 0,
) -> NYUD:
    """NYUD-v2 split ``split`` (``"train"``/``"val"``) under ``root``; ``train`` (default:
    ``split == "train"``) applies the recipe's augmentation; every sample is resized to
    ``image_size`` (default the recipe's 480×640)."""
    return NYUD(root, split, tasks=tasks, train=train, image_size=image_size, seed=seed)
