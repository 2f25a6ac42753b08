"""Ahead-of-time compilation of every kernel configuration the backend can launch.

A GPU is not needed: ``triton.compile`` on an ``ASTSource`` with an explicit signature runs
the whole compiler (Triton IR, TritonGPU passes, LLVM, PTX, and ``ptxas`` to a cubin) for a
named target. `jobs` derives the set from `tuning`, the single source of the configurations:
every tile the tuner can choose (`tuning.phase2_space`, `tuning.strength_space`) for every
dtype, every task block (`tuning.TASK_BLOCKS`), both Phase 2 modes, pass 2 and the group
reduction, the strength/priority kernels, for sm_80 (A100) and sm_90 (H100/H200). ``per_task``
and ``project_uniform`` are runtime arguments (``do_not_specialize``): one compiled kernel
serves both values. Each job mirrors the launch in `phase2.run_phase2` /
`strength.run_strength` / `strength.run_priority`: the same constexprs, argument types,
``num_warps``/``num_stages`` and FMA setting, and the specialisation of a typical launch
(16-byte aligned tensors, ``N`` a multiple of 16).

Run by ``tests/test_triton_aot.py`` under each installed triton, or by hand::

    python -m cs_kernels.triton_kernels.aot [--workers N] [--arch 90]

Compiled kernels land in triton's cache (``TRITON_CACHE_DIR``, default ``~/.triton/cache``,
keyed by triton version, kernel source, target and options), so a rerun only compiles what
changed.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any, NamedTuple

ARCHS = (80, 90)
DTYPES = ("fp32", "fp64", "bf16", "fp16")  # triton's names of the gradient dtypes
ELEMENT_SIZE = {"fp32": 4, "fp64": 8, "bf16": 2, "fp16": 2}
WORKERS_ENV = "CS_KERNELS_AOT_WORKERS"
Consts = tuple[tuple[str, Any], ...]


class Job(NamedTuple):
    """One kernel compilation: everything is plain data, so it crosses process pools."""

    kernel: str  # a key of `kernels()`
    types: tuple[tuple[str, str], ...]  # runtime argument -> triton type ("*fp32", "i32")
    constexprs: Consts  # dtypes as their names ("fp32")
    arch: int
    num_warps: int
    num_stages: int | None  # None: triton's default, as the launch passes none

    @property
    def name(self) -> str:
        types = dict(self.types)
        data = next(types[p] for p in ("grads_ptr", "anchor_ptr", "strength_ptr", "dots_ptr",
                                       "x_ptr") if p in types)  # fmt: skip
        consts = ",".join([f"{data.lstrip('*')}", *(f"{k}={v}" for k, v in self.constexprs)])
        stages = f",stages={self.num_stages}" if self.num_stages is not None else ""
        return f"{self.kernel}[sm_{self.arch},warps={self.num_warps}{stages},{consts}]"


class Result(NamedTuple):
    job: Job
    seconds: float
    error: str | None  # None: compiled to a cubin for the job's architecture


def kernels() -> dict[str, Any]:
    """Every ``@triton.jit`` launch target of the backend, by name."""
    from cs_kernels.triton_kernels import phase2, steps, strength

    return {
        "pass1": phase2.pass1_kernel,
        "pass2": phase2.pass2_kernel,
        "group": phase2.group_kernel,
        "gram": steps.gram_kernel,
        "project": steps.project_kernel,
        "strength": strength.strength_kernel,
        "priority": strength.priority_kernel,
    }


def _acc(dtype: str) -> str:
    return "fp64" if dtype == "fp64" else "fp32"


def _phase2_jobs(arch: int) -> Iterable[Job]:
    from cs_kernels.triton_kernels import phase2, tuning

    for dtype in DTYPES:
        acc, size = _acc(dtype), ELEMENT_SIZE[dtype]
        exact = dtype in ("fp32", "fp64")
        for config in tuning.phase2_space(size):
            for tb in tuning.TASK_BLOCKS:
                shared: Consts = (("SUB", config.subrows), ("WIDTH", config.width), ("TB", tb),
                          ("VEC", max(1, 16 // size)), ("EXACT", exact), ("ACC", acc))  # fmt: skip
                for group in (False, True):
                    types = {
                        **{p: f"*{dtype}" for p in ("grads_ptr", "out_ptr", "proj_ptr")},
                        **{p: "*i64" for p in ("top_ptr", "items_ptr", "layers_ptr")},
                        "dots_ptr": f"*{acc}" if group else f"*{dtype}",  # channel: `out`
                        **{p: "i32" for p in ("stride", "num_tasks", "per_task")},
                        "project_uniform": "i32",
                    }
                    consts: Consts = (*shared, ("GROUP", group),
                                      ("UNIFORM_BLOCK", phase2.UNIFORM_BLOCK))  # fmt: skip
                    yield Job("pass1", tuple(types.items()), consts, arch, config.num_warps,
                              config.num_stages)  # fmt: skip
                types = {
                    **{p: f"*{dtype}" for p in ("grads_ptr", "out_ptr", "proj_ptr")},
                    **{p: "*i64" for p in ("top_ptr", "items_ptr")},
                    "coef_ptr": f"*{acc}",
                    **{p: "i32" for p in ("stride", "num_tasks", "per_task")},
                }
                yield Job("pass2", tuple(types.items()), shared, arch, config.num_warps,
                          config.num_stages)  # fmt: skip
    for acc in ("fp32", "fp64"):
        for tb in tuning.TASK_BLOCKS:
            types = {
                **{p: "*i64" for p in ("top_ptr", "layers_ptr")},
                **{p: f"*{acc}" for p in ("dots_ptr", "coef_ptr")},
                **{p: "i32" for p in ("num_tasks", "project_uniform")},
            }
            reduction: Consts = (("TB", tb), ("BLOCK", phase2.GROUP_BLOCK), ("ACC", acc))
            yield Job("group", tuple(types.items()), reduction, arch, 4, None)


def _steps_jobs(arch: int) -> Iterable[Job]:
    """The Phase 2 steps (`steps.run_gram`, `steps.run_project`): every configuration
    `tuning.steps_config` can return, with and without the plain sum / onto the sum."""
    from cs_kernels.triton_kernels import tuning

    for dtype in DTYPES:
        acc, size = _acc(dtype), ELEMENT_SIZE[dtype]
        for config in tuning.steps_space(size):
            for tb in tuning.TASK_BLOCKS:
                shared: Consts = (("SUB", config.subrows), ("WIDTH", config.width), ("TB", tb),
                                  ("VEC", max(1, 16 // size)))  # fmt: skip
                for fused_sum in (False, True):
                    types = {
                        **{p: f"*{dtype}" for p in ("grads_ptr", "out_ptr")},  # no sum: grads
                        "gram_ptr": f"*{acc}",
                        "items_ptr": "*i64",
                        **{p: "i32" for p in ("stride", "num_tasks")},
                    }
                    consts: Consts = (*shared, ("SUM", fused_sum), ("ACC", acc))
                    yield Job("gram", tuple(types.items()), consts, arch, config.num_warps,
                              config.num_stages)  # fmt: skip
                    types = {
                        **{p: f"*{dtype}" for p in ("grads_ptr", "out_ptr", "proj_ptr")},
                        "top_ptr": "*i64",
                        "coef_ptr": f"*{acc}",
                        "items_ptr": "*i64",
                        **{p: "i32" for p in ("stride", "channels", "num_tasks", "per_task")},
                    }
                    consts = (*shared, ("HOLDS_SUM", fused_sum),
                              ("EXACT", dtype in ("fp32", "fp64")), ("ACC", acc))  # fmt: skip
                    yield Job("project", tuple(types.items()), consts, arch, config.num_warps,
                              config.num_stages)  # fmt: skip


def _strength_jobs(arch: int) -> Iterable[Job]:
    from cs_kernels.triton_kernels import strength, tuning

    for dtype in DTYPES:
        acc = _acc(dtype)
        for config in tuning.strength_space():
            # Fused: scales [T, C] and int64 top tasks; unfused (norms only, one "task"):
            # both pointers are the norms, as `run_strength` passes them.
            variants = [(True, tb) for tb in tuning.TASK_BLOCKS]
            variants.append((False, tuning.task_block(1)))
            for fused, tb in variants:
                types = {
                    "addresses_ptr": "*i64", "anchor_ptr": f"*{dtype}", "items_ptr": "*i64",
                    "layers_ptr": "*i64", "counts_ptr": "*i32", "arrived_ptr": "*i32",
                    "norms_ptr": f"*{acc}", "scales_ptr": f"*{acc}",
                    "top_ptr": "*i64" if fused else f"*{acc}",
                    "channels_total": "i32", "num_tasks": "i32",
                }  # fmt: skip
                consts: Consts = (
                    *(("SUB", config.subrows), ("WIDTH", config.width), ("TB", tb)),
                    *(("BLOCK", strength.CHANNEL_BLOCK), ("FUSED", fused), ("ACC", acc)),
                )
                yield Job("strength", tuple(types.items()), consts, arch, config.num_warps, None)
    for dtype in ("fp32", "fp64"):  # the strengths given to `top_priority`
        for tb in tuning.TASK_BLOCKS:
            types = {"strength_ptr": f"*{dtype}", "layers_ptr": "*i64", "top_ptr": "*i64",
                     "channels_total": "i32", "num_tasks": "i32"}  # fmt: skip
            priority: Consts = (("TB", tb), ("BLOCK", strength.CHANNEL_BLOCK))
            yield Job("priority", tuple(types.items()), priority, arch, 4, None)


def jobs(archs: Sequence[int] = ARCHS) -> list[Job]:
    """Every configuration, the slowest compilations (pass 1) first."""
    found = [
        job
        for arch in archs
        for job in (*_phase2_jobs(arch), *_steps_jobs(arch), *_strength_jobs(arch))
    ]
    order = {"pass1": 0, "pass2": 1, "project": 2, "gram": 3, "strength": 4, "group": 5,
             "priority": 6}  # fmt: skip
    return sorted(found, key=lambda job: order[job.kernel])


def _constexpr(value: Any) -> Any:
    import triton.language as tl

    names = {"fp32": tl.float32, "fp64": tl.float64}
    return names.get(value, value) if isinstance(value, str) else value


def compile_job(job: Job) -> Result:
    """Compile one job; a compiler failure is returned, with the compiler's own diagnostics
    (printed by MLIR on file descriptor 2, captured here), not raised."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from cs_kernels.triton_kernels.phase2 import FP_FUSION

    fn = kernels()[job.kernel]
    types, consts = dict(job.types), {k: _constexpr(v) for k, v in job.constexprs}
    signature = {name: "constexpr" if name in consts else types[name] for name in fn.arg_names}
    aligned = [["tt.divisibility", 16]]  # tensors 16-byte aligned, N a multiple of 16
    attrs = {
        (i,): aligned
        for i, name in enumerate(fn.arg_names)
        if signature[name].startswith("*") or name == "stride"
    }
    options: dict[str, Any] = {"num_warps": job.num_warps, "enable_fp_fusion": FP_FUSION}
    if job.num_stages is not None:
        options["num_stages"] = job.num_stages
    start = time.monotonic()
    with tempfile.TemporaryFile(mode="w+b") as diagnostics:
        saved = os.dup(2)
        os.dup2(diagnostics.fileno(), 2)
        try:
            compiled = triton.compile(
                ASTSource(fn, signature, constexprs=consts, attrs=attrs),
                target=GPUTarget("cuda", job.arch, 32),
                options=options,
            )
            error = None
            if not compiled.asm.get("cubin") or f"sm_{job.arch}" not in compiled.asm["ptx"]:
                error = f"no cubin for sm_{job.arch}"
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        if error is not None:
            diagnostics.seek(0)
            text = diagnostics.read().decode(errors="replace")
            lines = [line for line in text.splitlines() if "error" in line or "note" in line]
            error += ("\n" + "\n".join(lines[:6])) if lines else ""
    return Result(job, time.monotonic() - start, error)


