"""tools/gpu_rehearsal.py: the copy it rehearses in holds the working tree and nothing built or
ignored, the twin's python runs gpu_check --rehearse there, and a twin that cannot be made
fails the rehearsal only under CI."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load() -> ModuleType:
    sys.path.insert(0, str(ROOT / "tools"))  # it imports models_env beside it
    try:
        spec = importlib.util.spec_from_file_location("gpu_rehearsal", ROOT / "tools" /
                                                      "gpu_rehearsal.py")  # fmt: skip
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT / "tools"))
    return module


gpu_rehearsal = _load()


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True)


def test_the_copy_is_the_working_tree_without_ignored_files(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    (repo / "pkg").mkdir(parents=True)
    (repo / "pkg" / "a.py").write_text("tracked, then edited\n")
    (repo / ".gitignore").write_text(".venv/\n*.so\n")
    _git(repo, "init", "-q")
    _git(repo, "add", ".")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x")
    (repo / "pkg" / "a.py").write_text("edited\n")  # uncommitted edits travel
    (repo / "pkg" / "new.py").write_text("untracked\n")  # so do new files
    (repo / "pkg" / "_C.so").write_text("built\n")  # ignored: left behind
    (repo / ".venv").mkdir()
    (repo / ".venv" / "python").write_text("env\n")
    dest = tmp_path / "copy"
    (dest / "stale").mkdir(parents=True)  # a previous copy is replaced
    assert gpu_rehearsal.copy_tree(repo, dest) == 3
    assert (dest / "pkg" / "a.py").read_text() == "edited\n"
    assert (dest / "pkg" / "new.py").exists() and (dest / ".gitignore").exists()
    assert not (dest / "pkg" / "_C.so").exists() and not (dest / ".venv").exists()
    assert not (dest / "stale").exists()


def test_outside_git_the_copy_leaves_out_environments_and_builds(tmp_path: Path) -> None:
    src = tmp_path / "src"
    for name in ("pkg/a.py", ".venv-gpu-twin/x", "build/y", "pkg/_C.so", "gpu-check-results/z"):
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_text("x")
    dest = tmp_path / "copy"
    assert gpu_rehearsal.copy_tree(src, dest) == 1
    assert (dest / "pkg" / "a.py").exists()


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    runs: list[list[str]] = []
    monkeypatch.setattr(gpu_rehearsal.models_env, "ready", lambda venv, spec: False)
    monkeypatch.setattr(gpu_rehearsal.models_env, "create", lambda venv, spec: False)
    monkeypatch.setattr(gpu_rehearsal, "copy_tree", lambda root, dest: runs.append(["copy"]))

    def run(cmd, **kw):  # type: ignore[no-untyped-def]
        runs.append(cmd)
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(gpu_rehearsal.subprocess, "run", run)
    return runs


@pytest.mark.parametrize(("ci", "code"), [("", 0), ("true", 1)])
def test_a_twin_that_cannot_be_made_fails_only_under_ci(offline, monkeypatch, ci, code) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("CI", ci)
    assert gpu_rehearsal.main([]) == code
    assert offline == []  # nothing copied, nothing run


def test_the_twins_python_rehearses_in_the_copy(offline, monkeypatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(gpu_rehearsal.models_env, "ready", lambda venv, spec: True)
    monkeypatch.setenv("CS_KERNELS_BACKEND", "torch")  # the caller's settings stay out
    seen: dict[str, object] = {}

    def run(cmd, cwd=None, env=None, **kw):  # type: ignore[no-untyped-def]
        seen.update(cmd=cmd, cwd=cwd, env=env)
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(gpu_rehearsal.subprocess, "run", run)
    assert gpu_rehearsal.main(["--venv", str(tmp_path), "--only", "tests"]) == 0
    cmd = seen["cmd"]
    assert isinstance(cmd, list) and cmd[0] == str(tmp_path / "bin" / "python")
    assert cmd[1:3] == ["tools/gpu_check.py", "--rehearse"] and cmd[-2:] == ["--only", "tests"]
    assert seen["cwd"] == gpu_rehearsal.COPY
    assert isinstance(seen["env"], dict) and "CS_KERNELS_BACKEND" not in seen["env"]
