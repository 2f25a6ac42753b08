"""Phase 2 step by step, for models whose channels are spread over processes.

`phase2` needs every channel of a layer in one buffer. Under FSDP2 each process holds whole
output channels but only some of them, while the top-priority tasks (normalised over a
layer) and the group sums of group mode span all of them. So Phase 2 splits into steps
whose cross-process part is small:

    norms = plan_row_sqnorm(local_weights, local_plan)        # [C_local]
    gram = channel_gram(local_grads, local_plan)               # [C_local, T, T]
    # (or channel_gram(..., out=out) + apply_projection(..., out=out, out_holds_sum=True):
    # the plain sum comes with the Gram pass, the projection rewrites the projected rows only)
    # ... scatter into [C] tensors, one all-reduce, then on every process:
    top = plan_top_priority(norms[None] * factors, plan)       # [C]
    coef = projection_coefficients(gram, plan, top, mode=..., uniform=...)  # [T, C]
    out = apply_projection(local_grads, local_plan, top[local], coef[:, local])      # [N_local]

On one process, ``apply_projection(g, plan, top, coef)`` with ``coef =
projection_coefficients(channel_gram(g, plan), plan, top)`` equals ``phase2(g, plan,
top=top)`` within rounding (tested for every backend).
`cs_kernels.training` does all of this for a ``fully_shard``-ed model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, overload

import torch
from torch import Tensor

from cs_kernels._validation import (
    MODES,
    UNIFORM_RULES,
    accumulation_dtype,
    require_bool,
    require_choice,
    require_finite,
    require_float,
    require_rank,
    require_same_device,
    require_tensor,
    require_top,
    storage_overlaps,
)
from cs_kernels.backends import resolve_backend
from cs_kernels.plan import Phase2Plan
from cs_kernels.projection import Mode, UniformRule, _check_grads, _check_out, _check_weights


def _check_step_out(out: object, grads: Tensor, numel: int) -> Tensor:
    """`_check_out` for the steps, whose ``out`` has the rows' own dtype (no fp32 result for
    half-size rows here: the sharded controller refuses those)."""
    t = require_tensor(out, "out")
    if t.dtype != grads.dtype:
        raise TypeError(
            f"out must have the dtype of grads ({grads.dtype}) in the steps, got {t.dtype}"
        )
    return _check_out(t, grads, numel)


def _check_plan(plan: object) -> Phase2Plan:
    if not isinstance(plan, Phase2Plan):
        raise TypeError(f"plan must be a Phase2Plan, got {type(plan).__name__}")
    return plan


def _check_rows(grads: object, plan: Phase2Plan) -> Tensor:
    g = _check_grads(grads, 2, "[T, N]")
    require_rank(g, "grads", 2, "[T, N]")
    if g.shape[1] != plan.numel:
        raise ValueError(f"grads has {g.shape[1]} elements per task but plan.numel={plan.numel}")
    return g


def plan_row_sqnorm(
    weights: Sequence[Tensor], plan: Phase2Plan, *, backend: str = "auto"
) -> Tensor:
    """Squared row norms ``||W[c]||^2`` of every plan layer's weight, layers in plan order.

    Args:
        weights: one weight per plan layer, ``[C_i, ...]`` with ``C_i * D_i`` elements, one
            float dtype and device. Not modified.
        plan: the layers (only ``channels`` and ``row_length`` are read).
        backend: ``"auto"`` or a name from `cs_kernels.available_backends`.

    Returns:
        ``[plan.total_channels]``, fp32 (fp64 for fp64 weights), detached.
    """
    plan = _check_plan(plan)
    if isinstance(weights, Tensor) or not isinstance(weights, (list, tuple)):
        raise TypeError("weights must be a list or tuple of tensors, one per plan layer")
    if not weights:
        if plan.layers:
            raise ValueError(f"weights has 0 tensors but the plan has {len(plan.layers)}")
        return torch.empty(0, dtype=torch.float32)
    ref = require_float(weights[0], "weights[0]")
    rows = _check_weights(weights, plan, ref)
    engine = resolve_backend(backend, ref.device)
    with torch.no_grad():
        return engine.plan_row_sqnorm(rows, plan)


def channel_gram(
    grads: Tensor,
    plan: Phase2Plan,
    *,
    out: Tensor | None = None,
    backend: str = "auto",
    check_finite: bool = False,
) -> Tensor:
    """Per-channel Gram matrices of the stacked gradients.

    Args:
        grads: ``[T, N]`` per-task gradients (contiguous). Not modified.
        plan: where the connection layers lie in ``[0, N)``.
        out: optional ``[N]`` buffer of ``grads.dtype``: receives the plain sum ``sum_t G_t``
            (written in place), computed in the same pass over the rows. Hand it to
            `apply_projection` with ``out_holds_sum=True``, which then only rewrites the rows
            it projects.
        backend: ``"auto"`` or a name from `cs_kernels.available_backends`.
        check_finite: reject NaN/Inf in ``grads``.

    Returns:
        ``[plan.total_channels, T, T]`` with ``gram[c, i, j] = <G_i[c], G_j[c]>`` (symmetric;
        the diagonal holds the rows' squared norms), fp32 (fp64 for fp64 grads).
    """
    plan = _check_plan(plan)
    g = _check_rows(grads, plan)
    if require_bool(check_finite, "check_finite"):
        require_finite(g, "grads")
    if out is not None:
        _check_step_out(out, g, plan.numel)
    engine = resolve_backend(backend, g.device)
    with torch.no_grad():
        if out is None:
            return engine.channel_gram(g, plan)
        return engine.channel_gram_and_sum(g, plan, out=out)


def projection_coefficients(
    gram: Tensor,
    plan: Phase2Plan,
    top: Tensor,
    *,
    mode: Mode = "group",
    uniform: UniformRule = "sum",
    backend: str = "auto",
    check: bool = True,
) -> Tensor:
    """Phase 2's projection coefficients from every channel's Gram matrix and top task.

    Args:
        gram: ``[plan.total_channels, T, T]`` from `channel_gram` (summed over processes).
        plan: the *whole* model's plan (every channel, for the group sums and the uniform rule).
        top: int64 ``[plan.total_channels]`` top-priority tasks.
        mode, uniform: as in `cs_kernels.phase2`.
        backend: ``"auto"`` or a name from `cs_kernels.available_backends`.
        check: validate ``top``'s range and that ``gram`` is finite (syncs on accelerators).

    Returns:
        ``[T, plan.total_channels]`` (``gram.dtype``): ``G'_j[c] = G_j[c] - coef[j, c] *
        G_top(c)[c]``; ``coef[j, c] = a / ||G_i[CG_i]||^2`` where ``a < 0``, else 0.
    """
    plan = _check_plan(plan)
    s = require_float(gram, "gram")
    if s.dim() != 3 or s.shape[0] != plan.total_channels or s.shape[1] != s.shape[2]:
        raise ValueError(
            f"gram must be [total_channels={plan.total_channels}, T, T], got {tuple(s.shape)}"
        )
    if s.shape[1] < 1:
        raise ValueError("gram must hold at least one task (T >= 1)")
    require_choice(mode, "mode", MODES)
    require_choice(uniform, "uniform", UNIFORM_RULES)
    check = require_bool(check, "check")
    t = require_tensor(top, "top")
    require_same_device(t, "top", s, "gram")
    top64 = require_top(t, "top", plan.total_channels, s.shape[1], check).to(torch.int64)
    if check:
        require_finite(s, "gram")
    engine = resolve_backend(backend, s.device)
    with torch.no_grad():
        return engine.projection_coefficients(
            s.to(accumulation_dtype(s.dtype)).contiguous(),
            plan,
            top64,
            group=mode == "group",
            project_uniform=uniform == "project",
        )


@overload
def apply_projection(
    grads: Tensor,
    plan: Phase2Plan,
    top: Tensor,
    coefficients: Tensor,
    *,
    out: Tensor | None = ...,
    out_holds_sum: bool = ...,
    per_task: Literal[False] = ...,
    backend: str = ...,
    check: bool = ...,
    check_finite: bool = ...,
) -> Tensor: ...
@overload
def apply_projection(
    grads: Tensor,
    plan: Phase2Plan,
    top: Tensor,
    coefficients: Tensor,
    *,
    out: Tensor | None = ...,
    out_holds_sum: bool = ...,
    per_task: Literal[True],
    backend: str = ...,
    check: bool = ...,
    check_finite: bool = ...,
) -> tuple[Tensor, Tensor]: ...
def apply_projection(
    grads: Tensor,
    plan: Phase2Plan,
    top: Tensor,
    coefficients: Tensor,
    *,
    out: Tensor | None = None,
    out_holds_sum: bool = False,
    per_task: bool = False,
    backend: str = "auto",
    check: bool = True,
    check_finite: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Combine the stacked gradients with given projection coefficients.

    Args:
        grads: ``[T, N]`` per-task gradients (contiguous). Not modified.
        plan: where the connection layers lie in ``[0, N)``.
        top: int64 ``[plan.total_channels]`` top-priority tasks.
        coefficients: ``[T, plan.total_channels]`` from `projection_coefficients`.
        out: optional ``[N]`` result buffer of ``grads.dtype`` (written in place).
        out_holds_sum: ``out`` already holds ``sum_t G_t`` (from ``channel_gram(...,
            out=out)``); only the projected rows are rewritten (fused backends) or all of
            ``out`` is recomputed (the others). Needs ``out``.
        per_task: also return the projected per-task gradients ``[T, N]``.
        backend: ``"auto"`` or a name from `cs_kernels.available_backends`.
        check: validate ``top``'s range and that ``coefficients`` is finite (syncs).
        check_finite: also reject NaN/Inf in ``grads``.

    Returns:
        ``[N]``: ``sum_t G_t - (sum_j coef[j, c]) * G_top(c)[c]`` on every connection row and
        the plain sum elsewhere (``out`` when given), plus ``[T, N]`` when ``per_task``.
    """
    plan = _check_plan(plan)
    g = _check_rows(grads, plan)
    flags = (
        ("out_holds_sum", out_holds_sum),
        ("per_task", per_task),
        ("check", check),
        ("check_finite", check_finite),
    )
    for name, flag in flags:
        require_bool(flag, name)
    if out_holds_sum and out is None:
        raise ValueError("out_holds_sum=True needs out (the buffer channel_gram summed into)")
    num_tasks = g.shape[0]
    t = require_tensor(top, "top")
    require_same_device(t, "top", g, "grads")
    top64 = require_top(t, "top", plan.total_channels, num_tasks, check).to(torch.int64)
    c = require_float(coefficients, "coefficients")
    require_same_device(c, "coefficients", g, "grads")
    if c.dim() != 2 or c.shape[0] != num_tasks or c.shape[1] != plan.total_channels:
        raise ValueError(
            f"coefficients must be [T={num_tasks}, {plan.total_channels}], got {tuple(c.shape)}"
        )
    if check:
        require_finite(c, "coefficients")
    if check_finite:
        require_finite(g, "grads")
    if out is not None:
        _check_step_out(out, g, plan.numel)
        for name, other in (("top", top64), ("coefficients", c)):
            if storage_overlaps(out, other):
                raise ValueError(f"out must not share memory with {name}")
    engine = resolve_backend(backend, g.device)
    result = out if out is not None else g.new_empty(plan.numel)
    projected = g.new_empty(g.shape) if per_task else None
    with torch.no_grad():
        if out_holds_sum:
            engine.project_onto_sum(g, plan, top64, c.contiguous(), out=result, projected=projected)
        else:
            engine.project(g, plan, top64, c.contiguous(), out=result, projected=projected)
    if per_task:
        assert projected is not None
        return result, projected
    return result
