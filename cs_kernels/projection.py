"""Phase 2, "conserve task priority" (docs/algorithm.md, paper Algorithm 1).

`phase2` runs the whole model at once on the stacked buffer ``grads: [T, N]`` described by
a `Phase2Plan`; `project_layer` runs one layer ``[T, C, ...]``. Both validate their
arguments, then hand them to one backend. Nothing the caller owns is modified, except
``out`` when given.
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
    require_contiguous,
    require_finite,
    require_finite_nonnegative,
    require_float,
    require_rank,
    require_same_device,
    require_tensor,
    require_top,
    storage_overlaps,
)
from cs_kernels.backends import resolve_backend
from cs_kernels.plan import Phase2Plan, single_layer_plan
from cs_kernels.strength import plan_top_priority

Mode = Literal["group", "channel"]
UniformRule = Literal["sum", "project"]


def out_dtypes(grads_dtype: torch.dtype) -> tuple[torch.dtype, ...]:
    """The dtypes ``out`` may have for ``grads`` of ``grads_dtype``: its own, and for
    bf16/fp16 rows also float32 (the accumulation dtype, so the result is rounded never)."""
    acc = accumulation_dtype(grads_dtype)
    return (grads_dtype,) if acc == grads_dtype else (grads_dtype, acc)


def _check_out(out: object, grads: Tensor, numel: int) -> Tensor:
    t = require_tensor(out, "out")
    allowed = out_dtypes(grads.dtype)
    if t.dtype not in allowed:
        names = " or ".join(str(d) for d in allowed)
        raise TypeError(f"out must be {names} for {grads.dtype} grads, got {t.dtype}")
    require_same_device(t, "out", grads, "grads")
    if t.dim() != 1 or t.shape[0] != numel:
        raise ValueError(f"out must have shape [{numel}], got {tuple(t.shape)}")
    require_contiguous(t, "out")
    if storage_overlaps(t, grads):
        raise ValueError("out must not share memory with grads")
    return t


def _run_phase2(
    grads: Tensor,
    plan: Phase2Plan,
    top: Tensor,
    *,
    mode: str,
    uniform: str,
    out: Tensor | None,
    per_task: bool,
    backend: str,
    check_finite: bool,
) -> tuple[Tensor, Tensor | None]:
    """Shared tail of `phase2` and `project_layer`: arguments already shaped and checked."""
    if check_finite:
        require_finite(grads, "grads")
    engine = resolve_backend(backend, grads.device)
    numel = grads.shape[1]
    result = out if out is not None else grads.new_empty(numel)
    projected = grads.new_empty(grads.shape) if per_task else None
    with torch.no_grad():  # the API is autograd-free: gradients are data here
        engine.phase2(
            grads,
            plan,
            top,
            group=mode == "group",
            project_uniform=uniform == "project",
            out=result,
            projected=projected,
        )
    return result, projected


def _check_flags(**flags: object) -> None:
    for name, value in flags.items():
        require_bool(value, name)


def _check_grads(grads: object, min_rank: int, shape_doc: str) -> Tensor:
    g = require_float(grads, "grads")
    if g.dim() < min_rank:
        raise ValueError(f"grads must be {shape_doc}, got shape {tuple(g.shape)}")
    if g.shape[0] < 1:
        raise ValueError("grads must hold at least one task (T >= 1)")
    require_contiguous(g, "grads")
    return g


def _check_plan_call(grads: object, plan: object, mode: str, uniform: str, out: object) -> Tensor:
    """Arguments shared by `phase2` and `phase2_from_weights`; returns ``grads``."""
    g = _check_grads(grads, 2, "[T, N]")
    require_rank(g, "grads", 2, "[T, N]")
    if not isinstance(plan, Phase2Plan):
        raise TypeError(f"plan must be a Phase2Plan, got {type(plan).__name__}")
    if g.shape[1] != plan.numel:
        raise ValueError(f"grads has {g.shape[1]} elements per task but plan.numel={plan.numel}")
    require_choice(mode, "mode", MODES)
    require_choice(uniform, "uniform", UNIFORM_RULES)
    if out is not None:
        _check_out(out, g, plan.numel)
    return g


@overload
def phase2(
    grads: Tensor,
    plan: Phase2Plan,
    strength: Tensor | None = ...,
    *,
    top: Tensor | None = ...,
    mode: Mode = ...,
    uniform: UniformRule = ...,
    out: Tensor | None = ...,
    per_task: Literal[False] = ...,
    backend: str = ...,
    check: bool = ...,
    check_finite: bool = ...,
) -> Tensor: ...
@overload
def phase2(
    grads: Tensor,
    plan: Phase2Plan,
    strength: Tensor | None = ...,
    *,
    top: Tensor | None = ...,
    mode: Mode = ...,
    uniform: UniformRule = ...,
    out: Tensor | None = ...,
    per_task: Literal[True],
    backend: str = ...,
    check: bool = ...,
    check_finite: bool = ...,
) -> tuple[Tensor, Tensor]: ...
def phase2(
    grads: Tensor,
    plan: Phase2Plan,
    strength: Tensor | None = None,
    *,
    top: Tensor | None = None,
    mode: Mode = "group",
    uniform: UniformRule = "sum",
    out: Tensor | None = None,
    per_task: bool = False,
    backend: str = "auto",
    check: bool = True,
    check_finite: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Phase 2 for a whole model: combine the stacked per-task gradients in one call.

    Args:
        grads: ``[T, N]`` per-task gradients of the ``N`` shared elements (contiguous;
            fp32, fp64, bf16 or fp16). Not modified.
        plan: where the connection layers lie in ``[0, N)``.
        strength: ``[T, plan.total_channels]`` raw connection strengths, layers in plan
            order; normalised per layer. Give either ``strength`` or ``top``.
        top: int64 ``[plan.total_channels]``, precomputed top-priority tasks.
        mode: ``"group"`` (the paper) or ``"channel"`` (every channel its own group).
        uniform: ``"sum"`` plainly sums a layer whose channels share one top task (the
            authors' code); ``"project"`` projects it anyway (the paper's Algorithm 1).
        out: optional ``[N]`` result buffer of ``grads.dtype``, or float32 for bf16/fp16
            ``grads`` (half-size rows, full-precision result: every backend accumulates in
            fp32 and rounds nothing); written in place.
        per_task: also return the projected per-task gradients ``[T, N]``.
        backend: ``"auto"`` or a name from `cs_kernels.available_backends`.
        check: validate values (top range, strength sign): syncs on accelerators.
        check_finite: also reject NaN/Inf in ``grads`` (reads it once more).

    Returns:
        ``[N]`` combined gradient (``out`` when given), plus ``[T, N]`` when ``per_task``.
    """
    g = _check_plan_call(grads, plan, mode, uniform, out)
    _check_flags(per_task=per_task, check=check, check_finite=check_finite)
    if (strength is None) == (top is None):
        raise ValueError("give exactly one of strength and top")
    if strength is not None:
        s = require_float(strength, "strength")
        require_same_device(s, "strength", g, "grads")
        if s.dim() != 2 or s.shape[0] != g.shape[0]:
            raise ValueError(
                f"strength must be [T={g.shape[0]}, {plan.total_channels}], got {tuple(s.shape)}"
            )
        top = plan_top_priority(s, plan, backend=backend, check=check)
    else:
        t = require_tensor(top, "top")
        require_same_device(t, "top", g, "grads")
        top = require_top(t, "top", plan.total_channels, g.shape[0], check).to(torch.int64)
    if out is not None:  # the kernels read top (and strength) while they write out
        for name, tensor in (("top", top), ("strength", strength)):
            if tensor is not None and storage_overlaps(out, tensor):
                raise ValueError(f"out must not share memory with {name}")
    result, projected = _run_phase2(
        g,
        plan,
        top,
        mode=mode,
        uniform=uniform,
        out=out,
        per_task=per_task,
        backend=backend,
        check_finite=check_finite,
    )
    if per_task:
        assert projected is not None
        return result, projected
    return result


