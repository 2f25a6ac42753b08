"""The ``cuda`` backend: the CUDA kernels of ``csrc/cuda/``, called as ``torch.ops``.

Phase 2 is three launches (setup, main pass, projection pass) whatever the number of layers,
with no host synchronisation: the plan's tables live in device memory. Reductions are
two-stage with a fixed order, so results are deterministic. Phase 2 in steps is fused too
(``csrc/cuda/steps.cu``): the Gram pass with the plain sum, then the projection that rewrites
only the projected rows, each a few launches over every layer. Values that only a host sync
could check (task indices in ``top``) are validated by the public API (``check=True``).
"""

from __future__ import annotations

import torch

from cs_kernels import _extension
from cs_kernels.backends.compiled import CompiledOpsBackend


class CudaBackend(CompiledOpsBackend):
    name = "cuda"

    def unavailable_reason(self) -> str | None:
        return _extension.cuda_error()

    def supports(self, device: torch.device) -> bool:
        return device.type == "cuda"
