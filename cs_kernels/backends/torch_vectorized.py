"""The ``torch`` backend: Phase 2 as vectorised PyTorch over the whole plan at once.

No Python loop over tasks or layers, no host synchronisation (every size comes from the
plan, never from tensor values), deterministic reductions, so it runs on any device PyTorch
supports and under ``torch.compile``.

The flat buffer ``[0, N)`` is cut into *segments* in offset order: every channel row of every
layer, and every plainly summed gap. A fixed grid of *chunks* of ``width`` elements (from
element ``phase``) lies over it; a chunk that falls inside one segment is *pure*, and nearly
every element of a real model is in one (rows are multiples of 16 or more elements). Over the
chunks, batched matrix products do the work without any ``[T, N]`` or ``[N]`` temporary
(on a CPU each fresh buffer that size costs page faults on every call):

* every row's dot products ``<G_top, G_j>``: up to `GRAM_MAX_TASKS` tasks, from per-chunk
  Gram matrices ``[chunks, T, T]`` (no gather of the top task's rows); beyond, from each
  chunk's top-task row, gathered into ``out`` (which is overwritten later) through a view of
  overlapping rows, times every task's row; summed per segment;
* the combined gradient: one weighted sum per chunk, ``out = sum_t w_t * G_t`` with
  ``w_t = 1 - shrink * [t == top]`` (``sum_j G'_j = sum_t G_t - (sum_j coef_j) * G_top``),
  a ``bmm`` that writes ``out`` in place.

The few elements outside pure chunks (row ends that miss the grid, short rows, the buffer's
ends) take an element-wise path through index tables. The grid's width and phase are chosen
per plan and task count to leave few such elements and few matrices; every table is built
once per plan, task count and device, and cached on the plan.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from cs_kernels._validation import accumulation_dtype
from cs_kernels.backends.base import Backend
from cs_kernels.plan import Phase2Plan, traced_as_constant

# Chunk widths tried, widest first: a wide chunk makes each batched product larger (below
# 400 multiply-adds per batch entry, width * T here, the CPU bmm takes a slow scalar loop).
WIDTHS = (256, 128, 64, 32, 16)
BMM_FAST = 400
# Estimated costs (measured on a CPU) in units of one pure element (all T tasks) in a fast
# bmm: a pure element in a slow one, a mixed element, and each chunk's share of the bmm
# calls' per-matrix overhead.
COST_FAST, COST_SLOW, COST_MIXED, COST_PER_CHUNK = 1.0, 3.0, 10.0, 24.0
PHASES_TRIED = 4  # grid phases tried per width, besides 0
# Up to this many tasks, the rows' dot products come from per-chunk Gram matrices (T * T
# multiply-adds per element position, no gather); beyond, from each chunk's top-task row,
# gathered first (2 T, and one more read of a 1/T share of the gradients).
GRAM_MAX_TASKS = 3


class LayerTables(NamedTuple):
    chan_layer: Tensor  # int64 [C]: layer index of each channel
    layer_channels: Tensor  # int64 [L]


class ChunkTables(NamedTuple):
    """Where the segments, chunks and leftover ("mixed") elements of a plan lie."""

    seg_channel: Tensor  # int64 [S]: channel (plan order) of each segment; C for a gap
    chan_segment: Tensor  # int64 [C]: segment of each channel
    chunk_segment: Tensor  # int64 [M]: segment of each chunk (of its first element)
    pure_chunks: Tensor  # int64 [P]: the pure chunks, in offset order
    pure_lengths: Tensor  # int64 [S]: pure chunks per segment
    mixed_index: Tensor  # int64 [Q]: elements outside pure chunks, in offset order
    mixed_segment: Tensor  # int64 [Q]: their segments
    mixed_lengths: Tensor  # int64 [S]: mixed elements per segment
    chunk_rows: Tensor  # int64 [M]: chunk m's row in the gather view, m * K / row_stride
    width: int  # K: elements per chunk
    phase: int  # first element of chunk 0
    chunks: int  # M: chunks in the grid, covering [phase, phase + M * K)
    row_stride: int  # gcd(N, K): chunk (t, m) starts at phase + (t N / s + m K / s) * s


def _segments(plan: Phase2Plan) -> tuple[Tensor, Tensor, Tensor]:
    """``(starts, lengths, channel)`` of every row and gap, int64 ``[S]``, in offset order."""
    starts, lengths, channels = [], [], []
    for layer, first in zip(plan.layers, plan.first_channels, strict=True):
        rows = torch.arange(layer.channels, dtype=torch.int64)
        starts.append(layer.offset + rows * layer.row_length)
        lengths.append(torch.full((layer.channels,), layer.row_length, dtype=torch.int64))
        channels.append(first + rows)
    for offset, length in plan.gaps:
        starts.append(torch.tensor([offset]))
        lengths.append(torch.tensor([length]))
        channels.append(torch.tensor([plan.total_channels]))
    if not starts:
        empty = torch.zeros(0, dtype=torch.int64)
        return empty, empty, empty
    start = torch.cat(starts)
    order = torch.argsort(start, stable=True)
    return start[order], torch.cat(lengths)[order], torch.cat(channels)[order]


def _pure_range(starts: Tensor, ends: Tensor, width: int, phase: int) -> tuple[Tensor, Tensor]:
    """First and end chunk index of the pure chunks of each segment (first >= end: none)."""
    first = torch.div(starts - phase + width - 1, width, rounding_mode="floor").clamp(min=0)
    end = torch.div(ends - phase, width, rounding_mode="floor")
    return first, torch.maximum(end, first)


def _choose_grid(starts: Tensor, lengths: Tensor, numel: int, tasks: int) -> tuple[int, int]:
    """The ``(width, phase)`` of least estimated cost (see COST_*), ties to the widest.

    Phases tried per width: 0 and the residues (mod width) of the segment starts that carry
    the most elements, where a grid aligned to those segments leaves them whole.
    """
    ends = starts + lengths
    best: tuple[float, int, int] | None = None
    for width in WIDTHS:
        per_pure = COST_FAST if width * tasks >= BMM_FAST else COST_SLOW
        weight = torch.bincount(starts % width, weights=lengths.double(), minlength=width)
        phases = {0, *torch.topk(weight, min(PHASES_TRIED, width)).indices.tolist()}
        for phase in sorted(phases):
            first, end = _pure_range(starts, ends, width, phase)
            pure = int((end - first).sum()) * width
            chunks = max(numel - phase, 0) // width
            cost = pure * per_pure + (numel - pure) * COST_MIXED + chunks * COST_PER_CHUNK
            if best is None or cost < best[0]:
                best = (cost, width, phase)
    assert best is not None
    return best[1], best[2]


def _build_layer_tables(plan: Phase2Plan) -> LayerTables:
    layer_channels = torch.tensor([layer.channels for layer in plan.layers], dtype=torch.int64)
    chan_layer = torch.repeat_interleave(torch.arange(plan.num_layers), layer_channels)
    return LayerTables(chan_layer, layer_channels)


def _build_chunk_tables(plan: Phase2Plan, tasks: int) -> ChunkTables:
    starts, lengths, seg_channel = _segments(plan)
    num_segments = starts.shape[0]
    width, phase = _choose_grid(starts, lengths, plan.numel, tasks)
    chunks = max(plan.numel - phase, 0) // width
    chan_segment = torch.empty(plan.total_channels, dtype=torch.int64)
    is_channel = seg_channel < plan.total_channels
    chan_segment[seg_channel[is_channel]] = torch.nonzero(is_channel).flatten()

    # Chunk m covers [phase + m * width, + width): its segment is the one its start is in.
    chunk_start = phase + torch.arange(chunks, dtype=torch.int64) * width
    chunk_segment = (torch.searchsorted(starts, chunk_start, right=True) - 1).clamp(min=0)

    first, end = _pure_range(starts, starts + lengths, width, phase)
    pure_lengths = end - first
    total_pure = int(pure_lengths.sum())
    pure_offsets = torch.cumsum(pure_lengths, 0) - pure_lengths
    pure_chunks = torch.repeat_interleave(
        first - pure_offsets, pure_lengths, output_size=total_pure
    )
    pure_chunks += torch.arange(total_pure, dtype=torch.int64)

    # Mixed elements of a segment: the run before its first pure chunk and the run after its
    # last (the whole segment when it has none); adjacent in offset order.
    has_pure = pure_lengths > 0
    pure_begin = torch.where(has_pure, phase + first * width, starts + lengths)
    pure_end = torch.where(has_pure, phase + end * width, starts + lengths)
    run_starts = torch.stack([starts, pure_end], dim=1).flatten()
    run_lengths = torch.stack([pure_begin - starts, starts + lengths - pure_end], dim=1).flatten()
    total_mixed = int(run_lengths.sum())
    run_offsets = torch.cumsum(run_lengths, 0) - run_lengths
    mixed_index = torch.repeat_interleave(
        run_starts - run_offsets, run_lengths, output_size=total_mixed
    )
    mixed_index += torch.arange(total_mixed, dtype=torch.int64)
    mixed_lengths = run_lengths.view(num_segments, 2).sum(dim=1)
    mixed_segment = torch.repeat_interleave(
        torch.arange(num_segments), mixed_lengths, output_size=total_mixed
    )
    row_stride = math.gcd(plan.numel, width)
    chunk_rows = torch.arange(chunks, dtype=torch.int64) * (width // row_stride)
    return ChunkTables(
        seg_channel, chan_segment, chunk_segment, pure_chunks, pure_lengths, mixed_index,
        mixed_segment, mixed_lengths, chunk_rows, width, phase, chunks, row_stride,
    )  # fmt: skip


# Built on the host (with data-dependent sizes) on first use, then cached on the plan. Under
# torch.compile they are evaluated while tracing and enter the graph as constants.
@traced_as_constant
def _layer_tables(plan: Phase2Plan, device: torch.device) -> LayerTables:
    return plan.cached("torch.layers", device, lambda: _build_layer_tables(plan))


@traced_as_constant
def _chunk_tables(plan: Phase2Plan, tasks: int, device: torch.device) -> ChunkTables:
    return plan.cached(f"torch.chunks.{tasks}", device, lambda: _build_chunk_tables(plan, tasks))


def _segment_sum(x: Tensor, lengths: Tensor, dim: int = -1) -> Tensor:
    """Sum dimension ``dim`` of ``x`` in runs of ``lengths: [S]``: that dimension becomes ``S``.

    ``x`` must be laid out as it is shaped (an op's fresh output, not a transposed view):
    segment_reduce misreads some strided inputs (torch 2.13), and ``contiguous()`` passes
    a transposed view with a size-1 dimension through unchanged.
    """
    if x.device.type == "mps":
        # PyTorch has no MPS segment_reduce yet (pytorch/pytorch#197880): reduce on the CPU.
        return _segment_sum(x.cpu(), lengths.cpu(), dim).to(x.device)
    axis = dim % x.dim()
    shape = (*x.shape[:axis], lengths.shape[0], *x.shape[axis + 1 :])
    if axis == x.dim() - 1:
        lengths = lengths.expand(*x.shape[:axis], lengths.shape[0])
    return torch.segment_reduce(x, "sum", lengths=lengths, axis=axis, unsafe=True).view(shape)


def coefficients(
    dots: Tensor, top: Tensor, tables: LayerTables, *, group: bool, project_uniform: bool
) -> Tensor:
    """Projection coefficients ``[T, C]``: ``G'_j[c] = G_j[c] - coef[j, c] * G_top(c)[c]``.

    ``dots[j, c] = <G_top(c)[c], G_j[c]>``; the coefficient is ``a / ||G_i||^2`` where the
    group's (or the channel's) ``a < 0``, and 0 on the top task's own row.
    """
    num_tasks = dots.shape[0]
    is_top = top[None, :] == torch.arange(num_tasks, device=top.device)[:, None]  # [T, C]
    # counts[i, l]: channels of layer l whose top task is i (exact in float below 2^24).
    counts = _segment_sum(is_top.to(dots.dtype), tables.layer_channels)  # [T, L]
    if group:
        # Group g = (layer l, top task i) = l * T + i. Sort the channels by group (stable),
        # then one segment sum gives a[j, g] = sum of dots[j, c] over the group's channels.
        group_of = tables.chan_layer * num_tasks + top  # [C]
        order = torch.argsort(group_of, stable=True)
        sizes = counts.t().reshape(-1).round().to(torch.int64)  # [L * T], in group order
        a = _segment_sum(dots[:, order], sizes)[:, group_of]  # [T, C]: the channel's group
    else:
        a = dots
    norm_sq = a.gather(0, top[None, :])  # [1, C]: ||G_i[CG_i]||^2 (or the row's)
    conflict = (a < 0) & ~is_top & (norm_sq > 0)
    if not project_uniform:
        uniform = counts.amax(dim=0) == tables.layer_channels.to(dots.dtype)  # [L]
        conflict = conflict & ~uniform[tables.chan_layer][None, :]
    return torch.where(conflict, a / norm_sq, torch.zeros_like(a))


def _pure_dots(g: Tensor, seg_top: Tensor, chunk: ChunkTables, scratch: Tensor | None) -> Tensor:
    """``[T, S]``: each segment's dot products ``<G_top, G_j>`` over its pure chunks.

    ``g: [T, N]`` (contiguous), ``seg_top: [S]``; ``scratch`` is an ``[M, 1, K]`` buffer of
    ``g.dtype`` that may be overwritten (``out``), or None.
    """
    num_tasks, numel = g.shape
    width, chunks = chunk.width, chunk.chunks
    g_chunks = _chunks(g, chunk)  # [M, T, K]
    if num_tasks <= GRAM_MAX_TASKS:
        # Per-chunk Gram matrices: every pair's dot products, no gather of the top rows.
        gram = torch.bmm(g_chunks, g_chunks.transpose(1, 2)).flatten(1)  # [M, T * T]
        seg_gram = _segment_sum(gram.index_select(0, chunk.pure_chunks), chunk.pure_lengths, 0)
        pairs = seg_top[:, None] * num_tasks + torch.arange(num_tasks, device=seg_top.device)
        return seg_gram.gather(1, pairs).t()
    # Each chunk's top-task row, gathered through a view whose rows start every row_stride
    # elements of the flat buffer (they overlap: read only), then its dot products with every
    # task's row.
    stride = chunk.row_stride
    flat = g.view(-1).narrow(0, chunk.phase, g.numel() - chunk.phase)
    starts = flat.unfold(0, width, stride) if flat.numel() >= width else flat.new_empty(0, width)
    chunk_top = seg_top.index_select(0, chunk.chunk_segment)  # [M]
    index = chunk_top * (numel // stride) + chunk.chunk_rows
    if scratch is None:
        scratch = g.new_empty(chunks, 1, width)
    top_rows = scratch.view(chunks, width)
    if torch.compiler.is_compiling():
        top_rows.copy_(starts.index_select(0, index))
    else:
        torch.index_select(starts, 0, index, out=top_rows)
    chunk_dots = torch.bmm(scratch, g_chunks.transpose(1, 2)).flatten(1)  # [M, T]
    return _segment_sum(chunk_dots.index_select(0, chunk.pure_chunks), chunk.pure_lengths, 0).t()


def _chunks(g: Tensor, chunk: ChunkTables) -> Tensor:
    """``[M, T, K]``: chunk m of every task's row of ``g: [T, N]`` (a view, no copy)."""
    grid = g.narrow(1, chunk.phase, chunk.chunks * chunk.width)
    return grid.view(g.shape[0], chunk.chunks, chunk.width).permute(1, 0, 2)