def default_workers() -> int:
    setting = os.environ.get(WORKERS_ENV, "").strip()
    if setting:
        return max(1, int(setting))
    return max(1, min(len(os.sched_getaffinity(0)), 4))


def compile_all(selected: Sequence[Job], workers: int | None = None) -> list[Result]:
    """Compile ``selected`` over ``workers`` processes (spawned: no state shared with a
    caller that imported torch)."""
    workers = workers or default_workers()
    if workers == 1:
        return [compile_job(job) for job in selected]
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        return list(pool.map(compile_job, selected, chunksize=1))


def summary(results: Sequence[Result], seconds: float, workers: int) -> str:
    import triton

    failed = sum(result.error is not None for result in results)
    archs = sorted({result.job.arch for result in results})
    per_kernel: dict[str, int] = {}
    for result in results:
        per_kernel[result.job.kernel] = per_kernel.get(result.job.kernel, 0) + 1
    kinds = ", ".join(f"{kernel} {count}" for kernel, count in per_kernel.items())
    return (
        f"[aot] triton {triton.__version__}: {len(results)} configurations ({kinds}) for "
        f"{', '.join(f'sm_{a}' for a in archs)} in {seconds:.0f} s on {workers} workers; "
        f"{failed} failed"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--arch", type=int, action="append", help="default: 80 and 90")
    parser.add_argument("--kernel", action="append", help="only these kernels (repeatable)")
    parser.add_argument("--list", action="store_true", help="print the jobs, compile nothing")
    args = parser.parse_args(argv)
    selected = [
        job for job in jobs(args.arch or ARCHS) if not args.kernel or job.kernel in args.kernel
    ]
    if args.list:
        print("\n".join(job.name for job in selected))
        print(f"{len(selected)} configurations")
        return 0
    workers = args.workers or default_workers()
    start = time.monotonic()
    results = compile_all(selected, workers)
    for result in results:
        if result.error is not None:
            print(f"[aot] FAILED {result.job.name}: {result.error}", flush=True)
    print(summary(results, time.monotonic() - start, workers), flush=True)
    return 1 if any(result.error is not None for result in results) else 0


if __name__ == "__main__":
    sys.exit(main())
