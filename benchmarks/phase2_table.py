"""Phase 2 timing table: every backend against the floor and the authors'-style loop.

For each backbone plan (`cs_kernels.model_shapes`) and task count ``T`` this script builds
random per-task gradients ``grads: [T, N]`` and random connection strengths, computes the
top-priority tasks once, and times, in the same run on the same device:

* the floor, ``torch.sum(grads, 0, out=out)`` (ALGORITHM.md, "Cost floor");
* ``cs_kernels.phase2`` for every available backend except ``reference``, in each mode;
* the authors'-style loop (`cs_kernels.baseline_loop.authors_style_phase2`, group mode).

Each time is the median of ``--repeats`` wall times after warming up (at least one call,
and at least ``--warmup-seconds``). A call whose first run takes longer than
``--slow-seconds`` is timed only ``--slow-repeats`` times (on CPU: the ``torch`` backend
and the authors' loop), so the default run stays within a few minutes.

Usage (from the repository root)::

    .venv/bin/python benchmarks/phase2_table.py             # full table
    .venv/bin/python benchmarks/phase2_table.py --quick     # resnet18, T=2, a few seconds
    .venv/bin/python benchmarks/phase2_table.py --save      # also write benchmarks/results/
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

import cs_kernels
from cs_kernels.baseline_loop import authors_style_phase2
from cs_kernels.model_shapes import MODELS, model_plan
from cs_kernels.plan import Phase2Plan

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "benchmarks" / "results"
DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
MODES = ("group", "channel")
EXCLUDED_BACKENDS = ("reference",)  # a per-channel Python loop: far too slow at this size
FLOOR = "floor (torch.sum)"
AUTHORS = "authors' loop"
QUICK = {"models": ["resnet18"], "tasks": [2], "repeats": 3, "slow_repeats": 1}
DEFAULTS = {"models": list(MODELS), "tasks": [2, 3, 5], "repeats": 7, "slow_repeats": 3}


@dataclass
class Row:
    """One line of the table: one timed callable on one (model, T) workload."""

    model: str
    numel: int
    tasks: int
    mode: str
    backend: str
    ms: float
    gb_per_s: float  # the floor's traffic, (T + 1) * N elements, divided by this time
    x_floor: float
    speedup_vs_authors: float | None
    times_ms: list[float] = field(default_factory=list)


class Case(NamedTuple):
    """One timed callable: the floor, the authors' loop, or one backend in one mode."""

    mode: str
    backend: str
    call: Callable[[], object]


@dataclass
class Workload:
    """The buffers of one (model, T) configuration; ``top`` is computed once."""

    model: str
    plan: Phase2Plan
    grads: Tensor
    top: Tensor
    out: Tensor


# --------------------------------------------------------------------------- environment


def synchronize(device: torch.device) -> None:
    """Wait for queued work on ``device`` (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type != "cpu":
        sync = getattr(getattr(torch, device.type, None), "synchronize", None)
        if sync is not None:
            sync()


def device_name(device: torch.device) -> str:
    """A human-readable name: the GPU model, or the CPU model from /proc/cpuinfo."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def slugify(text: str) -> str:
    """``"AMD EPYC 7B13"`` -> ``"amd-epyc-7b13"``."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "device"


def git(*args: str) -> str | None:
    """Output of ``git <args>`` in the repository, or None when git fails."""
    try:
        result = subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, check=True
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return result.stdout.strip()


def load_average() -> float | None:
    """The 1-minute load average (other work on the machine skews every time)."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


# ------------------------------------------------------------------------------ timing


def time_call(
    fn: Callable[[], object],
    device: torch.device,
    args: argparse.Namespace,
) -> list[float]:
    """Wall times in ms of ``args.repeats`` calls of ``fn()``, after warming up.

    Warm-up repeats the call until ``args.warmup_seconds`` have passed (at least once): a
    few calls are not enough for a memory-bound kernel of a few ms to reach steady speed.
    A call whose first run takes longer than ``args.slow_seconds`` is timed only
    ``args.slow_repeats`` times.
    """
    synchronize(device)
    begin = time.perf_counter()
    fn()
    synchronize(device)
    first = time.perf_counter() - begin
    while time.perf_counter() - begin < args.warmup_seconds:
        fn()
        synchronize(device)
    repeats = args.repeats if first <= args.slow_seconds else min(args.repeats, args.slow_repeats)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return times


# ---------------------------------------------------------------------------- workload


def make_workload(
    model: str, tasks: int, dtype: torch.dtype, device: torch.device, seed: int
) -> Workload:
    """Seeded random gradients ``[T, N]``, strengths ``[T, C]`` and their top tasks."""
    plan = model_plan(model)
    gen = torch.Generator(device=device).manual_seed(seed)
    grads = torch.randn(tasks, plan.numel, generator=gen, dtype=dtype, device=device)
    strength = torch.rand(tasks, plan.total_channels, generator=gen, device=device)
    top = cs_kernels.plan_top_priority(strength, plan)
    out = torch.empty(plan.numel, dtype=dtype, device=device)
    return Workload(model, plan, grads, top, out)


