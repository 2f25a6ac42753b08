"""The contract every backend implements. The public API validates arguments first, so a
backend receives well-formed tensors on a device it supports and only computes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch
from torch import Tensor

from cs_kernels.backends import phase2_steps
from cs_kernels.plan import Phase2Plan


class Backend(ABC):
    """One implementation of the cs_kernels ops. Backends differ in speed only."""

    name: str = ""

    def unavailable_reason(self) -> str | None:
        """``None`` when the backend can run here, otherwise why it cannot."""
        return None

    @abstractmethod
    def supports(self, device: torch.device) -> bool:
        """Whether tensors on ``device`` can be handled."""

    @abstractmethod
    def row_sqnorm(self, weight: Tensor) -> Tensor:
        """``weight: [C, D]`` -> ``[C]`` squared row norms, fp32 (fp64 for fp64 input)."""

    def plan_row_sqnorm(self, weights: Sequence[Tensor], plan: Phase2Plan) -> Tensor:
        """Squared row norms of every layer's shared weight, layers in plan order.

        ``weights[i]: [C_i, D_i]`` (contiguous, one dtype) -> ``[total_channels]``, fp32
        (fp64 for fp64 weights). The default calls `row_sqnorm` per layer; fused backends
        override it with one launch.
        """
        if not weights:
            return torch.empty(0, dtype=torch.float32)
        return torch.cat([self.row_sqnorm(w) for w in weights])

    def weights_top_priority(
        self, weights: Sequence[Tensor], scales: Tensor, plan: Phase2Plan
    ) -> Tensor:
        """Top-priority task per channel from the shared weights and per-task factors.

        ``weights[i]: [C_i, D_i]``, ``scales: [T, total_channels]`` (accumulation dtype)
        -> int64 ``[total_channels]``; strength ``S[t, c] = ||W[c]||^2 * scales[t, c]``,
        normalised per layer. Fused backends may override the composition.
        """
        norms = self.plan_row_sqnorm(weights, plan)
        return self.top_priority(norms[None, :] * scales.to(norms.dtype), plan)

    @abstractmethod
    def top_priority(self, strength: Tensor, plan: Phase2Plan) -> Tensor:
        """``strength: [T, total_channels]`` -> int64 ``[total_channels]`` top task per
        channel, normalising each task's strengths over each layer's channels."""

    @abstractmethod
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
        """Phase 2 over ``grads: [T, N]`` with ``top: [total_channels]`` (int64).

        Writes the combined gradient into ``out: [N]`` and, when given, the projected
        per-task gradients into ``projected: [T, N]`` (both ``grads.dtype``).
        ``group`` selects group mode (else channel mode); ``project_uniform`` projects
        layers whose channels all share one top task (else they are plainly summed).
        """

    # Phase 2 in steps (for channels spread over processes; see `phase2_steps`). The defaults
    # are vectorised PyTorch for any device; a backend may override them with fused kernels.

    def channel_gram(self, grads: Tensor, plan: Phase2Plan) -> Tensor:
        """``grads: [T, N]`` -> ``[total_channels, T, T]`` Gram matrices ``<G_i[c], G_j[c]>``
        of every channel row, fp32 (fp64 for fp64 input)."""
        return phase2_steps.channel_gram(grads, plan)

    def channel_gram_and_sum(self, grads: Tensor, plan: Phase2Plan, *, out: Tensor) -> Tensor:
        """`channel_gram`, and ``out: [N]`` (``grads.dtype``) = ``sum_t G_t`` written in place.
        Fused backends do both in one pass over the rows."""
        gram = self.channel_gram(grads, plan)
        torch.sum(grads, dim=0, out=out)
        return gram

    def projection_coefficients(
        self, gram: Tensor, plan: Phase2Plan, top: Tensor, *, group: bool, project_uniform: bool
    ) -> Tensor:
        """``gram: [total_channels, T, T]``, ``top: [total_channels]`` (int64) -> ``[T,
        total_channels]`` coefficients: ``G'_j[c] = G_j[c] - coef[j, c] * G_top(c)[c]``."""
        return phase2_steps.projection_coefficients(
            gram, plan, top, group=group, project_uniform=project_uniform
        )

    def project(
        self,
        grads: Tensor,
        plan: Phase2Plan,
        top: Tensor,
        coefficients: Tensor,
        *,
        out: Tensor,
        projected: Tensor | None,
    ) -> None:
        """Writes ``out: [N]`` = ``sum_t G'_t`` with the given ``coefficients: [T,
        total_channels]`` (and ``projected: [T, N]`` = the ``G'_t`` when given)."""
        phase2_steps.project(grads, plan, top, coefficients, out=out, projected=projected)

    def project_onto_sum(
        self,
        grads: Tensor,
        plan: Phase2Plan,
        top: Tensor,
        coefficients: Tensor,
        *,
        out: Tensor,
        projected: Tensor | None,
    ) -> None:
        """`project` where ``out: [N]`` already holds ``sum_t G_t``: fused backends rewrite
        only the rows with a non-zero shrink; the default recomputes all of ``out``."""
        self.project(grads, plan, top, coefficients, out=out, projected=projected)
