"""The triton backend: its tables and configurations, parity with the reference, the fused
strength launch, its custom ops, and (on a GPU) full-size shapes, CUDA graphs and autotuning.

The kernel tests run wherever triton runs on DEVICE: on CUDA (``CS_KERNELS_TEST_DEVICE=cuda``)
at full size, or on the CPU under the triton interpreter with small grids
(`test_triton_interpreter.py` starts that run from a plain ``pytest tests``). The foundation's
parity, property and bad-input suites include triton by themselves wherever it runs, since
they iterate ``FAST_BACKENDS``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import cs_kernels as ck
from cs_kernels.backends import BACKENDS, resolve_backend
from cs_kernels.model_shapes import model_plan
from tests.cases import (
    ALIGNED,
    ALIGNED_LONG,
    BLOCKS,
    CASES,
    LONG,
    MIXED,
    TILE_SIZED,
    TRITON_CASES,
    Case,
)
from tests.conftest import DEVICE, DTYPES, TRITON, TRITON_INTERPRETED, assert_close

try:
    from cs_kernels.triton_kernels import ops, tuning, work_items
    from cs_kernels.triton_kernels import phase2 as phase2_kernels
    from cs_kernels.triton_kernels import strength as strength_kernels
except Exception:  # triton missing or broken: the status test says why
    IMPORTED = False
else:
    IMPORTED = True

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = [(m, u) for m in ("group", "channel") for u in ("sum", "project")]
GPU = TRITON and DEVICE.type == "cuda"

needs_import = pytest.mark.skipif(not IMPORTED, reason="triton does not import here")
needs_triton = pytest.mark.skipif(
    not TRITON,
    reason="triton does not run on DEVICE here (needs CUDA, or the CPU with TRITON_INTERPRET=1: "
    "test_triton_interpreter.py runs this module that way)",
)
needs_gpu = pytest.mark.skipif(not GPU, reason="needs CUDA (CS_KERNELS_TEST_DEVICE=cuda)")


# -- host side: work items and configurations (no kernel runs) ------------------------------


def _coverage(plan: ck.Phase2Plan, items: torch.Tensor, tile: int, width: int) -> None:
    """Every element of [0, N) in exactly one item; rows whole, channels consistent."""
    seen = torch.zeros(plan.numel, dtype=torch.int64)
    channel_of = {}
    for layer, first in zip(plan.layers, plan.first_channels, strict=True):
        for c in range(layer.channels):
            channel_of[layer.offset + c * layer.row_length] = (first + c, layer.row_length)
    for start, size, row_length, subrows, first, layer, kind, align in items.tolist():
        assert 1 <= align <= 16 and align & (align - 1) == 0
        assert start % align == 0 and plan.numel % align == 0
        if kind == work_items.GAP:
            assert 1 <= size <= tile and size % align == 0
            seen[start : start + size] += 1
            continue
        assert subrows == -(-row_length // width) and row_length % align == 0
        assert (kind == work_items.LONG_ROW) == (subrows > tile // width)
        assert kind == work_items.ROWS or size == 1
        assert size * subrows <= tile // width or kind == work_items.LONG_ROW
        for r in range(size):
            row_start = start + r * row_length
            assert channel_of[row_start] == (first + r, row_length)
            assert plan.layers[layer].offset <= row_start
            seen[row_start : row_start + row_length] += 1
    assert bool((seen == 1).all())


PLANS = {
    "mixed": MIXED,
    "blocks": BLOCKS,
    "long": LONG,
    "aligned": ALIGNED,
    "tile-sized": TILE_SIZED,
    "aligned-long": ALIGNED_LONG,
    "no-layers": ck.Phase2Plan([], 41),
}


@needs_import
@pytest.mark.parametrize("tile_width", [(512, 16), (256, 4), (4096, 64), (64, 64)], ids=str)
@pytest.mark.parametrize("name", list(PLANS))
def test_work_items_cover_every_element_once(name: str, tile_width: tuple[int, int]) -> None:
    tile, width = tile_width
    plan = PLANS[name]
    items = work_items.phase2_items(plan, tile, width)
    assert items.dtype == torch.int64 and items.shape[1] == work_items.COLUMNS
    assert items[:, 0].tolist() == sorted(items[:, 0].tolist())
    _coverage(plan, items, tile, width)


@needs_import
@pytest.mark.parametrize("model", ["resnet18", "resnet50"])
def test_work_items_of_real_backbones(model: str) -> None:
    plan = model_plan(model)
    for config in tuning.phase2_candidates(plan, 4) + tuning.phase2_candidates(plan, 8):
        _coverage(plan, work_items.phase2_items(plan, config.tile, config.width), *config[:2])


@needs_import
def test_weight_items_count_each_layers_items() -> None:
    items, counts = work_items.weight_items(LONG, 512, 16)
    assert counts.dtype == torch.int32 and counts.tolist() == [
        int((items[:, 5] == layer).sum()) for layer in range(LONG.num_layers)
    ]
    assert bool((items[:, 6] == work_items.LONG_ROW).any())  # LONG's rows exceed 512


@needs_import
def test_sub_row_width_masks_few_lanes() -> None:
    widths = (256, 128, 64, 32, 16, 8, 4)
    assert tuning.best_width([(256, 64)], 4096, widths) == 64  # rows of 64: one sub-row each
    assert tuning.best_width([(256, 576)], 4096, widths) == 64  # 9 sub-rows, none masked
    assert tuning.lane_efficiency([(256, 576)], 4096, 64) > 0.95
    assert tuning.best_width([(200, 5)], 512, widths) == 8  # 64 rows a tile; 4 does as well
    for tile in (1024, 2048, 4096, 8192):  # the tuner's own widths
        assert tuning.best_width([(3, 5), (64, 576)], tile) in tuning.widths_for(tile)


@needs_import
@pytest.mark.parametrize("element_size", [2, 4, 8])
def test_candidates(element_size: int) -> None:
    plan = model_plan("resnet50")
    found = tuning.phase2_candidates(plan, element_size)
    assert len(found) == len(set(found)) >= 1
    for config in found:
        assert config.tile & (config.tile - 1) == 0 and config.width & (config.width - 1) == 0
        assert 1 <= config.subrows <= tuning.MAX_SUBROWS


@needs_import
def test_status_and_selection(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CS_KERNELS_BACKEND", raising=False)
    assert ck.backend_status()["triton"] == "available"
    engine = BACKENDS["triton"]
    assert engine.supports(torch.device("cuda"))
    assert not engine.supports(torch.device("meta"))
    assert engine.supports(torch.device("cpu")) == tuning.INTERPRETED
    # auto never picks triton for CPU tensors, interpreter or not.
    assert resolve_backend("auto", torch.device("cpu")).name != "triton"
    if torch.cuda.is_available():
        assert resolve_backend("auto", torch.device("cuda")).name == "triton"


@needs_import
@pytest.mark.skipif(TRITON_INTERPRETED or DEVICE.type != "cpu", reason="CPU without interpreter")
def test_explicit_triton_on_cpu_tensors_without_interpreter_is_rejected() -> None:
    grads = torch.randn(2, 12)
    with pytest.raises(ValueError, match="backend='triton' cannot run on cpu"):
        ck.phase2(grads, ck.Phase2Plan([(0, 3, 4)], 12), top=torch.tensor([0, 1, 0]),
                  backend="triton")  # fmt: skip


# -- kernels: parity with the reference ------------------------------------------------------

# Under the interpreter every case runs in fp32, and a few in every dtype.
EVERY_DTYPE_CASES = {"mixed-T3", "blocks-T4", "long-rows-T3", "aligned-T3", "tile-sized-T5"}


def _parity_params() -> Iterator[Any]:
    for case in CASES + TRITON_CASES:
        for dtype in DTYPES:
            few = TRITON_INTERPRETED and case.name not in EVERY_DTYPE_CASES
            if few and dtype != torch.float32:
                continue
            yield pytest.param(case, dtype, id=f"{case.name}-{str(dtype).removeprefix('torch.')}")


@needs_triton
@pytest.mark.parametrize(("case", "dtype"), list(_parity_params()))
def test_cases_match_reference(case: Case, dtype: torch.dtype) -> None:
    grads, top = case.build(DEVICE, dtype)
    for mode, uniform in SETTINGS:
        kw: dict[str, Any] = {"top": top, "mode": mode, "uniform": uniform}
        expected, expected_tasks = ck.phase2(grads, case.plan, per_task=True, backend="reference",
                                             **kw)  # fmt: skip
        combined, per_task = ck.phase2(grads, case.plan, per_task=True, backend="triton", **kw)
        what = f"triton {mode}/{uniform}"
        assert_close(combined, expected, dtype, what)
        assert_close(per_task, expected_tasks, dtype, what + " per_task")
        if mode == "group" or not TRITON_INTERPRETED:  # (interpreted: keep the run short)
            only = ck.phase2(grads, case.plan, backend="triton", **kw)
            assert torch.equal(only, combined), f"{what}: per_task changed the combined result"


def _configs(plan: ck.Phase2Plan, dtype: torch.dtype) -> list[tuning.TileConfig]:
    if GPU:
        return tuning.phase2_candidates(plan, torch.empty(0, dtype=dtype).element_size())
    # Interpreted: tiles of 64 to 2048 elements, 4 to 128 sub-rows.
    shapes = ((64, 8), (256, 64), (2048, 16))
    return [tuning.TileConfig(tile, width, 1, 1) for tile, width in shapes]


CONFIG_PARAMS = [("mixed", torch.float32), ("tile-sized", torch.float32)]
CONFIG_PARAMS += [("tile-sized", torch.bfloat16), ("aligned-long", torch.float32)]
if GPU:
    CONFIG_PARAMS += [("aligned", torch.float32), ("aligned", torch.float64)]


@needs_triton
@pytest.mark.parametrize(("name", "dtype"), CONFIG_PARAMS, ids=str)
def test_every_configuration_matches_reference(name: str, dtype: torch.dtype) -> None:
    plan = PLANS[name]
    gen = torch.Generator().manual_seed(5)
    grads = torch.randn(3, plan.numel, generator=gen).to(dtype).to(DEVICE)
    top = torch.randint(0, 3, (plan.total_channels,), generator=gen).to(DEVICE)
    layers = plan.layer_table(DEVICE)
    for config in _configs(plan, dtype):
        items = work_items.phase2_items(plan, config.tile, config.width).to(DEVICE)
        for mode, uniform in SETTINGS:
            expected, expected_tasks = ck.phase2(grads, plan, top=top, mode=mode, uniform=uniform,
                                                 per_task=True, backend="reference")  # fmt: skip
            out = torch.full_like(grads[0], float("nan"))
            projected = torch.full_like(grads, float("nan"))
            ops.phase2(grads, top, items, layers, out, projected, mode == "group",
                       uniform == "project", config)  # fmt: skip
            assert_close(out, expected, dtype, f"{config} {mode}/{uniform}")
            assert_close(projected, expected_tasks, dtype, f"{config} {mode}/{uniform} per_task")


@needs_triton
@pytest.mark.parametrize("extra", [0, 1])
def test_task_counts_at_and_past_the_largest_task_block(extra: int) -> None:
    """T = 32 fills the largest compiled task block; T = 33 takes the next power of two."""
    tasks = max(tuning.TASK_BLOCKS) + extra
    plan = PLANS["mixed"]
    gen = torch.Generator().manual_seed(tasks)
    grads = torch.randn(tasks, plan.numel, generator=gen).to(DEVICE)
    top = torch.randint(0, tasks, (plan.total_channels,), generator=gen).to(DEVICE)
    for mode in ("group", "channel"):
        kw: dict[str, Any] = {"top": top, "mode": mode, "uniform": "project", "per_task": True}
        expected, expected_tasks = ck.phase2(grads, plan, backend="reference", **kw)
        combined, per_task = ck.phase2(grads, plan, backend="triton", **kw)
        assert_close(combined, expected, torch.float32, f"T={tasks} {mode}")
        assert_close(per_task, expected_tasks, torch.float32, f"T={tasks} {mode} per_task")
    scales = torch.rand(tasks, plan.total_channels, generator=gen).to(DEVICE)
    weights = _weights(plan, torch.float32, seed=tasks)
    top_fused = BACKENDS["triton"].weights_top_priority(weights, scales, plan)
    assert torch.equal(top_fused, BACKENDS["reference"].weights_top_priority(weights, scales, plan))


class _LaunchCounter:
    """Stands in for a kernel: counts its launches, then launches it."""

    def __init__(self, kernel: Any) -> None:
        self.kernel = kernel
        self.grids: list[tuple[int, ...]] = []

    def __getitem__(self, grid: tuple[int, ...]) -> Any:
        self.grids.append(grid)
        return self.kernel[grid]


@needs_triton
@pytest.mark.parametrize("mode", ["group", "channel"])
def test_one_launch_covers_every_layer_and_gap(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    counters = {}
    for name in ("pass1_kernel", "group_kernel", "pass2_kernel"):
        counters[name] = _LaunchCounter(getattr(phase2_kernels, name))
        monkeypatch.setattr(phase2_kernels, name, counters[name])
    grads, top = CASES[6].build(DEVICE, torch.float32)  # mixed-T3: 5 layers, 5 gaps
    assert CASES[6].plan is MIXED
    ck.phase2(grads, MIXED, top=top, mode=mode, backend="triton")
    group = mode == "group"
    assert len(counters["pass1_kernel"].grids) == 1
    assert len(counters["group_kernel"].grids) == int(group)
    assert len(counters["pass2_kernel"].grids) == int(group)


# -- kernels: strength and priority -----------------------------------------------------------


def _weights(plan: ck.Phase2Plan, dtype: torch.dtype, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [
        torch.randn(layer.channels, layer.row_length, generator=gen).to(dtype).to(DEVICE)
        for layer in plan.layers
    ]


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", ["mixed", "long", "aligned"])
def test_plan_row_sqnorm(name: str, dtype: torch.dtype) -> None:
    plan = PLANS[name]
    weights = _weights(plan, dtype)
    norms = BACKENDS["triton"].plan_row_sqnorm(weights, plan)
    assert norms.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    expected = torch.cat([w.double().square().sum(1) for w in weights])
    rtol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(norms.double(), expected, rtol=rtol, atol=0)


@needs_triton
@pytest.mark.parametrize("tasks", [1, 3, 24])
@pytest.mark.parametrize("name", ["mixed", "long"])
def test_fused_priority_equals_its_composition(
    name: str, tasks: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One launch gives the top tasks of ``top_priority(norms * scales)``, bit for bit."""
    plan = PLANS[name]
    counter = _LaunchCounter(strength_kernels.strength_kernel)
    monkeypatch.setattr(strength_kernels, "strength_kernel", counter)
    weights = _weights(plan, torch.float32, seed=tasks)
    gen = torch.Generator().manual_seed(tasks)
    scales = torch.rand(tasks, plan.total_channels, generator=gen).to(DEVICE)
    engine = BACKENDS["triton"]
    top = engine.weights_top_priority(weights, scales, plan)
    assert len(counter.grids) == 1
    norms = engine.plan_row_sqnorm(weights, plan)
    assert torch.equal(top, engine.top_priority(norms[None, :] * scales, plan))
    reference = BACKENDS["reference"]
    assert torch.equal(top, reference.weights_top_priority(weights, scales, plan))


