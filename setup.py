"""Build script for cs_kernels: the pure-Python package plus the compiled kernels.

The extension ``cs_kernels._C`` holds the ``cpu`` backend (OpenMP kernels) and, in CUDA
builds, the ``cuda`` backend (``csrc/cuda/*.cu`` plus their registration
``csrc/cuda_ops.cpp``), all registered as ``torch.library`` ops. It is built with ninja
through ``torch.utils.cpp_extension``.

Environment:
    CS_KERNELS_EXTENSION=0  install the pure-Python package without compiling anything (no C++
                            compiler needed; the ``torch`` backend then serves the CPU).
    CS_KERNELS_PORTABLE=1   build without ``-march=native`` (for binaries that travel).
    CS_KERNELS_CUDA=0|1     force the CUDA kernels off, or on (failing clearly when torch has
                            no CUDA or no toolkit is found). Unset: built when both are there.
    TORCH_CUDA_ARCH_LIST    GPU architectures, e.g. "8.0;9.0". Unset: the visible GPUs',
                            else sm_80 and sm_90.
    CUDA_HOME / CUDA_PATH   the CUDA toolkit (else nvcc on PATH, else /usr/local/cuda).
"""

from __future__ import annotations

import os
import platform
import shutil
import sys
from collections.abc import Mapping
from pathlib import Path

ROOT = Path(__file__).parent
DEFAULT_CUDA_ARCHS = "8.0;9.0"  # A100 and H100/H200


def cpu_compile_args() -> list[str]:
    args = ["-O3", "-fopenmp", "-std=c++17", "-fno-math-errno"]
    portable = os.environ.get("CS_KERNELS_PORTABLE", "0") == "1"
    if not portable and platform.machine() in ("x86_64", "AMD64"):
        args.append("-march=native")
    return args


def nvcc_compile_args() -> list[str]:
    # No --use_fast_math: the projection coefficients need IEEE division.
    return ["-O3", "-std=c++17"]


