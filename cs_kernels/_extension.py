"""Loading the compiled extension ``cs_kernels._C`` (the ``cpu`` backend's kernels).

The package imports without it; `load_error()` then says what failed and how to build it.
"""

from __future__ import annotations

import importlib

import torch

BUILD_HINT = (
    "build it with `make build` (or `pip install --no-build-isolation --no-deps -e .`) "
    "from the repository root"
)

_error: str | None = None
_loaded = False


def _row_sqnorm_fake(weight: torch.Tensor) -> torch.Tensor:
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    return weight.new_empty((weight.shape[0],), dtype=dtype)


def _top_priority_fake(strength: torch.Tensor, layers: torch.Tensor) -> torch.Tensor:
    return strength.new_empty((strength.shape[1],), dtype=torch.int64)


def _phase2_fake(*args: object) -> None:
    return None  # writes its `out`/`projected` arguments in place, returns nothing


def _register_fakes() -> None:
    """Shape-only implementations so torch.compile can trace through the compiled ops."""
    torch.library.register_fake("cs_kernels::row_sqnorm", _row_sqnorm_fake)
    torch.library.register_fake("cs_kernels::top_priority", _top_priority_fake)
    torch.library.register_fake("cs_kernels::phase2_", _phase2_fake)


def load() -> bool:
    """Import the extension once; True when its ops are registered."""
    global _error, _loaded
    if _loaded or _error is not None:
        return _loaded
    try:
        importlib.import_module("cs_kernels._C")
    except ImportError as exc:
        _error = f"the compiled extension cs_kernels._C is missing or broken ({exc}); {BUILD_HINT}"
        return False
    _register_fakes()
    _loaded = True
    return True


def load_error() -> str | None:
    """``None`` when the extension is loaded, otherwise why it is not."""
    load()
    return _error
