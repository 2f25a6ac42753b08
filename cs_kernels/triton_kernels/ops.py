"""The kernel launchers, callable eagerly or as ``torch.library`` custom ops.

Eager calls launch the kernels directly (no dispatcher overhead). While ``torch.compile``
traces, the same launches go through custom ops with fake (meta) implementations, so the
compiled graph treats them as opaque calls instead of tracing the host code of the
launchers (address tables, grids).
"""

# No `from __future__ import annotations`: torch.library reads the annotations at runtime.
from collections.abc import Sequence
from typing import Optional

import torch
from torch import Tensor

from cs_kernels._validation import accumulation_dtype
from cs_kernels.triton_kernels.phase2 import run_phase2
from cs_kernels.triton_kernels.strength import run_priority, run_strength
from cs_kernels.triton_kernels.tuning import TileConfig

_NAMESPACE = "cs_kernels_triton"


def phase2(
    grads: Tensor,
    top: Tensor,
    items: Tensor,
    layers: Tensor,
    out: Tensor,
    projected: Tensor | None,
    group: bool,
    project_uniform: bool,
    config: TileConfig,
) -> None:
    """`phase2.run_phase2`: writes ``out [N]`` and, when given, ``projected [T, N]``."""
    if torch.compiler.is_compiling():
        _phase2_op(grads, top, items, layers, out, projected, group, project_uniform, *config)
    else:
        run_phase2(grads, top, items, layers, out, projected, group=group,
                   project_uniform=project_uniform, config=config)  # fmt: skip


def strength(
    weights: Sequence[Tensor],
    items: Tensor,
    counts: Tensor,
    layers: Tensor,
    scales: Tensor | None,
    channels_total: int,
    config: TileConfig,
) -> tuple[Tensor, Tensor]:
    """`strength.run_strength`: norms ``[C]`` and top tasks int64 ``[C]`` (empty without
    ``scales``)."""
    if torch.compiler.is_compiling():
        norms, top = _strength_op(list(weights), items, counts, layers, scales, channels_total,
                                  *config)  # fmt: skip
        return norms, top
    norms, found = run_strength(weights, items, counts, layers, scales,
                                channels_total=channels_total, config=config)  # fmt: skip
    if found is None:
        found = torch.empty(0, dtype=torch.int64, device=norms.device)
    return norms, found


def priority(strength: Tensor, layers: Tensor) -> Tensor:
    """`strength.run_priority`: top tasks int64 ``[C]`` of ``strength [T, C]``."""
    if torch.compiler.is_compiling():
        result: Tensor = _priority_op(strength, layers)
        return result
    return run_priority(strength, layers)


@torch.library.custom_op(f"{_NAMESPACE}::phase2_", mutates_args=("out", "projected"))
def _phase2_op(
    grads: Tensor,
    top: Tensor,
    items: Tensor,
    layers: Tensor,
    out: Tensor,
    projected: Optional[Tensor],  # noqa: UP045
    group: bool,
    project_uniform: bool,
    tile: int,
    width: int,
    num_warps: int,
    num_stages: int,
) -> None:
    config = TileConfig(tile, width, num_warps, num_stages)
    run_phase2(grads, top, items, layers, out, projected, group=group,
               project_uniform=project_uniform, config=config)  # fmt: skip


@_phase2_op.register_fake
def _(
    grads: Tensor,
    top: Tensor,
    items: Tensor,
    layers: Tensor,
    out: Tensor,
    projected: Optional[Tensor],  # noqa: UP045
    group: bool,
    project_uniform: bool,
    tile: int,
    width: int,
    num_warps: int,
    num_stages: int,
) -> None:
    return None


@torch.library.custom_op(f"{_NAMESPACE}::strength", mutates_args=())
def _strength_op(
    weights: list[Tensor],
    items: Tensor,
    counts: Tensor,
    layers: Tensor,
    scales: Optional[Tensor],  # noqa: UP045
    channels_total: int,
    tile: int,
    width: int,
    num_warps: int,
    num_stages: int,
) -> tuple[Tensor, Tensor]:
    config = TileConfig(tile, width, num_warps, num_stages)
    norms, top = run_strength(weights, items, counts, layers, scales,
                              channels_total=channels_total, config=config)  # fmt: skip
    if top is None:
        top = torch.empty(0, dtype=torch.int64, device=norms.device)
    return norms, top


@_strength_op.register_fake
def _(
    weights: list[Tensor],
    items: Tensor,
    counts: Tensor,
    layers: Tensor,
    scales: Optional[Tensor],  # noqa: UP045
    channels_total: int,
    tile: int,
    width: int,
    num_warps: int,
    num_stages: int,
) -> tuple[Tensor, Tensor]:
    acc = accumulation_dtype(weights[0].dtype)
    norms = weights[0].new_empty(channels_total, dtype=acc)
    top = weights[0].new_empty(channels_total if scales is not None else 0, dtype=torch.int64)
    return norms, top


@torch.library.custom_op(f"{_NAMESPACE}::priority", mutates_args=())
def _priority_op(strength: Tensor, layers: Tensor) -> Tensor:
    return run_priority(strength, layers)


@_priority_op.register_fake
def _(strength: Tensor, layers: Tensor) -> Tensor:
    return strength.new_empty(strength.shape[1], dtype=torch.int64)
