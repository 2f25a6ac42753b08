"""The runnable programs in python/ work end to end (quick modes)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_demo_quick_mode_runs(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "python/demo.py", "--quick", "--results", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = result.stdout
    assert result.returncode == 0, result.stderr
    # (a) every fast backend agrees with the oracle to fp32 accuracy.
    assert "Agreement with `reference`" in out
    diffs = [float(line.split("=")[-1]) for line in out.splitlines() if "|diff|" in line]
    assert diffs and max(diffs) < 1e-4, out
    # (b) the benchmark table, with the floor and the authors' loop.
    assert "| model | N | T | mode | backend |" in out, out
    assert "floor (torch.sum)" in out and "authors' loop" in out
    # (c) both methods trained, metrics printed, plots written to the named folder.
    assert "Connections found by ConnectionStrength" in out
    for label in ("ours (mixed)", "GD (plain sum)"):
        line = next(x for x in out.splitlines() if x.strip().startswith(label))
        assert len(line.split()) >= 6, line
    for name in ("loss_curves.png", "priority_telemetry.png", "metrics.json"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert (tmp_path / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"Results folder: {tmp_path}" in out
