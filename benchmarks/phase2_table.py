"""Phase 2 timing table: every backend against the floor, the authors'-style loop and
``torch.compile`` of the ``torch`` backend, on a quiet machine or beside busy processes.

For each workload (a backbone plan and a task count ``T``) and dtype, this script builds
random per-task gradients ``grads: [T, N]`` and random connection strengths, computes the
top-priority tasks once, and times, in the same run on the same device:

* the floor, ``torch.sum(grads, 0, out=out)`` (docs/algorithm.md, "Cost floor");
* ``cs_kernels.phase2`` for every available backend except ``reference``, in each mode;
* ``torch.compile`` of ``cs_kernels.phase2(..., backend="torch")`` (GPU default; ``--compiled``);
* the authors'-style loop (`cs_kernels.baseline_loop.authors_style_phase2`, group mode).

Workloads: ResNet-18 (N = 11.2M), ResNet-50 (23.5M) and ResNet-50 x4 (93.8M, "about 100M")
conv shapes. On CUDA the floor and the kernel backends (``triton``, ``cuda``) are timed as
replays of a CUDA graph of one call (``timing = graph``: the GPU time, without Python and
launch overhead), and ``triton`` also eagerly (``timing = eager``); the ``torch`` backend,
the compiled one and the authors' loop are timed eagerly.

Every case of a workload is warmed up (at least one call, and at least
``--warmup-seconds``), then the cases are timed *round-robin*, one call each per round, for
``--repeats`` rounds: the floor and every case see the same moments of a busy machine. A
call whose first run takes longer than ``--slow-seconds`` is timed only in the first
``--slow-repeats`` rounds, and one longer than ``--very-slow-seconds`` by that first run
alone, so the default run stays within a few minutes. Each row reports the median time with
its interquartile range, and its ratio to the floor: the median and interquartile range of
the per-round ratios (this round's time over the same round's floor).

``--load N`` starts N busy processes (each spins one core in a pure-Python loop) before the
timings and stops them after: the table then shows how each case holds up beside other work
(data-loader workers, a second job), against the floor measured under the same load.

Usage (from the repository root)::

    .venv/bin/python benchmarks/phase2_table.py             # full table
    .venv/bin/python benchmarks/phase2_table.py --quick     # resnet18, T=2, a few seconds
    .venv/bin/python benchmarks/phase2_table.py --load 3    # beside three busy processes
    .venv/bin/python benchmarks/phase2_table.py --save      # also write benchmarks/results/
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import functools
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

import cs_kernels
from cs_kernels._device import device_name
from cs_kernels.baseline_loop import authors_style_phase2
from cs_kernels.model_shapes import resnet18_conv_shapes, resnet50_conv_shapes
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
GRAPHED_BACKENDS = ("triton", "cuda")  # timed as CUDA graph replays (and triton eagerly too)
FLOOR = "floor (torch.sum)"
AUTHORS = "authors' loop"
COMPILED = "torch.compile(torch)"
MODELS = {
    "resnet18": resnet18_conv_shapes,
    "resnet50": resnet50_conv_shapes,
    "resnet50x4": lambda: resnet50_conv_shapes() * 4,  # 93.8M elements: "about 100M"
}
QUICK = {"models": ["resnet18"], "tasks": [2], "repeats": 3, "slow_repeats": 1}
DEFAULTS = {"repeats": 9, "slow_repeats": 3}
# A busy process: one core's worth of pure-Python work, until it is killed.
SPIN = "while True: pass"
GPU_WORKLOADS = {"models": list(MODELS), "tasks": [2, 3, 5, 10, 20]}
GPU_DTYPES = ["float32", "bfloat16"]
# CPU: both ResNets at T = 2, 3, 5, and one T = 20 row (the authors' loop is slow there).
CPU_WORKLOADS = [(m, t) for m in ("resnet18", "resnet50") for t in (2, 3, 5)] + [("resnet18", 20)]


@dataclass
class Row:
    """One line of the table: one timed callable on one (model, T, dtype) workload."""

    model: str
    numel: int
    tasks: int
    mode: str
    backend: str
    ms: float
    gb_per_s: float  # the floor's traffic, (T + 1) * N elements, divided by this time
    x_floor: float  # median over rounds of (this round's time / this round's floor)
    speedup_vs_authors: float | None
    times_ms: list[float] = field(default_factory=list)
    dtype: str = ""
    timing: str = "eager"  # "graph": replays of a captured CUDA graph
    speedup_vs_compiled: float | None = None  # time of torch.compile(torch) / this time
    ms_iqr: tuple[float, float] | None = None  # first and third quartiles of times_ms
    ms_range: tuple[float, float] | None = None  # fastest and slowest of times_ms
    x_floor_iqr: tuple[float, float] | None = None  # quartiles of the per-round floor ratios
    load: int = 0  # busy processes running beside the timings


class Case(NamedTuple):
    """One timed callable: the floor, the authors' loop, or one backend in one mode."""

    mode: str
    backend: str
    call: Callable[[], object]
    timing: str = "eager"  # "graph": capture the call once, time its replays


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


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    """Wall time in ms of one call of ``fn()`` (synchronised on accelerators)."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return (time.perf_counter() - start) * 1e3


def warm_up(
    fn: Callable[[], object], device: torch.device, args: argparse.Namespace
) -> tuple[float, int]:
    """Call ``fn`` until ``args.warmup_seconds`` have passed (at least once): a few calls are
    not enough for a memory-bound kernel of a few ms to reach steady speed.

    Returns the first call's time in ms and how many timed calls the case gets:
    ``args.repeats``, ``args.slow_repeats`` when the first call took longer than
    ``args.slow_seconds``, and 0 (its first call is its sample) when it took longer than
    ``args.very_slow_seconds`` (default 5 s: the authors' loop at large T on a CPU).
    """
    begin = time.perf_counter()
    first = _timed(fn, device)
    if first > getattr(args, "very_slow_seconds", 5.0) * 1e3:
        return first, 0
    while time.perf_counter() - begin < args.warmup_seconds:
        _timed(fn, device)
    repeats = (
        args.repeats if first <= args.slow_seconds * 1e3 else min(args.repeats, args.slow_repeats)
    )
    return first, repeats


def time_round_robin(
    fns: Sequence[Callable[[], object]], device: torch.device, args: argparse.Namespace
) -> list[list[float]]:
    """Wall times in ms of each of ``fns``: each warmed up (`warm_up`), then timed one call
    per round, all of them round after round, so that they share the machine's moments."""
    plans = [warm_up(fn, device, args) for fn in fns]
    times: list[list[float]] = [[] for _ in fns]
    for round_index in range(max((repeats for _, repeats in plans), default=0)):
        for fn, (_, repeats), samples in zip(fns, plans, times, strict=True):
            if round_index < repeats:
                samples.append(_timed(fn, device))
    return [samples or [first] for (first, _), samples in zip(plans, times, strict=True)]


def time_call(
    fn: Callable[[], object], device: torch.device, args: argparse.Namespace
) -> list[float]:
    """Wall times in ms of one callable (`time_round_robin` of one)."""
    return time_round_robin([fn], device, args)[0]


def quartiles(values: Sequence[float]) -> tuple[float, float]:
    """First and third quartiles (both the value itself for a single sample)."""
    if len(values) < 2:
        return values[0], values[0]
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q3


@contextlib.contextmanager
def busy_processes(count: int) -> Iterator[list[subprocess.Popen[bytes]]]:
    """``count`` processes that each keep one core busy, killed on exit."""
    procs = [
        subprocess.Popen([sys.executable, "-c", SPIN], stdin=subprocess.DEVNULL)
        for _ in range(count)
    ]
    try:
        if procs:
            time.sleep(0.5)  # let them get going before anything is timed
        yield procs
    finally:
        for proc in procs:
            proc.kill()
        for proc in procs:
            proc.wait()


def capture_graph(fn: Callable[[], object], device: torch.device) -> Callable[[], object] | None:
    """``fn`` captured in a CUDA graph (after two warm-up calls on a side stream, which build
    tables, autotune and compile): its ``replay``, or None when it cannot be captured."""
    try:
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            fn()
            fn()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
    except RuntimeError as exc:
        print(f"[bench] cannot capture a CUDA graph: {exc}", file=sys.stderr)
        return None
    return graph.replay


# ---------------------------------------------------------------------------- workload


@functools.cache
def bench_plan(model: str) -> Phase2Plan:
    """The plan of a workload (one object per model: backends cache their tables on it)."""
    if model not in MODELS:
        raise ValueError(f"model must be one of {sorted(MODELS)}, got {model!r}")
    return Phase2Plan.from_shapes(MODELS[model]())


def make_workload(
    model: str, tasks: int, dtype: torch.dtype, device: torch.device, seed: int
) -> Workload:
    """Seeded random gradients ``[T, N]``, strengths ``[T, C]`` and their top tasks."""
    plan = bench_plan(model)
    gen = torch.Generator(device=device).manual_seed(seed)
    grads = torch.randn(tasks, plan.numel, generator=gen, dtype=dtype, device=device)
    strength = torch.rand(tasks, plan.total_channels, generator=gen, device=device)
    top = cs_kernels.plan_top_priority(strength, plan)
    out = torch.empty(plan.numel, dtype=dtype, device=device)
    return Workload(model, plan, grads, top, out)


def _compiled_phase2(work: Workload, mode: str) -> Callable[[], object]:
    """``torch.compile`` of the ``torch`` backend's Phase 2 on this workload, compiled here:
    the compile (seconds) must not be the first call that `warm_up` times, or it would count
    as the case's time (a first call over ``--very-slow-seconds`` is the sample)."""
    torch._dynamo.reset()  # a fresh cache: every workload would otherwise count as a recompile
    grads, plan, top, out = work.grads, work.plan, work.top, work.out

    def step() -> object:
        return cs_kernels.phase2(
            grads, plan, top=top, mode=mode, out=out, backend="torch", check=False
        )

    compiled = torch.compile(step)
    seconds = _timed(compiled, grads.device) / 1e3
    print(f"[bench] torch.compile(torch) {mode}: compiled in {seconds:.1f} s", flush=True)
    return compiled


def cases(
    work: Workload,
    backends: Sequence[str],
    modes: Sequence[str],
    *,
    graphs: bool = False,
    compiled: bool = False,
) -> list[Case]:
    """The floor first, then the authors' loop, then per mode: ``torch.compile(torch)``
    (when ``compiled``) and every backend (graph-timed on CUDA when ``graphs``)."""
    grads, plan, top, out = work.grads, work.plan, work.top, work.out
    floor_timing = "graph" if graphs else "eager"
    found = [
        Case("-", FLOOR, partial(torch.sum, grads, 0, out=out), floor_timing),
        Case("group", AUTHORS, partial(authors_style_phase2, grads, plan, top)),
    ]
    for mode in modes:
        if compiled:
            found.append(Case(mode, COMPILED, _compiled_phase2(work, mode)))
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
            if graphs and backend in GRAPHED_BACKENDS:
                found.append(Case(mode, backend, call, "graph"))
                if backend == "triton":
                    found.append(Case(mode, backend, call))
            else:
                found.append(Case(mode, backend, call))
    return found


def bench_workload(
    work: Workload, backends: Sequence[str], modes: Sequence[str], args: argparse.Namespace
) -> list[Row]:
    """Time every candidate on one workload; ratios use this run's floor, authors' loop and
    compiled ``torch`` backend. ``args`` needs ``repeats``, ``slow_repeats``,
    ``slow_seconds`` and ``warmup_seconds``; ``graphs`` and ``compiled`` default to off;
    ``load`` (busy processes the caller runs beside it) is only recorded in the rows."""
    device = work.grads.device
    graphs = bool(getattr(args, "graphs", False)) and device.type == "cuda"
    compiled = bool(getattr(args, "compiled", False))
    found = cases(work, backends, modes, graphs=graphs, compiled=compiled)
    calls, timings = [], []
    for case in found:
        fn, timing = case.call, case.timing
        if timing == "graph":
            replay = capture_graph(fn, device)
            fn, timing = (replay, "graph") if replay is not None else (fn, "eager")
        calls.append(fn)
        timings.append(timing)
    samples = time_round_robin(calls, device, args)
    del calls
    medians = [statistics.median(times) for times in samples]
    floor_times, authors_ms = samples[0], medians[1]
    compiled_ms = {
        case.mode: ms for case, ms in zip(found, medians, strict=True) if case.backend == COMPILED
    }
    tasks, numel = work.grads.shape
    floor_bytes = (tasks + 1) * numel * work.grads.element_size()
    dtype = str(work.grads.dtype).removeprefix("torch.")
    rows = []
    for case, timing, ms, times in zip(found, timings, medians, samples, strict=True):
        ratios = [t / f for t, f in zip(times, floor_times, strict=False)]
        rows.append(
            Row(
                model=work.model,
                numel=numel,
                tasks=tasks,
                mode=case.mode,
                backend=case.backend,
                ms=ms,
                gb_per_s=floor_bytes / (ms * 1e6),
                x_floor=statistics.median(ratios),
                speedup_vs_authors=None if case.backend == AUTHORS else authors_ms / ms,
                times_ms=times,
                dtype=dtype,
                timing=timing,
                speedup_vs_compiled=(
                    compiled_ms[case.mode] / ms
                    if case.mode in compiled_ms and case.backend != COMPILED
                    else None
                ),
                ms_iqr=quartiles(times),
                ms_range=(min(times), max(times)),
                x_floor_iqr=quartiles(ratios),
                load=int(getattr(args, "load", 0) or 0),
            )
        )
    return rows


# ------------------------------------------------------------------------------ output


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return str(triton.__version__)


def header(device: torch.device, when: dt.datetime, load: int = 0) -> str:
    """One line naming the device, thread count, torch and triton versions, date and load."""
    version = _triton_version()
    triton_version = f" | triton {version}" if version else ""
    beside = f" | beside {load} busy processes" if load else " | no added load"
    return (
        f"Device: {device_name(device)} ({device.type}, {torch.get_num_threads()} threads) | "
        f"torch {torch.__version__}{triton_version} | {when:%Y-%m-%d %H:%M}{beside}"
    )


def _speedup(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _spread(bounds: tuple[float, float] | None, digits: int) -> str:
    return "-" if bounds is None else f"{bounds[0]:.{digits}f}-{bounds[1]:.{digits}f}"


def markdown_table(rows: Sequence[Row]) -> str:
    """The rows as a markdown table (medians, with interquartile ranges beside them)."""
    lines = [
        "| model | N | T | mode | backend | dtype | timing | ms | ms IQR | GB/s | x floor "
        "| x floor IQR | speedup vs authors' loop | speedup vs torch.compile |",
        "|---|---:|---:|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        compiled = _speedup(r.speedup_vs_compiled)
        if r.backend not in (FLOOR, AUTHORS, COMPILED) and r.speedup_vs_compiled is None:
            compiled = "n/a"  # torch.compile not timed in this run
        lines.append(
            f"| {r.model} | {r.numel:,} | {r.tasks} | {r.mode} | {r.backend} | {r.dtype or '-'} "
            f"| {r.timing} | {r.ms:.3f} | {_spread(r.ms_iqr, 3)} | {r.gb_per_s:.1f} "
            f"| {r.x_floor:.2f} | {_spread(r.x_floor_iqr, 2)} "
            f"| {_speedup(r.speedup_vs_authors)} | {compiled} |"
        )
    return "\n".join(lines)


def summary_table(rows: Sequence[Row]) -> str:
    """One line per workload: the floor's time, then every other case's ratio to the floor
    as ``median (first-third quartile)`` over the rounds."""
    workloads: dict[tuple[str, int, str], dict[str, Row]] = {}
    for r in rows:
        name = r.backend if r.mode == "-" else f"{r.backend} {r.mode}"
        if r.timing == "graph" and r.backend != FLOOR:
            name += " (graph)"
        workloads.setdefault((r.model, r.tasks, r.dtype), {})[name] = r
    columns = [c for c in dict.fromkeys(k for cases in workloads.values() for k in cases)]
    columns = [c for c in columns if c != FLOOR]
    lines = [
        "| model | T | dtype | floor ms | " + " | ".join(f"{c} x floor" for c in columns) + " |",
        "|---|---:|---|---:|" + "---:|" * len(columns),
    ]
    for (model, tasks, dtype), cases in workloads.items():
        if FLOOR not in cases:
            continue
        cells = []
        for c in columns:
            r = cases.get(c)
            cells.append("-" if r is None else f"{r.x_floor:.2f} ({_spread(r.x_floor_iqr, 2)})")
        lines.append(
            f"| {model} | {tasks} | {dtype or '-'} | {cases[FLOOR].ms:.2f} | "
            + " | ".join(cells)
            + " |"
        )
    return "\n".join(lines)


def save_json(
    rows: Sequence[Row],
    device: torch.device,
    when: dt.datetime,
    args: argparse.Namespace,
    loads: tuple[float | None, float | None],
) -> Path:
    """Write ``benchmarks/results/<device-slug>-<date>[-load<N>].json`` (or ``<name>.json``)
    and return its path."""
    name = device_name(device)
    payload = {
        "device": name,
        "device_type": device.type,
        "threads": torch.get_num_threads(),
        "load": {"busy_processes": args.load},
        "note": args.note,
        "torch": torch.__version__,
        "triton": _triton_version(),
        "python": platform.python_version(),
        "git_commit": git("rev-parse", "HEAD") or None,
        "git_dirty": None if (status := git("status", "--porcelain")) is None else bool(status),
        "load_average_1min": {"start": loads[0], "end": loads[1]},
        "date": when.isoformat(timespec="seconds"),
        "config": {k: v for k, v in vars(args).items() if k != "save"},
        "rows": [asdict(r) for r in rows],
    }
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stem = args.name or f"{slugify(name)}-{when:%Y-%m-%d}" + (
        f"-load{args.load}" if args.load else ""
    )
    path = RESULTS_DIR / f"{stem}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


# -------------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options; unset ones take the full-run (or ``--quick``) defaults."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", choices=list(MODELS))
    p.add_argument("--tasks", nargs="+", type=int, help="task counts T")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument(
        "--dtypes",
        "--dtype",
        nargs="+",
        choices=list(DTYPES),
        help="default: float32 and bfloat16 on CUDA, float32 on CPU",
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, help="timed rounds per case (default 9)")
    p.add_argument("--slow-repeats", type=int, help="timed calls of a slow case (default 3)")
    p.add_argument(
        "--slow-seconds",
        type=float,
        default=0.1,
        help="a case whose warm-up call takes longer than this is slow (default 0.1 s)",
    )
    p.add_argument(
        "--very-slow-seconds",
        type=float,
        default=5.0,
        help="a case whose first call takes longer than this is timed by that call (default 5)",
    )
    p.add_argument(
        "--warmup-seconds",
        type=float,
        default=0.25,
        help="keep calling before timing until this long has passed (default 0.25 s)",
    )
    p.add_argument(
        "--graphs",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="time the floor and the kernel backends as CUDA graph replays (default on CUDA)",
    )
    p.add_argument(
        "--compiled",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also time torch.compile of the torch backend (default on CUDA; slow to compile)",
    )
    p.add_argument(
        "--load",
        type=int,
        default=0,
        metavar="N",
        help="run N busy processes (one core each) beside the timings (default 0)",
    )
    p.add_argument("--name", help="file name (without .json) for --save")
    p.add_argument("--note", default="", help="free text saved with the results (conditions)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="resnet18, T=2, 3 repeats")
    p.add_argument("--save", action="store_true", help="write benchmarks/results/*.json")
    args = p.parse_args(argv)
    if args.load < 0:
        p.error("--load must be >= 0")
    on_gpu = torch.device(args.device).type == "cuda"
    for key, value in {**DEFAULTS, **(QUICK if args.quick else {})}.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.models is None and args.tasks is None and not on_gpu:
        args.workloads = list(CPU_WORKLOADS)
    else:
        models = args.models or (GPU_WORKLOADS["models"] if on_gpu else ["resnet18", "resnet50"])
        tasks = args.tasks or (GPU_WORKLOADS["tasks"] if on_gpu else [2, 3, 5])
        args.workloads = [(m, t) for m in models for t in tasks]
    args.models = sorted({m for m, _ in args.workloads}, key=list(MODELS).index)
    args.tasks = sorted({t for _, t in args.workloads})
    if args.dtypes is None:
        args.dtypes = ["float32"] if args.quick or not on_gpu else list(GPU_DTYPES)
    if args.graphs is None:
        args.graphs = on_gpu
    if args.compiled is None:
        args.compiled = on_gpu and not args.quick
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    backends = [b for b in cs_kernels.available_backends(device) if b not in EXCLUDED_BACKENDS]
    when = dt.datetime.now().astimezone()
    load_start = load_average()
    rows: list[Row] = []
    with torch.inference_mode(), busy_processes(args.load):
        for dtype_name in args.dtypes:
            for model, tasks in args.workloads:
                print(f"[bench] {model} T={tasks} {dtype_name} ...", file=sys.stderr, flush=True)
                work = make_workload(model, tasks, DTYPES[dtype_name], device, args.seed)
                rows.extend(bench_workload(work, backends, args.modes, args))
                del work  # free the [T, N] buffers before the next configuration
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    loads = (load_start, load_average())
    print(header(device, when, args.load))
    if args.note:
        print(f"note: {args.note}")
    print(
        f"median of {args.repeats} round-robin rounds ({args.slow_repeats} if slow), with the "
        f"interquartile range; timing 'graph' = CUDA graph replay; 1-min load average "
        f"{loads[0]} at start, {loads[1]} at end"
    )
    print()
    print(markdown_table(rows))
    print()
    print(summary_table(rows))
    if args.save:
        print(f"\nsaved {save_json(rows, device, when, args, loads).relative_to(ROOT)}")


if __name__ == "__main__":
    main()
