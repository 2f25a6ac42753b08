"""Phase 2 in steps (`cs_kernels.phase2_steps`) as Triton kernels: one launch each over every
layer and gap of a plan, one program per row of Phase 2's work-item table (`work_items`).

* `gram_kernel`: per channel row, the ``T x T`` Gram matrix ``<G_i[c], G_j[c]>`` (the
  diagonal is the rows' squared norms, from the same pass), into ``gram [C, T, T]``; with
  ``SUM`` also the plain sum ``sum_t G_t`` of every element (rows and gaps) into ``out``.
  A row tile loads task ``i``'s rows once per ``i`` and task ``j``'s rows once per pair: the
  rows of a tile come from DRAM once, the re-reads from L1/L2.
* `project_kernel`: ``out = sum_t G_t - (sum_j coef[j, c]) G_top(c)`` on the rows, the plain
  sum on the gaps; with ``HOLDS_SUM`` the plain sum is already in ``out`` (from the Gram
  launch) and only rows with a non-zero shrink are read and rewritten (for bf16/fp16 their
  sum is recomputed from the gradients, so the result is rounded once); gaps are left alone
  unless the projected rows are wanted.

Accumulation is fp32 (fp64 for fp64 gradients); every reduction has a fixed shape and order
(deterministic, no atomics). No host synchronisation.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from cs_kernels._validation import accumulation_dtype
from cs_kernels.triton_kernels.phase2 import (
    FP_FUSION,
    _load_item,
    _pass1_gap,
    _write_projected,
    triton_dtype,
)
from cs_kernels.triton_kernels.tiles import (
    COLUMNS,
    GAP,
    ROWS,
    aligned,
    flat_tile,
    row_tile,
    row_totals,
    valid_task,
)
from cs_kernels.triton_kernels.tuning import TileConfig, task_block


@triton.jit
def _gram_rows(
    grads_ptr, out_ptr, gram_ptr, stride, num_tasks, start, rows, row_length, subrows,
    first_channel, SUB: tl.constexpr, WIDTH: tl.constexpr, SUM: tl.constexpr, ACC,
):  # fmt: skip
    grads_ptr += start  # scalar int64 bases; per-lane offsets stay int32
    out_ptr += start
    row, lead, row_ok, mask, rel = row_tile(rows, row_length, subrows, SUB, WIDTH)
    channel = tl.cast(first_channel + row, tl.int64)
    square = num_tasks * num_tasks
    keep = row_ok & lead
    total = tl.zeros([SUB, WIDTH], ACC)
    for i in range(0, num_tasks):
        g_i = tl.load(grads_ptr + tl.cast(i, tl.int64) * stride + rel, mask=mask, other=0)
        g_i = g_i.to(ACC)
        if SUM:
            total += g_i
        for j in range(i, num_tasks):
            g_j = tl.load(grads_ptr + tl.cast(j, tl.int64) * stride + rel, mask=mask, other=0)
            dots = row_totals(tl.sum(g_i * g_j.to(ACC), axis=1), row, subrows, rows)
            tl.store(gram_ptr + channel * square + i * num_tasks + j, dots, mask=keep)
            tl.store(gram_ptr + channel * square + j * num_tasks + i, dots, mask=keep)
    if SUM:
        tl.store(out_ptr + rel, total.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gram_long(
    grads_ptr, out_ptr, gram_ptr, stride, num_tasks, start, row_length, channel,
    SUB: tl.constexpr, WIDTH: tl.constexpr, TB: tl.constexpr, SUM: tl.constexpr, ACC,
):  # fmt: skip
    """A row longer than a tile, walked in chunks; the ``[TB, TB]`` sums stay in registers."""
    grads_ptr += start
    out_ptr += start
    task = tl.arange(0, TB)
    acc = tl.zeros([TB, TB], ACC)
    for first in range(0, row_length, SUB * WIDTH):
        mask, rel = flat_tile(row_length, first, SUB, WIDTH)
        total = tl.zeros([SUB, WIDTH], ACC)
        for i in range(0, num_tasks):
            g_i = tl.load(grads_ptr + tl.cast(i, tl.int64) * stride + rel, mask=mask, other=0)
            g_i = g_i.to(ACC)
            if SUM:
                total += g_i
            for j in range(i, num_tasks):
                g_j = tl.load(
                    grads_ptr + tl.cast(j, tl.int64) * stride + rel, mask=mask, other=0
                ).to(ACC)
                dot = tl.sum(tl.sum(g_i * g_j, axis=1), axis=0)
                acc = tl.where((task == i)[:, None] & (task == j)[None, :], acc + dot, acc)
        if SUM:
            tl.store(out_ptr + rel, total.to(out_ptr.dtype.element_ty), mask=mask)
    upper = task[:, None] <= task[None, :]
    full = tl.where(upper, acc, tl.trans(acc))
    ok = (task < num_tasks)[:, None] & (task < num_tasks)[None, :]
    square = num_tasks * num_tasks
    where = gram_ptr + tl.cast(channel, tl.int64) * square
    tl.store(where + task[:, None] * num_tasks + task[None, :], full, mask=ok)


@triton.jit(do_not_specialize=["num_tasks"])
def gram_kernel(
    grads_ptr, out_ptr, gram_ptr, items_ptr, stride, num_tasks,
    SUB: tl.constexpr, WIDTH: tl.constexpr, TB: tl.constexpr, VEC: tl.constexpr,
    SUM: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    """One work item: its rows' Gram matrices (and, with ``SUM``, the plain sum)."""
    item = items_ptr + tl.program_id(0) * COLUMNS
    start, size, row_length, subrows, channel, _layer, kind, vectorised = _load_item(item, VEC)
    if kind == GAP:
        if SUM:
            if vectorised:
                _pass1_gap(grads_ptr, out_ptr, out_ptr, stride, num_tasks, 0,
                           aligned(start, VEC), aligned(size, VEC), SUB, WIDTH, ACC)  # fmt: skip
            else:
                _pass1_gap(grads_ptr, out_ptr, out_ptr, stride, num_tasks, 0, start, size,
                           SUB, WIDTH, ACC)  # fmt: skip
    elif kind == ROWS:
        if vectorised:
            _gram_rows(grads_ptr, out_ptr, gram_ptr, stride, num_tasks, aligned(start, VEC),
                       size, aligned(row_length, VEC), subrows, channel, SUB, WIDTH, SUM,
                       ACC)  # fmt: skip
        else:
            _gram_rows(grads_ptr, out_ptr, gram_ptr, stride, num_tasks, start, size,
                       row_length, subrows, channel, SUB, WIDTH, SUM, ACC)  # fmt: skip
    else:
        if vectorised:
            _gram_long(grads_ptr, out_ptr, gram_ptr, stride, num_tasks, aligned(start, VEC),
                       aligned(row_length, VEC), channel, SUB, WIDTH, TB, SUM,
                       ACC)  # fmt: skip
        else:
            _gram_long(grads_ptr, out_ptr, gram_ptr, stride, num_tasks, start, row_length,
                       channel, SUB, WIDTH, TB, SUM, ACC)  # fmt: skip


