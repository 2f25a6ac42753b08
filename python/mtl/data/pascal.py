"""PASCAL-Context in the ``PASCAL_MT`` folder layout: segmentation (21 classes), human parts
(7), saliency, surface normals, and edges computed from the context label map::

    PASCAL_MT/ImageSets/Context/{train,val}.txt   ids
    JPEGImages/<id>.jpg                           RGB
    semseg/VOC12/<id>.png (else semseg/pascal-context/<id>.png)   0..20, 255 ignore
    pascal-context/trainval/<id>.mat              LabelMap: the 459-class context map
    human_parts/<id>.mat                          PASCAL-Part annotation (anno.objects)
    normals_distill/<id>.png                      RGB, 2v/255 − 1
    sal_distill/<id>.png                          grey / 255 > 0.5 → 1

Human parts: the parts of every person (class 15) grouped into background, head, torso,
upper arm, lower arm, upper leg, lower leg (`PART_GROUPS`); person pixels covered by no
named part are ignore (our reading); an image without a person is entirely ignore.
Normals are kept only where ``LabelMap`` is one of `NORMALS_CLASSES` (context classes that
NYU Depth V2 also names, plus tvmonitor; *unconfirmed*, the reference ships its own table),
looked up by name in the dataset's ``labels.txt`` (``"id: name"`` lines) or given as ids
(``normals_classes=``); elsewhere the normals are invalid (zero). Edges: ``|Laplacian(LabelMap)|
> 0`` (4-neighbour, mirrored border), thinned to one pixel (Zhang–Suen, *ours*: the reference's
thinning may differ by a pixel; lines lose their end pixel at the image border).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from mtl.data.disk import (
    DenseDataset,
    as_map,
    check_labels,
    mat_array,
    read_ids,
    read_mat,
    read_png,
    read_rgb,
    require_files,
    to_sample,
)
from mtl.data.spec import IGNORE_INDEX, Augment, DenseDatasetSpec, Recipe
from mtl.data.transforms import Sample

FOLDER = "PASCAL_MT"
SPLITS = ("train", "val")
PERSON = 15
SEMSEG_CLASSES = 21
PART_NAMES = ("background", "head", "torso", "upper arm", "lower arm", "upper leg", "lower leg")
# PASCAL-Part person part names -> our part class (the grouping of hair, neck, hands and feet
# is *unconfirmed*; change it here).
PART_GROUPS: dict[str, int] = {
    **dict.fromkeys(
        ("head", "hair", "leye", "reye", "lear", "rear", "lebrow", "rebrow", "nose", "mouth"), 1
    ),
    **dict.fromkeys(("torso", "neck"), 2),
    **dict.fromkeys(("luarm", "ruarm"), 3),
    **dict.fromkeys(("llarm", "rlarm", "lhand", "rhand"), 4),
    **dict.fromkeys(("luleg", "ruleg"), 5),
    **dict.fromkeys(("llleg", "rlleg", "lfoot", "rfoot"), 6),
}
# PASCAL-Context class names that NYU Depth V2's labels also name (its 40 classes and its
# object list), plus tvmonitor: our own list, *unconfirmed* (the reference ships its table).
# Names absent from a dataset's labels.txt are skipped.
NORMALS_CLASSES = (
    "bag", "bathtub", "bed", "bench", "blinds", "book", "bookshelf", "bottle", "box",
    "cabinet", "ceiling", "chair", "clock", "cloth", "computer", "counter", "cup", "curtain",
    "desk", "door", "dresser", "fence", "floor", "keyboard", "lamp", "light", "mat", "mirror",
    "paper", "person", "picture", "pillow", "plate", "refrigerator", "shelves", "sink", "sofa",
    "table", "toilet", "towel", "tvmonitor", "wall", "whiteboard", "window",
)  # fmt: skip
LABELS_FILES = ("pascal-context/labels.txt", "labels.txt")

FILES = {
    "image": ("JPEGImages", "jpg"),
    "labelmap": ("pascal-context/trainval", "mat"),
    "human_parts": ("human_parts", "mat"),
    "normals": ("normals_distill", "png"),
    "sal": ("sal_distill", "png"),
}
SEMSEG_DIRS = ("semseg/VOC12", "semseg/pascal-context")

SPEC = DenseDatasetSpec(
    name="pascal",
    tasks=("semseg", "human_parts", "sal", "normals", "edge"),
    auxiliary=("edge",),
    num_classes={"semseg": SEMSEG_CLASSES, "human_parts": len(PART_NAMES), "sal": 2},
    metrics={
        "semseg": ("mIoU", "pixel_acc"),
        "human_parts": ("mIoU", "pixel_acc"),
        "sal": ("maxF", "mIoU"),
        "normals": ("mean", "median", "11.25", "22.5", "30"),
    },
    delta_metrics=("semseg/mIoU", "human_parts/mIoU", "sal/mIoU", "normals/mean"),
    absent_class="zero",
    recipe=Recipe(
        image_size=(512, 512),
        epochs=100,
        batch_size=8,
        optimizer="adam",
        lr=1e-4,
        weight_decay=1e-4,
        schedule="poly",
        loss_weights={"semseg": 1.0, "human_parts": 2.0, "sal": 5.0, "edge": 50.0, "normals": 10.0},
        backbone="hrnet18",
        normalize=True,
        augment=Augment(flip=True, scale_range=(0.75, 1.25), rotation=20.0),
        interpolation={"image": "bicubic", "normals": "bicubic"},
    ),
)


def find_root(root: str | Path) -> Path:
    """The ``PASCAL_MT`` folder: ``root`` itself or ``root/PASCAL_MT``."""
    path = Path(root)
    if not path.is_dir():
        raise ValueError(f"root {path} is not a folder")
    return path / FOLDER if (path / FOLDER).is_dir() else path


def _needs(tasks: Sequence[str]) -> list[str]:
    """The file kinds the tasks read (``labelmap`` for edges and the normals' mask)."""
    keys = ["image"]
    if "edge" in tasks or "normals" in tasks:
        keys.append("labelmap")
    keys += [t for t in ("human_parts", "normals", "sal") if t in tasks]
    return keys


def detect(root: str | Path, split: str = "train", tasks: Sequence[str] | None = None) -> str:
    """``"VOC12"`` or ``"pascal-context"``: where the segmentation is read from; a ValueError
    listing what was looked for and what is missing if ``root`` is not in the layout."""
    base = find_root(root)
    chosen = SPEC.check_tasks(None if tasks is None else tuple(tasks))
    wanted = [f"ImageSets/Context/{split}.txt", *(FILES[k][0] for k in _needs(chosen))]
    missing = [w for w in wanted if not (base / w).exists()]
    seg = next((d for d in SEMSEG_DIRS if (base / d).is_dir()), None)
    if "semseg" in chosen and seg is None:
        missing.append(" or ".join(SEMSEG_DIRS))
    if missing:
        raise ValueError(
            f"root {Path(root)} is not in the {FOLDER} layout: looked for "
            f"{[*wanted, ' or '.join(SEMSEG_DIRS)]} under {base}; missing {missing}"
        )
    return "VOC12" if seg is None else Path(seg).name


def read_labels_txt(path: Path) -> dict[str, int]:
    """PASCAL-Context's ``labels.txt`` (``"id: name"`` lines) as name → id."""
    table = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        key, sep, name = line.partition(":")
        if not sep or not key.strip().isdigit():
            raise ValueError(f"{path}, line {n}: expected 'id: name', found {line!r}")
        table[name.strip().lower()] = int(key)
    return table


def normals_class_ids(base: Path) -> frozenset[int]:
    """The ``LabelMap`` ids of `NORMALS_CLASSES`, from the dataset's ``labels.txt``."""
    path = next((base / f for f in LABELS_FILES if (base / f).is_file()), None)
    if path is None:
        raise ValueError(
            f"{base}: the normals are masked by context class, looked up by name in one of "
            f"{[str(base / f) for f in LABELS_FILES]} (none exists); pass normals_classes=ids"
        )
    table = read_labels_txt(path)
    return frozenset(table[name] for name in NORMALS_CLASSES if name in table)


def laplacian_edges(labelmap: np.ndarray) -> np.ndarray:
    """``float32 [H, W]`` 0/1: pixels where the 4-neighbour Laplacian of ``labelmap`` is non-zero
    (borders mirrored), thinned to one pixel."""
    x = labelmap.astype(np.float64)
    p = np.pad(x, 1, mode="reflect") if min(x.shape) > 1 else np.pad(x, 1, mode="edge")
    lap = 4 * x - p[:-2, 1:-1] - p[2:, 1:-1] - p[1:-1, :-2] - p[1:-1, 2:]
    return thin(np.abs(lap) > 0).astype(np.float32)


def thin(mask: np.ndarray) -> np.ndarray:
    """Zhang–Suen thinning of a boolean ``[H, W]`` mask (our implementation); outside the
    image counts as background, so a line running off the image loses its last pixel."""
    core = mask.astype(np.uint8)
    while True:
        changed = False
        for step in (0, 1):
            img = np.pad(core, 1)
            # neighbours clockwise from north: P2..P9
            n = [
                img[:-2, 1:-1], img[:-2, 2:], img[1:-1, 2:], img[2:, 2:],
                img[2:, 1:-1], img[2:, :-2], img[1:-1, :-2], img[:-2, :-2],
            ]  # fmt: skip
            count = sum(v.astype(np.int32) for v in n)
            transitions = sum(
                ((n[i] == 0) & (n[(i + 1) % 8] == 1)).astype(np.int32) for i in range(8)
            )
            p2, p4, p6, p8 = n[0], n[2], n[4], n[6]
            if step == 0:
                cond = (p2 * p4 * p6 == 0) & (p4 * p6 * p8 == 0)
            else:
                cond = (p2 * p4 * p8 == 0) & (p2 * p6 * p8 == 0)
            remove = (core == 1) & (count >= 2) & (count <= 6) & (transitions == 1) & cond
            if remove.any():
                core = np.where(remove, 0, core).astype(np.uint8)
                changed = True
        if not changed:
            return core.astype(bool)


def human_parts_map(path: Path, shape: tuple[int, int]) -> np.ndarray:
    """``int64 [H, W]`` part classes of a PASCAL-Part ``.mat`` (255 ignore)."""
    data = read_mat(path)
    if "anno" not in data or not hasattr(data["anno"], "objects"):
        raise ValueError(f"{path}: expected a PASCAL-Part annotation (variable 'anno.objects')")
    out = np.zeros(shape, dtype=np.int64)
    people = 0
    for obj in np.atleast_1d(data["anno"].objects):
        if int(obj.class_ind) != PERSON:
            continue
        people += 1
        person = as_map(np.asarray(obj.mask), path, 1, "person mask")
        if person.shape != shape:
            raise ValueError(f"{path}: person mask has shape {person.shape}, the image {shape}")
        out[person > 0] = IGNORE_INDEX  # covered by a part below, else unknown
        for part in np.atleast_1d(obj.parts):
            name = str(part.part_name)
            if name not in PART_GROUPS:
                raise ValueError(
                    f"{path}: unknown person part {name!r} (known: {list(PART_GROUPS)})"
                )
            mask = as_map(np.asarray(part.mask), path, 1, f"part {name!r} mask")
            if mask.shape != shape:
                raise ValueError(
                    f"{path}: part {name!r} mask has shape {mask.shape}, the image {shape}"
                )
            out[mask > 0] = PART_GROUPS[name]
    if people == 0:
        out[:] = IGNORE_INDEX
    return out


class PASCALContext(DenseDataset):
    """One split of PASCAL-Context (`open_dataset` builds it)."""

    def __init__(
        self,
        root: str | Path,
        split: str,
        normals_classes: Iterable[int] | None = None,
        **kwargs: object,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        tasks = kwargs.pop("tasks", None)
        base = find_root(root)
        seg_dir = "semseg/" + detect(root, split, tasks)  # type: ignore[arg-type]
        ids = read_ids(base / "ImageSets" / "Context" / f"{split}.txt")
        super().__init__(SPEC, base, split, ids, tasks, **kwargs)  # type: ignore[arg-type]
        self.normals_ids: frozenset[int] = frozenset()
        if "normals" in self.tasks:
            self.normals_ids = (
                frozenset(int(i) for i in normals_classes)
                if normals_classes is not None
                else normals_class_ids(base)
            )
        kinds = _needs(self.tasks)
        self.files = []
        for i in ids:
            files = {k: base / FILES[k][0] / f"{i}.{FILES[k][1]}" for k in kinds}
            if "semseg" in self.tasks:
                files["semseg"] = base / seg_dir / f"{i}.png"
            require_files(list(files.values()), i)
            self.files.append(files)

    def load(self, index: int) -> Sample:
        files = self.files[index]
        image = read_rgb(files["image"])
        shape = (int(image.shape[0]), int(image.shape[1]))
        maps: dict[str, np.ndarray] = {}
        labelmap = None
        if "labelmap" in files:
            labelmap = as_map(
                mat_array(files["labelmap"], "LabelMap"), files["labelmap"], 1, "LabelMap"
            )
            shape = labelmap.shape  # the part and normals maps are annotated at this size
        for task in self.tasks:
            path = files.get(task)
            if task == "semseg":
                assert path is not None
                seg = as_map(read_png(path), path, 1, "segmentation")
                check_labels(seg, path, [*range(SEMSEG_CLASSES), IGNORE_INDEX], "segmentation")
                maps[task] = seg.astype(np.int64)
            elif task == "human_parts":
                assert path is not None
                maps[task] = human_parts_map(path, shape)
            elif task == "sal":
                assert path is not None
                grey = read_png(path)
                grey = grey if grey.ndim == 2 else grey[..., :3].mean(-1)
                sal = as_map(grey, path, 1, "saliency")
                maps[task] = (sal.astype(np.float32) / 255.0 > 0.5).astype(np.int64)
            elif task == "normals":
                assert path is not None and labelmap is not None
                normals = as_map(
                    read_rgb(path).astype(np.float32) * (2 / 255) - 1, path, 3, "normals"
                )
                if normals.shape[:2] != labelmap.shape:
                    raise ValueError(
                        f"{path}: normals have size {normals.shape[:2]}, the LabelMap "
                        f"{labelmap.shape} ({files['labelmap']})"
                    )
                keep = np.isin(labelmap, list(self.normals_ids))
                keep &= np.linalg.norm(normals, axis=-1) >= 0.5
                maps[task] = np.where(keep[..., None], normals, 0.0).astype(np.float32)
            elif task == "edge":
                assert labelmap is not None
                maps[task] = laplacian_edges(labelmap)
        return to_sample(image, maps, self.ids[index])


def open_dataset(
    root: str | Path,
    split: str,
    *,
    tasks: Sequence[str] | None = None,
    train: bool | None = None,
    image_size: tuple[int, int] | None = None,
    seed: int = 0,
    normals_classes: Iterable[int] | None = None,
) -> PASCALContext:
    """PASCAL-Context split ``split`` (``"train"``/``"val"``) under ``root``; ``train`` (default:
    ``split == "train"``) applies flip, rotation ±20° and scale 0.75..1.25; every sample is
    resized to ``image_size`` (default 512×512). ``normals_classes``: the ``LabelMap`` ids where
    normals count (default: `NORMALS_CLASSES` looked up in ``labels.txt``)."""
    return PASCALContext(
        root,
        split,
        normals_classes=normals_classes,
        tasks=tasks,
        train=train,
        image_size=image_size,
        seed=seed,
    )
