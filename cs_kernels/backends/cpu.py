"""The ``cpu`` backend: the OpenMP C++ kernels of ``csrc/``, called as ``torch.ops``.

Phase 2 in steps runs fused (csrc/steps_cpu.cpp): one parallel region per step, through the
ops `CompiledOpsBackend` calls; the projection coefficients too (a CPU-only op).
"""

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

    def projection_coefficients(
        self, gram: Tensor, plan: Phase2Plan, top: Tensor, *, group: bool, project_uniform: bool
    ) -> Tensor:
        coefficients: Tensor = torch.ops.cs_kernels.projection_coefficients(
            gram, plan.layer_table(gram.device), top, group, project_uniform
        )
        return coefficients
