"""The ``cuda`` backend: availability everywhere, the real kernels on a GPU.

Without a usable CUDA build (no GPU, CPU-only torch, extension built without the kernels) the
backend must say why and an explicit ``backend="cuda"`` must raise with that reason. The GPU
tests (full-size parity with ResNet-50 shapes and T = 24, bit-for-bit determinism, CUDA graph
capture, no host synchronisation, 64-bit offsets) skip cleanly without one; run them with
``CS_KERNELS_TEST_DEVICE=cuda`` or plainly on a GPU machine. The small-input parity of every
backend against the reference (tests/test_parity.py) picks ``cuda`` up on a GPU by itself.
"""

from __future__ import annotations

import pytest
import torch

import cs_kernels as ck
from cs_kernels.backends import BackendUnavailableError
from cs_kernels.model_shapes import model_plan
from tests.conftest import assert_close

REASON = ck.backend_status()["cuda"]
CUDA_READY = REASON == "available"
gpu = pytest.mark.skipif(not CUDA_READY, reason=f"cuda backend unavailable: {REASON}")
CPU_OPS = ck.backend_status()["cpu"] == "available"
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


# ------------------------------------------------------------------------- everywhere


def test_status_says_why_cuda_is_unavailable() -> None:
    if CUDA_READY:
        assert torch.cuda.is_available()
    else:
        assert REASON and REASON != "available"
        if not torch.cuda.is_available() and torch.version.cuda is None:
            assert "without" in REASON  # a CPU-only torch: built without the CUDA kernels


@pytest.mark.skipif(CUDA_READY, reason="the cuda backend is available here")
def test_explicit_cuda_backend_raises_with_the_reason() -> None:
    grads, top = torch.randn(2, 3, 4), torch.tensor([0, 1, 1])
    with pytest.raises(BackendUnavailableError, match="cuda") as info:
        ck.project_layer(grads, top, backend="cuda")
    assert REASON in str(info.value)
    with pytest.raises(BackendUnavailableError):
        ck.top_priority(torch.rand(2, 3), backend="cuda")
    assert "cuda" not in ck.available_backends()
    assert "cuda" not in ck.available_backends("cuda")


@pytest.mark.skipif(not CPU_OPS, reason="the compiled extension is not built")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_plan_row_sqnorm_op_equals_per_layer_row_sqnorm(dtype: torch.dtype) -> None:
    """The plan-level op (one launch on CUDA) against the per-layer op, bit for bit."""
    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(s, generator=gen).to(dtype) for s in [(3, 5), (0, 2), (17, 300), (1, 1)]]
    together = torch.ops.cs_kernels.plan_row_sqnorm(weights)
    separate = torch.cat([torch.ops.cs_kernels.row_sqnorm(w) for w in weights])
    assert (
        together.dtype
        == separate.dtype
        == (torch.float64 if dtype == torch.float64 else torch.float32)
    )
    assert torch.equal(together, separate)


@pytest.mark.skipif(not CPU_OPS, reason="the compiled extension is not built")
def test_plan_row_sqnorm_op_checks_its_arguments_and_passes_opcheck() -> None:
    with pytest.raises(RuntimeError, match=r"empty list|at least one"):  # nothing to dispatch on
        torch.ops.cs_kernels.plan_row_sqnorm([])
    with pytest.raises(RuntimeError, match="dtype"):
        torch.ops.cs_kernels.plan_row_sqnorm([torch.ones(2, 2), torch.ones(2, 2).double()])
    with pytest.raises(RuntimeError, match=r"weights\[1\]"):
        torch.ops.cs_kernels.plan_row_sqnorm([torch.ones(2, 2), torch.ones(2, 3).t()])
    args = ([torch.randn(4, 6), torch.randn(2, 9)],)
    torch.library.opcheck(torch.ops.cs_kernels.plan_row_sqnorm.default, args)


# ------------------------------------------------------------------------------ on a GPU

CUDA = torch.device("cuda")


def _oracle(grads: torch.Tensor, plan: ck.Phase2Plan, top: torch.Tensor, mode: str, uniform: str):
    """The vectorised torch backend in float64: the full-size oracle (the reference backend's
    per-channel Python loops are too slow at this size; both agree on tests/cases.py)."""
    return ck.phase2(
        grads.double(), plan, top=top, mode=mode, uniform=uniform, per_task=True, backend="torch"
    )


