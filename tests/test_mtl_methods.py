"""Training steps of every method (python/mtl/methods.py) on a tiny MultiDigits model."""

from __future__ import annotations

import copy
import math
import sys
from pathlib import Path

import pytest
import torch
from torch import Tensor
from torchjd.aggregation import MGDA, PCGrad, Sum

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "python"))

from mtl.data.multidigits import DEFAULT_TASKS, make_multidigits
from mtl.methods import (
    METHODS,
    SCALED_METHODS,
    AggregatorStep,
    LossFn,
    SumStep,
    UncertaintyWeighting,
    make_step,
    parse_method,
)
from mtl.models.multidigits import MultiDigitsNet, task_loss

TASKS = list(DEFAULT_TASKS)


@pytest.fixture(scope="module")
def batch() -> tuple[Tensor, dict[str, Tensor]]:
    data = make_multidigits(0, train_size=16, val_size=1, test_size=1)
    return data.train.images, data.train.targets


def build(tasks: list[str], seed: int = 0) -> MultiDigitsNet:
    torch.manual_seed(seed)
    return MultiDigitsNet(tasks, width=4)


def loss_fn_for(model: MultiDigitsNet, batch: tuple[Tensor, dict[str, Tensor]]) -> LossFn:
    images, targets = batch

    def loss_fn(task: str) -> Tensor:
        return task_loss(task, model(images, task=task), targets[task])

    return loss_fn


@pytest.mark.parametrize("method", METHODS)
def test_one_step_of_every_method_runs(method: str, batch) -> None:  # type: ignore[no-untyped-def]
    tasks = TASKS[:1] if method == "single" else TASKS
    model = build(tasks)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    step = make_step(
        method,
        model,
        tasks,
        optimizer,
        shared=model.shared_parameters(),
        sample_input=batch[0],
        seed=0,
    )
    losses = step(loss_fn_for(model, batch), 1, 2)
    assert list(losses) == tasks
    for task, loss in losses.items():
        assert loss.shape == () and not loss.requires_grad
        assert torch.isfinite(loss), task
    # Every parameter moved: the shared convs, each task's BatchNorms and its head.
    for name, p in model.named_parameters():
        assert not torch.equal(p.detach(), before[name]), f"{method}: {name} did not change"


def per_task_grads(
    model: MultiDigitsNet, batch: tuple[Tensor, dict[str, Tensor]]
) -> dict[str, dict[str, Tensor]]:
    """Each task's own gradient of every parameter it reaches (fresh copy of the model)."""
    out = {}
    for task in TASKS:
        m = copy.deepcopy(model)
        loss_fn_for(m, batch)(task).backward()
        out[task] = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    return out


def shared_names(model: MultiDigitsNet) -> list[str]:
    ids = {id(p) for p in model.shared_parameters()}
    return [n for n, p in model.named_parameters() if id(p) in ids]


