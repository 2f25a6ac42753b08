"""Mixed precision in `ConnectionStrength`: half-size rows (``buffer_dtype``), fp16 with a
``torch.amp.GradScaler``, bf16 autocast, and bad input.

Tolerances: half-size rows against the float64 reference on the same rounded rows use the
fp32 ones (rtol 2e-5, atol 2e-6: only the fp32 accumulation differs); a power-of-two loss
scale is exact, so scaled and unscaled runs agree bit for bit where stated.
"""

from __future__ import annotations

import copy

import pytest
import torch

import cs_kernels as ck
from cs_kernels.training import ConnectionStrength
from tests.amp_models import TASKS, loss_fn_for, make_batch, make_model, same, snapshot
from tests.conftest import FAST_BACKENDS

PHASE2 = (10**6 - 1, 10**6)  # (epoch, num_epochs): the draw gives Phase 2 (checked by each test)
BACKENDS = ["reference", *FAST_BACKENDS]


def _controller(model, x, **kw):  # type: ignore[no-untyped-def]
    return ConnectionStrength(model, TASKS, x, seed=3, **kw)


# ------------------------------------------------------------------------ half-size rows


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_rows_equal_reference_on_the_rounded_rows(backend: str, dtype) -> None:
    model = make_model()
    twin = copy.deepcopy(model)
    x, y = make_batch()
    cs = _controller(model, x, buffer_dtype=dtype, backend=backend)
    full = _controller(twin, x, backend="reference")
    assert cs.buffer.grads.dtype == dtype and cs.buffer.out.dtype == torch.float32

    cs.phase2_backward(loss_fn_for(model, x, y))
    full.collect(loss_fn_for(twin, x, y))
    rounded = full.buffer.grads.to(dtype)
    # The rows hold each task's fp32 gradient rounded once.
    assert torch.equal(cs.buffer.grads, rounded)
    expected = ck.phase2(rounded.double(), cs.plan, top=cs.top_priority(), backend="reference")
    got = torch.cat([p.grad.reshape(-1) for p in cs.shared_parameters])  # type: ignore[union-attr]
    assert all(p.grad.dtype == torch.float32 for p in cs.shared_parameters)  # type: ignore[union-attr]
    torch.testing.assert_close(got, expected.float(), rtol=2e-5, atol=2e-6)
    # The projection acted (the comparison can fail), and the rows were rounded.
    assert not torch.allclose(got.double(), rounded.double().sum(0), rtol=1e-3, atol=1e-4)
    assert not torch.equal(rounded.float(), full.buffer.grads)
    # Task-specific gradients are the usual fp32 ones.
    full.combine()
    for (n, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        if n.startswith("heads."):
            torch.testing.assert_close(p.grad, q.grad)


def test_half_rows_halve_the_rows_memory() -> None:
    model = make_model()
    x, _ = make_batch()
    full = _controller(model, x)
    half = _controller(model, x, buffer_dtype=torch.bfloat16)
    rows = full.buffer.grads
    assert half.buffer.grads.shape == rows.shape
    assert half.buffer.storage.nbytes * 2 == full.buffer.storage.nbytes
    assert half.buffer.out.nbytes == full.buffer.out.nbytes  # the fp32 [N] result


def test_half_rows_train() -> None:
    """A few steps with bf16 rows stay close to fp32 rows (loose: rounded gradients)."""
    results = []
    for dtype in (None, torch.bfloat16):
        model = make_model()
        x, y = make_batch()
        cs = _controller(model, x, buffer_dtype=dtype)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(3):
            cs.step(opt, loss_fn_for(model, x, y), *PHASE2)
        assert cs.phase2_steps == 3
        results.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    torch.testing.assert_close(results[1], results[0], rtol=2e-2, atol=2e-3)
    assert not torch.equal(results[1], results[0])


# ----------------------------------------------------------------------- fp16 GradScaler


@pytest.mark.parametrize("scale", [2.0**10, 3.0e3])
def test_phase2_on_scaled_rows_is_the_scaled_result(scale: float) -> None:
    """Scaling every task's loss by s scales every row by s; the projection coefficients
    a_j / ||G_i||^2 do not change, so Phase 2 gives s times the unscaled result (exactly for
    a power of two)."""
    model = make_model()
    twin = copy.deepcopy(model)
    x, y = make_batch()
    cs, ref = _controller(model, x), _controller(twin, x)
    scaler = torch.amp.GradScaler("cpu", init_scale=scale)
    cs.phase2_backward(loss_fn_for(model, x, y), scaler=scaler)
    ref.phase2_backward(loss_fn_for(twin, x, y))
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        if scale == 2.0**10:
            assert torch.equal(p.grad, q.grad * scale)  # type: ignore[operator]
        else:
            torch.testing.assert_close(p.grad, q.grad * scale, rtol=1e-5, atol=1e-7 * scale)  # type: ignore[operator]
    # The rows themselves are the scaled ones.
    if scale == 2.0**10:
        assert torch.equal(cs.buffer.grads, ref.buffer.grads * scale)
    else:  # the backward rounds differently
        torch.testing.assert_close(cs.buffer.grads, ref.buffer.grads * scale, atol=1e-6 * scale,
                                   rtol=1e-5)  # fmt: skip


@pytest.mark.parametrize("epochs", [PHASE2, (0, 3)], ids=["phase2", "phase1"])
def test_scaler_step_equals_the_unscaled_step(epochs: tuple[int, int]) -> None:
    model = make_model()
    twin = copy.deepcopy(model)
    x, y = make_batch()
    cs, ref = _controller(model, x), _controller(twin, x)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    twin_opt = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=1)
    for _ in range(2):
        cs.step(opt, loss_fn_for(model, x, y), *epochs, scaler=scaler)
        ref.step(twin_opt, loss_fn_for(twin, x, y), *epochs)
        assert cs.last_skipped == ()
    assert cs.last_phase == ref.last_phase == (2 if epochs == PHASE2 else 1)
    # Phase 1: update() after each task's step (growth_interval=1 doubles it every time).
    steps = 2 if epochs == PHASE2 else 2 * len(TASKS)
    assert scaler.get_scale() == 2.0**12 * 2**steps
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q)
    assert (cs.phase1_steps, cs.phase2_steps) == (ref.phase1_steps, ref.phase2_steps)


