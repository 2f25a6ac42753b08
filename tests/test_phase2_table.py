"""benchmarks/phase2_table.py's timing rules, on a fake clock (no wall time is asserted)."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

import cs_kernels as ck

ROOT = Path(__file__).resolve().parent.parent


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "phase2_table_under_test", ROOT / "benchmarks" / "phase2_table.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


table = _load()
ARGS = argparse.Namespace(
    repeats=5, slow_repeats=3, slow_seconds=0.1, very_slow_seconds=1.0, warmup_seconds=0.0
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(table.time, "perf_counter", fake)
    return fake


def _workload() -> object:
    plan = ck.Phase2Plan([(0, 2, 3)], 8)
    grads = torch.randn(2, 8)
    return table.Workload("tiny", plan, grads, torch.zeros(2, dtype=torch.int64), torch.empty(8))


def test_the_compile_is_not_timed_as_the_compiled_case(clock, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """torch.compile's first call compiles (seconds, here 30 on the fake clock); steady calls
    take 2 ms. The case must be timed by steady calls, not by the compile, which is past
    --very-slow-seconds and would otherwise become the sample."""

    def fake_compile(fn):  # type: ignore[no-untyped-def]
        calls = []

        def compiled() -> object:
            clock.now += 30.0 if not calls else 0.002
            calls.append(1)
            return fn()

        return compiled

    monkeypatch.setattr(table.torch, "compile", fake_compile)
    case = table._compiled_phase2(_workload(), "group")
    (samples,) = table.time_round_robin([case], torch.device("cpu"), ARGS)
    assert len(samples) == ARGS.repeats
    assert samples == pytest.approx([2.0] * ARGS.repeats)


def test_a_very_slow_case_is_timed_by_its_first_call(clock) -> None:  # type: ignore[no-untyped-def]
    def slow() -> None:
        clock.now += 2.5

    def quick() -> None:
        clock.now += 0.001

    slow_samples, quick_samples = table.time_round_robin([slow, quick], torch.device("cpu"), ARGS)
    assert slow_samples == [pytest.approx(2500.0)]  # one call, past --very-slow-seconds
    assert quick_samples == pytest.approx([1.0] * ARGS.repeats)
