"""tools/models_env.py picks the interpreter for the real-model tests, makes the GPU machines'
twin with their versions, and fails only under CI."""

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
    monkeypatch.setattr(script, "imports", lambda python, code=None: True)
    monkeypatch.setattr(sys, "argv", ["models_env.py", "--main", sys.executable])
    assert script.main() == 0
    ((cmd, env),) = script.runs
    assert cmd[0] == str(Path(sys.executable).absolute()) and "tests/test_real_models.py" in cmd
    assert env["CS_KERNELS_REQUIRE_MODELS"] == "1" and "CS_KERNELS_NO_EXTENSION" not in env


def test_second_environment_runs_without_the_extension(script, monkeypatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    venv = tmp_path / "models"
    monkeypatch.setattr(
        script, "imports", lambda python, code=None: str(python).startswith(str(venv))
    )
    monkeypatch.setattr(sys, "argv", ["models_env.py", "--main", "/nowhere", "--venv", str(venv)])
    assert script.main() == 0
    ((cmd, env),) = script.runs
    assert cmd[0] == str(venv / "bin" / "python")
    assert env["CS_KERNELS_NO_EXTENSION"] == "1"


@pytest.mark.parametrize(("ci", "code"), [("", 0), ("true", 1)])
def test_a_failed_setup_fails_only_under_ci(script, monkeypatch, tmp_path, ci, code) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("CI", ci)
    monkeypatch.setattr(script, "imports", lambda python, code=None: False)
    monkeypatch.setattr(script, "create", lambda venv: False)
    monkeypatch.setattr(
        sys, "argv", ["models_env.py", "--main", "/nowhere", "--venv", str(tmp_path)]
    )
    assert script.main() == code
    assert script.runs == []  # no test run after a failed set-up


def test_the_twin_has_the_gpu_machines_versions(tmp_path: Path) -> None:
    """The pins are the GPU machines' (torch 2.11.0+cu130, triton 3.6.0, torchvision 0.26.0),
    and a twin is ready only with those versions: one made for other pins is remade."""
    script = load_script()
    pins = dict(pin.split("==") for pin in script.MODEL_PACKAGES)
    assert pins["torch"] == "2.11.0" and pins["triton"] == "3.6.0"
    assert pins["torchvision"] == "0.26.0" and "timm" in pins
    assert script.TWIN_PYTHON == "python3.12"
    assert "torchjd" not in " ".join(script.TEST_PACKAGES)  # as on the GPU machines
    # This interpreter is no twin: its torch is not 2.11.0 (or it lacks torchvision).
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "python").symlink_to(sys.executable)
    ready = script.twin_ready(tmp_path)
    import importlib.metadata as m

    assert ready is False or m.version("torch").split("+")[0] == "2.11.0"
    assert script.imports(fake / "python", "import sys") is True
    assert script.imports(fake / "python", "raise SystemExit(3)") is False
    assert script.imports(tmp_path / "nowhere" / "python") is False


def test_a_python312_is_found_or_this_one_is_used(monkeypatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    script = load_script()
    monkeypatch.setattr(script.shutil, "which", lambda name: None)
    monkeypatch.setenv("PYENV_ROOT", str(tmp_path))  # no pyenv versions there
    assert script.base_python() == sys.executable
    found = tmp_path / "versions" / "3.12.9" / "bin"
    found.mkdir(parents=True)
    (found / "python3.12").symlink_to(sys.executable)
    assert script.base_python() == str(found / "python3.12")