def test_an_inf_loss_skips_the_phase2_step_and_changes_nothing() -> None:
    model = make_model()
    x, y = make_batch()
    cs = _controller(model, x)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    cs.step(opt, loss_fn_for(model, x, y), *PHASE2, scaler=scaler)  # momentum state exists
    assert cs.last_phase == 2
    before = snapshot(model, opt)
    state = copy.deepcopy(cs.state_dict())
    clean = loss_fn_for(model, x, y)

    def poisoned(task: str) -> torch.Tensor:
        loss = clean(task)
        return loss * float("inf") if task == "depth" else loss

    cs.step(opt, poisoned, *PHASE2, scaler=scaler)
    assert cs.last_skipped == tuple(TASKS)
    assert scaler.get_scale() == 2.0**7  # backed off
    assert same(snapshot(model, opt), before)
    after = cs.state_dict()
    assert torch.equal(after["generator"], state["generator"])
    assert (after["phase1_steps"], after["phase2_steps"]) == (0, 1)
    assert repr(after["telemetry"]) == repr(state["telemetry"])  # counts and steps per epoch
    # The next batch redraws the same phase and steps.
    cs.step(opt, clean, *PHASE2, scaler=scaler)
    assert cs.last_skipped == () and cs.phase2_steps == 2
    assert not same(snapshot(model, opt), before)