def _bmm_into(a: Tensor, b: Tensor, out: Tensor) -> None:
    """``out = a @ b`` (batched), written in place: no ``[N]``-sized temporary in eager mode."""
    if torch.compiler.is_compiling():
        out.copy_(torch.bmm(a, b))  # the compiler plans its own buffers
    else:
        torch.bmm(a, b, out=out)


class TorchBackend(Backend):
    name = "torch"

    def supports(self, device: torch.device) -> bool:
        return True

    def layer_tables(self, plan: Phase2Plan, device: torch.device) -> LayerTables:
        return _layer_tables(plan, device)

    def chunk_tables(self, plan: Phase2Plan, tasks: int, device: torch.device) -> ChunkTables:
        return _chunk_tables(plan, tasks, device)

    def row_sqnorm(self, weight: Tensor) -> Tensor:
        return weight.to(accumulation_dtype(weight.dtype)).square().sum(dim=1)

    def top_priority(self, strength: Tensor, plan: Phase2Plan) -> Tensor:
        tables = self.layer_tables(plan, strength.device)
        # fp64 (where the device has it), as the reference: near-ties resolve exactly.
        raw = strength.to(torch.float32 if strength.device.type == "mps" else torch.float64)
        totals = _segment_sum(raw, tables.layer_channels)[:, tables.chan_layer]  # [T, C]
        normalised = torch.where(totals > 0, raw / totals, torch.zeros_like(raw))
        return normalised.argmax(dim=0)  # the first maximum: ties go to the smallest task

    def phase2(
        self,
        grads: Tensor,
        plan: Phase2Plan,
        top: Tensor,
        *,
        group: bool,
        project_uniform: bool,
        out: Tensor,
        projected: Tensor | None,
    ) -> None:
        num_tasks, numel = grads.shape
        chunk = self.chunk_tables(plan, num_tasks, grads.device)
        layers = self.layer_tables(plan, grads.device)
        g = grads.to(accumulation_dtype(grads.dtype))  # bf16/fp16: one fp32 copy
        width, chunks = chunk.width, chunk.chunks
        g_chunks = _chunks(g, chunk)  # [M, T, K]
        g_mixed = g.index_select(1, chunk.mixed_index)  # [T, Q]

        # Gaps borrow channel slot C (task 0, coefficient 0): harmless stand-ins.
        seg_top = torch.cat([top, top.new_zeros(1)]).index_select(0, chunk.seg_channel)  # [S]
        out_chunks = out.narrow(0, chunk.phase, chunks * width).view(chunks, 1, width)
        # Per-segment dot products <G_top, G_j>: pure chunks through batched products ...
        seg_dots = _pure_dots(g, seg_top, chunk, out_chunks if out.dtype == g.dtype else None)
        # ... mixed elements one by one; G_top there through one flat index_select (a gather
        # along T is slower).
        mixed_top = (seg_top * numel).index_select(0, chunk.mixed_segment) + chunk.mixed_index
        top_mixed = g.view(-1).index_select(0, mixed_top)  # [Q]
        seg_dots = seg_dots + _segment_sum(g_mixed * top_mixed, chunk.mixed_lengths)
        dots = seg_dots.index_select(1, chunk.chan_segment)  # [T, C]

        coef = coefficients(dots, top, layers, group=group, project_uniform=project_uniform)
        coef_seg = torch.cat([coef, coef.new_zeros(num_tasks, 1)], dim=1).index_select(
            1, chunk.seg_channel
        )  # [T, S]
        is_top = seg_top[None, :] == torch.arange(num_tasks, device=g.device)[:, None]
        # sum_j G'_j = sum_t G_t - shrink * G_top = sum_t w_t G_t, w_t = 1 - shrink * [t == top].
        shrink = coef_seg.sum(dim=0)  # [S]
        weights = (1 - is_top.to(coef.dtype) * shrink).t().contiguous()  # [S, T]
        chunk_weights = weights.index_select(0, chunk.chunk_segment)[:, None, :]  # [M, 1, T]
        mixed_out = g_mixed.sum(dim=0) - shrink.index_select(0, chunk.mixed_segment) * top_mixed
        if out.dtype == g.dtype:
            _bmm_into(chunk_weights, g_chunks, out_chunks)
        else:  # bf16/fp16: rounded once, from the fp32 sum
            out_chunks.copy_(torch.bmm(chunk_weights, g_chunks))
        # After the chunks: a chunk that is not pure got some segment's weights.
        out.index_copy_(0, chunk.mixed_index, mixed_out.to(out.dtype))

        if projected is not None:
            # G'_j = sum_t W[j, t] G_t with W = I - coef_j [t == top], per chunk / element.
            eye = torch.eye(num_tasks, dtype=coef.dtype, device=g.device)
            proj_weights = eye[:, :, None] - coef_seg[:, None, :] * is_top[None, :, :]  # [T,T,S]
            chunk_proj = proj_weights.permute(2, 0, 1).index_select(0, chunk.chunk_segment)
            mixed_proj = (proj_weights.index_select(2, chunk.mixed_segment) * g_mixed).sum(dim=1)
            projected.narrow(1, chunk.phase, chunks * width).view(num_tasks, chunks, width).copy_(
                torch.bmm(chunk_proj, g_chunks).permute(1, 0, 2)
            )
            projected.index_copy_(1, chunk.mixed_index, mixed_proj.to(projected.dtype))
