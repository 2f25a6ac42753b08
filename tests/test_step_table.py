"""benchmarks/step_table.py: every method's step runs, and the timed steps compute what they
claim (ours and the authors'-style Phase 2 give the same update)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

import cs_kernels as ck

ROOT = Path(__file__).resolve().parent.parent


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "step_table", ROOT / "benchmarks" / "step_table.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["step_table"] = module
    spec.loader.exec_module(module)
    return module


step_table = load_script()
TINY = ["--batch", "2", "--size", "32", "--width", "8", "--head-width", "8", "--repeats", "2"]


def tiny_args(method: str, tasks: int = 3):  # type: ignore[no-untyped-def]
    return step_table.parse_args(
        [*TINY, "--worker", "--method", method, "--tasks", str(tasks), "--warmup", "1"]
    )


def test_every_method_runs_and_the_table_derives_its_columns() -> None:
    rows, skipped = [], []
    for method in step_table.METHODS:
        row = step_table.worker(tiny_args(method))
        if "skipped" in row:  # an optional package of a torchjd baseline is missing
            assert method in step_table.TORCHJD, row
            skipped.append(row)
            continue
        assert row["ms"] > 0 and row["peak_bytes"] > 0 and len(row["times_ms"]) == 2
        rows.append(row)
    assert {r["method"] for r in rows} >= {"gd", "per-task backward", "ours phase 2"}
    step_table.derive(rows)
    ours = next(r for r in rows if r["method"] == "ours phase 2")
    assert ours["buffer_bytes"] == 3 * ours["N"] * 4
    assert 0 < ours["share"] < 1 and ours["floor_ms"] > 0 and ours["coverage"] == 1.0
    assert next(r for r in rows if r["method"] == "per-task backward")["x_backward"] == 1.0
    table = step_table.markdown(rows)
    assert table.count("\n") == len(rows) + 1 and "ours phase 2" in table
    assert "Phase 2 share" in step_table.verdicts(rows)[0]


def spread_task_norms(model: torch.nn.Module) -> None:
    """Per-task gammas and variances apart (they start equal: the priority would be uniform)."""
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, ck.TaskNorm):
                for norm in m.values():
                    norm.weight.copy_(torch.rand(norm.weight.shape, generator=gen) + 0.5)
                    norm.running_var.copy_(torch.rand(norm.running_var.shape, generator=gen) + 0.5)


def test_ours_and_the_authors_style_step_make_the_same_update() -> None:
    """Both start from the same weights and batch (built from the seed); after one step
    every parameter must agree: the timed authors'-style step computes the same Phase 2."""
    device = torch.device("cpu")
    params = {}
    for method in ("ours phase 2", "authors' phase 2", "per-task backward"):
        setup = step_table.make_step(method, tiny_args(method), device)
        spread_task_norms(setup.model)
        setup.step()
        params[method] = [p.detach().clone() for p in setup.model.parameters()]
    for a, b in zip(params["ours phase 2"], params["authors' phase 2"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # ... and the projection acted: the plain sum moves the shared weights elsewhere.
    differs = [
        not torch.allclose(a, b, rtol=1e-5, atol=1e-6)
        for a, b in zip(params["ours phase 2"], params["per-task backward"], strict=True)
    ]
    assert any(differs)


@pytest.mark.parametrize("bad", [["--task-counts", "6"], ["--task-counts", "1"]])
def test_bad_task_counts(bad: list[str]) -> None:
    with pytest.raises(SystemExit):
        step_table.parse_args(bad)
