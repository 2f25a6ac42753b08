"""`ConnectionStrengthAggregator`: TorchJD's ``backward`` + ``jac_to_grad`` leave in ``.grad``
what ``cs.combine()`` gives on the same rows, and both match the float64 reference; shapes
that do not match the bound plan are errors naming both; the module imports without TorchJD."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import cs_kernels as ck
from tests.conftest import assert_close

ROOT = Path(__file__).resolve().parent.parent
TASKS = ["seg", "depth", "normals"]


class Net(nn.Module):
    """Two shared convs, a BatchNorm per task after each, a head per task."""

    def __init__(self, tasks: list[str], channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, channels, 3)
        self.conv2 = nn.Conv2d(channels, 1, 3, bias=False)  # one channel: a uniform layer
        self.bn1 = nn.ModuleDict({t: nn.BatchNorm2d(channels) for t in tasks})
        self.bn2 = nn.ModuleDict({t: nn.BatchNorm2d(1) for t in tasks})
        self.head = nn.ModuleDict({t: nn.Conv2d(1, 1, 1) for t in tasks})

    def forward(self, x: torch.Tensor, task: str) -> torch.Tensor:
        x = torch.relu(self.bn1[task](self.conv1(x)))
        return self.head[task](torch.relu(self.bn2[task](self.conv2(x))))


def _setup(tasks: list[str], dtype: torch.dtype, uniform: str, mode: str) -> tuple:
    torch.manual_seed(0)
    model = Net(tasks, channels=5).to(dtype)
    with torch.no_grad():  # task t leads the channels c with c % T == t: no uniform layer
        for t, task in enumerate(tasks):
            lead = torch.arange(5) % len(tasks) == t
            model.bn1[task].weight.copy_(torch.where(lead, 2.0, 0.5))
            model.bn1[task].running_var.uniform_(0.8, 1.2)
    model.eval()  # the forwards leave the running statistics (and so the strengths) alone
    x = torch.randn(4, 3, 9, 9, dtype=dtype)
    target = {t: torch.randn(4, 1, 5, 5, dtype=dtype) for t in tasks}
    cs = ck.ConnectionStrength(model, tasks, x, mode=mode, uniform=uniform)

    def loss_fn(task: str) -> torch.Tensor:
        sign = 1.0 if task == tasks[0] else -1.0  # conflicting tasks: projections happen
        return nn.functional.mse_loss(model(x, task=task), sign * target[task])

    return model, cs, loss_fn


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("mode", "uniform"), [("group", "sum"), ("channel", "project")])
@pytest.mark.parametrize("tasks", [TASKS, TASKS[:2]], ids=["T3", "T2"])
def test_jac_to_grad_gives_combine_on_the_same_rows(
    dtype: torch.dtype, mode: str, uniform: str, tasks: list[str]
) -> None:
    autojac = pytest.importorskip("torchjd.autojac")
    from torchjd.aggregation import Aggregator, Sum

    from cs_kernels.integrations.torchjd import ConnectionStrengthAggregator

    model, cs, loss_fn = _setup(tasks, dtype, uniform, mode)
    aggregator = ConnectionStrengthAggregator(cs)
    assert isinstance(aggregator, Aggregator)

    losses = [loss_fn(t) for t in cs.tasks]
    autojac.backward(losses)
    rows = torch.cat([p.jac.reshape(len(tasks), -1) for p in cs.shared_parameters], dim=1)
    rows_before = rows.clone()
    autojac.jac_to_grad(cs.shared_parameters, aggregator, retain_jac=True)
    autojac.jac_to_grad(cs.task_parameters, Sum())
    got = torch.cat([p.grad.reshape(-1) for p in cs.shared_parameters])
    assert got.dtype == dtype
    assert torch.equal(rows, rows_before), "the aggregator modified the Jacobian"

    # The rows TorchJD computed are the rows the controller collects itself.
    cs.collect(loss_fn)
    assert_close(cs.buffer.grads, rows, dtype, "autojac rows vs cs.collect rows")
    # The controller's own path on the same rows: the same function, bit for bit.
    cs.buffer.grads.copy_(rows)
    top = cs.combine()
    assert torch.equal(got, cs.buffer.out)
    assert aggregator.last_top is not None and torch.equal(aggregator.last_top, top)

    # The oracle: float64, loops and all.
    weights = [c.weight for c in cs.connections]
    expected = ck.phase2_from_weights(
        rows, cs.plan, weights, cs.scales(), mode=mode, uniform=uniform, backend="reference"
    )
    assert_close(got, expected, dtype, "aggregator vs reference")
    # A test that could not fail would be worthless: the projection must have acted.
    assert not torch.allclose(got, rows.sum(0)), "no projection happened: weak test case"

    # Task-specific parameters got their own task's gradient (Sum of one non-zero row).
    head = model.head[tasks[1]].weight
    assert head.grad is not None and bool(head.grad.abs().sum() > 0)


def test_matrix_of_the_wrong_shape_names_both_shapes() -> None:
    pytest.importorskip("torchjd")
    from cs_kernels.integrations.torchjd import ConnectionStrengthAggregator

    _, cs, _ = _setup(TASKS, torch.float32, "sum", "group")
    aggregator = ConnectionStrengthAggregator(cs)
    T, N = len(TASKS), cs.plan.numel
    for shape in [(T + 1, N), (T, N - 1), (T - 1, N + 3)]:
        with pytest.raises(ValueError, match=rf"\[{shape[0]}, {shape[1]}\].*\[{T}, {N}\]"):
            aggregator(torch.zeros(shape))
    with pytest.raises(ValueError):  # TorchJD's own check: a matrix is 2-D
        aggregator(torch.zeros(T * N))
    with pytest.raises(TypeError, match="ConnectionStrength"):
        ConnectionStrengthAggregator(object())  # type: ignore[arg-type]


def test_imports_without_torchjd_and_building_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in list(sys.modules):
        if name == "torchjd" or name.startswith("torchjd."):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "torchjd", None)  # import torchjd raises ImportError
    spec = importlib.util.spec_from_file_location(
        "cs_kernels_torchjd_without_torchjd", ROOT / "cs_kernels" / "integrations" / "torchjd.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # no error: the module imports
    with pytest.raises(ImportError, match=r'pip install "torchjd>=0.18"'):
        module.ConnectionStrengthAggregator(object())
