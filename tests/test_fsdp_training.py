"""ConnectionStrength on a ``fully_shard``-ed model (FSDP2): 2 and 3 gloo processes, CPU.

One spawn per world size runs every check, each rank saving what it saw; the test process
compares the ranks with each other and with one unsharded process. The model has uneven
channel splits (5 and 7 channels over 2 and 3 ranks), a layer with fewer channels than ranks
(2 channels over 3 ranks: an empty shard), BatchNorm, LayerNorm and Linear-head connections.

- One Phase 2 step, in group and channel mode under both uniform rules, equals the unsharded
  Phase 2 of one process on the whole batch (eval mode: see tests/test_ddp_training.py for
  why train-mode BatchNorm cannot match one process). The strengths make one rank's rows of
  a layer share one top task while the layer as a whole does not: a rank that applied the
  uniform rule to its own rows would get it wrong.
- Mixed Phase 1/Phase 2 training equals one process (eval mode), and in train mode the ranks
  end identical (buffers, telemetry, the gathered parameters).
- Collectives per step are counted: one all-reduce per Phase 2 step (and per Phase 1 step,
  for the buffers) besides FSDP2's own reduce-scatters, one per FSDP group and task.
- Bad input raises on every rank, never hangs: ranks with other tasks or connections, a
  weight sharded along dim 1 or split into other rows than FSDP2's, a parameter left
  unsharded, DDP mixed with FSDP2.
"""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import Tensor, nn

from cs_kernels.training import ConnectionStrength, connect

pytestmark = pytest.mark.skipif(
    not dist.is_available(), reason="torch.distributed is not available in this torch build"
)

TASKS = ["left", "right"]
BATCH = 6  # divisible by 2 and 3 ranks
EPOCHS, BATCHES = 3, 2
SETTINGS = [(m, u) for m in ("group", "channel") for u in ("sum", "project")]
# FSDP2 reduce-scatters with reduce_scatter_tensor (torch 2.11) or reduce_scatter_single (2.13)
REDUCE_SCATTERS = ("reduce_scatter_tensor", "reduce_scatter_single")
COLLECTIVES = ("all_reduce", "all_gather", *REDUCE_SCATTERS)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 5, 3, padding=1)
        self.bn1 = nn.ModuleDict({t: nn.BatchNorm2d(5) for t in TASKS})
        self.conv2 = nn.Conv2d(5, 2, 3, padding=1, bias=False)
        self.bn2 = nn.ModuleDict({t: nn.BatchNorm2d(2) for t in TASKS})
        self.fc1 = nn.Linear(2, 7)
        self.ln = nn.ModuleDict({t: nn.LayerNorm(7) for t in TASKS})
        self.fc2 = nn.Linear(7, 4)
        self.heads = nn.ModuleDict({t: nn.Linear(4, 3) for t in TASKS})

    def forward(self, x: Tensor, task: str) -> Tensor:
        h = F.relu(self.bn1[task](self.conv1(x)))
        h = F.relu(self.bn2[task](self.conv2(h)))
        z = F.relu(self.ln[task](self.fc1(h.mean(dim=(2, 3)))))
        return self.heads[task](F.relu(self.fc2(z)))


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
        # conv1's top tasks: left, left, left, right, left. Over 2 ranks (rows 0-2 | 3-4) and
        # 3 ranks (0-1 | 2-3 | 4) some ranks' rows all lead with "left", the layer does not.
        big, small = 3.0, 0.05
        model.bn1["left"].weight.copy_(torch.tensor([big, big, big, small, big]))
        model.bn1["right"].weight.copy_(torch.tensor([small, small, small, big, small]))
    return model


# Whether gloo's reduce-scatter averages (ReduceOp.AVG): some torch releases summed instead
# (pytorch/pytorch#162338), and FSDP2's gradients were then W times too large. Set per rank.
GLOO_AVERAGES = True


def gloo_averages(rank: int, world: int) -> bool:
    values = torch.full((world,), float(rank + 1))
    out = torch.empty(1)
    dist.reduce_scatter_tensor(out, values, op=dist.ReduceOp.AVG)
    return abs(float(out) - (world + 1) / 2) < 1e-6


def shard(model: Net, placement=None) -> Net:
    from torch.distributed.fsdp import fully_shard

    kwargs = {} if placement is None else {"shard_placement_fn": placement}
    fully_shard(model.conv1, **kwargs)
    fully_shard(model.conv2)
    fully_shard(model)
    if not GLOO_AVERAGES:  # let FSDP2 sum and divide itself
        for module in (model, model.conv1, model.conv2):
            module.set_force_sum_reduction_for_comms(True)  # type: ignore[operator]
    return model


def data() -> list[tuple[Tensor, dict[str, Tensor]]]:
    gen = torch.Generator().manual_seed(2)
    return [
        (
            torch.randn(BATCH, 2, 5, 5, generator=gen),
            {t: torch.randint(0, 3, (BATCH,), generator=gen) for t in TASKS},
        )
        for _ in range(BATCHES)
    ]


def part(rank: int, world: int) -> slice:
    share = BATCH // world
    return slice(rank * share, (rank + 1) * share)


