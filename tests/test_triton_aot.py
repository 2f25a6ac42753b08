"""Every triton kernel configuration the backend can launch compiles for real GPUs, ahead of
time, without a GPU, under each supported triton.

The interpreter forgives what the compiler does not (types of loop-carried values, constexpr
misuse, int64/pointer casts, layouts, compiler passes that fail), so every configuration the
tuner can choose (`cs_kernels.triton_kernels.aot.jobs`, derived from `tuning`) is compiled
to a cubin for sm_80 and sm_90 with the ptxas triton ships, in a pool of processes:

* under this environment's triton (the newest, in ``.venv``), in this process's pool;
* under the GPU machines' toolchain (triton 3.6.0, the environment `make setup` makes in
  ``.venv-triton36``), in a child process. Where that environment could not be made (offline)
  the test skips and says so; under ``CI=true`` it fails.

Each run prints its configuration count and time to the terminal. Skipped only where the
compiler cannot run here, or where the kernels are interpreted (``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

import cs_kernels as ck
from cs_kernels.model_shapes import model_plan
from tests.conftest import report_line

try:
    import triton
    import triton.language as tl

    from cs_kernels.triton_kernels import aot, phase2, steps, strength, tuning
except Exception as exc:  # triton missing or broken
    pytest.skip(f"triton does not import: {exc}", allow_module_level=True)

if tuning.INTERPRETED:
    pytest.skip("kernels are interpreted (TRITON_INTERPRET=1)", allow_module_level=True)

ROOT = Path(__file__).resolve().parent.parent
CI = os.environ.get("CI", "").lower() == "true"


def _bootstrap() -> ModuleType:
    spec = importlib.util.spec_from_file_location("cs_kernels_bootstrap", ROOT / "tools" /
                                                  "bootstrap.py")  # fmt: skip
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bootstrap = _bootstrap()


@pytest.fixture(scope="module", autouse=True)
def _toolchain() -> None:
    """Skip the module when the compiler itself cannot run here (not when a kernel fails)."""

    @triton.jit
    def probe(x_ptr, BLOCK: tl.constexpr):  # type: ignore[no-untyped-def]
        tl.store(x_ptr + tl.arange(0, BLOCK), tl.zeros([BLOCK], tl.float32))

    job = aot.Job("probe", (("x_ptr", "*fp32"),), (("BLOCK", 32),), 90, 1, None)
    original = aot.kernels
    try:
        aot.kernels = lambda: {"probe": probe}  # type: ignore[assignment]
        result = aot.compile_job(job)
    finally:
        aot.kernels = original  # type: ignore[assignment]
    if result.error is not None:  # no ptxas, unsupported host, ...
        pytest.skip(f"triton cannot compile for sm_90 here: {result.error}")


def _failures(results: list[aot.Result]) -> str:
    failed = [r for r in results if r.error is not None]
    shown = "\n".join(f"{r.job.name}:\n  {r.error}" for r in failed[:5])
    return f"{len(failed)} of {len(results)} configurations failed, first ones:\n{shown}"


def test_every_configuration_compiles(request: pytest.FixtureRequest) -> None:
    """Every job of `aot.jobs`, under this environment's triton."""
    selected = aot.jobs()
    workers = aot.default_workers()
    start = time.monotonic()
    results = aot.compile_all(selected, workers)
    report_line(request, aot.summary(results, time.monotonic() - start, workers))
    assert len(results) == len(selected)
    assert all(r.error is None for r in results), _failures(results)


def test_every_configuration_compiles_with_the_gpu_machines_triton(
    request: pytest.FixtureRequest,
) -> None:
    """The same jobs under triton 3.6.0 (the GPU machines' toolchain), in its environment."""
    python, why = bootstrap.gpu_toolchain_python(ROOT)
    if python is None:
        if CI:
            pytest.fail(f"CI=true: the GPU machines' toolchain is required: {why}")
        pytest.skip(why)
    if Path(sys.executable).resolve() == python.resolve():
        pytest.skip("this run already uses the GPU machines' toolchain")
    proc = subprocess.run(
        [str(python), "-m", "cs_kernels.triton_kernels.aot"],
        cwd=ROOT, capture_output=True, text=True, timeout=3000, check=False,
    )  # fmt: skip
    lines = [line for line in proc.stdout.splitlines() if line.startswith("[aot] triton")]
    for line in lines:
        report_line(request, line)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    expected = bootstrap.GPU_TOOLCHAIN_TRITON
    assert lines and lines[-1].startswith(f"[aot] triton {expected}:"), proc.stdout[-3000:]
    count = re.search(r": (\d+) configurations", lines[-1])
    assert count and int(count.group(1)) == len(aot.jobs()), lines[-1]


def test_a_compiler_failure_is_reported_not_raised() -> None:
    """The check can fail: a kernel the compiler rejects comes back as a failed job."""

    @triton.jit
    def broken(x_ptr, BLOCK: tl.constexpr):  # type: ignore[no-untyped-def]
        tl.store(x_ptr + tl.arange(0, BLOCK), 0.0)  # BLOCK = 24: not a power of two

    job = aot.Job("broken", (("x_ptr", "*fp32"),), (("BLOCK", 24),), 90, 1, None)
    original = aot.kernels
    try:
        aot.kernels = lambda: {"broken": broken}  # type: ignore[assignment]
        result = aot.compile_job(job)
    finally:
        aot.kernels = original  # type: ignore[assignment]
    assert result.error is not None and "power of 2" in result.error


