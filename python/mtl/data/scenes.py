"""Scenes: procedurally rendered indoor rooms with per-pixel segmentation, depth and normals.

The paper's dense tasks (NYUD-v2: semantic segmentation, depth, surface normals) on data we
can generate here, in seconds, from a seed. Each scene is a closed room seen from inside:

* **Room**: a box ``x ∈ [-ax, ax]``, ``y ∈ [0, h]``, ``z ∈ [-az, az]`` (metres; ``y`` up) whose
  faces are the floor, the ceiling and four walls.
* **Objects**, standing on the floor in front of the camera: up to ``MAX_BOXES`` boxes (turned
  about the vertical axis), ``MAX_SPHERES`` spheres and ``MAX_CYLINDERS`` upright cylinders.
* **Camera**: a pinhole (``FOV_DEG`` field of view) at a random place and height, turned to a
  random heading and pitched down a little.

A vectorised ray caster (one ray per pixel, in torch) finds the nearest surface of every pixel
and gives:

==============  ====================================================  ====================
target          per pixel                                             stored as
==============  ====================================================  ====================
``seg``         class id: 0 floor, 1 wall, 2 ceiling, 3 box,          uint8 ``[n, H, W]``
                4 sphere, 5 cylinder (``CLASSES``)
``depth``       distance along the camera's viewing axis (metres)     float32 ``[n, 1, H, W]``
``normal``      unit surface normal in camera coordinates (x right,   float16 ``[n, 3, H, W]``
                y up, z towards the camera)
==============  ====================================================  ====================

The RGB image (uint8 ``[n, 3, H, W]``) is the only input. So that the targets cannot simply be
read off it, every surface gets a random colour (independent of its class) and a random
procedural texture (sums of sinusoids in world coordinates, smooth or hard-edged), lit by a
random point light with cast shadows, an ambient term and a specular highlight, then a random
exposure, gamma and pixel noise before quantisation to 8 bits.

Deterministic by seed: each split (train, val, test) is drawn from its own generator seeded
from ``(seed, split)``, and rendered in fixed chunks, so the same arguments give the same bytes.
`make_scenes` caches the result on disk (``$CS_KERNELS_CACHE/scenes``, by default
``~/.cache/cs_kernels/scenes``, outside the repository).
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from mtl.data.base import SPLITS, Split, Splits, TaskSpec

CLASSES = ("floor", "wall", "ceiling", "box", "sphere", "cylinder")
FLOOR, WALL, CEILING, BOX, SPHERE, CYLINDER = range(len(CLASSES))
MAX_BOXES, MAX_SPHERES, MAX_CYLINDERS = 3, 2, 2
FOV_DEG = 60.0
FORMAT_VERSION = 1  # part of the cache key: bump when the rendering changes
CHUNK = 64  # scenes rendered at once (fixed: the bytes do not depend on the machine)
EPS = 1e-4
# Input normalisation of ``ScenesSplit.decode``: 8-bit RGB to roughly zero mean, unit spread.
IMAGE_MEAN, IMAGE_STD = 0.45, 0.25

TASKS: dict[str, TaskSpec] = {
    "seg": TaskSpec("seg", "segment", "miou", lower_is_better=False, classes=len(CLASSES)),
    "depth": TaskSpec("depth", "depth", "rmse", lower_is_better=True, extra_metrics=("abs_rel",)),
    "normal": TaskSpec("normal", "normal", "angle", lower_is_better=True),
}
DEFAULT_TASKS = ("seg", "depth", "normal")

# Surfaces that carry their own appearance: the floor, the ceiling, the walls, then each object.
ROOM_SURFACES = 3
NUM_OBJECTS = MAX_BOXES + MAX_SPHERES + MAX_CYLINDERS
NUM_SURFACES = ROOM_SURFACES + NUM_OBJECTS
TEXTURE_WAVES = 3


def check_tasks(tasks: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """Validate a task list against ``TASKS``; returns it as a tuple."""
    tasks = tuple(tasks)
    if not tasks:
        raise ValueError("tasks must name at least one task")
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"tasks: unknown {unknown}; choose from {sorted(TASKS)}")
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"tasks must not repeat a task, got {list(tasks)}")
    return tasks


class ScenesSplit(Split):
    """A split of rendered scenes in compact storage (see the module docstring).

    ``batch`` decodes: images to float32 ``(rgb / 255 - IMAGE_MEAN) / IMAGE_STD``, ``seg``
    to int64, ``normal`` to float32; ``depth`` stays float32 metres.
    """

    def decode(
        self, images: Tensor, targets: dict[str, Tensor]
    ) -> tuple[Tensor, dict[str, Tensor]]:
        x = (images.float() / 255.0 - IMAGE_MEAN) / IMAGE_STD
        out = dict(targets)
        if "seg" in out:
            out["seg"] = out["seg"].long()
        if "normal" in out:
            out["normal"] = out["normal"].float()
        return x, out


@dataclass(frozen=True)
class Scenes(Splits):
    """The three fixed splits of one seed at one resolution."""

    train: ScenesSplit
    val: ScenesSplit
    test: ScenesSplit
    seed: int
    resolution: int


# ------------------------------------------------------------------------ scene sampling


@dataclass(frozen=True)
class SceneBatch:
    """The parameters of ``B`` scenes (float32 tensors; see `sample_scenes` for the ranges).

    Geometry: ``room [B, 3]`` half-width ``ax``, height ``h``, half-depth ``az``;
    ``cam_pos [B, 3]``; ``cam_axes [B, 3, 3]`` rows right, up, forward (unit, world frame);
    ``box_center [B, Kb, 3]``, ``box_half [B, Kb, 3]``, ``box_yaw [B, Kb]``;
    ``sphere_center [B, Ks, 3]``, ``sphere_radius [B, Ks]``; ``cyl_center [B, Kc, 3]`` (mid
    height), ``cyl_radius [B, Kc]``, ``cyl_half [B, Kc]``; ``active [B, K]`` bool over the
    objects in the order boxes, spheres, cylinders.
    Appearance, per surface ``[B, S]`` (floor, ceiling, walls, then each object):
    ``color_a``/``color_b [B, S, 3]`` the two texture colours, ``wave_dir [B, S, W, 3]``,
    ``wave_freq``/``wave_phase [B, S, W]``, ``hard [B, S]`` (stripes instead of smooth),
    ``shine [B, S]`` specular strength. Light and camera response: ``light_pos [B, 3]``,
    ``light_power``, ``ambient``, ``exposure``, ``gamma``, ``noise`` ``[B]``.
    """

    room: Tensor
    cam_pos: Tensor
    cam_axes: Tensor
    box_center: Tensor
    box_half: Tensor
    box_yaw: Tensor
    sphere_center: Tensor
    sphere_radius: Tensor
    cyl_center: Tensor
    cyl_radius: Tensor
    cyl_half: Tensor
    active: Tensor
    color_a: Tensor
    color_b: Tensor
    wave_dir: Tensor
    wave_freq: Tensor
    wave_phase: Tensor
    hard: Tensor
    shine: Tensor
    light_pos: Tensor
    light_power: Tensor
    ambient: Tensor
    exposure: Tensor
    gamma: Tensor
    noise: Tensor

    def __len__(self) -> int:
        return int(self.room.shape[0])

    def slice(self, start: int, stop: int) -> SceneBatch:
        """Scenes ``start:stop``."""
        fields = {k: v[start:stop] for k, v in vars(self).items()}
        return SceneBatch(**fields)


def _uniform(gen: torch.Generator, low: float, high: float, *shape: int) -> Tensor:
    return low + (high - low) * torch.rand(*shape, generator=gen)


def _hsv_to_rgb(hsv: Tensor) -> Tensor:
    """``[..., 3]`` hue, saturation, value in [0, 1] to RGB in [0, 1]."""
    h, s, v = hsv.unbind(-1)
    k = torch.stack([(5 + h * 6) % 6, (3 + h * 6) % 6, (1 + h * 6) % 6], dim=-1)
    f = (torch.minimum(k, 4 - k)).clamp(0, 1)
    return v[..., None] - v[..., None] * s[..., None] * f


def sample_scenes(count: int, gen: torch.Generator) -> SceneBatch:
    """Draw ``count`` scenes from ``gen`` (CPU generator); fully vectorised."""
    b = count
    room = torch.stack(
        [_uniform(gen, 2.0, 4.0, b), _uniform(gen, 2.4, 3.2, b), _uniform(gen, 2.0, 4.0, b)], 1
    )
    ax, height, az = room.unbind(1)
    margin = 0.6
    cam_x = (2 * torch.rand(b, generator=gen) - 1) * (ax - margin)
    cam_z = (2 * torch.rand(b, generator=gen) - 1) * (az - margin)
    cam_y = _uniform(gen, 1.0, 1.8, b)
    cam_pos = torch.stack([cam_x, cam_y, cam_z], 1)
    # Face the middle of the room, give or take 50 degrees, so that no view is one close wall.
    to_middle = torch.atan2(-cam_x, -cam_z)
    yaw = to_middle + torch.deg2rad(_uniform(gen, -50.0, 50.0, b))
    pitch = torch.deg2rad(_uniform(gen, -25.0, 0.0, b))
    forward = torch.stack(
        [torch.cos(pitch) * torch.sin(yaw), torch.sin(pitch), torch.cos(pitch) * torch.cos(yaw)], 1
    )
    up_world = torch.tensor([0.0, 1.0, 0.0]).expand(b, 3)
    right = F.normalize(torch.cross(forward, up_world, dim=1), dim=1)
    up = torch.cross(right, forward, dim=1)
    cam_axes = torch.stack([right, up, forward], 1)

    # Objects stand on the floor, mostly in view: at a random bearing within the field of view
    # and a random distance, then pulled inside the room.
    k = NUM_OBJECTS
    bearing = yaw[:, None] + torch.deg2rad(_uniform(gen, -0.45, 0.45, b, k) * FOV_DEG)
    dist = _uniform(gen, 1.3, 5.0, b, k)
    footprint = torch.cat(
        [
            _uniform(gen, 0.2, 0.6, b, MAX_BOXES, 2),  # box half-extents in x and z
            _uniform(gen, 0.2, 0.55, b, MAX_SPHERES, 1).expand(b, MAX_SPHERES, 2),  # radius
            _uniform(gen, 0.15, 0.45, b, MAX_CYLINDERS, 1).expand(b, MAX_CYLINDERS, 2),
        ],
        dim=1,
    )  # [B, K, 2]
    reach = footprint.norm(dim=2)  # horizontal bounding radius
    limit_x, limit_z = ax[:, None] - reach - 0.05, az[:, None] - reach - 0.05
    obj_x = torch.maximum(
        torch.minimum(cam_x[:, None] + dist * torch.sin(bearing), limit_x), -limit_x
    )
    obj_z = torch.maximum(
        torch.minimum(cam_z[:, None] + dist * torch.cos(bearing), limit_z), -limit_z
    )
    count_objects = torch.randint(2, k + 1, (b,), generator=gen)
    slot_order = torch.rand(b, k, generator=gen).argsort(dim=1)
    active = slot_order < count_objects[:, None]  # a random subset of the slots
    clearance = torch.hypot(obj_x - cam_x[:, None], obj_z - cam_z[:, None])
    active &= clearance > reach + 0.3  # never around the camera
    active &= (limit_x > 0) & (limit_z > 0)

    box_half = torch.stack(
        [
            footprint[:, :MAX_BOXES, 0],
            _uniform(gen, 0.2, 0.7, b, MAX_BOXES),
            footprint[:, :MAX_BOXES, 1],
        ],
        2,
    )
    box_center = torch.stack([obj_x[:, :MAX_BOXES], box_half[..., 1], obj_z[:, :MAX_BOXES]], 2)
    box_yaw = _uniform(gen, 0.0, math.pi / 2, b, MAX_BOXES)
    s0, s1 = MAX_BOXES, MAX_BOXES + MAX_SPHERES
    sphere_radius = footprint[:, s0:s1, 0]
    sphere_center = torch.stack([obj_x[:, s0:s1], sphere_radius, obj_z[:, s0:s1]], 2)
    cyl_radius = footprint[:, s1:, 0]
    cyl_half = _uniform(gen, 0.2, 0.8, b, MAX_CYLINDERS)
    cyl_center = torch.stack([obj_x[:, s1:], cyl_half, obj_z[:, s1:]], 2)

    s = NUM_SURFACES
    hsv_a = torch.stack(
        [_uniform(gen, 0, 1, b, s), _uniform(gen, 0.1, 0.8, b, s), _uniform(gen, 0.35, 0.95, b, s)],
        2,
    )
    hsv_b = hsv_a.clone()
    hsv_b[..., 0] = (hsv_a[..., 0] + _uniform(gen, -0.15, 0.15, b, s)) % 1.0
    hsv_b[..., 2] = hsv_a[..., 2] * _uniform(gen, 0.35, 0.9, b, s)
    color_a, color_b = _hsv_to_rgb(hsv_a), _hsv_to_rgb(hsv_b)
    wave_dir = F.normalize(torch.randn(b, s, TEXTURE_WAVES, 3, generator=gen), dim=3)
    wave_freq = _uniform(gen, 0.5, 4.0, b, s, TEXTURE_WAVES)
    wave_phase = _uniform(gen, 0.0, 2 * math.pi, b, s, TEXTURE_WAVES)
    hard = torch.rand(b, s, generator=gen) < 0.4
    shine = _uniform(gen, 0.0, 0.35, b, s)
    shine[:, :ROOM_SURFACES] *= 0.3  # matte walls

    light_pos = torch.stack(
        [
            (2 * torch.rand(b, generator=gen) - 1) * (ax - 0.3),
            height - _uniform(gen, 0.1, 0.8, b),
            (2 * torch.rand(b, generator=gen) - 1) * (az - 0.3),
        ],
        1,
    )
    return SceneBatch(
        room=room,
        cam_pos=cam_pos,
        cam_axes=cam_axes,
        box_center=box_center,
        box_half=box_half,
        box_yaw=box_yaw,
        sphere_center=sphere_center,
        sphere_radius=sphere_radius,
        cyl_center=cyl_center,
        cyl_radius=cyl_radius,
        cyl_half=cyl_half,
        active=active,
        color_a=color_a,
        color_b=color_b,
        wave_dir=wave_dir,
        wave_freq=wave_freq,
        wave_phase=wave_phase,
        hard=hard,
        shine=shine,
        light_pos=light_pos,
        light_power=_uniform(gen, 0.6, 1.1, b),
        ambient=_uniform(gen, 0.15, 0.4, b),
        exposure=_uniform(gen, 0.75, 1.25, b),
        gamma=_uniform(gen, 0.8, 1.25, b),
        noise=_uniform(gen, 0.01, 0.04, b),
    )


# ------------------------------------------------------------------------ ray casting
#
# Every intersection routine takes ray origins ``o [B, P, 3]`` and unit directions
# ``d [B, P, 3]`` and returns the ray parameter ``t [B, P, K]`` of the first hit in front of
# the origin (``inf`` where the ray misses) and the outward unit normal ``n [B, P, K, 3]``.

INF = float("inf")


def _room_exit(o: Tensor, d: Tensor, room: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Where rays from inside the room leave it: ``t [B, P]``, inward normal ``[B, P, 3]`` and
    the class (floor, wall or ceiling) ``[B, P]``."""
    lo = torch.stack([-room[:, 0], torch.zeros_like(room[:, 1]), -room[:, 2]], 1)[:, None]
    hi = torch.stack([room[:, 0], room[:, 1], room[:, 2]], 1)[:, None]
    safe = torch.where(d.abs() < 1e-9, torch.full_like(d, 1e-9), d)
    t_far = torch.where(safe > 0, (hi - o) / safe, (lo - o) / safe)  # [B, P, 3]
    t, axis = t_far.min(dim=2)
    sign = torch.gather(safe, 2, axis[..., None])[..., 0].sign()
    normal = -F.one_hot(axis, 3).to(o.dtype) * sign[..., None]
    label = torch.full_like(axis, WALL)
    label = torch.where((axis == 1) & (sign < 0), torch.full_like(axis, FLOOR), label)
    label = torch.where((axis == 1) & (sign > 0), torch.full_like(axis, CEILING), label)
    return t, normal, label