def find_cuda_home(env: Mapping[str, str] | None = None) -> str | None:
    """The CUDA toolkit root (with ``bin/nvcc`` and ``include/cuda_runtime.h``), or None."""
    env = os.environ if env is None else env
    candidates = [env.get("CUDA_HOME"), env.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc", path=env.get("PATH"))
    if nvcc is not None:  # .../bin/nvcc; follow a symlink to the real toolkit
        candidates.append(str(Path(nvcc).resolve().parent.parent))
    candidates.append("/usr/local/cuda")
    for home in candidates:
        if not home:
            continue
        root = Path(home)
        if (root / "bin" / "nvcc").is_file() and (root / "include" / "cuda_runtime.h").is_file():
            return str(root)
    return None


def cuda_build_decision(
    setting: str | None, torch_cuda: str | None, cuda_home: str | None
) -> tuple[bool, str]:
    """Whether to build the CUDA kernels, and why.

    Args:
        setting: the value of ``CS_KERNELS_CUDA`` (None when unset).
        torch_cuda: ``torch.version.cuda`` (None for a CPU-only torch).
        cuda_home: `find_cuda_home()`.

    Raises:
        ValueError: ``setting`` is not 0, 1 or empty.
        RuntimeError: ``CS_KERNELS_CUDA=1`` but the kernels cannot be built here.
    """
    value = (setting or "").strip()
    if value not in ("", "0", "1"):
        raise ValueError(f"CS_KERNELS_CUDA must be 0 or 1 (or unset), got {setting!r}")
    if value == "0":
        return False, "CS_KERNELS_CUDA=0"
    missing = []
    if torch_cuda is None:
        missing.append("the installed torch is a CPU-only build (torch.version.cuda is None)")
    if cuda_home is None:
        missing.append(
            "no CUDA toolkit found (set CUDA_HOME, or put nvcc on PATH; /usr/local/cuda has none)"
        )
    if not missing:
        return True, f"torch built with CUDA {torch_cuda}, toolkit in {cuda_home}"
    if value == "1":
        raise RuntimeError(
            "CS_KERNELS_CUDA=1 but the CUDA kernels cannot be built: " + "; ".join(missing)
        )
    return False, "; ".join(missing)


def cuda_arch_list(env: Mapping[str, str], visible_gpus: int) -> str | None:
    """The TORCH_CUDA_ARCH_LIST to set, or None to keep torch's choice (the user's setting,
    or the visible GPUs' architectures)."""
    if env.get("TORCH_CUDA_ARCH_LIST", "").strip() or visible_gpus > 0:
        return None
    return DEFAULT_CUDA_ARCHS


def sources(cuda: bool) -> tuple[list[str], list[str]]:
    """(C++ sources, CUDA sources), relative to the repository root."""
    cpp = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cpp"))
    if not cuda:
        return [s for s in cpp if "cuda" not in Path(s).name], []
    return cpp, sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cuda").glob("*.cu"))


def extensions() -> list[object]:
    import torch

    home = find_cuda_home()
    build_cuda, why = cuda_build_decision(
        os.environ.get("CS_KERNELS_CUDA"), torch.version.cuda, home
    )
    print(f"cs_kernels: CUDA kernels {'on' if build_cuda else 'off'} ({why})", file=sys.stderr)
    link_args = ["-fopenmp"] if sys.platform != "darwin" else []
    cpp, cu = sources(build_cuda)
    if not build_cuda:
        from torch.utils.cpp_extension import CppExtension

        return [
            CppExtension(
                name="cs_kernels._C",
                sources=cpp,
                extra_compile_args={"cxx": cpu_compile_args()},
                extra_link_args=link_args,
            )
        ]
    # Before torch.utils.cpp_extension is imported: it reads both at import time.
    os.environ["CUDA_HOME"] = str(home)
    archs = cuda_arch_list(os.environ, torch.cuda.device_count())
    if archs is not None:
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    from torch.utils.cpp_extension import CUDAExtension

    return [
        CUDAExtension(
            name="cs_kernels._C",
            sources=cpp + cu,
            extra_compile_args={"cxx": cpu_compile_args(), "nvcc": nvcc_compile_args()},
            extra_link_args=link_args,
        )
    ]


# Commands that compile the extension; the others (sdist, egg_info, dist_info) need no torch.
BUILD_COMMANDS = {"build", "build_ext", "bdist_wheel", "install", "develop", "editable_wheel"}

NO_TORCH_MESSAGE = (
    "cs_kernels: torch is not importable in this build environment. The C++ extension must be "
    "compiled against the torch that will import it, so build in your own environment "
    "(with torch>=2.11 installed): `pip install --no-build-isolation .`"
)


def needs_torch(argv: list[str]) -> bool:
    """Whether the setup.py commands in ``argv`` compile the extension."""
    return any(arg in BUILD_COMMANDS for arg in argv[1:])


def extension_wanted(env: Mapping[str, str]) -> bool:
    """False when ``CS_KERNELS_EXTENSION=0`` asks for the pure-Python package.

    Raises:
        ValueError: ``CS_KERNELS_EXTENSION`` is not 0, 1 or empty.
    """
    value = env.get("CS_KERNELS_EXTENSION", "").strip()
    if value not in ("", "0", "1"):
        raise ValueError(f"CS_KERNELS_EXTENSION must be 0 or 1 (or unset), got {value!r}")
    return value != "0"


MIN_SETUPTOOLS = (77, 0)  # pyproject.toml's SPDX `license` and `license-files` need it


def check_setuptools(version: str) -> None:
    """Stop with a clear message when setuptools is too old to read pyproject.toml.

    Raises:
        SystemExit: ``version`` is older than `MIN_SETUPTOOLS`.
    """
    parts = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
    if parts < MIN_SETUPTOOLS:
        raise SystemExit(
            f"cs_kernels: setuptools {version} is too old to build it; "
            f'pip install "setuptools>={MIN_SETUPTOOLS[0]}"'
        )


def main() -> None:
    import setuptools
    from setuptools import setup

    check_setuptools(setuptools.__version__)
    if not extension_wanted(os.environ):
        print("cs_kernels: no compiled extension (CS_KERNELS_EXTENSION=0)", file=sys.stderr)
        setup()
        return

    try:
        import torch  # noqa: F401
    except ImportError:
        if needs_torch(sys.argv):
            raise SystemExit(NO_TORCH_MESSAGE) from None
        setup()  # metadata or an sdist: pyproject.toml holds everything
        return
    ext_modules = extensions()  # first: it may set CUDA_HOME for torch.utils.cpp_extension

    from torch.utils.cpp_extension import BuildExtension

    setup(
        ext_modules=ext_modules,
        cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    )


if __name__ == "__main__":  # setuptools runs this file as __main__; tests import it
    main()
