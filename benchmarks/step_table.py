"""Whole training step on the dense multi-task model: time, peak memory and Phase 2's share.

The model is `python/mtl/models/dense.DenseMultiTaskNet` (a ResNet-18 or ResNet-50 backbone at
full width, converted with `cs_kernels.task_norms`, and one dense head per task), trained on
one fixed random batch with SGD (momentum 0.9). For each backbone and task count ``T`` it
times one training step of every method:

========================  ==================================================================
``gd``                    T forwards (one per task, each with its own norms), one backward of
                          the summed loss, one optimizer step
``per-task backward``     T forward + backward passes accumulating into ``.grad``, one step:
                          the least any method that needs per-task gradients must do
``ours phase 1``          `ConnectionStrength.phase1_step`: T x (forward, backward, step)
``ours phase 2``          `ConnectionStrength.collect` (per-task backward into the zero-copy
                          ``[T, N]`` buffer), `combine` (strength, priority, projection in one
                          call), one optimizer step
``authors' phase 2``      per task: forward, backward, a clone of every shared ``.grad``; then
                          strength and priority layer by layer in Python, the authors'-style
                          loop (`cs_kernels.baseline_loop`), the result written back to
                          ``.grad``, one step
``pcgrad/upgrad/cagrad``  per task: forward, backward, its shared ``.grad`` copied into a
                          ``[T, N]`` Jacobian; torchjd 0.18's aggregator; the result written
                          back; one step (task-specific parameters keep their own gradient)
========================  ==================================================================

Columns: ``ms`` (median wall time of a step, with the fastest and slowest), ``x backward``
(time over the per-task backward step of the same configuration), ``CPU ms`` (the process's
CPU time per step, all threads: less disturbed by other work on a shared machine than the
wall time), ``combine ms`` and ``share`` (the time
a step spends outside forward, backward and the optimizer: copying and combining the per-task
gradients; for ours, the `combine` call), ``floor ms`` (``torch.sum`` over the ``[T, N]``
buffer, the least a Phase 2 must cost, same process), ``peak MB`` and ``extra MB`` (peak
over the per-task backward step's), against ``T·N MB`` (the buffer's size).

Memory. Each (backbone, T, method) runs in a fresh Python process, so peaks do not mix. On a
CPU the peak is the process's maximum resident set size (``getrusage`` ``ru_maxrss``): torch
allocates CPU tensors with the C allocator, and the resident high-water mark includes the
interpreter and libraries (the same for every method, so differences between methods are
what matters: ``extra MB``). On CUDA it is ``torch.cuda.max_memory_allocated``.

Usage (from the repository root)::

    .venv/bin/python benchmarks/step_table.py --save     # both backbones, T = 3 and 5
    .venv/bin/python benchmarks/step_table.py --quick    # ResNet-18 at half width, T = 3
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "python"))
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

from phase2_table import git  # noqa: E402

import cs_kernels as ck  # noqa: E402
from cs_kernels._device import device_name  # noqa: E402
from cs_kernels.baseline_loop import authors_style_phase2  # noqa: E402

RESULTS_DIR = ROOT / "benchmarks" / "results"
METHODS = (
    "gd",
    "per-task backward",
    "ours phase 1",
    "ours phase 2",
    "authors' phase 2",
    "pcgrad",
    "upgrad",
    "cagrad",
)
TORCHJD = {"pcgrad", "upgrad", "cagrad"}
TASK_NAMES = ("seg", "depth", "normal", "edge", "parts")  # PASCAL-Context's five, roughly
EXTRA_KINDS = {"edge": "segment", "parts": "segment"}
NUM_CLASSES = 13
BACKWARD = "per-task backward"
OURS = "ours phase 2"

StepFn = Callable[[], float]  # runs one step, returns the seconds spent combining


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------ the worker


def build(args: argparse.Namespace, device: torch.device):  # type: ignore[no-untyped-def]
    from mtl.models.dense import DenseMultiTaskNet, dense_loss, random_batch

    tasks = list(TASK_NAMES[: args.tasks])
    torch.manual_seed(args.seed)
    model = DenseMultiTaskNet(
        tasks,
        num_classes=NUM_CLASSES,
        backbone=args.backbone,
        width=args.width,
        head_width=args.head_width,
        kinds=EXTRA_KINDS,
    ).to(device)
    x, targets = random_batch(args.batch, args.size, NUM_CLASSES, model.kinds, seed=args.seed)
    x, targets = x.to(device), {t: v.to(device) for t, v in targets.items()}

    def loss_fn(task: str) -> Tensor:
        return dense_loss(model.kinds[task], model(x, task), targets[task])

    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    return model, tasks, x, loss_fn, optimizer


@dataclass
class Setup:
    """One method ready to time: ``step()`` runs a training step and returns the seconds it
    spent combining gradients; ``facts`` go into the table's row."""

    step: StepFn
    facts: dict[str, object]
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer


