"""Scenes (python/mtl/data/scenes.py): the ray caster's geometry, determinism, splits and cache."""

from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "python"))

from mtl.data import scenes
from mtl.data.scenes import (
    BOX,
    CEILING,
    CLASSES,
    CYLINDER,
    FLOOR,
    SPHERE,
    WALL,
    camera_rays,
    make_scenes,
    render,
    sample_scenes,
)

RES = 17  # odd: the middle pixel looks straight down the viewing axis
MID = RES // 2
EDGE = (1 - 1 / RES) * math.tan(math.radians(scenes.FOV_DEG) / 2)  # outermost pixel centre
SIZES = {"train_size": 12, "val_size": 5, "test_size": 7}


@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own cache folder: nothing is read from or left in the user's."""
    monkeypatch.setenv("CS_KERNELS_CACHE", str(tmp_path))
    return tmp_path / "scenes"


def one_scene(**geometry: torch.Tensor) -> scenes.SceneBatch:
    """A scene in a 4 x 3 x 8 m room (x in [-2, 2], z in [-4, 4]), camera at (0, 1.5, 0)
    looking along +z, level; no object unless ``geometry`` activates some."""
    base = sample_scenes(1, torch.Generator().manual_seed(0))
    fields = {
        "room": torch.tensor([[2.0, 3.0, 4.0]]),
        "cam_pos": torch.tensor([[0.0, 1.5, 0.0]]),
        "cam_axes": torch.tensor([[[-1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]]),
        "active": torch.zeros(1, scenes.NUM_OBJECTS, dtype=torch.bool),
    }
    fields.update(geometry)
    return dataclasses.replace(base, **fields)


def cast(scene: scenes.SceneBatch) -> dict[str, torch.Tensor]:
    return render(scene, RES, torch.Generator().manual_seed(0))


def test_an_empty_room_matches_the_geometry_by_hand() -> None:
    out = cast(one_scene())
    seg, depth, normal = out["seg"][0], out["depth"][0, 0], out["normal"][0]
    # Straight ahead: the far wall at z = 4, facing the camera (+z in camera coordinates).
    assert int(seg[MID, MID]) == WALL
    assert float(depth[MID, MID]) == pytest.approx(4.0, abs=1e-4)
    assert normal[:, MID, MID].tolist() == pytest.approx([0.0, 0.0, 1.0], abs=1e-5)
    # Bottom middle pixel: the floor, 1.5 m below, at z = 1.5 / EDGE (< 4).
    assert int(seg[-1, MID]) == FLOOR
    assert float(depth[-1, MID]) == pytest.approx(1.5 / EDGE, abs=1e-4)
    assert normal[:, -1, MID].tolist() == pytest.approx([0.0, 1.0, 0.0], abs=1e-5)
    # Top middle: the ceiling, also 1.5 m away vertically; its normal points down.
    assert int(seg[0, MID]) == CEILING
    assert float(depth[0, MID]) == pytest.approx(1.5 / EDGE, abs=1e-4)
    assert normal[:, 0, MID].tolist() == pytest.approx([0.0, -1.0, 0.0], abs=1e-5)
    # Right middle: image right is world -x; the wall at x = -2, its normal pointing left.
    assert int(seg[MID, -1]) == WALL
    assert float(depth[MID, -1]) == pytest.approx(2.0 / EDGE, abs=1e-4)
    assert normal[:, MID, -1].tolist() == pytest.approx([-1.0, 0.0, 0.0], abs=1e-5)


def test_objects_match_the_geometry_by_hand() -> None:
    active = torch.zeros(1, scenes.NUM_OBJECTS, dtype=torch.bool)
    sphere = scenes.MAX_BOXES
    active[0, sphere] = True
    ball = one_scene(
        active=active,
        sphere_center=torch.tensor([[[0.0, 1.5, 2.5]] * scenes.MAX_SPHERES]),
        sphere_radius=torch.full((1, scenes.MAX_SPHERES), 0.5),
    )
    out = cast(ball)
    assert int(out["seg"][0, MID, MID]) == SPHERE
    assert float(out["depth"][0, 0, MID, MID]) == pytest.approx(2.0, abs=1e-4)
    assert out["normal"][0, :, MID, MID].tolist() == pytest.approx([0.0, 0.0, 1.0], abs=1e-4)
    # A box turned by 45 degrees shows its vertical edge: 0.5 * sqrt(2) in front of its centre.
    active = torch.zeros(1, scenes.NUM_OBJECTS, dtype=torch.bool)
    active[0, 0] = True
    box = one_scene(
        active=active,
        box_center=torch.tensor([[[0.0, 1.5, 3.0]] * scenes.MAX_BOXES]),
        box_half=torch.full((1, scenes.MAX_BOXES, 3), 0.5),
        box_yaw=torch.full((1, scenes.MAX_BOXES), math.pi / 4),
    )
    out = cast(box)
    assert int(out["seg"][0, MID, MID]) == BOX
    assert float(out["depth"][0, 0, MID, MID]) == pytest.approx(3.0 - 0.5 * math.sqrt(2), abs=1e-3)
    # Left of the edge the face turned towards the camera's left: normal (±1/√2, 0, 1/√2).
    n = out["normal"][0, :, MID, MID - 1].tolist()
    assert abs(n[0]) == pytest.approx(1 / math.sqrt(2), abs=1e-4) and n[1] == pytest.approx(0)
    assert n[2] == pytest.approx(1 / math.sqrt(2), abs=1e-4)
    # An upright cylinder seen from above its top: the top cap (normal up), then its side.
    active = torch.zeros(1, scenes.NUM_OBJECTS, dtype=torch.bool)
    active[0, scenes.MAX_BOXES + scenes.MAX_SPHERES] = True
    low = one_scene(
        active=active,
        cyl_center=torch.tensor([[[0.0, 0.4, 1.0]] * scenes.MAX_CYLINDERS]),
        cyl_radius=torch.full((1, scenes.MAX_CYLINDERS), 0.6),
        cyl_half=torch.full((1, scenes.MAX_CYLINDERS), 0.4),
        cam_axes=torch.tensor([[[-1.0, 0.0, 0.0], [0.0, 0.8, 0.6], [0.0, -0.6, 0.8]]]),
    )
    out = cast(low)
    seg, normal = out["seg"][0], out["normal"][0]
    assert int(seg[MID, MID]) == CYLINDER
    up_in_camera = torch.tensor([0.0, 0.8, 0.6])  # world +y in (right, up, towards camera)
    cap = (seg == CYLINDER) & ((normal - up_in_camera[:, None, None]).norm(dim=0) < 1e-3)
    side = (seg == CYLINDER) & ~cap
    assert bool(cap.any()) and bool(side.any())
    # The cap lies 0.8 m above the floor: the camera is 0.7 m above it.
    rays = camera_rays(RES).reshape(RES, RES, 3)
    axes = low.cam_axes[0]
    world = torch.nn.functional.normalize(rays @ axes, dim=-1)
    t = out["depth"][0, 0] / (world @ axes[2])
    height = 1.5 + t * world[..., 1]
    assert height[cap].tolist() == pytest.approx([0.8] * int(cap.sum()), abs=1e-3)


@pytest.fixture(scope="module")
def sample() -> dict[str, torch.Tensor]:
    return render(sample_scenes(48, torch.Generator().manual_seed(3)), RES, torch.Generator())


def test_every_visible_normal_faces_the_camera(sample: dict[str, torch.Tensor]) -> None:
    normal = sample["normal"]  # [B, 3, H, W]: x right, y up, z towards the camera
    rays = camera_rays(RES) * torch.tensor([1.0, 1.0, -1.0])  # the same frame
    rays = rays.T.reshape(1, 3, RES, RES)
    assert bool(((normal * rays).sum(1) < 0).all())
    assert torch.allclose(normal.norm(dim=1), torch.ones(()), atol=1e-5)


def test_targets_are_consistent(sample: dict[str, torch.Tensor]) -> None:
    seg, depth, normal, image = sample["seg"], sample["depth"], sample["normal"], sample["image"]
    assert image.dtype == seg.dtype == torch.uint8
    assert image.shape == (48, 3, RES, RES) and seg.shape == (48, RES, RES)
    assert depth.shape == (48, 1, RES, RES) and normal.shape == (48, 3, RES, RES)
    assert int(seg.max()) < len(CLASSES)
    assert float(depth.min()) > 0.1 and float(depth.max()) < 12.0  # inside the room
    # Floor pixels look up, ceiling pixels down, whatever the camera's pitch (world y up).
    counts = torch.bincount(seg.flatten().long(), minlength=len(CLASSES))
    assert bool((counts > 0).all()), f"every class appears in 48 scenes: {counts.tolist()}"


def test_the_image_does_not_give_the_class_away(sample: dict[str, torch.Tensor]) -> None:
    """Random colours and textures: a class's pixels vary within a scene, and no class has a
    colour of its own across scenes."""
    image, seg = sample["image"].float() / 255, sample["seg"]
    spread = []
    means = {c: [] for c in range(len(CLASSES))}
    for b in range(len(image)):
        for c in seg[b].unique().tolist():
            pixels = image[b][:, seg[b] == c]  # [3, n]
            if pixels.shape[1] >= 10:
                spread.append(float(pixels.std(dim=1).mean()))
                means[c].append(pixels.mean(dim=1))
    assert sum(spread) / len(spread) > 0.03  # texture, shading and noise
    for c, colours in means.items():
        if len(colours) >= 5:
            assert float(torch.stack(colours).std(dim=0).mean()) > 0.05, CLASSES[c]


def test_same_seed_same_bytes_and_splits_differ() -> None:
    first = make_scenes(4, **SIZES, resolution=12, cache=False)
    again = make_scenes(4, **SIZES, resolution=12, cache=False)
    for name in scenes.SPLITS:
        a, b = first.split(name), again.split(name)
        assert torch.equal(a.images, b.images), name
        for key in scenes.TASKS:
            assert torch.equal(a.targets[key], b.targets[key]), (name, key)
    assert not torch.equal(first.train.images[:5], first.val.images[:5])
    other = make_scenes(5, **SIZES, resolution=12, cache=False)
    assert not torch.equal(first.train.images, other.train.images)
    # Rendering in chunks does not depend on the split size.
    assert len(first.train) == 12 and len(first.val) == 5 and len(first.test) == 7


def test_cache_round_trip_and_repair(private_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fresh = make_scenes(1, **SIZES, resolution=10)
    files = sorted(private_cache.glob("*.pt"))
    assert len(files) == 3
    calls = []
    real = scenes.render_split
    monkeypatch.setattr(
        scenes,
        "render_split",
        lambda *a: calls.append(a) or real(*a),  # type: ignore[func-returns-value]
    )
    cached = make_scenes(1, **SIZES, resolution=10)
    assert calls == []  # every split came from the cache
    assert torch.equal(cached.test.images, fresh.test.images)
    assert torch.equal(cached.test.targets["normal"], fresh.test.targets["normal"])
    files[0].write_bytes(b"not a tensor file")
    repaired = make_scenes(1, **SIZES, resolution=10)
    assert len(calls) == 1
    assert torch.equal(repaired.train.images, fresh.train.images)


def test_batches_are_decoded_for_the_model() -> None:
    data = make_scenes(0, **SIZES, resolution=10, cache=False)
    images, targets = data.train.batch(torch.tensor([0, 3]))
    assert images.dtype == torch.float32 and images.shape == (2, 3, 10, 10)
    raw = data.train.images[[0, 3]].float() / 255
    assert torch.allclose(images, (raw - scenes.IMAGE_MEAN) / scenes.IMAGE_STD)
    assert targets["seg"].dtype == torch.int64 and targets["seg"].shape == (2, 10, 10)
    assert targets["depth"].dtype == targets["normal"].dtype == torch.float32
    moved = data.to("cpu")
    assert isinstance(moved.train, scenes.ScenesSplit)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"train_size": 0}, ValueError, "train_size"),
        ({"test_size": 2.5}, ValueError, "test_size"),
        ({"resolution": 4}, ValueError, "resolution"),
        ({"seed": "0"}, TypeError, "seed"),
    ],
)
def test_bad_arguments_are_refused(kwargs, error, match) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(error, match=match):
        make_scenes(**{"cache": False, **SIZES, **kwargs})


