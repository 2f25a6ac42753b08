"""Backend registry and selection.

``auto`` picks the fastest available backend for the tensors' device; the environment
variable ``CS_KERNELS_BACKEND`` overrides it. An explicitly requested backend that cannot
run raises; ``auto`` falls back quietly.
"""

from __future__ import annotations

import os

import torch

from cs_kernels.backends.base import Backend
from cs_kernels.backends.cpu import CpuBackend
from cs_kernels.backends.cuda import CudaBackend
from cs_kernels.backends.reference import ReferenceBackend
from cs_kernels.backends.torch_vectorized import TorchBackend
from cs_kernels.backends.triton_backend import TritonBackend

ENV_VAR = "CS_KERNELS_BACKEND"


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run here (the message says why)."""


BACKENDS: dict[str, Backend] = {
    backend.name: backend
    for backend in (
        TritonBackend(),
        CudaBackend(),
        CpuBackend(),
        TorchBackend(),
        ReferenceBackend(),
    )
}

# Fastest first, per device type; `torch` runs everywhere.
AUTO_ORDER: dict[str, tuple[str, ...]] = {
    "cuda": ("triton", "cuda", "torch"),
    "cpu": ("cpu", "torch"),
}
AUTO_FALLBACK: tuple[str, ...] = ("torch",)


def backend_names() -> tuple[str, ...]:
    """Every name `backend=` accepts, ``"auto"`` included."""
    return ("auto", *BACKENDS)


def backend_status() -> dict[str, str]:
    """``{name: "available" | why not}`` for every backend."""
    return {name: backend.unavailable_reason() or "available" for name, backend in BACKENDS.items()}


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """Names of the backends that can run here (on ``device`` when given), fastest first."""
    if device is None:
        names = list(BACKENDS)
    else:
        dev = torch.device(device)
        order = AUTO_ORDER.get(dev.type, AUTO_FALLBACK)
        names = [*order, *(n for n in BACKENDS if n not in order)]
        names = [n for n in names if BACKENDS[n].supports(dev)]
    return [n for n in names if BACKENDS[n].unavailable_reason() is None]


def resolve_backend(name: object, device: torch.device, argument: str = "backend") -> Backend:
    """The backend to run for tensors on ``device``. Raises ValueError naming ``argument``."""
    if not isinstance(name, str):
        raise TypeError(f"{argument} must be a str, got {type(name).__name__}")
    if name not in backend_names():
        raise ValueError(f"{argument} must be one of {list(backend_names())}, got {name!r}")
    if name == "auto":
        override = os.environ.get(ENV_VAR, "").strip()
        if override and override != "auto":
            return resolve_backend(override, device, argument=f"${ENV_VAR}")
        for candidate in AUTO_ORDER.get(device.type, AUTO_FALLBACK):
            backend = BACKENDS[candidate]
            if backend.supports(device) and backend.unavailable_reason() is None:
                return backend
        return BACKENDS["torch"]
    backend = BACKENDS[name]
    reason = backend.unavailable_reason()
    if reason is not None:
        raise BackendUnavailableError(f"{argument}={name!r} is unavailable: {reason}")
    if not backend.supports(device):
        raise ValueError(f"{argument}={name!r} cannot run on {device} tensors")
    return backend
