"""The README: its Python examples run as written, it stays a front page (at most 250 lines,
no internal issue numbers), and every relative link in it points to a file that exists."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
TEXT = README.read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", TEXT, flags=re.S)
MAX_LINES = 250


def test_readme_has_examples() -> None:
    assert BLOCKS


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index: int) -> None:
    exec(compile(BLOCKS[index], f"README.md[python block {index}]", "exec"), {})


def test_readme_is_a_front_page() -> None:
    lines = TEXT.count("\n")
    assert lines <= MAX_LINES, f"README.md has {lines} lines; move detail into docs/"
    assert not re.search(r"\bissues?\s*#?\d+", TEXT, flags=re.I), "no internal issue numbers"
    assert "../shared" not in TEXT
    first_block = re.search(r"```sh\n(.*?)```", TEXT, flags=re.S)
    assert first_block is not None and TEXT.index(first_block.group(0)) < TEXT.index("\n## ")
    commands = [line.split("#")[0].strip() for line in first_block.group(1).splitlines()]
    assert [c for c in commands if c] == ["make demo", "make test"]


def test_readme_links_resolve() -> None:
    prose = re.sub(r"`[^`\n]*`", "", re.sub(r"```.*?```", "", TEXT, flags=re.S))
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", prose)
    local = [t for t in targets if not re.match(r"[a-z]+://", t)]
    assert local, "the README links into the docs"
    missing = [t for t in local if not (ROOT / t).is_file()]
    assert not missing, missing
