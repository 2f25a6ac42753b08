"""Every backend against the reference oracle, on inputs chosen to break kernels."""

from __future__ import annotations

import pytest
import torch

import cs_kernels as ck
from tests.cases import CASES, Case
from tests.conftest import DTYPES, FAST_BACKENDS, assert_close

SETTINGS = [(m, u) for m in ("group", "channel") for u in ("sum", "project")]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_phase2_matches_reference(case: Case, dtype: torch.dtype, device: torch.device) -> None:
    grads, top = case.build(device, dtype)
    for mode, uniform in SETTINGS:
        expected, expected_tasks = ck.phase2(
            grads, case.plan, top=top, mode=mode, uniform=uniform, per_task=True,
            backend="reference",
        )  # fmt: skip
        for backend in FAST_BACKENDS:
            what = f"{backend} {mode}/{uniform}"
            combined, per_task = ck.phase2(
                grads, case.plan, top=top, mode=mode, uniform=uniform, per_task=True,
                backend=backend,
            )  # fmt: skip
            assert_close(combined, expected, dtype, what)
            assert_close(per_task, expected_tasks, dtype, what + " per_task")
            only = ck.phase2(grads, case.plan, top=top, mode=mode, uniform=uniform, backend=backend)
            assert torch.equal(only, combined), f"{what}: per_task changed the combined result"


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("shape", [(3, 1, 1), (2, 5, 3, 3, 3), (4, 17, 9), (24, 6, 5)])
def test_project_layer_matches_reference(backend: str, shape: tuple[int, ...], device) -> None:
    gen = torch.Generator().manual_seed(1)
    grads = torch.randn(shape, generator=gen).to(device)
    top = torch.randint(0, shape[0], (shape[1],), generator=gen).to(device)
    for mode, uniform in SETTINGS:
        expected = ck.project_layer(grads, top, mode=mode, uniform=uniform, backend="reference")
        combined, per_task = ck.project_layer(
            grads, top, mode=mode, uniform=uniform, per_task=True, backend=backend
        )
        assert combined.shape == shape[1:] and per_task.shape == shape
        assert_close(combined, expected, torch.float32, f"{backend} {mode}/{uniform}")
        assert_close(per_task.sum(0), expected, torch.float32, "sum of per_task")


def test_opposite_gradients_cancel_exactly_to_the_top_task(device) -> None:
    """G_1 = -G_0 with task 0 on top: G_1 is projected to 0, so the sum is G_0."""
    g0 = torch.randn(6, 10, dtype=torch.float64)
    grads = torch.stack([g0, -g0]).to(device)
    top = torch.zeros(6, dtype=torch.int64, device=device)
    for backend in [*FAST_BACKENDS, "reference"]:
        out, per_task = ck.project_layer(
            grads, top, uniform="project", per_task=True, backend=backend
        )
        torch.testing.assert_close(out.cpu(), g0, atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(per_task[1].cpu(), torch.zeros_like(g0), atol=1e-12, rtol=0)


@pytest.mark.parametrize("backend", [*FAST_BACKENDS, "reference"])
def test_hand_computed_group_example(backend: str, device) -> None:
    """A 2-task, 2-channel layer worked out by hand.

    Channel 0 is led by task 0, channel 1 by task 1. Group 0: a = <(1,0),(-1,1)> = -1,
    ||G_0||^2 = 1, so G_1[0] becomes (-1,1) + 1*(1,0) = (0,1). Group 1: a = <(0,2),(3,1)> = 2
    >= 0, so G_0[1] stays. Combined: channel 0 (1,0)+(0,1) = (1,1); channel 1 (3,1)+(0,2).
    """
    grads = torch.tensor([[[1.0, 0.0], [3.0, 1.0]], [[-1.0, 1.0], [0.0, 2.0]]], device=device)
    top = torch.tensor([0, 1], device=device)
    out = ck.project_layer(grads, top, backend=backend)
    assert torch.equal(out.cpu(), torch.tensor([[1.0, 1.0], [3.0, 3.0]]))
    # Channel mode gives the same here (each group has one channel).
    assert torch.equal(
        ck.project_layer(grads, top, mode="channel", backend=backend).cpu(), out.cpu()
    )


@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_a_non_finite_group_does_not_disturb_the_others(value: float, device) -> None:
    """Channel 0 (group of task 0) conflicts and must be projected on every backend even
    when channel 1 (group of task 1) holds Inf/NaN (allowed with check_finite=False)."""
    grads = torch.tensor(
        [[[1.0, 0.0], [value, 1.0]], [[-1.0, 1.0], [2.0, value]]], dtype=torch.float64
    ).to(device)
    top = torch.tensor([0, 1], device=device)
    for backend in [*FAST_BACKENDS, "reference"]:
        for mode in ("group", "channel"):
            out = ck.project_layer(grads, top, mode=mode, backend=backend)
            assert out[0].cpu().tolist() == [1.0, 1.0], (backend, mode)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_proportional_strengths_tie_as_in_exact_arithmetic(backend: str, device) -> None:
    """Task k's strengths are exactly m_k times task 0's: after normalisation every channel
    ties, so task 0 leads everywhere, as in the reference. The values have 20 significant
    bits, so m_k x is exact in fp32 but the layer totals are not: an fp32 normalisation tips
    whole layers to whichever task's total happened to round down."""
    layers, channels = 8, 2048
    plan = ck.Phase2Plan([(i * channels, channels, 1) for i in range(layers)], layers * channels)
    gen = torch.Generator().manual_seed(0)
    s0 = torch.round(torch.rand(layers * channels, generator=gen) * 2**20) / 2**20 + 2**-20
    multipliers = torch.tensor([1.0, 3.0, 5.0, 7.0, 13.0])
    strength = (multipliers[:, None] * s0[None, :]).to(device)
    assert torch.equal(strength.double(), multipliers.double()[:, None] * s0.double().to(device))
    expected = ck.plan_top_priority(strength, plan, backend="reference")
    assert bool((expected == 0).all())
    assert torch.equal(ck.plan_top_priority(strength, plan, backend=backend), expected)


def test_out_may_not_alias_top() -> None:
    plan = ck.Phase2Plan([(0, 64, 1)], 64)
    grads = torch.randn(2, 64, dtype=torch.float64)
    top = torch.randint(0, 2, (64,))
    with pytest.raises(ValueError, match="out must not share memory with top"):
        ck.phase2(grads, plan, top=top, out=top.view(torch.float64))
