"""Compile-only check of the CUDA kernels, for machines without a GPU (run by `make test`).

Compiles every ``csrc/cuda/*.cu`` with nvcc for sm_80 and sm_90 (the flags of a real
extension build, warnings as errors), in parallel, and the torch-facing registration
``csrc/cuda_ops.cpp`` with the host compiler against the installed torch headers (syntax
only; a CPU build of torch lacks the CUDA headers, and the file then uses the device-generic
stream interface). Nothing is linked or run.

Usage (from the repository root)::

    .venv/bin/python tools/check_cuda_compile.py                 # everything
    .venv/bin/python tools/check_cuda_compile.py --arch 90 FILE  # one file, one architecture

Exit status: 0 when everything compiles or when nvcc is absent (a message says it was
skipped), 1 on a compile error.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent
KERNELS = ROOT / "csrc" / "cuda"
REGISTRATION = ROOT / "csrc" / "cuda_ops.cpp"
ARCHS = ("80", "90")
# What torch.utils.cpp_extension passes to nvcc for every extension.
TORCH_NVCC_FLAGS = [
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
    "--expt-relaxed-constexpr",
]
WARNINGS_AS_ERRORS = ["-Werror", "all-warnings", "-Xcompiler", "-Wall,-Wextra,-Werror"]


def load_setup() -> ModuleType:
    """setup.py as a module (its build runs only as __main__): the toolkit lookup lives there."""
    spec = importlib.util.spec_from_file_location("cs_kernels_setup", ROOT / "setup.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def find_nvcc() -> str | None:
    home = load_setup().find_cuda_home()
    if home is not None:
        return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def nvcc_command(nvcc: str, source: Path, archs: list[str], output: Path) -> list[str]:
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    return [
        nvcc,
        "-c",
        str(source),
        "-o",
        str(output),
        *load_setup().nvcc_compile_args(),
        *TORCH_NVCC_FLAGS,
        *WARNINGS_AS_ERRORS,
        *gencode,
        "--threads",
        str(len(archs)),
    ]


def registration_command(compiler: str) -> list[str] | None:
    """Syntax-only compile of csrc/cuda_ops.cpp against the installed torch headers."""
    try:
        from torch.utils.cpp_extension import include_paths
    except ImportError:
        return None
    system = [flag for path in include_paths() for flag in ("-isystem", path)]
    return [
        compiler,
        "-std=c++17",
        "-fsyntax-only",
        "-Wall",
        "-Wextra",
        "-Werror",
        *system,
        "-isystem",
        sysconfig.get_paths()["include"],
        "-I",
        str(ROOT / "csrc"),
        str(REGISTRATION),
    ]


def run(command: list[str], label: str) -> bool:
    start = time.monotonic()
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    seconds = time.monotonic() - start
    if result.returncode != 0:
        print(f"[cuda-check] FAILED {label} ({seconds:.1f} s)\n{result.stdout}{result.stderr}")
        return False
    print(f"[cuda-check] ok {label} ({seconds:.1f} s)", flush=True)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sources", nargs="*", type=Path, help="default: csrc/cuda/*.cu")
    parser.add_argument(
        "--arch", action="append", choices=ARCHS, help="repeatable; default: 80 and 90"
    )
    parser.add_argument("--no-registration", action="store_true", help="skip csrc/cuda_ops.cpp")
    args = parser.parse_args(argv)
    nvcc = find_nvcc()
    if nvcc is None:
        print("[cuda-check] skipped: nvcc not found (set CUDA_HOME or put nvcc on PATH)")
        return 0
    sources = args.sources or sorted(KERNELS.glob("*.cu"))
    archs = args.arch or list(ARCHS)
    start = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(max_workers=2) as pool:
        jobs = [
            pool.submit(
                run,
                nvcc_command(nvcc, src, archs, Path(tmp) / f"{i}.o"),
                f"{src.name} for sm_{', sm_'.join(archs)}",
            )
            for i, src in enumerate(sources)
        ]
        compiler = os.environ.get("CXX", "c++")
        registration = None if args.no_registration else registration_command(compiler)
        if registration is not None and shutil.which(compiler) is not None:
            jobs.append(pool.submit(run, registration, f"{REGISTRATION.name} (host, syntax)"))
        ok = all(job.result() for job in jobs)
    print(f"[cuda-check] {'passed' if ok else 'FAILED'} in {time.monotonic() - start:.1f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
