"""The set-up's GPU toolchain environment (tools/bootstrap.py, step 5): made over `.venv`'s
packages, and, where triton 3.6.0 cannot be had, skipped with a message, except under CI."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bootstrap_under_test", ROOT / "tools" /
                                                  "bootstrap.py")  # fmt: skip
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("strict", [False, True])
def test_unobtainable_triton_is_skipped_except_under_ci(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    strict: bool,
) -> None:  # fmt: skip
    bootstrap = _load()
    monkeypatch.setattr(bootstrap, "ROOT", tmp_path)
    monkeypatch.setattr(bootstrap, "run", lambda cmd, check=True: 1)  # pip: offline
    monkeypatch.setattr(bootstrap.importlib.metadata, "version", lambda name: "0")
    # A version no interpreter has: the half-made environment sees this interpreter's packages,
    # which may hold the GPU machines' triton itself (a rehearsal in their twin).
    monkeypatch.setattr(bootstrap, "GPU_TOOLCHAIN_TRITON", "0.0.1")
    assert bootstrap.make_gpu_toolchain(Path(sys.executable), strict) is (not strict)
    out = capsys.readouterr().out
    assert ("CI=true: could not make" in out) if strict else ("its checks will be skipped" in out)
    python, why = bootstrap.gpu_toolchain_python(tmp_path)
    assert python is None and f"triton {bootstrap.GPU_TOOLCHAIN_TRITON}" in why
    # The environment sees the development environment's packages after its own.
    pth = next((tmp_path / bootstrap.GPU_TOOLCHAIN_VENV).rglob(bootstrap.PARENT_PTH))
    assert "site.addsitedir" in pth.read_text()


def test_the_gpu_toolchain_environment_when_made() -> None:
    bootstrap = _load()
    python, why = bootstrap.gpu_toolchain_python()
    if python is None:
        pytest.skip(why)
    assert bootstrap.GPU_TOOLCHAIN_PINS[0] == f"triton=={bootstrap.GPU_TOOLCHAIN_TRITON}"
    assert why.startswith(f"triton {bootstrap.GPU_TOOLCHAIN_TRITON}")
