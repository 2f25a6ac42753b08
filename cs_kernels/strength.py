"""Connection strength (docs/algorithm.md, paper Eq. 4, 6, 7, 10) and the top-priority task.

``S_t[c] = (sum_d W[c, d]^2) * f_t[c]``, where ``f_t`` is the per-task factor of the
task-specific connection (for a BatchNorm: ``gamma_t^2 / (running_var_t + eps)``).
Strengths are normalised per task over each layer's channels, and the top-priority task of a
channel is the argmax over tasks, ties going to the smallest task index.

Edge behaviour follows the paper (see docs/api.md): a BatchNorm without affine scale contributes
``1 / (v + eps)``; one without running statistics contributes ``gamma^2``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from cs_kernels._validation import (
    accumulation_dtype,
    require_bool,
    require_finite_nonnegative,
    require_float,
    require_rank,
    require_same_device,
)
from cs_kernels.backends import resolve_backend
from cs_kernels.plan import Phase2Plan, single_layer_plan


def _stack_tasks(x: Tensor | Sequence[Tensor] | None, name: str) -> Tensor | None:
    if x is None or isinstance(x, Tensor):
        return x
    if isinstance(x, Sequence) and len(x) > 0 and all(isinstance(v, Tensor) for v in x):
        try:
            return torch.stack(list(x))
        except RuntimeError as exc:
            raise ValueError(f"{name}: the per-task tensors must share shape and device") from exc
    raise TypeError(f"{name} must be a [T, C] tensor, a non-empty sequence of [C] tensors or None")


def batchnorm_scale(
    weight: Tensor | Sequence[Tensor] | None,
    running_var: Tensor | Sequence[Tensor] | None,
    eps: float = 1e-5,
    *,
    check: bool = True,
) -> Tensor:
    """Per-task BatchNorm factor ``f_t[c] = gamma_t[c]^2 / (running_var_t[c] + eps)``.

    Args:
        weight: ``gamma``, ``[T, C]`` (or T tensors ``[C]``); None for a BatchNorm without
            affine scale (factor ``1 / (v + eps)``).
        running_var: ``[T, C]`` (or T tensors ``[C]``); None without running statistics
            (factor ``gamma^2``).
        eps: the BatchNorm's epsilon.
        check: verify that ``running_var`` is >= 0 and not NaN (syncs on a GPU).

    Returns:
        ``[T, C]``, fp32 (fp64 when an input is fp64), detached from autograd. Nothing is
        modified.
    """
    gamma = _stack_tasks(weight, "weight")
    var = _stack_tasks(running_var, "running_var")
    if gamma is None and var is None:
        raise ValueError("weight and running_var cannot both be None: no task-specific factor")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"eps must be a float, got {type(eps).__name__}")
    if not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be a finite non-negative number, got {eps!r}")
    present = [(n, t) for n, t in (("weight", gamma), ("running_var", var)) if t is not None]
    for name, tensor in present:
        require_float(tensor, name)
        require_rank(tensor, name, 2, "[T, C]")
    dtype = torch.float64 if any(t.dtype == torch.float64 for _, t in present) else torch.float32
    if gamma is not None and var is not None:
        require_same_device(var, "running_var", gamma, "weight")
        if var.shape != gamma.shape:
            raise ValueError(
                f"running_var has shape {tuple(var.shape)} but weight has {tuple(gamma.shape)}"
            )
    require_bool(check, "check")
    factor = torch.ones((), dtype=dtype)
    if gamma is not None:
        factor = gamma.detach().to(dtype).square()
    if var is not None:
        v = var.detach().to(dtype)
        if check and not bool((v >= 0).all()):
            raise ValueError("running_var must be non-negative and not NaN")
        factor = factor / (v + eps)
    return factor


def channel_strength(weight: Tensor, scale: Tensor, *, backend: str = "auto") -> Tensor:
    """Raw connection strength ``S[t, c] = ||W[c]||^2 * scale[t, c]``.

    Args:
        weight: the shared weight ``[C, ...]`` (conv ``[C, Cin, kh, kw]``, linear ``[C, D]``).
        scale: per-task factors ``[T, C]``, e.g. from `batchnorm_scale`.
        backend: see `cs_kernels.available_backends`.

    Returns:
        ``[T, C]``, fp32 (fp64 when ``weight`` is fp64), detached from autograd.
    """
    require_float(weight, "weight")
    require_float(scale, "scale")
    if weight.dim() < 1 or weight.shape[0] == 0:
        raise ValueError(f"weight must be [C, ...] with C >= 1, got shape {tuple(weight.shape)}")
    require_rank(scale, "scale", 2, "[T, C]")
    if scale.shape[1] != weight.shape[0]:
        raise ValueError(
            f"scale has {scale.shape[1]} channels but weight has {weight.shape[0]} (dim 0)"
        )
    require_same_device(scale, "scale", weight, "weight")
    engine = resolve_backend(backend, weight.device)
    norms = engine.row_sqnorm(weight.detach().reshape(weight.shape[0], -1))
    return norms[None, :] * scale.detach().to(norms.dtype)


def top_priority(strength: Tensor, *, backend: str = "auto", check: bool = True) -> Tensor:
    """Top-priority task per channel of one layer.

    Args:
        strength: ``[T, C]`` raw strengths (>= 0).
        check: verify that the strengths are finite and non-negative (syncs on a GPU).

    Returns:
        int64 ``[C]``: ``argmax_t S[t, c] / sum_c' S[t, c']``, ties to the smallest ``t``.
    """
    require_float(strength, "strength")
    require_rank(strength, "strength", 2, "[T, C]")
    plan = single_layer_plan(strength.shape[1], 1) if strength.shape[1] > 0 else Phase2Plan([], 0)
    return plan_top_priority(strength, plan, backend=backend, check=check)


def plan_top_priority(
    strength: Tensor, plan: Phase2Plan, *, backend: str = "auto", check: bool = True
) -> Tensor:
    """Top-priority task of every channel of a plan, normalising per layer.

    Args:
        strength: ``[T, plan.total_channels]`` raw strengths, layers in plan order.

    Returns:
        int64 ``[plan.total_channels]``.
    """
    require_float(strength, "strength")
    require_rank(strength, "strength", 2, "[T, total_channels]")
    if not isinstance(plan, Phase2Plan):
        raise TypeError(f"plan must be a Phase2Plan, got {type(plan).__name__}")
    if strength.shape[0] < 1:
        raise ValueError("strength must have at least one task row (T >= 1)")
    if strength.shape[1] != plan.total_channels:
        raise ValueError(
            f"strength has {strength.shape[1]} channels but the plan has {plan.total_channels}"
        )
    if require_bool(check, "check"):
        require_finite_nonnegative(strength, "strength")
    engine = resolve_backend(backend, strength.device)
    values = strength.detach().to(accumulation_dtype(strength.dtype)).contiguous()
    return engine.top_priority(values, plan)
