"""The ``cpu`` backend: the OpenMP C++ kernels of ``csrc/``, called as ``torch.ops``.

Phase 2 in steps runs fused (csrc/steps_cpu.cpp): one parallel region per step, through the
ops `CompiledOpsBackend` calls.
"""

from __future__ import annotations

import torch

from cs_kernels import _extension
from cs_kernels.backends.compiled import CompiledOpsBackend


class CpuBackend(CompiledOpsBackend):
    name = "cpu"

    def unavailable_reason(self) -> str | None:
        return _extension.load_error()

    def supports(self, device: torch.device) -> bool:
        return device.type == "cpu"
