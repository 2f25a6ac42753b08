"""GradScaler, accumulation and clipping under DistributedDataParallel: 2 gloo ranks, CPU.

Each rank takes its half of every batch in k = 2 micro-batches, with an fp16-style
GradScaler (power-of-two scale, so exact) and clipping. The ranks must end bit-identical,
make one all-reduce per Phase 2 step (only after the last micro-batch) and one per task
step in Phase 1, and match one process on the whole batches (BatchNorm in eval mode, see
tests/test_ddp_training.py for why). An inf injected on one rank only skips the step on
both ranks (the all-reduce carries it), and changes nothing.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn

from cs_kernels.training import ConnectionStrength
from tests.amp_models import TASKS, loss_fn_for, make_batch, make_model, micro_loss_fn

EPOCHS, BATCHES, BATCH, K = 3, 3, 8, 2
MAX_NORM = 0.5


def batches() -> list[tuple[Tensor, dict[str, Tensor]]]:
    return [make_batch(n=BATCH, seed=10 + b) for b in range(BATCHES)]


def train(model: nn.Module, rank: int, world: int, k: int) -> tuple[ConnectionStrength, float]:
    data = batches()
    share = BATCH // world
    part = slice(rank * share, (rank + 1) * share)
    cs = ConnectionStrength(model, TASKS, data[0][0][part], seed=5)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2)
    for epoch in range(EPOCHS):
        for x, y in data:
            xs, ys = x[part], {t: v[part] for t, v in y.items()}
            fn = micro_loss_fn(model, xs, ys, k) if k > 1 else loss_fn_for(model, xs, ys)
            cs.step(opt, fn, epoch, EPOCHS, scaler=scaler, max_grad_norm=MAX_NORM, accumulate=k)
    return cs, scaler.get_scale()


def worker(rank: int, world: int, init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    calls = []
    real = dist.all_reduce

    def counting(tensor: Tensor, *args: object, **kwargs: object) -> object:
        calls.append(tensor.numel())
        return real(tensor, *args, **kwargs)  # type: ignore[arg-type]

    dist.all_reduce = counting  # type: ignore[assignment]
    try:
        model = make_model()
        ddp = nn.parallel.DistributedDataParallel(model)
        cs, scale = train(ddp, rank, world, K)
        result = {
            "state": {k: v.clone() for k, v in model.state_dict().items()},
            "calls": list(calls),
            "phases": (cs.phase1_steps, cs.phase2_steps),
            "numel": cs.buffer.storage.numel(),
            "scale": scale,
        }
        # An inf on rank 1 only, in a Phase 2 step: both ranks skip it.
        x, y = make_batch(n=BATCH // world, seed=rank)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
        clean = loss_fn_for(ddp, x, y)
        before = [p.detach().clone() for p in model.parameters()]
        phase2 = cs.phase2_steps

        def poisoned(task: str) -> Tensor:
            loss = clean(task)
            return loss * float("inf") if rank == 1 and task == "depth" else loss

        cs.step(opt, poisoned, 10**6 - 1, 10**6, scaler=scaler)  # Phase 2
        result["skipped"] = (
            cs.last_skipped,
            cs.phase2_steps == phase2,
            all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True)),
            scaler.get_scale(),
        )
        torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.all_reduce = real
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_ddp_scaler_accumulation_clipping_match_one_process() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        init = f"file://{Path(tmp) / 'store'}"
        mp.spawn(worker, args=(2, init, tmp), nprocs=2, join=True)
        a, b = (torch.load(Path(tmp) / f"rank{r}.pt") for r in range(2))

    for name, value in a["state"].items():
        assert torch.equal(value, b["state"][name]), name
    phase1, phase2 = a["phases"]
    assert phase1 > 0 and phase2 > 0
    # Phase 2: one all-reduce of the whole storage per step, after the last micro-batch.
    # Phase 1: one per task step (its k micro-batches accumulate locally first).
    assert len(a["calls"]) == phase2 + phase1 * len(TASKS)
    assert a["calls"].count(a["numel"]) == phase2
    for r in (a, b):
        skipped, unchanged_count, unchanged_params, scale = r["skipped"]
        assert skipped == tuple(TASKS) and unchanged_count and unchanged_params
        assert scale == 2.0**3

    single = make_model()
    single_cs, single_scale = train(single, 0, 1, 1)
    assert (single_cs.phase1_steps, single_cs.phase2_steps) == a["phases"]
    assert single_scale == a["scale"]
    for name, value in single.state_dict().items():
        torch.testing.assert_close(a["state"][name], value, rtol=1e-5, atol=1e-6)
    start = make_model().state_dict()
    assert not torch.allclose(start["conv2.weight"], single.state_dict()["conv2.weight"], atol=1e-3)
