"""The CUDA build on machines without a GPU: setup.py's CS_KERNELS_CUDA decision, and the
compile-only check of the kernels (tools/check_cuda_compile.py), which must fail on a broken
kernel. The full check (every .cu for sm_80 and sm_90) runs in `make test` itself."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


setup_py = _load("cs_kernels_setup_under_test", ROOT / "setup.py")  # runs nothing: not __main__
check = _load("check_cuda_compile_under_test", ROOT / "tools" / "check_cuda_compile.py")


@pytest.mark.parametrize(
    ("setting", "torch_cuda", "home", "expected"),
    [
        (None, "13.0", "/cuda", True),  # auto: both present
        ("", "13.0", "/cuda", True),
        (None, None, "/cuda", False),  # auto: CPU-only torch
        (None, "13.0", None, False),  # auto: no toolkit
        ("0", "13.0", "/cuda", False),  # forced off
        ("1", "13.0", "/cuda", True),  # forced on, possible
    ],
)
def test_cuda_build_decision(setting, torch_cuda, home, expected) -> None:
    build, why = setup_py.cuda_build_decision(setting, torch_cuda, home)
    assert build is expected and why


def test_cuda_build_decision_explains_what_is_missing() -> None:
    assert "CPU-only" in setup_py.cuda_build_decision(None, None, "/cuda")[1]
    assert "toolkit" in setup_py.cuda_build_decision(None, "13.0", None)[1]
    assert setup_py.cuda_build_decision("0", "13.0", "/cuda")[1] == "CS_KERNELS_CUDA=0"


@pytest.mark.parametrize(("torch_cuda", "home"), [(None, "/cuda"), ("13.0", None), (None, None)])
def test_forcing_cuda_on_fails_clearly_when_impossible(torch_cuda, home) -> None:
    with pytest.raises(RuntimeError, match="CS_KERNELS_CUDA=1"):
        setup_py.cuda_build_decision("1", torch_cuda, home)


@pytest.mark.parametrize("setting", ["yes", "2", "true"])
def test_cuda_setting_must_be_0_or_1(setting) -> None:
    with pytest.raises(ValueError, match="CS_KERNELS_CUDA"):
        setup_py.cuda_build_decision(setting, "13.0", "/cuda")


def test_cuda_arch_list() -> None:
    assert setup_py.cuda_arch_list({}, visible_gpus=0) == "8.0;9.0"
    assert setup_py.cuda_arch_list({}, visible_gpus=1) is None  # torch builds for that GPU
    assert setup_py.cuda_arch_list({"TORCH_CUDA_ARCH_LIST": "9.0"}, visible_gpus=0) is None


def test_cuda_sources_only_in_cuda_builds() -> None:
    cpp, cu = setup_py.sources(cuda=False)
    assert "csrc/ops.cpp" in cpp and not any("cuda" in s for s in cpp) and cu == []
    cpp, cu = setup_py.sources(cuda=True)
    assert "csrc/cuda_ops.cpp" in cpp
    assert {"csrc/cuda/phase2.cu", "csrc/cuda/steps.cu", "csrc/cuda/strength.cu"} <= set(cu)


def test_find_cuda_home_requires_nvcc_and_headers(tmp_path: Path) -> None:
    fake = tmp_path / "cuda"
    (fake / "bin").mkdir(parents=True)
    (fake / "bin" / "nvcc").write_text("")
    env = {"CUDA_HOME": str(fake), "PATH": ""}
    assert setup_py.find_cuda_home(env) != str(fake)  # no include/cuda_runtime.h
    (fake / "include").mkdir()
    (fake / "include" / "cuda_runtime.h").write_text("")
    assert setup_py.find_cuda_home(env) == str(fake)


def test_compile_check_is_skipped_without_nvcc(monkeypatch, capsys) -> None:
    monkeypatch.setattr(check, "find_nvcc", lambda: None)
    assert check.main(["--no-min-torch"]) == 0
    assert "skipped the CUDA kernels: nvcc not found" in capsys.readouterr().out


@pytest.mark.parametrize("ci", ["", "true"])
def test_missing_torch_headers_skip_except_under_ci(monkeypatch, capsys, ci: str) -> None:
    monkeypatch.setattr(check, "find_nvcc", lambda: None)
    monkeypatch.setattr(check, "torch_headers", lambda: (None, "offline"))
    monkeypatch.setenv("CI", ci)
    assert check.main([]) == (1 if ci else 0)
    out = capsys.readouterr().out
    assert f"skipped the torch {check.MIN_TORCH} header check: offline" in out


def test_pyproject_states_the_minimum_torch_the_check_uses() -> None:
    text = (ROOT / "pyproject.toml").read_text()
    major_minor = ".".join(check.MIN_TORCH.split(".")[:2])
    assert f'dependencies = ["torch>={major_minor}"]' in text


def test_min_torch_unit_holds_every_torch_source(tmp_path: Path) -> None:
    every = {p.name for p in (ROOT / "csrc").glob("*.cpp")}
    assert {"ops.cpp", "cuda_ops.cpp", "phase2_cpu.cpp", "strength_cpu.cpp"} <= every
    text = check.min_torch_unit(tmp_path, cuda=True).read_text()
    assert text.splitlines()[0].endswith('ops.cpp"')  # Python.h first
    assert {Path(line.split('"')[1]).name for line in text.splitlines()} == every
    text = check.min_torch_unit(tmp_path, cuda=False).read_text()
    assert "cuda_ops.cpp" not in text


def _cached_min_torch_headers() -> Path | None:
    target = check.cache_root() / f"torch-{check.MIN_TORCH}-include"
    return target / "torch" / "include" if (target / ".complete").exists() else None


@pytest.mark.skipif(
    _cached_min_torch_headers() is None or shutil.which("c++") is None,
    reason="the torch 2.11 headers are not cached here (tools/check_cuda_compile.py fetches them)",
)
def test_min_torch_check_rejects_what_torch_2_11_lacks(tmp_path: Path) -> None:
    """The check can fail: an API the 2.11 headers do not declare is a compile error."""
    include = _cached_min_torch_headers()
    assert include is not None
    unit = tmp_path / "unit.cpp"
    source = "#include <c10/core/ScalarType.h>\nc10::ScalarType f() {{ return {}; }}\n"
    unit.write_text(source.format("c10::ScalarType::Float"))
    assert subprocess.run(check.min_torch_command("c++", include, None, unit)).returncode == 0
    unit.write_text(source.format("c10::ScalarType::NotAType"))
    result = subprocess.run(check.min_torch_command("c++", include, None, unit),
                            capture_output=True, text=True)  # fmt: skip
    assert result.returncode != 0 and "NotAType" in result.stderr


needs_nvcc = pytest.mark.skipif(check.find_nvcc() is None, reason="nvcc not found")


def _copy_kernels(tmp_path: Path) -> Path:
    target = tmp_path / "cuda"
    shutil.copytree(ROOT / "csrc" / "cuda", target)
    return target


@needs_nvcc
def test_compile_check_passes_on_a_kernel(tmp_path: Path) -> None:
    kernels = _copy_kernels(tmp_path)
    assert check.main(["--arch", "90", "--no-registration", str(kernels / "strength.cu")]) == 0


@needs_nvcc
def test_compile_check_fails_on_a_broken_kernel(tmp_path: Path, capsys) -> None:
    kernels = _copy_kernels(tmp_path)
    source = kernels / "strength.cu"
    text = source.read_text()
    assert "st(top + first + c, best);" in text
    source.write_text(text.replace("st(top + first + c, best);", "st(top + first + c, best)"))
    assert check.main(["--arch", "90", "--no-registration", str(source)]) == 1
    assert "FAILED" in capsys.readouterr().out


@needs_nvcc
def test_compile_check_treats_warnings_as_errors(tmp_path: Path) -> None:
    kernels = _copy_kernels(tmp_path)
    source = kernels / "strength.cu"
    text = source.read_text().replace(
        "  const int64_t item = blockIdx.x;",
        "  int unused_variable = 0;\n  const int64_t item = blockIdx.x;",
    )
    source.write_text(text)
    assert check.main(["--arch", "90", "--no-registration", str(source)]) == 1
