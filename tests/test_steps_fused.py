"""The fused steps (`channel_gram` with the plain sum, `apply_projection` onto it) against the
`reference` steps, on shapes chosen to break kernels; their dispatch, determinism and bad input.

`tests/test_phase2_steps.py` checks that the steps of every backend compose to `phase2`; here
each step is compared on its own, including the paths that only fused backends take (the
plain sum in the Gram pass, a projection that rewrites only the projected rows, rows cut into
pieces).
"""

from __future__ import annotations

import pytest
import torch

import cs_kernels as ck
from cs_kernels.backends import BACKENDS as BACKEND_TABLE
from cs_kernels.backends import resolve_backend
from cs_kernels.backends.base import Backend
from tests.cases import CASES, MIXED, Case, normal_grads, one_layer, random_top
from tests.conftest import DTYPES, FAST_BACKENDS, TRITON_INTERPRETED, assert_close

STEPS = ("channel_gram", "channel_gram_and_sum", "project", "project_onto_sum")
FUSED = [
    b for b in FAST_BACKENDS
    if any(getattr(type(BACKEND_TABLE[b]), m) is not getattr(Backend, m) for m in STEPS)
]  # fmt: skip
# The default (vectorised PyTorch) too: `out=` and `out_holds_sum` must work everywhere.
BACKENDS = ["torch", *(b for b in FUSED if b != "torch")]

# Rows longer than a work item (cut into pieces summed after the parallel region): 70,001 > the
# 65,536 elements an item holds at T = 1, and 3,001 > the 2,720 it holds at T = 24.
LONG_ROWS = ck.Phase2Plan([(5, 1, 70_001), (70_006, 2, 3_001), (76_008, 3, 17)], 76_070)
# Rows longer than the interpreted triton tile (2,048 elements): small enough to interpret.
LONG_SMALL = ck.Phase2Plan([(3, 2, 2_500), (5_003, 3, 7)], 5_030)
# A rank's shard where this rank holds no channel of some layers (they are not in its plan).
EMPTY_SHARD = ck.Phase2Plan([], 7)
STEP_CASES = [
    *CASES,
    Case("long-rows-T1", LONG_ROWS, 1, random_top, normal_grads),
    Case("long-rows-T3", LONG_ROWS, 3, random_top, normal_grads),
    Case("long-rows-T24", LONG_ROWS, 24, random_top, normal_grads),
    Case("long-small-T3", LONG_SMALL, 3, random_top, normal_grads),
    Case("long-small-T24", LONG_SMALL, 24, random_top, normal_grads),
    Case("one-channel-T24", one_layer(1, 33), 24, random_top, normal_grads),
    Case("empty-shard", EMPTY_SHARD, 3, random_top, normal_grads),
]
SETTINGS = [(m, u) for m in ("group", "channel") for u in ("sum", "project")]


def _ids(case: Case) -> str:
    return case.name


# The interpreter runs every program in Python: there, triton takes the cases up to this size
# (T = 24 and one channel included), and the long rows of `LONG_SMALL`.
INTERPRETED_ELEMENTS = 3_000
INTERPRETED_ALWAYS = ("long-small-T3",)


def _skip_if_slow(backend: str, case: Case) -> None:
    interpreted = backend == "triton" and TRITON_INTERPRETED
    large = case.plan.numel * case.tasks > INTERPRETED_ELEMENTS
    if interpreted and large and case.name not in INTERPRETED_ALWAYS:
        pytest.skip("too large for the triton interpreter (runs on a GPU)")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("case", STEP_CASES, ids=_ids)
