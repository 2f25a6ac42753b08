"""Phase 2 in three steps, as vectorised PyTorch: what every backend does unless it overrides.

`Backend.phase2` needs all the channels of a layer in one ``[T, N]`` buffer. A model whose
channels are spread over processes (FSDP2 shards every weight along its output channels)
splits Phase 2 into steps, so that only small per-channel statistics cross processes:

1. `channel_gram`: per channel ``c``, the ``T x T`` Gram matrix ``<G_i[c], G_j[c]>`` of its
   rows (on the rows a process holds);
2. `projection_coefficients`: from the Gram matrices and top tasks of *every* channel, the
   coefficient ``coef[j, c]`` with ``G'_j[c] = G_j[c] - coef[j, c] * G_top(c)[c]``: the group
   sums, ``a < 0`` tests and uniform-priority rule of docs/algorithm.md (small tensors);
3. `project`: ``out = sum_t G_t - (sum_j coef[j, c]) * G_top(c)[c]`` on the local rows.

No Python loop over tasks or layers and no host synchronisation (every size comes from the
plan). The buffer is cut into aligned *blocks* of `BLOCK` elements: a block inside one channel
row is handled as a whole (its ``T x T`` Gram matrix is one small matrix product of a batched
``bmm``; its projection one gathered top row), the few elements of blocks that straddle a row
boundary one by one. Rows, gaps and blocks are walked in a few *chunks* of whole segments,
so that temporaries stay near an eighth of the gradient rows' size (1M to 16M values)
whatever the model. Segment sums are ``torch.segment_reduce``: deterministic.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from cs_kernels._validation import accumulation_dtype
from cs_kernels.plan import Phase2Plan

# Elements per block: long enough for matrix products to run at memory speed, short enough
# that rows (conv rows are Cin * kh * kw, most of them multiples of 64) are mostly whole blocks.
BLOCK = 64
# Temporaries per chunk: about an eighth of the gradient rows' own size, within these bounds
# (4 MiB and 64 MiB of fp32): few chunks, little extra memory.
CHUNK_FRACTION = 8
CHUNK_ELEMENTS_MIN = 1 << 20
CHUNK_ELEMENTS = 1 << 24
# A plainly summed gap longer than this is left out of the Gram pass (its dots are not needed);
# shorter gaps (biases between layers) ride along so that chunks span many layers.
GRAM_GAP_LIMIT = 4096


class Chunk(NamedTuple):
    """A run of whole segments (channel rows and gap pieces) ``[start, stop)`` of the buffer.

    Positions are relative to ``start``. Channel ``C`` (``total_channels``) stands for "no
    channel": gaps, and blocks that straddle two segments.
    """

    start: int
    stop: int
    num_blocks: int  # whole blocks from the chunk's start
    block_channel: Tensor  # int64 [num_blocks]: the channel whose row holds the block, or C
    elements: Tensor  # int64 [M]: channel-row elements outside those blocks
    element_channel: Tensor  # int64 [M]
    item_order: Tensor  # int64 [I]: the row blocks, then the elements, sorted by position
    row_items: Tensor  # int64 [R]: items per channel row of the chunk, rows by position
    row_channel: Tensor  # int64 [R]


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


def _chunk(segments: list[tuple[int, int, int]], channels: int, device: torch.device) -> Chunk:
    """The tables of one chunk made of ``segments`` (consecutive, by offset)."""
    offsets = torch.tensor([s[0] for s in segments], dtype=torch.int64)
    lengths = torch.tensor([s[1] for s in segments], dtype=torch.int64)
    seg_channel = torch.tensor([s[2] for s in segments], dtype=torch.int64)
    start = segments[0][0]
    stop = segments[-1][0] + segments[-1][1]
    num_blocks = (stop - start) // BLOCK  # blocks from the chunk's start
    local = offsets - start
    block_starts = BLOCK * torch.arange(num_blocks)
    seg_first = torch.searchsorted(local, block_starts, right=True) - 1
    seg_last = torch.searchsorted(local, block_starts + BLOCK - 1, right=True) - 1
    whole = seg_first == seg_last
    block_channel = torch.where(whole, seg_channel[seg_first], channels)
    # every element: its segment, and whether a whole-row block covers it
    element_seg = torch.repeat_interleave(torch.arange(len(segments)), lengths)
    covered = torch.zeros(stop - start, dtype=torch.bool)
    in_row = (block_channel < channels).repeat_interleave(BLOCK)
    covered[: num_blocks * BLOCK] = in_row
    is_row = seg_channel[element_seg] < channels
    elements = torch.nonzero(is_row & ~covered).flatten()
    element_channel = seg_channel[element_seg[elements]]
    # items of the Gram pass: the row blocks and the loose elements, in position order
    row_blocks = torch.nonzero(block_channel < channels).flatten()
    position = torch.cat([block_starts[row_blocks], elements])
    candidate = torch.cat([row_blocks, num_blocks + torch.arange(elements.numel())])
    order = torch.argsort(position, stable=True)
    item_seg = torch.cat([seg_first[row_blocks], element_seg[elements]])[order]
    rows = torch.nonzero(seg_channel < channels).flatten()
    row_items = torch.bincount(item_seg, minlength=len(segments))[rows]
    return Chunk(
        start,
        stop,
        num_blocks,
        block_channel.to(device),
        elements.to(device),
        element_channel.to(device),
        candidate[order].to(device),
        row_items.to(device),
        seg_channel[rows].to(device),
    )


def _build_chunks(
    plan: Phase2Plan, budget: int, gram: bool, device: torch.device
) -> tuple[Chunk, ...]:
    """Cut the plan into chunks of whole segments with at most ``budget`` elements each (a
    longer segment is a chunk alone). ``gram``: long gaps are skipped (they need no dots)."""
    chunks: list[Chunk] = []
    current: list[tuple[int, int, int]] = []
    size = 0
    for offset, length, channel in _segments(plan, budget):
        is_gap = channel == plan.total_channels
        skip = gram and is_gap and length > GRAM_GAP_LIMIT
        # A row of BLOCK multiples that would start off the chunk's block grid (after an odd
        # row or gap) starts a new chunk instead, so that its blocks are whole.
        misaligned = not is_gap and length % BLOCK == 0 and size % BLOCK != 0
        if current and (skip or misaligned or size + length > budget):
            chunks.append(_chunk(current, plan.total_channels, device))
            current, size = [], 0
        if not skip:
            current.append((offset, length, channel))
            size += length
    if current:
        chunks.append(_chunk(current, plan.total_channels, device))
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


def _budget(grads: Tensor, rows: int) -> int:
    """Elements per chunk so that ``rows`` temporaries of a chunk stay within the budget."""
    values = grads.numel() // CHUNK_FRACTION
    return max(1, min(CHUNK_ELEMENTS, max(CHUNK_ELEMENTS_MIN, values)) // rows)


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


def _blocks(rows: Tensor, chunk: Chunk) -> Tensor:
    """``rows: [T, len]`` (the chunk) -> ``[T, num_blocks, BLOCK]``, a view."""
    return rows[:, : chunk.num_blocks * BLOCK].view(rows.shape[0], chunk.num_blocks, BLOCK)


def _top_blocks(source: Tensor, base: int, chunk: Chunk, task: Tensor) -> Tensor:
    """``[num_blocks, BLOCK]``: block ``b`` of row ``task[b]`` of the chunk, which starts at
    column ``base`` of ``source: [T, M]`` (contiguous).

    One ``index_select`` of whole blocks from a view of every ``BLOCK`` consecutive elements
    of the storage (overlapping windows, read only): a contiguous copy per block, as fast as
    a plain read, where ``gather`` works element by element.
    """
    if chunk.num_blocks == 0:
        return source.new_empty(0, BLOCK)
    flat = source.view(-1)
    windows = flat.as_strided((flat.numel() - BLOCK + 1, BLOCK), (1, 1))
    blocks = BLOCK * torch.arange(chunk.num_blocks, device=source.device)
    return windows.index_select(0, task * source.shape[1] + base + blocks)


def channel_gram(grads: Tensor, plan: Phase2Plan) -> Tensor:
    """``grads: [T, N]`` -> ``[total_channels, T, T]``: ``<G_i[c], G_j[c]>`` per channel.

    Accumulates in fp32 (fp64 for fp64 input) and returns that dtype.
    """
    num_tasks = grads.shape[0]
    pairs = num_tasks * num_tasks
    acc = accumulation_dtype(grads.dtype)
    gram = torch.zeros(plan.total_channels, pairs, dtype=acc, device=grads.device)
    for chunk in _chunks(plan, grads.device, _budget(grads, num_tasks + 2), gram=True):
        rows = grads[:, chunk.start : chunk.stop]
        x = _blocks(rows, chunk).transpose(0, 1).to(acc)  # [blocks, T, BLOCK]
        block_gram = torch.bmm(x, x.transpose(1, 2)).view(-1, pairs)  # [blocks, T*T]
        loose = rows[:, chunk.elements].to(acc)  # [T, M]
        loose_gram = (loose[:, None, :] * loose[None, :, :]).view(pairs, -1).t()  # [M, T*T]
        items = torch.cat([block_gram, loose_gram]).index_select(0, chunk.item_order)
        sums = torch.segment_reduce(items, "sum", lengths=chunk.row_items, axis=0, unsafe=True)
        gram.index_copy_(0, chunk.row_channel, sums)
    return gram.view(plan.total_channels, num_tasks, num_tasks)


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
    # [L * T] channels per group; a scatter of ones, not bincount (which synchronises on CUDA
    # to size its result by the largest value)
    counts = torch.zeros(plan.num_layers * num_tasks, dtype=torch.int64, device=gram.device)
    counts.scatter_add_(0, group_of, torch.ones_like(group_of))
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
    top_ext = torch.cat([top, top.new_zeros(1)])  # channel C (no channel): task 0, no shrink
    coef_ext = torch.cat([coefficients.to(acc), coefficients.new_zeros(num_tasks, 1).to(acc)], 1)
    shrink_ext = coef_ext.sum(dim=0)
    for chunk in _chunks(plan, grads.device, _budget(grads, num_tasks + 4), gram=False):
        g = grads[:, chunk.start : chunk.stop].to(acc)
        # the plain sum, then - shrink * G_top on the row blocks and on the loose elements
        result = out[chunk.start : chunk.stop] if out.dtype == acc else g.new_empty(g.shape[1])
        torch.sum(g, dim=0, out=result)
        blocks = _blocks(g, chunk)  # [T, blocks, BLOCK]
        source, base = (grads, chunk.start) if grads.dtype == acc else (g, 0)
        block_rows = _top_blocks(source, base, chunk, top_ext[chunk.block_channel])
        block_shrink = shrink_ext[chunk.block_channel][:, None]
        _blocks(result[None], chunk)[0].addcmul_(block_shrink, block_rows, value=-1)
        loose = g[:, chunk.elements]  # [T, M]
        loose_rows = loose.gather(0, top_ext[chunk.element_channel][None, :])[0]  # [M]
        loose_shrink = shrink_ext[chunk.element_channel]
        result.index_add_(0, chunk.elements, loose_rows * loose_shrink, alpha=-1)
        if out.dtype != acc:  # bf16/fp16: one rounding, at the end
            out[chunk.start : chunk.stop].copy_(result)
        if projected is not None:
            part = projected[:, chunk.start : chunk.stop]
            part.copy_(g)
            block_coef = coef_ext[:, chunk.block_channel][:, :, None]  # [T, blocks, 1]
            _blocks(part, chunk).copy_(blocks - block_coef * block_rows[None])
            loose_coef = coef_ext[:, chunk.element_channel]  # [T, M]
            part[:, chunk.elements] = (loose - loose_coef * loose_rows[None]).to(part.dtype)