def _inputs(plan: ck.Phase2Plan, tasks: int, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator(device=CUDA).manual_seed(seed)
    grads = torch.randn(tasks, plan.numel, generator=gen, device=CUDA).to(dtype)
    strength = torch.rand(tasks, plan.total_channels, generator=gen, device=CUDA)
    return grads, ck.plan_top_priority(strength, plan, backend="cuda")


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("model", "tasks"), [("resnet18", 3), ("resnet50", 2), ("resnet50", 5)])
def test_full_size_parity(model: str, tasks: int, dtype: torch.dtype) -> None:
    plan = model_plan(model)
    grads, top = _inputs(plan, tasks, dtype)
    for mode in ("group", "channel"):
        for uniform in ("sum", "project"):
            expected, expected_tasks = _oracle(grads, plan, top, mode, uniform)
            out, per_task = ck.phase2(
                grads, plan, top=top, mode=mode, uniform=uniform, per_task=True, backend="cuda"
            )
            what = f"{model} T={tasks} {mode}/{uniform}"
            assert_close(out, expected.to(dtype), dtype, what)
            assert_close(per_task, expected_tasks.to(dtype), dtype, what + " per_task")


@gpu
def test_full_size_parity_with_24_tasks() -> None:
    """ResNet-50 shapes, T = 24 (three register tiles of tasks), against the oracle."""
    plan = model_plan("resnet50")
    grads, top = _inputs(plan, 24, torch.float32, seed=1)
    for mode in ("group", "channel"):
        expected, _ = _oracle(grads, plan, top, mode, "sum")
        out = ck.phase2(grads, plan, top=top, mode=mode, backend="cuda")
        assert_close(out, expected.float(), torch.float32, f"T=24 {mode}")


@gpu
def test_group_mode_against_the_reference_backend() -> None:
    plan = model_plan("resnet18")
    grads, top = _inputs(plan, 3, torch.float32, seed=2)
    expected = ck.phase2(grads, plan, top=top, backend="reference")
    assert_close(ck.phase2(grads, plan, top=top, backend="cuda"), expected, torch.float32, "group")


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_long_rows_gaps_and_many_items(dtype: torch.dtype) -> None:
    """Rows split into many pieces (D = 300,001), wide layers, gaps everywhere."""
    plan = ck.Phase2Plan(
        [(5, 3, 300_001), (1_000_000, 4096, 200), (2_000_000, 70_000, 3), (2_300_000, 1, 1)],
        2_400_000,
    )
    grads, top = _inputs(plan, 5, dtype, seed=3)
    for mode in ("group", "channel"):
        expected, expected_tasks = _oracle(grads, plan, top, mode, "sum")
        out, per_task = ck.phase2(grads, plan, top=top, mode=mode, per_task=True, backend="cuda")
        assert_close(out, expected.to(dtype), dtype, mode)
        assert_close(per_task, expected_tasks.to(dtype), dtype, mode + " per_task")


@gpu
def test_offsets_beyond_32_bits() -> None:
    """T * N > 2^31: a layer at the end of a 100M-element buffer, 24 tasks (fp16: 4.8 GB)."""
    numel, channels, row = 100_000_000, 64, 1000
    plan = ck.Phase2Plan([(numel - channels * row, channels, row)], numel)
    gen = torch.Generator(device=CUDA).manual_seed(4)
    grads = torch.randn(24, numel, generator=gen, device=CUDA, dtype=torch.float16)
    top = torch.randint(0, 24, (channels,), generator=gen, device=CUDA)
    out = ck.phase2(grads, plan, top=top, backend="cuda")
    tail = grads[:, -channels * row :].contiguous()
    expected = ck.phase2(tail, ck.Phase2Plan([(0, channels, row)], channels * row), top=top,
                         backend="reference")  # fmt: skip
    assert_close(out[-channels * row :], expected, torch.float16, "layer at the end")
    head = grads[:, : numel - channels * row].float().sum(0).half()
    torch.testing.assert_close(out[: numel - channels * row], head, atol=4e-3, rtol=2e-3)


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mode", ["group", "channel"])
def test_repeated_runs_are_bitwise_identical(mode: str, dtype: torch.dtype) -> None:
    plan = model_plan("resnet50")
    grads, top = _inputs(plan, 5, dtype, seed=5)
    first, first_tasks = ck.phase2(grads, plan, top=top, mode=mode, per_task=True, backend="cuda")
    for _ in range(3):
        again, again_tasks = ck.phase2(
            grads, plan, top=top, mode=mode, per_task=True, backend="cuda"
        )
        assert torch.equal(again, first) and torch.equal(again_tasks, first_tasks)


