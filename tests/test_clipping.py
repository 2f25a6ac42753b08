"""Clipping: ``max_grad_norm`` clips the combined gradient (Phase 2) and each task's gradient
(Phase 1), over every parameter, after unscaling under a GradScaler."""

from __future__ import annotations

import copy

import pytest
import torch

from cs_kernels.training import ConnectionStrength
from tests.amp_models import TASKS, loss_fn_for, make_batch, make_model

PHASE2 = (10**6 - 1, 10**6)
MAX_NORM = 0.05  # well below the gradients' norm: clipping acts


def _norm(model: torch.nn.Module) -> float:
    return float(
        torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None]).norm()
    )


def test_phase2_clips_the_combined_gradient() -> None:
    model = make_model()
    twin = copy.deepcopy(model)
    x, y = make_batch()
    cs = ConnectionStrength(model, TASKS, x, seed=3)
    ref = ConnectionStrength(twin, TASKS, x, seed=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    twin_opt = torch.optim.SGD(twin.parameters(), lr=0.5)
    cs.step(opt, loss_fn_for(model, x, y), *PHASE2, max_grad_norm=MAX_NORM)
    assert cs.last_phase == 2
    ref.phase2_backward(loss_fn_for(twin, x, y))
    assert _norm(twin) > 4 * MAX_NORM
    torch.nn.utils.clip_grad_norm_(twin.parameters(), MAX_NORM)
    twin_opt.step()
    assert _norm(model) == pytest.approx(MAX_NORM, rel=1e-4)
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0)
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_phase1_clips_each_tasks_gradient() -> None:
    model = make_model()
    twin = copy.deepcopy(model)
    x, y = make_batch()
    cs = ConnectionStrength(model, TASKS, x)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    twin_opt = torch.optim.SGD(twin.parameters(), lr=0.5)
    cs.phase1_step(opt, loss_fn_for(model, x, y), max_grad_norm=MAX_NORM)
    twin_loss = loss_fn_for(twin, x, y)
    norms = []
    for task in TASKS:
        twin_opt.zero_grad()
        twin_loss(task).backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(twin.parameters(), MAX_NORM)))
        twin_opt.step()
    assert min(norms) > 2 * MAX_NORM
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


@pytest.mark.parametrize("epochs", [PHASE2, (0, 3)], ids=["phase2", "phase1"])
def test_clipping_under_a_scaler_clips_the_unscaled_gradient(epochs) -> None:  # type: ignore[no-untyped-def]
    model = make_model()
    twin = copy.deepcopy(model)
    x, y = make_batch()
    cs = ConnectionStrength(model, TASKS, x, seed=3)
    ref = ConnectionStrength(twin, TASKS, x, seed=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    twin_opt = torch.optim.SGD(twin.parameters(), lr=0.5)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    cs.step(opt, loss_fn_for(model, x, y), *epochs, scaler=scaler, max_grad_norm=MAX_NORM)
    ref.step(twin_opt, loss_fn_for(twin, x, y), *epochs, max_grad_norm=MAX_NORM)
    assert cs.last_skipped == ()
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-8)
    assert _norm(model) == pytest.approx(MAX_NORM, rel=1e-4)  # unscaled .grad, clipped