@needs_triton
def test_fused_priority_ties_go_to_the_first_task() -> None:
    """Unit-norm rows and task factors exactly proportional: every channel ties."""
    layers, channels = 3, 300
    plan = ck.Phase2Plan([(i * channels * 2, channels, 2) for i in range(layers)],
                         layers * channels * 2)  # fmt: skip
    weights = [torch.tensor([[1.0, 0.0]] * channels, device=DEVICE) for _ in range(layers)]
    gen = torch.Generator().manual_seed(0)
    s0 = torch.round(torch.rand(layers * channels, generator=gen) * 2**20) / 2**20 + 2**-20
    scales = (torch.tensor([1.0, 3.0, 5.0, 13.0])[:, None] * s0[None, :]).to(DEVICE)
    top = BACKENDS["triton"].weights_top_priority(weights, scales, plan)
    assert bool((top == 0).all())


# -- kernels: determinism, safety, custom ops --------------------------------------------------


@needs_triton
@pytest.mark.parametrize("mode", ["group", "channel"])
def test_repeated_calls_are_bitwise_identical(mode: str) -> None:
    grads, top = TRITON_CASES[2].build(DEVICE, torch.float32)
    plan = TRITON_CASES[2].plan
    first, tasks = ck.phase2(grads, plan, top=top, mode=mode, per_task=True, backend="triton")
    for _ in range(2):
        again, again_tasks = ck.phase2(grads, plan, top=top, mode=mode, per_task=True,
                                       backend="triton")  # fmt: skip
        assert torch.equal(again, first) and torch.equal(again_tasks, tasks)


