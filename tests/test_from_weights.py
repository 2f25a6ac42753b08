"""`phase2_from_weights`: strength, priority and Phase 2 from the live shared weights.

Every backend must equal the composition the user could write by hand with the reference
backend: per-layer `channel_strength`, concatenated, then `phase2` with that strength.
"""

from __future__ import annotations

import pytest
import torch

import cs_kernels as ck
from tests.cases import MIXED
from tests.conftest import DEVICE, DTYPES, FAST_BACKENDS, assert_close

BACKENDS = [*FAST_BACKENDS, "reference"]


def make_inputs(
    plan: ck.Phase2Plan, tasks: int, dtype: torch.dtype, seed: int = 0
) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    grads = torch.randn(tasks, plan.numel, generator=gen, dtype=torch.float64)
    weights = [
        torch.randn(layer.channels, layer.row_length, generator=gen, dtype=torch.float64)
        for layer in plan.layers
    ]
    scales = torch.rand(tasks, plan.total_channels, generator=gen, dtype=torch.float64)
    return (
        grads.to(dtype).to(DEVICE),
        [w.to(dtype).to(DEVICE) for w in weights],
        scales.to(DEVICE),
    )


def by_hand(
    grads: torch.Tensor, plan: ck.Phase2Plan, weights: list[torch.Tensor], scales: torch.Tensor
) -> torch.Tensor:
    strength = []
    start = 0
    for layer, weight in zip(plan.layers, weights, strict=True):
        stop = start + layer.channels
        strength.append(
            ck.channel_strength(weight, scales[:, start:stop], backend="reference").double()
        )
        start = stop
    return ck.phase2(grads, plan, torch.cat(strength, 1), backend="reference")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tasks", [1, 3, 9])
def test_matches_the_composition_by_hand(backend: str, dtype: torch.dtype, tasks: int) -> None:
    grads, weights, scales = make_inputs(MIXED, tasks, dtype, seed=tasks)
    if dtype in (torch.bfloat16, torch.float16):
        # Keep priorities away from near-ties that low-precision weights could flip.
        scales = scales + torch.arange(tasks, device=DEVICE, dtype=scales.dtype)[:, None]
    expected = by_hand(grads, MIXED, weights, scales)
    actual = ck.phase2_from_weights(grads, MIXED, weights, scales, backend=backend)
    assert_close(actual, expected, dtype, f"{backend} phase2_from_weights")


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_task_out_and_modes_pass_through(backend: str) -> None:
    grads, weights, scales = make_inputs(MIXED, 4, torch.float64, seed=7)
    for mode in ("group", "channel"):
        for uniform in ("sum", "project"):
            out = torch.empty(MIXED.numel, dtype=torch.float64, device=DEVICE)
            combined, projected = ck.phase2_from_weights(
                grads,
                MIXED,
                weights,
                scales,
                mode=mode,
                uniform=uniform,
                out=out,
                per_task=True,
                backend=backend,
            )
            strength = torch.cat(
                [
                    ck.channel_strength(w, s, backend="reference")
                    for w, s in zip(
                        weights,
                        scales.split([layer.channels for layer in MIXED.layers], 1),
                        strict=True,
                    )
                ],
                1,
            )
            ref, ref_projected = ck.phase2(
                grads,
                MIXED,
                strength,
                mode=mode,
                uniform=uniform,
                per_task=True,
                backend="reference",
            )
            assert combined is out
            assert_close(combined, ref, torch.float64, f"{backend} {mode} {uniform}")
            assert_close(projected, ref_projected, torch.float64, f"{backend} per_task")


def test_conv_shaped_weights_are_accepted() -> None:
    plan = ck.Phase2Plan.from_shapes([(4, 3, 3, 3), (6,)], [True, False])
    gen = torch.Generator().manual_seed(0)
    grads = torch.randn(2, plan.numel, generator=gen).to(DEVICE)
    weight = torch.randn(4, 3, 3, 3, generator=gen).to(DEVICE)
    scales = torch.rand(2, 4, generator=gen).to(DEVICE)
    strength = ck.channel_strength(weight, scales, backend="reference")
    expected = ck.phase2(grads, plan, strength, backend="reference")
    actual = ck.phase2_from_weights(grads, plan, [weight], scales)
    assert_close(actual, expected, torch.float32, "conv weight")


def test_inputs_are_not_modified() -> None:
    grads, weights, scales = make_inputs(MIXED, 3, torch.float32)
    before = [t.clone() for t in (grads, *weights, scales)]
    ck.phase2_from_weights(grads, MIXED, weights, scales)
    for old, new in zip(before, (grads, *weights, scales), strict=True):
        assert torch.equal(old, new)


