"""Connection strength kernels: squared row norms of the shared weights and the top task.

`strength_kernel` covers every layer of a plan in one launch: each program reads a tile of
rows of one layer's weight (the layers are separate tensors, reached through a device table
of their addresses) and writes their squared norms. With ``FUSED``, the last program to
finish a layer (an int32 arrival counter per layer, incremented with acquire-release
atomics after a block barrier) also computes that layer's top-priority tasks from the norms
and the per-task factors: no second launch and no host synchronisation.

`priority_kernel` computes the top tasks from given strengths, one program per layer.

The top task of channel ``c`` in a layer is ``argmax_t S[t, c] / sum_c' S[t, c']`` (ties to
the smallest ``t``), normalised in fp64 so that near-ties resolve as in exact arithmetic,
like the fp64 reference. Norms accumulate in fp32 (fp64 for fp64 weights).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from cs_kernels._validation import accumulation_dtype
from cs_kernels.triton_kernels.phase2 import FP_FUSION, triton_dtype
from cs_kernels.triton_kernels.tiles import COLUMNS, ROWS, flat_tile, row_tile, row_totals
from cs_kernels.triton_kernels.tuning import INTERPRETED, TileConfig, task_block

CHANNEL_BLOCK = 32 if INTERPRETED else 128  # channels per step of the priority scan
ADDRESS_TABLES = 16  # address tables kept (per distinct set of weight tensors)
_addresses: OrderedDict[tuple[torch.device, tuple[int, ...]], Tensor] = OrderedDict()


@triton.jit
def _strength_block(norms_ptr, values_ptr, first, idx, ok, stride, num_tasks,
                    TB: tl.constexpr, FROM_NORMS: tl.constexpr, ACC: tl.constexpr):  # fmt: skip
    """Strengths ``[BLOCK, TB]`` (fp64) of channels ``first + idx``: given, or (FROM_NORMS)
    ``norm[c] * scale[t, c]`` rounded to the accumulation type as the unfused composition."""
    task = tl.arange(0, TB)[None, :]
    channel = first + idx
    present = ok[:, None] & (task < num_tasks)
    values = tl.load(values_ptr + tl.cast(task, tl.int64) * stride + channel[:, None],
                     mask=present, other=0.0)  # fmt: skip
    if FROM_NORMS:  # written by other programs of this launch: read through L2 (.cg)
        norms = tl.load(norms_ptr + channel, mask=ok, other=0.0, cache_modifier=".cg")
        values = norms[:, None] * values.to(ACC)
    return values.to(tl.float64)


@triton.jit
def _layer_priority(norms_ptr, values_ptr, top_ptr, first, channels, stride, num_tasks,
                    TB: tl.constexpr, BLOCK: tl.constexpr, FROM_NORMS: tl.constexpr,
                    ACC: tl.constexpr):  # fmt: skip
    """Top task of every channel of one layer (two scans: totals, then the argmax)."""
    task = tl.arange(0, TB)
    totals = tl.zeros([TB], tl.float64)
    for c in range(0, channels, BLOCK):
        idx = c + tl.arange(0, BLOCK)
        strength = _strength_block(norms_ptr, values_ptr, first, idx, idx < channels, stride,
                                   num_tasks, TB, FROM_NORMS, ACC)  # fmt: skip
        totals += tl.sum(strength, axis=0)
    scale = tl.where(totals > 0, totals, 1.0)[None, :]
    for c in range(0, channels, BLOCK):
        idx = c + tl.arange(0, BLOCK)
        ok = idx < channels
        strength = _strength_block(norms_ptr, values_ptr, first, idx, ok, stride, num_tasks,
                                   TB, FROM_NORMS, ACC)  # fmt: skip
        normalised = tl.where(totals[None, :] > 0, strength / scale, 0.0)
        normalised = tl.where((task < num_tasks)[None, :], normalised, -1.0)
        best = tl.argmax(normalised, axis=1, tie_break_left=True)
        tl.store(top_ptr + first + idx, best.to(tl.int64), mask=ok)


@triton.jit(do_not_specialize=["channels_total", "num_tasks"])
def strength_kernel(
    addresses_ptr, anchor_ptr, items_ptr, layers_ptr, counts_ptr, arrived_ptr, norms_ptr,
    scales_ptr, top_ptr, channels_total, num_tasks,
    SUB: tl.constexpr, WIDTH: tl.constexpr, TB: tl.constexpr, BLOCK: tl.constexpr,
    FUSED: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    """Squared norms of one work item's rows; the last item of a layer (FUSED) then writes
    the layer's top tasks. ``anchor_ptr`` only carries the weights' element type."""
    item = items_ptr + tl.program_id(0) * COLUMNS
    start = tl.load(item)
    rows = tl.load(item + 1).to(tl.int32)
    row_length = tl.load(item + 2).to(tl.int32)
    subrows = tl.load(item + 3).to(tl.int32)
    channel = tl.load(item + 4)
    layer = tl.load(item + 5)
    kind = tl.load(item + 6)
    weight_ptr = tl.load(addresses_ptr + layer).to(tl.pointer_type(anchor_ptr.dtype.element_ty))
    weight_ptr += start
    if kind == ROWS:
        row, lead, row_ok, mask, rel = row_tile(rows, row_length, subrows, SUB, WIDTH)
        w = tl.load(weight_ptr + rel, mask=mask, other=0).to(ACC)
        norms = row_totals(tl.sum(w * w, axis=1), row, subrows, rows)
        tl.store(norms_ptr + channel + row, norms, mask=row_ok & lead)
    else:
        total = tl.zeros([SUB, WIDTH], ACC)
        for first in range(0, row_length, SUB * WIDTH):
            mask, rel = flat_tile(row_length, first, SUB, WIDTH)
            w = tl.load(weight_ptr + rel, mask=mask, other=0).to(ACC)
            total += w * w
        tl.store(norms_ptr + channel, tl.sum(total))
    if FUSED:
        tl.debug_barrier()  # every thread's norms are stored before the release below
        arrived = tl.atomic_add(arrived_ptr + layer, 1, sem="acq_rel", scope="gpu")
        if arrived == tl.load(counts_ptr + layer) - 1:
            _layer_priority(norms_ptr, scales_ptr, top_ptr, tl.load(layers_ptr + layer * 4 + 3),
                            tl.load(layers_ptr + layer * 4 + 1), channels_total, num_tasks,
                            TB, BLOCK, True, ACC)  # fmt: skip


@triton.jit(do_not_specialize=["channels_total", "num_tasks"])
def priority_kernel(strength_ptr, layers_ptr, top_ptr, channels_total, num_tasks,
                    TB: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    """Top tasks of one layer (one program per layer) from ``strength [T, C]``."""
    layer = tl.program_id(0)
    _layer_priority(strength_ptr, strength_ptr, top_ptr, tl.load(layers_ptr + layer * 4 + 3),
                    tl.load(layers_ptr + layer * 4 + 1), channels_total, num_tasks,
                    TB, BLOCK, False, tl.float64)  # fmt: skip


def weight_addresses(weights: Sequence[Tensor]) -> Tensor:
    """int64 ``[L]`` device table of the weights' addresses, kept for the last few sets.

    Built on first sight of a set of addresses (a pinned, asynchronous copy); inside CUDA
    graph capture it must already exist, so call once before capturing.
    """
    device = weights[0].device
    key = (device, tuple(w.data_ptr() for w in weights))
    found = _addresses.get(key)
    if found is not None:
        _addresses.move_to_end(key)
        return found
    host = torch.tensor(key[1], dtype=torch.int64)
    if device.type == "cuda":
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                "the triton backend meets these weights for the first time during CUDA graph "
                "capture: run the call once before capturing"
            )
        table = host.pin_memory().to(device, non_blocking=True)
    else:
        table = host.to(device)
    _addresses[key] = table
    while len(_addresses) > ADDRESS_TABLES:
        _addresses.popitem(last=False)
    return table


def run_strength(
    weights: Sequence[Tensor],
    items: Tensor,
    counts: Tensor,
    layers: Tensor,
    scales: Tensor | None,
    *,
    channels_total: int,
    config: TileConfig,
) -> tuple[Tensor, Tensor | None]:
    """Squared row norms ``[C]`` of every layer's ``[C_i, D_i]`` weight, and with ``scales
    [T, C]`` (accumulation dtype) the top tasks int64 ``[C]`` from the same launch."""
    acc = accumulation_dtype(weights[0].dtype)
    device = weights[0].device
    norms = torch.empty(channels_total, dtype=acc, device=device)
    fused = scales is not None
    tasks = scales.shape[0] if scales is not None else 1
    top = torch.empty(channels_total, dtype=torch.int64, device=device) if fused else None
    arrived = torch.zeros(layers.shape[0], dtype=torch.int32, device=device)
    strength_kernel[(items.shape[0],)](
        weight_addresses(weights), weights[0], items, layers, counts, arrived, norms,
        scales if scales is not None else norms, top if top is not None else norms,
        channels_total, tasks,
        SUB=config.subrows, WIDTH=config.width, TB=task_block(tasks),
        BLOCK=CHANNEL_BLOCK, FUSED=fused, ACC=triton_dtype(acc), num_warps=config.num_warps,
        enable_fp_fusion=FP_FUSION,
    )  # fmt: skip
    return norms, top


def run_priority(strength: Tensor, layers: Tensor) -> Tensor:
    """Top tasks int64 ``[C]`` from ``strength [T, C]`` (fp32 or fp64, contiguous)."""
    tasks, channels = strength.shape
    top = torch.empty(channels, dtype=torch.int64, device=strength.device)
    if layers.shape[0] > 0:
        priority_kernel[(layers.shape[0],)](
            strength, layers, top, channels, tasks,
            TB=task_block(tasks), BLOCK=CHANNEL_BLOCK, num_warps=4,
            enable_fp_fusion=FP_FUSION,
        )  # fmt: skip
    return top
