"""Backend selection: auto, the environment override, explicit requests, availability."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import cs_kernels as ck
from cs_kernels.backends import BackendUnavailableError, resolve_backend

ROOT = Path(__file__).resolve().parent.parent


def test_cpu_backend_is_built_when_required() -> None:
    """`make test` sets CS_KERNELS_REQUIRE_CPU=1: a broken build must fail the suite."""
    if os.environ.get("CS_KERNELS_REQUIRE_CPU") != "1":
        pytest.skip("CS_KERNELS_REQUIRE_CPU is not set")
    assert ck.backend_status()["cpu"] == "available"


def test_status_lists_every_backend_with_a_reason() -> None:
    status = ck.backend_status()
    assert set(status) == {"triton", "cuda", "cpu", "torch", "reference"}
    assert status["torch"] == "available" and status["reference"] == "available"
    assert all(isinstance(reason, str) and reason for reason in status.values())


def test_auto_prefers_the_compiled_kernels_on_cpu(monkeypatch) -> None:
    monkeypatch.delenv("CS_KERNELS_BACKEND", raising=False)
    expected = "cpu" if ck.backend_status()["cpu"] == "available" else "torch"
    assert resolve_backend("auto", torch.device("cpu")).name == expected
    assert ck.available_backends("cpu")[0] == expected


def test_auto_uses_torch_on_other_devices(monkeypatch) -> None:
    monkeypatch.delenv("CS_KERNELS_BACKEND", raising=False)
    assert resolve_backend("auto", torch.device("meta")).name == "torch"
    assert "cpu" not in ck.available_backends("meta")


def test_environment_overrides_auto(monkeypatch) -> None:
    monkeypatch.setenv("CS_KERNELS_BACKEND", "reference")
    assert resolve_backend("auto", torch.device("cpu")).name == "reference"
    # An explicit argument wins over the environment.
    assert resolve_backend("torch", torch.device("cpu")).name == "torch"


def test_unknown_names_are_rejected(monkeypatch) -> None:
    with pytest.raises(ValueError, match="backend"):
        resolve_backend("cuda-please", torch.device("cpu"))
    monkeypatch.setenv("CS_KERNELS_BACKEND", "nope")
    with pytest.raises(ValueError, match="CS_KERNELS_BACKEND"):
        resolve_backend("auto", torch.device("cpu"))


def test_missing_extension_still_imports_and_falls_back() -> None:
    """Without the compiled module: import works, auto falls back, explicit cpu raises."""
    script = textwrap.dedent(
        """
        import sys
        sys.modules["cs_kernels._C"] = None  # makes `import cs_kernels._C` fail
        import torch
        import cs_kernels as ck
        reason = ck.backend_status()["cpu"]
        assert "make build" in reason, reason
        assert ck.available_backends("cpu") == ["torch", "reference"], ck.available_backends("cpu")
        grads = torch.randn(2, 3, 4)
        top = torch.tensor([0, 1, 1])
        auto = ck.project_layer(grads, top)
        ref = ck.project_layer(grads, top, backend="reference")
        torch.testing.assert_close(auto, ref)
        try:
            ck.project_layer(grads, top, backend="cpu")
        except ck.BackendUnavailableError as exc:
            assert "make build" in str(exc)
        else:
            raise AssertionError("backend='cpu' should raise without the extension")
        print("ok")
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "CS_KERNELS_BACKEND"}
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, env=env
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_backend_unavailable_error_is_a_runtime_error() -> None:
    assert issubclass(BackendUnavailableError, RuntimeError)
