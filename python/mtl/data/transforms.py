"""The recipes' joint transforms: every map of a sample moves with the image.

A sample is a dict of tensors in the conventions of `mtl.data.spec` (``image [3, H, W]`` in
[0, 1] before `normalize`, labels ``[H, W]`` int64, dense maps ``[C, H, W]`` float32) plus a
``meta`` entry, which is passed through. Each function returns a new dict and never modifies
its input's tensors.

Geometry rules (DATASETS.md): a horizontal flip negates the normals' x (channel 0); zooming
the content by ``s`` divides depth and disparity by ``s`` (the scene looks ``s`` times closer);
normals are resized/warped with a smooth filter and renormalised, every label map with nearest;
pixels brought in from outside the image are 0 (background for class maps, invalid for depth
and normals). A class map that is entirely ignore (PASCAL human parts of an image without a
person) stays entirely ignore.

Randomness: `RecipeTransform` draws everything from a `torch.Generator` it is given; the loaders
seed one per sample from ``(seed, epoch, index)`` (`sample_generator`), so results do not depend
on DataLoader workers, their number, fork or spawn.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from mtl.data.spec import IGNORE_INDEX, IMAGENET_MEAN, IMAGENET_STD, Recipe

Sample = dict[str, object]

LABEL_KEYS = frozenset({"semseg", "human_parts", "sal"})
DEPTH_KEYS = frozenset({"depth", "disparity"})
NEAREST_KEYS = LABEL_KEYS | DEPTH_KEYS | {"edge"}
# MTLP: image and normals cubic, every other map nearest.
DEFAULT_INTERPOLATION: Mapping[str, str] = {"image": "bicubic", "normals": "bicubic"}


def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """A generator seeded from ``(seed, epoch, index)`` alone (stable across processes)."""
    digest = hashlib.blake2b(f"{seed}/{epoch}/{index}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


def _maps(sample: Sample) -> dict[str, Tensor]:
    return {k: v for k, v in sample.items() if isinstance(v, Tensor)}


def _with(sample: Sample, maps: Mapping[str, Tensor]) -> Sample:
    out = dict(sample)
    out.update(maps)
    return out


def renormalize(normals: Tensor, valid: Tensor | None = None) -> Tensor:
    """``normals [3, H, W]`` scaled to unit length; zero where ``valid`` is False or the
    vector vanished (``valid [H, W]`` bool, default: non-zero vectors)."""
    # elementwise over the 3 channels: much faster on the CPU than a dim-0 reduction
    norm = (normals[0] * normals[0] + normals[1] * normals[1] + normals[2] * normals[2]).sqrt()[
        None
    ]
    if valid is None:
        valid = norm[0] > 1e-6
    valid = valid & (norm[0] > 1e-6)
    return torch.where(valid, normals / norm.clamp_min(1e-12), torch.zeros_like(normals))


def hflip(sample: Sample) -> Sample:
    """Mirror left-right; the normals' x component changes sign."""
    maps = {k: v.flip(-1) for k, v in _maps(sample).items()}
    if "normals" in maps:
        n = maps["normals"].clone()
        n[0] = -n[0]
        maps["normals"] = n
    return _with(sample, maps)


def _mode(key: str, interpolation: Mapping[str, str]) -> str:
    if key in NEAREST_KEYS:
        return "nearest"
    return interpolation.get(key, DEFAULT_INTERPOLATION.get(key, "bilinear"))


def _as_float(key: str, value: Tensor) -> Tensor:
    x = value.to(torch.float32)
    return x[None, None] if key in LABEL_KEYS else x[None]


def _from_float(key: str, value: Tensor, like: Tensor) -> Tensor:
    if key in LABEL_KEYS:
        return value[0, 0].round().to(like.dtype)
    return value[0].to(like.dtype)


def _finish(key: str, out: Tensor, valid: Tensor | None) -> Tensor:
    if key == "image":
        return out.clamp(0.0, 1.0)
    if key == "normals":
        return renormalize(out, valid)
    return out


def resize(
    sample: Sample, size: tuple[int, int], interpolation: Mapping[str, str] | None = None
) -> Sample:
    """Every map resized to ``size = (H, W)`` (image and normals by ``interpolation``, default
    bicubic; label, depth and edge maps nearest). Depth values are not changed."""
    interpolation = interpolation or {}
    maps = {}
    for key, value in _maps(sample).items():
        if tuple(value.shape[-2:]) == tuple(size):
            maps[key] = value
            continue
        mode = _mode(key, interpolation)
        kwargs = {} if mode == "nearest" else {"align_corners": False}
        out = F.interpolate(_as_float(key, value), size=size, mode=mode, **kwargs)
        valid = None
        if key == "normals":
            invalid = (value.abs().sum(0) == 0).to(torch.float32)[None, None]
            valid = F.interpolate(invalid, size=size, mode="nearest")[0, 0] == 0
        maps[key] = _finish(key, _from_float(key, out, value), valid)
    return _with(sample, maps)


