"""The authors'-style loop used as the benchmark baseline computes the same function."""

from __future__ import annotations

import pytest
import torch

import cs_kernels as ck
from cs_kernels.baseline_loop import authors_style_phase2
from tests.cases import MIXED
from tests.conftest import DEVICE


@pytest.mark.parametrize("uniform", ["sum", "project"])
@pytest.mark.parametrize("tasks", [1, 2, 5])
def test_authors_loop_matches_reference(tasks: int, uniform: str) -> None:
    gen = torch.Generator().manual_seed(tasks)
    grads = torch.randn(tasks, MIXED.numel, generator=gen, dtype=torch.float64).to(DEVICE)
    top = torch.randint(0, tasks, (MIXED.total_channels,), generator=gen).to(DEVICE)
    top[:3] = 0  # the first layer (3 channels, plan order) is uniform
    expected = ck.phase2(grads, MIXED, top=top, uniform=uniform, backend="reference")
    actual = authors_style_phase2(grads, MIXED, top, uniform=uniform)
    torch.testing.assert_close(actual, expected, atol=1e-12, rtol=1e-12)
