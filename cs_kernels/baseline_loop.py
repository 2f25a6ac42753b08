"""An authors'-style Phase 2 loop: the cost model of the published implementation.

Written from docs/algorithm.md (group mode): per layer, clone every task's rows, then a Python
double loop over (top task, other task) with boolean-mask indexing and a host-side
``if dot < 0`` (a device-to-host sync per task pair). Benchmarks report our speedup over it;
tests check that it computes the same function as the reference.
"""

from __future__ import annotations

import torch
from torch import Tensor

from cs_kernels.plan import Phase2Plan


@torch.no_grad()
def authors_style_phase2(
    grads: Tensor, plan: Phase2Plan, top: Tensor, *, uniform: str = "sum"
) -> Tensor:
    """Group-mode Phase 2, the slow way. ``grads: [T, N]``, ``top: [C]`` -> ``[N]``."""
    num_tasks = grads.shape[0]
    out = grads.sum(dim=0)
    for layer, first in zip(plan.layers, plan.first_channels, strict=True):
        span = slice(layer.offset, layer.offset + layer.numel)
        shape = (layer.channels, layer.row_length)
        rows = [grads[t, span].view(shape).clone() for t in range(num_tasks)]
        nu = top[first : first + layer.channels]
        if uniform == "sum" and bool((nu == nu[0]).all()):
            continue
        for i in range(num_tasks):
            members = nu == i
            if not bool(members.any()):
                continue
            ref = grads[i, span].view(shape)[members]
            ref_norm_sq = (ref * ref).sum()
            for j in range(num_tasks):
                if j == i:
                    continue
                g_j = rows[j][members]
                dot = (ref * g_j).sum()
                if dot.item() < 0:
                    rows[j][members] = g_j - dot / ref_norm_sq * ref
        out[span] = torch.stack(rows).sum(dim=0).flatten()
    return out
