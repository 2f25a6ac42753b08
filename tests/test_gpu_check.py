"""`make gpu-check` (tools/gpu_check.py) where it can be checked without a GPU: it stops at
once with a message naming what is missing and no traceback, its stage budgets fit the
9-minute budget, and its stages run the commands the GPU run needs."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "tools" / "gpu_check.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module
    spec.loader.exec_module(module)
    return module


gpu_check = _load()
INFO = {"capability": "9.0", "arch": "90", "cores": "16"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_without_a_gpu_it_stops_at_once_and_names_what_is_missing(tmp_path: Path) -> None:
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "tools/gpu_check.py", "--results", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2
    assert "no CUDA GPU" in proc.stderr and "NVIDIA GPU" in proc.stderr
    assert "CPU-only" in proc.stderr or "sees no GPU" in proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not any(tmp_path.iterdir())  # nothing started
    assert time.monotonic() - start < 60


def test_without_torch_it_says_so() -> None:
    proc = subprocess.run([sys.executable, "-S", "-I", "tools/gpu_check.py"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 2
    assert "has no torch" in proc.stderr and "Traceback" not in proc.stderr


def test_budgets_fit_nine_minutes() -> None:
    assert sum(s.budget_s for s in gpu_check.STAGES) <= gpu_check.TOTAL_BUDGET_S == 540
    assert gpu_check.DEADLINE_S < 600  # inside a 10-minute command limit
    assert [s.name for s in gpu_check.STAGES] == ["build", "tests", "bench", "demo"]
    assert all(s.estimate and s.limit_s >= s.budget_s for s in gpu_check.STAGES)
    out = subprocess.run([sys.executable, "tools/gpu_check.py", "--plan"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60).stdout  # fmt: skip
    assert "total budget" in out and "estimate:" in out


def test_stage_commands(tmp_path: Path) -> None:
    commands, env = gpu_check.stage_commands("build", INFO, tmp_path, True)
    assert commands[0][1:] == ["setup.py", "build_ext", "--inplace"]
    assert env["TORCH_CUDA_ARCH_LIST"] == "9.0" and env["CS_KERNELS_CUDA"] == "1"
    assert env["MAX_JOBS"] == "16"
    assert commands[2][1:] == ["-m", "cs_kernels.triton_kernels.aot", "--arch", "90"]
    commands, env = gpu_check.stage_commands("tests", INFO, tmp_path, True)
    assert env["CS_KERNELS_TEST_DEVICE"] == "cuda" and env["CS_KERNELS_REQUIRE_CPU"] == "1"
    assert commands[0][-1] == "tests"
    commands, env = gpu_check.stage_commands("tests", INFO, tmp_path, False)
    assert "CS_KERNELS_REQUIRE_CPU" not in env  # --skip build: whatever is built is used
    commands, _ = gpu_check.stage_commands("bench", INFO, tmp_path, True)
    assert all("--save" in c and "cuda" in c for c in commands[:2])
    assert "--no-compiled" in commands[0] and "--compiled" in commands[1]
    # the FSDP2 steps of the triton and cuda backends at the ResNet-50 x4 size
    assert commands[2][1:4] == ["benchmarks/fsdp_phase2.py", "--steps-only", "--steps-model"]
    assert "resnet50x4" in commands[2] and commands[2][commands[2].index("--device") + 1] == "cuda"
    # the half-size rows table on the GPU, at the ResNet-50 size
    assert commands[3][1:4] == ["benchmarks/memory_table.py", "--device", "cuda"]
    assert "tiny" not in commands[3]
    commands, _ = gpu_check.stage_commands("demo", INFO, tmp_path, True)
    assert commands[0][1:5] == ["python/demo.py", "--quick", "--device", "cuda"]


def test_stages_can_be_skipped_or_chosen() -> None:
    args = gpu_check.parse_args(["--skip", "build", "--skip", "demo"])
    assert args.skip == ["build", "demo"]
    assert gpu_check.parse_args(["--only", "bench"]).only == ["bench"]
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--skip", "nonsense"])


def test_saved_benchmarks_are_read_from_the_log(tmp_path: Path) -> None:
    log = tmp_path / "bench.log"
    log.write_text("table\n\nsaved benchmarks/results/nvidia-h200-2026-12-01.json\n")
    assert gpu_check.saved_benchmarks(log) == [
        ROOT / "benchmarks/results/nvidia-h200-2026-12-01.json"
    ]


def test_a_stage_past_its_limit_is_stopped(tmp_path: Path) -> None:
    log = tmp_path / "x.log"
    start = time.monotonic()
    status, seconds = gpu_check.run_logged(
        [[sys.executable, "-c", "import time; time.sleep(30)"]], log, {}, timeout=2
    )
    assert status is None and seconds < 20 and time.monotonic() - start < 20
    assert "stopped after" in log.read_text()
    status, _ = gpu_check.run_logged([[sys.executable, "-c", "print('hi')"]], log, {}, 30)
    assert status == 0 and "hi" in log.read_text()


def test_rehearsal_stage_commands_run_on_the_cpu(tmp_path: Path) -> None:
    """--rehearse: the same stages, the same CUDA build, but the device is the CPU, the real
    models are required, and the interpreter child (triton 3.6 on new numpy) is left out."""
    commands, env = gpu_check.stage_commands("build", INFO, tmp_path, True, rehearse=True)
    assert commands[0][1:] == ["setup.py", "build_ext", "--inplace"]
    assert env["TORCH_CUDA_ARCH_LIST"] == "9.0" and env["CS_KERNELS_CUDA"] == "1"
    assert "cuda_kernels_built()" in commands[1][-1] and "s['cuda'] ==" not in commands[1][-1]
    assert commands[2][-2:] == ["--arch", "90"]
    commands, env = gpu_check.stage_commands("tests", INFO, tmp_path, True, rehearse=True)
    assert env["CS_KERNELS_TEST_DEVICE"] == "cpu" and env["CS_KERNELS_REQUIRE_MODELS"] == "1"
    assert env["CS_KERNELS_REQUIRE_CPU"] == "1"
    assert commands[0][-3:] == ["--deselect", "tests/test_triton_interpreter.py", "tests"]
    commands, _ = gpu_check.stage_commands("bench", INFO, tmp_path, True, rehearse=True)
    assert all("--quick" in c and "cuda" not in c for c in commands[:2])
    assert "--compiled" in commands[1] and "resnet18" in commands[1]
    assert "--steps-only" in commands[2] and "cuda" not in commands[2]
    assert commands[3][1] == "benchmarks/memory_table.py" and "tiny" in commands[3]
    assert "cuda" not in commands[3]
    commands, _ = gpu_check.stage_commands("demo", INFO, tmp_path, True, rehearse=True)
    assert commands[0][1:5] == ["python/demo.py", "--quick", "--device", "cpu"]


def test_rehearsal_preflight_needs_a_cuda_build_of_torch_not_a_gpu() -> None:
    if torch.version.cuda is None:
        with pytest.raises(gpu_check.MissingGpu, match="CPU-only build"):
            gpu_check.rehearsal_preflight("90")
        proc = subprocess.run([sys.executable, "tools/gpu_check.py", "--rehearse"], cwd=ROOT,
                              capture_output=True, text=True, timeout=120)  # fmt: skip
        assert proc.returncode == 2 and "needs a CUDA build of torch" in proc.stderr
        assert "Traceback" not in proc.stderr
    else:
        info = gpu_check.rehearsal_preflight("90")
        assert info["capability"] == "9.0" and info["arch"] == "90"
        assert info["device"].startswith("CPU rehearsal, no GPU")
    args = gpu_check.parse_args(["--rehearse"])
    assert args.deadline == gpu_check.REHEARSAL_DEADLINE_S and args.arch == "90"
    assert gpu_check.parse_args([]).deadline == gpu_check.DEADLINE_S