@needs_triton
def test_out_of_range_top_with_check_false_stays_in_bounds() -> None:
    """check=False skips the range check of ``top``; the kernels clamp task indices, so a bad
    index gives an unspecified result but never reads or writes outside the buffers. In a
    child process, so that a regression shows as a crash, not a dead test run."""
    code = textwrap.dedent(
        f"""
        import torch
        from cs_kernels import Phase2Plan, phase2
        grads = torch.randn(2, 12, device="{DEVICE}")
        plan = Phase2Plan([(0, 3, 4)], 12)
        top = torch.tensor([0, -(1 << 40), 1 << 40], device="{DEVICE}")
        for mode in ("group", "channel"):
            out = phase2(grads, plan, top=top, mode=mode, check=False, backend="triton")
        print("returned", out.shape[0])
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, check=False, cwd=ROOT, env=dict(os.environ))  # fmt: skip
    assert proc.returncode == 0, f"child died with {proc.returncode}: {proc.stderr[-2000:]}"
    assert proc.stdout.startswith("returned 12"), proc.stdout


@needs_triton
def test_custom_ops_pass_the_opcheck() -> None:
    """The ops torch.compile sees: schema, fake (meta) kernels and mutation declarations."""
    plan = TILE_SIZED
    gen = torch.Generator().manual_seed(2)
    grads = torch.randn(3, plan.numel, generator=gen).to(DEVICE)
    top = torch.randint(0, 3, (plan.total_channels,), generator=gen).to(DEVICE)
    config = tuning.phase2_candidates(plan, 4)[0]
    items = work_items.phase2_items(plan, config.tile, config.width).to(DEVICE)
    layers = plan.layer_table(DEVICE)
    for group in (True, False):
        args = (grads, top, items, layers, torch.empty_like(grads[0]), torch.empty_like(grads),
                group, False, *config)  # fmt: skip
        torch.library.opcheck(torch.ops.cs_kernels_triton.phase2_.default, args)
    weights = _weights(plan, torch.float32)
    strength_config = tuning.strength_config(plan)
    witems, counts = work_items.cached_weight_items(plan, DEVICE, *strength_config[:2])
    scales = torch.rand(3, plan.total_channels, generator=gen).to(DEVICE)
    for given in (scales, None):
        args = (weights, witems, counts, layers, given, plan.total_channels, *strength_config)
        torch.library.opcheck(torch.ops.cs_kernels_triton.strength.default, args)
    torch.library.opcheck(torch.ops.cs_kernels_triton.priority.default, (scales, layers))


# -- GPU only: full size, int64 offsets, CUDA graphs, no host sync, autotuning ----------------


@needs_gpu
@pytest.mark.parametrize("tasks", [2, 3, 5, 24])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_resnet50_matches_the_torch_backend(tasks: int, dtype: torch.dtype) -> None:
    plan = model_plan("resnet50")
    gen = torch.Generator(device=DEVICE).manual_seed(tasks)
    grads = torch.randn(tasks, plan.numel, generator=gen, device=DEVICE).to(dtype)
    strength = torch.rand(tasks, plan.total_channels, generator=gen, device=DEVICE)
    top = ck.plan_top_priority(strength, plan, backend="triton")
    assert torch.equal(top, ck.plan_top_priority(strength, plan, backend="torch"))
    for mode, uniform in SETTINGS:
        kw: dict[str, Any] = {"top": top, "mode": mode, "uniform": uniform}
        expected = ck.phase2(grads, plan, backend="torch", **kw)
        assert_close(ck.phase2(grads, plan, backend="triton", **kw), expected, dtype, mode)
    if tasks == 3:
        expected, expected_tasks = ck.phase2(grads, plan, top=top, per_task=True, backend="torch")
        combined, per_task = ck.phase2(grads, plan, top=top, per_task=True, backend="triton")
        assert_close(combined, expected, dtype, "per_task combined")
        assert_close(per_task, expected_tasks, dtype, "per_task")


@needs_gpu
@pytest.mark.parametrize("mode", ["group", "channel"])
def test_offsets_past_two_to_the_31(mode: str) -> None:
    """T * N > 2**31: a layer at the very end of a 100M-element buffer with T = 24."""
    tasks, numel, channels, row_length = 24, 100_000_000, 16, 640
    tail = channels * row_length
    plan = ck.Phase2Plan([(numel - tail, channels, row_length)], numel)
    grads = torch.randn(tasks, numel, device=DEVICE, dtype=torch.bfloat16)
    top = torch.randint(0, tasks, (channels,), device=DEVICE)
    out = ck.phase2(grads, plan, top=top, mode=mode, uniform="project", backend="triton")
    small = ck.Phase2Plan([(0, channels, row_length)], tail)
    expected = ck.phase2(grads[:, -tail:].contiguous(), small, top=top, mode=mode,
                         uniform="project", backend="reference")  # fmt: skip
    assert_close(out[-tail:], expected, torch.bfloat16, "tail layer")
    gap = slice(numel - tail - 4096, numel - tail)
    assert_close(out[gap], grads[:, gap].float().sum(0).to(torch.bfloat16), torch.bfloat16, "gap")


def _graph_inputs(
    tasks: int, seed: int = 0
) -> tuple[ck.Phase2Plan, torch.Tensor, list[torch.Tensor], torch.Tensor]:
    plan = model_plan("resnet18")
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    grads = torch.randn(tasks, plan.numel, generator=gen, device=DEVICE)
    weights = [
        torch.randn(layer.channels, layer.row_length, generator=gen, device=DEVICE)
        for layer in plan.layers
    ]
    scales = torch.rand(tasks, plan.total_channels, generator=gen, device=DEVICE)
    return plan, grads, weights, scales


@needs_gpu
@pytest.mark.parametrize("per_task", [False, True])
@pytest.mark.parametrize("mode", ["group", "channel"])
def test_whole_phase2_from_weights_is_captured_and_replayed(mode: str, per_task: bool) -> None:
    plan, grads, weights, scales = _graph_inputs(3)
    out = torch.empty_like(grads[0])
    results: list[Any] = []

    def step() -> None:
        result = ck.phase2_from_weights(
            grads, plan, weights, scales, mode=mode, out=out, per_task=per_task, check=False,
            backend="triton",
        )  # fmt: skip
        results.append(result)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # builds the tables, autotunes, compiles
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    captured = results[-1]
    _, new_grads, new_weights, new_scales = _graph_inputs(3, seed=1)  # new values
    grads.copy_(new_grads.flip(1))
    for w, new in zip(weights, new_weights, strict=True):
        w.copy_(new.flip(0))
    scales.copy_(new_scales.flip(1))
    graph.replay()
    torch.cuda.synchronize()
    expected = ck.phase2_from_weights(grads, plan, weights, scales, mode=mode,
                                      per_task=per_task, backend="triton")  # fmt: skip
    if per_task:
        assert torch.equal(captured[0], expected[0]) and torch.equal(captured[1], expected[1])
    else:
        assert torch.equal(captured, expected)


@needs_gpu
@pytest.mark.parametrize("mode", ["group", "channel"])
def test_no_host_synchronisation_after_the_first_call(mode: str) -> None:
    plan, grads, weights, scales = _graph_inputs(3)
    top = ck.plan_top_priority(scales, plan, backend="triton")
    out = torch.empty_like(grads[0])

    def calls() -> None:
        ck.phase2(grads, plan, top=top, mode=mode, out=out, check=False, backend="triton")
        ck.phase2_from_weights(grads, plan, weights, scales, mode=mode, out=out, check=False,
                               backend="triton")  # fmt: skip

    calls()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        calls()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()


def _gpu_backends() -> list[str]:
    return [b for b in ("triton", "cuda") if b in ck.available_backends(DEVICE)]


@needs_gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_bad_input_on_cuda_is_rejected_and_leaves_the_caller_tensors(backend: str) -> None:
    """Wrong devices, layouts, dtypes and values of CUDA inputs: a clear error naming the
    argument (no crash inside a kernel), and the caller's tensors unchanged."""
    if backend not in _gpu_backends():
        pytest.skip(f"{backend}: {ck.backend_status()[backend]}")
    plan = ck.Phase2Plan([(0, 3, 4)], 20)
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    grads = torch.randn(2, 20, generator=gen, device=DEVICE)
    top = torch.tensor([0, 1, 0], device=DEVICE)
    strength = torch.rand(2, 3, generator=gen, device=DEVICE)
    out = torch.full((20,), 7.0, device=DEVICE)
    nan_grads = grads.clone()
    nan_grads[1, 5] = float("nan")
    cases: list[tuple[str, dict[str, Any], type[Exception]]] = [
        ("top", {"top": top.cpu()}, ValueError),
        ("out", {"top": top, "out": out.cpu()}, ValueError),
        ("grads", {"grads": torch.randn(2, 40, device=DEVICE)[:, ::2], "top": top}, ValueError),
        ("grads", {"grads": grads.to(torch.int32), "top": top}, TypeError),
        ("grads", {"grads": nan_grads, "top": top, "check_finite": True}, ValueError),
        ("top", {"top": torch.tensor([0, 5, 0], device=DEVICE)}, ValueError),
        ("strength", {"strength": strength[:1]}, ValueError),
        ("strength", {"strength": strength.cpu()}, ValueError),
    ]
    before = [t.clone() for t in (grads, top, strength, out)]
    for name, kw, exc in cases:
        call = {"grads": grads, "out": out, **kw}
        with pytest.raises(exc, match=name):
            ck.phase2(call.pop("grads"), plan, **call, backend=backend)
    for tensor, saved in zip((grads, top, strength, out), before, strict=True):
        assert torch.equal(tensor, saved)


@needs_gpu
def test_autotuning_picks_a_candidate_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(tuning.AUTOTUNE_ENV, "1")
    full = model_plan("resnet50")
    plan = ck.Phase2Plan(full.layers[:20], full.layers[19].offset + full.layers[19].numel)
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    grads = torch.randn(3, plan.numel, generator=gen, device=DEVICE)
    top = torch.randint(0, 3, (plan.total_channels,), generator=gen, device=DEVICE)
    first = ck.phase2(grads, plan, top=top, backend="triton")
    tuned = plan.cached("triton.tuned", DEVICE, dict)
    key = ("phase2", 3, torch.float32, True, False)
    assert tuned[key] in tuning.phase2_candidates(plan, 4)
    assert torch.equal(ck.phase2(grads, plan, top=top, backend="triton"), first)
    assert_close(first, ck.phase2(grads, plan, top=top, backend="torch"), torch.float32, "tuned")
