"""Tiny datasets written in each on-disk layout, for tests (nothing real is downloadable here).

Every writer puts every class of every classification task in every image (so pooled and
per-image metrics see them all), returns a `Fake` with the root to open and the arrays it
wrote (as stored on disk, before any loader conversion), and is deterministic by ``seed``.
Sizes are tiny (default 12×16 pixels: enough for NYUD's 41 label values per image).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass
class Fake:
    """A written fake: ``root`` to pass to ``open_dataset``, the ``ids`` of each split and the
    stored arrays by id and file kind (``arrays[id]["semseg"]`` etc.)."""

    root: Path
    ids: dict[str, list[str]]
    arrays: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)


def _save_png(path: Path, array: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _save_jpg(path: Path, array: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, quality=95, subsampling=0)


def _save_npy(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, array)


def _save_mat(path: Path, data: dict[str, object]) -> None:
    import scipy.io

    path.parent.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(path, data)


def _write_split_files(folder: Path, ids: dict[str, list[str]]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for split, names in ids.items():
        (folder / f"{split}.txt").write_text("".join(f"{n}\n" for n in names))


def every_value(rng: np.random.Generator, shape: tuple[int, int], values: int) -> np.ndarray:
    """An ``[H, W]`` int map holding each of ``0..values-1`` at least once, shuffled."""
    h, w = shape
    if h * w < values:
        raise ValueError(f"a {h}x{w} map cannot hold {values} distinct values")
    flat = np.concatenate([np.arange(values), rng.integers(0, values, h * w - values)])
    return rng.permutation(flat).reshape(h, w)


def unit_normals(rng: np.random.Generator, shape: tuple[int, int], invalid: float) -> np.ndarray:
    """``[H, W, 3]`` float32 unit vectors varying smoothly (so JPEG keeps them), a fraction
    ``invalid`` of them zero."""
    h, w = shape
    y, x = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    phase = rng.uniform(0, 2 * np.pi, 3)
    n = np.stack(
        [np.sin(x / 4 + phase[0]), np.cos(y / 3 + phase[1]), 1.2 + np.sin((x + y) / 5 + phase[2])],
        axis=-1,
    ).astype(np.float32)
    n /= np.linalg.norm(n, axis=-1, keepdims=True)
    n[rng.random(shape) < invalid] = 0.0
    return n


def encode_normals(normals: np.ndarray) -> np.ndarray:
    """Unit vectors as RGB ``uint8`` (v = (n + 1) · 255 / 2, decoded as 2v/255 − 1; the zero
    vector, invalid, becomes mid-grey 128 and decodes to a vector of length 0.007)."""
    return np.clip(np.round((normals + 1.0) * 127.5), 0, 255).astype(np.uint8)


def _split_ids(prefix: str, n_train: int, n_val: int, start: int = 0) -> dict[str, list[str]]:
    return {
        "train": [f"{prefix}{start + i}" for i in range(n_train)],
        "val": [f"{prefix}{start + n_train + i}" for i in range(n_val)],
    }


def write_nyud(
    root: str | Path,
    variant: str = "current",
    n_train: int = 3,
    n_val: int = 2,
    size: tuple[int, int] = (12, 16),
    label_size: tuple[int, int] | None = None,
    seed: int = 0,
) -> Fake:
    """A fake ``NYUD_MT`` folder under ``root`` in layout ``variant`` (``"current"``, ``"mat"``,
    ``"png"``; see `mtl.data.nyud`). ``label_size``: store the labels at another size than
    the images (the loader resizes them)."""
    from mtl.data.nyud import DIRS, FOLDER, NUM_CLASSES, VARIANTS

    ext = VARIANTS[variant]
    base = Path(root) / FOLDER
    ids = _split_ids("img_", n_train, n_val, start=5001)
    _write_split_files(base / "gt_sets", ids)
    rng = np.random.default_rng(seed)
    lsize = label_size or size
    fake = Fake(base, ids)
    for sample_id in ids["train"] + ids["val"]:
        image = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
        seg = every_value(rng, lsize, NUM_CLASSES + 1).astype(np.uint8)
        depth = rng.uniform(0.5, 10.0, lsize).astype(np.float32)
        depth[rng.random(lsize) < 0.1] = 0.0
        # 8-bit encodings cannot say "invalid" exactly: the loader reads a vector decoded
        # shorter than 0.5 as invalid, and JPEG smears isolated pixels, so none there.
        normals = unit_normals(rng, lsize, invalid=0.0 if ext["normals"] == "jpg" else 0.1)
        edge = (rng.random(lsize) < 0.2).astype(np.float32)
        fake.arrays[sample_id] = {
            "image": image, "semseg": seg, "depth": depth, "normals": normals, "edge": edge
        }  # fmt: skip

        def path(key: str, sample_id: str = sample_id) -> Path:
            return base / DIRS[key] / f"{sample_id}.{ext[key]}"

        if ext["image"] == "jpg":
            _save_jpg(path("image"), image)
        else:
            _save_png(path("image"), image)
        if ext["semseg"] == "mat":
            _save_mat(path("semseg"), {"segmentation": seg})
        else:
            _save_png(path("semseg"), seg)
        if ext["depth"] == "mat":
            _save_mat(path("depth"), {"depth": depth})
        else:
            _save_npy(path("depth"), depth)
        if ext["normals"] == "npy":
            _save_npy(path("normals"), normals)
        elif ext["normals"] == "jpg":
            _save_jpg(path("normals"), encode_normals(normals))
        else:
            _save_png(path("normals"), encode_normals(normals))
        if ext["edge"] == "npy":
            _save_npy(path("edge"), edge)
        else:
            _save_png(path("edge"), (edge * 255).astype(np.uint8))
    return fake


def write_mtan(
    root: str | Path,
    name: str = "nyuv2-mtan",
    n_train: int = 3,
    n_val: int = 2,
    size: tuple[int, int] = (8, 12),
    label_folder: str | None = None,
    seed: int = 0,
) -> Fake:
    """Fake MTAN arrays for ``name`` (``"nyuv2-mtan"``: ``label``, ``depth``, ``normal``;
    ``"cityscapes"``: ``label_folder``, default ``label_7``, and ``depth`` as disparity)."""
    classes = 13 if name == "nyuv2-mtan" else 7
    label_folder = label_folder or ("label" if name == "nyuv2-mtan" else "label_7")
    base = Path(root)
    rng = np.random.default_rng(seed)
    fake = Fake(base, {"train": [str(i) for i in range(n_train)],
                       "val": [str(i) for i in range(n_val)]})  # fmt: skip
    for split, count in (("train", n_train), ("val", n_val)):
        for i in range(count):
            image = rng.random((*size, 3)).astype(np.float32)
            label = every_value(rng, size, classes + 1).astype(np.float32) - 1.0  # −1 ignore
            hi = 10.0 if name == "nyuv2-mtan" else 0.49
            depth = rng.uniform(hi / 20, hi, (*size, 1)).astype(np.float32)
            depth[rng.random((*size, 1)) < 0.1] = 0.0
            arrays = {"image": image, "semseg": label, "depth": depth}
            _save_npy(base / split / "image" / f"{i}.npy", image)
            _save_npy(base / split / label_folder / f"{i}.npy", label)
            _save_npy(base / split / "depth" / f"{i}.npy", depth)
            if name == "nyuv2-mtan":
                normals = unit_normals(rng, size, invalid=0.1)
                _save_npy(base / split / "normal" / f"{i}.npy", normals)
                arrays["normals"] = normals
            fake.arrays[f"{split}/{i}"] = arrays
    return fake


# A fake labels.txt: a few PASCAL-Context names, two of them in the normals' class list.
PASCAL_FAKE_LABELS = {1: "aeroplane", 2: "wall", 3: "sky", 4: "tvmonitor", 5: "grass"}


def _pascal_part_annotation(
    rng: np.random.Generator, shape: tuple[int, int], with_person: bool
) -> tuple[dict[str, object], np.ndarray]:
    """A PASCAL-Part ``anno`` struct and the part map it means (255 ignore): one person with
    all six part groups and an unlabelled strip, one person without parts, one dog."""
    from mtl.data.pascal import PERSON

    h, w = shape
    odt = [("class", "O"), ("class_ind", "O"), ("mask", "O"), ("parts", "O")]
    pdt = [("part_name", "O"), ("mask", "O")]
    expected = np.zeros(shape, np.int64)
    objects = []
    dog = np.zeros(shape, np.uint8)
    dog[:2, :] = 1
    objects.append(("dog", 12, dog, np.zeros((0, 0))))
    if with_person:
        person = np.zeros(shape, np.uint8)
        person[2:, : w // 2] = 1
        names = ["hair", "torso", "luarm", "rhand", "ruleg", "lfoot"]
        rows = np.array_split(np.arange(2, h - 1), len(names))
        parts = np.zeros((1, len(names)), dtype=pdt)
        expected[person > 0] = 255  # the last row of the person: no part
        for j, (name, r) in enumerate(zip(names, rows, strict=True)):
            mask = np.zeros(shape, np.uint8)
            mask[r[0] : r[-1] + 1, : w // 2] = 1
            parts[0, j] = (name, mask)
            expected[mask > 0] = j + 1
        objects.append(("person", PERSON, person, parts))
        bare = np.zeros(shape, np.uint8)
        bare[2:4, w // 2 + 1 : w // 2 + 3] = 1
        objects.append(("person", PERSON, bare, np.zeros((0, 0))))
        expected[bare > 0] = 255
    else:
        expected[:] = 255
    table = np.zeros((1, len(objects)), dtype=odt)
    for j, obj in enumerate(objects):
        table[0, j] = obj
    return {"imname": "fake", "objects": table}, expected


def write_pascal(
    root: str | Path,
    n_train: int = 3,
    n_val: int = 2,
    size: tuple[int, int] = (12, 16),
    semseg_dir: str = "VOC12",
    seed: int = 0,
) -> Fake:
    """A fake ``PASCAL_MT`` folder under ``root``. The last val image has no person (its parts
    are all ignore); ``arrays[id]`` also holds ``"parts_expected"`` (the part map it means)."""
    base = Path(root) / "PASCAL_MT"
    ids = _split_ids("2008_00", n_train, n_val, start=1000)
    _write_split_files(base / "ImageSets" / "Context", ids)
    (base / "pascal-context").mkdir(parents=True, exist_ok=True)
    (base / "pascal-context" / "labels.txt").write_text(
        "".join(f"{k}: {v}\n" for k, v in PASCAL_FAKE_LABELS.items())
    )
    rng = np.random.default_rng(seed)
    h, w = size
    fake = Fake(base, ids)
    every = ids["train"] + ids["val"]
    for sample_id in every:
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        seg = every_value(rng, size, 22).astype(np.uint8)
        seg[seg == 21] = 255
        # context classes in vertical bands (so edges are lines)
        band = np.repeat(rng.permutation([1, 2, 3, 4]), -(-w // 4))[:w]
        labelmap = np.tile(band, (h, 1)).astype(np.uint16)
        normals = unit_normals(rng, size, invalid=0.0)
        sal = rng.integers(0, 256, size).astype(np.uint8)
        sal[0, 0], sal[0, 1] = 255, 0  # both classes in every image
        anno, parts = _pascal_part_annotation(rng, size, with_person=sample_id != every[-1])
        _save_jpg(base / "JPEGImages" / f"{sample_id}.jpg", image)
        _save_png(base / "semseg" / semseg_dir / f"{sample_id}.png", seg)
        _save_mat(base / "pascal-context" / "trainval" / f"{sample_id}.mat", {"LabelMap": labelmap})
        _save_mat(base / "human_parts" / f"{sample_id}.mat", {"anno": anno})
        _save_png(base / "normals_distill" / f"{sample_id}.png", encode_normals(normals))
        _save_png(base / "sal_distill" / f"{sample_id}.png", sal)
        fake.arrays[sample_id] = {
            "image": image, "semseg": seg, "labelmap": labelmap, "normals": normals,
            "sal": sal, "parts_expected": parts,
        }  # fmt: skip
    return fake
