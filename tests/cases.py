"""Inputs chosen to break kernels: awkward plans, task counts, priorities and gradients."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

import cs_kernels as ck


@dataclass(frozen=True)
class Case:
    """One Phase 2 input: a plan, T, and builders for ``top`` and ``grads``."""

    name: str
    plan: ck.Phase2Plan
    tasks: int
    top: Callable[[torch.Generator, int, int], torch.Tensor]  # (gen, T, C) -> int64 [C]
    grads: Callable[[torch.Generator, int, int], torch.Tensor]  # (gen, T, N) -> f64 [T, N]

    def build(self, device: torch.device, dtype: torch.dtype, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        top = self.top(gen, self.tasks, self.plan.total_channels).to(device)
        grads = self.grads(gen, self.tasks, self.plan.numel).to(dtype).to(device)
        return grads.contiguous(), top


def random_top(gen: torch.Generator, tasks: int, channels: int) -> torch.Tensor:
    return torch.randint(0, tasks, (channels,), generator=gen)


def constant_top(task: int) -> Callable[[torch.Generator, int, int], torch.Tensor]:
    return lambda gen, tasks, channels: torch.full((channels,), min(task, tasks - 1))


def two_task_top(gen: torch.Generator, tasks: int, channels: int) -> torch.Tensor:
    """Only tasks 0 and T-1 ever lead: every other group is empty."""
    return torch.randint(0, 2, (channels,), generator=gen) * (tasks - 1)


def normal_grads(gen: torch.Generator, tasks: int, numel: int) -> torch.Tensor:
    return torch.randn(tasks, numel, generator=gen, dtype=torch.float64)


def zero_grads(gen: torch.Generator, tasks: int, numel: int) -> torch.Tensor:
    return torch.zeros(tasks, numel, dtype=torch.float64)


def some_zero_tasks(gen: torch.Generator, tasks: int, numel: int) -> torch.Tensor:
    """Task 0 (often a top task) and every third task have all-zero gradients."""
    g = normal_grads(gen, tasks, numel)
    g[::3] = 0
    return g


def opposite_grads(gen: torch.Generator, tasks: int, numel: int) -> torch.Tensor:
    """Task 1 is exactly -task 0; the others conflict partially."""
    g = normal_grads(gen, tasks, numel)
    if tasks > 1:
        g[1] = -g[0]
    return g


def one_layer(channels: int, row_length: int) -> ck.Phase2Plan:
    return ck.Phase2Plan([(0, channels, row_length)], channels * row_length)


# Layers out of offset order, gaps at the start, between layers and at the end; row lengths
# around the 16-lane and 512-element block boundaries of the CPU kernel.
MIXED = ck.Phase2Plan([(300, 3, 17), (5, 4, 15), (80, 7, 16), (200, 2, 33), (450, 1, 1)], 470)
BLOCKS = ck.Phase2Plan([(0, 3, 511), (1533, 2, 513), (2559, 1, 1025)], 3600)
# Rows and a gap longer than the torch backend's 2048-element pieces.
LONG = ck.Phase2Plan([(7000, 2, 4500), (16_000, 3, 2048)], 22_200)

CASES = [
    Case("C1-D1", one_layer(1, 1), 3, random_top, normal_grads),
    Case("C1-D37", one_layer(1, 37), 2, random_top, normal_grads),
    Case("C37-D1", one_layer(37, 1), 3, random_top, normal_grads),
    Case("odd-C13-D33", one_layer(13, 33), 5, random_top, normal_grads),
    Case("mixed-T1", MIXED, 1, random_top, normal_grads),
    Case("mixed-T2", MIXED, 2, random_top, normal_grads),
    Case("mixed-T3", MIXED, 3, random_top, normal_grads),
    Case("mixed-T7", MIXED, 7, random_top, normal_grads),
    Case("mixed-T8", MIXED, 8, random_top, normal_grads),
    Case("mixed-T9", MIXED, 9, random_top, normal_grads),
    Case("mixed-T24", MIXED, 24, random_top, normal_grads),
    Case("blocks-T4", BLOCKS, 4, random_top, normal_grads),
    Case("long-rows-T3", LONG, 3, random_top, normal_grads),
    Case("uniform-top", MIXED, 3, constant_top(1), normal_grads),
    Case("empty-groups-T5", MIXED, 5, two_task_top, normal_grads),
    Case("zero-grads", MIXED, 3, random_top, zero_grads),
    Case("zero-tasks-T6", MIXED, 6, random_top, some_zero_tasks),
    Case("opposite", MIXED, 2, random_top, opposite_grads),
    Case("opposite-T4", one_layer(9, 20), 4, constant_top(0), opposite_grads),
    Case("no-layers", ck.Phase2Plan([], 41), 3, random_top, normal_grads),
    Case("empty-buffer", ck.Phase2Plan([], 0), 2, random_top, normal_grads),
]


# Dedicated inputs for the row-tile kernels of the triton backend: vectorisable (16-byte
# aligned) and unaligned layers, rows that fill a tile exactly or need several, task counts
# around the power-of-two padding of the per-task vectors, one top task everywhere.
ALIGNED = ck.Phase2Plan([(0, 5, 32), (160, 3, 48), (400, 2, 16), (448, 4, 8)], 512)
ALIGNED_LONG = ck.Phase2Plan([(0, 2, 1024), (2048, 1, 640), (2720, 3, 16)], 2784)
TILE_SIZED = ck.Phase2Plan([(3, 2, 512), (1027, 4, 256), (2051, 1, 511)], 2600)

TRITON_CASES = [
    Case("aligned-T3", ALIGNED, 3, random_top, normal_grads),
    Case("aligned-long-T2", ALIGNED_LONG, 2, random_top, normal_grads),
    Case("tile-sized-T5", TILE_SIZED, 5, random_top, normal_grads),
    Case("few-channels-T24", one_layer(3, 20), 24, random_top, normal_grads),
    Case("mixed-T16", MIXED, 16, random_top, normal_grads),
    Case("mixed-T33", MIXED, 33, random_top, normal_grads),
    Case("one-top-everywhere", BLOCKS, 4, constant_top(2), opposite_grads),
    Case("aligned-zero-tasks", ALIGNED, 4, random_top, some_zero_tasks),
]
