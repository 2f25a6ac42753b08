"""The CUDA kernels, run on the CPU: `csrc/cuda/*.cu` compiled by the host C++ compiler against
`csrc/cuda/emulation.h` (every CUDA thread a fiber, real barriers and warp shuffles, checked
memory accesses), against the reference backend.

This is how the kernels are tested on machines without a GPU. On a GPU the same kernels run for
real in tests/test_cuda_backend.py. Skipped when no C++ compiler or no CUDA headers are found.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import cs_kernels as ck
from tests.cases import CASES, Case
from tests.conftest import assert_close

ROOT = Path(__file__).resolve().parent.parent
KERNELS = ROOT / "csrc" / "cuda"
DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}
SETTINGS = [(m, u) for m in ("group", "channel") for u in ("sum", "project")]


def _cuda_include() -> Path | None:
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "include" / "cuda_bf16.h").is_file():
            return Path(home) / "include"
    nvcc = shutil.which("nvcc")
    if nvcc is not None:
        include = Path(nvcc).resolve().parent.parent / "include"
        if (include / "cuda_bf16.h").is_file():
            return include
    return None


class Emulated:
    """The kernels' launchers, built for the CPU with `threads` threads per block."""

    def __init__(self, path: Path) -> None:
        lib = ctypes.CDLL(str(path))
        p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
        lib.csk_emu_threads.restype = i32
        lib.csk_emu_configure.argtypes = [i32, i32]
        lib.csk_emu_phase2.restype = ctypes.c_char_p
        lib.csk_emu_phase2.argtypes = [i32, p, i64, i64, p, i64, p, i64, p, i64, i32, i32, p, p]
        lib.csk_emu_row_sqnorm.restype = ctypes.c_char_p
        lib.csk_emu_row_sqnorm.argtypes = [i32, p, p, p, i64, p]
        lib.csk_emu_top_priority.restype = ctypes.c_char_p
        lib.csk_emu_top_priority.argtypes = [i32, p, i64, i64, p, i64, p]
        self.lib = lib
        self.threads = int(lib.csk_emu_threads())

    def configure(self, multiprocessors: int = 2, reverse: bool = False) -> None:
        """The SM count the launchers see (persistent grid size) and the scheduling order."""
        self.lib.csk_emu_configure(multiprocessors, int(reverse))

    @staticmethod
    def _check(error: bytes | None) -> None:
        assert error is None, f"emulated kernels: {error.decode()}"

    def phase2(
        self,
        grads: torch.Tensor,
        layers: torch.Tensor,
        gaps: torch.Tensor,
        top: torch.Tensor,
        *,
        group: bool,
        project_uniform: bool,
        per_task: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        tasks, numel = grads.shape
        # NaN-filled outputs: an element the kernels forget to write shows.
        out = torch.full((numel,), float("nan"), dtype=grads.dtype)
        projected = torch.full_like(grads, float("nan")) if per_task else None
        self._check(
            self.lib.csk_emu_phase2(
                DTYPE_CODES[grads.dtype], grads.data_ptr(), tasks, numel,
                layers.data_ptr(), layers.shape[0], gaps.data_ptr(), gaps.shape[0],
                top.data_ptr(), top.numel(), int(group), int(project_uniform),
                out.data_ptr(), None if projected is None else projected.data_ptr(),
            )
        )  # fmt: skip
        return out, projected

    def plan_phase2(
        self, grads: torch.Tensor, plan: ck.Phase2Plan, top: torch.Tensor, mode: str, uniform: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        out, projected = self.phase2(
            grads, plan.layer_table("cpu"), plan.gap_table("cpu"), top,
            group=mode == "group", project_uniform=uniform == "project", per_task=True,
        )  # fmt: skip
        assert projected is not None
        return out, projected

    def row_sqnorm(self, weights: list[torch.Tensor]) -> torch.Tensor:
        acc = torch.float64 if weights[0].dtype == torch.float64 else torch.float32
        out = torch.full((sum(w.shape[0] for w in weights),), float("nan"), dtype=acc)
        n = len(weights)
        data = (ctypes.c_void_p * n)(*[w.data_ptr() for w in weights])
        rows = (ctypes.c_int64 * n)(*[w.shape[0] for w in weights])
        cols = (ctypes.c_int64 * n)(*[w.shape[1] for w in weights])
        self._check(
            self.lib.csk_emu_row_sqnorm(
                DTYPE_CODES[weights[0].dtype], data, rows, cols, n, out.data_ptr()
            )
        )
        return out

    def top_priority(self, strength: torch.Tensor, layers: torch.Tensor) -> torch.Tensor:
        top = torch.full((strength.shape[1],), -7, dtype=torch.int64)
        self._check(
            self.lib.csk_emu_top_priority(
                int(strength.dtype == torch.float64), strength.data_ptr(), strength.shape[0],
                strength.shape[1], layers.data_ptr(), layers.shape[0], top.data_ptr(),
            )
        )  # fmt: skip
        return top


def _build(threads: int, directory: Path) -> Emulated:
    if sys.platform != "linux":
        pytest.skip("the fiber emulation uses glibc's ucontext")
    compiler = os.environ.get("CXX", "c++")
    include = _cuda_include()
    if shutil.which(compiler) is None or include is None:
        pytest.skip("needs a C++ compiler and the CUDA headers (cuda_bf16.h) for the emulation")
    sources = [KERNELS / "phase2.cu", KERNELS / "strength.cu", KERNELS / "steps.cu"]
    digest = hashlib.sha256()
    for path in sorted(KERNELS.iterdir()):
        digest.update(path.read_bytes())
    library = directory / f"csk_emu_{threads}_{digest.hexdigest()[:12]}.so"
    command = [
        compiler, "-std=c++17", "-O2", "-fPIC", "-shared", "-Wall", "-Wextra", "-Werror",
        "-DCSK_EMULATE", f"-DCSK_THREADS={threads}", "-isystem", str(include), "-I", str(KERNELS),
        "-x", "c++", *map(str, sources), "-x", "none", str(KERNELS / "emulation_capi.cpp"),
        "-o", str(library),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, f"emulation build failed:\n{result.stderr}"
    return Emulated(library)


@pytest.fixture(scope="module")
def emu64(tmp_path_factory: pytest.TempPathFactory) -> Emulated:
    """Blocks of 64 threads: small blocks, so small inputs already span many blocks, row
    pieces of 1024 elements and cross-warp reductions."""
    return _build(64, tmp_path_factory.mktemp("emu"))


@pytest.fixture(scope="module")
def emu512(tmp_path_factory: pytest.TempPathFactory) -> Emulated:
    """The production block size (512 threads)."""
    return _build(512, tmp_path_factory.mktemp("emu"))


def _check_against_reference(
    emu: Emulated, case: Case | tuple[ck.Phase2Plan, torch.Tensor, torch.Tensor],
    dtype: torch.dtype, settings: list[tuple[str, str]],
) -> None:  # fmt: skip
    if isinstance(case, Case):
        grads, top = case.build(torch.device("cpu"), dtype)
        plan, name = case.plan, case.name
    else:
        plan, grads, top = case
        name = repr(plan)
    for mode, uniform in settings:
        expected, expected_tasks = ck.phase2(
            grads, plan, top=top, mode=mode, uniform=uniform, per_task=True, backend="reference"
        )
        out, projected = emu.plan_phase2(grads, plan, top, mode, uniform)
        what = f"{name} {mode}/{uniform} ({emu.threads} threads)"
        assert_close(out, expected, dtype, what)
        assert_close(projected, expected_tasks, dtype, what + " per_task")
        # Without `projected` the channel mode takes another path (no second pass).
        only, _ = emu.phase2(
            grads, plan.layer_table("cpu"), plan.gap_table("cpu"), top,
            group=mode == "group", project_uniform=uniform == "project", per_task=False,
        )  # fmt: skip
        assert torch.equal(only, out), f"{what}: per_task changed the combined result"


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_phase2_matches_reference_fp32(emu64: Emulated, case: Case) -> None:
    emu64.configure()
    _check_against_reference(emu64, case, torch.float32, SETTINGS)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", [c for c in CASES if c.name != "mixed-T24"], ids=lambda c: c.name)
def test_phase2_matches_reference_other_dtypes(emu64: Emulated, case: Case, dtype) -> None:
    emu64.configure()
    _check_against_reference(emu64, case, dtype, [("group", "sum"), ("channel", "project")])


def regimes_plan() -> ck.Phase2Plan:
    """Every way the kernels cut a row at 512 threads: 1 thread per row (D <= 8), 2..256,
    a whole block (D up to 8192) and split rows (D > 8192); gaps around; a layer of several
    items."""
    layers = [(3, 700, 1), (710, 90, 9), (1550, 33, 100), (4900, 9, 576), (10_100, 2, 4608),
              (19_400, 1, 8192), (27_600, 2, 8193)]  # fmt: skip
    return ck.Phase2Plan(layers, 44_000)


@pytest.mark.parametrize(("tasks", "dtype"), [(3, torch.float32), (10, torch.bfloat16)], ids=str)
def test_production_block_size_covers_every_row_regime(emu512: Emulated, tasks, dtype) -> None:
    plan = regimes_plan()
    gen = torch.Generator().manual_seed(tasks)
    grads = torch.randn(tasks, plan.numel, generator=gen).to(dtype)
    top = torch.randint(0, tasks, (plan.total_channels,), generator=gen)
    emu512.configure(multiprocessors=3)
    _check_against_reference(
        emu512, (plan, grads, top), dtype, [("group", "sum"), ("channel", "sum")]
    )


@pytest.mark.parametrize("mode", ["group", "channel"])
def test_results_do_not_depend_on_scheduling(emu64: Emulated, mode: str) -> None:
    """Blocks and threads in reverse order (warps drifting apart the other way) and another
    persistent grid size give the same bits: no missing barrier, no order-dependent sum."""
    plan = ck.Phase2Plan([(0, 300, 5), (1500, 40, 70), (5000, 3, 3000), (14_000, 2, 40)], 15_000)
    gen = torch.Generator().manual_seed(5)
    grads = torch.randn(5, plan.numel, generator=gen)
    grads[1, :1500] = -0.5 * grads[0, :1500]  # strong conflicts: every projection path runs
    top = torch.randint(0, 5, (plan.total_channels,), generator=gen)
    results = []
    for multiprocessors, reverse in ((2, False), (3, True), (1, False)):
        emu64.configure(multiprocessors, reverse)
        results.append(emu64.plan_phase2(grads, plan, top, mode, "sum"))
    emu64.configure()
    for out, projected in results[1:]:
        assert torch.equal(out, results[0][0]) and torch.equal(projected, results[0][1])
    expected = ck.phase2(grads, plan, top=top, mode=mode, backend="reference")
    assert_close(results[0][0], expected, torch.float32, mode)


def test_invalid_tables_never_touch_memory_outside_the_buffers(emu64: Emulated) -> None:
    """The op cannot check table values without a host sync: rows that do not fit are skipped,
    a layer with out-of-range tops is plainly summed, and nothing is read or written out of
    bounds (the emulation checks every access)."""
    numel, tasks = 100, 3
    grads = torch.randn(tasks, numel)
    top = torch.tensor([0, 1, 2, 7, 1, 0], dtype=torch.int64)  # task 7 does not exist
    layers = torch.tensor(
        [[0, 2, 10, 0],  # fine
         [20, 2, 10, 2],  # top 7 in it: plainly summed
         [90, 2, 10, 4],  # ends past numel: skipped
         [40, 2, 10, 5],  # channels past C: skipped
         [-5, 1, 1, 0]],  # negative offset: skipped
        dtype=torch.int64,
    )  # fmt: skip
    gaps = torch.tensor([[60, 40], [95, 10]], dtype=torch.int64)  # the second ends past numel
    emu64.configure()
    for group in (True, False):
        out, projected = emu64.phase2(
            grads, layers, gaps, top, group=group, project_uniform=True, per_task=True
        )
        torch.testing.assert_close(out[20:40], grads[:, 20:40].sum(0))  # plainly summed
        torch.testing.assert_close(out[60:], grads[:, 60:].sum(0))
        assert projected is not None
        torch.testing.assert_close(projected[:, 20:40], grads[:, 20:40])
    # Overlapping layers could need more scratch than a valid plan: then nothing runs.
    overlapping = torch.tensor([[0, 10, 10, 0]] * 6, dtype=torch.int64)
    emu64.phase2(
        grads, overlapping, gaps[:0], torch.zeros(60, dtype=torch.int64),
        group=True, project_uniform=True, per_task=False,
    )  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_row_sqnorm_matches_reference(emu64: Emulated, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    shapes = [(1, 1), (7, 27), (33, 17), (5, 3000), (0, 4), (2, 0), (300, 2)]
    shapes += [(3, 5 + k) for k in range(70)]  # more than one launch's 64 matrices
    weights = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    emu64.configure()
    norms = emu64.row_sqnorm(weights)
    expected = torch.cat([w.double().square().sum(1) for w in weights])
    torch.testing.assert_close(norms.double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("tasks", [1, 3, 24])
def test_top_priority_matches_reference(emu64: Emulated, tasks: int) -> None:
    plan = ck.Phase2Plan([(0, 3, 2), (6, 200, 1), (206, 1, 4), (210, 70, 3)], 420)
    gen = torch.Generator().manual_seed(tasks)
    strength = torch.rand(tasks, plan.total_channels, generator=gen)
    strength[:, :3] = strength[0, :3].clone()  # every task ties: task 0
    strength[-1, 203:206] = 0  # a zero column
    strength[0, 210:280] = 0  # a task with a zero total
    emu64.configure()
    for values in (strength, strength.double()):
        top = emu64.top_priority(values, plan.layer_table("cpu"))
        assert torch.equal(top, ck.plan_top_priority(values, plan, backend="reference"))
