"""python/train_multitask.py runs end to end, and its cs_kernels integration stays short."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROGRAM = ROOT / "python" / "train_multitask.py"


def test_integration_is_at_most_40_lines_of_user_code() -> None:
    text = PROGRAM.read_text().splitlines()
    start = next(i for i, line in enumerate(text) if "---- INTEGRATION" in line)
    end = next(i for i, line in enumerate(text) if "---- end of INTEGRATION" in line)
    code = [
        line for line in text[start + 1 : end] if line.strip() and not line.strip().startswith("#")
    ]
    assert 5 < len(code) <= 40, len(code)
    assert any("ConnectionStrength(" in line for line in code)
    assert any("cs.step(" in line for line in code)


def test_program_quick_mode_runs(tmp_path: Path) -> None:
    plot = tmp_path / "priority.png"
    result = subprocess.run(
        [sys.executable, str(PROGRAM), "--epochs", "2", "--steps", "4", "--plot", str(plot)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "3 connection layer(s)" in out and "blocks.0.conv.weight" in out
    assert "epoch 1: phase1" in out and "test accuracy" in out
    assert plot.read_bytes()[:4] == b"\x89PNG"


def test_program_mixed_precision_flags_run() -> None:
    """--amp fp16 (autocast + GradScaler) with --accumulate and --clip, and bf16 autocast with
    half-size rows; a bad --accumulate is a clear usage error."""
    for flags in (["--amp", "fp16", "--accumulate", "2", "--clip", "1.0"],
                  ["--amp", "bf16", "--buffer-dtype", "bf16"]):  # fmt: skip
        result = subprocess.run(
            [sys.executable, str(PROGRAM), "--epochs", "2", "--steps", "2", "--plot", "", *flags],
            cwd=ROOT, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert "epoch 1: phase1" in result.stdout and "test accuracy" in result.stdout
    bad = subprocess.run(
        [sys.executable, str(PROGRAM), "--quick", "--accumulate", "3"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert bad.returncode == 2 and "--accumulate must be >= 1 and divide --batch" in bad.stderr
