"""The reference backend: a literal transcription of docs/algorithm.md, loops and all.

It is the oracle for every parity test. It favours being read beside docs/algorithm.md over
speed: Python loops over layers, groups and tasks, every quantity computed in float64.
"""

from __future__ import annotations

import torch
from torch import Tensor

from cs_kernels._validation import accumulation_dtype
from cs_kernels.backends.base import Backend
from cs_kernels.plan import Phase2Plan


class ReferenceBackend(Backend):
    name = "reference"

    def supports(self, device: torch.device) -> bool:
        return device.type != "mps"  # everything here runs in float64, which MPS lacks

    def row_sqnorm(self, weight: Tensor) -> Tensor:
        # S_t[c] = (sum_d W[c,d]^2) * f_t[c]: this is the sum_d W[c,d]^2 part.
        return weight.double().square().sum(dim=1).to(accumulation_dtype(weight.dtype))

    def top_priority(self, strength: Tensor, plan: Phase2Plan) -> Tensor:
        num_tasks = strength.shape[0]
        top = torch.zeros(plan.total_channels, dtype=torch.int64, device=strength.device)
        for layer, first in zip(plan.layers, plan.first_channels, strict=True):
            raw = strength[:, first : first + layer.channels].double()  # S_t[c]
            normalised = torch.zeros_like(raw)  # S^_t[c] = S_t[c] / sum_c' S_t[c']
            for t in range(num_tasks):
                total = raw[t].sum()
                if total > 0:
                    normalised[t] = raw[t] / total
            best = torch.zeros(layer.channels, dtype=torch.int64, device=strength.device)
            for t in range(1, num_tasks):  # strict '>' keeps ties on the smallest t
                better = normalised[t] > normalised[best, torch.arange(layer.channels)]
                best = torch.where(better, torch.full_like(best, t), best)
            top[first : first + layer.channels] = best
        return top

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
        num_tasks = grads.shape[0]
        original = grads.double()  # G_t, never changed
        work = original.clone()  # G'_t, the projected per-task gradients
        for layer, first in zip(plan.layers, plan.first_channels, strict=True):
            span = slice(layer.offset, layer.offset + layer.numel)
            g = original[:, span].reshape(num_tasks, layer.channels, layer.row_length)
            g_proj = work[:, span].view(num_tasks, layer.channels, layer.row_length)
            nu = top[first : first + layer.channels]

            uniform = bool((nu == nu[0]).all())
            if uniform and not project_uniform:
                continue  # the authors' rule: a uniform-priority layer is plainly summed

            # Groups of channels sharing a top task; channel mode makes every channel a group.
            groups: list[tuple[int, Tensor]] = []
            if group:
                for i in range(num_tasks):
                    groups.append((i, nu == i))
            else:
                for c in range(layer.channels):
                    mask = torch.zeros(layer.channels, dtype=torch.bool, device=grads.device)
                    mask[c] = True
                    groups.append((int(nu[c]), mask))

            for i, members in groups:
                if not bool(members.any()):
                    continue
                g_i = g[i][members]  # the reference G_i[CG_i], never projected
                norm_sq = (g_i * g_i).sum()
                if norm_sq == 0:
                    continue  # then every a is 0 and nothing is projected
                for j in range(num_tasks):
                    if j == i:
                        continue
                    g_j = g[j][members]
                    a = (g_i * g_j).sum()
                    if a < 0:
                        g_proj[j][members] = g_j - a / norm_sq * g_i

        out.copy_(work.sum(dim=0))
        if projected is not None:
            projected.copy_(work)

    # Phase 2 in steps: the same quantities as `phase2` above, spelled out per channel/group.

    def channel_gram(self, grads: Tensor, plan: Phase2Plan) -> Tensor:
        num_tasks = grads.shape[0]
        gram = torch.zeros(
            plan.total_channels, num_tasks, num_tasks, dtype=torch.float64, device=grads.device
        )
        for layer, first in zip(plan.layers, plan.first_channels, strict=True):
            span = slice(layer.offset, layer.offset + layer.numel)
            g = grads[:, span].double().reshape(num_tasks, layer.channels, layer.row_length)
            for c in range(layer.channels):
                rows = g[:, c, :]  # [T, D]: every task's row of channel c
                gram[first + c] = rows @ rows.t()  # <G_i[c], G_j[c]>
        return gram.to(accumulation_dtype(grads.dtype))

    def projection_coefficients(
        self, gram: Tensor, plan: Phase2Plan, top: Tensor, *, group: bool, project_uniform: bool
    ) -> Tensor:
        num_tasks = gram.shape[1]
        g64 = gram.double()
        coef = torch.zeros(num_tasks, plan.total_channels, dtype=torch.float64, device=gram.device)
        for layer, first in zip(plan.layers, plan.first_channels, strict=True):
            nu = top[first : first + layer.channels]
            if bool((nu == nu[0]).all()) and not project_uniform:
                continue  # the authors' rule: a uniform-priority layer is plainly summed
            if group:
                groups = [(i, torch.nonzero(nu == i).flatten()) for i in range(num_tasks)]
            else:
                groups = [(int(nu[c]), torch.tensor([c])) for c in range(layer.channels)]
            for i, members in groups:
                if members.numel() == 0:
                    continue
                channels = first + members.to(gram.device)
                a = g64[channels, i, :].sum(dim=0)  # [T]: <G_i[CG_i], G_j[CG_i]> for every j
                norm_sq = a[i]  # ||G_i[CG_i]||^2
                if norm_sq == 0:
                    continue
                conflict = (a < 0) & (torch.arange(num_tasks, device=gram.device) != i)
                coef[:, channels] = torch.where(conflict, a / norm_sq, 0.0)[:, None]
        return coef.to(gram.dtype)

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
        num_tasks = grads.shape[0]
        work = grads.double().clone()  # G'_t
        original = grads.double()
        for layer, first in zip(plan.layers, plan.first_channels, strict=True):
            span = slice(layer.offset, layer.offset + layer.numel)
            g = original[:, span].reshape(num_tasks, layer.channels, layer.row_length)
            g_proj = work[:, span].view(num_tasks, layer.channels, layer.row_length)
            for c in range(layer.channels):
                i = int(top[first + c])  # G'_j[c] = G_j[c] - coef[j, c] * G_i[c], every j
                g_proj[:, c] -= coefficients[:, first + c, None].double() * g[i, c]
        out.copy_(work.sum(dim=0))
        if projected is not None:
            projected.copy_(work)
