"""The ``cpu`` backend: the OpenMP C++ kernels of ``csrc/``, called as ``torch.ops``."""

from __future__ import annotations

import torch
from torch import Tensor

from cs_kernels import _extension
from cs_kernels.backends.compiled import CompiledOpsBackend
from cs_kernels.plan import Phase2Plan


class CpuBackend(CompiledOpsBackend):
    name = "cpu"

    def unavailable_reason(self) -> str | None:
        return _extension.load_error()

    def supports(self, device: torch.device) -> bool:
        return device.type == "cpu"

    # Phase 2 in steps: fused kernels (csrc/steps_cpu.cpp), one parallel region per call.

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

    def projection_coefficients(
        self, gram: Tensor, plan: Phase2Plan, top: Tensor, *, group: bool, project_uniform: bool
    ) -> Tensor:
        coefficients: Tensor = torch.ops.cs_kernels.projection_coefficients(
            gram, plan.layer_table(gram.device), top, group, project_uniform
        )
        return coefficients

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
