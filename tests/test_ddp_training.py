"""ConnectionStrength under DistributedDataParallel: 2 processes, gloo, CPU.

Each rank trains on its half of every batch. The ranks must end bit-identical, after one
all-reduce per Phase 2 step (and one per task in Phase 1), and match one process trained
on the whole batches.

Why eval-mode BatchNorm for the comparison with one process: in train mode each rank
normalises with its own half-batch statistics, so its gradients are not those of the
full batch, and no data-parallel scheme (plain DDP included) matches a single process then.
With the running statistics fixed, a loss that averages over the batch has a full-batch
gradient equal to the mean of the two half-batch gradients. A second run in train mode
checks that the ranks still agree bit for bit (the running statistics are averaged in the
same all-reduce).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import Tensor, nn

from cs_kernels.training import ConnectionStrength

TASKS = ["left", "right"]
EPOCHS, BATCHES, BATCH = 3, 3, 8


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 6, 3, padding=1)
        self.bn1 = nn.ModuleDict({t: nn.BatchNorm2d(6) for t in TASKS})
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1, bias=False)
        self.bn2 = nn.ModuleDict({t: nn.BatchNorm2d(8) for t in TASKS})
        self.heads = nn.ModuleDict({t: nn.Linear(8, 3) for t in TASKS})

    def forward(self, x: Tensor, task: str) -> Tensor:
        h = F.relu(self.bn1[task](self.conv1(x)))
        h = F.relu(self.bn2[task](self.conv2(h)))
        return self.heads[task](h.mean(dim=(2, 3)))


def make_model() -> Net:
    torch.manual_seed(0)
    model = Net()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) * 2 + 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
    return model


def data() -> list[tuple[Tensor, dict[str, Tensor]]]:
    gen = torch.Generator().manual_seed(2)
    return [
        (
            torch.randn(BATCH, 2, 6, 6, generator=gen),
            {t: torch.randint(0, 3, (BATCH,), generator=gen) for t in TASKS},
        )
        for _ in range(BATCHES)
    ]


def train(model: nn.Module, rank: int, world: int, train_mode: bool) -> ConnectionStrength:
    model.train(train_mode)
    batches = data()
    share = BATCH // world
    part = slice(rank * share, (rank + 1) * share)
    cs = ConnectionStrength(model, TASKS, batches[0][0][part], seed=5)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)
    for epoch in range(EPOCHS):
        for x, y in batches:
            xs, ys = x[part], {t: v[part] for t, v in y.items()}
            cs.step(
                opt,
                lambda t, xs=xs, ys=ys: F.cross_entropy(model(xs, task=t), ys[t]),
                epoch,
                EPOCHS,
            )
    return cs


def worker(rank: int, world: int, init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    calls = []
    real = dist.all_reduce

    def counting(tensor: Tensor, *args: object, **kwargs: object) -> object:
        calls.append(tensor.numel())
        return real(tensor, *args, **kwargs)  # type: ignore[arg-type]

    dist.all_reduce = counting  # type: ignore[assignment]
    try:
        results = {}
        for train_mode in (False, True):
            calls.clear()
            model = make_model()
            ddp = nn.parallel.DistributedDataParallel(model)
            cs = train(ddp, rank, world, train_mode)
            results[train_mode] = {
                "state": {k: v.clone() for k, v in model.state_dict().items()},
                "calls": list(calls),
                "phases": (cs.phase1_steps, cs.phase2_steps),
                "numel": cs.buffer.storage.numel(),
            }
        torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.all_reduce = real
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_ddp_ranks_agree_and_match_one_process() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        init = f"file://{Path(tmp) / 'store'}"
        mp.spawn(worker, args=(2, init, tmp), nprocs=2, join=True)
        ranks = [torch.load(Path(tmp) / f"rank{r}.pt") for r in range(2)]

    single = make_model()
    single_cs = train(single, 0, 1, train_mode=False)
    for train_mode in (False, True):
        a, b = (r[train_mode] for r in ranks)
        for name, value in a["state"].items():
            assert torch.equal(value, b["state"][name]), (train_mode, name)
        phase1, phase2 = a["phases"]
        assert phase1 > 0 and phase2 > 0
        # One all-reduce of the whole storage per Phase 2 step, one per task in Phase 1.
        assert len(a["calls"]) == phase2 + phase1 * len(TASKS)
        assert a["calls"].count(a["numel"]) == phase2
    assert single_cs.phase2_steps == ranks[0][False]["phases"][1]
    for name, value in single.state_dict().items():
        torch.testing.assert_close(ranks[0][False]["state"][name], value, rtol=1e-5, atol=1e-6)
    # The comparison can fail: training changed the weights well beyond the tolerance.
    start = make_model().state_dict()
    assert not torch.allclose(start["conv2.weight"], single.state_dict()["conv2.weight"], atol=1e-3)
