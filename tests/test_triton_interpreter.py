"""The triton suites, run on the CPU under the triton interpreter by a plain ``pytest tests``.

``TRITON_INTERPRET=1`` must be set before triton is imported, so the suites run in a child
pytest: `test_triton.py` whole, and the triton cases of the foundation's parity, property,
bad-input, strength, from-weights and compile suites (they include triton by themselves
wherever it runs). The interpreter runs each program in Python, so those suites keep their
grids small on the CPU; the child takes a couple of minutes.

Skipped where this process already runs triton (a GPU run, or a run under the interpreter)
and where triton does not import.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import TRITON

ROOT = Path(__file__).resolve().parent.parent
SUITES = [
    "tests/test_triton.py",
    "tests/test_parity.py",
    "tests/test_properties.py",
    "tests/test_bad_input.py",
    "tests/test_strength.py",
    "tests/test_from_weights.py",
    "tests/test_compile.py",
]
MIN_PASSED = 150  # the child must really run the suites, not skip them


def _triton_imports() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    return None


@pytest.mark.skipif(TRITON, reason="this run already includes the triton suites")
def test_triton_suites_pass_under_the_interpreter() -> None:
    missing = _triton_imports()
    if missing:
        pytest.skip(missing)
    env = {k: v for k, v in os.environ.items() if k != "CS_KERNELS_BACKEND"}
    env.update(TRITON_INTERPRET="1", CS_KERNELS_TEST_DEVICE="cpu")
    command = [
        sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "triton",
        "-W", "ignore::RuntimeWarning",  # numpy's inf/NaN arithmetic warnings, by design
        *SUITES,
    ]  # fmt: skip
    proc = subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200, check=False
    )
    report = proc.stdout[-6000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, report
    found = re.search(r"(\d+) passed", proc.stdout)
    assert found and int(found.group(1)) >= MIN_PASSED, report
    assert " failed" not in proc.stdout and " error" not in proc.stdout, report
