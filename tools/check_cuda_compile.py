"""Compile-only check of the CUDA kernels and of the torch-facing C++, for machines without
a GPU (run by `make test`).

* Every ``csrc/cuda/*.cu`` with nvcc for sm_80 and sm_90 (the flags of a real extension
  build, warnings as errors), in parallel.
* The torch-facing registration ``csrc/cuda_ops.cpp`` with the host compiler against the
  installed torch headers (syntax only; a CPU build of torch lacks the CUDA headers, and the
  file then uses the device-generic stream interface).
* Every ``csrc/*.cpp`` (each includes torch headers) against the headers of the oldest
  supported torch, 2.11.0 (the GPU machines' version; ``pyproject.toml`` states it): one
  syntax-only translation unit of all of them, with the CUDA headers where a toolkit is
  found, so ``cuda_ops.cpp`` takes its ``c10/cuda`` path as in a CUDA build. The headers come
  from the torch 2.11.0 wheel on the package index (``pip download``, about 530 MB, once):
  only ``torch/include`` is unpacked, into ``~/.cache/cs_kernels/torch-2.11.0-include``
  (``CS_KERNELS_CACHE`` moves it), and reused. Offline without that cache the step is skipped
  with a message, except under ``CI=true``, where it fails.

Nothing is linked or run.

Usage (from the repository root)::

    .venv/bin/python tools/check_cuda_compile.py                 # everything
    .venv/bin/python tools/check_cuda_compile.py --arch 90 FILE  # one file, one architecture

Exit status: 0 when everything compiles or when nvcc is absent (a message says the CUDA part
was skipped), 1 on a compile error (or, under ``CI=true``, missing torch 2.11 headers).
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
import zipfile
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
MIN_TORCH = "2.11.0"  # the oldest supported torch (pyproject.toml), the GPU machines' one
TORCH_SOURCES = sorted((ROOT / "csrc").glob("*.cpp"))  # every one includes torch headers


def cache_root() -> Path:
    return Path(os.environ.get("CS_KERNELS_CACHE", Path.home() / ".cache" / "cs_kernels"))


def torch_headers(version: str = MIN_TORCH) -> tuple[Path | None, str]:
    """``torch/include`` of the torch ``version`` wheel, unpacked once into the cache; or
    None and why not (offline, no pip)."""
    target = cache_root() / f"torch-{version}-include"
    marker = target / ".complete"
    if marker.exists():
        return target / "torch" / "include", f"cached in {target}"
    with tempfile.TemporaryDirectory() as tmp:
        download = [sys.executable, "-m", "pip", "download", f"torch=={version}", "--no-deps",
                    "--only-binary=:all:", "--retries", "1", "--timeout", "30",
                    "-d", tmp]  # fmt: skip
        print(f"[cuda-check] fetching the torch {version} wheel for its headers (once)", flush=True)
        result = subprocess.run(download, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("torch-*.whl"))
        if result.returncode != 0 or not wheels:
            last = (result.stderr.strip().splitlines() or ["no wheel"])[-1]
            return None, f"`pip download torch=={version}` failed ({last})"
        partial = target.with_name(target.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        with zipfile.ZipFile(wheels[0]) as wheel:
            members = [m for m in wheel.namelist() if m.startswith("torch/include/")]
            wheel.extractall(partial, members)
        (partial / ".complete").write_text(wheels[0].name + "\n")
        shutil.rmtree(target, ignore_errors=True)
        partial.rename(target)
    return target / "torch" / "include", f"unpacked {wheels[0].name} into {target}"


def min_torch_command(compiler: str, include: Path, cuda_home: str | None, unit: Path) -> list[str]:
    """Syntax-only compile of ``unit`` (including every csrc/*.cpp) against ``include``."""
    cuda = ["-isystem", str(Path(cuda_home) / "include")] if cuda_home else []
    return [
        compiler, "-std=c++17", "-fsyntax-only", "-Wall", "-Wextra", "-Werror",
        "-Wno-missing-field-initializers",  # PyModuleDef's C idiom in ops.cpp
        "-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C",
        "-isystem", str(include), "-isystem", str(include / "torch" / "csrc" / "api" / "include"),
        *cuda, "-isystem", sysconfig.get_paths()["include"], "-I", str(ROOT / "csrc"), str(unit),
    ]  # fmt: skip


def min_torch_unit(directory: Path, cuda: bool) -> Path:
    """One translation unit of every torch-including source (the headers parse once)."""
    sources = [s for s in TORCH_SOURCES if cuda or "cuda" not in s.name]
    sources.sort(key=lambda s: s.name != "ops.cpp")  # Python.h first, as in ops.cpp
    unit = directory / "min_torch_unit.cpp"
    unit.write_text("".join(f'#include "{s}"\n' for s in sources))
    return unit


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
    parser.add_argument(
        "--no-min-torch",
        action="store_true",
        help=f"skip the check against the torch {MIN_TORCH} headers (implied by SOURCES)",
    )
    args = parser.parse_args(argv)
    strict = os.environ.get("CI", "").lower() == "true"
    nvcc = find_nvcc()
    compiler = os.environ.get("CXX", "c++")
    start = time.monotonic()
    ok = True
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(max_workers=2) as pool:
        jobs = []
        if not args.no_min_torch and not args.sources:  # the longest jobs first
            include, why = torch_headers()
            if include is None:
                print(f"[cuda-check] skipped the torch {MIN_TORCH} header check: {why}")
                if strict:
                    print("[cuda-check] CI=true: the torch 2.11 header check is required")
                    ok = False
            elif shutil.which(compiler) is not None:
                cuda_home = load_setup().find_cuda_home()
                unit = min_torch_unit(Path(tmp), cuda=cuda_home is not None)
                label = f"csrc/*.cpp against torch {MIN_TORCH} ({why}; host, syntax)"
                command = min_torch_command(compiler, include, cuda_home, unit)
                jobs.append(pool.submit(run, command, label))
        if nvcc is None:
            print("[cuda-check] skipped the CUDA kernels: nvcc not found (set CUDA_HOME or put "
                  "nvcc on PATH)")  # fmt: skip
        else:
            sources = args.sources or sorted(KERNELS.glob("*.cu"))
            archs = args.arch or list(ARCHS)
            jobs += [
                pool.submit(
                    run,
                    nvcc_command(nvcc, src, archs, Path(tmp) / f"{i}.o"),
                    f"{src.name} for sm_{', sm_'.join(archs)}",
                )
                for i, src in enumerate(sources)
            ]
            registration = None if args.no_registration else registration_command(compiler)
            if registration is not None and shutil.which(compiler) is not None:
                jobs.append(pool.submit(run, registration, f"{REGISTRATION.name} (host, syntax)"))
        ok = all([job.result() for job in jobs]) and ok
    print(f"[cuda-check] {'passed' if ok else 'FAILED'} in {time.monotonic() - start:.1f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
