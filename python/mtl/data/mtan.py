"""MTAN's preprocessed arrays: NYUv2 (13 classes, depth, normals) and Cityscapes (7 classes,
disparity), as MTAN, LibMTL, CAGrad and Recon read them::

    <root>/{train,val}/image/<i>.npy     float [H, W, 3] in [0, 1], ids 0..N-1 (N: the count)
    nyuv2-mtan:  label/<i>.npy  [H, W] −1..12 (−1 ignore)   depth/<i>.npy  [H, W, 1] metres
                 normal/<i>.npy [H, W, 3] unit (0 invalid)
    cityscapes:  label_7/<i>.npy (else label/) [H, W] −1..6  depth/<i>.npy  [H, W, 1] disparity

Samples keep the stored size (288×384 NYUv2, 128×256 Cityscapes) unless ``image_size`` is
given; the image is not normalised (the MTAN recipes use it as stored). ``−1`` becomes 255.
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
    read_npy,
    require_files,
    to_sample,
)
from mtl.data.spec import Augment, DenseDatasetSpec, Recipe
from mtl.data.transforms import Sample

SPLITS = ("train", "val")
_AUGMENT = Augment(flip=True, scales=(1.0, 1.2, 1.5), crop_scale=True)
_BILINEAR = {"image": "bilinear", "normals": "bilinear"}

NYUV2_SPEC = DenseDatasetSpec(
    name="nyuv2-mtan",
    tasks=("semseg", "depth", "normals"),
    num_classes={"semseg": 13},
    metrics={
        "semseg": ("mIoU", "pixel_acc"),
        "depth": ("abs_err", "rel_err"),
        "normals": ("mean", "median", "11.25", "22.5", "30"),
    },
    # every reported metric, as LibMTL and CAGrad average them (our reading, unconfirmed)
    delta_metrics=(
        "semseg/mIoU",
        "semseg/pixel_acc",
        "depth/abs_err",
        "depth/rel_err",
        "normals/mean",
        "normals/median",
        "normals/11.25",
        "normals/22.5",
        "normals/30",
    ),
    absent_class="skip",
    recipe=Recipe(
        image_size=None,
        epochs=200,
        batch_size=2,
        optimizer="adam",
        lr=1e-4,
        weight_decay=0.0,
        schedule="step",
        step_size=100,
        gamma=0.5,
        loss_weights={"semseg": 1.0, "depth": 1.0, "normals": 1.0},
        backbone="segnet",
        normalize=False,
        augment=_AUGMENT,
        interpolation=_BILINEAR,
    ),
)

CITYSCAPES_SPEC = DenseDatasetSpec(
    name="cityscapes",
    tasks=("semseg", "disparity"),
    num_classes={"semseg": 7},
    metrics={"semseg": ("mIoU", "pixel_acc"), "disparity": ("abs_err", "rel_err")},
    delta_metrics=("semseg/mIoU", "semseg/pixel_acc", "disparity/abs_err", "disparity/rel_err"),
    absent_class="skip",
    recipe=Recipe(
        image_size=None,
        epochs=200,
        batch_size=8,
        optimizer="adam",
        lr=1e-4,
        weight_decay=0.0,
        schedule="step",
        step_size=100,
        gamma=0.5,
        loss_weights={"semseg": 1.0, "disparity": 1.0},
        backbone="segnet",
        normalize=False,
        augment=_AUGMENT,
        interpolation=_BILINEAR,
    ),
)

SPECS = {"nyuv2-mtan": NYUV2_SPEC, "cityscapes": CITYSCAPES_SPEC}
# task -> candidate folders (first found wins)
FOLDERS: dict[str, dict[str, tuple[str, ...]]] = {
    "nyuv2-mtan": {"semseg": ("label",), "depth": ("depth",), "normals": ("normal",)},
    "cityscapes": {"semseg": ("label_7", "label"), "disparity": ("depth",)},
}


def _spec(name: str) -> DenseDatasetSpec:
    if name not in SPECS:
        raise ValueError(f"name must be one of {tuple(SPECS)}, got {name!r}")
    return SPECS[name]


def _folders(split_dir: Path, name: str, tasks: Sequence[str]) -> dict[str, Path] | list[str]:
    """Each task's folder under ``split_dir``, or the list of folders looked for and missing."""
    found: dict[str, Path] = {}
    missing: list[str] = []
    if not (split_dir / "image").is_dir():
        missing.append(str(split_dir / "image"))
    for task in tasks:
        options = FOLDERS[name][task]
        hit = next((split_dir / o for o in options if (split_dir / o).is_dir()), None)
        if hit is None:
            missing.append(" or ".join(str(split_dir / o) for o in options))
        else:
            found[task] = hit
    return missing if missing else found