@triton.jit
def _project_tile(
    grads_ptr, out_ptr, proj_ptr, stride, num_tasks, per_task, rel, mask, coef, top,
    TB: tl.constexpr, SUB: tl.constexpr, WIDTH: tl.constexpr, HOLDS_SUM: tl.constexpr,
    EXACT: tl.constexpr, ACC,
):  # fmt: skip
    """One tile: ``coef [SUB, TB]`` and ``top [SUB]`` per sub-row."""
    shrink = tl.sum(coef, axis=1)[:, None]
    if HOLDS_SUM:
        moves = mask & (shrink != 0)
        fetch = tl.where(tl.cast(per_task, tl.int32) != 0, mask, moves)
    else:
        moves = mask
        fetch = mask
    g_top = tl.load(grads_ptr + tl.cast(top, tl.int64)[:, None] * stride + rel, mask=fetch,
                    other=0).to(ACC)  # fmt: skip
    if HOLDS_SUM and EXACT:
        total = tl.load(out_ptr + rel, mask=moves, other=0).to(ACC)
    else:
        # The loads take the tile's geometric mask (see `phase2._pass2_rows` on triton 3.6);
        # a tile with no moving row runs no iteration.
        total = tl.zeros([SUB, WIDTH], ACC)
        any_moves = tl.max(tl.max(moves.to(tl.int32), axis=1), axis=0)
        for j in range(0, tl.where(any_moves != 0, num_tasks, 0)):
            total += tl.load(
                grads_ptr + tl.cast(j, tl.int64) * stride + rel, mask=mask, other=0
            ).to(ACC)
    value = total - shrink * g_top
    tl.store(out_ptr + rel, value.to(out_ptr.dtype.element_ty), mask=moves)
    if per_task != 0:
        _write_projected(grads_ptr, proj_ptr, stride, num_tasks, rel, mask, coef, g_top,
                         TB, ACC)  # fmt: skip


