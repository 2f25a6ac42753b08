"""Loading the compiled extension ``cs_kernels._C`` (the ``cpu`` and ``cuda`` backends' kernels).

The package imports without it; `load_error()` then says what failed and how to build it, and
`cuda_error()` why the CUDA kernels cannot run (not built, no device).
"""

from __future__ import annotations

import importlib
import os

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


def _plan_row_sqnorm_fake(weights: list[torch.Tensor]) -> torch.Tensor:
    if not weights:
        raise ValueError("weights must hold at least one tensor")
    dtype = torch.float64 if weights[0].dtype == torch.float64 else torch.float32
    return weights[0].new_empty((sum(int(w.shape[0]) for w in weights),), dtype=dtype)


def _top_priority_fake(strength: torch.Tensor, layers: torch.Tensor) -> torch.Tensor:
    return strength.new_empty((strength.shape[1],), dtype=torch.int64)


def _phase2_fake(*args: object) -> None:
    return None  # writes its `out`/`projected` arguments in place, returns nothing


def _channel_gram_fake(
    grads: torch.Tensor,
    layers: torch.Tensor,
    gaps: torch.Tensor,
    channels: int,
    sum_out: torch.Tensor | None,
) -> torch.Tensor:
    dtype = torch.float64 if grads.dtype == torch.float64 else torch.float32
    tasks = grads.shape[0]
    return grads.new_empty((channels, tasks, tasks), dtype=dtype)


def _projection_coefficients_fake(
    gram: torch.Tensor, layers: torch.Tensor, top: torch.Tensor, group_mode: bool,
    project_uniform: bool,
) -> torch.Tensor:  # fmt: skip
    return gram.new_empty((gram.shape[1], gram.shape[0]))


def _register_fakes() -> None:
    """Shape-only implementations so torch.compile can trace through the compiled ops."""
    torch.library.register_fake("cs_kernels::row_sqnorm", _row_sqnorm_fake)
    if hasattr(torch.ops.cs_kernels, "plan_row_sqnorm"):  # absent from builds before it
        torch.library.register_fake("cs_kernels::plan_row_sqnorm", _plan_row_sqnorm_fake)
    torch.library.register_fake("cs_kernels::top_priority", _top_priority_fake)
    torch.library.register_fake("cs_kernels::phase2_", _phase2_fake)
    if hasattr(torch.ops.cs_kernels, "channel_gram"):  # absent from builds before the steps
        torch.library.register_fake("cs_kernels::channel_gram", _channel_gram_fake)
        torch.library.register_fake("cs_kernels::project_", _phase2_fake)
    if hasattr(torch.ops.cs_kernels, "projection_coefficients"):
        torch.library.register_fake(
            "cs_kernels::projection_coefficients", _projection_coefficients_fake
        )


def load() -> bool:
    """Import the extension once; True when its ops are registered."""
    global _error, _loaded
    if _loaded or _error is not None:
        return _loaded
    if os.environ.get("CS_KERNELS_NO_EXTENSION", "") == "1":
        # e.g. beside a different torch than the one the extension was built for
        _error = "the compiled extension is disabled by CS_KERNELS_NO_EXTENSION=1"
        return False
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


CUDA_BUILD_HINT = (
    "rebuild with a CUDA-enabled torch and the CUDA toolkit (`make build`; "
    "CS_KERNELS_CUDA=1 turns a skipped CUDA build into an error)"
)

_cuda_error: str | None = None
_cuda_checked = False


def cuda_kernels_built() -> bool:
    """True when the loaded extension registered its ops for CUDA tensors."""
    if not load():
        return False
    return bool(torch._C._dispatch_has_kernel_for_dispatch_key("cs_kernels::phase2_", "CUDA"))


def cuda_error() -> str | None:
    """``None`` when the CUDA kernels can run here, otherwise why not (checked once)."""
    global _cuda_error, _cuda_checked
    if not _cuda_checked:
        _cuda_error = _find_cuda_error()
        _cuda_checked = True
    return _cuda_error


def _find_cuda_error() -> str | None:
    error = load_error()
    if error is not None:
        return error
    if not cuda_kernels_built():
        if torch.version.cuda is None:
            why = f"torch {torch.__version__} has no CUDA"
        else:
            why = "no CUDA toolkit at build time, or CS_KERNELS_CUDA=0"
        return f"cs_kernels._C was built without CUDA kernels ({why}); {CUDA_BUILD_HINT}"
    if not torch.cuda.is_available():
        return "no CUDA device is available (torch.cuda.is_available() is False)"
    return None