def detect(
    root: str | Path, name: str = "nyuv2-mtan", split: str = "train", tasks: Sequence[str] = ()
) -> str:
    """The label folder in use (``"label"``, ``"label_7"``; ``"mtan"`` when the dataset has no
    choice) for dataset ``name`` under ``root``; a ValueError listing what is missing."""
    spec = _spec(name)
    path = Path(root)
    if not path.is_dir():
        raise ValueError(f"root {path} is not a folder")
    folders = _folders(path / split, name, spec.check_tasks(tuple(tasks) or None))
    if isinstance(folders, list):
        wanted = ["image", *(" or ".join(v) for v in FOLDERS[name].values())]
        raise ValueError(
            f"root {path} is not in the MTAN {name} layout: looked for {split}/"
            f"{{{', '.join(wanted)}}}; missing {folders}"
        )
    label = folders.get("semseg")
    return label.name if label is not None and name == "cityscapes" else "mtan"


class MTANArrays(DenseDataset):
    """One split of MTAN's NYUv2 or Cityscapes arrays (`open_dataset` builds it)."""

    def __init__(self, root: str | Path, split: str, name: str, **kwargs: object) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        spec = _spec(name)
        tasks = spec.check_tasks(kwargs.pop("tasks", None))  # type: ignore[arg-type]
        self.variant = detect(root, name, split, tasks)
        split_dir = Path(root) / split
        folders = _folders(split_dir, name, tasks)
        assert isinstance(folders, dict)
        count = len(list((split_dir / "image").glob("*.npy")))
        if count == 0:
            raise ValueError(f"{split_dir / 'image'} holds no .npy images")
        ids = [str(i) for i in range(count)]
        super().__init__(spec, Path(root), split, ids, tasks, **kwargs)  # type: ignore[arg-type]
        self.folders = {"image": split_dir / "image", **folders}
        for i in ids:
            require_files([f / f"{i}.npy" for f in self.folders.values()], i)

    def load(self, index: int) -> Sample:
        sample_id = self.ids[index]
        path = {k: f / f"{sample_id}.npy" for k, f in self.folders.items()}
        image = as_map(read_npy(path["image"]).astype(np.float32), path["image"], 3, "image")
        check_range(image, path["image"], 0.0, 1.0 + 1e-4, "image")
        maps: dict[str, np.ndarray] = {}
        for task in self.tasks:
            p = path[task]
            raw = read_npy(p)
            if task == "semseg":
                label = as_map(raw, p, 1, "label")
                check_labels(label, p, range(-1, self.spec.num_classes["semseg"]), "label")
                label = label.astype(np.int64)
                maps[task] = np.where(label < 0, 255, label)
            elif task == "normals":
                normals = as_map(raw.astype(np.float32), p, 3, "normals")
                check_range(normals, p, -1.001, 1.001, "normals")
                maps[task] = normals
            else:
                depth = as_map(raw.astype(np.float32), p, 1, task)
                check_range(depth, p, 0.0, float("inf"), task)
                maps[task] = depth
        return to_sample(image, maps, sample_id)


def open_dataset(
    root: str | Path,
    split: str,
    *,
    name: str = "nyuv2-mtan",
    tasks: Sequence[str] | None = None,
    train: bool | None = None,
    image_size: tuple[int, int] | None = None,
    seed: int = 0,
) -> MTANArrays:
    """Split ``split`` of MTAN dataset ``name`` (``"nyuv2-mtan"`` or ``"cityscapes"``) under
    ``root`` (the folder holding ``train/`` and ``val/``); ``train`` (default: ``split ==
    "train"``) applies the random scale-crop and flip."""
    return MTANArrays(root, split, name, tasks=tasks, train=train, image_size=image_size, seed=seed)