@triton.jit
def _project_rows(
    grads_ptr, out_ptr, proj_ptr, top_ptr, coef_ptr, stride, channels, num_tasks, per_task,
    start, rows, row_length, subrows, first_channel,
    SUB: tl.constexpr, WIDTH: tl.constexpr, TB: tl.constexpr, HOLDS_SUM: tl.constexpr,
    EXACT: tl.constexpr, ACC,
):  # fmt: skip
    grads_ptr += start
    out_ptr += start
    proj_ptr += start
    row, _lead, row_ok, mask, rel = row_tile(rows, row_length, subrows, SUB, WIDTH)
    channel = tl.cast(first_channel + row, tl.int64)
    top = valid_task(tl.load(top_ptr + channel, mask=row_ok, other=0), num_tasks)
    task = tl.arange(0, TB)[None, :]
    coef = tl.load(
        coef_ptr + tl.cast(task, tl.int64) * channels + channel[:, None],
        mask=row_ok[:, None] & (task < num_tasks),
        other=0.0,
    ).to(ACC)
    _project_tile(grads_ptr, out_ptr, proj_ptr, stride, num_tasks, per_task, rel, mask, coef,
                  top, TB, SUB, WIDTH, HOLDS_SUM, EXACT, ACC)  # fmt: skip


@triton.jit
def _project_long(
    grads_ptr, out_ptr, proj_ptr, top_ptr, coef_ptr, stride, channels, num_tasks, per_task,
    start, row_length, channel,
    SUB: tl.constexpr, WIDTH: tl.constexpr, TB: tl.constexpr, HOLDS_SUM: tl.constexpr,
    EXACT: tl.constexpr, ACC,
):  # fmt: skip
    grads_ptr += start
    out_ptr += start
    proj_ptr += start
    top = valid_task(tl.load(top_ptr + channel), num_tasks)
    task = tl.arange(0, TB)[None, :]
    coef = tl.load(
        coef_ptr + tl.cast(task, tl.int64) * channels + channel, mask=task < num_tasks, other=0.0
    ).to(ACC)  # [1, TB]
    coef = coef + tl.zeros([SUB, TB], ACC)
    tops = top + tl.zeros([SUB], tl.int32)
    for first in range(0, row_length, SUB * WIDTH):
        mask, rel = flat_tile(row_length, first, SUB, WIDTH)
        _project_tile(grads_ptr, out_ptr, proj_ptr, stride, num_tasks, per_task, rel, mask,
                      coef, tops, TB, SUB, WIDTH, HOLDS_SUM, EXACT, ACC)  # fmt: skip


