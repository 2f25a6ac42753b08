"""Hypothesis property tests: what must hold for every input, on every backend.

Hypothesis draws the sizes, task counts and seeds; the tensors come from a seeded torch
generator (continuous values, so strengths have no accidental ties).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import cs_kernels as ck
from tests.conftest import DEVICE, FAST_BACKENDS

ALL_BACKENDS = [*FAST_BACKENDS, "reference"]
PROPERTY_SETTINGS = settings(max_examples=25, deadline=None)


@st.composite
def plans(draw: st.DrawFn, max_layers: int = 3, min_channels: int = 1) -> ck.Phase2Plan:
    """Random plans: 0..max_layers layers with gaps of 0..5 elements around them."""
    layers, offset = [], draw(st.integers(0, 5))
    for _ in range(draw(st.integers(0, max_layers))):
        channels = draw(st.integers(min_channels, 9))
        row_length = draw(st.integers(1, 40))
        layers.append((offset, channels, row_length))
        offset += channels * row_length + draw(st.integers(0, 5))
    if draw(st.booleans()):
        layers.reverse()  # plan order need not be offset order
    return ck.Phase2Plan(layers, offset)


def _data(plan: ck.Phase2Plan, tasks: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    grads = torch.randn(tasks, plan.numel, generator=gen, dtype=torch.float64).to(DEVICE)
    strength = torch.rand(tasks, plan.total_channels, generator=gen, dtype=torch.float64)
    return grads, strength.to(DEVICE)


def _modes():
    return st.tuples(st.sampled_from(["group", "channel"]), st.sampled_from(["sum", "project"]))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@PROPERTY_SETTINGS
@given(plan=plans(), tasks=st.integers(1, 6), seed=st.integers(0, 2**31), setting=_modes())
def test_no_conflict_gives_plain_sum(backend, plan, tasks, seed, setting) -> None:
    grads, strength = _data(plan, tasks, seed)
    grads = grads.abs()  # every dot product >= 0: nothing to project
    mode, uniform = setting
    out = ck.phase2(grads, plan, strength, mode=mode, uniform=uniform, backend=backend)
    torch.testing.assert_close(out, grads.sum(0), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@PROPERTY_SETTINGS
@given(plan=plans(), tasks=st.integers(1, 6), seed=st.integers(0, 2**31), setting=_modes())
def test_top_task_rows_are_never_changed(backend, plan, tasks, seed, setting) -> None:
    grads, strength = _data(plan, tasks, seed)
    mode, uniform = setting
    top = ck.plan_top_priority(strength, plan, backend=backend)
    _, projected = ck.phase2(
        grads, plan, top=top, mode=mode, uniform=uniform, per_task=True, backend=backend
    )
    for layer, first in zip(plan.layers, plan.first_channels, strict=True):
        for c in range(layer.channels):
            i = int(top[first + c])
            row = slice(
                layer.offset + c * layer.row_length, layer.offset + (c + 1) * layer.row_length
            )
            assert torch.equal(projected[i, row], grads[i, row])
    for offset, length in plan.gaps:  # plainly summed parts are copied unchanged
        assert torch.equal(
            projected[:, offset : offset + length], grads[:, offset : offset + length]
        )


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@PROPERTY_SETTINGS
@given(
    plan=plans(min_channels=2),
    tasks=st.integers(1, 6),
    seed=st.integers(0, 2**31),
    setting=_modes(),
    perm_seed=st.integers(0, 1000),
)
def test_permuting_tasks_gives_the_same_combined_gradient(
    backend, plan, tasks, seed, setting, perm_seed
) -> None:
    """Holds whenever the normalised strengths have no ties. A one-channel layer always ties
    (every task's normalised strength is 1, so task 0 leads), hence at least 2 channels."""
    grads, strength = _data(plan, tasks, seed)
    mode, uniform = setting
    perm = torch.randperm(tasks, generator=torch.Generator().manual_seed(perm_seed)).to(DEVICE)
    out = ck.phase2(grads, plan, strength, mode=mode, uniform=uniform, backend=backend)
    permuted, per_task_p = ck.phase2(
        grads[perm], plan, strength[perm], mode=mode, uniform=uniform, per_task=True,
        backend=backend,
    )  # fmt: skip
    torch.testing.assert_close(permuted, out, atol=1e-10, rtol=1e-10)
    _, per_task = ck.phase2(
        grads, plan, strength, mode=mode, uniform=uniform, per_task=True, backend=backend
    )
    torch.testing.assert_close(per_task_p, per_task[perm], atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@PROPERTY_SETTINGS
@given(
    tasks=st.integers(1, 8),
    row_length=st.integers(1, 40),
    seed=st.integers(0, 2**31),
    uniform=st.sampled_from(["sum", "project"]),
)
def test_group_mode_with_single_channel_groups_equals_channel_mode(
    backend, tasks, row_length, seed, uniform
) -> None:
    gen = torch.Generator().manual_seed(seed)
    channels = int(torch.randint(1, tasks + 1, (1,), generator=gen))
    top = torch.randperm(tasks, generator=gen)[:channels].to(DEVICE)  # distinct: 1 channel/group
    grads = torch.randn(tasks, channels, row_length, generator=gen, dtype=torch.float64)
    grads = grads.to(DEVICE)
    group = ck.project_layer(grads, top, mode="group", uniform=uniform, backend=backend)
    channel = ck.project_layer(grads, top, mode="channel", uniform=uniform, backend=backend)
    torch.testing.assert_close(group, channel, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@PROPERTY_SETTINGS
@given(
    tasks=st.integers(1, 6),
    channels=st.integers(1, 9),
    row_length=st.integers(1, 30),
    seed=st.integers(0, 2**31),
    mode=st.sampled_from(["group", "channel"]),
)
def test_uniform_sum_on_a_single_group_layer_is_the_plain_sum(
    backend, tasks, channels, row_length, seed, mode
) -> None:
    gen = torch.Generator().manual_seed(seed)
    grads = torch.randn(tasks, channels, row_length, generator=gen, dtype=torch.float64)
    grads = grads.to(DEVICE)
    top = torch.full((channels,), seed % tasks, device=DEVICE)
    out = ck.project_layer(grads, top, mode=mode, uniform="sum", backend=backend)
    torch.testing.assert_close(out, grads.sum(0), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@PROPERTY_SETTINGS
@given(
    plan=plans(),
    tasks=st.integers(1, 5),
    seed=st.integers(0, 2**31),
    setting=_modes(),
    scale=st.sampled_from([1e-6, 0.5, 3.0, 1e6]),
)
def test_positive_scaling_commutes(backend, plan, tasks, seed, setting, scale) -> None:
    """The projection is homogeneous: phase2(s * G) = s * phase2(G) for s > 0."""
    grads, strength = _data(plan, tasks, seed)
    mode, uniform = setting
    out = ck.phase2(grads, plan, strength, mode=mode, uniform=uniform, backend=backend)
    scaled = ck.phase2(grads * scale, plan, strength, mode=mode, uniform=uniform, backend=backend)
    torch.testing.assert_close(scaled, out * scale, atol=1e-10 * scale, rtol=1e-10)


@PROPERTY_SETTINGS
@given(plan=plans(), tasks=st.integers(1, 6), seed=st.integers(0, 2**31))
def test_projection_removes_conflict_in_channel_mode(plan, tasks, seed) -> None:
    """After channel-mode projection no task conflicts with its row's top task."""
    grads, strength = _data(plan, tasks, seed)
    top = ck.plan_top_priority(strength, plan)
    for backend in ALL_BACKENDS:
        _, projected = ck.phase2(
            grads, plan, top=top, mode="channel", uniform="project", per_task=True,
            backend=backend,
        )  # fmt: skip
        for layer, first in zip(plan.layers, plan.first_channels, strict=True):
            rows = projected[:, layer.offset : layer.offset + layer.numel]
            rows = rows.reshape(tasks, layer.channels, layer.row_length)
            nu = top[first : first + layer.channels]
            ref = rows[nu, torch.arange(layer.channels, device=DEVICE)]  # [C, D]
            dots = (rows * ref[None]).sum(-1)  # [T, C]
            scale = (rows.square().sum(-1) * ref.square().sum(-1)).sqrt()
            assert bool((dots >= -1e-9 * (1 + scale)).all()), backend