def test_an_inf_loss_skips_only_that_tasks_phase1_step() -> None:
    model = make_model()
    twin = copy.deepcopy(model)
    x, y = make_batch()
    cs = _controller(model, x)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    twin_opt = torch.optim.SGD(twin.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    clean = loss_fn_for(model, x, y)

    def poisoned(task: str) -> torch.Tensor:
        loss = clean(task)
        return loss * float("nan") if task == "depth" else loss

    cs.phase1_step(opt, poisoned, scaler=scaler)
    assert cs.last_skipped == ("depth",) and cs.phase1_steps == 1
    assert scaler.get_scale() == 2.0**7  # backed off once, after depth's step
    twin_loss = loss_fn_for(twin, x, y)
    for task in ("seg", "normal"):  # by hand: the other two tasks' steps
        twin_opt.zero_grad()
        twin_loss(task).backward()
        twin_opt.step()
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    # Every task skipped: the batch never happened (the generator is restored by `step`).
    gen = cs.state_dict()["generator"]
    cs.step(opt, lambda t: clean(t) * float("inf"), 0, 3, scaler=scaler)
    assert cs.last_skipped == tuple(TASKS) and cs.phase1_steps == 1
    assert torch.equal(cs.state_dict()["generator"], gen)


# ---------------------------------------------------------------------------- autocast


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_autocast_training_is_close_to_fp32(amp: str) -> None:
    """The same model trained under CPU autocast (bf16 alone; fp16 with a GradScaler) stays
    close to fp32 training; parameters, rows and ``.grad`` stay fp32."""
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    results = []
    for use_amp in (False, True):
        model = make_model()
        x, y = make_batch()
        cs = _controller(model, x)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        scaler = torch.amp.GradScaler("cpu") if use_amp and amp == "fp16" else None
        base = loss_fn_for(model, x, y)

        def loss_fn(task: str, base=base, use_amp=use_amp) -> torch.Tensor:  # type: ignore[no-untyped-def]
            with torch.autocast("cpu", dtype=dtype, enabled=use_amp):
                out = base(task)
            return out.float()

        for epoch in range(3):
            cs.step(opt, loss_fn, epoch, 3, scaler=scaler)
        assert cs.buffer.grads.dtype == torch.float32
        assert all(p.dtype == torch.float32 for p in model.parameters())
        results.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    tol = 3e-2 if amp == "bf16" else 5e-3
    torch.testing.assert_close(results[1], results[0], rtol=tol, atol=tol)
    assert not torch.equal(results[1], results[0])  # autocast did run in reduced precision


# --------------------------------------------------------------------------- bad input


def test_bad_input_names_the_argument_and_changes_nothing() -> None:
    model = make_model()
    x, y = make_batch()
    cs = _controller(model, x)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss_fn = loss_fn_for(model, x, y)
    before = snapshot(model, opt)
    gen = cs.state_dict()["generator"]
    grads_before = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    cases = [
        (TypeError, "scaler must be a torch.amp.GradScaler", dict(scaler=object())),
        (TypeError, "max_grad_norm must be a positive number", dict(max_grad_norm="1")),
        (ValueError, "max_grad_norm must be > 0", dict(max_grad_norm=0.0)),
        (ValueError, "max_grad_norm must be > 0", dict(max_grad_norm=-1)),
        (ValueError, "max_grad_norm must be > 0", dict(max_grad_norm=float("nan"))),
        (ValueError, "accumulate must be >= 1", dict(accumulate=0)),
        (TypeError, "accumulate must be an int", dict(accumulate=1.5)),
    ]
    for error, message, kw in cases:
        with pytest.raises(error, match=message):
            cs.step(opt, loss_fn, 1, 2, **kw)  # type: ignore[arg-type]
        if "accumulate" not in kw:
            with pytest.raises(error, match=message):
                cs.phase1_step(opt, loss_fn, **kw)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="scaler must be"):
        cs.phase2_backward(loss_fn, scaler=1.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="scaler must be"):
        cs.collect(loss_fn, scaler="fp16")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="accumulate must be a bool"):
        cs.collect(loss_fn, accumulate=2)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="combine\\(\\) has nothing to combine"):
        cs.combine()
    assert same(snapshot(model, opt), before)
    assert torch.equal(cs.state_dict()["generator"], gen)
    assert cs.phase1_steps == cs.phase2_steps == 0
    for p, g in zip(model.parameters(), grads_before, strict=True):
        assert (p.grad is None) == (g is None)
    # A second combine after one collect has nothing to combine either.
    cs.collect(loss_fn)
    cs.combine()
    with pytest.raises(ValueError, match="nothing to combine"):
        cs.combine()


@pytest.mark.parametrize(
    ("buffer_dtype", "error", "message"),
    [
        (torch.int32, TypeError, "buffer_dtype must be a floating-point torch.dtype"),
        ("bfloat16", TypeError, "buffer_dtype must be a floating-point torch.dtype"),
        (torch.float64, ValueError, "buffer_dtype=torch.float64 does not fit"),
    ],
)
def test_bad_buffer_dtype(buffer_dtype: object, error: type, message: str) -> None:
    model = make_model()
    x, _ = make_batch()
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(error, match=message):
        _controller(model, x, buffer_dtype=buffer_dtype)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_half_rows_need_an_fp32_model() -> None:
    model = make_model(torch.float64)
    x, _ = make_batch(dtype=torch.float64)
    with pytest.raises(ValueError, match=r"does not fit torch\.float64 parameters"):
        _controller(model, x, buffer_dtype=torch.bfloat16)
    # The parameters' own dtype is always accepted.
    assert _controller(model, x, buffer_dtype=torch.float64).buffer.grads.dtype == torch.float64
