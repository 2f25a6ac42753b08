"""The runnable programs in python/ work end to end (quick modes)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_demo_quick_mode_runs() -> None:
    result = subprocess.run(
        [sys.executable, "python/demo.py", "--quick"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "Agreement with `reference`" in result.stdout
    assert "authors loop" in result.stdout
    # Every fast backend agrees with the oracle to fp32 accuracy.
    diffs = [float(line.split("=")[-1]) for line in result.stdout.splitlines() if "|diff|" in line]
    assert diffs and max(diffs) < 1e-4, result.stdout
