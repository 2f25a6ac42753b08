"""The triton suites, run on the CPU under the triton interpreter by a plain ``pytest tests``.

``TRITON_INTERPRET=1`` must be set before triton is imported, so the suites run in child
pytests: `test_triton.py` whole, and the triton cases of the foundation's parity, property,
bad-input, strength, from-weights, compile and half-size-rows suites (they include triton by
themselves wherever it runs). Two children run side by side, one per toolchain:

* this environment's triton (the newest, in ``.venv``);
* the GPU machines' triton 3.6.0, in the environment `make setup` makes for it
  (``.venv-triton36``, with numpy < 2.4: triton 3.6's interpreter turns a runtime loop bound
  into a Python int with ``int()`` on a one-element array, which numpy 2.4 refuses). Where
  that environment could not be made (offline) it is left out with a message; under
  ``CI=true`` that fails.

The interpreter runs each program in Python, so those suites keep their grids small on the
CPU; a child takes a couple of minutes. Skipped where this process already runs triton (a
GPU run, or a run under the interpreter) and where triton does not import.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.conftest import TRITON, report_line

ROOT = Path(__file__).resolve().parent.parent
SUITES = [
    "tests/test_triton.py",
    "tests/test_parity.py",
    "tests/test_properties.py",
    "tests/test_bad_input.py",
    "tests/test_strength.py",
    "tests/test_from_weights.py",
    "tests/test_compile.py",
    "tests/test_buffer_dtype.py",
    "tests/test_steps_fused.py",
]
MIN_PASSED = 150  # the child must really run the suites, not skip them
CI = os.environ.get("CI", "").lower() == "true"


def _bootstrap():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("cs_kernels_bootstrap", ROOT / "tools" /
                                                  "bootstrap.py")  # fmt: skip
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def summary_counts(output: str) -> dict[str, int] | None:
    """The outcome counts of pytest's closing summary line (``12 passed, 1 skipped in 3.4s``,
    with or without the ``=`` framing), or None when there is none. Only that line counts:
    a word such as "error" elsewhere in the output (a warning's text) means nothing."""
    outcome = r"(\d+) (passed|failed|errors?|skipped|xfailed|xpassed|deselected|warnings?)"
    for line in reversed(output.strip().splitlines()):
        line = line.strip().strip("=").strip()
        if re.fullmatch(rf"{outcome}(, {outcome})* in [\d.]+s( \(\d+:\d\d:\d\d\))?", line):
            counts: dict[str, int] = {}
            for number, word in re.findall(outcome, line):
                key = {"error": "errors", "warning": "warnings"}.get(word, word)
                counts[key] = counts.get(key, 0) + int(number)
            return counts
    return None


def _command(python: str) -> list[str]:
    return [
        python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "triton",
        "-W", "ignore::RuntimeWarning",  # numpy's inf/NaN arithmetic warnings, by design
        *SUITES,
    ]  # fmt: skip


@pytest.mark.skipif(TRITON, reason="this run already includes the triton suites")
def test_triton_suites_pass_under_the_interpreter(request: pytest.FixtureRequest) -> None:
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    pythons = {f"triton {importlib.metadata.version('triton')} (this environment)": sys.executable}
    gpu_python, why = _bootstrap().gpu_toolchain_python(ROOT)
    if gpu_python is not None and gpu_python.resolve() != Path(sys.executable).resolve():
        pythons[f"triton {_bootstrap().GPU_TOOLCHAIN_TRITON} ({gpu_python.parent.parent.name})"] = (
            str(gpu_python)
        )
    elif gpu_python is None:
        if CI:
            pytest.fail(f"CI=true: the GPU machines' toolchain is required: {why}")
        report_line(request, f"[interpreter] left out the GPU machines' triton: {why}")
    env = {k: v for k, v in os.environ.items() if k != "CS_KERNELS_BACKEND"}
    env.update(TRITON_INTERPRET="1", CS_KERNELS_TEST_DEVICE="cpu")
    problems = []
    with tempfile.TemporaryDirectory() as tmp:
        logs = {name: Path(tmp) / f"child{i}.log" for i, name in enumerate(pythons)}
        children = {}  # side by side: each child is one process, and the machine has 2 cores
        for name, python in pythons.items():
            with logs[name].open("w") as log:
                children[name] = subprocess.Popen(
                    _command(python), cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
                )
        for name, child in children.items():
            child.wait(timeout=2400)
            output = logs[name].read_text()
            counts = summary_counts(output)
            report = f"--- {name} ({pythons[name]}) ---\n{output[-6000:]}"
            report_line(request, f"[interpreter] {name}: {counts}")
            if child.returncode != 0 or counts is None:
                problems.append(f"exit status {child.returncode}\n{report}")
            elif counts.get("failed", 0) or counts.get("errors", 0):
                problems.append(f"{counts}\n{report}")
            elif counts.get("passed", 0) < MIN_PASSED:
                problems.append(f"only {counts.get('passed', 0)} passed (< {MIN_PASSED})\n{report}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("171 passed, 2 skipped in 540.77s (0:09:00)", {"passed": 171, "skipped": 2}),
        ("==== 3 failed, 10 passed, 1 warning in 2.00s ====",
         {"failed": 3, "passed": 10, "warnings": 1}),
        ("1 error in 0.5s", {"errors": 1}),
        ("5 passed, 2 errors in 1.0s", {"passed": 5, "errors": 2}),
    ],
)  # fmt: skip
def test_summary_line_is_parsed(line: str, expected: dict[str, int]) -> None:
    noise = "warning: will error in future\n. [100%]\n"
    assert summary_counts(noise + line + "\n") == expected


def test_warnings_mentioning_errors_are_not_failures() -> None:
    output = "DeprecationWarning: ... and will error in future.\n171 passed in 3.0s\n"
    assert summary_counts(output) == {"passed": 171}
    assert summary_counts("collected 0 items\n") is None
