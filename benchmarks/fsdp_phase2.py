"""Sharded Phase 2 (FSDP2) against DDP: bytes communicated and peak memory per Phase 2 step.

A multi-task ResNet-50 (every BatchNorm one per task, one head per task: the shared
parameters are the 53 convs, N = 23,454,912) trains with ``ConnectionStrength`` on ``W``
gloo processes of this machine, wrapped in DDP or ``fully_shard``-ed (one FSDP unit per
bottleneck block plus the root). For one Phase 2 step, after a warm-up step, each rank
records:

* every collective call (kind, elements) by wrapping ``torch.distributed``; the bytes a rank
  sends with ring algorithms follow: all-reduce ``2 (W-1)/W``, reduce-scatter and all-gather
  ``(W-1)/W`` of the full tensor (gloo on a CPU may move more; NCCL moves these);
* the peak resident memory during the step above that before it (Linux's ``VmHWM``; Linux
  only), and the persistent memory the controller holds (``[T, N]`` rows, ``[N]`` result,
  parameters);

for three ways of collecting the per-task gradients:

* ``ddp``: per-task backward under ``no_sync``, one all-reduce of ``[T, N]``;
* ``fsdp``: FSDP2 reduce-scatters every task's gradient into this rank's shard of its row
  (what `ConnectionStrength` does), then one small all-reduce (`ShardedPhase2.combine`);
* ``fsdp-deferred`` (collection only, for the comparison): ``set_requires_gradient_sync
  (False)`` keeps each task's unsharded gradient, moved out into a ``[T, N]`` buffer after
  its backward, then one reduce-scatter of the whole buffer.

It prints the measured figures beside the analytic ones and, with ``--save``, writes them
to ``benchmarks/results/fsdp-<device>-<date>.json``.

Usage (from the repository root)::

    .venv/bin/python benchmarks/fsdp_phase2.py                  # W = 2, T = 3, ResNet-50
    .venv/bin/python benchmarks/fsdp_phase2.py --save
    .venv/bin/python benchmarks/fsdp_phase2.py --model tiny     # seconds: a smoke test
    .venv/bin/python benchmarks/fsdp_phase2.py --steps-only --device cuda  # the steps alone,
        # ResNet-50 x4 (93.8M), one rank's rows of W = 2, every backend (`make gpu-check`)
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime as dt
import json
import os
import re
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import Tensor, nn

from cs_kernels import available_backends
from cs_kernels._device import device_name
from cs_kernels.training import ConnectionStrength

RESULTS = Path(__file__).resolve().parent / "results"
COLLECTIVES = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_single",
    "reduce_scatter_tensor",
    "reduce_scatter_single",
)


# ------------------------------------------------------------------ the model


class TaskNorm(nn.Module):
    """One BatchNorm2d per task (the paper's task-specific connection)."""

    def __init__(self, channels: int, tasks: list[str]) -> None:
        super().__init__()
        self.bn = nn.ModuleDict({t: nn.BatchNorm2d(channels) for t in tasks})

    def forward(self, x: Tensor, task: str) -> Tensor:
        return self.bn[task](x)


class Bottleneck(nn.Module):
    def __init__(self, cin: int, width: int, stride: int, tasks: list[str]) -> None:
        super().__init__()
        cout = width * 4
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = TaskNorm(width, tasks)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = TaskNorm(width, tasks)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = TaskNorm(cout, tasks)
        self.down = None
        self.down_bn = None
        if stride != 1 or cin != cout:
            self.down = nn.Conv2d(cin, cout, 1, stride, bias=False)
            self.down_bn = TaskNorm(cout, tasks)

    def forward(self, x: Tensor, task: str) -> Tensor:
        h = F.relu(self.bn1(self.conv1(x), task))
        h = F.relu(self.bn2(self.conv2(h), task))
        h = self.bn3(self.conv3(h), task)
        skip = x if self.down is None or self.down_bn is None else self.down_bn(self.down(x), task)
        return F.relu(h + skip)


class MultiTaskResNet(nn.Module):
    """ResNet-50 (``blocks=(3, 4, 6, 3)``, ``base=64``) with per-task norms and heads."""

    def __init__(self, tasks: list[str], blocks=(3, 4, 6, 3), base: int = 64) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, base, 7, 2, 3, bias=False)
        self.stem_bn = TaskNorm(base, tasks)
        layers, cin = [], base
        for stage, count in enumerate(blocks):
            width = base * 2**stage
            for i in range(count):
                layers.append(Bottleneck(cin, width, 2 if i == 0 and stage > 0 else 1, tasks))
                cin = width * 4
        self.blocks = nn.ModuleList(layers)
        self.heads = nn.ModuleDict({t: nn.Linear(cin, 10) for t in tasks})

    def forward(self, x: Tensor, task: str) -> Tensor:
        h = F.max_pool2d(F.relu(self.stem_bn(self.stem(x), task)), 3, 2, 1)
        for block in self.blocks:
            h = block(h, task)
        return self.heads[task](h.mean(dim=(2, 3)))


