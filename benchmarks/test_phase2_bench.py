"""pytest-benchmark cases for Phase 2 on ResNet plans (run: ``pytest benchmarks``).

Cases per (model, T, dtype): the floor ``torch.sum(grads, 0, out=out)``, ``cs_kernels.phase2``
for every available backend but ``reference`` in both modes (on CUDA the kernel backends
also as CUDA graph replays), and (at T=3 only, it is slow) the authors'-style loop. CPU:
ResNet-18/50, T = 2, 3, 5, fp32; CUDA: also ResNet-50 x4 (~94M), T = 10, 20 and bf16. The
``[T, N]`` buffers are a module-scoped fixture, built once per configuration; pytest groups
the tests by it, so one configuration is alive at a time.

``CS_KERNELS_BENCH_LOAD=N`` runs N busy processes (one core each) beside the whole session,
as ``phase2_table.py --load N`` does; the floor is then measured under the same load.

Not part of the test suite (``testpaths = ["tests"]``): collected only when named.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

import cs_kernels
from benchmarks.phase2_table import (
    GRAPHED_BACKENDS,
    Workload,
    busy_processes,
    capture_graph,
    make_workload,
)
from cs_kernels.baseline_loop import authors_style_phase2

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
GPU = DEVICE.type == "cuda"
MODELS = ("resnet18", "resnet50", "resnet50x4") if GPU else ("resnet18", "resnet50")
TASKS = (2, 3, 5, 10, 20) if GPU else (2, 3, 5)
DTYPES = (torch.float32, torch.bfloat16) if GPU else (torch.float32,)
MODES = ("group", "channel")
BACKENDS = [b for b in cs_kernels.available_backends(DEVICE) if b != "reference"]
AUTHORS_TASKS = 3
SEED = 0
LOAD = int(os.environ.get("CS_KERNELS_BENCH_LOAD", "0"))


@pytest.fixture(scope="session", autouse=True)
def load() -> Iterator[int]:
    """``CS_KERNELS_BENCH_LOAD`` busy processes for the whole session (none by default)."""
    with busy_processes(LOAD):
        yield LOAD


@pytest.fixture(
    scope="module",
    params=[(m, t, d) for d in DTYPES for m in MODELS for t in TASKS],
    ids=lambda p: f"{p[0]}-T{p[1]}-{str(p[2]).removeprefix('torch.')}",
)
def workload(request: pytest.FixtureRequest) -> Iterator[Workload]:
    """Seeded ``[T, N]`` gradients (~470 MB at resnet50, T=5, fp32), freed after its tests."""
    model, tasks, dtype = request.param
    work = make_workload(model, tasks, dtype, DEVICE, SEED)
    yield work
    del work
    if DEVICE.type == "cuda":
        torch.cuda.empty_cache()


def run(benchmark: Any, fn: Callable[[], object], *, slow: bool) -> None:
    """Benchmark ``fn`` under inference mode; slow cases get 3 rounds of 1 call."""

    def call() -> None:
        with torch.inference_mode():
            fn()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize(DEVICE)

    if slow:
        benchmark.pedantic(call, rounds=3, iterations=1, warmup_rounds=1)
    else:
        benchmark(call)


def describe(benchmark: Any, work: Workload, mode: str, backend: str) -> None:
    """Record what was timed in the benchmark's extra_info (lands in --benchmark-json)."""
    benchmark.extra_info.update(
        model=work.model,
        N=work.plan.numel,
        T=work.grads.shape[0],
        mode=mode,
        backend=backend,
        device=str(DEVICE),
        dtype=str(work.grads.dtype).removeprefix("torch."),
        load=LOAD,
    )


def test_floor(benchmark: Any, workload: Workload) -> None:
    """The cost floor: read ``T*N``, write ``N``."""
    describe(benchmark, workload, "-", "floor")
    w = workload
    run(benchmark, lambda: torch.sum(w.grads, 0, out=w.out), slow=False)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
def test_phase2(benchmark: Any, workload: Workload, mode: str, backend: str) -> None:
    """``cs_kernels.phase2`` with one backend in one mode."""
    describe(benchmark, workload, mode, backend)
    w = workload

    def call() -> None:
        cs_kernels.phase2(
            w.grads, w.plan, top=w.top, mode=mode, out=w.out, backend=backend, check=False
        )

    run(benchmark, call, slow=False)


def test_authors_loop(benchmark: Any, workload: Workload) -> None:
    """The authors'-style loop (group mode), timed at T=3 only to keep the run short."""
    if workload.grads.shape[0] != AUTHORS_TASKS:
        pytest.skip(f"the authors' loop is timed at T={AUTHORS_TASKS} only")
    describe(benchmark, workload, "group", "authors_loop")
    w = workload
    run(benchmark, lambda: authors_style_phase2(w.grads, w.plan, w.top), slow=True)


@pytest.mark.skipif(not GPU, reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b in GRAPHED_BACKENDS])
@pytest.mark.parametrize("mode", MODES)
def test_phase2_graph(benchmark: Any, workload: Workload, mode: str, backend: str) -> None:
    """One ``cs_kernels.phase2`` call captured in a CUDA graph: the GPU time alone."""
    describe(benchmark, workload, mode, f"{backend} (graph)")
    w = workload
    with torch.inference_mode():
        replay = capture_graph(
            lambda: cs_kernels.phase2(
                w.grads, w.plan, top=w.top, mode=mode, out=w.out, backend=backend, check=False
            ),
            DEVICE,
        )
    assert replay is not None, "the call could not be captured"
    run(benchmark, replay, slow=False)