def test_gram_and_sum_match_the_reference(
    case: Case, dtype: torch.dtype, backend: str, device: torch.device
) -> None:
    _skip_if_slow(backend, case)
    grads, _ = case.build(device, dtype)
    want = ck.channel_gram(grads, case.plan, backend="reference")
    got = ck.channel_gram(grads, case.plan, backend=backend)
    assert got.dtype == want.dtype and got.shape == want.shape
    # Gram entries are sums of D products: the per-dtype tolerances, scaled by the row length.
    scale = max([1] + [layer.row_length for layer in case.plan.layers]) ** 0.5
    assert_close(got / scale, want / scale, dtype, f"{backend} gram")
    out = torch.full((case.plan.numel,), 7.0, dtype=dtype, device=device)
    fused = ck.channel_gram(grads, case.plan, out=out, backend=backend)
    assert torch.equal(fused, got)  # the plain sum does not change the Gram matrices
    assert_close(out, grads.double().sum(0).to(dtype), dtype, f"{backend} plain sum")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("case", STEP_CASES, ids=_ids)
def test_projection_matches_the_reference(
    case: Case, dtype: torch.dtype, backend: str, device: torch.device
) -> None:
    _skip_if_slow(backend, case)
    grads, top = case.build(device, dtype)
    plan = case.plan
    for mode, uniform in SETTINGS:
        gram = ck.channel_gram(grads, plan, backend="reference")
        coef = ck.projection_coefficients(gram, plan, top, mode=mode, uniform=uniform)
        want, want_tasks = ck.apply_projection(
            grads, plan, top, coef, per_task=True, backend="reference"
        )
        what = f"{backend} {mode}/{uniform}"
        got, tasks = ck.apply_projection(grads, plan, top, coef, per_task=True, backend=backend)
        assert_close(got, want, dtype, what)
        assert_close(tasks, want_tasks, dtype, what + " per_task")
        # The fused path: the plain sum from the Gram pass, then only the projected rows.
        out = torch.empty(plan.numel, dtype=dtype, device=device)
        ck.channel_gram(grads, plan, out=out, backend=backend)
        result = ck.apply_projection(
            grads, plan, top, coef, out=out, out_holds_sum=True, backend=backend
        )
        assert result is out
        assert_close(out, want, dtype, what + " onto the sum")


@pytest.mark.parametrize("backend", FUSED)
def test_fused_steps_are_deterministic_across_thread_counts(backend: str, device) -> None:
    plan = LONG_SMALL if TRITON_INTERPRETED and backend == "triton" else LONG_ROWS
    gen = torch.Generator().manual_seed(11)
    grads = torch.randn(3, plan.numel, generator=gen).to(device)
    top = torch.randint(0, 3, (plan.total_channels,), generator=gen).to(device)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            out = torch.empty(plan.numel, device=device)
            gram = ck.channel_gram(grads, plan, out=out, backend=backend)
            coef = ck.projection_coefficients(gram, plan, top, backend=backend)
            plain = ck.apply_projection(grads, plan, top, coef, backend=backend)
            ck.apply_projection(
                grads, plan, top, coef, out=out, out_holds_sum=True, backend=backend
            )
            results.append((gram, plain, out))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            assert torch.equal(a, b)


def test_auto_runs_the_fused_cpu_steps() -> None:
    if "cpu" not in ck.available_backends("cpu"):
        pytest.skip("the compiled extension is not built")
    engine = resolve_backend("auto", torch.device("cpu"))
    assert engine.name == "cpu"
    for method in STEPS:
        assert getattr(type(engine), method) is not getattr(Backend, method), method


def test_projection_onto_the_sum_touches_only_projected_rows() -> None:
    """With every coefficient zero, `out_holds_sum` leaves `out` as it is (fused backends do
    not even read the rows), and without it `out` is the plain sum."""
    if "cpu" not in ck.available_backends("cpu"):
        pytest.skip("the compiled extension is not built")
    plan = MIXED
    grads = torch.randn(3, plan.numel, generator=torch.Generator().manual_seed(2))
    top = torch.zeros(plan.total_channels, dtype=torch.int64)
    coef = torch.zeros(3, plan.total_channels)
    marker = torch.full((plan.numel,), 5.0)
    out = marker.clone()
    ck.apply_projection(grads, plan, top, coef, out=out, out_holds_sum=True, backend="cpu")
    assert torch.equal(out, marker)
    ck.apply_projection(grads, plan, top, coef, out=out, backend="cpu")
    torch.testing.assert_close(out, grads.sum(0))


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_steps_leave_inputs_untouched(backend: str, device) -> None:
    gen = torch.Generator().manual_seed(5)
    grads = torch.randn(4, MIXED.numel, generator=gen).to(device)
    top = torch.randint(0, 4, (MIXED.total_channels,), generator=gen).to(device)
    out = torch.empty(MIXED.numel, device=device)
    saved = grads.clone(), top.clone()
    gram = ck.channel_gram(grads, MIXED, out=out, backend=backend)
    coef = ck.projection_coefficients(gram, MIXED, top, backend=backend)
    gram_saved, coef_saved = gram.clone(), coef.clone()
    ck.apply_projection(grads, MIXED, top, coef, out=out, out_holds_sum=True, backend=backend)
    for before, after in zip(saved, (grads, top), strict=True):
        assert torch.equal(before, after)
    assert torch.equal(gram, gram_saved) and torch.equal(coef, coef_saved)


