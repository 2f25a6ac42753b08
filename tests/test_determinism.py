"""The same input gives the same bits: run after run, and whatever the thread count."""

from __future__ import annotations

import pytest
import torch

import cs_kernels as ck
from cs_kernels.model_shapes import model_plan
from tests.conftest import DEVICE, FAST_BACKENDS


@pytest.fixture(scope="module")
def resnet18_inputs() -> tuple[ck.Phase2Plan, torch.Tensor, torch.Tensor]:
    plan = model_plan("resnet18")
    gen = torch.Generator().manual_seed(7)
    grads = torch.randn(3, plan.numel, generator=gen).to(DEVICE)
    strength = torch.rand(3, plan.total_channels, generator=gen).to(DEVICE)
    return plan, grads, strength


@pytest.mark.parametrize("mode", ["group", "channel"])
@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_repeated_runs_are_bitwise_identical(backend, mode, resnet18_inputs) -> None:
    plan, grads, strength = resnet18_inputs
    if backend == "torch":  # the portable backend is slow at full size: use a slice
        plan = ck.Phase2Plan(plan.layers[:6], plan.layers[5].offset + plan.layers[5].numel)
        grads = grads[:, : plan.numel].contiguous()
        strength = strength[:, : plan.total_channels]
    first = ck.phase2(grads, plan, strength, mode=mode, backend=backend)
    for _ in range(3):
        again = ck.phase2(grads, plan, strength, mode=mode, backend=backend)
        assert torch.equal(again, first)


@pytest.mark.skipif("cpu" not in FAST_BACKENDS, reason="the compiled cpu backend is not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tasks", [3, 7])  # a register-specialised and the generic kernel
@pytest.mark.parametrize("mode", ["group", "channel"])
def test_cpu_result_does_not_depend_on_thread_count(mode, tasks, dtype) -> None:
    plan = ck.Phase2Plan([(10, 300, 70), (21_010, 64, 513)], 60_000)
    gen = torch.Generator().manual_seed(3)
    grads = torch.randn(tasks, plan.numel, generator=gen).to(dtype)
    top = torch.randint(0, tasks, (plan.total_channels,), generator=gen)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(ck.phase2(grads, plan, top=top, mode=mode, backend="cpu"))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(r, results[0]) for r in results[1:])
