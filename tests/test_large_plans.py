"""Plans large enough for the fast backends' work splitting, against the reference.

The ``cpu`` kernel cuts a plan into work items of about 64K gradient elements (per task:
65536 / T, between 1024 and 65536): a row longer than an item is split into pieces, a
group-mode layer larger than an item becomes a *scope* whose dot products are summed over
its items by the last thread to finish one, and small layers and gap pieces are packed
several to an item. The ``torch`` backend lays a grid of chunks over the buffer and sends
the elements outside whole chunks down an element-wise path. `LARGE` has all of these at
any T: rows of 70,001 elements, a 68,000-element layer, a long gap, 40 tiny
layers, and rows that are not a multiple of 16 elements.
"""

from __future__ import annotations

import concurrent.futures

import pytest
import torch

import cs_kernels as ck
from tests.conftest import DEVICE, FAST_BACKENDS, assert_close

CPU = "cpu" in FAST_BACKENDS
needs_cpu = pytest.mark.skipif(not CPU, reason="the compiled cpu backend is not built")
SETTINGS = [(m, u) for m in ("group", "channel") for u in ("sum", "project")]


def _large_plan() -> ck.Phase2Plan:
    layers, offset = [], 7  # a gap first
    layers.append((offset, 2, 70_001))  # rows longer than any item: split into pieces
    offset += 2 * 70_001 + 100_003  # a gap of several items
    layers.append((offset, 40, 1_700))  # a scope: larger than any item, several items
    offset += 40 * 1_700
    layers.append((offset, 50, 147))  # rows that miss a 16-element grid
    offset += 50 * 147 + 3
    gen = torch.Generator().manual_seed(11)
    for _ in range(40):  # tiny layers with gaps of 0..3 between them
        channels, row_length = (int(v) for v in torch.randint(1, 13, (2,), generator=gen))
        channels = 1 + channels % 4
        layers.append((offset, channels, row_length))
        offset += channels * row_length + int(torch.randint(0, 4, (1,), generator=gen))
    layers.append((offset, 64, 16))  # a small layer, one item in group mode
    offset += 64 * 16 + 5
    layers[1:3] = layers[2:0:-1]  # plan order need not be offset order
    return ck.Phase2Plan(layers, offset)


LARGE = _large_plan()
# (T, dtype): T=3 takes a register-specialised kernel, T=7 and T=9 the generic one; at T=9
# items are small (7280 elements per task): four 1,700-element rows per scope item.
PARITY = [(3, torch.float32), (3, torch.bfloat16), (7, torch.float64), (9, torch.float16)]