@overload
def project_layer(
    grads: Tensor,
    top: Tensor,
    *,
    mode: Mode = ...,
    uniform: UniformRule = ...,
    per_task: Literal[False] = ...,
    backend: str = ...,
    check: bool = ...,
    check_finite: bool = ...,
) -> Tensor: ...
@overload
def project_layer(
    grads: Tensor,
    top: Tensor,
    *,
    mode: Mode = ...,
    uniform: UniformRule = ...,
    per_task: Literal[True],
    backend: str = ...,
    check: bool = ...,
    check_finite: bool = ...,
) -> tuple[Tensor, Tensor]: ...
def project_layer(
    grads: Tensor,
    top: Tensor,
    *,
    mode: Mode = "group",
    uniform: UniformRule = "sum",
    per_task: bool = False,
    backend: str = "auto",
    check: bool = True,
    check_finite: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Phase 2 for one connection layer.

    Args:
        grads: ``[T, C, ...]`` per-task gradients of the layer's weight (contiguous). Not
            modified.
        top: int64 ``[C]`` top-priority task per output channel (see `top_priority`).
        mode, uniform, backend, check, check_finite: as in `phase2`.
        per_task: also return the projected per-task gradients ``[T, C, ...]``.

    Returns:
        ``[C, ...]`` combined gradient, plus ``[T, C, ...]`` when ``per_task``.
    """
    g = _check_grads(grads, 2, "[T, C, ...] (at least 2-D)")
    num_tasks, channels = g.shape[0], g.shape[1]
    if channels < 1:
        raise ValueError("grads must have at least one channel (dim 1)")
    row_length = g[0, 0].numel()
    if row_length < 1:
        raise ValueError(f"grads has empty channel rows: shape {tuple(g.shape)}")
    require_choice(mode, "mode", MODES)
    require_choice(uniform, "uniform", UNIFORM_RULES)
    _check_flags(per_task=per_task, check=check, check_finite=check_finite)
    t = require_tensor(top, "top")
    require_same_device(t, "top", g, "grads")
    top64 = require_top(t, "top", channels, num_tasks, check).to(torch.int64)
    plan = single_layer_plan(channels, row_length)
    result, projected = _run_phase2(
        g.reshape(num_tasks, -1),
        plan,
        top64,
        mode=mode,
        uniform=uniform,
        out=None,
        per_task=per_task,
        backend=backend,
        check_finite=check_finite,
    )
    combined = result.view(g.shape[1:])
    if per_task:
        assert projected is not None
        return combined, projected.view(g.shape)
    return combined


def _check_weights(weights: object, plan: Phase2Plan, grads: Tensor) -> list[Tensor]:
    """The shared weights as ``[C_i, D_i]`` detached views (copies only if strided)."""
    if isinstance(weights, Tensor) or not isinstance(weights, (list, tuple)):
        raise TypeError("weights must be a list or tuple of tensors, one per plan layer")
    if len(weights) != len(plan.layers):
        raise ValueError(f"weights has {len(weights)} tensors but the plan has {len(plan.layers)}")
    rows: list[Tensor] = []
    for i, (weight, layer) in enumerate(zip(weights, plan.layers, strict=True)):
        name = f"weights[{i}]"
        w = require_float(weight, name)
        require_same_device(w, name, grads, "grads")
        if rows and w.dtype != rows[0].dtype:
            raise TypeError(f"{name} is {w.dtype} but weights[0] is {rows[0].dtype}")
        if w.dim() < 1 or w.shape[0] != layer.channels:
            raise ValueError(
                f"{name} has shape {tuple(w.shape)}; plan layer {i} has {layer.channels} channels"
            )
        if w.numel() != layer.channels * layer.row_length:
            raise ValueError(
                f"{name} has {w.numel()} elements; plan layer {i} is "
                f"{layer.channels} x {layer.row_length}"
            )
        rows.append(w.detach().reshape(layer.channels, layer.row_length).contiguous())
    return rows


def _check_top_out(
    top_out: object, grads: Tensor, plan: Phase2Plan, out: Tensor | None, scales: Tensor
) -> None:
    t = require_tensor(top_out, "top_out")
    if t.dtype != torch.int64:
        raise TypeError(f"top_out must be int64, got {t.dtype}")
    require_same_device(t, "top_out", grads, "grads")
    if t.dim() != 1 or t.shape[0] != plan.total_channels:
        raise ValueError(f"top_out must have shape [{plan.total_channels}], got {tuple(t.shape)}")
    for name, other in (("grads", grads), ("out", out), ("scales", scales)):
        if other is not None and storage_overlaps(t, other):
            raise ValueError(f"top_out must not share memory with {name}")


@overload
def phase2_from_weights(
    grads: Tensor,
    plan: Phase2Plan,
    weights: Sequence[Tensor],
    scales: Tensor,
    *,
    mode: Mode = ...,
    uniform: UniformRule = ...,
    out: Tensor | None = ...,
    per_task: Literal[False] = ...,
    backend: str = ...,
    check: bool = ...,
    check_finite: bool = ...,
    top_out: Tensor | None = ...,
) -> Tensor: ...
@overload
def phase2_from_weights(
    grads: Tensor,
    plan: Phase2Plan,
    weights: Sequence[Tensor],
    scales: Tensor,
    *,
    mode: Mode = ...,
    uniform: UniformRule = ...,
    out: Tensor | None = ...,
    per_task: Literal[True],
    backend: str = ...,
    check: bool = ...,
    check_finite: bool = ...,
    top_out: Tensor | None = ...,
) -> tuple[Tensor, Tensor]: ...
def phase2_from_weights(
    grads: Tensor,
    plan: Phase2Plan,
    weights: Sequence[Tensor],
    scales: Tensor,
    *,
    mode: Mode = "group",
    uniform: UniformRule = "sum",
    out: Tensor | None = None,
    per_task: bool = False,
    backend: str = "auto",
    check: bool = True,
    check_finite: bool = False,
    top_out: Tensor | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Strength, priority and Phase 2 together, starting from the live shared weights.

    Args:
        grads: ``[T, N]`` stacked per-task gradients, as in `phase2`.
        plan: where the connection layers lie in ``[0, N)``.
        weights: one shared weight per plan layer, in plan order: ``[C_i, ...]`` with
            ``C_i * D_i`` elements, one float dtype. Not modified.
        scales: ``[T, plan.total_channels]`` per-task factors (e.g. `batchnorm_scale` of
            each layer, concatenated along channels).
        mode, uniform, out, per_task, backend, check_finite: as in `phase2`.
        check: validate ``scales`` (finite, >= 0): syncs on accelerators.
        top_out: optional int64 ``[plan.total_channels]`` buffer that receives the
            top-priority task of every channel (for telemetry); written in place.

    Returns:
        As `phase2`: ``[N]``, plus ``[T, N]`` when ``per_task``.
    """
    g = _check_plan_call(grads, plan, mode, uniform, out)
    _check_flags(per_task=per_task, check=check, check_finite=check_finite)
    rows = _check_weights(weights, plan, g)
    s = require_float(scales, "scales")
    require_same_device(s, "scales", g, "grads")
    if s.dim() != 2 or s.shape[0] != g.shape[0] or s.shape[1] != plan.total_channels:
        raise ValueError(
            f"scales must be [T={g.shape[0]}, {plan.total_channels}], got {tuple(s.shape)}"
        )
    if check:
        require_finite_nonnegative(s, "scales")
    if out is not None and storage_overlaps(out, s):
        raise ValueError("out must not share memory with scales")
    if top_out is not None:
        _check_top_out(top_out, g, plan, out, s)
    engine = resolve_backend(backend, g.device)
    acc = accumulation_dtype(rows[0].dtype) if rows else torch.float32
    with torch.no_grad():
        top = engine.weights_top_priority(rows, s.detach().to(acc).contiguous(), plan)
        if top_out is not None:
            top_out.copy_(top)
    result, projected = _run_phase2(
        g,
        plan,
        top,
        mode=mode,
        uniform=uniform,
        out=out,
        per_task=per_task,
        backend=backend,
        check_finite=check_finite,
    )
    if per_task:
        assert projected is not None
        return result, projected
    return result