def loss_fn(model: nn.Module, x: Tensor, y: dict[str, Tensor]):
    return lambda t: F.cross_entropy(model(x, task=t), y[t])


def full(t: Tensor) -> Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t  # a collective for DTensors


def one_step(model: nn.Module, x: Tensor, y, mode: str, uniform: str) -> dict[str, Tensor]:
    """One Phase 2 step up to the optimizer: the gathered gradients and the top tasks."""
    model.eval()
    cs = ConnectionStrength(model, TASKS, x, mode=mode, uniform=uniform)
    strengths = cs.strengths()  # under FSDP2 a collective: every rank calls it
    cs.collect(loss_fn(model, x, y))
    top = cs.combine()
    grads = {n: full(p.grad).clone() for n, p in model.named_parameters() if p.grad is not None}
    return {"top": top.clone(), "strengths": strengths, **grads}


def train(
    model: nn.Module, rank: int, world: int, train_mode: bool, counts: Counter
) -> tuple[ConnectionStrength, list[tuple[int, dict[str, int], Tensor]]]:
    model.train(train_mode)
    batches = data()
    rows = part(rank, world)
    cs = ConnectionStrength(model, TASKS, batches[0][0][rows], seed=10)  # phases 1 1 2 1 2 2
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)
    steps = []
    for epoch in range(EPOCHS):
        for x, y in batches:
            fn = loss_fn(model, x[rows], {t: v[rows] for t, v in y.items()})
            phase = cs.phase(epoch, EPOCHS)
            before = Counter(counts)
            if phase == 1:
                cs.phase1_step(opt, fn)
            else:
                cs.phase2_backward(fn)
                opt.step()
            # the running statistics after every step (they must agree across ranks each time)
            stats = torch.cat([b.flatten() for b in model.buffers() if b.is_floating_point()])
            steps.append((phase, dict(counts - before), stats.clone()))
    return cs, steps


def state(model: nn.Module, cs: ConnectionStrength) -> dict[str, object]:
    return {
        "params": {n: full(p.detach()).clone() for n, p in model.named_parameters()},
        "buffers": {n: b.clone() for n, b in model.named_buffers()},
        "telemetry": cs.telemetry.fractions().clone(),
        "phases": (cs.phase1_steps, cs.phase2_steps),
    }


