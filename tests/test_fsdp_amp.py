"""bf16 mixed precision, accumulation, clipping and CPU offload under FSDP2 (``fully_shard``):
2 gloo ranks, CPU, against one process on the whole batch.

- ``MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)``: each
  rank's forward and backward run in bf16, FSDP2 reduce-scatters in fp32 into the fp32
  ``[T, N_local]`` rows. One Phase 2 step equals one process whose per-task gradients come
  from a bf16 copy of the model on the whole batch, combined by the reference in float64
  with the fp32 model's priorities (tolerance: bf16 rounding of the gradients, rtol 3e-2).
  GroupNorm connections: BatchNorm's fp32 running statistics do not mix with bf16 weights.
- fp32 training with ``accumulate=2`` and ``max_grad_norm`` (DTensor gradients) over mixed
  phases equals one process without accumulation (fp32 tolerances), and so does the same
  run with ``CPUOffloadPolicy(pin_memory=False)`` (pinned memory needs an accelerator).
- fp16-style loss scaling with ``ShardedGradScaler`` (it all-reduces the inf/NaN check):
  training equals one process with a plain GradScaler (power-of-two scale: exact), and an
  inf on one rank only skips the step on both. A plain GradScaler (each rank would check
  its own shards) and half-size rows are refused on every rank with errors naming them.
"""

from __future__ import annotations

import os
import tempfile
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn

import cs_kernels as ck
from cs_kernels.training import ConnectionStrength
from tests.amp_models import TASKS, loss_fn_for, make_batch, make_model, micro_loss_fn

pytestmark = pytest.mark.skipif(
    not dist.is_available(), reason="torch.distributed is not available in this torch build"
)

BATCH, BATCHES, EPOCHS, K, MAX_NORM = 8, 2, 3, 2, 0.5


def shard(model: nn.Module, **policy: object) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    fully_shard(model.conv1, **policy)  # type: ignore[arg-type]
    fully_shard(model.conv2, **policy)  # type: ignore[arg-type]
    fully_shard(model, **policy)
    return model


def full(t: Tensor) -> Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t  # a collective for DTensors


def part(rank: int, world: int) -> slice:
    share = BATCH // world
    return slice(rank * share, (rank + 1) * share)


def train(
    model: nn.Module, rank: int, world: int, k: int, scaler: torch.amp.GradScaler | None = None
) -> tuple[ConnectionStrength, dict]:
    data = [make_batch(n=BATCH, seed=20 + b) for b in range(BATCHES)]
    rows = part(rank, world)
    cs = ConnectionStrength(model, TASKS, data[0][0][rows], seed=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)
    for epoch in range(EPOCHS):
        for x, y in data:
            xs, ys = x[rows], {t: v[rows] for t, v in y.items()}
            fn = micro_loss_fn(model, xs, ys, k) if k > 1 else loss_fn_for(model, xs, ys)
            cs.step(opt, fn, epoch, EPOCHS, max_grad_norm=MAX_NORM, accumulate=k, scaler=scaler)
    params = {n: full(p.detach()).clone() for n, p in model.named_parameters()}
    return cs, params


def mixed_precision_step(rank: int, world: int) -> dict[str, Tensor]:
    from torch.distributed.fsdp import MixedPrecisionPolicy

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    model = shard(make_model(norm="group"), mp_policy=policy)
    x, y = make_batch(n=BATCH)
    rows = part(rank, world)
    xs, ys = x[rows], {t: v[rows] for t, v in y.items()}
    cs = ConnectionStrength(model, TASKS, xs)
    cs.collect(loss_fn_for(model, xs, ys))
    top = cs.combine()
    grads = {n: full(p.grad).clone() for n, p in model.named_parameters() if p.grad is not None}
    return {"top": top.clone(), "rows_dtype": cs.buffer.grads.dtype, **grads}  # type: ignore[dict-item]


