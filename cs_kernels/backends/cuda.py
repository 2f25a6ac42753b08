"""The ``cuda`` backend (work in progress: issue 4). Not yet available."""

from __future__ import annotations

import torch
from torch import Tensor

from cs_kernels.backends.base import Backend
from cs_kernels.plan import Phase2Plan


class CudaBackend(Backend):
    name = "cuda"

    def unavailable_reason(self) -> str | None:
        return "not implemented yet"

    def supports(self, device: torch.device) -> bool:
        return device.type == "cuda"

    def row_sqnorm(self, weight: Tensor) -> Tensor:
        raise NotImplementedError

    def top_priority(self, strength: Tensor, plan: Phase2Plan) -> Tensor:
        raise NotImplementedError

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
        raise NotImplementedError