def test_check_tasks() -> None:
    assert scenes.check_tasks(["depth", "seg"]) == ("depth", "seg")
    with pytest.raises(ValueError, match="unknown"):
        scenes.check_tasks(["edges"])
    with pytest.raises(ValueError, match="repeat"):
        scenes.check_tasks(["seg", "seg"])
    with pytest.raises(ValueError, match="at least one"):
        scenes.check_tasks([])


def test_appearance_changes_the_image_only() -> None:
    """Colours, textures and light are drawn apart from the geometry: changing them leaves
    every target as it was, and textures vary across each surface."""
    scene = sample_scenes(4, torch.Generator().manual_seed(9))
    other = sample_scenes(4, torch.Generator().manual_seed(10))
    looks = ("color_a", "color_b", "wave_dir", "wave_freq", "wave_phase", "hard", "shine")
    light = ("light_pos", "light_power", "ambient", "exposure", "gamma", "noise")
    restyled = dataclasses.replace(scene, **{k: getattr(other, k) for k in looks + light})
    a, b = cast(scene), cast(restyled)
    for key in ("seg", "depth", "normal"):
        assert torch.equal(a[key], b[key]), key
    assert (a["image"].float() - b["image"].float()).abs().mean() > 10  # of 255
    # The albedo of one surface over a patch of points: not one flat colour.
    points = torch.rand(1, 200, 3, generator=torch.Generator().manual_seed(1)) * 2
    for surface in range(scenes.NUM_SURFACES):
        albedo = scenes._texture(scene.slice(0, 1), torch.full((1, 200), surface), points)
        assert float(albedo.std(dim=1).mean()) > 0.01, surface