def build(model_name: str, tasks: list[str]) -> MultiTaskResNet:
    torch.manual_seed(0)
    if model_name == "tiny":
        return MultiTaskResNet(tasks, blocks=(1, 1), base=4)
    return MultiTaskResNet(tasks)


# ------------------------------------------------------------------ measuring


class Counter:
    """Wraps torch.distributed collectives: one (kind, elements, element size) per call."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, int]] = []
        self.real = {n: getattr(dist, n) for n in COLLECTIVES if hasattr(dist, n)}
        for name, fn in self.real.items():
            setattr(dist, name, self._wrap(name, fn))

    def _wrap(self, name: str, fn: Callable[..., object]) -> Callable[..., object]:
        def call(*args: object, **kwargs: object) -> object:
            tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, Tensor)]
            lists = [a for a in (*args, *kwargs.values()) if isinstance(a, list)]
            tensors += [t for items in lists for t in items if isinstance(t, Tensor)]
            # the full (unsharded) size: the largest tensor the call names
            big = max(tensors, key=Tensor.numel) if tensors else None
            numel = big.numel() if big is not None else 0
            if name == "all_gather" and lists:
                numel = sum(t.numel() for t in lists[0])
            self.calls.append((name, numel, big.element_size() if big is not None else 0))
            return fn(*args, **kwargs)

        return call

    def restore(self) -> None:
        for name, fn in self.real.items():
            setattr(dist, name, fn)


def wire_bytes(calls: list[tuple[str, int, int]], world: int) -> dict[str, float]:
    """Bytes a rank sends per collective kind with ring algorithms."""
    share = (world - 1) / world
    out: dict[str, float] = {}
    for name, numel, size in calls:
        kind = (
            "all_reduce" if name == "all_reduce" else name.split("_")[0] + "_" + name.split("_")[1]
        )
        factor = 2 * share if name == "all_reduce" else share
        out[kind] = out.get(kind, 0.0) + factor * numel * size
    return out


def _status(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    match = re.search(rf"{field}:\s+(\d+) kB", text)
    assert match is not None, field
    return int(match.group(1)) * 1024


def peak_memory(fn: Callable[[], object]) -> int:
    """Peak resident memory during ``fn()`` above the resident memory before it: Linux's
    high-water mark (``VmHWM``), reset first through ``/proc/self/clear_refs``. The workers
    run with ``MALLOC_MMAP_THRESHOLD_`` low, so freed tensors leave the resident set at
    once and the mark follows the live allocations (FSDP2 frees its all-gather buffers by
    resizing their storage, which profilers do not see)."""
    Path("/proc/self/clear_refs").write_text("5")
    before = _status("VmRSS")
    fn()
    return _status("VmHWM") - before


def measure(world: int, fn: Callable[[], object]) -> dict[str, object]:
    counter = Counter()
    try:
        peak = peak_memory(fn)
    finally:
        counter.restore()
    calls = counter.calls
    return {
        "peak_bytes": peak,
        "calls": [list(c) for c in calls],
        "wire_bytes": wire_bytes(calls, world),
    }


def unsharded_params(model: nn.Module, names: list[str]) -> list[Tensor]:
    """The unsharded parameter objects FSDP2 puts in the model during forward/backward."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in units:
        m.unshard()
    unsharded = dict(model.named_parameters())
    for m in units:
        m.reshard()
    return [unsharded[n] for n in names]