def _spheres(o: Tensor, d: Tensor, center: Tensor, radius: Tensor) -> tuple[Tensor, Tensor]:
    oc = o[:, :, None, :] - center[:, None]  # [B, P, K, 3]
    b = (oc * d[:, :, None, :]).sum(-1)
    c = (oc * oc).sum(-1) - radius[:, None] ** 2
    disc = b * b - c
    root = torch.sqrt(disc.clamp_min(0))
    t = -b - root
    t = torch.where((disc > 0) & (t > EPS), t, torch.full_like(t, INF))
    point = o[:, :, None, :] + t[..., None].clamp_max(1e6) * d[:, :, None, :]
    normal = (point - center[:, None]) / radius[:, None, :, None]
    return t, normal


def _boxes(
    o: Tensor, d: Tensor, center: Tensor, half: Tensor, yaw: Tensor
) -> tuple[Tensor, Tensor]:
    # In the box's frame (turned by ``yaw`` about y): x' = c x - s z, z' = s x + c z.
    c, s = torch.cos(yaw)[:, None], torch.sin(yaw)[:, None]  # [B, 1, K]
    ox = o[..., 0:1] - center[:, None, :, 0]  # [B, P, K]
    oy = o[..., 1:2] - center[:, None, :, 1]
    oz = o[..., 2:3] - center[:, None, :, 2]
    dx, dy, dz = d[..., 0:1], d[..., 1:2], d[..., 2:3]  # [B, P, 1]
    local_o = (c * ox - s * oz, oy, s * ox + c * oz)
    local_d = (c * dx - s * dz, dy.expand_as(oy), s * dx + c * dz)
    near, far, signs = [], [], []
    for axis in range(3):
        ld = local_d[axis]
        ld = torch.where(ld.abs() < 1e-9, torch.full_like(ld, 1e-9), ld)
        h = half[:, None, :, axis]
        t1, t2 = (-h - local_o[axis]) / ld, (h - local_o[axis]) / ld
        near.append(torch.minimum(t1, t2))
        far.append(torch.maximum(t1, t2))
        signs.append(-ld.sign())  # the face a ray enters through faces against it
    t_near, axis_in = torch.stack(near, -1).max(dim=-1)
    t_far = torch.minimum(torch.minimum(far[0], far[1]), far[2])
    hit = (t_near <= t_far) & (t_near > EPS)
    t = torch.where(hit, t_near, torch.full_like(t_near, INF))
    # Local normal (nx', ny', nz') back to the world: (c nx' + s nz', ny', -s nx' + c nz').
    nx = torch.where(axis_in == 0, signs[0], 0.0)
    ny = torch.where(axis_in == 1, signs[1], 0.0)
    nz = torch.where(axis_in == 2, signs[2], 0.0)
    normal = torch.stack([c * nx + s * nz, ny, -s * nx + c * nz], -1)
    return t, normal


