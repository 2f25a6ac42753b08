"""Which model libraries import here: torchvision and timm, for tests/test_real_models.py.

PyPI's torchvision does not import beside the CPU build of torch 2.13 (its C++ operators need
the CUDA build), so on the development machine the real-model tests run in a second
environment (`make test-models`, tools/models_env.py). ``CS_KERNELS_REQUIRE_MODELS=1`` (set
there) turns a library that does not import into a failure instead of a skip.
"""

from __future__ import annotations

import importlib
import os
from functools import cache
from types import ModuleType

LIBRARIES = ("torchvision", "timm")
REQUIRED = os.environ.get("CS_KERNELS_REQUIRE_MODELS", "") == "1"


@cache
def load(name: str) -> ModuleType | str:
    """The imported library, or why it does not import."""
    try:
        return importlib.import_module(name)
    except Exception as exc:  # an ImportError, or torchvision's RuntimeError about its ops
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def header() -> str:
    """One line for the pytest report header: what runs and why not."""
    states = {name: load(name) for name in LIBRARIES}
    parts = [
        f"{n} {getattr(m, '__version__', '?')}" if isinstance(m, ModuleType) else f"{n} ({m})"
        for n, m in states.items()
    ]
    missing = [n for n, m in states.items() if not isinstance(m, ModuleType)]
    if not missing:
        return f"real models: {', '.join(parts)}: tests/test_real_models.py runs them"
    where = (
        "required here (CS_KERNELS_REQUIRE_MODELS=1): their tests fail"
        if REQUIRED
        else "their tests are skipped here; `make test-models` runs them in .venv-models"
    )
    return f"real models: {'; '.join(parts)}: {where}"
