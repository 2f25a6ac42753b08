"""Phase 2 kernels over the stacked buffer ``grads: [T, N]`` (docs/algorithm.md, "Phase 2").

One launch of `pass1_kernel` covers every layer and gap of the plan, one program per work
item (`work_items`):

* a row tile loads the top task's rows once, then each task's rows once (the top task's own
  rows are taken from the first load, not read again), and keeps the running sum
  ``sum_j G_j`` and ``G_top`` in registers;
* **channel mode** finishes there: per row, ``coef_j = <G_top, G_j> / ||G_top||^2`` where
  negative, and ``out = sum_j G_j - (sum_j coef_j) G_top``: every gradient element is read
  once and ``out`` written once;
* **group mode** writes the plain sum and each row's dots ``[C, T]``; `group_kernel` (one
  program per layer) sums the dots of each (layer, top task) group in channel order, a
  deterministic second stage with no atomics, into the coefficients ``[L, T, T]``; then
  `pass2_kernel` touches only rows that project: ``out -= shrink * G_top`` (for bf16/fp16
  outputs the sum is recomputed from the gradients, so it is rounded once). Its programs run
  in reverse order, so the rows pass 1 wrote last are the likeliest to be in L2.

Accumulation is fp32 (fp64 for fp64 gradients). Rows longer than a tile (`LONG_ROW`) are
walked in chunks; their projection re-reads ``G_top`` and ``out`` (from L2 in practice).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from cs_kernels._validation import accumulation_dtype
from cs_kernels.triton_kernels.tiles import (
    COLUMNS,
    GAP,
    LONG_ROW,
    ROWS,
    aligned,
    flat_tile,
    layer_is_uniform,
    row_tile,
    row_totals,
    valid_task,
)
from cs_kernels.triton_kernels.tuning import INTERPRETED, TileConfig, task_block

UNIFORM_BLOCK = 64 if INTERPRETED else 1024  # channels per step of the uniform-layer scan
GROUP_BLOCK = 32 if INTERPRETED else 128  # channels per step of the group reduction
# No fused multiply-add: each product is rounded as in the other backends (and results do not
# change when triton's default changes, as announced for 3.10).
FP_FUSION = False


@triton.jit
def _coefficients(dots, top, num_tasks, skip, TB: tl.constexpr):
    """``coef [S, TB]``: ``dots[s, j] / dots[s, top[s]]`` where ``dots[s, j] < 0``,
    ``j != top[s]`` and the top row's squared norm is positive; 0 elsewhere or if ``skip``."""
    task = tl.arange(0, TB)[None, :]
    own = task == top[:, None]
    norm = tl.sum(tl.where(own, dots, 0.0), axis=1)[:, None]
    conflict = (~own) & (task < num_tasks) & (dots < 0) & (norm > 0)
    conflict = tl.where(skip == 0, conflict, False)  # `& scalar` breaks the interpreter
    return tl.where(conflict, dots / tl.where(norm > 0, norm, 1.0), 0.0)


