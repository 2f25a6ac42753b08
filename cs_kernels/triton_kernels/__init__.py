"""Triton kernels of the ``triton`` backend (importing this package imports triton).

Modules, one job each:

* `tiles`: the ``@triton.jit`` helpers every kernel shares (row tiles folded into sub-rows,
  per-row totals, alignment-specialised offsets);
* `work_items`: the device tables that let one launch cover every layer and gap of a plan
  (multi-tensor-apply style), built once per plan, device and tile configuration;
* `tuning`: tile configurations, the heuristic choice and the autotuner;
* `strength`: squared row norms of the shared weights and the top-priority task, fused;
* `phase2`: the projection over the stacked ``[T, N]`` buffer, channel and group mode;
* `steps`: Phase 2 in steps for sharded models (per-channel Gram matrices, the projection
  with given coefficients), one launch each;
* `ops`: the same launchers as ``torch.library`` custom ops, so ``torch.compile`` treats
  them as opaque calls.

``TRITON_INTERPRET=1`` in the environment before import runs every kernel in the triton
interpreter on the CPU (slow: tests use small inputs).
"""

from cs_kernels.triton_kernels.tuning import INTERPRETED

__all__ = ["INTERPRETED"]