@triton.jit(do_not_specialize=["channels", "num_tasks", "per_task"])
def project_kernel(
    grads_ptr, out_ptr, proj_ptr, top_ptr, coef_ptr, items_ptr, stride, channels, num_tasks,
    per_task,
    SUB: tl.constexpr, WIDTH: tl.constexpr, TB: tl.constexpr, VEC: tl.constexpr,
    HOLDS_SUM: tl.constexpr, EXACT: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    """One work item: its rows projected with ``coef [T, C]``, or its gap plainly summed."""
    item = items_ptr + tl.program_id(0) * COLUMNS
    start, size, row_length, subrows, channel, _layer, kind, vectorised = _load_item(item, VEC)
    if kind == GAP:
        wanted = tl.cast(per_task, tl.int32)  # a gap: the projected rows, or the plain sum
        if not HOLDS_SUM:
            wanted = wanted + 1
        if wanted != 0:
            if vectorised:
                _pass1_gap(grads_ptr, out_ptr, proj_ptr, stride, num_tasks, per_task,
                           aligned(start, VEC), aligned(size, VEC), SUB, WIDTH, ACC)  # fmt: skip
            else:
                _pass1_gap(grads_ptr, out_ptr, proj_ptr, stride, num_tasks, per_task, start,
                           size, SUB, WIDTH, ACC)  # fmt: skip
    elif kind == ROWS:
        if vectorised:
            _project_rows(grads_ptr, out_ptr, proj_ptr, top_ptr, coef_ptr, stride, channels,
                          num_tasks, per_task, aligned(start, VEC), size,
                          aligned(row_length, VEC), subrows, channel, SUB, WIDTH, TB,
                          HOLDS_SUM, EXACT, ACC)  # fmt: skip
        else:
            _project_rows(grads_ptr, out_ptr, proj_ptr, top_ptr, coef_ptr, stride, channels,
                          num_tasks, per_task, start, size, row_length, subrows, channel,
                          SUB, WIDTH, TB, HOLDS_SUM, EXACT, ACC)  # fmt: skip
    else:
        if vectorised:
            _project_long(grads_ptr, out_ptr, proj_ptr, top_ptr, coef_ptr, stride, channels,
                          num_tasks, per_task, aligned(start, VEC), aligned(row_length, VEC),
                          channel, SUB, WIDTH, TB, HOLDS_SUM, EXACT, ACC)  # fmt: skip
        else:
            _project_long(grads_ptr, out_ptr, proj_ptr, top_ptr, coef_ptr, stride, channels,
                          num_tasks, per_task, start, row_length, channel, SUB, WIDTH, TB,
                          HOLDS_SUM, EXACT, ACC)  # fmt: skip


def _shared(grads: Tensor, config: TileConfig) -> dict[str, object]:
    return {
        "SUB": config.subrows,
        "WIDTH": config.width,
        "TB": task_block(grads.shape[0]),
        "VEC": max(1, 16 // grads.element_size()),
        "ACC": triton_dtype(accumulation_dtype(grads.dtype)),
        "num_warps": config.num_warps,
        "num_stages": config.num_stages,
        "enable_fp_fusion": FP_FUSION,
    }


def run_gram(
    grads: Tensor, items: Tensor, channels: int, out: Tensor | None, *, config: TileConfig
) -> Tensor:
    """``grads [T, N]`` -> ``gram [channels, T, T]`` (accumulation dtype); writes the plain
    sum into ``out [N]`` when given. ``items``: `work_items.phase2_items` for ``config``."""
    tasks, numel = grads.shape
    acc = accumulation_dtype(grads.dtype)
    gram = torch.zeros((channels, tasks, tasks), dtype=acc, device=grads.device)
    if items.shape[0] == 0:
        return gram
    gram_kernel[(items.shape[0],)](
        grads, out if out is not None else grads, gram, items, numel, tasks,
        SUM=out is not None, **_shared(grads, config),
    )  # fmt: skip
    return gram


def run_project(
    grads: Tensor,
    top: Tensor,
    coefficients: Tensor,
    items: Tensor,
    out: Tensor,
    projected: Tensor | None,
    *,
    out_holds_sum: bool,
    config: TileConfig,
) -> None:
    """Writes ``out [N]`` (onto the plain sum in it when ``out_holds_sum``) and, when given,
    ``projected [T, N]``; ``coefficients [T, C]`` in the accumulation dtype, contiguous."""
    tasks, numel = grads.shape
    if items.shape[0] == 0:
        return
    shared = _shared(grads, config)
    project_kernel[(items.shape[0],)](
        grads, out, projected if projected is not None else out, top, coefficients, items,
        numel, top.shape[0], tasks, int(projected is not None),
        HOLDS_SUM=out_holds_sum, EXACT=out.dtype == accumulation_dtype(grads.dtype), **shared,
    )  # fmt: skip
