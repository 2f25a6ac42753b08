"""Tile configurations: candidates, the heuristic choice, and the autotuner.

A configuration fixes the tile (elements per task a program covers), the sub-row width
(picked from the plan's row lengths so that few lanes are masked), and the launch's warps
and pipeline stages. On a GPU the first call for a given (plan, T, dtype, mode, per_task)
times every candidate with ``triton.testing.do_bench`` and keeps the fastest, per plan and
device; ``CS_KERNELS_TRITON_AUTOTUNE=0`` keeps the heuristic choice (the first candidate)
instead. Under the interpreter the configuration is small and fixed.

Results are bitwise reproducible for a given configuration (fixed reduction order); two
configurations may differ in the last bits, so set ``CS_KERNELS_TRITON_AUTOTUNE=0`` where
runs in separate processes must agree to the bit.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Hashable, Sequence
from typing import NamedTuple

import torch
import triton

from cs_kernels.plan import Phase2Plan

AUTOTUNE_ENV = "CS_KERNELS_TRITON_AUTOTUNE"
MAX_SUBROWS = 128  # the per-row sum of a row tile builds a [SUB, SUB] mask
# What the tuner may choose is kept small on purpose: `tests/test_triton_aot.py` compiles
# every choice ahead of time, for sm_80 and sm_90, under each supported triton, and one
# compilation costs about 1.4 s of CPU time on the 2-core development machine (measured
# with a cold cache: 120 configurations in 164-170 CPU-seconds, triton 3.6 and 3.9 alike).
# Seven widths and one kernel per power-of-two T up to 32, as before, made 2,776
# configurations per triton version (about 32 minutes on 2 cores, each); this set makes 120
# (about 1.5 minutes).
#
# Sub-row widths: rows of real layers are multiples of 64 nearly always (3x3 convs:
# 9 * C_in; 1x1 convs and Linear layers: C_in), where width 64 masks no lane; a row is
# contiguous in memory whatever the width, so a narrower one only pays off for plans of
# rows shorter than 64 (tiny models, which are launch-bound anyway).
WIDTHS = (64,)
WIDTH_TOLERANCE = 0.98
# The task dimension TB of the kernels' per-row ``[SUB, TB]`` tiles (dots, coefficients) is
# a compile-time constant: one kernel with TB = 32 serves every T <= 32. The unused columns
# cost a few registers and selects per task, next to the T tile loads each program issues.
TASK_BLOCKS = (32,)


@triton.jit
def _probe() -> None:
    pass


# triton decides at decoration time (TRITON_INTERPRET) whether kernels are interpreted.
INTERPRETED = not isinstance(_probe, triton.runtime.JITFunction)


class TileConfig(NamedTuple):
    """One launch configuration of the row-tile kernels."""

    tile: int  # elements per task one program covers (power of two)
    width: int  # sub-row width (power of two); tile // width sub-rows
    num_warps: int
    num_stages: int

    @property
    def subrows(self) -> int:
        return self.tile // self.width


def task_block(tasks: int) -> int:
    """TB for ``tasks`` tasks: the smallest of `TASK_BLOCKS` that holds them. Past the
    largest, the next power of two: compiled on first use, outside the ahead-of-time check."""
    for block in TASK_BLOCKS:
        if tasks <= block:
            return block
    return int(triton.next_power_of_2(tasks))


def widths_for(tile: int) -> list[int]:
    """The sub-row widths a tile of ``tile`` elements may use, widest first."""
    return [w for w in WIDTHS if w <= tile and tile // w <= MAX_SUBROWS]


def lane_efficiency(rows: Sequence[tuple[int, int]], tile: int, width: int) -> float:
    """Fraction of tile lanes holding data for layers ``rows = [(channels, row_length)]``."""
    per_tile = tile // width
    useful = lanes = 0
    for channels, row_length in rows:
        useful += channels * row_length
        subrows = -(-row_length // width)
        if subrows <= per_tile:
            lanes += -(-channels // (per_tile // subrows)) * tile
        else:
            lanes += channels * -(-row_length // tile) * tile
    return useful / lanes if lanes else 1.0


def best_width(
    rows: Sequence[tuple[int, int]], tile: int, widths: Sequence[int] | None = None
) -> int:
    """The widest sub-row width (of ``widths``, default `widths_for`) that masks at most 2%
    more lanes than the best one: wider sub-rows mean longer contiguous runs and fewer
    sub-rows per row to sum."""
    widths = list(widths) if widths is not None else widths_for(tile)
    efficiency = {w: lane_efficiency(rows, tile, w) for w in widths}
    best = max(efficiency.values())
    return max(w for w in widths if efficiency[w] >= WIDTH_TOLERANCE * best)


def _layer_rows(plan: Phase2Plan) -> list[tuple[int, int]]:
    return [(layer.channels, layer.row_length) for layer in plan.layers]


def phase2_shapes(element_size: int) -> list[tuple[int, int, int]]:
    """``(tile, num_warps, num_stages)`` of the Phase 2 candidates, the heuristic first.

    The heuristic takes a tile of 4096 elements (2048 for fp64, whose accumulators take
    twice the registers) over 16 warps: about 100 registers a thread, no spills. The others:
    half the tile over 8 warps (two programs per SM), twice the tile (rows up to 8192 read
    once, at the cost of spilled registers), and the heuristic tile with two pipeline stages.
    """
    if INTERPRETED:
        return [(2048, 1, 1)]
    base = 2048 if element_size >= 8 else 4096
    return [(base, 16, 1), (base // 2, 8, 1), (base * 2, 16, 1), (base, 16, 2)]


def phase2_candidates(plan: Phase2Plan, element_size: int) -> list[TileConfig]:
    """Configurations worth timing (`phase2_shapes`), the heuristic choice first; the
    sub-row width of each tile is the one that masks the fewest lanes of this plan."""
    rows = _layer_rows(plan)
    return [
        TileConfig(tile, best_width(rows, tile), warps, stages)
        for tile, warps, stages in phase2_shapes(element_size)
    ]


def phase2_space(element_size: int) -> list[TileConfig]:
    """Every configuration `phase2_candidates` can return, whatever the plan: what the
    ahead-of-time compile check covers."""
    return [
        TileConfig(tile, width, warps, stages)
        for tile, warps, stages in phase2_shapes(element_size)
        for width in widths_for(tile)
    ]


def steps_config(plan: Phase2Plan, element_size: int) -> TileConfig:
    """The Phase 2 steps (`steps`) take the heuristic Phase 2 configuration, untuned: the
    projection onto the plain sum rewrites its output in place, so it cannot be re-run to
    time candidates."""
    return phase2_candidates(plan, element_size)[0]


def steps_space(element_size: int) -> list[TileConfig]:
    """Every configuration `steps_config` can return, whatever the plan."""
    tile, warps, stages = phase2_shapes(element_size)[0]
    return [TileConfig(tile, width, warps, stages) for width in widths_for(tile)]


STRENGTH_TILE = 512 if INTERPRETED else 2048
STRENGTH_WARPS = 1 if INTERPRETED else 8


def strength_config(plan: Phase2Plan) -> TileConfig:
    """The strength kernel reads the weights once (``N`` elements, not ``T * N``): a fixed,
    heuristic configuration is enough."""
    rows = _layer_rows(plan)
    return TileConfig(STRENGTH_TILE, best_width(rows, STRENGTH_TILE), STRENGTH_WARPS, 1)


def strength_space() -> list[TileConfig]:
    """Every configuration `strength_config` can return, whatever the plan."""
    return [TileConfig(STRENGTH_TILE, w, STRENGTH_WARPS, 1) for w in widths_for(STRENGTH_TILE)]


def autotune_enabled() -> bool:
    return os.environ.get(AUTOTUNE_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def choose(
    plan: Phase2Plan,
    device: torch.device,
    key: Hashable,
    candidates: Sequence[TileConfig],
    run: Callable[[TileConfig], object],
) -> TileConfig:
    """The configuration for ``key`` on ``plan``: tuned once per plan and device.

    ``run(config)`` launches the whole computation with ``config`` (idempotent: it rewrites
    its outputs). Timing syncs the device, so it happens on the first eager call only: never
    while ``torch.compile`` traces or a CUDA graph captures (the heuristic choice is used then,
    and not remembered).
    """
    tuned: dict[Hashable, TileConfig] = plan.cached("triton.tuned", device, dict)
    found = tuned.get(key)
    if found is not None:
        return found
    default = candidates[0]
    if torch.compiler.is_compiling():
        return default
    if len(candidates) == 1 or device.type != "cuda" or not autotune_enabled():
        tuned[key] = default
        return default
    if torch.cuda.is_current_stream_capturing():
        return default
    best, best_ms, failure = default, float("inf"), None
    for config in candidates:
        try:
            ms = float(triton.testing.do_bench(lambda c=config: run(c), warmup=5, rep=25))
        except Exception as exc:  # e.g. out of registers or shared memory on this device
            failure = failure or exc
            continue
        if ms < best_ms:
            best, best_ms = config, ms
    if best_ms == float("inf") and failure is not None:
        raise failure
    tuned[key] = best
    return best