def test_sum_aggregator_reproduces_plain_gradient_descent(batch) -> None:  # type: ignore[no-untyped-def]
    # lr = 0: the step leaves the weights alone but the gradients in .grad.
    gd_model, agg_model = build(TASKS), build(TASKS)
    gd = SumStep(gd_model, TASKS, torch.optim.SGD(gd_model.parameters(), lr=0.0))
    agg = AggregatorStep(
        agg_model,
        TASKS,
        torch.optim.SGD(agg_model.parameters(), lr=0.0),
        agg_model.shared_parameters(),
        Sum(),
    )
    gd(loss_fn_for(gd_model, batch), 0, 1)
    agg(loss_fn_for(agg_model, batch), 0, 1)
    for (name, p), q in zip(gd_model.named_parameters(), agg_model.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("aggregator", [MGDA(), PCGrad()], ids=["mgda", "pcgrad"])
def test_shared_gradient_is_the_aggregated_jacobian(aggregator, batch) -> None:  # type: ignore[no-untyped-def]
    model = build(TASKS)
    expected_rows = per_task_grads(model, batch)
    names = shared_names(model)
    jacobian = torch.stack(
        [torch.cat([expected_rows[t][n].reshape(-1) for n in names]) for t in TASKS]
    )
    torch.manual_seed(7)  # PCGrad draws a random task order from the global generator
    expected = aggregator(jacobian)
    step = AggregatorStep(
        model,
        TASKS,
        torch.optim.SGD(model.parameters(), lr=0.0),
        model.shared_parameters(),
        aggregator,
    )
    torch.manual_seed(7)
    step(loss_fn_for(model, batch), 0, 1)
    got = torch.cat([p.grad.reshape(-1) for p in model.shared_parameters()])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
    # Task-specific parameters keep their own task's gradient, untouched by the aggregator.
    params = dict(model.named_parameters())
    for task in TASKS:
        for name, grad in expected_rows[task].items():
            if name not in names:
                torch.testing.assert_close(params[name].grad, grad, msg=name)


def test_jacobian_row_of_a_task_that_misses_a_parameter_is_zero(batch) -> None:  # type: ignore[no-untyped-def]
    model = build(TASKS)
    extra = torch.nn.Parameter(torch.ones(3))  # shared on paper, reached by no task
    seen = []

    def spy(matrix: Tensor) -> Tensor:
        seen.append(matrix.clone())
        return matrix.sum(0)

    step = AggregatorStep(
        model,
        TASKS,
        torch.optim.SGD([*model.parameters(), extra], lr=0.0),
        [*model.shared_parameters(), extra],
        spy,
    )
    step(loss_fn_for(model, batch), 0, 1)
    assert seen[0].shape[0] == len(TASKS)
    assert float(seen[0][:, -3:].abs().sum()) == 0.0
    assert float(seen[0][:, :-3].abs().sum()) > 0.0
    assert extra.grad is not None and float(extra.grad.abs().sum()) == 0.0


def test_bad_arguments_raise(batch) -> None:  # type: ignore[no-untyped-def]
    model = build(TASKS)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="method"):
        make_step("adam", model, TASKS, opt)
    with pytest.raises(ValueError, match="single"):
        make_step("single", model, TASKS, opt)
    with pytest.raises(ValueError, match="shared"):
        make_step("pcgrad", model, TASKS, opt)
    with pytest.raises(ValueError, match="sample_input"):
        make_step("ours_mixed", model, TASKS, opt)
    with pytest.raises(ValueError, match="shared"):
        AggregatorStep(model, TASKS, opt, [], Sum())


def test_ours_phase2_combines_the_jacobian_with_cs_kernels_phase2(batch) -> None:  # type: ignore[no-untyped-def]
    import cs_kernels as ck

    model = build(TASKS)
    with torch.no_grad():  # distinct BatchNorm scales per task, so channels' priorities differ
        gen = torch.Generator().manual_seed(1)
        for block in model.blocks():
            for bn in block.bn.values():
                bn.weight.copy_(0.5 + torch.rand(bn.weight.shape, generator=gen))
    names = shared_names(model)
    # Each task's gradient and, after its forward, its BatchNorms' running variances.
    rows, bn_state = [], {}
    for task in TASKS:
        m = copy.deepcopy(model)
        loss_fn_for(m, batch)(task).backward()
        params = dict(m.named_parameters())
        rows.append(torch.cat([params[n].grad.reshape(-1) for n in names]))
        bn_state[task] = [(b.bn[task].weight.detach(), b.bn[task].running_var) for b in m.blocks()]
    convs = [b.conv.weight.detach() for b in model.blocks()]
    strength = torch.cat(
        [
            ck.channel_strength(
                w,
                ck.batchnorm_scale(
                    [bn_state[t][i][0] for t in TASKS], [bn_state[t][i][1] for t in TASKS]
                ),
            )
            for i, w in enumerate(convs)
        ],
        dim=1,
    )
    plan = ck.Phase2Plan.from_shapes([w.shape for w in convs])
    expected = ck.phase2(torch.stack(rows), plan, strength, backend="reference")

    step = make_step(
        "ours_phase2",
        model,
        TASKS,
        torch.optim.SGD(model.parameters(), lr=0.0),
        sample_input=batch[0],
    )
    step(loss_fn_for(model, batch), 0, 1)
    got = torch.cat([p.grad.reshape(-1) for p in model.shared_parameters()])
    torch.testing.assert_close(got, expected.to(got.dtype), rtol=1e-4, atol=1e-6)
    # The projection really changed something here.
    assert not torch.allclose(got, torch.stack(rows).sum(0), rtol=1e-4, atol=1e-6)