def _cylinders(
    o: Tensor, d: Tensor, center: Tensor, radius: Tensor, half: Tensor
) -> tuple[Tensor, Tensor]:
    oc = o[:, :, None, :] - center[:, None]  # [B, P, K, 3]
    dd = d[:, :, None, :].expand_as(oc)
    r, h = radius[:, None], half[:, None]
    a = dd[..., 0] ** 2 + dd[..., 2] ** 2
    b = oc[..., 0] * dd[..., 0] + oc[..., 2] * dd[..., 2]
    c = oc[..., 0] ** 2 + oc[..., 2] ** 2 - r**2
    disc = b * b - a * c
    a_safe = a.clamp_min(1e-12)
    t_side = (-b - torch.sqrt(disc.clamp_min(0))) / a_safe
    y_side = oc[..., 1] + t_side * dd[..., 1]
    side_ok = (disc > 0) & (t_side > EPS) & (y_side.abs() <= h)
    t_side = torch.where(side_ok, t_side, torch.full_like(t_side, INF))
    dy = torch.where(dd[..., 1].abs() < 1e-9, torch.full_like(dd[..., 1], 1e-9), dd[..., 1])
    t_cap = (h - oc[..., 1]) / dy  # the top cap (the bottom one stands on the floor)
    cx, cz = oc[..., 0] + t_cap * dd[..., 0], oc[..., 2] + t_cap * dd[..., 2]
    cap_ok = (t_cap > EPS) & (cx**2 + cz**2 <= r**2) & (dd[..., 1] < 0)
    t_cap = torch.where(cap_ok, t_cap, torch.full_like(t_cap, INF))
    use_cap = t_cap < t_side
    t = torch.minimum(t_side, t_cap)
    point = oc + t[..., None].clamp_max(1e6) * dd
    side_normal = (
        torch.stack([point[..., 0], torch.zeros_like(t), point[..., 2]], -1) / r[..., None]
    )
    cap_normal = torch.zeros_like(side_normal)
    cap_normal[..., 1] = 1.0
    normal = torch.where(use_cap[..., None], cap_normal, side_normal)
    return t, normal


