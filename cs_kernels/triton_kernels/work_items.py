"""Device-resident work-item tables: one launch covers every layer and gap of a plan.

Each program of a launch reads one row of an int64 ``[items, 8]`` table (multi-tensor-apply
style, but in device memory, so there is no kernel-argument limit):

    (start, size, row_length, subrows, first_channel, layer, kind, align)

* ``ROWS``: ``size`` whole rows of one layer from element ``start``, each folded into
  ``subrows = ceil(row_length / width)`` sub-rows; as many rows as fit ``tile`` elements.
* ``LONG_ROW``: one row longer than a tile (``subrows > tile / width``), walked in chunks.
* ``GAP``: ``size <= tile`` plainly summed elements from ``start``.

``align`` is the largest power of two (at most 16) dividing ``start``, the row length (or
gap length) and ``N``: the kernels take a vectorisable path where it covers a 16-byte
vector. Items are sorted by ``start``. Tables are built on the host once per plan, device
and tile configuration, and cached on the plan.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from cs_kernels.plan import Phase2Plan, traced_as_constant

ROWS, LONG_ROW, GAP = 0, 1, 2
COLUMNS = 8
MAX_ALIGN = 16


class WeightItems(NamedTuple):
    """Work items over the shared weights, and how many items each layer has."""

    items: Tensor  # int64 [items, 8]; ``start`` is relative to the layer's weight
    counts: Tensor  # int32 [L]


def alignment(*values: int) -> int:
    """Largest power of two (at most `MAX_ALIGN`) dividing every value (0 divides all)."""
    common = 0
    for value in values:
        common = math.gcd(common, value)
    return MAX_ALIGN if common == 0 else min(common & -common, MAX_ALIGN)


def _layer_items(
    base: int,
    channels: int,
    row_length: int,
    first_channel: int,
    layer: int,
    tile: int,
    width: int,
    numel: int,
) -> list[tuple[int, ...]]:
    """Items covering one layer's rows; ``base`` is the offset of its first row."""
    subrows = -(-row_length // width)
    per_tile = tile // width
    found: list[tuple[int, ...]] = []
    if subrows <= per_tile:
        rows = per_tile // subrows
        for r0 in range(0, channels, rows):
            start = base + r0 * row_length
            found.append(
                (start, min(rows, channels - r0), row_length, subrows, first_channel + r0, layer,
                 ROWS, alignment(start, row_length, numel))
            )  # fmt: skip
    else:
        for r in range(channels):
            start = base + r * row_length
            found.append(
                (start, 1, row_length, subrows, first_channel + r, layer, LONG_ROW,
                 alignment(start, row_length, numel))
            )  # fmt: skip
    return found


def _table(rows: list[tuple[int, ...]]) -> Tensor:
    return torch.tensor(rows, dtype=torch.int64).reshape(len(rows), COLUMNS)


def phase2_items(plan: Phase2Plan, tile: int, width: int) -> Tensor:
    """The ``[items, 8]`` table of a plan's layers and gaps, sorted by start."""
    found: list[tuple[int, ...]] = []
    for index, (layer, first) in enumerate(zip(plan.layers, plan.first_channels, strict=True)):
        found += _layer_items(
            layer.offset, layer.channels, layer.row_length, first, index, tile, width, plan.numel
        )
    for offset, length in plan.gaps:
        for start in range(offset, offset + length, tile):
            size = min(tile, offset + length - start)
            found.append((start, size, 0, 0, 0, 0, GAP, alignment(start, size, plan.numel)))
    found.sort(key=lambda item: item[0])
    return _table(found)


def weight_items(plan: Phase2Plan, tile: int, width: int) -> WeightItems:
    """Items over each layer's own ``[C, D]`` weight, layer by layer, with per-layer counts."""
    found: list[tuple[int, ...]] = []
    counts = []
    for index, (layer, first) in enumerate(zip(plan.layers, plan.first_channels, strict=True)):
        items = _layer_items(0, layer.channels, layer.row_length, first, index, tile, width, 0)
        counts.append(len(items))
        found += items
    return WeightItems(_table(found), torch.tensor(counts, dtype=torch.int32))


@traced_as_constant
def cached_phase2_items(plan: Phase2Plan, device: torch.device, tile: int, width: int) -> Tensor:
    """`phase2_items`, built once per plan, device and configuration."""
    return plan.cached(
        f"triton.phase2_items.{tile}.{width}", device, lambda: phase2_items(plan, tile, width)
    )


@traced_as_constant
def cached_weight_items(
    plan: Phase2Plan, device: torch.device, tile: int, width: int
) -> WeightItems:
    """`weight_items`, built once per plan, device and configuration."""
    return plan.cached(
        f"triton.weight_items.{tile}.{width}", device, lambda: weight_items(plan, tile, width)
    )
