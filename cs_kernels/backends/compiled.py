"""The compiled ops ``torch.ops.cs_kernels.*`` (``csrc/``), shared by ``cpu`` and ``cuda``.

The same op schemas are registered for the CPU and the CUDA dispatch keys, so one class calls
them and the device of the tensors picks the kernels. Subclasses only say where they run.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from cs_kernels.backends.base import Backend
from cs_kernels.plan import Phase2Plan


class CompiledOpsBackend(Backend):
    """Calls the extension's ops; the plan's tables are handed over in device memory."""

    def row_sqnorm(self, weight: Tensor) -> Tensor:
        result: Tensor = torch.ops.cs_kernels.row_sqnorm(weight.contiguous())
        return result

    def plan_row_sqnorm(self, weights: Sequence[Tensor], plan: Phase2Plan) -> Tensor:
        """Every layer's squared row norms in one op call."""
        if not weights:
            return super().plan_row_sqnorm(weights, plan)
        result: Tensor = torch.ops.cs_kernels.plan_row_sqnorm([w.contiguous() for w in weights])
        return result

    def top_priority(self, strength: Tensor, plan: Phase2Plan) -> Tensor:
        result: Tensor = torch.ops.cs_kernels.top_priority(
            strength.contiguous(), plan.layer_table(strength.device)
        )
        return result

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
        torch.ops.cs_kernels.phase2_(
            grads,
            plan.layer_table(grads.device),
            plan.gap_table(grads.device),
            top.contiguous(),
            group,
            project_uniform,
            out,
            projected,
        )
