"""``@triton.jit`` helpers shared by the strength and Phase 2 kernels.

A *row tile* holds whole channel rows: ``rows`` consecutive rows of ``row_length``
elements (one contiguous run of memory, since rows are contiguous), each row folded into
``subrows = ceil(row_length / WIDTH)`` sub-rows of ``WIDTH`` lanes, in a ``[SUB, WIDTH]``
register tile. Any row length fits one compiled kernel; per-row reductions sum a row's
sub-rows. A *flat tile* is ``SUB * WIDTH`` consecutive elements (a gap chunk, or one chunk of
a row too long for a row tile).

Offsets within a tile are int32; the bases they are added to are int64 (``T * N`` may
exceed 2**31). Reductions have a fixed shape and order, so
every result is deterministic for a given tile configuration.
"""

from __future__ import annotations

import triton
import triton.language as tl

# Columns of a work-item row (see `work_items`), and the item kinds.
COLUMNS = tl.constexpr(8)
ROWS = tl.constexpr(0)
LONG_ROW = tl.constexpr(1)
GAP = tl.constexpr(2)


@triton.jit
def aligned(value, VEC: tl.constexpr):
    """``value`` rounded down to a multiple of ``VEC``: equal to ``value`` where the caller
    checked that it is one, and provably a multiple, so the compiler may vectorise."""
    return (value // VEC) * VEC


@triton.jit
def valid_task(top, num_tasks):
    """``top`` (int64) as int32, clamped to ``[0, T)``: with ``check=False`` an out-of-range
    task index gives an unspecified result, never an access outside ``grads``."""
    return tl.minimum(tl.maximum(top, 0), num_tasks - 1).to(tl.int32)


@triton.jit
def row_tile(rows, row_length, subrows, SUB: tl.constexpr, WIDTH: tl.constexpr):
    """Geometry of a row tile.

    Returns ``row [SUB]`` (row of each sub-row), ``lead [SUB]`` (first sub-row of its row),
    ``row_ok [SUB]`` (``row < rows``), ``mask [SUB, WIDTH]`` and ``rel [SUB, WIDTH]``, the
    int32 element offsets from the tile's first element (callers add them to a scalar base
    pointer, which keeps one register per lane).
    """
    sub = tl.arange(0, SUB)
    row = sub // subrows
    piece = sub - row * subrows
    col = piece[:, None] * WIDTH + tl.arange(0, WIDTH)[None, :]
    row_ok = row < rows
    mask = row_ok[:, None] & (col < row_length)
    rel = (row * row_length)[:, None] + col
    return row, piece == 0, row_ok, mask, rel


@triton.jit
def flat_tile(length, first, SUB: tl.constexpr, WIDTH: tl.constexpr):
    """``mask, rel [SUB, WIDTH]``: elements ``first ..`` of a run of ``length`` (int32)."""
    rel = first + (tl.arange(0, SUB) * WIDTH)[:, None] + tl.arange(0, WIDTH)[None, :]
    return rel < length, rel


@triton.jit
def row_totals(partial, row, subrows, rows):
    """Per-row sums of the sub-row partials ``partial [SUB]``, broadcast back to every sub-row
    of the row. Rows of one sub-row and tiles of one row need no segmented sum."""
    if subrows == 1:
        total = partial
    else:
        if rows == 1:
            total = tl.zeros_like(partial) + tl.sum(partial, axis=0)
        else:
            same = row[:, None] == row[None, :]
            total = tl.sum(tl.where(same, partial[None, :], 0.0), axis=1)
    return total


@triton.jit
def layer_is_uniform(top_ptr, layers_ptr, layer, BLOCK: tl.constexpr):
    """1 when every channel of ``layer`` has the same top task, else 0 (int32 scalar).

    Scans the layer's ``top`` in blocks and stops at the first block that differs.
    """
    channels = tl.load(layers_ptr + layer * 4 + 1)
    first = tl.load(layers_ptr + layer * 4 + 3)
    lead = tl.load(top_ptr + first)
    pos = tl.full([], 0, tl.int64)
    uniform = tl.full([], 1, tl.int32)
    while (pos < channels) & (uniform != 0):
        idx = pos + tl.arange(0, BLOCK)
        tops = tl.load(top_ptr + first + idx, mask=idx < channels, other=lead)
        uniform = (tl.max((tops != lead).to(tl.int32), axis=0) == 0).to(tl.int32)
        pos += BLOCK
    return uniform
