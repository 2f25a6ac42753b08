"""Build script for cs_kernels: the pure-Python package plus the compiled CPU kernels.

The C++ extension (``cs_kernels._C``) holds the ``cpu`` backend: OpenMP kernels registered
as ``torch.library`` ops. It is built with ninja through ``torch.utils.cpp_extension``.

Environment:
    CS_KERNELS_PORTABLE=1   build without ``-march=native`` (for binaries that travel).
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

from setuptools import find_packages, setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

ROOT = Path(__file__).parent


def cpu_compile_args() -> list[str]:
    args = ["-O3", "-fopenmp", "-std=c++17", "-fno-math-errno"]
    portable = os.environ.get("CS_KERNELS_PORTABLE", "0") == "1"
    if not portable and platform.machine() in ("x86_64", "AMD64"):
        args.append("-march=native")
    return args


def extensions() -> list[CppExtension]:
    sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cpp"))
    link_args = ["-fopenmp"] if sys.platform != "darwin" else []
    return [
        CppExtension(
            name="cs_kernels._C",
            sources=sources,
            extra_compile_args={"cxx": cpu_compile_args()},
            extra_link_args=link_args,
        )
    ]


setup(
    name="cs_kernels",
    version="0.1.0",
    packages=find_packages(include=["cs_kernels", "cs_kernels.*"]),
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    python_requires=">=3.10",
)