def deferred_collect(model: nn.Module, shared: list[Tensor], tasks: list[str], loss_fn) -> None:
    """Collection with FSDP2's reduce-scatter deferred: a hook moves every task's unsharded
    gradient of the ``shared`` (unsharded) parameters straight into its place in the input of
    one reduce-scatter, ``[W, T, N / W]`` (FSDP2 would add the tasks together), which then
    gives this rank's ``[T, N / W]``: the least a deferred reduce-scatter must hold."""
    world = dist.get_world_size()
    offsets, total = {}, 0
    for p in shared:
        offsets[id(p)] = total
        total += p.numel()
    chunk = -(-total // world)
    send = torch.zeros(world, len(tasks), chunk)
    row = [0]

    def keep(p: Tensor) -> None:
        if p.grad is None:
            return
        flat, start = p.grad.view(-1), offsets[id(p)]
        position = start
        while position < start + flat.numel():  # the pieces of the rank chunks it spans
            rank, column = divmod(position, chunk)
            length = min(chunk - column, start + flat.numel() - position)
            piece = flat[position - start : position - start + length]
            send[rank, row[0], column : column + length].copy_(piece)
            position += length
        p.grad = None

    handles = [p.register_post_accumulate_grad_hook(keep) for p in shared]
    model.set_requires_gradient_sync(False)  # type: ignore[operator]
    try:
        for t, task in enumerate(tasks):
            row[0] = t
            loss_fn(task).backward()
        out = torch.empty(len(tasks) * chunk)
        dist.reduce_scatter_tensor(out, send.view(-1), op=dist.ReduceOp.SUM)
    finally:
        model.set_requires_gradient_sync(True)  # type: ignore[operator]
        for h in handles:
            h.remove()


def recombine(cs: ConnectionStrength) -> Tensor:
    """``cs.combine()`` once more on the rows already collected: the controller refuses a
    second combine of one collection, and these timings repeat that call on the same rows."""
    cs._collected = True
    return cs.combine()


@contextlib.contextmanager
def ordinary_allocator() -> Iterator[None]:
    """glibc's malloc as a training process has it, for the timings: the workers run with
    ``MALLOC_MMAP_THRESHOLD_`` low for `peak_memory`, which maps (and page-faults) every
    temporary of 64 KiB or more afresh at each call and so charges Phase 2's small
    temporaries a page fault per page, but not the floor, which allocates nothing. Inside,
    temporaries up to 32 MiB come from the heap and freed memory stays there."""
    libc = _glibc()
    if libc is None:
        yield
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 32 << 20)
    libc.mallopt(m_trim_threshold, 64 << 20)
    try:
        yield
    finally:
        libc.mallopt(m_mmap_threshold, int(os.environ.get("MALLOC_MMAP_THRESHOLD_", 128 << 10)))
        libc.mallopt(m_trim_threshold, 128 << 10)


def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") else None
    except OSError:
        return None


def median_ms(fn: Callable[[], object], world: int, repeats: int = 5) -> float:
    """Median wall time of ``fn()`` (the ranks start each call together)."""
    times = []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def spread_ms(times: list[float]) -> dict[str, float]:
    """Median and spread (min, max) of wall times in ms."""
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times)}


