"""`torch.compile` sees through the torch backend and the compiled ops (their fake kernels)."""

from __future__ import annotations

import pytest
import torch

import cs_kernels as ck
from tests.cases import MIXED
from tests.conftest import DEVICE, FAST_BACKENDS


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("mode", ["group", "channel"])
@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_compiled_phase2_matches_eager(backend: str, mode: str) -> None:
    gen = torch.Generator().manual_seed(0)
    grads = torch.randn(3, MIXED.numel, generator=gen).to(DEVICE)
    top = torch.randint(0, 3, (MIXED.total_channels,), generator=gen).to(DEVICE)

    def step(g: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return ck.phase2(g, MIXED, top=t, mode=mode, backend=backend, check=False) * 1.0

    eager = step(grads, top)
    compiled = torch.compile(step, fullgraph=True)(grads, top)
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif("cpu" not in FAST_BACKENDS, reason="the compiled cpu backend is not built")
def test_compiled_ops_pass_the_opcheck() -> None:
    """torch.library's own consistency checks (schema, fake kernels, dispatch)."""
    gen = torch.Generator().manual_seed(1)
    grads = torch.randn(2, MIXED.numel, generator=gen)
    top = torch.randint(0, 2, (MIXED.total_channels,), generator=gen)
    out = torch.empty(MIXED.numel)
    args = (grads, MIXED.layer_table("cpu"), MIXED.gap_table("cpu"), top, True, False, out, None)
    torch.library.opcheck(torch.ops.cs_kernels.phase2_.default, args)
    torch.library.opcheck(torch.ops.cs_kernels.row_sqnorm.default, (torch.randn(5, 7),))
    strength = torch.rand(2, MIXED.total_channels, generator=gen)
    torch.library.opcheck(
        torch.ops.cs_kernels.top_priority.default, (strength, MIXED.layer_table("cpu"))
    )


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_a_compiled_step_follows_the_plan_it_is_given(backend: str) -> None:
    """The plan is a compile-time constant guarded by equality: another layout of the same
    ``N`` must recompile (not reuse the first plan's index tables); an equal plan may not."""
    first = ck.Phase2Plan([(0, 4, 6), (24, 2, 5), (40, 3, 2)], 50)
    other = ck.Phase2Plan([(2, 6, 4), (30, 5, 2), (44, 1, 6)], 50)
    twin = ck.Phase2Plan(list(first.layers), first.numel)
    gen = torch.Generator().manual_seed(2)
    grads = torch.randn(3, 50, generator=gen).to(DEVICE)

    def step(g: torch.Tensor, t: torch.Tensor, plan: ck.Phase2Plan) -> torch.Tensor:
        return ck.phase2(g, plan, top=t, backend=backend, check=False) * 1.0

    compiled = torch.compile(step, fullgraph=True)
    for plan in (first, other, twin, first):
        top = torch.randint(0, 3, (plan.total_channels,), generator=gen).to(DEVICE)
        expected = ck.phase2(grads, plan, top=top, backend="reference")
        torch.testing.assert_close(compiled(grads, top, plan), expected, atol=1e-5, rtol=1e-5)