def make_step(method: str, args: argparse.Namespace, device: torch.device) -> Setup:
    """Build the model, batch and optimizer (from ``args.seed``) and the step of ``method``."""
    model, tasks, x, loss_fn, optimizer = build(args, device)
    shared = model.shared_parameters()
    numel = sum(p.numel() for p in shared)
    facts: dict[str, object] = {"N": numel}

    def clock() -> float:
        synchronize(device)
        return time.perf_counter()

    if method == "gd":

        def step() -> float:
            optimizer.zero_grad(set_to_none=True)
            torch.stack([loss_fn(t) for t in tasks]).sum().backward()
            optimizer.step()
            return 0.0

        return Setup(step, facts, model, optimizer)

    if method == BACKWARD:

        def step() -> float:
            optimizer.zero_grad(set_to_none=True)
            for t in tasks:
                loss_fn(t).backward()
            optimizer.step()
            return 0.0

        return Setup(step, facts, model, optimizer)

    if method.startswith("ours"):
        cs = ck.ConnectionStrength(model, tasks, x)
        facts["connections"] = len(cs.connections)
        facts["coverage"] = sum(c.weight.numel() for c in cs.connections) / cs.plan.numel
        facts["backend"] = ck.available_backends(device)[0]
        if method == "ours phase 1":

            def step() -> float:
                cs.phase1_step(optimizer, loss_fn)
                return 0.0

            return Setup(step, facts, model, optimizer)

        def step() -> float:
            cs.collect(loss_fn)
            start = clock()
            top = cs.combine()
            cs.telemetry.record(top, 0)
            seconds = clock() - start
            optimizer.step()
            return seconds

        def floor() -> float:
            out = torch.empty_like(cs.buffer.out)
            times = []
            for _ in range(7):
                start = clock()
                torch.sum(cs.buffer.grads, 0, out=out)
                times.append(clock() - start)
            return statistics.median(times)

        facts["floor"] = floor
        return Setup(step, facts, model, optimizer)

    shared_ids = {id(p) for p in shared}
    rows = len(tasks)
    if method == "authors' phase 2":
        connections = ck.discover_connections(model, tasks, x)
        connected = {id(c.weight) for c in connections}
        plan = ck.Phase2Plan.from_shapes(
            [tuple(p.shape) for p in shared], [id(p) in connected for p in shared]
        )

        def priorities() -> Tensor:  # layer by layer, as the authors' code does
            tops = []
            for conn in connections:
                rows_sq = conn.weight.detach().flatten(1).square().sum(dim=1)
                strengths = []
                for t in tasks:
                    bn = conn.links[t].module
                    strengths.append(rows_sq * bn.weight.detach() ** 2 / (bn.running_var + bn.eps))
                s = torch.stack(strengths)
                tops.append((s / s.sum(dim=1, keepdim=True)).argmax(dim=0))
            return torch.cat(tops)

        def step() -> float:
            optimizer.zero_grad(set_to_none=True)
            copies: list[list[Tensor]] = []
            seconds = 0.0
            for t in tasks:
                loss_fn(t).backward()
                start = clock()
                copies.append([p.grad.clone() for p in shared])  # type: ignore[union-attr]
                for p in shared:
                    p.grad = None
                seconds += clock() - start
            start = clock()
            with torch.no_grad():
                grads = torch.stack([torch.cat([g.flatten() for g in c]) for c in copies])
                out = authors_style_phase2(grads, plan, priorities())
                offset = 0
                for p in shared:
                    p.grad = out[offset : offset + p.numel()].view_as(p)
                    offset += p.numel()
            seconds += clock() - start
            optimizer.step()
            return seconds

        return Setup(step, facts, model, optimizer)

    if method in TORCHJD:
        from torchjd.aggregation import CAGrad, PCGrad, UPGrad

        aggregator = {"pcgrad": PCGrad, "upgrad": UPGrad, "cagrad": lambda: CAGrad(c=0.4)}[method]()
        jacobian = torch.zeros(rows, numel, device=device)
        assert all(id(p) in shared_ids for p in shared)

        def step() -> float:
            optimizer.zero_grad(set_to_none=True)
            seconds = 0.0
            for row, t in enumerate(tasks):
                loss_fn(t).backward()
                start = clock()
                offset = 0
                for p in shared:
                    n = p.numel()
                    jacobian[row, offset : offset + n].copy_(p.grad.reshape(-1))  # type: ignore[union-attr]
                    p.grad = None
                    offset += n
                seconds += clock() - start
            start = clock()
            combined = aggregator(jacobian)
            offset = 0
            for p in shared:
                p.grad = combined[offset : offset + p.numel()].view_as(p).clone()
                offset += p.numel()
            seconds += clock() - start
            optimizer.step()
            return seconds

        return Setup(step, facts, model, optimizer)
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    # ru_maxrss is in KiB on Linux (bytes on macOS)
    scale = 1 if sys.platform == "darwin" else 1024
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale)


