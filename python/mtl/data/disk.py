"""Reading a dataset folder: checked file readers and the `Dataset` every loader shares.

Every reader opens files read-only and raises a ValueError naming the file and what is wrong
with it (its shape, its value range). Nothing here ever writes into a dataset's folder.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from mtl.data.spec import DenseDatasetSpec
from mtl.data.transforms import RecipeTransform, Sample, resize, sample_generator


def _unreadable(path: Path, what: str, err: Exception) -> ValueError:
    return ValueError(f"{path}: cannot be read as {what} ({type(err).__name__}: {err})")


def read_rgb(path: Path) -> np.ndarray:
    """An image file as ``uint8 [H, W, 3]``."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB")).copy()
    except (OSError, ValueError, SyntaxError) as err:  # PIL's errors for damaged files
        raise _unreadable(path, "an image", err) from err


def read_png(path: Path) -> np.ndarray:
    """A label PNG as stored: ``[H, W]`` indices for grey/palette images, ``[H, W, C]`` else."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            return np.asarray(img).copy()
    except (OSError, ValueError, SyntaxError) as err:
        raise _unreadable(path, "an image", err) from err


def read_npy(path: Path) -> np.ndarray:
    """A ``.npy`` array (no pickles)."""
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        raise _unreadable(path, "a plain .npy array", err) from err


def read_mat(path: Path) -> dict[str, Any]:
    """A MATLAB ``.mat`` file, structs as attribute objects, singleton dims squeezed."""
    import scipy.io
    from scipy.io.matlab import MatReadError

    try:
        return dict(scipy.io.loadmat(path, squeeze_me=True, struct_as_record=False))
    except (MatReadError, OSError, ValueError, TypeError, NotImplementedError) as err:
        raise _unreadable(path, "a MATLAB .mat file", err) from err


def mat_array(path: Path, key: str) -> np.ndarray:
    """The array ``key`` of a ``.mat`` file."""
    data = read_mat(path)
    if key not in data:
        found = sorted(k for k in data if not k.startswith("__"))
        raise ValueError(f"{path}: no variable {key!r} (found {found})")
    return np.asarray(data[key])


def as_map(array: np.ndarray, path: Path, channels: int, what: str) -> np.ndarray:
    """``array`` as ``[H, W]`` (``channels == 1``, a trailing 1 dropped) or ``[H, W, C]``;
    a ValueError naming ``path`` and the shape found otherwise."""
    if channels == 1 and array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    ok = array.ndim == 2 if channels == 1 else array.ndim == 3 and array.shape[2] == channels
    if not ok or min(array.shape[:2], default=0) == 0:
        want = "[H, W]" if channels == 1 else f"[H, W, {channels}]"
        raise ValueError(f"{path}: {what} must have shape {want}, found {tuple(array.shape)}")
    return array


def check_range(array: np.ndarray, path: Path, lo: float, hi: float, what: str) -> None:
    """A ValueError naming ``path`` unless every value is finite and in ``[lo, hi]``."""
    if array.size == 0:
        return
    if not np.isfinite(array).all():
        raise ValueError(f"{path}: {what} has non-finite values")
    amin, amax = float(array.min()), float(array.max())
    if amin < lo or amax > hi:
        raise ValueError(f"{path}: {what} values must lie in [{lo}, {hi}], found [{amin}, {amax}]")


def check_labels(array: np.ndarray, path: Path, allowed: Sequence[int], what: str) -> None:
    """A ValueError naming ``path`` unless ``array`` holds integers from ``allowed`` only."""
    if not np.issubdtype(array.dtype, np.integer) and not np.array_equal(array, np.round(array)):
        raise ValueError(f"{path}: {what} must hold integer class ids, found fractions")
    values = np.unique(array).astype(np.int64)  # integral by the check above
    bad = np.setdiff1d(values, np.asarray(allowed))
    if bad.size:
        raise ValueError(
            f"{path}: {what} values must be in {{{_ranges(allowed)}}}, found "
            f"{bad[:8].tolist()}{' ...' if bad.size > 8 else ''} (range [{values.min()}, "
            f"{values.max()}])"
        )


def _ranges(values: Sequence[int]) -> str:
    vals = sorted(values)
    parts, start = [], vals[0]
    for prev, cur in zip(vals, [*vals[1:], None], strict=True):
        if cur is None or cur != prev + 1:
            parts.append(str(start) if start == prev else f"{start}..{prev}")
            start = cur if cur is not None else start
    return ", ".join(parts)


def read_ids(path: Path) -> list[str]:
    """The ids of a split file (one a line, blanks skipped)."""
    if not path.is_file():
        raise ValueError(f"split file {path} does not exist")
    ids = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not ids:
        raise ValueError(f"split file {path} lists no ids")
    return ids


def require_files(files: Sequence[Path], sample_id: str) -> None:
    """A ValueError naming the first of ``files`` that does not exist."""
    for f in files:
        if not f.is_file():
            raise ValueError(f"split id {sample_id!r}: file {f} does not exist")


def to_sample(image: np.ndarray, maps: dict[str, np.ndarray], sample_id: str) -> Sample:
    """Numpy arrays in stored layout (``[H, W]`` / ``[H, W, C]``) to the tensor conventions of
    `mtl.data.spec` (image scaled to [0, 1] if it is ``uint8``)."""
    img = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    img = img.to(torch.float32) / 255.0 if image.dtype == np.uint8 else img.to(torch.float32)
    sample: Sample = {"image": img}
    for key, value in maps.items():
        t = torch.from_numpy(np.ascontiguousarray(value))
        if key in ("semseg", "human_parts", "sal"):
            sample[key] = t.to(torch.int64)
        elif t.ndim == 2:
            sample[key] = t.to(torch.float32)[None]
        else:
            sample[key] = t.to(torch.float32).permute(2, 0, 1)
    sample["meta"] = {"id": sample_id}
    return sample


class DenseDataset(Dataset[Sample]):
    """A split of a dense dataset read from disk, one sample per id.

    Subclasses implement `load` (the raw sample at its stored size, labels already in the
    `mtl.data.spec` conventions); this class applies the recipe's transforms with a generator
    seeded by ``(seed, epoch, index)``. `set_epoch` changes the augmentation of the next
    epoch; call it in the main process before iterating (DataLoader workers created afterwards
    see it; with ``persistent_workers=True`` they do not).
    """

    def __init__(
        self,
        spec: DenseDatasetSpec,
        root: Path,
        split: str,
        ids: Sequence[str],
        tasks: Sequence[str] | None,
        train: bool | None,
        image_size: tuple[int, int] | None,
        seed: int,
    ) -> None:
        self.spec = spec
        self.root = root
        self.split = split
        self.ids = list(ids)
        self.tasks = spec.check_tasks(None if tasks is None else tuple(tasks))
        self.train = split == "train" if train is None else bool(train)
        if image_size is not None and (
            len(image_size) != 2 or any(int(s) <= 0 for s in image_size)
        ):
            raise ValueError(f"image_size must be two positive ints (H, W), got {image_size!r}")
        self.image_size = None if image_size is None else (int(image_size[0]), int(image_size[1]))
        self.seed = int(seed)
        self.epoch = 0
        self.transform: Callable[[Sample, torch.Generator], Sample] = RecipeTransform(
            spec.recipe,
            {t: n for t, n in spec.num_classes.items() if t in self.tasks},
            self.train,
            self.image_size,
        )

    def set_epoch(self, epoch: int) -> None:
        """Use epoch ``epoch``'s augmentation from now on."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.ids)

    @abstractmethod
    def load(self, index: int) -> Sample:
        """Sample ``index`` as stored (labels converted, no augmentation)."""

    def __getitem__(self, index: int) -> Sample:
        if not 0 <= index < len(self.ids):
            raise IndexError(f"index {index} out of range for {len(self.ids)} samples")
        raw = match_image_size(self.load(index))
        return self.transform(raw, sample_generator(self.seed, self.epoch, index))


def match_image_size(sample: Sample) -> Sample:
    """Every label map of another size than the image resized to it (nearest; normals
    smooth, then renormalised), as the reference loaders do."""
    image = sample["image"]
    assert isinstance(image, Tensor)
    size = (int(image.shape[-2]), int(image.shape[-1]))
    odd = {k: v for k, v in sample.items() if isinstance(v, Tensor) and v.shape[-2:] != size}
    if not odd:
        return sample
    out = dict(sample)
    out.update(resize(odd, size))
    return out
