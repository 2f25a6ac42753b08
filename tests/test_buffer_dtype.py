"""Half-size rows: bf16/fp16 ``grads [T, N]`` into an fp32 ``out [N]``, on every backend.

The reference reads the same rounded rows in float64, so the only differences left are the
fast backends' fp32 accumulation: the fp32 tolerances of `tests.conftest.TOLERANCES` apply
(atol 2e-5, rtol 2e-5 for unit-scale gradients), not the bf16/fp16 ones.
"""

from __future__ import annotations

import pytest
import torch

import cs_kernels as ck
from tests.cases import CASES, Case, one_layer
from tests.conftest import FAST_BACKENDS, assert_close

HALF = [torch.bfloat16, torch.float16]
SETTINGS = [(m, u) for m in ("group", "channel") for u in ("sum", "project")]


def _expected(grads: torch.Tensor, case: Case, top: torch.Tensor, mode: str, uniform: str):
    """The reference on the same rounded rows, in float64, rounded to fp32 once."""
    out = ck.phase2(grads.double(), case.plan, top=top, mode=mode, uniform=uniform,
                    backend="reference")  # fmt: skip
    return out.float()


@pytest.mark.parametrize("dtype", HALF, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_half_rows_into_fp32_out_match_reference(case: Case, dtype: torch.dtype, device) -> None:
    grads, top = case.build(device, dtype)
    before = grads.clone()
    for mode, uniform in SETTINGS:
        expected = _expected(grads, case, top, mode, uniform)
        for backend in ["reference", *FAST_BACKENDS]:
            out = torch.full((case.plan.numel,), float("nan"), device=device)
            result = ck.phase2(grads, case.plan, top=top, mode=mode, uniform=uniform, out=out,
                               backend=backend)  # fmt: skip
            assert result is out and result.dtype == torch.float32
            assert_close(out, expected, torch.float32, f"{backend} {mode}/{uniform} {dtype}")
    assert torch.equal(grads, before), "grads was modified"


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("dtype", HALF, ids=lambda d: str(d).removeprefix("torch."))
def test_fp32_out_is_more_accurate_than_a_rounded_out(backend: str, dtype, device) -> None:
    """An fp32 out keeps what a bf16/fp16 out rounds away (a test that can fail: a backend
    that rounded through the row dtype would be off by the row dtype's epsilon)."""
    case = Case("C5-D64", one_layer(5, 64), 4, CASES[0].top, CASES[0].grads)
    grads, top = case.build(device, dtype, seed=3)
    exact = _expected(grads, case, top, "group", "project")
    wide = torch.empty(case.plan.numel, device=device)
    ck.phase2(grads, case.plan, top=top, mode="group", uniform="project", out=wide,
              backend=backend)  # fmt: skip
    narrow = ck.phase2(grads, case.plan, top=top, mode="group", uniform="project",
                       backend=backend)  # fmt: skip
    err_wide = float((wide.double() - exact.double()).abs().max())
    err_narrow = float((narrow.double() - exact.double()).abs().max())
    assert err_wide < 1e-4 < err_narrow, (err_wide, err_narrow)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_half_rows_with_weights_and_per_task(backend: str, device) -> None:
    """`phase2_from_weights` into fp32 out; per-task results keep the rows' dtype."""
    plan = ck.Phase2Plan([(0, 3, 8), (30, 4, 5)], 60)
    gen = torch.Generator().manual_seed(4)
    grads = torch.randn(3, 60, generator=gen).to(torch.bfloat16).to(device)
    weights = [
        torch.randn(3, 8, generator=gen).to(device),
        torch.randn(4, 5, generator=gen).to(device),
    ]
    scales = torch.rand(3, 7, generator=gen).to(device)
    wide = [w.double() for w in weights]
    ref, ref_tasks = ck.phase2_from_weights(
        grads.double(), plan, wide, scales.double(), per_task=True, backend="reference"
    )
    out = torch.empty(60, device=device)
    result, per_task = ck.phase2_from_weights(grads, plan, weights, scales, out=out,
                                              per_task=True, backend=backend)  # fmt: skip
    assert result is out and per_task.dtype == torch.bfloat16
    assert_close(out, ref.float(), torch.float32, backend)
    assert_close(per_task, ref_tasks.to(torch.bfloat16), torch.bfloat16, backend + " per_task")


def test_out_dtype_is_checked(device) -> None:
    plan = one_layer(2, 3)
    top = torch.zeros(2, dtype=torch.int64, device=device)
    half = torch.zeros(2, 6, dtype=torch.bfloat16, device=device)
    with pytest.raises(TypeError, match=r"out must be torch\.bfloat16 or torch\.float32"):
        ck.phase2(half, plan, top=top, out=torch.zeros(6, dtype=torch.float64, device=device))
    with pytest.raises(TypeError, match=r"out must be torch\.float32 for torch\.float32 grads"):
        ck.phase2(half.float(), plan, top=top,
                  out=torch.zeros(6, dtype=torch.bfloat16, device=device))  # fmt: skip