def _objects(o: Tensor, d: Tensor, scenes: SceneBatch) -> tuple[Tensor, Tensor]:
    """Every object's hit: ``t [B, P, K]`` (``inf`` where inactive), normals ``[B, P, K, 3]``."""
    tb, nb = _boxes(o, d, scenes.box_center, scenes.box_half, scenes.box_yaw)
    ts, ns = _spheres(o, d, scenes.sphere_center, scenes.sphere_radius)
    tc, nc = _cylinders(o, d, scenes.cyl_center, scenes.cyl_radius, scenes.cyl_half)
    t = torch.cat([tb, ts, tc], dim=2)
    t = torch.where(scenes.active[:, None], t, torch.full_like(t, INF))
    return t, torch.cat([nb, ns, nc], dim=2)


OBJECT_CLASS = torch.tensor([BOX] * MAX_BOXES + [SPHERE] * MAX_SPHERES + [CYLINDER] * MAX_CYLINDERS)


def camera_rays(resolution: int) -> Tensor:
    """``[P, 3]`` unnormalised ray directions in camera coordinates (right, up, forward) for
    the pixel centres of a ``resolution``² image, row-major from the top-left."""
    half = math.tan(math.radians(FOV_DEG) / 2)
    coords = (torch.arange(resolution, dtype=torch.float32) + 0.5) / resolution * 2 - 1
    y, x = torch.meshgrid(-coords * half, coords * half, indexing="ij")
    return torch.stack([x, y, torch.ones_like(x)], -1).reshape(-1, 3)