def step_timings(cs: ConnectionStrength, world: int, repeats: int) -> dict[str, dict[str, float]]:
    """The sharded Phase 2 of this rank's rows, before (the ``torch`` steps: vectorised
    PyTorch) and after (the fused ``cpu`` steps), beside the floor (``grads.sum(0)`` of the
    same local rows), in interleaved rounds: every round times each variant once, so that a
    burst of load on the machine hits them all alike.

    * ``combine/<backend>``: the whole sharded Phase 2 (`ShardedPhase2.combine`: norms,
      Gram matrices, the all-reduce, priorities, coefficients, projection);
    * ``steps/<backend>``: the two steps alone, ``channel_gram`` then ``apply_projection``
      (coefficients and top tasks fixed, from this rank's Gram matrices);
    * ``steps-fused-sum/<backend>``: the same with the plain sum taken in the Gram pass
      (``channel_gram(out=)``) and the projection onto it (``out_holds_sum=True``).
    """
    from cs_kernels import apply_projection, channel_gram, projection_coefficients

    sharded = cs._sharded
    assert sharded is not None, "the model is not sharded"
    grads, plan, out = cs.buffer.grads, sharded.plan, cs.buffer.out
    top = recombine(cs)[sharded.local_channels]
    coef = projection_coefficients(channel_gram(grads, plan), plan, top, check=False)
    scratch = torch.empty_like(out)
    backends = ["torch", *(["cpu"] if "cpu" in available_backends("cpu") else [])]
    saved = sharded.backend

    def combine(backend: str) -> Callable[[], object]:
        def run() -> None:
            sharded.backend = backend
            recombine(cs)

        return run

    def steps(backend: str, fused_sum: bool) -> Callable[[], object]:
        def run() -> None:
            if fused_sum:
                channel_gram(grads, plan, out=scratch, backend=backend)
            else:
                channel_gram(grads, plan, backend=backend)
            apply_projection(
                grads, plan, top, coef, out=scratch, out_holds_sum=fused_sum, backend=backend,
                check=False,
            )  # fmt: skip

        return run

    variants: dict[str, Callable[[], object]] = {"floor": lambda: torch.sum(grads, 0, out=scratch)}
    for b in backends:
        variants[f"combine/{b}"] = combine(b)
        variants[f"steps/{b}"] = steps(b, False)
        variants[f"steps-fused-sum/{b}"] = steps(b, True)
    times: dict[str, list[float]] = {name: [] for name in variants}
    try:
        with ordinary_allocator():
            for fn in variants.values():  # warm-up
                dist.barrier()
                fn()
            for _ in range(repeats):
                for name, fn in variants.items():
                    dist.barrier()
                    start = time.perf_counter()
                    fn()
                    times[name].append((time.perf_counter() - start) * 1e3)
    finally:
        sharded.backend = saved
    return {name: spread_ms(t) for name, t in times.items()}


def measure_variant(
    variant: str,
    model_name: str,
    tasks: list[str],
    x: Tensor,
    y: dict[str, Tensor],
    repeats: int,
) -> dict[str, object]:
    from torch.distributed.fsdp import fully_shard

    world = dist.get_world_size()
    model = build(model_name, tasks)
    if variant == "ddp":
        wrapped: nn.Module = nn.parallel.DistributedDataParallel(model)
    else:
        for block in model.blocks:
            fully_shard(block)
        wrapped = fully_shard(model)

    def loss_fn(task: str) -> Tensor:
        return F.cross_entropy(wrapped(x, task=task), y[task])

    cs = ConnectionStrength(wrapped, tasks, x)
    cs.phase2_backward(loss_fn)  # warm-up: tables, FSDP2 buffers
    entry = {
        "collect": measure(world, lambda: cs.collect(loss_fn)),
        "combine": measure(world, lambda: recombine(cs)),
        "rows_bytes": cs.buffer.storage.nbytes + cs.buffer.out.nbytes,
        "param_bytes": sum(
            (p.to_local() if hasattr(p, "to_local") else p).nbytes for p in model.parameters()
        ),
        "shared_numel": cs.full_plan.numel,
        "local_numel": cs.plan.numel,
        "channels": cs.full_plan.total_channels,
        "buffer_numel": sum(b.numel() for b in model.buffers() if b.is_floating_point()),
    }
    out = torch.empty_like(cs.buffer.out)
    with ordinary_allocator():
        entry["combine_ms"] = median_ms(lambda: recombine(cs), world)
        entry["floor_ms"] = median_ms(lambda: torch.sum(cs.buffer.grads, 0, out=out), world)
    if variant == "fsdp":
        entry["steps"] = step_timings(cs, world, repeats)
        ids = {id(p) for p in cs.shared_parameters}
        names = [n for n, p in model.named_parameters() if id(p) in ids]
        shared = unsharded_params(model, names)
        deferred_collect(model, shared, tasks, loss_fn)  # warm-up
        entry["deferred"] = measure(world, lambda: deferred_collect(model, shared, tasks, loss_fn))
    return entry


def worker(
    rank: int, world: int, init: str, out: str, model_name: str, ntasks: int, repeats: int
) -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    tasks = [f"task{t}" for t in range(ntasks)]
    size = 32 if model_name != "tiny" else 16
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(2, 3, size, size, generator=gen)
    y = {t: torch.randint(0, 10, (2,), generator=gen) for t in tasks}
    results = {v: measure_variant(v, model_name, tasks, x, y, repeats) for v in ("ddp", "fsdp")}
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