@gpu
@pytest.mark.parametrize("mode", ["group", "channel"])
def test_phase2_captures_in_a_cuda_graph(mode: str) -> None:
    plan = model_plan("resnet18")
    grads, top = _inputs(plan, 3, torch.float32, seed=6)
    static_grads, out = grads.clone(), torch.empty(plan.numel, device=CUDA)
    ck.phase2(
        static_grads, plan, top=top, mode=mode, out=out, backend="cuda", check=False
    )  # warm-up
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ck.phase2(static_grads, plan, top=top, mode=mode, out=out, backend="cuda", check=False)
    for seed in (7, 8):
        fresh, _ = _inputs(plan, 3, torch.float32, seed=seed)
        static_grads.copy_(fresh)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, ck.phase2(fresh, plan, top=top, mode=mode, backend="cuda"))


@gpu
def test_no_host_synchronisation() -> None:
    """With the checks off, strength, priority and Phase 2 never wait for the GPU."""
    plan = model_plan("resnet18")
    grads, top = _inputs(plan, 3, torch.float32, seed=9)
    weights = [torch.randn(layer.channels, layer.row_length, device=CUDA) for layer in plan.layers]
    scales = torch.rand(3, plan.total_channels, device=CUDA)
    out = torch.empty(plan.numel, device=CUDA)

    def step() -> None:
        for mode in ("group", "channel"):
            ck.phase2(grads, plan, top=top, mode=mode, out=out, backend="cuda", check=False)
            ck.phase2(grads, plan, top=top, mode=mode, per_task=True, backend="cuda", check=False)
        ck.phase2_from_weights(grads, plan, weights, scales, out=out, backend="cuda", check=False)

    step()  # the first call copies the plan's tables to the GPU (a synchronising copy)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_strength_pipeline_matches_reference(dtype: torch.dtype) -> None:
    plan = model_plan("resnet50")
    gen = torch.Generator(device=CUDA).manual_seed(10)
    weights = [
        torch.randn(layer.channels, layer.row_length, generator=gen, device=CUDA).to(dtype)
        for layer in plan.layers
    ]
    norms = ck.backends.BACKENDS["cuda"].plan_row_sqnorm(weights, plan)
    separate = torch.cat([torch.ops.cs_kernels.row_sqnorm(w) for w in weights])
    assert torch.equal(norms, separate)  # one launch, the same bits as one launch per layer
    expected = torch.cat([w.double().square().sum(1) for w in weights])
    torch.testing.assert_close(norms.double(), expected, rtol=1e-5, atol=0)
    scales = torch.rand(24, plan.total_channels, generator=gen, device=CUDA)
    strength = norms[None] * scales.to(norms.dtype)  # what phase2_from_weights ranks
    top = ck.plan_top_priority(strength, plan, backend="reference")
    assert torch.equal(ck.plan_top_priority(strength, plan, backend="cuda"), top)
    grads = torch.randn(24, plan.numel, generator=gen, device=CUDA).to(dtype)
    out = ck.phase2_from_weights(grads, plan, weights, scales, backend="cuda")
    expected_out, _ = _oracle(grads, plan, top, "group", "sum")
    assert_close(out, expected_out.to(dtype), dtype, "phase2_from_weights")


@gpu
def test_out_of_range_top_without_checks_sums_the_layer() -> None:
    """check=False skips the range check (it needs a sync): the kernels then plainly sum the
    layer rather than read out of bounds."""
    grads = torch.randn(3, 4, 5, device=CUDA)
    top = torch.tensor([0, 1, 9, 2], device=CUDA)
    out = ck.project_layer(grads, top, backend="cuda", check=False)
    torch.testing.assert_close(out, grads.sum(0))


# ------------------------------------------------------------ Phase 2 in steps, on a GPU


def _steps_oracle(grads: torch.Tensor, plan: ck.Phase2Plan, top: torch.Tensor, mode: str):
    """Gram matrices, coefficients and the projection by the vectorised torch steps in float64
    (the reference steps' Python loops are too slow at full size)."""
    rows = grads.double()
    gram = ck.channel_gram(rows, plan, backend="torch")
    coef = ck.projection_coefficients(gram, plan, top, mode=mode, backend="torch")
    out, projected = ck.apply_projection(rows, plan, top, coef, per_task=True, backend="torch")
    return gram, coef, out, projected


