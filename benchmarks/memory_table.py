"""Half-size rows: the controller's gradient memory, and Phase 2 on bf16 rows against the floor.

A multi-task ResNet-50 (the model of `benchmarks/fsdp_phase2.py`: every BatchNorm one per
task, one head per task; the shared parameters are the 53 convs, N = 23,454,912) with T = 5
tasks, built with ``ConnectionStrength(..., buffer_dtype=None | torch.bfloat16 |
torch.float16)``. Printed:

* memory, from the tensors the controller allocates for gradients: the ``[T, N]`` rows and
  the fp32 ``[N]`` result (which ``.grad`` views, so it replaces the ``.grad`` plain training
  holds: the controller's *extra* memory is the rows); and the resident-memory growth
  (Linux ``VmRSS``) of building the controller and running one Phase 2 step, as measured;
* time, on the controller's own plan with random rows and tops: Phase 2 (``--backend``,
  group and channel mode) writing the fp32 ``[N]`` result, as a ratio to the floor over the
  same rows, ``torch.sum(rows, 0)`` (docs/algorithm.md; for bf16 rows it writes a bf16 ``[N]``,
  half our output's bytes), beside ``torch.sum(rows, 0, dtype=torch.float32)``, timed in interleaved
  rounds (each round times the floor and every case once, so all see the same moments of a
  busy machine): median and interquartile range of the per-round ratios, and raw times.

Usage (from the repository root)::

    .venv/bin/python benchmarks/memory_table.py                 # ResNet-50, T = 5, CPU
    .venv/bin/python benchmarks/memory_table.py --device cuda   # the GPU check
    .venv/bin/python benchmarks/memory_table.py --model tiny    # seconds: a smoke test
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import cs_kernels as ck
from benchmarks.fsdp_phase2 import build
from cs_kernels._device import device_name
from cs_kernels.training import ConnectionStrength

ROWS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def rss_bytes() -> int | None:
    """Resident memory of this process (Linux), or None."""
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return None


def memory_row(model_name: str, tasks: list[str], rows: str, device: torch.device) -> dict:
    model = build(model_name, tasks).to(device).eval()
    x = torch.randn(2, 3, 32, 32, device=device)
    y = {t: torch.randint(0, 10, (2,), device=device) for t in tasks}
    start = rss_bytes()
    cs = ConnectionStrength(model, tasks, x, buffer_dtype=ROWS[rows])
    cs.phase2_backward(lambda t: F.cross_entropy(model(x, task=t), y[t]))
    end = rss_bytes()
    buf = cs.buffer
    return {
        "rows": rows,
        "N": buf.numel,
        "rows_bytes": buf.storage.nbytes,
        "out_bytes": buf.out.nbytes,
        "rss_growth": None if start is None or end is None else end - start,
        "cs": cs,
    }


def time_rounds(cases: dict[str, Callable[[], object]], device: torch.device, repeats: int):
    """``{name: [ms per round]}``, every case once per round, after one warm-up call each."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for fn in cases.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append((time.perf_counter() - t0) * 1e3)
    return times


def quartiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) < 2:
        return values[0], values[0], values[0]
    q = statistics.quantiles(values, n=4)
    return q[0], statistics.median(values), q[2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=["resnet50", "tiny"], default="resnet50")
    parser.add_argument("--tasks", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    device = torch.device(args.device)
    tasks = [f"task{i}" for i in range(args.tasks)]
    print(f"device: {device_name(device)}; load average {os.getloadavg()[0]:.1f}; "
          f"torch {torch.__version__}; model {args.model}, T = {args.tasks}")  # fmt: skip

    print("\nmemory (the controller's gradient tensors; .grad views the fp32 [N] result):")
    rows_of: dict[str, dict] = {}
    for rows in ROWS:
        rows_of[rows] = memory_row(args.model, tasks, rows, device)
    base = rows_of["fp32"]
    for rows, entry in rows_of.items():
        extra = entry["rows_bytes"]
        total = extra + entry["out_bytes"]
        rss = entry["rss_growth"]
        print(
            f"  {rows} rows: [T, N] {extra / 2**20:8.1f} MiB (x{extra / base['rows_bytes']:.2f}"
            f" of fp32), + [N] fp32 {entry['out_bytes'] / 2**20:6.1f} MiB = "
            f"{total / 2**20:8.1f} MiB (x{total / (base['rows_bytes'] + base['out_bytes']):.2f})"
            + ("" if rss is None else f"; resident growth, build + one step: {rss / 2**20:.0f} MiB")
        )

    plan = base["cs"].plan
    gen = torch.Generator().manual_seed(0)
    top = torch.randint(0, args.tasks, (plan.total_channels,), generator=gen).to(device)
    out = torch.empty(plan.numel, device=device)
    print(f"\nPhase 2 on the controller's plan (N = {plan.numel:,}, {plan.num_layers} layers), "
          f"backend {args.backend}, fp32 [N] out; ratio = this round's time / this round's "
          "floor over the same rows (median [IQR])")  # fmt: skip
    for rows in ("bf16", "fp32"):
        dtype = ROWS[rows] or torch.float32
        grads = torch.randn(args.tasks, plan.numel, generator=gen).to(dtype).to(device)
        same = torch.empty(plan.numel, dtype=dtype, device=device)
        cases: dict[str, Callable[[], object]] = {
            "floor": lambda g=grads, o=same: torch.sum(g, 0, out=o),  # docs/algorithm.md's floor
            "sum to fp32": lambda g=grads: torch.sum(g, 0, dtype=torch.float32, out=out),
        }
        for mode in ("channel", "group"):
            cases[mode] = lambda g=grads, m=mode: ck.phase2(
                g, plan, top=top, mode=m, out=out, backend=args.backend, check=False
            )
        times = time_rounds(cases, device, args.repeats)
        floor = times["floor"]
        lo, med, hi = quartiles(floor)
        row_bytes = args.tasks * plan.numel * grads.element_size()

        def gb_s(
            ms: float, out_size: int = 4, row_bytes: int = row_bytes
        ) -> str:  # traffic: read the rows, write [N]
            return f"{(row_bytes + plan.numel * out_size) / ms / 1e6:5.1f} GB/s"

        print(f"  {rows} rows, floor grads.sum(0): {med:8.2f} ms [{lo:.2f}, {hi:.2f}]  "
              f"{gb_s(med, grads.element_size())}")  # fmt: skip
        for mode in ("sum to fp32", "channel", "group"):
            ratios = [t / f for t, f in zip(times[mode], floor, strict=True)]
            rlo, rmed, rhi = quartiles(ratios)
            tlo, tmed, thi = quartiles(times[mode])
            print(f"  {rows} rows, {mode:>16}: {tmed:8.2f} ms [{tlo:.2f}, {thi:.2f}]  "
                  f"x{rmed:.2f} the floor [{rlo:.2f}, {rhi:.2f}]  {gb_s(tmed)}")  # fmt: skip
        del grads


if __name__ == "__main__":
    main()