# -- the compiled set is what the tuner can choose --------------------------------------------


def _plans() -> list[ck.Phase2Plan]:
    """Real backbones and plans of every row length from 1 to 9000."""
    plans = [model_plan("resnet18"), model_plan("resnet50")]
    gen = torch.Generator().manual_seed(0)
    for _ in range(40):
        rows = torch.randint(1, 9000, (int(torch.randint(1, 6, (1,), generator=gen)),),
                             generator=gen).tolist()  # fmt: skip
        offset, layers = 0, []
        for row_length in rows:
            channels = int(torch.randint(1, 300, (1,), generator=gen))
            layers.append((offset, channels, row_length))
            offset += channels * row_length + 7
        plans.append(ck.Phase2Plan(layers, offset))
    return plans


def test_the_tuner_never_picks_outside_the_compiled_set() -> None:
    compiled: dict[str, set[tuple[Any, ...]]] = {}
    for job in aot.jobs():
        consts = dict(job.constexprs)
        tile = (consts.get("SUB"), consts.get("WIDTH"), consts["TB"], job.num_warps)
        key = (*tile, job.num_stages, consts.get("ACC"), consts.get("EXACT"), consts.get("GROUP"))
        compiled.setdefault(job.kernel, set()).add(key)
    for plan in _plans():
        for dtype, size in aot.ELEMENT_SIZE.items():
            acc, exact = ("fp64" if size == 8 else "fp32"), dtype in ("fp32", "fp64")
            for config in tuning.phase2_candidates(plan, size):
                assert config in tuning.phase2_space(size)
                for tasks in range(1, max(tuning.TASK_BLOCKS) + 1):
                    tb = tuning.task_block(tasks)
                    base = (config.subrows, config.width, tb, config.num_warps,
                            config.num_stages, acc, exact)  # fmt: skip
                    assert (*base, False) in compiled["pass1"], (config, tasks, dtype)
                    assert (*base, True) in compiled["pass1"], (config, tasks, dtype)
                    assert (*base, None) in compiled["pass2"], (config, tasks, dtype)
                    group = (None, None, tb, 4, None, acc, None, None)
                    assert group in compiled["group"]
            config = tuning.steps_config(plan, size)
            for tasks in range(1, max(tuning.TASK_BLOCKS) + 1):
                tb = tuning.task_block(tasks)
                base = (config.subrows, config.width, tb, config.num_warps, config.num_stages,
                        acc)  # fmt: skip
                assert (*base, None, None) in compiled["gram"], (config, tasks, dtype)
                assert (*base, exact, None) in compiled["project"], (config, tasks, dtype)
        config = tuning.strength_config(plan)
        assert config in tuning.strength_space()
        for tasks in (1, *range(1, max(tuning.TASK_BLOCKS) + 1)):
            for acc in ("fp32", "fp64"):
                key = (config.subrows, config.width, tuning.task_block(tasks),
                       config.num_warps, None, acc, None, None)  # fmt: skip
                assert key in compiled["strength"]


def test_jobs_cover_every_dtype_mode_and_architecture() -> None:
    jobs = aot.jobs()
    assert {job.arch for job in jobs} == {80, 90}
    for kernel in ("pass1", "pass2", "gram", "project", "strength"):
        types = {dict(job.types).get("grads_ptr", dict(job.types).get("anchor_ptr"))
                 for job in jobs if job.kernel == kernel}  # fmt: skip
        assert types == {f"*{d}" for d in aot.DTYPES}, kernel
    assert {dict(j.constexprs)["GROUP"] for j in jobs if j.kernel == "pass1"} == {False, True}
    assert {dict(j.constexprs)["FUSED"] for j in jobs if j.kernel == "strength"} == {False, True}
    assert {dict(j.constexprs)["SUM"] for j in jobs if j.kernel == "gram"} == {False, True}
    holds = {dict(j.constexprs)["HOLDS_SUM"] for j in jobs if j.kernel == "project"}
    assert holds == {False, True}
    assert len({job.name for job in jobs}) == len(jobs)  # no job twice


def test_task_blocks() -> None:
    """Every T up to the largest block has a compiled block; past it, a power of two."""
    for tasks in range(1, 4 * max(tuning.TASK_BLOCKS)):
        block = tuning.task_block(tasks)
        assert block >= tasks and block & (block - 1) == 0
        assert (block in tuning.TASK_BLOCKS) == (tasks <= max(tuning.TASK_BLOCKS))


def test_every_kernel_is_compiled() -> None:
    """A new kernel must join `aot.kernels`: every ``@triton.jit`` launch target is listed."""
    launched = {
        name
        for module in (phase2, steps, strength)
        for name, value in vars(module).items()
        if name.endswith("_kernel") and isinstance(value, triton.runtime.JITFunction)
    }
    assert launched == {kernel.__name__ for kernel in aot.kernels().values()}
    assert {job.kernel for job in aot.jobs()} == set(aot.kernels())