def test_ours_phase1_is_one_optimizer_step_per_task(batch) -> None:  # type: ignore[no-untyped-def]
    ours, manual = build(TASKS), build(TASKS)
    opt = torch.optim.SGD(manual.parameters(), lr=0.1)
    loss_fn = loss_fn_for(manual, batch)
    for task in TASKS:
        opt.zero_grad()
        loss_fn(task).backward()
        opt.step()
    step = make_step(
        "ours_phase1",
        ours,
        TASKS,
        torch.optim.SGD(ours.parameters(), lr=0.1),
        sample_input=batch[0],
    )
    step(loss_fn_for(ours, batch), 0, 1)
    for (name, p), q in zip(manual.named_parameters(), ours.parameters(), strict=True):
        torch.testing.assert_close(q, p, msg=name)


# ------------------------------------------------------------------ uncertainty weighting


def test_parse_method_names_a_base_method_and_a_loss_scaling() -> None:
    assert parse_method("gd") == ("gd", None)
    assert parse_method("gd_uw") == ("gd", "uw")
    assert parse_method("ours_mixed_uw") == ("ours_mixed", "uw")
    assert all(parse_method(m)[1] == "uw" for m in SCALED_METHODS)
    for bad in ("single_uw", "adam", "gd_dwa", "uw"):
        with pytest.raises(ValueError, match="method"):
            parse_method(bad)


def test_uncertainty_weighting_value_and_gradient() -> None:
    uw = UncertaintyWeighting(["a", "b"])
    with torch.no_grad():
        uw.log_var[1].fill_(math.log(4.0))
    loss = torch.tensor(3.0, requires_grad=True)
    scaled = uw("b", loss)
    assert float(scaled.detach()) == pytest.approx(0.5 * 3.0 / 4.0 + 0.5 * math.log(4.0))
    scaled.backward()
    # d/ds (e^-s L / 2 + s / 2) = (1 - e^-s L) / 2; only task b's log-variance is reached.
    assert uw.log_var[0].grad is None
    assert float(uw.log_var[1].grad) == pytest.approx(0.5 * (1 - 3.0 / 4.0))
    assert float(loss.grad) == pytest.approx(0.5 / 4.0)
    assert uw.weights() == pytest.approx({"a": 0.5, "b": 0.125})


@pytest.mark.parametrize("method", ["gd_uw", "pcgrad_uw", "ours_phase2_uw", "ours_mixed_uw"])
def test_each_step_gets_its_own_log_variance_gradient(
    method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Phase 2 zeroes only the model's gradients: the harness must zero the log-variances'
    before every step, or their gradients pile up across steps."""
    from mtl import train as mtl_train
    from mtl.train import TrainConfig, train_run

    data = make_multidigits(0, train_size=64, val_size=16, test_size=16)
    seen: list[tuple[Tensor, Tensor, dict[str, Tensor], int]] = []
    real = mtl_train.make_step

    def spy(*args, **kwargs):  # type: ignore[no-untyped-def]
        step = real(*args, **kwargs)
        log_var = args[3].param_groups[0]["params"][-len(TASKS) :]  # the scaler's, in order

        def recorded(loss_fn, epoch, epochs):  # type: ignore[no-untyped-def]
            before = torch.stack([s.detach().clone() for s in log_var])
            raw: dict[str, Tensor] = {}

            def recording(task: str) -> Tensor:
                loss = loss_fn(task)
                s = before[TASKS.index(task)]  # undo the scaling: the weighted loss L_t
                raw[task] = ((loss.detach() - 0.5 * s) * 2 * torch.exp(s)).clone()
                return loss

            losses = step(recording, epoch, epochs)
            grads = torch.stack([torch.zeros(()) if s.grad is None else s.grad for s in log_var])
            phase = step.cs.last_phase if method == "ours_mixed_uw" else 2
            seen.append((before, grads.clone(), raw, phase))
            return losses

        return recorded

    monkeypatch.setattr(mtl_train, "make_step", spy)
    config = TrainConfig(epochs=2, batch_size=16, width=4)  # the mixed schedule has Phase 2
    result, _ = train_run(method, TASKS, data, config, seed=0)  # draws in epoch 1
    assert len(seen) == 8 and set(result.loss_scales) == set(TASKS)
    phase2 = [entry for entry in seen if entry[3] == 2]
    assert phase2
    for before, grads, raw, _ in phase2:
        expected = torch.stack(
            [0.5 - 0.5 * torch.exp(-before[k]) * raw[t] for k, t in enumerate(TASKS)]
        )
        torch.testing.assert_close(grads, expected, rtol=1e-4, atol=1e-6)