def _texture(scenes: SceneBatch, surface: Tensor, point: Tensor) -> Tensor:
    """Albedo ``[B, P, 3]`` of the surfaces ``surface [B, P]`` at world points ``point``."""

    def pick(values: Tensor) -> Tensor:  # [B, S, ...] -> [B, P, ...]
        index = surface.reshape(*surface.shape, *([1] * (values.dim() - 2)))
        return torch.gather(values, 1, index.expand(-1, -1, *values.shape[2:]))

    waves = (pick(scenes.wave_dir) * point[:, :, None, :]).sum(-1)  # [B, P, W]
    phase = 2 * math.pi * pick(scenes.wave_freq) * waves + pick(scenes.wave_phase)
    pattern = torch.sin(phase).mean(-1)  # in [-1, 1]
    sharp = torch.sign(pattern)
    pattern = torch.where(pick(scenes.hard), sharp, pattern * 1.7).clamp(-1, 1)
    mix = 0.5 + 0.5 * pattern
    return pick(scenes.color_a) * mix[..., None] + pick(scenes.color_b) * (1 - mix[..., None])


def render(scenes: SceneBatch, resolution: int, gen: torch.Generator) -> dict[str, Tensor]:
    """Ray-cast ``scenes`` at ``resolution``² pixels.

    Returns ``image`` uint8 ``[B, 3, H, W]``, ``seg`` uint8 ``[B, H, W]``, ``depth`` float32
    ``[B, 1, H, W]`` and ``normal`` float32 ``[B, 3, H, W]`` (see the module docstring).
    ``gen`` draws the pixel noise.
    """
    b, res = len(scenes), resolution
    rays_cam = camera_rays(res)  # [P, 3]
    d = F.normalize(torch.einsum("pc,bcw->bpw", rays_cam, scenes.cam_axes), dim=2)  # [B, P, 3]
    o = scenes.cam_pos[:, None].expand_as(d)

    t_room, n_room, class_room = _room_exit(o, d, scenes.room)
    t_obj, n_obj = _objects(o, d, scenes)
    t_best, which = t_obj.min(dim=2)
    on_object = t_best < t_room
    t = torch.where(on_object, t_best, t_room)
    n_best = torch.gather(n_obj, 2, which[..., None, None].expand(-1, -1, 1, 3))[:, :, 0]
    normal = torch.where(on_object[..., None], n_best, n_room)
    label = torch.where(on_object, OBJECT_CLASS[which], class_room)
    room_surface = torch.where(class_room == FLOOR, 0, torch.where(class_room == CEILING, 1, 2))
    surface = torch.where(on_object, ROOM_SURFACES + which, room_surface)

    point = o + t[..., None] * d
    forward = scenes.cam_axes[:, 2][:, None]
    depth = t * (d * forward).sum(-1)

    # Shading: ambient + diffuse from a point light with shadows cast by the objects.
    to_light = scenes.light_pos[:, None] - point
    light_dist = to_light.norm(dim=-1)
    light_dir = to_light / light_dist[..., None]
    lit_origin = point + 1e-3 * normal
    t_shadow, _ = _objects(lit_origin, light_dir, scenes)
    shadow = (t_shadow.min(dim=2).values < light_dist).float()
    lambert = (normal * light_dir).sum(-1).clamp_min(0)
    falloff = scenes.light_power[:, None] * 8.0 / (4.0 + light_dist**2)
    direct = lambert * falloff * (1 - 0.85 * shadow)
    halfway = F.normalize(light_dir - d, dim=-1)
    shine = torch.gather(scenes.shine, 1, surface)
    specular = shine * (normal * halfway).sum(-1).clamp_min(0) ** 24 * (1 - shadow)
    albedo = _texture(scenes, surface, point)
    rgb = albedo * (scenes.ambient[:, None, None] + direct[..., None]) + specular[..., None]
    # A camera response: exposure, then an sRGB-like curve with a random gamma.
    rgb = (rgb * scenes.exposure[:, None, None]).clamp(0, 1) ** (scenes.gamma[:, None, None] / 2.2)
    rgb = rgb + scenes.noise[:, None, None] * torch.randn(rgb.shape, generator=gen)

    def image(x: Tensor) -> Tensor:  # [B, P, C] -> [B, C, H, W]
        return x.reshape(b, res, res, -1).permute(0, 3, 1, 2).contiguous()

    cam_normal = torch.einsum("bpw,bcw->bpc", normal, scenes.cam_axes)
    cam_normal = cam_normal * torch.tensor([1.0, 1.0, -1.0])  # z towards the camera
    return {
        "image": (image(rgb.clamp(0, 1)) * 255).round().to(torch.uint8),
        "seg": label.reshape(b, res, res).to(torch.uint8),
        "depth": image(depth[..., None]),
        "normal": image(F.normalize(cam_normal, dim=-1)),
    }


