"""Argument checks shared by the public API. Every failure names the offending argument.

Checks that read tensor *values* (ranges, signs, NaN/Inf) need a device synchronisation on
accelerators; the public functions run them only when ``check=True``.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
MODES = ("group", "channel")
UNIFORM_RULES = ("sum", "project")


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 accumulates in fp64; fp32, bf16 and fp16 accumulate in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def require_tensor(x: object, name: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def require_float(x: object, name: str) -> Tensor:
    t = require_tensor(x, name)
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float64, bfloat16 or float16, got {t.dtype}")
    return t


def require_rank(x: Tensor, name: str, rank: int, shape_doc: str) -> None:
    if x.dim() != rank:
        raise ValueError(f"{name} must be {shape_doc} ({rank}-D), got shape {tuple(x.shape)}")


def require_contiguous(x: Tensor, name: str) -> None:
    if not x.is_contiguous():
        raise ValueError(f"{name} must be contiguous (call .contiguous() first)")


def require_same_device(x: Tensor, name: str, ref: Tensor, ref_name: str) -> None:
    if x.device != ref.device:
        raise ValueError(f"{name} is on {x.device} but {ref_name} is on {ref.device}")


def require_choice(value: object, name: str, choices: Sequence[str]) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, one of {list(choices)}, got {type(value).__name__}")
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value


def require_bool(value: object, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def require_int(value: object, name: str, minimum: int) -> int:
    """An integer (Python or NumPy, not bool) >= ``minimum``, returned as a Python int."""
    if isinstance(value, bool) or not hasattr(value, "__index__") or isinstance(value, Tensor):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    value = operator.index(value)
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def require_top(top: object, name: str, channels: int, num_tasks: int, check: bool) -> Tensor:
    """``top``: int64 ``[channels]`` with values in ``[0, num_tasks)``."""
    t = require_tensor(top, name)
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor (int64), got {t.dtype}")
    if t.dim() != 1 or t.shape[0] != channels:
        raise ValueError(f"{name} must have shape [{channels}], got {tuple(t.shape)}")
    if check and t.numel() > 0:
        low, high = int(t.min()), int(t.max())
        if low < 0 or high >= num_tasks:
            raise ValueError(
                f"{name} holds task indices in [{low}, {high}], outside [0, {num_tasks - 1}]"
            )
    return t


def require_finite_nonnegative(x: Tensor, name: str) -> None:
    """Value check (syncs on accelerators): every entry finite and >= 0."""
    if x.numel() == 0:
        return
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or Inf")
    if bool((x < 0).any()):
        raise ValueError(f"{name} must be non-negative (connection strengths are >= 0)")


def require_finite(x: Tensor, name: str) -> None:
    if x.numel() > 0 and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or Inf")


def storage_overlaps(a: Tensor, b: Tensor) -> bool:
    """True when the memory ranges of two tensors intersect."""
    if a.device != b.device or a.device.type == "meta" or a.numel() == 0 or b.numel() == 0:
        return False  # meta tensors have no memory (every data_ptr is 0)
    a0 = a.data_ptr()
    b0 = b.data_ptr()
    a1 = a0 + a.numel() * a.element_size()
    b1 = b0 + b.numel() * b.element_size()
    return a0 < b1 and b0 < a1
