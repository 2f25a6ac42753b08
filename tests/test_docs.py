"""The documentation: the ``python`` examples of every page under docs/ run as written
(``py`` blocks are shown, not run: they need libraries that are not installed everywhere,
such as torchvision);
every page is in the site's navigation; the API reference names every public name; the
benchmark plots are drawn from the committed JSON; no internal issue numbers.

``make docs`` builds the site itself with warnings as errors (broken links and anchors,
pages left out of the navigation, a public name missing from the reference)."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.rglob("*.md"))
BLOCKS = [
    (page.relative_to(DOCS).as_posix(), i, code)
    for page in PAGES
    for i, code in enumerate(re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S))
]
# Pages whose examples need an optional package (left out where it is not installed).
PAGE_NEEDS = {"torchjd.md": "torchjd"}


def _load(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


hooks = _load("cs_kernels_docs_hooks_under_test", ROOT / "tools" / "docs_hooks.py")


def test_docs_have_examples() -> None:
    pages = {name for name, _, _ in BLOCKS}
    assert {"bring-your-own-model.md", "index.md", "torchjd.md", "distributed.md"} <= pages


def test_docs_do_not_point_outside_the_repository_or_to_issues() -> None:
    for page in PAGES:
        text = page.read_text()
        assert "../shared" not in text, page.name
        assert not re.search(r"\bissues?\s*#?\d+", text, flags=re.I), page.name


@pytest.mark.parametrize(("page", "index", "code"), BLOCKS, ids=[f"{p}[{i}]" for p, i, _ in BLOCKS])
def test_docs_example_runs(page: str, index: int, code: str) -> None:
    needed = PAGE_NEEDS.get(page)
    if needed is not None:
        pytest.importorskip(needed)
    exec(compile(code, f"docs/{page}[python block {index}]", "exec"), {})


def test_every_page_is_in_the_navigation() -> None:
    config = (ROOT / "mkdocs.yml").read_text()
    nav = config[config.index("\nnav:") : config.index("\nvalidation:")]
    listed = set(re.findall(r"^\s*- (?:[^:\n]+: )?([\w./-]+\.md)\s*$", nav, flags=re.M))
    pages = {p.relative_to(DOCS).as_posix() for p in PAGES}
    assert pages - listed == set(), f"pages missing from the mkdocs.yml nav: {pages - listed}"
    assert listed - pages == set(), f"nav entries without a page: {listed - pages}"


def test_api_reference_names_every_public_name() -> None:
    import cs_kernels
    import cs_kernels.integrations.torchjd as torchjd_integration

    names = hooks.public_names()
    # The hook reads __all__ from the sources; they agree with the imported modules.
    expected = [f"cs_kernels.{n}" for n in cs_kernels.__all__] + [
        f"cs_kernels.integrations.torchjd.{n}"
        for n in torchjd_integration.__all__
        if f"cs_kernels.integrations.torchjd.{n}" not in hooks.NOT_IN_REFERENCE
    ]
    assert names == expected
    api = (DOCS / "api.md").read_text()
    assert hooks.missing_from_reference(api) == []
    # ... and the check can fail: drop one entry.
    dropped = api.replace("::: cs_kernels.channel_gram\n", "")
    assert hooks.missing_from_reference(dropped) == ["cs_kernels.channel_gram"]


def test_benchmark_plots_are_drawn_from_the_committed_results(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    plots = _load("cs_kernels_benchmark_plots_under_test", ROOT / "benchmarks" / "plots.py")
    written = plots.main(["--out", str(tmp_path)])
    assert [p.name for p in written] == ["phase2-vs-floor.png", "training-step.png"]
    for path in written:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
        committed = DOCS / "img" / path.name
        assert committed.is_file(), f"run `python benchmarks/plots.py` and commit {committed}"
