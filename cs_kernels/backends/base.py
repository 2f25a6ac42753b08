"""The contract every backend implements. The public API validates arguments first, so a
backend receives well-formed tensors on a device it supports and only computes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor

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
