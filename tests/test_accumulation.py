"""Gradient accumulation: k micro-batches add into the rows and the task-specific gradients,
then one Phase 2; with BatchNorm in eval mode the step equals the big batch's.

The mean-loss convention: ``loss_fn(task, micro)`` returns the mean over its micro-batch (k
equal micro-batches) and the controller divides it by k, so the accumulated gradient is the
gradient of the big batch's mean loss. Checked in float64 against the reference backend.
"""

from __future__ import annotations

import copy

import pytest
import torch

from cs_kernels.training import ConnectionStrength
from tests.amp_models import TASKS, loss_fn_for, make_batch, make_model, micro_loss_fn
from tests.conftest import FAST_BACKENDS

PHASE2 = (10**6 - 1, 10**6)


def _pair(dtype: torch.dtype, backend: str, **kw):  # type: ignore[no-untyped-def]
    model = make_model(dtype)
    twin = copy.deepcopy(model)
    x, y = make_batch(n=12, dtype=dtype)
    cs = ConnectionStrength(model, TASKS, x, seed=3, backend=backend, **kw)
    big = ConnectionStrength(twin, TASKS, x, seed=3, backend="reference")
    return model, twin, x, y, cs, big


@pytest.mark.parametrize("k", [1, 3, 4])
@pytest.mark.parametrize("epochs", [PHASE2, (0, 2)], ids=["phase2", "phase1"])
def test_accumulated_step_equals_the_big_batch_in_float64(k: int, epochs) -> None:  # type: ignore[no-untyped-def]
    model, twin, x, y, cs, big = _pair(torch.float64, "reference")
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    twin_opt = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9)
    for _ in range(2):
        fn = micro_loss_fn(model, x, y, k) if k > 1 else loss_fn_for(model, x, y)
        losses = cs.step(opt, fn, *epochs, accumulate=k)
        big_losses = big.step(twin_opt, loss_fn_for(twin, x, y), *epochs)
        for task in TASKS:
            torch.testing.assert_close(losses[task], big_losses[task], rtol=1e-12, atol=1e-12)
    assert cs.last_phase == big.last_phase
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
    # The comparison can fail: the step moved the weights well beyond the tolerance.
    start = make_model(torch.float64)
    assert not torch.allclose(start.conv2.weight, model.conv2.weight, atol=1e-4)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_accumulated_phase2_fast_backends_fp32(backend: str) -> None:
    model, twin, x, y, cs, big = _pair(torch.float32, backend)
    cs.step(torch.optim.SGD(model.parameters(), lr=0.0), micro_loss_fn(model, x, y, 3), *PHASE2,
            accumulate=3)  # fmt: skip
    big.phase2_backward(loss_fn_for(twin, x, y))
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6)


def test_collect_accumulate_then_one_combine() -> None:
    """The explicit API: collect(accumulate=True) per micro-batch, then one combine."""
    model, twin, x, y, cs, big = _pair(torch.float64, "reference")
    micro = micro_loss_fn(model, x, y, 3)
    for i in range(3):
        cs.collect(lambda task, i=i: micro(task, i), accumulate=i > 0, loss_factor=1 / 3)
    cs.combine()
    big.phase2_backward(loss_fn_for(twin, x, y))
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12)
    # accumulate=True right after a combine starts from zero again (nothing is pending).
    cs.collect(lambda task: micro(task, 0), accumulate=True)
    rows = cs.buffer.grads.clone()
    cs.combine()
    cs.collect(lambda task: micro(task, 0))
    assert torch.equal(cs.buffer.grads, rows)


def test_accumulation_into_half_rows() -> None:
    """bf16 rows: each micro-batch is added in fp32 and rounded once."""
    model, twin, x, y, cs, big = _pair(torch.float32, "auto", buffer_dtype=torch.bfloat16)
    cs.step(torch.optim.SGD(model.parameters(), lr=0.0), micro_loss_fn(model, x, y, 2), *PHASE2,
            accumulate=2)  # fmt: skip
    big.phase2_backward(loss_fn_for(twin, x, y))
    torch.testing.assert_close(cs.buffer.grads.float(), big.buffer.grads, rtol=2e-2, atol=1e-4)
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=3e-2, atol=1e-3)