def raised(build) -> str:
    try:
        build()
    except (ValueError, TypeError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return "no error"


def bad_inputs(rank: int, world: int) -> dict[str, str]:
    x = data()[0][0][part(rank, world)]
    errors = {}
    tasks = TASKS if rank == 0 else TASKS[::-1]
    errors["tasks"] = raised(lambda: ConnectionStrength(shard(make_model()), tasks, x))

    def other_connections() -> None:
        model = shard(make_model())
        regs = [] if rank == 0 else [connect(model.fc1.weight, {t: torch.ones(7) for t in TASKS})]
        ConnectionStrength(model, TASKS, x, connections=regs)

    errors["connections"] = raised(other_connections)
    from torch.distributed.tensor import Shard

    dim1 = shard(make_model(), placement=lambda p: Shard(1) if p.dim() > 1 else None)
    errors["dim1"] = raised(lambda: ConnectionStrength(dim1, TASKS, x))

    from torch.distributed.fsdp import fully_shard

    partly = make_model()
    fully_shard(partly.conv1)  # conv2, fc1, fc2 stay plain tensors
    errors["unsharded"] = raised(lambda: ConnectionStrength(partly, TASKS, x))
    mixed = make_model()
    mixed.conv2 = nn.parallel.DistributedDataParallel(mixed.conv2)
    fully_shard(mixed.conv1)
    errors["ddp"] = raised(lambda: ConnectionStrength(mixed, TASKS, x))

    # rows split 1 | 4 instead of torch.chunk's 3 | 2: not FSDP2's layout of whole channels
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    from cs_kernels.training.fsdp import Mesh, check_layout

    layer = nn.Linear(3, 5)
    local = torch.zeros(1 if rank == 0 else 4, 3)
    mesh = init_device_mesh("cpu", (world,))
    layer.weight = nn.Parameter(
        DTensor.from_local(local, mesh, [Shard(0)], run_check=False, shape=(5, 3), stride=(3, 1))
    )
    errors["rows"] = raised(
        lambda: check_layout("odd.weight", layer.weight, Mesh(layer), whole_rows=True)
    )
    return errors


def worker(rank: int, world: int, init: str, out: str) -> None:
    torch.set_num_threads(1)  # W processes share the CI machine's cores
    dist.init_process_group(
        "gloo", init_method=init, rank=rank, world_size=world, timeout=timedelta(seconds=60)
    )
    global GLOO_AVERAGES
    GLOO_AVERAGES = gloo_averages(rank, world)
    counts: Counter = Counter()
    real = {name: getattr(dist, name) for name in COLLECTIVES if hasattr(dist, name)}

    def counting(name: str):
        def call(*args: object, **kwargs: object) -> object:
            counts[name] += 1
            return real[name](*args, **kwargs)

        return call

    for name in real:
        setattr(dist, name, counting(name))
    try:
        results: dict[str, object] = {}
        x, y = data()[0]
        rows = part(rank, world)
        for mode, uniform in SETTINGS:
            model = shard(make_model())
            ys = {t: v[rows] for t, v in y.items()}
            results[f"step-{mode}-{uniform}"] = one_step(model, x[rows], ys, mode, uniform)
        for train_mode in (False, True):
            model = shard(make_model())
            cs, steps = train(model, rank, world, train_mode, counts)
            results[f"train-{train_mode}"] = {**state(model, cs), "steps": steps}
        if world == 2:
            results["errors"] = bad_inputs(rank, world)
        results["gloo_averages"] = GLOO_AVERAGES
        torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    finally:
        for name, fn in real.items():
            setattr(dist, name, fn)
        dist.destroy_process_group()


RUNS: dict[int, list[dict]] = {}


def run(world: int) -> list[dict]:
    """What each rank saw, from one spawn of ``world`` processes (cached for the module)."""
    if world not in RUNS:
        with tempfile.TemporaryDirectory() as tmp:
            init = f"file://{Path(tmp) / 'store'}"
            mp.spawn(worker, args=(world, init, tmp), nprocs=world, join=True)
            RUNS[world] = [
                torch.load(Path(tmp) / f"rank{r}.pt", weights_only=False) for r in range(world)
            ]
    return RUNS[world]


def reference_step(mode: str, uniform: str) -> dict[str, Tensor]:
    x, y = data()[0]
    return one_step(make_model(), x, y, mode, uniform)


@pytest.fixture(scope="module", params=[2, 3], ids=lambda w: f"{w}-ranks")
def ranks(request: pytest.FixtureRequest) -> list[dict]:
    return run(request.param)


def test_phase2_step_equals_one_process(ranks: list[dict]) -> None:
    uniform_matters = False
    for mode, uniform in SETTINGS:
        key = f"step-{mode}-{uniform}"
        want = reference_step(mode, uniform)
        for rank, result in enumerate(ranks):
            got = result[key]
            assert torch.equal(got["top"], want["top"]), (key, rank)
            assert set(got) == set(want), (key, rank)
            for name, value in want.items():
                torch.testing.assert_close(
                    got[name], value, rtol=1e-5, atol=1e-7, msg=f"{key} rank {rank}: {name}"
                )
        if uniform == "sum":
            projected = reference_step(mode, "project")
            uniform_matters |= not torch.allclose(want["conv1.weight"], projected["conv1.weight"])
    # conv1 is not uniform, yet a rank's own rows may be: the rule must look at every rank
    assert not uniform_matters
    top = ranks[0]["step-group-sum"]["top"]
    assert top[:5].tolist() == [0, 0, 0, 1, 0]


def test_training_matches_one_process_and_ranks_agree(ranks: list[dict]) -> None:
    world = len(ranks)
    single = make_model()
    cs = train(single, 0, 1, train_mode=False, counts=Counter())[0]
    want = state(single, cs)
    for train_mode in (False, True):
        first = ranks[0][f"train-{train_mode}"]
        phase1, phase2 = first["phases"]
        assert phase1 > 0 and phase2 > 0
        for other in ranks[1:]:
            got = other[f"train-{train_mode}"]
            for part_name in ("params", "buffers"):
                for name, value in first[part_name].items():
                    assert torch.equal(value, got[part_name][name]), (train_mode, name)
            assert torch.equal(first["telemetry"], got["telemetry"])
            for (phase, _, stats), (_, _, other_stats) in zip(
                first["steps"], got["steps"], strict=True
            ):
                assert torch.equal(stats, other_stats), (train_mode, phase)
        for phase, count, _ in first["steps"]:
            # FSDP2: a reduce-scatter per FSDP group (3) and task; ours: one all-reduce
            assert count.get("all_reduce", 0) == 1, (phase, count)
            reduce_scatters = sum(count.get(name, 0) for name in REDUCE_SCATTERS)
            assert reduce_scatters == 3 * len(TASKS), (phase, count)
    trained = ranks[0]["train-False"]
    assert trained["phases"] == want["phases"]
    for name, value in want["params"].items():
        torch.testing.assert_close(trained["params"][name], value, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(trained["telemetry"], want["telemetry"])
    start = make_model().state_dict()
    assert not torch.allclose(start["conv1.weight"], want["params"]["conv1.weight"], atol=1e-3)
    assert world in (2, 3)


def test_bad_input_raises_on_every_rank() -> None:
    for rank, result in enumerate(run(2)):  # the checks run in the 2-rank spawn
        errors = result["errors"]
        assert "ranks disagree on tasks" in errors["tasks"], (rank, errors["tasks"])
        assert "ranks disagree on the connections" in errors["connections"], rank
        assert "conv1.weight" in errors["dim1"] and "Shard(dim=1)" in errors["dim1"], errors
        assert "parameter conv2.weight is not sharded" in errors["unsharded"], errors["unsharded"]
        assert "mixes DistributedDataParallel and FSDP2" in errors["ddp"], errors["ddp"]
        assert "odd.weight" in errors["rows"] and "whole channels" in errors["rows"], errors