def worker(args: argparse.Namespace) -> dict[str, object]:
    """Time ``args.method`` on one configuration in this (fresh) process."""
    device = torch.device(args.device)
    try:
        setup = make_step(args.method, args, device)
    except ImportError as exc:  # an optional package of a baseline (torchjd, quadprog)
        return {"method": args.method, "skipped": f"{type(exc).__name__}: {exc}"}
    step, facts = setup.step, setup.facts
    for _ in range(args.warmup):
        step()
    totals, cpu, combines = [], [], []
    for _ in range(args.repeats):
        synchronize(device)
        start, start_cpu = time.perf_counter(), time.process_time()
        combine = step()
        synchronize(device)
        totals.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
        combines.append(combine)
    floor = facts.pop("floor", None)
    row: dict[str, object] = {
        "backbone": args.backbone,
        "tasks": args.tasks,
        "method": args.method,
        **facts,
        "ms": 1e3 * statistics.median(totals),
        "times_ms": [1e3 * t for t in totals],
        "cpu_ms": 1e3 * statistics.median(cpu),  # CPU time of all threads: steadier under load
        "combine_ms": 1e3 * statistics.median(combines) if any(combines) else None,
        "peak_bytes": peak_bytes(device),
        "floor_ms": 1e3 * floor() if callable(floor) else None,
    }
    return row


# ------------------------------------------------------------------------------ the driver


def run_worker(args: argparse.Namespace, backbone: str, tasks: int, method: str) -> dict:  # type: ignore[type-arg]
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        "--backbone",
        backbone,
        "--tasks",
        str(tasks),
        "--method",
        method,
        *(f"--{k.replace('_', '-')}={v}" for k, v in worker_options(args).items()),
    ]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{result.stderr[-4000:]}")
    out: dict = json.loads(result.stdout.strip().splitlines()[-1])  # type: ignore[type-arg]
    return out


def worker_options(args: argparse.Namespace) -> dict[str, object]:
    keys = ("device", "batch", "size", "width", "head_width", "warmup", "repeats", "seed")
    return {k: getattr(args, k) for k in keys if getattr(args, k) is not None}


def derive(rows: list[dict]) -> None:  # type: ignore[type-arg]
    """Add the ratios to the per-task backward step of the same configuration (rows of a
    configuration whose backward step is not measured yet get none)."""
    for row in rows:
        base = next(
            (
                r
                for r in rows
                if r["backbone"] == row["backbone"]
                and r["tasks"] == row["tasks"]
                and r["method"] == BACKWARD
            ),
            None,
        )
        row["share"] = None if row["combine_ms"] is None else row["combine_ms"] / row["ms"]
        row["buffer_bytes"] = row["tasks"] * row["N"] * 4
        row["x_backward"] = None if base is None else row["ms"] / base["ms"]
        row["extra_bytes"] = None if base is None else row["peak_bytes"] - base["peak_bytes"]