def _inputs(tasks: int, dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    grads = torch.randn(tasks, LARGE.numel, generator=gen, dtype=torch.float64)
    top = torch.randint(0, tasks, (LARGE.total_channels,), generator=gen)
    # Some layers with one top task everywhere (plainly summed under uniform="sum").
    for layer, first in zip(LARGE.layers[::7], LARGE.first_channels[::7], strict=True):
        top[first : first + layer.channels] = first % tasks
    return grads.to(dtype).to(DEVICE), top.to(DEVICE)


@pytest.mark.parametrize(("tasks", "dtype"), PARITY, ids=lambda v: str(v).removeprefix("torch."))
def test_large_plan_matches_reference(tasks: int, dtype: torch.dtype) -> None:
    grads, top = _inputs(tasks, dtype)
    for mode, uniform in SETTINGS:
        expected, expected_tasks = ck.phase2(
            grads, LARGE, top=top, mode=mode, uniform=uniform, per_task=True,
            backend="reference",
        )  # fmt: skip
        for backend in FAST_BACKENDS:
            what = f"{backend} {mode}/{uniform} T={tasks}"
            combined, per_task = ck.phase2(
                grads, LARGE, top=top, mode=mode, uniform=uniform, per_task=True,
                backend=backend,
            )  # fmt: skip
            assert_close(combined, expected, dtype, what)
            assert_close(per_task, expected_tasks, dtype, what + " per_task")
            only = ck.phase2(grads, LARGE, top=top, mode=mode, uniform=uniform, backend=backend)
            assert torch.equal(only, combined), f"{what}: per_task changed the combined result"


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@needs_cpu
@pytest.mark.usefixtures("restore_threads")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("tasks", [3, 7])
@pytest.mark.parametrize("mode", ["group", "channel"])
def test_cpu_bits_do_not_depend_on_thread_count(mode: str, tasks: int, dtype) -> None:
    """1, 2, 3 and 5 threads (more than this machine's cores) give the same bits."""
    grads, top = _inputs(tasks, dtype, seed=1)
    results = []
    for threads in (1, 2, 3, 5):
        torch.set_num_threads(threads)
        results.append(
            ck.phase2(grads, LARGE, top=top, mode=mode, uniform="project", per_task=True,
                      backend="cpu")
        )  # fmt: skip
    for threads, (combined, per_task) in zip((2, 3, 5), results[1:], strict=True):
        assert torch.equal(combined, results[0][0]), f"{threads} threads changed the result"
        assert torch.equal(per_task, results[0][1]), f"{threads} threads changed per_task"


@needs_cpu
@pytest.mark.usefixtures("restore_threads")
def test_cpu_follows_set_num_threads_and_leaves_it() -> None:
    """One thread and more threads than cores both run, agree bit for bit, and the caller's
    thread setting is left as it was."""
    grads, top = _inputs(3, torch.float32, seed=2)
    results = {}
    for threads in (1, 2 * (torch.get_num_threads() + 2)):
        torch.set_num_threads(threads)
        results[threads] = ck.phase2(grads, LARGE, top=top, backend="cpu")
        assert torch.get_num_threads() == threads
    first, many = results.values()
    assert torch.equal(first, many)
    reference = ck.phase2(grads, LARGE, top=top, backend="reference")
    assert_close(first, reference, torch.float32, "cpu")


@needs_cpu
def test_cpu_calls_from_several_python_threads_agree() -> None:
    """Concurrent calls (each its own schedule and counters) give the serial bits."""
    grads, top = _inputs(5, torch.float32, seed=3)
    modes = ["group", "channel"] * 3
    serial = [ck.phase2(grads, LARGE, top=top, mode=m, backend="cpu") for m in modes]
    with concurrent.futures.ThreadPoolExecutor(max_workers=3) as pool:
        parallel = list(
            pool.map(lambda m: ck.phase2(grads, LARGE, top=top, mode=m, backend="cpu"), modes)
        )
    for mode, a, b in zip(modes, serial, parallel, strict=True):
        assert torch.equal(a, b), mode


@needs_cpu
@pytest.mark.parametrize("mode", ["group", "channel"])
def test_cpu_many_tiny_layers(mode: str) -> None:
    """800 one- to three-channel layers, several to an item, against the reference."""
    gen = torch.Generator().manual_seed(4)
    sizes = torch.randint(1, 4, (800, 2), generator=gen).tolist()
    plan = ck.Phase2Plan.from_shapes([tuple(s) for s in sizes])
    grads = torch.randn(4, plan.numel, generator=gen, dtype=torch.float64)
    top = torch.randint(0, 4, (plan.total_channels,), generator=gen)
    for uniform in ("sum", "project"):
        expected = ck.phase2(grads, plan, top=top, mode=mode, uniform=uniform, backend="reference")
        actual = ck.phase2(grads, plan, top=top, mode=mode, uniform=uniform, backend="cpu")
        assert_close(actual, expected, torch.float64, f"{mode}/{uniform}")


def test_torch_backend_compiles_above_the_gram_task_count() -> None:
    """Beyond GRAM_MAX_TASKS the torch backend gathers each chunk's top row through an
    overlapping view: that path too compiles with fullgraph=True and matches eager."""
    from cs_kernels.backends.torch_vectorized import GRAM_MAX_TASKS

    tasks = GRAM_MAX_TASKS + 3
    plan = ck.Phase2Plan([(5, 3, 700), (2200, 40, 48), (4200, 7, 9)], 4300)
    gen = torch.Generator().manual_seed(5)
    grads = torch.randn(tasks, plan.numel, generator=gen).to(DEVICE)
    top = torch.randint(0, tasks, (plan.total_channels,), generator=gen).to(DEVICE)

    def step(g: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return ck.phase2(g, plan, top=t, backend="torch", check=False) * 1.0

    torch._dynamo.reset()
    try:
        compiled = torch.compile(step, fullgraph=True)(grads, top)
    finally:
        torch._dynamo.reset()
    eager = step(grads, top)
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
    expected = ck.phase2(grads, plan, top=top, backend="reference")
    assert_close(eager, expected, torch.float32, "torch")


@needs_cpu
@pytest.mark.parametrize("mode", ["group", "channel"])
def test_cpu_many_tasks(mode: str) -> None:
    """T = 40 (the generic kernel, items of 1632 elements per task): a split row and a
    scoped layer, whose partial sums are [T, T] per item in group mode and [T] per piece of
    a row in channel mode."""
    plan = ck.Phase2Plan([(3, 2, 3_000), (6_010, 30, 100)], 9_100)
    gen = torch.Generator().manual_seed(6)
    grads = torch.randn(40, plan.numel, generator=gen, dtype=torch.float64)
    top = torch.randint(0, 40, (plan.total_channels,), generator=gen)
    expected, expected_tasks = ck.phase2(
        grads, plan, top=top, mode=mode, uniform="project", per_task=True, backend="reference"
    )
    actual, actual_tasks = ck.phase2(
        grads, plan, top=top, mode=mode, uniform="project", per_task=True, backend="cpu"
    )
    assert_close(actual, expected, torch.float64, mode)
    assert_close(actual_tasks, expected_tasks, torch.float64, mode + " per_task")