def _bad_calls():
    grads, weights, scales = make_inputs(MIXED, 3, torch.float32)
    half = [w.half() for w in weights]
    return [
        ("weights", TypeError, lambda: ck.phase2_from_weights(grads, MIXED, weights[0], scales)),
        ("weights", ValueError, lambda: ck.phase2_from_weights(grads, MIXED, weights[:2], scales)),
        (
            r"weights\[1\]",
            ValueError,
            lambda: ck.phase2_from_weights(
                grads, MIXED, [weights[0], weights[1][:-1], *weights[2:]], scales
            ),
        ),
        (
            r"weights\[2\]",
            ValueError,
            lambda: ck.phase2_from_weights(
                grads, MIXED, [*weights[:2], weights[2][:, :-1], *weights[3:]], scales
            ),
        ),
        (
            r"weights\[1\]",
            TypeError,
            lambda: ck.phase2_from_weights(grads, MIXED, [weights[0], *half[1:]], scales),
        ),
        (
            r"weights\[0\]",
            TypeError,
            lambda: ck.phase2_from_weights(grads, MIXED, [weights[0].long(), *weights[1:]], scales),
        ),
        ("scales", ValueError, lambda: ck.phase2_from_weights(grads, MIXED, weights, scales[:2])),
        (
            "scales",
            ValueError,
            lambda: ck.phase2_from_weights(grads, MIXED, weights, scales[:, :-1]),
        ),
        ("scales", ValueError, lambda: ck.phase2_from_weights(grads, MIXED, weights, -scales)),
        (
            "scales",
            ValueError,
            lambda: ck.phase2_from_weights(grads, MIXED, weights, scales * float("nan")),
        ),
        ("scales", TypeError, lambda: ck.phase2_from_weights(grads, MIXED, weights, "s")),
        ("plan", TypeError, lambda: ck.phase2_from_weights(grads, None, weights, scales)),
        (
            "check",
            TypeError,
            lambda: ck.phase2_from_weights(grads, MIXED, weights, scales, check=1),
        ),
        (
            "mode",
            ValueError,
            lambda: ck.phase2_from_weights(grads, MIXED, weights, scales, mode="task"),
        ),
        (
            "grads",
            ValueError,
            lambda: ck.phase2_from_weights(grads[:, :-1], MIXED, weights, scales),
        ),
    ]


@pytest.mark.parametrize("index", range(len(_bad_calls())))
def test_bad_input_names_the_argument(index: int) -> None:
    name, exc, call = _bad_calls()[index]
    with pytest.raises(exc, match=name):
        call()


def test_out_may_not_alias_scales() -> None:
    grads, weights, _ = make_inputs(MIXED, 1, torch.float32)
    out = torch.zeros(MIXED.numel, device=DEVICE)
    scales = out[: MIXED.total_channels].view(1, -1)
    with pytest.raises(ValueError, match="scales"):
        ck.phase2_from_weights(grads, MIXED, weights, scales, out=out)


def test_unchecked_scales_skip_the_value_check() -> None:
    grads, weights, scales = make_inputs(MIXED, 2, torch.float32)
    # check=False: the caller vouches for the values; negative scales are not inspected.
    ck.phase2_from_weights(grads, MIXED, weights, -scales, check=False, backend="reference")


@pytest.mark.parametrize("backend", BACKENDS)
def test_top_out_receives_the_priorities_used(backend: str) -> None:
    grads, weights, scales = make_inputs(MIXED, 5, torch.float32, seed=3)
    top = torch.full((MIXED.total_channels,), -1, dtype=torch.int64, device=DEVICE)
    ck.phase2_from_weights(grads, MIXED, weights, scales, top_out=top, backend=backend)
    strength = torch.cat(
        [
            ck.channel_strength(w, s, backend="reference")
            for w, s in zip(
                weights, scales.split([layer.channels for layer in MIXED.layers], 1), strict=True
            )
        ],
        1,
    )
    assert torch.equal(top, ck.plan_top_priority(strength, MIXED, backend="reference"))


@pytest.mark.parametrize(
    ("make_top", "exc"),
    [
        (lambda n, g: torch.zeros(n, dtype=torch.int32, device=DEVICE), TypeError),
        (lambda n, g: torch.zeros(n + 1, dtype=torch.int64, device=DEVICE), ValueError),
        (lambda n, g: "top", TypeError),
        (lambda n, g: g.view(torch.int64)[0, :n] if g.dtype == torch.float64 else None, ValueError),
    ],
)
def test_bad_top_out_is_rejected(make_top, exc) -> None:
    grads, weights, scales = make_inputs(MIXED, 2, torch.float64)
    before = grads.clone()
    top_out = make_top(MIXED.total_channels, grads)
    with pytest.raises(exc, match="top_out"):
        ck.phase2_from_weights(grads, MIXED, weights, scales, top_out=top_out)
    assert torch.equal(grads, before)
