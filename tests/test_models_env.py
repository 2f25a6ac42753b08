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
    sys.modules[spec.name] = module  # its dataclass looks its module up
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
    monkeypatch.setattr(script, "create", lambda venv, spec: False)
    monkeypatch.setattr(
        sys, "argv", ["models_env.py", "--main", "/nowhere", "--venv", str(tmp_path)]
    )
    assert script.main() == code
    assert script.runs == []  # no test run after a failed set-up


def test_the_twin_has_the_gpu_machines_versions_and_newest_the_newest() -> None:
    script = load_script()
    twin = dict(pin.split("==") for pin in script.TWIN.pins)
    assert twin["torch"] == "2.11.0" and twin["triton"] == "3.6.0"
    assert twin["torchvision"] == "0.26.0" and "timm" in twin
    assert script.TWIN.python == "python3.12" and script.TWIN.venv == ".venv-gpu-twin"
    assert "torchjd" not in script.TWIN.tools  # as on the GPU machines
    assert {"ninja", "pybind11", "pytest-benchmark"} <= set(script.TWIN.tools)  # gpu_check
    newest = dict(pin.split("==") for pin in script.NEWEST.pins)
    assert newest["torch"] > twin["torch"] and script.NEWEST.venv == ".venv-models"


def test_an_environment_is_ready_only_with_its_pinned_versions(tmp_path: Path) -> None:
    """The check imports the libraries and compares the pins (a local version such as
    +cu130 aside): an environment made for other pins is remade."""
    script = load_script()
    (tmp_path / "bin").mkdir()
    wrapper = tmp_path / "bin" / "python"  # this interpreter, its environment included
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    wrapper.chmod(0o755)
    import importlib.metadata as m

    here = m.version("pytest")
    spec = script.EnvSpec("x", (f"pytest=={here}",), (), imports="import pytest")
    assert script.ready(tmp_path, spec)
    assert not script.ready(tmp_path, script.EnvSpec("x", ("pytest==0.0.1",), (), None,
                                                     "import pytest"))  # fmt: skip
    assert not script.ready(tmp_path / "nowhere", spec)
    assert "split('+')[0] == '2.11.0'" in script.TWIN.check_code()


def test_a_python312_is_found_or_this_one_is_used(monkeypatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    script = load_script()
    monkeypatch.setattr(script.shutil, "which", lambda name: None)
    monkeypatch.setenv("PYENV_ROOT", str(tmp_path))  # no pyenv versions there
    assert script.base_python("python3.12") == sys.executable
    assert script.base_python(None) == sys.executable
    found = tmp_path / "versions" / "3.12.9" / "bin"
    found.mkdir(parents=True)
    (found / "python3.12").symlink_to(sys.executable)
    assert script.base_python("python3.12") == str(found / "python3.12")
