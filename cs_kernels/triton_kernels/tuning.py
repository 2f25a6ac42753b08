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
WIDTHS = (256, 128, 64, 32, 16, 8, 4)
WIDTH_TOLERANCE = 0.98


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


def best_width(rows: Sequence[tuple[int, int]], tile: int) -> int:
    """The widest sub-row width that masks at most 2% more lanes than the best one: wider
    sub-rows mean longer contiguous runs and fewer sub-rows per row to sum."""
    widths = [w for w in WIDTHS if w <= tile and tile // w <= MAX_SUBROWS]
    if not widths:
        return tile
    efficiency = {w: lane_efficiency(rows, tile, w) for w in widths}
    best = max(efficiency.values())
    return max(w for w in widths if efficiency[w] >= WIDTH_TOLERANCE * best)


def _layer_rows(plan: Phase2Plan) -> list[tuple[int, int]]:
    return [(layer.channels, layer.row_length) for layer in plan.layers]


def phase2_candidates(plan: Phase2Plan, element_size: int) -> list[TileConfig]:
    """Configurations worth timing, the heuristic choice first.

    The heuristic takes a tile of 4096 elements (2048 for fp64, whose accumulators take
    twice the registers) over 16 warps: about 100 registers a thread, no spills. The others:
    half the tile over 8 warps (two programs per SM), twice the tile (rows up to 8192 read
    once, at the cost of spilled registers), and the heuristic tile with two pipeline stages.
    The sub-row width of each tile is the one that masks the fewest lanes of this plan.
    """
    rows = _layer_rows(plan)
    if INTERPRETED:
        return [TileConfig(2048, best_width(rows, 2048), 1, 1)]
    base = 2048 if element_size >= 8 else 4096
    shapes = [(base, 16, 1), (base // 2, 8, 1), (base * 2, 16, 1), (base, 16, 2)]
    return [TileConfig(t, best_width(rows, t), warps, stages) for t, warps, stages in shapes]


def strength_config(plan: Phase2Plan) -> TileConfig:
    """The strength kernel reads the weights once (``N`` elements, not ``T * N``): a fixed,
    heuristic configuration is enough."""
    rows = _layer_rows(plan)
    tile = 512 if INTERPRETED else 2048
    return TileConfig(tile, best_width(rows, tile), 1 if INTERPRETED else 8, 1)


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
