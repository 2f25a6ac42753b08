"""The ``python`` examples of docs/*.md run as written (``py`` blocks are shown, not run: they
need libraries that are not installed everywhere, such as torchvision)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"
BLOCKS = [
    (page.name, i, code)
    for page in sorted(DOCS.glob("*.md"))
    for i, code in enumerate(re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S))
]


def test_docs_have_examples() -> None:
    assert any(name == "bring-your-own-model.md" for name, _, _ in BLOCKS)


def test_docs_do_not_point_outside_the_repository() -> None:
    for page in DOCS.glob("*.md"):
        assert "../shared" not in page.read_text(), page.name


@pytest.mark.parametrize(("page", "index", "code"), BLOCKS, ids=[f"{p}[{i}]" for p, i, _ in BLOCKS])
def test_docs_example_runs(page: str, index: int, code: str) -> None:
    exec(compile(code, f"docs/{page}[python block {index}]", "exec"), {})
