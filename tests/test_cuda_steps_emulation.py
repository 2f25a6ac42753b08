"""The CUDA kernels of Phase 2 in steps (`csrc/cuda/steps.cu`: the Gram pass with the plain
sum, the projection), run on the CPU through the fiber emulation of tests/test_cuda_emulation.py,
against the `reference` steps.

Blocks of 64 threads: a work item holds 512 elements of a row, so rows of 513 and more are
cut into pieces summed by the finishing launch. Skipped without a C++ compiler or CUDA headers.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import pytest
import torch

import cs_kernels as ck
from tests.cases import CASES, Case, normal_grads, one_layer, opposite_grads, random_top
from tests.conftest import DTYPES, assert_close
from tests.test_cuda_emulation import DTYPE_CODES, _build

SETTINGS = [(m, u) for m in ("group", "channel") for u in ("sum", "project")]
# At 64 threads an item holds 512 elements of a row: rows of 513 to 1100 are cut in 2 or 3.
LONG_EMU = ck.Phase2Plan([(3, 2, 1100), (2203, 1, 513), (2716, 3, 7), (2740, 1, 512)], 3260)
STEP_CASES = [
    *CASES,
    Case("long-emu-T1", LONG_EMU, 1, random_top, normal_grads),
    Case("long-emu-T24", LONG_EMU, 24, random_top, normal_grads),
    Case("long-emu-opposite", LONG_EMU, 2, random_top, opposite_grads),
    Case("one-channel-T24", one_layer(1, 33), 24, random_top, normal_grads),
    Case("empty-shard", ck.Phase2Plan([], 7), 3, random_top, normal_grads),
]
# The cases every dtype runs (the fp32 run takes all of them).
DTYPE_CASES = ("C1-D1", "C37-D1", "mixed-T1", "mixed-T24", "blocks-T4", "long-emu-T24",
               "long-emu-opposite", "one-channel-T24", "empty-shard", "zero-grads")  # fmt: skip


class StepKernels:
    """The steps' emulated launchers; outputs start as NaN so that a forgotten write shows."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
        lib.csk_emu_channel_gram.restype = ctypes.c_char_p
        lib.csk_emu_channel_gram.argtypes = [i32, p, i64, i64, p, i64, p, i64, i64, p, p]
        lib.csk_emu_project.restype = ctypes.c_char_p
        lib.csk_emu_project.argtypes = [i32, p, i64, i64, p, i64, p, i64, p, i64, p, i32, p, p]
        self.lib = lib

    def configure(self, multiprocessors: int = 2, reverse: bool = False) -> None:
        self.lib.csk_emu_configure(multiprocessors, int(reverse))

    @staticmethod
    def _check(error: bytes | None) -> None:
        assert error is None, f"emulated kernels: {error.decode()}"

    def gram(
        self,
        grads: torch.Tensor,
        layers: torch.Tensor,
        gaps: torch.Tensor,
        channels: int,
        *,
        with_sum: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        tasks, numel = grads.shape
        acc = torch.float64 if grads.dtype == torch.float64 else torch.float32
        gram = torch.full((channels, tasks, tasks), float("nan"), dtype=acc)
        total = torch.full((numel,), float("nan"), dtype=grads.dtype) if with_sum else None
        self._check(
            self.lib.csk_emu_channel_gram(
                DTYPE_CODES[grads.dtype], grads.data_ptr(), tasks, numel,
                layers.data_ptr(), layers.shape[0], gaps.data_ptr(), gaps.shape[0], channels,
                gram.data_ptr(), None if total is None else total.data_ptr(),
            )
        )  # fmt: skip
        return gram, total

    def project(
        self,
        grads: torch.Tensor,
        layers: torch.Tensor,
        gaps: torch.Tensor,
        top: torch.Tensor,
        coef: torch.Tensor,
        out: torch.Tensor,
        *,
        out_holds_sum: bool,
        per_task: bool,
    ) -> torch.Tensor | None:
        """Writes ``out`` in place; returns the projected rows when ``per_task``."""
        tasks, numel = grads.shape
        projected = torch.full_like(grads, float("nan")) if per_task else None
        self._check(
            self.lib.csk_emu_project(
                DTYPE_CODES[grads.dtype], grads.data_ptr(), tasks, numel,
                layers.data_ptr(), layers.shape[0], gaps.data_ptr(), gaps.shape[0],
                top.data_ptr(), top.numel(), coef.data_ptr(), int(out_holds_sum),
                out.data_ptr(), None if projected is None else projected.data_ptr(),
            )
        )  # fmt: skip
        return projected


@pytest.fixture(scope="module")
def emu(tmp_path_factory: pytest.TempPathFactory) -> StepKernels:
    return StepKernels(_build(64, Path(tmp_path_factory.mktemp("emu"))).lib)


@pytest.fixture(scope="module")
def emu512(tmp_path_factory: pytest.TempPathFactory) -> StepKernels:
    """The production block size (512 threads)."""
    return StepKernels(_build(512, Path(tmp_path_factory.mktemp("emu"))).lib)


def _tables(plan: ck.Phase2Plan) -> tuple[torch.Tensor, torch.Tensor]:
    return plan.layer_table("cpu"), plan.gap_table("cpu")


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_gram(emu: StepKernels, plan: ck.Phase2Plan, grads: torch.Tensor, what: str) -> None:
    layers, gaps = _tables(plan)
    want = ck.channel_gram(grads, plan, backend="reference")
    gram, _ = emu.gram(grads, layers, gaps, plan.total_channels, with_sum=False)
    # Gram entries are sums of D products: the per-dtype tolerances, scaled by the row length.
    scale = max([1] + [layer.row_length for layer in plan.layers]) ** 0.5
    assert_close(gram / scale, want / scale, grads.dtype, what + " gram")
    assert torch.equal(gram, gram.transpose(1, 2)), what + ": gram not symmetric"
    fused, total = emu.gram(grads, layers, gaps, plan.total_channels, with_sum=True)
    assert torch.equal(fused, gram), what + ": the plain sum changed the Gram matrices"
    assert total is not None
    assert_close(total, grads.double().sum(0).to(grads.dtype), grads.dtype, what + " plain sum")


def _check_projection(
    emu: StepKernels, plan: ck.Phase2Plan, grads: torch.Tensor, top: torch.Tensor, what: str
) -> None:
    layers, gaps = _tables(plan)
    dtype = grads.dtype
    gram = ck.channel_gram(grads, plan, backend="reference")
    _, total = emu.gram(grads, layers, gaps, plan.total_channels, with_sum=True)
    assert total is not None
    for mode, uniform in SETTINGS:
        coef = ck.projection_coefficients(gram, plan, top, mode=mode, uniform=uniform)
        coef = coef.to(_acc(dtype)).contiguous()
        want, want_tasks = ck.apply_projection(
            grads, plan, top, coef, per_task=True, backend="reference"
        )
        how = f"{what} {mode}/{uniform}"
        out = torch.full((plan.numel,), float("nan"), dtype=dtype)
        projected = emu.project(grads, layers, gaps, top, coef, out, out_holds_sum=False,
                                per_task=True)  # fmt: skip
        assert projected is not None
        assert_close(out, want, dtype, how)
        assert_close(projected, want_tasks, dtype, how + " per_task")
        alone = torch.full_like(out, float("nan"))
        emu.project(grads, layers, gaps, top, coef, alone, out_holds_sum=False, per_task=False)
        assert torch.equal(alone, out), how + ": per_task changed the combined result"
        # Onto the plain sum of the Gram pass: only the projected rows are rewritten.
        for per_task in (False, True):
            onto = total.clone()
            again = emu.project(grads, layers, gaps, top, coef, onto, out_holds_sum=True,
                                per_task=per_task)  # fmt: skip
            assert_close(onto, want, dtype, how + " onto the sum")
            if again is not None:
                assert torch.equal(again, projected), how + ": per_task onto the sum"


@pytest.mark.parametrize("case", STEP_CASES, ids=lambda c: c.name)
def test_steps_match_the_reference_fp32(emu: StepKernels, case: Case) -> None:
    emu.configure()
    grads, top = case.build(torch.device("cpu"), torch.float32)
    _check_gram(emu, case.plan, grads, case.name)
    _check_projection(emu, case.plan, grads, top, case.name)


@pytest.mark.parametrize("dtype", [d for d in DTYPES if d != torch.float32], ids=str)
@pytest.mark.parametrize(
    "case", [c for c in STEP_CASES if c.name in DTYPE_CASES], ids=lambda c: c.name
)
def test_steps_match_the_reference_other_dtypes(
    emu: StepKernels, case: Case, dtype: torch.dtype
) -> None:
    emu.configure()
    grads, top = case.build(torch.device("cpu"), dtype)
    _check_gram(emu, case.plan, grads, case.name)
    _check_projection(emu, case.plan, grads, top, case.name)


def test_results_do_not_depend_on_scheduling(emu: StepKernels) -> None:
    """Blocks and threads in reverse order and other persistent grid sizes: the same bits."""
    plan = ck.Phase2Plan([(0, 300, 5), (1500, 40, 70), (5000, 3, 1300), (9000, 2, 40)], 9100)
    gen = torch.Generator().manual_seed(5)
    grads = torch.randn(5, plan.numel, generator=gen)
    grads[1, :1500] = -0.5 * grads[0, :1500]  # strong conflicts: many rows projected
    top = torch.randint(0, 5, (plan.total_channels,), generator=gen)
    layers, gaps = _tables(plan)
    coef = ck.projection_coefficients(ck.channel_gram(grads, plan, backend="reference"), plan, top)
    results = []
    for multiprocessors, reverse in ((2, False), (3, True), (1, False), (5, True)):
        emu.configure(multiprocessors, reverse)
        gram, total = emu.gram(grads, layers, gaps, plan.total_channels, with_sum=True)
        assert total is not None
        out = torch.empty(plan.numel)
        projected = emu.project(grads, layers, gaps, top, coef, out, out_holds_sum=False,
                                per_task=True)  # fmt: skip
        onto = total.clone()
        emu.project(grads, layers, gaps, top, coef, onto, out_holds_sum=True, per_task=False)
        results.append((gram, total, out, projected, onto))
    emu.configure()
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            assert a is not None and b is not None and torch.equal(a, b)
    assert bool((coef != 0).any())  # the projection paths ran


def test_uncovered_channels_and_elements(emu: StepKernels) -> None:
    """Channels no layer covers get zero Gram matrices; elements outside every layer and gap
    are left as they are; out_holds_sum without per_task leaves the gaps alone."""
    grads = torch.randn(3, 40, generator=torch.Generator().manual_seed(1))
    layers = torch.tensor([[0, 2, 5, 1]], dtype=torch.int64)  # channels 1 and 2 of 5
    gaps = torch.tensor([[10, 20]], dtype=torch.int64)  # [30, 40) is in neither
    emu.configure()
    gram, total = emu.gram(grads, layers, gaps, 5, with_sum=True)
    assert torch.equal(gram[[0, 3, 4]], torch.zeros(3, 3, 3))
    x = grads[:, :10].reshape(3, 2, 5).transpose(0, 1)
    torch.testing.assert_close(gram[1:3], x @ x.transpose(1, 2))
    assert total is not None
    torch.testing.assert_close(total[:30], grads[:, :30].sum(0))
    assert bool(total[30:].isnan().all())
    top = torch.tensor([0, 1, 0, 2, 2], dtype=torch.int64)
    coef = torch.zeros(3, 5)
    coef[1, 2] = 0.5
    marker = torch.full((40,), 9.0)
    emu.project(grads, layers, gaps, top, coef, marker, out_holds_sum=True, per_task=False)
    assert torch.equal(marker[:5], torch.full((5,), 9.0))  # shrink 0: untouched
    torch.testing.assert_close(marker[5:10], torch.full((5,), 9.0) - 0.5 * grads[0, 5:10])
    assert torch.equal(marker[10:], torch.full((30,), 9.0))


def test_invalid_tables_never_touch_memory_outside_the_buffers(emu: StepKernels) -> None:
    """The ops cannot check table values without a host sync: rows that do not fit are
    skipped, a channel whose top is no task is plainly summed, and nothing is read or written
    out of bounds (the emulation checks every access)."""
    numel, tasks, channels = 100, 3, 6
    grads = torch.randn(tasks, numel, generator=torch.Generator().manual_seed(2))
    top = torch.tensor([0, 1, 2, 7, -1, 0], dtype=torch.int64)  # 7 and -1 are no task
    layers = torch.tensor(
        [[0, 2, 10, 0],  # fine
         [20, 2, 10, 2],  # tops 2 and 7
         [90, 2, 10, 4],  # ends past numel: skipped
         [40, 2, 10, 5],  # channels past C: skipped
         [-5, 1, 1, 0]],  # negative offset: skipped
        dtype=torch.int64,
    )  # fmt: skip
    gaps = torch.tensor([[60, 40], [95, 10], [-1, 3]], dtype=torch.int64)  # two do not fit
    coef = torch.full((tasks, channels), -0.25)
    emu.configure()
    gram, total = emu.gram(grads, layers, gaps, channels, with_sum=True)
    assert torch.equal(gram[4:], torch.zeros(2, tasks, tasks))  # only skipped rows cover them
    assert total is not None
    torch.testing.assert_close(total[60:], grads[:, 60:].sum(0))
    for holds in (False, True):
        out = total.clone()
        projected = emu.project(grads, layers, gaps, top, coef, out, out_holds_sum=holds,
                                per_task=True)  # fmt: skip
        assert projected is not None
        torch.testing.assert_close(out[30:40], grads[:, 30:40].sum(0))  # top 7: plainly summed
        torch.testing.assert_close(projected[:, 30:40], grads[:, 30:40])
        torch.testing.assert_close(out[60:], grads[:, 60:].sum(0))
    # Overlapping layers could need more scratch than any valid plan: then nothing runs.
    wide = torch.randn(tasks, 1100, generator=torch.Generator().manual_seed(3))
    overlapping = torch.tensor([[0, 2, 550, 2 * k] for k in range(8)], dtype=torch.int64)
    gram, total = emu.gram(wide, overlapping, gaps[:0], 16, with_sum=True)
    assert torch.equal(gram, torch.zeros(16, tasks, tasks))
    assert total is not None and bool(total.isnan().all())
    out = torch.zeros(1100)
    tops, coef = torch.zeros(16, dtype=torch.int64), torch.zeros(tasks, 16)
    projected = emu.project(
        wide, overlapping, gaps[:0], tops, coef, out, out_holds_sum=False, per_task=True
    )
    assert torch.equal(out, torch.zeros(1100))
    assert projected is not None and bool(projected.isnan().all())


@pytest.mark.parametrize(("tasks", "dtype"), [(3, torch.float32), (10, torch.bfloat16)], ids=str)
def test_production_block_size_covers_every_row_regime(
    emu512: StepKernels, tasks: int, dtype: torch.dtype
) -> None:
    """512 threads (the real block): 1 thread per row (D <= 8), 2..256 threads, a whole block
    (D up to 4,096, warps summed through shared memory) and rows cut into pieces (D > 4,096),
    gaps around; a layer of several items."""
    layers = [(3, 700, 1), (710, 90, 9), (1550, 33, 100), (4900, 9, 576), (10_100, 2, 2304),
              (14_800, 1, 4096), (19_000, 2, 4097)]  # fmt: skip
    plan = ck.Phase2Plan(layers, 27_300)
    gen = torch.Generator().manual_seed(tasks)
    grads = torch.randn(tasks, plan.numel, generator=gen).to(dtype)
    top = torch.randint(0, tasks, (plan.total_channels,), generator=gen)
    emu512.configure(multiprocessors=3)
    _check_gram(emu512, plan, grads, "regimes")
    _check_projection(emu512, plan, grads, top, "regimes")
    emu512.configure()
