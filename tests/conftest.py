"""Shared fixtures and helpers for the cs_kernels test suite.

``CS_KERNELS_TEST_DEVICE`` picks the device for the whole suite (``cpu`` by default), so the
same suite runs on a GPU by hand.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

import cs_kernels as ck

DEVICE = torch.device(os.environ.get("CS_KERNELS_TEST_DEVICE", "cpu"))

# Test modules of the python/ programs and the packages they need. `make test` installs them
# (strictly under CI); an offline GPU image may lack them, and then these modules are left out
# of collection, which the report header says.
PROGRAM_TESTS = {
    "test_multidigits.py": ("sklearn",),
    "test_mtl_methods.py": ("sklearn", "torchjd"),
    "test_reproduce.py": ("sklearn", "torchjd", "tqdm", "matplotlib"),
    "test_programs.py": ("sklearn", "tqdm", "matplotlib"),
    "test_training_program.py": ("matplotlib",),
    "test_reproduce_scenes.py": ("torchjd", "tqdm", "matplotlib"),
}
MISSING = {
    name: [m for m in modules if importlib.util.find_spec(m) is None]
    for name, modules in PROGRAM_TESTS.items()
}
collect_ignore = [name for name, missing in MISSING.items() if missing]


def pytest_report_header() -> list[str]:
    from tests.model_libraries import header

    left_out = [
        f"left out {name}: {', '.join(MISSING[name])} not installed" for name in collect_ignore
    ]
    return [*left_out, header()]


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """The header's model-library line again at the end: ``-q`` runs hide the header."""
    from tests.model_libraries import header

    terminalreporter.write_line(header())


# Every backend except the oracle, that can run on DEVICE here.
FAST_BACKENDS = [b for b in ck.available_backends(DEVICE) if b != "reference"]

# The triton backend runs here: on CUDA, or on the CPU under the triton interpreter
# (TRITON_INTERPRET=1 before import; tests/test_triton_interpreter.py starts such a run).
TRITON = "triton" in FAST_BACKENDS
# Interpreted kernels run each program in Python: tests keep their grids small there.
TRITON_INTERPRETED = TRITON and DEVICE.type == "cpu"

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]

# (atol, rtol) relative to unit-scale gradients; the reference works in float64.
TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (2e-5, 2e-5),
    torch.bfloat16: (3e-2, 2e-2),
    torch.float16: (4e-3, 2e-3),
}


def assert_close(
    actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str
) -> None:
    """allclose with per-dtype tolerances that also reports NaN/Inf mismatches."""
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    a, e = actual.double().cpu(), expected.double().cpu()
    assert torch.equal(torch.isnan(a), torch.isnan(e)), f"{what}: NaN pattern differs"
    assert torch.equal(torch.isinf(a), torch.isinf(e)), f"{what}: Inf pattern differs"
    atol, rtol = TOLERANCES[dtype]
    finite = torch.isfinite(e)
    diff = (a - e).abs()[finite]
    bound = (atol + rtol * e.abs())[finite]
    if diff.numel() and bool((diff > bound).any()):
        worst = int(torch.argmax(diff - bound))
        raise AssertionError(
            f"{what}: max |diff| {float(diff.max()):.3g}, worst at flat index {worst} "
            f"(diff {float(diff[worst]):.3g} > bound {float(bound[worst]):.3g}), dtype {dtype}"
        )


@pytest.fixture
def device() -> torch.device:
    return DEVICE


def report_line(request: pytest.FixtureRequest, line: str) -> None:
    """Print ``line`` on the terminal even though pytest captures output."""
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if capture is None or reporter is None:
        print(line)
        return
    with capture.global_and_fixture_disabled():
        reporter.write_line(line)