def _check_steps(plan: ck.Phase2Plan, grads: torch.Tensor, top: torch.Tensor, what: str) -> None:
    dtype = grads.dtype
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    scale = max([1] + [layer.row_length for layer in plan.layers]) ** 0.5
    for mode in ("group", "channel"):
        gram, _, want, want_tasks = _steps_oracle(grads, plan, top, mode)
        total = torch.full((plan.numel,), float("nan"), dtype=dtype, device=CUDA)
        got = ck.channel_gram(grads, plan, out=total, backend="cuda")
        assert got.dtype == acc and torch.equal(got, ck.channel_gram(grads, plan, backend="cuda"))
        assert_close(got / scale, (gram / scale).to(acc), dtype, f"{what} gram")
        assert_close(total, grads.double().sum(0).to(dtype), dtype, f"{what} plain sum")
        # The kernels' own Gram matrices give the coefficients (as in training).
        c = ck.projection_coefficients(got, plan, top, mode=mode, backend="cuda")
        out, projected = ck.apply_projection(grads, plan, top, c, per_task=True, backend="cuda")
        assert_close(out, want.to(dtype), dtype, f"{what} {mode} out")
        assert_close(projected, want_tasks.to(dtype), dtype, f"{what} {mode} per_task")
        ck.apply_projection(grads, plan, top, c, out=total, out_holds_sum=True, backend="cuda")
        assert_close(total, want.to(dtype), dtype, f"{what} {mode} onto the sum")


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("model", "tasks"), [("resnet18", 3), ("resnet50", 5)])
def test_steps_full_size_parity(model: str, tasks: int, dtype: torch.dtype) -> None:
    plan = model_plan(model)
    grads, top = _inputs(plan, tasks, dtype, seed=20)
    _check_steps(plan, grads, top, f"{model} T={tasks}")


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_steps_long_rows_gaps_and_24_tasks(dtype: torch.dtype) -> None:
    """Rows cut into many pieces (D = 300,001), a one-channel layer, gaps everywhere, T = 24."""
    plan = ck.Phase2Plan(
        [(5, 3, 300_001), (1_000_000, 512, 200), (1_200_000, 7000, 3), (1_300_000, 1, 1)],
        1_300_010,
    )
    for tasks in (1, 24):
        grads, top = _inputs(plan, tasks, dtype, seed=21 + tasks)
        _check_steps(plan, grads, top, f"long rows T={tasks}")


@gpu
def test_steps_are_bitwise_repeatable() -> None:
    plan = model_plan("resnet50")
    grads, top = _inputs(plan, 5, torch.float32, seed=22)

    def run() -> tuple[torch.Tensor, ...]:
        total = torch.empty(plan.numel, device=CUDA)
        gram = ck.channel_gram(grads, plan, out=total, backend="cuda")
        coef = ck.projection_coefficients(gram, plan, top, backend="cuda")
        out = ck.apply_projection(grads, plan, top, coef, backend="cuda")
        ck.apply_projection(grads, plan, top, coef, out=total, out_holds_sum=True, backend="cuda")
        return gram, out, total

    first = run()
    for _ in range(3):
        for a, b in zip(first, run(), strict=True):
            assert torch.equal(a, b)


@gpu
def test_steps_without_host_synchronisation() -> None:
    """With the checks off, the steps (the fused Gram pass and projection, the vectorised
    coefficients in between, in both modes) never wait for the GPU."""
    plan = model_plan("resnet18")
    grads, top = _inputs(plan, 3, torch.float32, seed=23)
    total = torch.empty(plan.numel, device=CUDA)
    coef = ck.projection_coefficients(ck.channel_gram(grads, plan, backend="cuda"), plan, top)

    def step() -> None:
        gram = ck.channel_gram(grads, plan, backend="cuda")
        ck.channel_gram(grads, plan, out=total, backend="cuda")
        for mode in ("group", "channel"):
            for uniform in ("sum", "project"):
                ck.projection_coefficients(
                    gram, plan, top, mode=mode, uniform=uniform, backend="cuda", check=False
                )
        ck.apply_projection(grads, plan, top, coef, backend="cuda", check=False)
        ck.apply_projection(grads, plan, top, coef, per_task=True, backend="cuda", check=False)
        ck.apply_projection(
            grads, plan, top, coef, out=total, out_holds_sum=True, backend="cuda", check=False
        )

    step()  # the first call copies the plan's tables to the GPU (a synchronising copy)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@gpu
def test_steps_with_out_of_range_top_sum_the_channel() -> None:
    """check=False skips the range check of ``top``: such a channel is plainly summed."""
    plan = ck.Phase2Plan([(0, 4, 5)], 20)
    grads = torch.randn(3, 20, device=CUDA)
    top = torch.tensor([0, 1, 9, 2], device=CUDA)
    coef = torch.full((3, 4), -0.5, device=CUDA)
    out = ck.apply_projection(grads, plan, top, coef, backend="cuda", check=False)
    torch.testing.assert_close(out[10:15], grads[:, 10:15].sum(0))
