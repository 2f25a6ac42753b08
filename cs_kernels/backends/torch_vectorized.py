"""The ``torch`` backend: Phase 2 as vectorised PyTorch over the whole plan at once.

No Python loop over tasks or layers, no host synchronisation (every size comes from the
plan, never from tensor values), deterministic segment reductions, so it runs on any device
PyTorch supports and under ``torch.compile``.

The flat buffer ``[0, N)`` is cut into *segments* in offset order: every channel row of
every layer, and every plainly summed gap. Per-channel dot products are segment sums.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from cs_kernels._validation import accumulation_dtype
from cs_kernels.backends.base import Backend
from cs_kernels.plan import Phase2Plan

# Longest run one segment-reduction output sums: a segment (a long gap, a long row) is cut into
# pieces of at most this many elements, then the pieces are summed, so no thread of a GPU
# segment reduction walks millions of elements alone. Both levels are deterministic.
PIECE = 2048


class SegmentTables(NamedTuple):
    seg_lengths: Tensor  # int64 [S]: length of each segment, in offset order
    piece_lengths: Tensor  # int64 [P]: the segments cut into pieces of <= PIECE elements
    seg_pieces: Tensor  # int64 [S]: how many pieces each segment has
    seg_channel: Tensor  # int64 [S]: channel (plan order) of the segment; total_channels = gap
    chan_segment: Tensor  # int64 [C]: segment index of each channel
    chan_layer: Tensor  # int64 [C]: layer index of each channel
    layer_channels: Tensor  # int64 [L]


def _build_tables(plan: Phase2Plan) -> SegmentTables:
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
    empty = torch.zeros(0, dtype=torch.int64)
    start = torch.cat(starts) if starts else empty
    order = torch.argsort(start, stable=True)
    seg_lengths = (torch.cat(lengths) if lengths else empty)[order]
    seg_channel = (torch.cat(channels) if channels else empty)[order]
    chan_segment = torch.empty(plan.total_channels, dtype=torch.int64)
    is_channel = seg_channel < plan.total_channels
    chan_segment[seg_channel[is_channel]] = torch.nonzero(is_channel).flatten()
    layer_channels = torch.tensor([layer.channels for layer in plan.layers], dtype=torch.int64)
    chan_layer = torch.repeat_interleave(torch.arange(plan.num_layers), layer_channels)
    seg_pieces = (seg_lengths + PIECE - 1) // PIECE
    # Every piece is PIECE long except the last one of its segment.
    last = torch.cumsum(seg_pieces, 0) - 1
    piece_lengths = torch.full((int(seg_pieces.sum()),), PIECE, dtype=torch.int64)
    piece_lengths[last] = seg_lengths - (seg_pieces - 1) * PIECE
    return SegmentTables(
        seg_lengths, piece_lengths, seg_pieces, seg_channel, chan_segment, chan_layer,
        layer_channels,
    )  # fmt: skip


def _segment_sum(x: Tensor, lengths: Tensor) -> Tensor:
    """Sum the last dimension of ``x: [..., M]`` in runs of ``lengths: [S]`` -> ``[..., S]``."""
    if x.device.type == "mps":
        # PyTorch has no MPS segment_reduce yet (pytorch/pytorch#197880): reduce on the CPU.
        return _segment_sum(x.cpu(), lengths.cpu()).to(x.device)
    return torch.segment_reduce(
        x, "sum", lengths=lengths.expand(*x.shape[:-1], lengths.shape[0]), axis=x.dim() - 1,
        unsafe=True,
    )  # fmt: skip


def coefficients(
    dots: Tensor, top: Tensor, tables: SegmentTables, *, group: bool, project_uniform: bool
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


class TorchBackend(Backend):
    name = "torch"

    def supports(self, device: torch.device) -> bool:
        return True

    def tables(self, plan: Phase2Plan, device: torch.device) -> SegmentTables:
        return plan.cached("torch.segments", device, lambda: _build_tables(plan))

    def row_sqnorm(self, weight: Tensor) -> Tensor:
        return weight.to(accumulation_dtype(weight.dtype)).square().sum(dim=1)

    def top_priority(self, strength: Tensor, plan: Phase2Plan) -> Tensor:
        tables = self.tables(plan, strength.device)
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
        tables = self.tables(plan, grads.device)
        numel = grads.shape[1]
        g = grads.to(accumulation_dtype(grads.dtype))
        # Gaps borrow channel slot C (padded with task 0 / coefficient 0): harmless stand-ins.
        seg_top = torch.cat([top, top.new_zeros(1)])[tables.seg_channel]
        elem_top = torch.repeat_interleave(seg_top, tables.seg_lengths, output_size=numel)
        top_rows = g.gather(0, elem_top[None, :])  # [1, N]: G_top(c) at every element

        piece_dots = _segment_sum(g * top_rows, tables.piece_lengths)  # [T, P]
        seg_dots = _segment_sum(piece_dots, tables.seg_pieces)  # [T, S]
        dots = seg_dots[:, tables.chan_segment]  # [T, C]
        coef = coefficients(dots, top, tables, group=group, project_uniform=project_uniform)
        coef_seg = torch.cat([coef, coef.new_zeros(coef.shape[0], 1)], dim=1)[
            :, tables.seg_channel
        ]  # [T, S]

        # sum_j G'_j = sum_j G_j - (sum_j coef_j) * G_top
        shrink = torch.repeat_interleave(coef_seg.sum(dim=0), tables.seg_lengths, output_size=numel)
        if out.dtype == g.dtype:  # in place: no [N] temporaries
            torch.sum(g, dim=0, out=out)
            out.addcmul_(shrink, top_rows[0], value=-1)
        else:  # bf16/fp16: one rounding, at the end
            out.copy_(g.sum(dim=0) - shrink * top_rows[0])
        if projected is not None:
            coef_elem = torch.repeat_interleave(
                coef_seg, tables.seg_lengths, dim=1, output_size=numel
            )
            projected.copy_(g - coef_elem * top_rows)