def cases(work: Workload, backends: Sequence[str], modes: Sequence[str]) -> list[Case]:
    """The floor first, then the authors' loop, then every backend in every mode."""
    grads, plan, top, out = work.grads, work.plan, work.top, work.out
    found = [
        Case("-", FLOOR, partial(torch.sum, grads, 0, out=out)),
        Case("group", AUTHORS, partial(authors_style_phase2, grads, plan, top)),
    ]
    for mode in modes:
        for backend in backends:
            call = partial(
                cs_kernels.phase2,
                grads,
                plan,
                top=top,
                mode=mode,
                out=out,
                backend=backend,
                check=False,
            )
            found.append(Case(mode, backend, call))
    return found


def bench_workload(
    work: Workload, backends: Sequence[str], modes: Sequence[str], args: argparse.Namespace
) -> list[Row]:
    """Time every candidate on one workload; ratios use this run's floor and authors' loop."""
    device = work.grads.device
    timed = []
    for case in cases(work, backends, modes):
        times = time_call(case.call, device, args)
        timed.append((case.mode, case.backend, statistics.median(times), times))
    floor_ms, authors_ms = timed[0][2], timed[1][2]
    tasks, numel = work.grads.shape
    floor_bytes = (tasks + 1) * numel * work.grads.element_size()
    return [
        Row(
            model=work.model,
            numel=numel,
            tasks=tasks,
            mode=mode,
            backend=backend,
            ms=ms,
            gb_per_s=floor_bytes / (ms * 1e6),
            x_floor=ms / floor_ms,
            speedup_vs_authors=None if backend == AUTHORS else authors_ms / ms,
            times_ms=times,
        )
        for mode, backend, ms, times in timed
    ]


# ------------------------------------------------------------------------------ output


def header(device: torch.device, when: dt.datetime) -> str:
    """One line naming the device, thread count, torch version and date."""
    return (
        f"Device: {device_name(device)} ({device.type}, {torch.get_num_threads()} threads) | "
        f"torch {torch.__version__} | {when:%Y-%m-%d %H:%M}"
    )


def markdown_table(rows: Sequence[Row]) -> str:
    """The rows as a markdown table."""
    lines = [
        "| model | N | T | mode | backend | ms | GB/s | x floor | speedup vs authors' loop |",
        "|---|---:|---:|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        speedup = "-" if r.speedup_vs_authors is None else f"{r.speedup_vs_authors:.1f}"
        lines.append(
            f"| {r.model} | {r.numel:,} | {r.tasks} | {r.mode} | {r.backend} | "
            f"{r.ms:.2f} | {r.gb_per_s:.1f} | {r.x_floor:.2f} | {speedup} |"
        )
    return "\n".join(lines)


def save_json(
    rows: Sequence[Row],
    device: torch.device,
    when: dt.datetime,
    args: argparse.Namespace,
    loads: tuple[float | None, float | None],
) -> Path:
    """Write ``benchmarks/results/<device-slug>-<date>.json`` and return its path."""
    name = device_name(device)
    payload = {
        "device": name,
        "device_type": device.type,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "git_commit": git("rev-parse", "HEAD") or None,
        "git_dirty": None if (status := git("status", "--porcelain")) is None else bool(status),
        "load_average_1min": {"start": loads[0], "end": loads[1]},
        "date": when.isoformat(timespec="seconds"),
        "config": {k: v for k, v in vars(args).items() if k != "save"},
        "rows": [asdict(r) for r in rows],
    }
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{slugify(name)}-{when:%Y-%m-%d}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


# -------------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options; unset ones take the full-run (or ``--quick``) defaults."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", choices=list(MODELS))
    p.add_argument("--tasks", nargs="+", type=int, help="task counts T (default 2 3 5)")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--dtype", choices=list(DTYPES), default="float32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, help="timed calls per case (default 7)")
    p.add_argument("--slow-repeats", type=int, help="timed calls of a slow case (default 3)")
    p.add_argument(
        "--slow-seconds",
        type=float,
        default=0.1,
        help="a case whose warm-up call takes longer than this is slow (default 0.1 s)",
    )
    p.add_argument(
        "--warmup-seconds",
        type=float,
        default=0.25,
        help="keep calling before timing until this long has passed (default 0.25 s)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="resnet18, T=2, 3 repeats")
    p.add_argument("--save", action="store_true", help="write benchmarks/results/*.json")
    args = p.parse_args(argv)
    for key, value in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    backends = [b for b in cs_kernels.available_backends(device) if b not in EXCLUDED_BACKENDS]
    when = dt.datetime.now().astimezone()
    load_start = load_average()
    rows: list[Row] = []
    with torch.inference_mode():
        for model in args.models:
            for tasks in args.tasks:
                print(f"[bench] {model} T={tasks} ...", file=sys.stderr, flush=True)
                work = make_workload(model, tasks, dtype, device, args.seed)
                rows.extend(bench_workload(work, backends, args.modes, args))
                del work  # free the [T, N] buffers before the next configuration
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    loads = (load_start, load_average())
    print(header(device, when))
    print(
        f"dtype {args.dtype}; median of {args.repeats} calls ({args.slow_repeats} if slow); "
        f"1-min load average {loads[0]} at start, {loads[1]} at end"
    )
    print()
    print(markdown_table(rows))
    if args.save:
        print(f"\nsaved {save_json(rows, device, when, args, loads).relative_to(ROOT)}")


if __name__ == "__main__":
    main()
