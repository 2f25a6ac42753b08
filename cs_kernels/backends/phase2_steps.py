"""Phase 2 in three steps, as vectorised PyTorch: what every backend does unless it overrides.

`Backend.phase2` needs all the channels of a layer in one ``[T, N]`` buffer. A model whose
channels are spread over processes (FSDP2 shards every weight along its output channels)
splits Phase 2 into steps, so that only small per-channel statistics cross processes:

1. `channel_gram`: per channel ``c``, the ``T x T`` Gram matrix ``<G_i[c], G_j[c]>`` of its
   rows (on the rows a process holds);
2. `projection_coefficients`: from the Gram matrices and top tasks of *every* channel, the
   coefficient ``coef[j, c]`` with ``G'_j[c] = G_j[c] - coef[j, c] * G_top(c)[c]``: the group
   sums, ``a < 0`` tests and uniform-priority rule of ALGORITHM.md (small tensors);
3. `project`: ``out = sum_t G_t - (sum_j coef[j, c]) * G_top(c)[c]`` on the local rows.

No Python loop over tasks or layers and no host synchronisation (every size comes from the
plan). The element-wise steps walk the buffer in a few *chunks* of whole segments (channel
rows and gap pieces), so their temporaries stay bounded (about `CHUNK_ELEMENTS` values)
whatever the model size. Segment sums are ``torch.segment_reduce``: deterministic.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from cs_kernels._validation import accumulation_dtype
from cs_kernels.plan import Phase2Plan

# Temporaries per chunk: at most this many values (products or gathered rows), 64 MiB in fp32.
CHUNK_ELEMENTS = 1 << 24
# A plainly summed gap longer than this is left out of the Gram pass (its dots are not needed);
# shorter gaps (biases between layers) ride along so that chunks span many layers.
GRAM_GAP_LIMIT = 4096


class Chunk(NamedTuple):
    start: int  # first element
    stop: int  # one past the last element
    lengths: Tensor  # int64 [S_k]: the chunk's segments, in offset order
    channel: Tensor  # int64 [S_k]: channel (plan order) of each segment; total_channels = gap
    rows: Tensor  # int64 [R_k]: positions of the channel rows among the chunk's segments
    row_channel: Tensor  # int64 [R_k]: their channels


class LayerTables(NamedTuple):
    chan_layer: Tensor  # int64 [C]: layer of each channel
    layer_channels: Tensor  # int64 [L]


def _segments(plan: Phase2Plan, piece: int) -> list[tuple[int, int, int]]:
    """``(offset, length, channel)`` of every row and gap piece, by offset (gap: channel C)."""
    segs = [
        (layer.offset + r * layer.row_length, layer.row_length, first + r)
        for layer, first in zip(plan.layers, plan.first_channels, strict=True)
        for r in range(layer.channels)
    ]
    for offset, length in plan.gaps:
        segs.extend(
            (start, min(piece, offset + length - start), plan.total_channels)
            for start in range(offset, offset + length, piece)
        )
    segs.sort()
    return segs


def _build_chunks(
    plan: Phase2Plan, budget: int, gram: bool, device: torch.device
) -> tuple[Chunk, ...]:
    """Cut the plan into chunks of whole segments with at most ``budget`` elements each (a
    longer segment is a chunk alone). ``gram``: long gaps are skipped (they need no dots)."""
    chunks: list[Chunk] = []
    current: list[tuple[int, int, int]] = []

    def close() -> None:
        if not current:
            return
        lengths = torch.tensor([s[1] for s in current], dtype=torch.int64)
        channel = torch.tensor([s[2] for s in current], dtype=torch.int64)
        rows = torch.nonzero(channel < plan.total_channels).flatten()
        start = current[0][0]
        chunks.append(
            Chunk(
                start,
                start + int(lengths.sum()),
                lengths.to(device),
                channel.to(device),
                rows.to(device),
                channel[rows].to(device),
            )
        )
        current.clear()

    size = 0
    for offset, length, channel in _segments(plan, budget):
        is_gap = channel == plan.total_channels
        if gram and is_gap and length > GRAM_GAP_LIMIT:
            close()
            size = 0
            continue
        if current and size + length > budget:
            close()
            size = 0
        current.append((offset, length, channel))
        size += length
    close()
    return tuple(chunks)


def _chunks(plan: Phase2Plan, device: torch.device, budget: int, gram: bool) -> tuple[Chunk, ...]:
    key = f"phase2_steps.{'gram' if gram else 'project'}.{budget}"
    return plan.cached(key, device, lambda: _build_chunks(plan, budget, gram, device))


def _layer_tables(plan: Phase2Plan, device: torch.device) -> LayerTables:
    def build() -> LayerTables:
        layer_channels = torch.tensor([layer.channels for layer in plan.layers], dtype=torch.int64)
        chan_layer = torch.repeat_interleave(torch.arange(plan.num_layers), layer_channels)
        return LayerTables(chan_layer, layer_channels)

    return plan.cached("phase2_steps.layers", device, build)


def _segment_sum(x: Tensor, lengths: Tensor) -> Tensor:
    """Sum the last dimension of ``x: [..., M]`` in runs of ``lengths: [S]`` -> ``[..., S]``."""
    if x.device.type == "mps":  # no MPS segment_reduce in PyTorch yet: reduce on the CPU
        return _segment_sum(x.cpu(), lengths.cpu()).to(x.device)
    return torch.segment_reduce(
        x,
        "sum",
        lengths=lengths.expand(*x.shape[:-1], lengths.shape[0]),
        axis=x.dim() - 1,
        unsafe=True,
    )


def channel_gram(grads: Tensor, plan: Phase2Plan) -> Tensor:
    """``grads: [T, N]`` -> ``[total_channels, T, T]``: ``<G_i[c], G_j[c]>`` per channel.

    Accumulates in fp32 (fp64 for fp64 input) and returns that dtype.
    """
    num_tasks = grads.shape[0]
    acc = accumulation_dtype(grads.dtype)
    gram = torch.zeros(num_tasks * num_tasks, plan.total_channels, dtype=acc, device=grads.device)
    budget = max(1, CHUNK_ELEMENTS // (num_tasks * num_tasks))
    for chunk in _chunks(plan, grads.device, budget, gram=True):
        x = grads[:, chunk.start : chunk.stop].to(acc)
        products = (x[:, None, :] * x[None, :, :]).view(num_tasks * num_tasks, -1)  # [T*T, len]
        sums = _segment_sum(products, chunk.lengths)  # [T*T, S_k]
        gram.index_copy_(1, chunk.row_channel, sums.index_select(1, chunk.rows))
    return gram.t().reshape(plan.total_channels, num_tasks, num_tasks)


def projection_coefficients(
    gram: Tensor, plan: Phase2Plan, top: Tensor, *, group: bool, project_uniform: bool
) -> Tensor:
    """``gram: [C, T, T]``, ``top: [C]`` -> ``[T, C]`` coefficients (``gram.dtype``).

    ``coef[j, c] = a / ||G_i||^2`` where the group's (or channel's) ``a < 0``, ``j != i``,
    ``i = top[c]``; 0 elsewhere, and on every channel of a uniform-priority layer when
    ``project_uniform`` is False.
    """
    channels, num_tasks = gram.shape[0], gram.shape[1]
    chan_layer, layer_channels = _layer_tables(plan, gram.device)
    tasks = torch.arange(num_tasks, device=gram.device)
    with_top = gram.gather(1, top.view(channels, 1, 1).expand(channels, 1, num_tasks))[:, 0]
    dots = with_top.t()  # [T, C]: <G_top(c)[c], G_j[c]>
    group_of = chan_layer * num_tasks + top  # [C]: group (layer, top task)
    counts = torch.bincount(group_of, minlength=plan.num_layers * num_tasks)  # [L * T]
    if group:
        # Sort the channels by group (stable), then one segment sum per (group, task j).
        order = torch.argsort(group_of, stable=True)
        sums = _segment_sum(dots[:, order], counts)  # [T, L * T]
        a = sums[:, group_of]  # [T, C]: the sums of the channel's group
    else:
        a = dots
    norm_sq = a.gather(0, top[None, :])  # [1, C]: ||G_i[CG_i]||^2 (or the row's)
    conflict = (a < 0) & (tasks[:, None] != top[None, :]) & (norm_sq > 0)
    if not project_uniform:
        largest = counts.view(plan.num_layers, num_tasks).amax(dim=1)  # [L]
        uniform = largest == layer_channels
        conflict = conflict & ~uniform[chan_layer][None, :]
    return torch.where(conflict, a / norm_sq, torch.zeros_like(a))


def project(
    grads: Tensor,
    plan: Phase2Plan,
    top: Tensor,
    coefficients: Tensor,
    *,
    out: Tensor,
    projected: Tensor | None,
) -> None:
    """``out[:] = sum_t G_t - (sum_j coef[j, c]) * G_top(c)`` on every channel row, the plain
    sum elsewhere; ``projected[t] = G_t - coef[t, c] * G_top(c)`` when given."""
    num_tasks = grads.shape[0]
    acc = accumulation_dtype(grads.dtype)
    top_ext = torch.cat([top, top.new_zeros(1)])  # gaps: task 0 with coefficient 0
    coef_ext = torch.cat([coefficients.to(acc), coefficients.new_zeros(num_tasks, 1).to(acc)], 1)
    shrink_ext = coef_ext.sum(dim=0)
    budget = max(1, CHUNK_ELEMENTS // (num_tasks + 2))
    for chunk in _chunks(plan, grads.device, budget, gram=False):
        span = slice(chunk.start, chunk.stop)
        length = chunk.stop - chunk.start
        g = grads[:, span].to(acc)
        elem_top = torch.repeat_interleave(
            top_ext[chunk.channel], chunk.lengths, output_size=length
        )
        top_rows = g.gather(0, elem_top[None, :])[0]  # [len]: G_top(c) at every element
        shrink = torch.repeat_interleave(
            shrink_ext[chunk.channel], chunk.lengths, output_size=length
        )
        if out.dtype == acc:
            torch.sum(g, dim=0, out=out[span])
            out[span].addcmul_(shrink, top_rows, value=-1)
        else:  # bf16/fp16: one rounding, at the end
            out[span].copy_(g.sum(dim=0) - shrink * top_rows)
        if projected is not None:
            coef = torch.repeat_interleave(
                coef_ext[:, chunk.channel], chunk.lengths, dim=1, output_size=length
            )
            projected[:, span].copy_(g - coef * top_rows[None, :])
