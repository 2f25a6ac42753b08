"""`benchmarks/fsdp_phase2.py` runs end to end (2 gloo ranks, the tiny model, one round).

The benchmark drives the controller the way no test does (combine timed again and again on
the same rows, the steps timed per backend), so a change of the controller's contract shows
up here first. It times nothing that is asserted: only that it runs and reports every row.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_fsdp_benchmark_runs_on_the_tiny_model() -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "benchmarks/fsdp_phase2.py", "--world", "2", "--model", "tiny",
         "--repeats", "1"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for row in ("rows held, ddp", "rows held, fsdp", "sent, ours"):
        assert row in result.stdout, f"{row!r} missing from the report:\n{result.stdout}"