def affine(
    sample: Sample,
    scale: float,
    angle: float = 0.0,
    interpolation: Mapping[str, str] | None = None,
    rotate_normals: bool = False,
) -> Sample:
    """Zoom the content by ``scale`` and rotate it by ``angle`` degrees about the centre,
    keeping the size. Depth is divided by ``scale``; borders are 0 (invalid for depth and
    normals). ``rotate_normals`` also turns the normals' (x, y) by ``angle`` (the reference
    warps the maps without turning the vectors, *unconfirmed*; off by default)."""
    if scale <= 0:
        raise ValueError(f"scale must be positive, got {scale}")
    if scale == 1.0 and angle == 0.0:
        return dict(sample)
    interpolation = interpolation or {}
    maps = _maps(sample)
    h, w = next(iter(maps.values())).shape[-2:]
    a = math.radians(angle)
    # Output pixel p (about the centre) reads input pixel R(-a) p / s, in pixel units.
    cos, sin = math.cos(a) / scale, math.sin(a) / scale
    theta = torch.tensor([[cos, sin * h / w, 0.0], [-sin * w / h, cos, 0.0]], dtype=torch.float32)
    grid = F.affine_grid(theta[None], [1, 1, h, w], align_corners=False)
    out_maps = {}
    for key, value in maps.items():
        mode = _mode(key, interpolation)
        src = _as_float(key, value)
        out = F.grid_sample(src, grid, mode=mode, padding_mode="zeros", align_corners=False)
        result = _from_float(key, out, value)
        valid = None
        if key in LABEL_KEYS and bool((value == IGNORE_INDEX).all()):
            result = torch.full_like(value, IGNORE_INDEX)
        if key in DEPTH_KEYS:
            result = result / scale
        if key == "normals":
            invalid = (value.abs().sum(0) == 0).to(torch.float32)[None, None]
            ones = torch.ones_like(invalid)
            moved = F.grid_sample(invalid, grid, mode="nearest", align_corners=False)
            inside = F.grid_sample(ones, grid, mode="nearest", align_corners=False)
            valid = (moved[0, 0] == 0) & (inside[0, 0] == 1)
            if rotate_normals:
                c, s = math.cos(a), math.sin(a)
                x, y = result[0].clone(), result[1].clone()
                result = torch.stack([c * x - s * y, s * x + c * y, result[2]])
        out_maps[key] = _finish(key, result, valid)
    return _with(sample, out_maps)


def crop_scale(sample: Sample, scale: float, top: int, left: int) -> Sample:
    """MTAN's augmentation: crop ``(H/scale, W/scale)`` at ``(top, left)`` and resize it back
    to ``(H, W)`` (image and normals bilinear, the rest nearest); depth divided by ``scale``."""
    maps = _maps(sample)
    h, w = next(iter(maps.values())).shape[-2:]
    ch, cw = int(h / scale), int(w / scale)
    if not (0 <= top <= h - ch and 0 <= left <= w - cw):
        raise ValueError(f"crop ({ch}, {cw}) at ({top}, {left}) leaves the {h}x{w} image")
    cropped = {k: v[..., top : top + ch, left : left + cw] for k, v in maps.items()}
    out = resize(_with(sample, cropped), (h, w), {"image": "bilinear", "normals": "bilinear"})
    if scale != 1.0:
        for key in DEPTH_KEYS & out.keys():
            value = out[key]
            assert isinstance(value, Tensor)
            out[key] = value / scale
    return out


def ignore_regions(sample: Sample, num_classes: Mapping[str, int]) -> Sample:
    """Mark what cannot be scored: class ids outside ``[0, num_classes)`` become 255; depth
    that is not finite or not positive becomes 0; normals are renormalised (vanished vectors
    become the zero vector)."""
    maps = {}
    for key, value in _maps(sample).items():
        if key in num_classes:
            bad = (value < 0) | (value >= num_classes[key])
            maps[key] = torch.where(bad, torch.full_like(value, IGNORE_INDEX), value)
        elif key in DEPTH_KEYS:
            ok = torch.isfinite(value) & (value > 0)
            maps[key] = torch.where(ok, value, torch.zeros_like(value))
        elif key == "normals":
            maps[key] = renormalize(value)
    return _with(sample, maps)


def normalize(
    sample: Sample,
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
) -> Sample:
    """The image standardised per channel (``(x - mean) / std``)."""
    image = sample["image"]
    assert isinstance(image, Tensor)
    m = torch.tensor(mean, dtype=image.dtype).view(3, 1, 1)
    s = torch.tensor(std, dtype=image.dtype).view(3, 1, 1)
    return _with(sample, {"image": (image - m) / s})


class RecipeTransform:
    """A recipe's pipeline: train: flip → scale (and rotation) → resize → ignore regions →
    normalise; evaluation: resize → ignore regions → normalise.

    ``image_size``: the fixed output size (``None``: keep each sample's size).
    """

    def __init__(
        self,
        recipe: Recipe,
        num_classes: Mapping[str, int],
        train: bool,
        image_size: tuple[int, int] | None = None,
    ) -> None:
        self.recipe = recipe
        self.num_classes = dict(num_classes)
        self.train = train
        self.image_size = image_size if image_size is not None else recipe.image_size

    def __call__(self, sample: Sample, generator: torch.Generator) -> Sample:
        aug = self.recipe.augment
        interpolation = self.recipe.interpolation
        if self.train:
            if aug.flip and float(torch.rand((), generator=generator)) < 0.5:
                sample = hflip(sample)
            if aug.scale_range is not None:
                lo, hi = aug.scale_range
                scale = lo + (hi - lo) * float(torch.rand((), generator=generator))
            else:
                pick = int(torch.randint(len(aug.scales), (), generator=generator))
                scale = aug.scales[pick]
            angle = 0.0
            if aug.rotation:
                angle = aug.rotation * (2 * float(torch.rand((), generator=generator)) - 1)
            if aug.crop_scale:
                image = sample["image"]
                assert isinstance(image, Tensor)
                h, w = image.shape[-2:]
                ch, cw = int(h / scale), int(w / scale)
                top = int(torch.randint(h - ch + 1, (), generator=generator))
                left = int(torch.randint(w - cw + 1, (), generator=generator))
                sample = crop_scale(sample, scale, top, left)
            else:
                sample = affine(sample, scale, angle, interpolation)
        if self.image_size is not None:
            sample = resize(sample, self.image_size, interpolation)
        sample = ignore_regions(sample, self.num_classes)
        if self.recipe.normalize:
            sample = normalize(sample)
        return sample