# ------------------------------------------------------------------------ splits and cache


def _split_generator(seed: int, split: str) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 7919 + SPLITS.index(split))


def render_split(seed: int, split: str, size: int, resolution: int) -> ScenesSplit:
    """Sample and render one split (CPU); deterministic in its arguments."""
    gen = _split_generator(seed, split)
    scenes = sample_scenes(size, gen)
    parts: dict[str, list[Tensor]] = {"image": [], "seg": [], "depth": [], "normal": []}
    for start in range(0, size, CHUNK):
        out = render(scenes.slice(start, min(start + CHUNK, size)), resolution, gen)
        for key, value in out.items():
            parts[key].append(value)
    cat = {k: torch.cat(v) for k, v in parts.items()}
    targets = {"seg": cat["seg"], "depth": cat["depth"], "normal": cat["normal"].to(torch.float16)}
    return ScenesSplit(cat["image"], targets)


def cache_dir() -> Path:
    """``$CS_KERNELS_CACHE/scenes``, default ``~/.cache/cs_kernels/scenes``."""
    root = os.environ.get("CS_KERNELS_CACHE") or Path.home() / ".cache" / "cs_kernels"
    return Path(root) / "scenes"


def _check_positive(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def make_scenes(
    seed: int = 0,
    train_size: int = 2048,
    val_size: int = 256,
    test_size: int = 512,
    resolution: int = 64,
    *,
    cache: bool = True,
) -> Scenes:
    """The train/validation/test splits of one seed, rendered at ``resolution``² pixels.

    Deterministic: the same arguments give bitwise identical tensors. With ``cache`` the
    splits are read from (or, the first time, written to) `cache_dir`; a damaged cache file
    is rendered again. A few seconds per thousand scenes at 64² on one CPU core.
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    sizes = {
        "train": _check_positive("train_size", train_size),
        "val": _check_positive("val_size", val_size),
        "test": _check_positive("test_size", test_size),
    }
    _check_positive("resolution", resolution)
    if resolution < 8:
        raise ValueError(f"resolution must be at least 8, got {resolution}")
    splits = {}
    for split, size in sizes.items():
        name = f"v{FORMAT_VERSION}-seed{seed}-{split}-{size}-{resolution}px.pt"
        path = cache_dir() / name
        stored = _load(path) if cache else None
        if stored is None:
            stored = render_split(seed, split, size, resolution)
            if cache:
                _save(stored, path)
        splits[split] = stored
    return Scenes(splits["train"], splits["val"], splits["test"], seed, resolution)


def _save(split: ScenesSplit, path: Path) -> None:
    """Write atomically: parallel workers may race to fill the same cache entry."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        torch.save({"images": split.images, "targets": split.targets}, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _load(path: Path) -> ScenesSplit | None:
    if not path.is_file():
        return None
    try:
        stored: Mapping[str, object] = torch.load(path, weights_only=True)
        images, targets = stored["images"], stored["targets"]
        if not isinstance(images, Tensor) or not isinstance(targets, dict):
            return None
        if set(targets) != set(TASKS):
            return None
        return ScenesSplit(images, targets)
    except Exception:  # a truncated or foreign file: render again
        return None
