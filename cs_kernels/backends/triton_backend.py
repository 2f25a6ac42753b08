"""The ``triton`` backend: Phase 2 and connection strength as Triton kernels.

One launch covers every layer and gap of a plan (work-item tables in device memory, built
once per plan and device); channel mode reads each gradient element once; group mode adds
a deterministic per-layer reduction and a second pass over the rows that project; strength
and priority are one fused launch. No host synchronisation after the first call, so a whole
`phase2` / `phase2_from_weights` call can be captured in a CUDA graph once it has run once
(the first call builds the tables and, on a GPU, autotunes the tile configuration).

Runs on CUDA tensors whenever triton imports, and on CPU tensors under the triton
interpreter (``TRITON_INTERPRET=1`` before import; slow, for tests). Under ``torch.compile``
the launches go through ``torch.library`` custom ops (`cs_kernels.triton_kernels.ops`).
Kernels: `cs_kernels.triton_kernels`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from cs_kernels._validation import accumulation_dtype
from cs_kernels.backends.base import Backend
from cs_kernels.plan import Phase2Plan, single_layer_plan

try:
    from cs_kernels.triton_kernels import ops, steps, tuning, work_items
except Exception as exc:  # ImportError, or triton failing to initialise
    _IMPORT_ERROR: str | None = f"triton does not import ({type(exc).__name__}: {exc})"
else:
    _IMPORT_ERROR = None


class TritonBackend(Backend):
    name = "triton"

    def unavailable_reason(self) -> str | None:
        return _IMPORT_ERROR

    def supports(self, device: torch.device) -> bool:
        if device.type == "cuda":
            return True
        return device.type == "cpu" and _IMPORT_ERROR is None and tuning.INTERPRETED

    # -- strength ----------------------------------------------------------------------

    def _strength(
        self, weights: Sequence[Tensor], plan: Phase2Plan, scales: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        device = weights[0].device
        config = tuning.strength_config(plan)
        items, counts = work_items.cached_weight_items(plan, device, config.tile, config.width)
        return ops.strength(
            [w.contiguous() for w in weights],
            items,
            counts,
            plan.layer_table(device),
            scales.contiguous() if scales is not None else None,
            plan.total_channels,
            config,
        )

    def row_sqnorm(self, weight: Tensor) -> Tensor:
        plan = single_layer_plan(weight.shape[0], weight.shape[1])
        return self._strength([weight], plan, None)[0]

    def plan_row_sqnorm(self, weights: Sequence[Tensor], plan: Phase2Plan) -> Tensor:
        if not weights:
            return super().plan_row_sqnorm(weights, plan)
        return self._strength(weights, plan, None)[0]

    def weights_top_priority(
        self, weights: Sequence[Tensor], scales: Tensor, plan: Phase2Plan
    ) -> Tensor:
        if not weights:
            return torch.empty(0, dtype=torch.int64, device=scales.device)
        return self._strength(weights, plan, scales)[1]

    def top_priority(self, strength: Tensor, plan: Phase2Plan) -> Tensor:
        return ops.priority(strength.contiguous(), plan.layer_table(strength.device))

    # -- Phase 2 -----------------------------------------------------------------------

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
        device = grads.device
        layers = plan.layer_table(device)
        top = top.contiguous()

        def run(config: tuning.TileConfig) -> None:
            items = work_items.cached_phase2_items(plan, device, config.tile, config.width)
            ops.phase2(grads, top, items, layers, out, projected, group, project_uniform, config)

        key = ("phase2", grads.shape[0], grads.dtype, group, projected is not None)
        candidates = tuning.phase2_candidates(plan, grads.element_size())
        run(tuning.choose(plan, device, key, candidates, run))

    # -- Phase 2 in steps (one launch each; the heuristic tile configuration) -----------

    def _step_items(self, grads: Tensor, plan: Phase2Plan) -> tuple[Tensor, tuning.TileConfig]:
        config = tuning.steps_config(plan, grads.element_size())
        return work_items.cached_phase2_items(plan, grads.device, config.tile, config.width), config

    def channel_gram(self, grads: Tensor, plan: Phase2Plan) -> Tensor:
        items, config = self._step_items(grads, plan)
        return steps.run_gram(grads, items, plan.total_channels, None, config=config)

    def channel_gram_and_sum(self, grads: Tensor, plan: Phase2Plan, *, out: Tensor) -> Tensor:
        items, config = self._step_items(grads, plan)
        return steps.run_gram(grads, items, plan.total_channels, out, config=config)

    def _project(
        self,
        grads: Tensor,
        plan: Phase2Plan,
        top: Tensor,
        coefficients: Tensor,
        out: Tensor,
        projected: Tensor | None,
        out_holds_sum: bool,
    ) -> None:
        items, config = self._step_items(grads, plan)
        coef = coefficients.to(accumulation_dtype(grads.dtype)).contiguous()
        steps.run_project(grads, top.contiguous(), coef, items, out, projected,
                          out_holds_sum=out_holds_sum, config=config)  # fmt: skip

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
        self._project(grads, plan, top, coefficients, out, projected, False)

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
        self._project(grads, plan, top, coefficients, out, projected, True)
