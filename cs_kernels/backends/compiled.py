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
        if out.dtype != grads.dtype and grads.device.type != "cpu":
            # bf16/fp16 rows into an fp32 result: the CPU kernels read the rows as they are;
            # the CUDA kernels take one dtype, so they run on an fp32 copy of the rows (a
            # transient [T, N] fp32 buffer: the triton backend, first on CUDA, needs none).
            grads = grads.to(out.dtype)
            if projected is not None:
                full = torch.empty_like(grads)
                self.phase2(grads, plan, top, group=group, project_uniform=project_uniform,
                            out=out, projected=full)  # fmt: skip
                projected.copy_(full)
                return
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

    # Phase 2 in steps: fused kernels (csrc/steps_cpu.cpp: one parallel region per step;
    # csrc/cuda/steps.cu: a few launches per step whatever the number of layers).

    def channel_gram(self, grads: Tensor, plan: Phase2Plan) -> Tensor:
        return self._gram(grads, plan, None)

    def channel_gram_and_sum(self, grads: Tensor, plan: Phase2Plan, *, out: Tensor) -> Tensor:
        return self._gram(grads, plan, out)

    def _gram(self, grads: Tensor, plan: Phase2Plan, out: Tensor | None) -> Tensor:
        gram: Tensor = torch.ops.cs_kernels.channel_gram(
            grads,
            plan.layer_table(grads.device),
            plan.gap_table(grads.device),
            plan.total_channels,
            out,
        )
        return gram

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
        self._project(grads, plan, top, coefficients, False, out, projected)

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
        self._project(grads, plan, top, coefficients, True, out, projected)

    def _project(
        self,
        grads: Tensor,
        plan: Phase2Plan,
        top: Tensor,
        coefficients: Tensor,
        out_holds_sum: bool,
        out: Tensor,
        projected: Tensor | None,
    ) -> None:
        torch.ops.cs_kernels.project_(
            grads,
            plan.layer_table(grads.device),
            plan.gap_table(grads.device),
            top.contiguous(),
            coefficients,
            out_holds_sum,
            out,
            projected,
        )