def test_fused_steps_reject_bad_arguments() -> None:
    plan = MIXED
    grads = torch.randn(3, plan.numel)
    top = torch.zeros(plan.total_channels, dtype=torch.int64)
    coef = ck.projection_coefficients(ck.channel_gram(grads, plan), plan, top)
    with pytest.raises(TypeError, match="out must have the dtype of grads"):
        ck.channel_gram(grads, plan, out=torch.empty(plan.numel, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"out must have shape \[470\]"):
        ck.channel_gram(grads, plan, out=torch.empty(plan.numel + 1))
    with pytest.raises(ValueError, match="out must not share memory with grads"):
        ck.channel_gram(grads, plan, out=grads[1])
    with pytest.raises(TypeError, match="out must be a"):
        ck.channel_gram(grads, plan, out=[0.0] * plan.numel)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="out_holds_sum=True needs out"):
        ck.apply_projection(grads, plan, top, coef, out_holds_sum=True)
    with pytest.raises(TypeError, match="out_holds_sum"):
        ck.apply_projection(grads, plan, top, coef, out=torch.empty(plan.numel), out_holds_sum=1)  # type: ignore[call-overload]


def test_compiled_ops_reject_bad_tables() -> None:
    """The ops check what would index outside the tensors, whatever the caller validated."""
    if "cpu" not in ck.available_backends("cpu"):
        pytest.skip("the compiled extension is not built")
    grads = torch.randn(2, 10)
    layers = torch.tensor([[0, 3, 4, 0]])  # 12 elements > N = 10
    gaps = torch.zeros(0, 2, dtype=torch.int64)
    with pytest.raises(RuntimeError, match="layers row 0 does not fit"):
        torch.ops.cs_kernels.channel_gram(grads, layers, gaps, 3, None)
    layers = torch.tensor([[0, 2, 4, 0]])
    top = torch.tensor([0, 2])  # task 2 of T = 2
    with pytest.raises(RuntimeError, match="top holds a task index outside"):
        torch.ops.cs_kernels.project_(
            grads, layers, gaps, top, torch.zeros(2, 2), False, torch.empty(10), None
        )


@pytest.mark.skipif("cpu" not in FAST_BACKENDS, reason="the cpu backend is not built here")
def test_cpu_gram_of_channels_no_layer_covers_is_zero() -> None:
    """The raw op with more channels than its tables cover (the public API never asks for
    that): the extra channels' Gram matrices are zeros, not uninitialised memory."""
    gen = torch.Generator().manual_seed(31)
    grads = normal_grads(gen, 3, MIXED.numel)
    extra = 2
    # Leave a freed block of the result's size full of NaN for the allocator to hand back.
    dirty = torch.full(((MIXED.total_channels + extra) * 9,), float("nan"))
    del dirty
    gram = torch.ops.cs_kernels.channel_gram(
        grads, MIXED.layer_table("cpu"), MIXED.gap_table("cpu"), MIXED.total_channels + extra, None
    )
    assert torch.equal(gram[-extra:], torch.zeros(extra, 3, 3))
    expected = ck.channel_gram(grads, MIXED, backend="reference").to(gram.dtype)
    assert_close(gram[:-extra], expected, torch.float32, "covered channels")
