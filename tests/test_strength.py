"""Connection strength and top priority (docs/algorithm.md steps 1-3) on every backend."""

from __future__ import annotations

import pytest
import torch

import cs_kernels as ck
from cs_kernels.model_shapes import model_plan, resnet18_conv_shapes, resnet50_conv_shapes
from tests.conftest import DEVICE, FAST_BACKENDS

ALL_BACKENDS = [*FAST_BACKENDS, "reference"]


def test_batchnorm_scale_formula() -> None:
    gamma = torch.tensor([[1.0, 2.0], [0.5, -3.0]])
    var = torch.tensor([[1.0, 3.0], [0.0, 8.0]])
    expected = gamma.square() / (var + 1e-3)
    torch.testing.assert_close(ck.batchnorm_scale(gamma, var, eps=1e-3), expected)
    # Per-task tensors are stacked in task order.
    torch.testing.assert_close(ck.batchnorm_scale(list(gamma), list(var), eps=1e-3), expected)


def test_batchnorm_scale_edges_follow_the_paper() -> None:
    gamma = torch.tensor([[2.0, 3.0]])
    var = torch.tensor([[1.0, 4.0]])
    # No affine scale: 1 / (v + eps). No running statistics: gamma^2.
    torch.testing.assert_close(ck.batchnorm_scale(None, var, eps=0.0), 1.0 / var)
    torch.testing.assert_close(ck.batchnorm_scale(gamma, None), gamma.square())


def test_batchnorm_scale_dtype() -> None:
    half = torch.ones(2, 3, dtype=torch.float16)
    assert ck.batchnorm_scale(half, half).dtype == torch.float32
    assert ck.batchnorm_scale(half, half.double()).dtype == torch.float64


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 1), (7, 3, 3, 3), (33, 17), (4, 1000)])
def test_channel_strength(backend, dtype, shape) -> None:
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(shape, generator=gen).to(dtype).to(DEVICE)
    scale = torch.rand(3, shape[0], generator=gen).to(DEVICE)
    strength = ck.channel_strength(weight, scale, backend=backend)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert strength.dtype == acc and strength.shape == (3, shape[0])
    expected = weight.double().reshape(shape[0], -1).square().sum(1)[None] * scale.double()
    torch.testing.assert_close(strength.double(), expected, rtol=1e-5, atol=0)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_top_priority_normalises_per_task_and_breaks_ties_low(backend) -> None:
    # Task 1 is 10x stronger everywhere: after normalisation it is identical to task 0.
    strength = torch.tensor([[1.0, 2.0, 3.0], [10.0, 20.0, 30.0], [3.0, 2.0, 1.0]])
    top = ck.top_priority(strength.to(DEVICE), backend=backend)
    assert top.dtype == torch.int64
    # Channel 0: 1/6 = 10/60 < 3/6 -> task 2. Channel 1: all 2/6 -> tie -> task 0.
    # Channel 2: 3/6 = 30/60 > 1/6 -> tie between 0 and 1 -> task 0.
    assert top.tolist() == [2, 0, 0]


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_top_priority_with_a_zero_task(backend) -> None:
    strength = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 3.0]])
    assert ck.top_priority(strength.to(DEVICE), backend=backend).tolist() == [1, 0, 1]


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_plan_top_priority_normalises_each_layer_separately(backend) -> None:
    plan = ck.Phase2Plan([(0, 2, 1), (2, 2, 1)], 4)
    # Layer 0: task 0 = [1, 3] -> [.25, .75]; task 1 = [1, 1] -> [.5, .5] => [1, 0].
    # Layer 1: task 0 = [100, 100] -> [.5, .5]; task 1 = [1, 9] -> [.1, .9] => [0, 1].
    strength = torch.tensor([[1.0, 3.0, 100.0, 100.0], [1.0, 1.0, 1.0, 9.0]])
    top = ck.plan_top_priority(strength.to(DEVICE), plan, backend=backend)
    assert top.tolist() == [1, 0, 0, 1]


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("tasks", [1, 2, 5, 24])
def test_plan_top_priority_matches_reference(backend, tasks) -> None:
    plan = model_plan("resnet18")
    gen = torch.Generator().manual_seed(tasks)
    strength = torch.rand(tasks, plan.total_channels, generator=gen).to(DEVICE)
    strength[:, :64] = strength[0, :64].clone()  # first layer: every task ties -> task 0
    expected = ck.plan_top_priority(strength, plan, backend="reference")
    assert torch.equal(ck.plan_top_priority(strength, plan, backend=backend), expected)
    assert bool((expected[:64] == 0).all())


def test_phase2_from_strength_equals_phase2_from_top() -> None:
    plan = ck.Phase2Plan([(0, 4, 3), (12, 5, 2)], 25)
    gen = torch.Generator().manual_seed(0)
    grads = torch.randn(3, 25, generator=gen).to(DEVICE)
    strength = torch.rand(3, 9, generator=gen).to(DEVICE)
    top = ck.plan_top_priority(strength, plan)
    assert torch.equal(ck.phase2(grads, plan, strength), ck.phase2(grads, plan, top=top))


def test_model_shapes_element_counts() -> None:
    count = lambda shapes: sum(torch.Size(s).numel() for s in shapes)  # noqa: E731
    assert count(resnet18_conv_shapes()) == 11_166_912 and len(resnet18_conv_shapes()) == 20
    assert count(resnet50_conv_shapes()) == 23_454_912 and len(resnet50_conv_shapes()) == 53
    plan = model_plan("resnet50")
    assert plan.numel == plan.connection_numel == 23_454_912 and plan.gaps == ()


def test_strength_pipeline_needs_no_host_sync_when_unchecked() -> None:
    """Meta tensors have no values: any hidden sync (.item(), bool(tensor)) would raise."""
    meta = torch.device("meta")
    plan = ck.Phase2Plan([(0, 8, 27), (216, 4, 8)], 250)
    gamma, var = torch.ones(3, 12, device=meta), torch.ones(3, 12, device=meta)
    scale = ck.batchnorm_scale(gamma, var, check=False)
    strength = torch.cat(
        [
            ck.channel_strength(torch.ones(8, 3, 3, 3, device=meta), scale[:, :8]),
            ck.channel_strength(torch.ones(4, 8, device=meta), scale[:, 8:]),
        ],
        dim=1,
    )
    grads = torch.ones(3, 250, device=meta)
    out = ck.phase2(grads, plan, strength, check=False, backend="torch")
    assert out.shape == (250,) and out.device == meta
    with pytest.raises(RuntimeError):  # the checked path does read values
        ck.batchnorm_scale(gamma, var)


def test_strength_functions_are_detached_from_autograd() -> None:
    conv = torch.nn.Conv2d(3, 4, 3)
    bn = [torch.nn.BatchNorm2d(4) for _ in range(2)]
    scale = ck.batchnorm_scale([b.weight for b in bn], [b.running_var for b in bn])
    strength = ck.channel_strength(conv.weight, scale)
    assert not scale.requires_grad and not strength.requires_grad
