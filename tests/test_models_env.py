"""tools/models_env.py picks the interpreter for the real-model tests and fails only under CI."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("models_env", ROOT / "tools" / "models_env.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def script(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    module = load_script()
    runs: list[tuple[list[str], dict[str, str]]] = []

    def fake_run(cmd, cwd=None, env=None, **kw):  # type: ignore[no-untyped-def]
        runs.append((list(cmd), dict(env or {})))
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(module.subprocess, "run", fake_run)
    module.runs = runs
    return module


def test_uses_the_main_interpreter_when_it_imports_the_libraries(script, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(script, "imports", lambda python: True)
    monkeypatch.setattr(sys, "argv", ["models_env.py", "--main", sys.executable])
    assert script.main() == 0
    ((cmd, env),) = script.runs
    assert cmd[0] == str(Path(sys.executable).absolute()) and "tests/test_real_models.py" in cmd
    assert env["CS_KERNELS_REQUIRE_MODELS"] == "1" and "CS_KERNELS_NO_EXTENSION" not in env


def test_second_environment_runs_without_the_extension(script, monkeypatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    venv = tmp_path / "models"
    monkeypatch.setattr(script, "imports", lambda python: str(python).startswith(str(venv)))
    monkeypatch.setattr(sys, "argv", ["models_env.py", "--main", "/nowhere", "--venv", str(venv)])
    assert script.main() == 0
    ((cmd, env),) = script.runs
    assert cmd[0] == str(venv / "bin" / "python")
    assert env["CS_KERNELS_NO_EXTENSION"] == "1"


@pytest.mark.parametrize(("ci", "code"), [("", 0), ("true", 1)])
def test_a_failed_setup_fails_only_under_ci(script, monkeypatch, tmp_path, ci, code) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("CI", ci)
    monkeypatch.setattr(script, "imports", lambda python: False)
    monkeypatch.setattr(script, "create", lambda venv: False)
    monkeypatch.setattr(
        sys, "argv", ["models_env.py", "--main", "/nowhere", "--venv", str(tmp_path)]
    )
    assert script.main() == code
    assert script.runs == []  # no test run after a failed set-up