def analytic(world: int, tasks: int, n: int, channels: int, buffers: int) -> dict[str, float]:
    """One Phase 2 step, shared parameters only, fp32: MB a rank sends with ring algorithms,
    and the MB of gradient rows it holds."""
    share = (world - 1) / world
    payload = channels * (1 + 2 * tasks + tasks * (tasks + 1) // 2) + buffers
    mb = 4 / 1e6
    tn = tasks * n * mb
    return {
        "sent, ddp: all-reduce of [T, N]": 2 * share * tn,
        "sent, fsdp: T reduce-scatters of [N]": share * tn,
        "sent, fsdp: 2T all-gathers of the parameters (forward, backward)": 2 * share * tn,
        "sent, ours: all-reduce of C (1 + 2T + T(T+1)/2) + buffers values": 2
        * share
        * payload
        * mb,
        "rows held, ddp: [T, N] + [N]": (tasks + 1) * n * mb,
        "rows held, fsdp: [T, N/W] + [N/W]": (tasks + 1) * n / world * mb,
        "rows held, fsdp deferred: [T, N] unsharded (the reduce-scatter input)": tn,
    }


STEP_MODELS = {"resnet18": 1, "resnet50": 1, "resnet50x4": 4}  # conv shapes, times over


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def steps_only(model: str, tasks: int, world: int, device: torch.device, repeats: int) -> None:
    """The two steps alone, in this process, on one rank's rows of a ``W``-way shard (every
    layer's first ``ceil(C / W)`` channels) of the named backbone's convs: each available
    backend (plain, and with the fused sum), beside the floor, interleaved rounds, synced."""
    from cs_kernels import Phase2Plan, apply_projection, channel_gram, projection_coefficients
    from cs_kernels.model_shapes import resnet18_conv_shapes, resnet50_conv_shapes

    base = resnet18_conv_shapes() if model == "resnet18" else resnet50_conv_shapes()
    shapes = [(-(-s[0] // world), *s[1:]) for s in base * STEP_MODELS[model]]
    plan = Phase2Plan.from_shapes(shapes)
    gen = torch.Generator().manual_seed(0)
    grads = torch.randn(tasks, plan.numel, generator=gen).to(device)
    top = torch.randint(0, tasks, (plan.total_channels,), generator=gen).to(device)
    out = torch.empty(plan.numel, device=device)
    coef = projection_coefficients(channel_gram(grads, plan, backend="torch"), plan, top)
    variants: dict[str, Callable[[], object]] = {"floor": lambda: torch.sum(grads, 0, out=out)}
    for b in available_backends(device):
        if b == "reference":
            continue
        for fused in (False, True):

            def run(b: str = b, fused: bool = fused) -> None:
                channel_gram(grads, plan, out=out if fused else None, backend=b)
                apply_projection(grads, plan, top, coef, out=out, out_holds_sum=fused,
                                 backend=b, check=False)  # fmt: skip

            variants[f"steps{'-fused-sum' if fused else ''}/{b}"] = run
    times: dict[str, list[float]] = {name: [] for name in variants}
    for fn in variants.values():  # warm-up (triton compiles here)
        fn()
    _sync(device)
    for _ in range(repeats):
        for name, fn in variants.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times[name].append((time.perf_counter() - start) * 1e3)
    print(f"steps alone: {model} x{STEP_MODELS[model]} shard 1/{world} (local N = "
          f"{plan.numel:,}), T = {tasks}, fp32, on {device_name(device)}")  # fmt: skip
    floor = statistics.median(times["floor"])
    for name, t in times.items():
        m = spread_ms(t)
        print(f"  {name:24s} {m['median_ms']:9.3f} ms [{m['min_ms']:.3f}, {m['max_ms']:.3f}]"
              f" = {m['median_ms'] / floor:5.2f}x the floor")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--tasks", type=int, default=3)
    parser.add_argument("--model", choices=["resnet50", "tiny"], default="resnet50")
    parser.add_argument("--repeats", type=int, default=9, help="rounds of the step timings")
    parser.add_argument(
        "--steps-only",
        action="store_true",
        help="time the steps alone in this process (no model, no processes)",
    )
    parser.add_argument("--steps-model", choices=sorted(STEP_MODELS), default="resnet50x4")
    parser.add_argument("--device", default="cpu", help="with --steps-only")
    parser.add_argument("--save", action="store_true")
    args = parser.parse_args()
    if args.steps_only:
        steps_only(args.steps_model, args.tasks, args.world, torch.device(args.device),
                   args.repeats)  # fmt: skip
        return
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"  # for the workers: see `peak_memory`
    with tempfile.TemporaryDirectory() as tmp:
        init = f"file://{Path(tmp) / 'store'}"
        mp.spawn(
            worker,
            args=(args.world, init, tmp, args.model, args.tasks, args.repeats),
            nprocs=args.world,
        )
        ranks = [
            torch.load(Path(tmp) / f"rank{r}.pt", weights_only=False) for r in range(args.world)
        ]
    first = ranks[0]["fsdp"]
    model = analytic(
        args.world, args.tasks, first["shared_numel"], first["channels"], first["buffer_numel"]
    )
    mb = 1e6
    where = device_name(torch.device("cpu"))
    print(f"{args.model}, T = {args.tasks}, W = {args.world} gloo processes on {where}")
    print(
        f"shared N = {first['shared_numel']:,}, channels C = {first['channels']:,}, "
        f"buffers {first['buffer_numel']:,}"
    )
    for variant in ("ddp", "fsdp"):
        for rank, result in enumerate(ranks):
            entry = result[variant]
            for step in ("collect", "combine"):
                m = entry[step]
                wire = ", ".join(f"{k} {v / mb:.2f} MB" for k, v in m["wire_bytes"].items())
                print(
                    f"rank {rank} {variant:5s} {step:8s}: peak {m['peak_bytes'] / mb:8.1f} MB; "
                    f"{len(m['calls'])} collectives, sent {wire}"
                )
            print(
                f"rank {rank} {variant:5s} combine {entry['combine_ms']:.1f} ms = "
                f"{entry['combine_ms'] / entry['floor_ms']:.2f}x the floor (grads.sum(0): "
                f"{entry['floor_ms']:.1f} ms)"
            )
            print(
                f"rank {rank} {variant:5s} rows {entry['rows_bytes'] / mb:.1f} MB, "
                f"params {entry['param_bytes'] / mb:.1f} MB, local N {entry['local_numel']:,}"
            )
            if variant == "fsdp":
                steps = entry["steps"]
                floor = steps["floor"]["median_ms"]
                for name, t in steps.items():
                    print(
                        f"rank {rank} fsdp {name:26s} {t['median_ms']:8.2f} ms "
                        f"[{t['min_ms']:.2f}, {t['max_ms']:.2f}] = "
                        f"{t['median_ms'] / floor:5.2f}x the floor"
                    )
                m = entry["deferred"]
                wire = ", ".join(f"{k} {v / mb:.2f} MB" for k, v in m["wire_bytes"].items())
                print(
                    f"rank {rank} fsdp-deferred collect: peak {m['peak_bytes'] / mb:8.1f} MB; "
                    f"{len(m['calls'])} collectives, sent {wire}"
                )
    print("analytic (fp32, ring algorithms; MB):")
    for key, value in model.items():
        print(f"  {key}: {value:,.2f}")
    if args.save:
        stamp = dt.datetime.now(dt.timezone.utc)
        slug = re.sub(r"[^a-z0-9]+", "-", where.lower()).strip("-")
        name = f"fsdp-{slug}-{stamp:%Y-%m-%d}-w{args.world}.json"
        RESULTS.mkdir(exist_ok=True)
        record = {
            "device": device_name(torch.device("cpu")),
            "torch": torch.__version__,
            "date": stamp.isoformat(timespec="minutes"),
            "model": args.model,
            "tasks": args.tasks,
            "world": args.world,
            "repeats": args.repeats,
            "threads_per_rank": max(1, (os.cpu_count() or 2) // args.world),
            "ranks": ranks,
            "analytic": model,
        }
        (RESULTS / name).write_text(json.dumps(record, indent=1, default=float))
        print(f"saved {RESULTS / name}")


if __name__ == "__main__":
    main()
