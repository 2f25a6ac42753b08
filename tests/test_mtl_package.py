"""python/mtl is a package without import circles, below the programs, with a dataset registry."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PYTHON = Path(__file__).resolve().parent.parent / "python"
sys.path.insert(0, str(PYTHON))

PROGRAMS = {p.stem for p in PYTHON.glob("*.py")}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PYTHON).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, at the top or inside functions (absolute names)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in (PYTHON / "mtl").rglob("*.py")}
    return {
        name: {m for m in _imports(path) if m in modules and m != name}
        for name, path in modules.items()
    }


def test_no_import_circles() -> None:
    graph = _graph()
    assert {"mtl.train", "mtl.benchmarks", "mtl.plots", "mtl.data.scenes"} <= set(graph)
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                pytest.fail("import circle: " + " -> ".join([*path, node, dep]))
            if dep not in state:
                visit(dep, [*path, node])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])


def test_the_circle_detector_sees_a_circle(tmp_path: Path) -> None:
    (tmp_path / "a.py").write_text("def f():\n    from b import g\n")
    (tmp_path / "b.py").write_text("import a\n")
    assert "b" in _imports(tmp_path / "a.py") and "a" in _imports(tmp_path / "b.py")


def test_the_package_never_imports_a_program() -> None:
    for path in (PYTHON / "mtl").rglob("*.py"):
        top = {m.split(".")[0] for m in _imports(path)}
        assert not top & PROGRAMS, f"{path.relative_to(PYTHON)} imports {top & PROGRAMS}"


def test_the_dataset_registry() -> None:
    from mtl.data import DATASETS, ON_DISK, SYNTHETIC, dataset_module

    assert set(DATASETS) == set(SYNTHETIC) | set(ON_DISK)
    assert dataset_module("multidigits").make_multidigits
    assert dataset_module("scenes").make_scenes
    for name, module in DATASETS.items():
        assert (PYTHON / Path(*module.split("."))).with_suffix(".py").parent.is_dir(), name
    with pytest.raises(ValueError, match="dataset must be one of"):
        dataset_module("mnist")