def refusals(rank: int, world: int) -> dict[str, str]:
    x, y = make_batch(n=BATCH // world)
    model = shard(make_model())
    out = {}
    try:
        ConnectionStrength(model, TASKS, x, buffer_dtype=torch.bfloat16)
        out["buffer_dtype"] = "no error"
    except ValueError as exc:
        out["buffer_dtype"] = str(exc)
    cs = ConnectionStrength(model, TASKS, x)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    try:
        cs.step(opt, loss_fn_for(model, x, y), 0, 2, scaler=torch.amp.GradScaler("cpu"))
        out["scaler"] = "no error"
    except ValueError as exc:
        out["scaler"] = str(exc)
    return out


def sharded_scaler(rank: int, world: int) -> dict[str, object]:
    from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

    scaler = ShardedGradScaler("cpu", init_scale=2.0**10, growth_interval=2)
    cs, params = train(shard(make_model()), rank, world, 1, scaler=scaler)
    result: dict[str, object] = {"params": params, "scale": scaler.get_scale()}
    model = cs.model
    x, y = make_batch(n=BATCH // world, seed=7)
    clean = loss_fn_for(model, x, y)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = {n: full(p.detach()).clone() for n, p in model.named_parameters()}

    def poisoned(task: str) -> Tensor:
        loss = clean(task)
        return loss * float("inf") if rank == 1 and task == "depth" else loss

    cs.step(opt, poisoned, 10**6 - 1, 10**6, scaler=scaler)  # Phase 2
    after = {n: full(p.detach()).clone() for n, p in model.named_parameters()}
    result["skipped"] = (cs.last_skipped, all(torch.equal(before[n], after[n]) for n in after))
    return result


def worker(rank: int, world: int, init: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=init, rank=rank, world_size=world, timeout=timedelta(seconds=60)
    )
    try:
        from torch.distributed.fsdp import CPUOffloadPolicy

        results: dict[str, object] = {"mp": mixed_precision_step(rank, world)}
        cs, params = train(shard(make_model()), rank, world, K)
        results["accumulate"] = {"params": params, "phases": (cs.phase1_steps, cs.phase2_steps)}
        offload = shard(make_model(), offload_policy=CPUOffloadPolicy(pin_memory=False))
        cs, params = train(offload, rank, world, K)
        results["offload"] = {"params": params, "phases": (cs.phase1_steps, cs.phase2_steps)}
        results["refusals"] = refusals(rank, world)
        results["sharded_scaler"] = sharded_scaler(rank, world)
        torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks() -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        init = f"file://{Path(tmp) / 'store'}"
        mp.spawn(worker, args=(2, init, tmp), nprocs=2, join=True)
        return [torch.load(Path(tmp) / f"rank{r}.pt", weights_only=False) for r in range(2)]


def test_bf16_mixed_precision_policy_equals_one_process(ranks: list[dict]) -> None:
    x, y = make_batch(n=BATCH)
    fp32 = make_model(norm="group")
    bf16 = make_model(norm="group").to(torch.bfloat16)
    cs32 = ConnectionStrength(fp32, TASKS, x)
    cs16 = ConnectionStrength(bf16, TASKS, x.bfloat16())
    top = cs32.top_priority()
    cs16.collect(loss_fn_for(bf16, x.bfloat16(), y))
    rows = cs16.buffer.grads.double()
    expected = ck.phase2(rows, cs32.plan, top=top, backend="reference").float()
    names = [n for n, p in fp32.named_parameters() if any(p is q for q in cs32.shared_parameters)]
    sizes = [p.numel() for p in cs32.shared_parameters]
    want = dict(zip(names, expected.split(sizes), strict=True))
    for rank, got in enumerate(ranks):
        mp_step = got["mp"]
        assert mp_step["rows_dtype"] == torch.float32  # FSDP2 reduces into fp32 shards
        assert torch.equal(mp_step["top"], top), rank
        for name, value in want.items():
            torch.testing.assert_close(
                mp_step[name].reshape(-1), value, rtol=3e-2, atol=2e-3, msg=f"rank {rank} {name}"
            )
    # The comparison can fail: the projection changed the plain sum beyond the tolerance.
    plain = rows.sum(0).float()
    assert not torch.allclose(plain, expected, rtol=3e-2, atol=2e-3)


@pytest.mark.parametrize("run", ["accumulate", "offload"])
def test_accumulation_and_clipping_equal_one_process(ranks: list[dict], run: str) -> None:
    single = make_model()
    cs, params = train(single, 0, 1, 1)
    for rank, got in enumerate(ranks):
        assert got[run]["phases"] == (cs.phase1_steps, cs.phase2_steps)
        for name, value in params.items():
            torch.testing.assert_close(
                got[run]["params"][name], value, rtol=1e-5, atol=1e-6, msg=f"rank {rank} {name}"
            )
    assert cs.phase1_steps > 0 and cs.phase2_steps > 0
    start = dict(make_model().named_parameters())
    assert not torch.allclose(start["conv2.weight"], params["conv2.weight"], atol=1e-3)


def test_scaler_and_half_rows_are_refused(ranks: list[dict]) -> None:
    for got in ranks:
        assert (
            "buffer_dtype=torch.bfloat16 (half-size rows) is for a single process"
            in (got["refusals"]["buffer_dtype"])
        )
        assert "FSDP2 (fully_shard)" in got["refusals"]["buffer_dtype"]
        assert got["refusals"]["scaler"].startswith("scaler: a plain GradScaler under FSDP2")
        assert "ShardedGradScaler" in got["refusals"]["scaler"]


def test_sharded_grad_scaler_equals_one_process_and_skips_together(ranks: list[dict]) -> None:
    single = make_model()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2)
    _, params = train(single, 0, 1, 1, scaler=scaler)
    for rank, got in enumerate(ranks):
        result = got["sharded_scaler"]
        assert result["scale"] == scaler.get_scale() > 2.0**10, rank  # it grew, no skips
        for name, value in params.items():
            torch.testing.assert_close(
                result["params"][name], value, rtol=1e-5, atol=1e-6, msg=f"rank {rank} {name}"
            )
        assert result["skipped"] == (tuple(TASKS), True), rank