@triton.jit
def _write_projected(
    grads_ptr, proj_ptr, stride, num_tasks, rel, mask, coef, g_top, TB: tl.constexpr, ACC
):
    """``projected[j] = G_j - coef[:, j] * G_top`` (a copy where the coefficient is 0)."""
    task = tl.arange(0, TB)[None, :]
    for j in range(0, num_tasks):
        row = tl.cast(j, tl.int64) * stride
        g = tl.load(grads_ptr + row + rel, mask=mask, other=0)
        c = tl.sum(tl.where(task == j, coef, 0.0), axis=1)[:, None]
        value = tl.where(c != 0, g.to(ACC) - c * g_top, g.to(ACC))
        tl.store(proj_ptr + row + rel, value.to(proj_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _row_dots(partial, row, subrows, rows, num_tasks, TB: tl.constexpr):
    """Per-row dots from per-sub-row partials ``[SUB, TB]``, broadcast to every sub-row."""
    if subrows == 1:
        dots = partial
    else:
        task = tl.arange(0, TB)[None, :]
        dots = tl.zeros_like(partial)
        for j in range(0, num_tasks):
            column = tl.sum(tl.where(task == j, partial, 0.0), axis=1)
            dots = tl.where(task == j, row_totals(column, row, subrows, rows)[:, None], dots)
    return dots


@triton.jit
def _pass1_rows(
    grads_ptr, out_ptr, proj_ptr, top_ptr, dots_ptr, stride, num_tasks, per_task, skip,
    start, rows, row_length, subrows, first_channel,
    SUB: tl.constexpr, WIDTH: tl.constexpr, TB: tl.constexpr, GROUP: tl.constexpr, ACC,
):  # fmt: skip
    grads_ptr += start  # scalar int64 bases; per-lane offsets stay int32
    out_ptr += start
    proj_ptr += start
    row, lead, row_ok, mask, rel = row_tile(rows, row_length, subrows, SUB, WIDTH)
    channel = first_channel + row
    top = valid_task(tl.load(top_ptr + channel, mask=row_ok, other=0), num_tasks)
    g_top = tl.load(grads_ptr + tl.cast(top, tl.int64)[:, None] * stride + rel, mask=mask,
                    other=0).to(ACC)  # fmt: skip
    task = tl.arange(0, TB)[None, :]
    total = tl.zeros([SUB, WIDTH], ACC)
    dots = tl.zeros([SUB, TB], ACC)
    for j in range(0, num_tasks):
        is_top = (top == j)[:, None]
        g = tl.load(
            grads_ptr + tl.cast(j, tl.int64) * stride + rel, mask=mask & ~is_top, other=0
        ).to(ACC)
        g = tl.where(is_top, g_top, g)
        total += g
        dots = tl.where(task == j, tl.sum(g_top * g, axis=1)[:, None], dots)
    dots = _row_dots(dots, row, subrows, rows, num_tasks, TB)  # out of the loop over tasks
    if GROUP:
        tl.store(out_ptr + rel, total.to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(
            dots_ptr + channel[:, None] * TB + task,
            dots,
            mask=(row_ok & lead)[:, None] & (task < num_tasks),
        )
    else:
        coef = _coefficients(dots, top, num_tasks, skip, TB)
        shrink = tl.sum(coef, axis=1)[:, None]
        result = tl.where(shrink != 0, total - shrink * g_top, total)
        tl.store(out_ptr + rel, result.to(out_ptr.dtype.element_ty), mask=mask)
        if per_task != 0:
            _write_projected(grads_ptr, proj_ptr, stride, num_tasks, rel, mask, coef, g_top,
                             TB, ACC)  # fmt: skip


@triton.jit
def _project_long(
    grads_ptr, out_ptr, proj_ptr, stride, num_tasks, per_task, start, row_length, top, coef,
    SUB: tl.constexpr, WIDTH: tl.constexpr, TB: tl.constexpr, EXACT: tl.constexpr, ACC,
):  # fmt: skip
    """Second walk over a long row: ``out -= shrink * G_top`` and the projected rows."""
    grads_ptr += start  # scalar int64 bases; per-lane offsets stay int32
    out_ptr += start
    proj_ptr += start
    shrink = tl.sum(coef)
    top_row = grads_ptr + tl.cast(top, tl.int64) * stride
    if (shrink != 0).to(tl.int32) + (tl.cast(per_task, tl.int32) != 0).to(tl.int32) > 0:
        for first in range(0, row_length, SUB * WIDTH):
            mask, rel = flat_tile(row_length, first, SUB, WIDTH)
            g_top = tl.load(top_row + rel, mask=mask, other=0).to(ACC)
            if shrink != 0:
                if EXACT:
                    total = tl.load(out_ptr + rel, mask=mask, other=0).to(ACC)
                else:  # out was rounded: recompute the sum, so it is rounded once
                    total = tl.zeros([SUB, WIDTH], ACC)
                    for j in range(0, num_tasks):
                        total += tl.load(
                            grads_ptr + tl.cast(j, tl.int64) * stride + rel,
                            mask=mask,
                            other=0,
                        ).to(ACC)
                value = total - shrink * g_top
                tl.store(out_ptr + rel, value.to(out_ptr.dtype.element_ty), mask=mask)
            if per_task != 0:
                _write_projected(grads_ptr, proj_ptr, stride, num_tasks, rel, mask, coef,
                                 g_top, TB, ACC)  # fmt: skip


@triton.jit
def _pass1_long(
    grads_ptr, out_ptr, proj_ptr, top_ptr, dots_ptr, stride, num_tasks, per_task, skip,
    start, row_length, channel,
    SUB: tl.constexpr, WIDTH: tl.constexpr, TB: tl.constexpr, GROUP: tl.constexpr,
    EXACT: tl.constexpr, ACC,
):  # fmt: skip
    grads_ptr += start  # scalar int64 bases; per-lane offsets stay int32
    out_ptr += start
    proj_ptr += start
    top = valid_task(tl.load(top_ptr + channel), num_tasks)
    top_row = grads_ptr + tl.cast(top, tl.int64) * stride
    task = tl.arange(0, TB)
    dots = tl.zeros([TB], ACC)
    for first in range(0, row_length, SUB * WIDTH):
        mask, rel = flat_tile(row_length, first, SUB, WIDTH)
        g_top = tl.load(top_row + rel, mask=mask, other=0).to(ACC)
        total = tl.zeros([SUB, WIDTH], ACC)
        for j in range(0, num_tasks):
            g = tl.load(
                grads_ptr + tl.cast(j, tl.int64) * stride + rel,
                mask=tl.where(top != j, mask, False),
                other=0,
            ).to(ACC)
            g = tl.where(top == j, g_top, g)
            total += g
            dots = tl.where(task == j, dots + tl.sum(g_top * g), dots)
        tl.store(out_ptr + rel, total.to(out_ptr.dtype.element_ty), mask=mask)
    if GROUP:
        tl.store(dots_ptr + channel * TB + task, dots, mask=task < num_tasks)
    else:
        coef = _coefficients(dots[None, :], top + tl.zeros([1], tl.int64), num_tasks, skip, TB)
        _project_long(grads_ptr, out_ptr, proj_ptr, stride, num_tasks, per_task, 0,
                      row_length, top, coef, SUB, WIDTH, TB, EXACT, ACC)  # fmt: skip


@triton.jit
def _pass1_gap(
    grads_ptr, out_ptr, proj_ptr, stride, num_tasks, per_task, start, length,
    SUB: tl.constexpr, WIDTH: tl.constexpr, ACC,
):  # fmt: skip
    grads_ptr += start  # scalar int64 bases; per-lane offsets stay int32
    out_ptr += start
    proj_ptr += start
    mask, rel = flat_tile(length, 0, SUB, WIDTH)
    total = tl.zeros([SUB, WIDTH], ACC)
    for j in range(0, num_tasks):
        row = tl.cast(j, tl.int64) * stride
        g = tl.load(grads_ptr + row + rel, mask=mask, other=0)
        total += g.to(ACC)
        if per_task != 0:
            tl.store(proj_ptr + row + rel, g, mask=mask)
    tl.store(out_ptr + rel, total.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _load_item(item, VEC: tl.constexpr):
    """One row of the work-item table (see work_items.py), unpacked."""
    start = tl.load(item)
    size = tl.load(item + 1).to(tl.int32)
    row_length = tl.load(item + 2).to(tl.int32)
    subrows = tl.load(item + 3).to(tl.int32)
    channel = tl.load(item + 4)
    layer = tl.load(item + 5)
    kind = tl.load(item + 6)
    vectorised = tl.load(item + 7) >= VEC
    return start, size, row_length, subrows, channel, layer, kind, vectorised


@triton.jit(do_not_specialize=["num_tasks", "per_task", "project_uniform"])
def pass1_kernel(
    grads_ptr, out_ptr, proj_ptr, top_ptr, items_ptr, layers_ptr, dots_ptr,
    stride, num_tasks, per_task, project_uniform,
    SUB: tl.constexpr, WIDTH: tl.constexpr, TB: tl.constexpr, VEC: tl.constexpr,
    GROUP: tl.constexpr, EXACT: tl.constexpr, ACC: tl.constexpr, UNIFORM_BLOCK: tl.constexpr,
):  # fmt: skip
    """Pass 1 over one work item: plain sums, row dots, and (channel mode) the projection."""
    item = items_ptr + tl.program_id(0) * COLUMNS
    start, size, row_length, subrows, channel, layer, kind, vectorised = _load_item(item, VEC)
    if kind == GAP:
        if vectorised:
            _pass1_gap(grads_ptr, out_ptr, proj_ptr, stride, num_tasks, per_task,
                       aligned(start, VEC), aligned(size, VEC), SUB, WIDTH, ACC)  # fmt: skip
        else:
            _pass1_gap(grads_ptr, out_ptr, proj_ptr, stride, num_tasks, per_task, start, size,
                       SUB, WIDTH, ACC)  # fmt: skip
    else:
        skip = tl.full([], 0, tl.int32)  # the authors' rule: plainly sum a uniform layer
        if not GROUP:  # noqa: SIM102 (a constexpr and a runtime condition)
            if project_uniform == 0:
                skip = layer_is_uniform(top_ptr, layers_ptr, layer, UNIFORM_BLOCK)
        if kind == ROWS:
            if vectorised:
                _pass1_rows(grads_ptr, out_ptr, proj_ptr, top_ptr, dots_ptr, stride, num_tasks,
                            per_task, skip, aligned(start, VEC), size,
                            aligned(row_length, VEC), subrows, channel,
                            SUB, WIDTH, TB, GROUP, ACC)  # fmt: skip
            else:
                _pass1_rows(grads_ptr, out_ptr, proj_ptr, top_ptr, dots_ptr, stride, num_tasks,
                            per_task, skip, start, size, row_length, subrows, channel,
                            SUB, WIDTH, TB, GROUP, ACC)  # fmt: skip
        else:
            if vectorised:
                _pass1_long(grads_ptr, out_ptr, proj_ptr, top_ptr, dots_ptr, stride, num_tasks,
                            per_task, skip, aligned(start, VEC), aligned(row_length, VEC),
                            channel, SUB, WIDTH, TB, GROUP, EXACT, ACC)  # fmt: skip
            else:
                _pass1_long(grads_ptr, out_ptr, proj_ptr, top_ptr, dots_ptr, stride, num_tasks,
                            per_task, skip, start, row_length, channel,
                            SUB, WIDTH, TB, GROUP, EXACT, ACC)  # fmt: skip


@triton.jit(do_not_specialize=["num_tasks", "project_uniform"])
def group_kernel(
    top_ptr, layers_ptr, dots_ptr, coef_ptr, num_tasks, project_uniform,
    TB: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    """One layer: ``a[i, j] = sum of dots[c, j] over the channels c led by task i`` (channel
    order), then ``coef[i, j] = a[i, j] / a[i, i]`` where ``a[i, j] < 0``, ``j != i``."""
    layer = tl.program_id(0)
    channels = tl.load(layers_ptr + layer * 4 + 1)
    first = tl.load(layers_ptr + layer * 4 + 3)
    lead = tl.load(top_ptr + first)
    task = tl.arange(0, TB)
    a = tl.zeros([TB, TB], ACC)
    mixed = tl.full([], 0, tl.int32)
    for c in range(0, channels, BLOCK):
        idx = c + tl.arange(0, BLOCK)
        ok = idx < channels
        tops = tl.load(top_ptr + first + idx, mask=ok, other=lead)
        dots = tl.load(
            dots_ptr + (first + idx)[:, None] * TB + task[None, :],
            mask=ok[:, None] & (task < num_tasks)[None, :],
            other=0.0,
        )
        for i in range(0, num_tasks):  # where, not a product: a NaN stays in its own group
            part = tl.sum(tl.where((tops == i)[:, None], dots, 0.0), axis=0)
            a = tl.where((task == i)[:, None], a + part[None, :], a)
        mixed = tl.maximum(mixed, tl.max((tops != lead).to(tl.int32), axis=0))
    own = task[:, None] == task[None, :]
    norm = tl.sum(tl.where(own, a, 0.0), axis=1)[:, None]
    valid = (task < num_tasks)[:, None] & (task < num_tasks)[None, :] & ~own
    project = (mixed != 0) | (tl.cast(project_uniform, tl.int32) != 0)
    conflict = tl.where(project, valid & (a < 0) & (norm > 0), False)
    coef = tl.where(conflict, a / tl.where(norm > 0, norm, 1.0), 0.0)
    tl.store(coef_ptr + layer * TB * TB + task[:, None] * TB + task[None, :], coef)


@triton.jit
def _pass2_rows(
    grads_ptr, out_ptr, proj_ptr, top_ptr, coef_ptr, stride, num_tasks, per_task,
    start, rows, row_length, subrows, first_channel, layer,
    SUB: tl.constexpr, WIDTH: tl.constexpr, TB: tl.constexpr, EXACT: tl.constexpr, ACC,
):  # fmt: skip
    grads_ptr += start  # scalar int64 bases; per-lane offsets stay int32
    out_ptr += start
    proj_ptr += start
    row, _lead, row_ok, mask, rel = row_tile(rows, row_length, subrows, SUB, WIDTH)
    top = valid_task(tl.load(top_ptr + first_channel + row, mask=row_ok, other=0), num_tasks)
    task = tl.arange(0, TB)[None, :]
    coef = tl.load(
        coef_ptr + (layer * TB + top)[:, None] * TB + task,
        mask=row_ok[:, None] & (task < num_tasks),
        other=0.0,
    )
    shrink = tl.sum(coef, axis=1)[:, None]
    moves = mask & (shrink != 0)
    fetch = tl.where(tl.cast(per_task, tl.int32) != 0, mask, moves)
    g_top = tl.load(grads_ptr + tl.cast(top, tl.int64)[:, None] * stride + rel, mask=fetch,
                    other=0).to(ACC)  # fmt: skip
    if EXACT:
        total = tl.load(out_ptr + rel, mask=moves, other=0).to(ACC)
    else:  # out was rounded: recompute the sum, so it is rounded once
        # The loop's loads take the tile's geometric `mask`, never `moves`: a mask computed
        # from loaded data (`coef`) must not feed memory operations both inside a loop and
        # after it. Triton 3.6's TritonGPURemoveLayoutConversions keeps a layout conversion
        # it cannot rematerialise (the mask's slice reaches a load), remembers it, and hands
        # it to later uses of the same value without checking dominance: the store below
        # took the conversion placed inside the loop body ("operand #2 does not dominate
        # this use", every bf16/fp16 pass 2 of some tile shapes; later triton checks
        # dominance). A geometric mask is always rematerialised, so no conversion of it is
        # remembered. A tile with no moving row runs no iteration (a scalar trip count); in
        # a tile that projects, the rows that do not move are re-read too (the rows of a
        # layer's group move together, so such tiles are few).
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
def _pass2_long(
    grads_ptr, out_ptr, proj_ptr, top_ptr, coef_ptr, stride, num_tasks, per_task,
    start, row_length, channel, layer,
    SUB: tl.constexpr, WIDTH: tl.constexpr, TB: tl.constexpr, EXACT: tl.constexpr, ACC,
):  # fmt: skip
    top = valid_task(tl.load(top_ptr + channel), num_tasks)
    task = tl.arange(0, TB)
    coef = tl.load(coef_ptr + (layer * TB + top) * TB + task, mask=task < num_tasks, other=0.0)
    _project_long(grads_ptr, out_ptr, proj_ptr, stride, num_tasks, per_task, start, row_length,
                  top, coef[None, :], SUB, WIDTH, TB, EXACT, ACC)  # fmt: skip


@triton.jit(do_not_specialize=["num_tasks", "per_task"])
def pass2_kernel(
    grads_ptr, out_ptr, proj_ptr, top_ptr, items_ptr, coef_ptr, stride, num_tasks, per_task,
    SUB: tl.constexpr, WIDTH: tl.constexpr, TB: tl.constexpr, VEC: tl.constexpr,
    EXACT: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    """Group mode, pass 2 over one work item (items in reverse order; gaps have nothing)."""
    item = items_ptr + (tl.num_programs(0) - 1 - tl.program_id(0)) * COLUMNS
    start, size, row_length, subrows, channel, layer, kind, vectorised = _load_item(item, VEC)
    if kind == ROWS:
        if vectorised:
            _pass2_rows(grads_ptr, out_ptr, proj_ptr, top_ptr, coef_ptr, stride, num_tasks,
                        per_task, aligned(start, VEC), size, aligned(row_length, VEC), subrows,
                        channel, layer, SUB, WIDTH, TB, EXACT, ACC)  # fmt: skip
        else:
            _pass2_rows(grads_ptr, out_ptr, proj_ptr, top_ptr, coef_ptr, stride, num_tasks,
                        per_task, start, size, row_length, subrows, channel, layer,
                        SUB, WIDTH, TB, EXACT, ACC)  # fmt: skip
    elif kind == LONG_ROW:
        if vectorised:
            _pass2_long(grads_ptr, out_ptr, proj_ptr, top_ptr, coef_ptr, stride, num_tasks,
                        per_task, aligned(start, VEC), aligned(row_length, VEC), channel, layer,
                        SUB, WIDTH, TB, EXACT, ACC)  # fmt: skip
        else:
            _pass2_long(grads_ptr, out_ptr, proj_ptr, top_ptr, coef_ptr, stride, num_tasks,
                        per_task, start, row_length, channel, layer,
                        SUB, WIDTH, TB, EXACT, ACC)  # fmt: skip


def triton_dtype(dtype: torch.dtype) -> tl.dtype:
    """The triton scalar type of a torch float dtype."""
    return {
        torch.float32: tl.float32,
        torch.float64: tl.float64,
        torch.bfloat16: tl.bfloat16,
        torch.float16: tl.float16,
    }[dtype]


def run_phase2(
    grads: Tensor,
    top: Tensor,
    items: Tensor,
    layers: Tensor,
    out: Tensor,
    projected: Tensor | None,
    *,
    group: bool,
    project_uniform: bool,
    config: TileConfig,
) -> None:
    """Launch Phase 2: one pass-1 launch, plus (group mode) the group reduction and pass 2.

    Args:
        grads: ``[T, N]`` contiguous gradients; top: int64 ``[C]``.
        items: int64 ``[items, 8]`` (`work_items.phase2_items` for ``config``).
        layers: int64 ``[L, 4]`` (`Phase2Plan.layer_table`).
        out: ``[N]`` (written); projected: ``[T, N]`` or None (written).
    No host synchronisation; scratch is allocated on the device per call.
    """
    tasks, numel = grads.shape
    count = items.shape[0]
    if count == 0:
        return
    acc = accumulation_dtype(grads.dtype)
    shared = {
        "SUB": config.subrows,
        "WIDTH": config.width,
        "TB": task_block(tasks),
        "VEC": max(1, 16 // grads.element_size()),
        "EXACT": out.dtype == acc,
        "ACC": triton_dtype(acc),
        "num_warps": config.num_warps,
        "num_stages": config.num_stages,
        "enable_fp_fusion": FP_FUSION,
    }
    tb = shared["TB"]
    proj = projected if projected is not None else out  # never written when per_task is 0
    per_task = int(projected is not None)
    num_layers, channels = layers.shape[0], top.shape[0]
    if group and num_layers > 0:
        dots = torch.empty((channels, tb), dtype=acc, device=grads.device)
        coef = torch.empty((num_layers, tb, tb), dtype=acc, device=grads.device)
    else:
        dots = out  # never read or written in channel mode
    pass1_kernel[(count,)](
        grads, out, proj, top, items, layers, dots, numel, tasks, per_task, int(project_uniform),
        GROUP=group, UNIFORM_BLOCK=UNIFORM_BLOCK, **shared,
    )  # fmt: skip
    if group and num_layers > 0:
        group_kernel[(num_layers,)](
            top, layers, dots, coef, tasks, int(project_uniform),
            TB=tb, BLOCK=GROUP_BLOCK, ACC=shared["ACC"], num_warps=4, enable_fp_fusion=FP_FUSION,
        )  # fmt: skip
        pass2_kernel[(count,)](
            grads, out, proj, top, items, coef, numel, tasks, per_task, **shared
        )  # fmt: skip