def markdown(rows: Sequence[dict]) -> str:  # type: ignore[type-arg]
    mb = 2.0**20
    lines = [
        "| backbone | N | T | method | ms / step (min-max) | x backward | CPU ms | combine ms "
        "| share | peak MB | extra MB | T·N MB |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        combine = "-" if r["combine_ms"] is None else f"{r['combine_ms']:.1f}"
        share = "-" if r["share"] is None else f"{100 * r['share']:.1f}%"
        lo, hi = min(r["times_ms"]), max(r["times_ms"])
        extra = None if r["extra_bytes"] is None else r["extra_bytes"] / mb
        lines.append(
            f"| {r['backbone']} | {r['N']:,} | {r['tasks']} | {r['method']} "
            f"| {r['ms']:.0f} ({lo:.0f}-{hi:.0f}) | {_num(r['x_backward'], '.2f')} "
            f"| {r['cpu_ms']:.0f} | {combine} | {share} "
            f"| {r['peak_bytes'] / mb:.0f} | {_num(extra, '+.0f')} "
            f"| {r['buffer_bytes'] / mb:.0f} |"
        )
    return "\n".join(lines)


def _num(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def verdicts(rows: Sequence[dict]) -> list[str]:  # type: ignore[type-arg]
    out = []
    for r in rows:
        if r["method"] != OURS or r["x_backward"] is None:
            continue
        where = f"{r['backbone']}, T = {r['tasks']}"
        floor = f"{r['combine_ms'] / r['floor_ms']:.1f}x the floor" if r["floor_ms"] else ""
        out.append(
            f"{where}: Phase 2 share {100 * r['share']:.1f}% (target <= 5% at ResNet-50; "
            f"combine {r['combine_ms']:.1f} ms, {floor}); step {r['x_backward']:.2f}x the "
            f"per-task backward step (target <= 1.2); extra memory "
            f"{r['extra_bytes'] / r['buffer_bytes']:.2f}x the T·N buffer (target <= 1)"
        )
    return out


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backbones", nargs="+", default=["resnet18", "resnet50"])
    p.add_argument("--task-counts", nargs="+", type=int, default=[3, 5])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--batch", type=int, default=None, help="default 8 on CPU, 32 on CUDA")
    p.add_argument("--size", type=int, default=None, help="default 64 on CPU, 128 on CUDA")
    p.add_argument("--width", type=int, default=None, help="backbone width (default 64)")
    p.add_argument("--head-width", type=int, default=64)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="ResNet-18 at width 32, T = 3, 2 steps")
    p.add_argument("--save", action="store_true", help="write benchmarks/results/*-step.json")
    # internal: one measurement in this process
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--backbone", default="resnet18", help=argparse.SUPPRESS)
    p.add_argument("--tasks", type=int, default=3, help=argparse.SUPPRESS)
    p.add_argument("--method", default=OURS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    cuda = args.device.startswith("cuda")
    args.batch = args.batch or (32 if cuda else 8)
    args.size = args.size or (128 if cuda else 64)
    if args.quick:
        args.backbones, args.task_counts = ["resnet18"], [3]
        args.width, args.warmup, args.repeats = 32, 1, 2
    if max(args.task_counts) > len(TASK_NAMES) or min(args.task_counts) < 2:
        p.error(f"--task-counts must lie in 2..{len(TASK_NAMES)}")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return
    device = torch.device(args.device)
    when = dt.datetime.now()
    load_start = os.getloadavg()[0]
    print(
        f"# {device_name(device)}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"batch {args.batch} x {args.size}x{args.size}, load {load_start:.2f}",
        file=sys.stderr,
    )
    args.git = {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain"))}
    rows, skipped = [], {}
    for backbone in args.backbones:
        for tasks in args.task_counts:
            for method in args.methods:
                start = time.perf_counter()
                row = run_worker(args, backbone, tasks, method)
                if "skipped" in row:
                    skipped[method] = row["skipped"]
                    print(f"{method}: not run ({row['skipped']})", file=sys.stderr)
                    continue
                rows.append(row)
                print(
                    f"{backbone} T={tasks} {method}: {rows[-1]['ms']:.0f} ms/step "
                    f"({time.perf_counter() - start:.0f} s)",
                    file=sys.stderr,
                )
                derive(rows)
                if args.save:
                    save(rows, skipped, args, device, when, load_start)
    print(markdown(rows))
    for line in verdicts(rows):
        print(f"- {line}")
    for method, why in skipped.items():
        print(f"- {method}: not run ({why})")
    if args.save:
        print(f"saved {save(rows, skipped, args, device, when, load_start)}", file=sys.stderr)


def save(
    rows: list[dict],  # type: ignore[type-arg]
    skipped: dict[str, str],
    args: argparse.Namespace,
    device: torch.device,
    when: dt.datetime,
    load_start: float,
) -> Path:
    """Write ``benchmarks/results/<device>-<date>-step.json`` (after every row: a run cut
    short keeps what it measured)."""
    payload = {
        "device": device_name(device),
        "device_type": device.type,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "git_commit": args.git["commit"],  # at the start: the JSON itself dirties the tree
        "git_dirty": args.git["dirty"],
        "load_average_1min": {"start": load_start, "end": os.getloadavg()[0]},
        "date": when.isoformat(timespec="seconds"),
        "memory": "cuda max_memory_allocated" if device.type == "cuda" else "ru_maxrss",
        "config": {k: v for k, v in vars(args).items() if k not in ("save", "worker", "git")},
        "rows": rows,
        "skipped": skipped,
    }
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-")
    path = RESULTS_DIR / f"{slug}-{when:%Y-%m-%d}-step.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path.relative_to(ROOT)


if __name__ == "__main__":
    main()
