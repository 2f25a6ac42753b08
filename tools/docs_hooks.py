"""MkDocs hook (``hooks:`` in mkdocs.yml): the API reference must hold every public name, and
figures kept elsewhere in the repository are served from the site (one copy in git).

A name in ``cs_kernels.__all__`` (or in an integration module's ``__all__``) without a
``::: cs_kernels.<name>`` entry in ``docs/api.md`` fails the build. The public names are read
from the sources with ``ast``, so the check imports neither torch nor the package.
``tests/test_docs.py`` runs the same check without MkDocs.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
API_PAGE = "api.md"
# module (dotted) -> its source file; each module's __all__ must be documented
PUBLIC_MODULES = {
    "cs_kernels": ROOT / "cs_kernels" / "__init__.py",
    "cs_kernels.integrations.torchjd": ROOT / "cs_kernels" / "integrations" / "torchjd.py",
}
# site path -> the repository file it serves (a figure the programs write, used by the docs)
OUTSIDE_FILES = {
    "img/scenes-predictions.png": ROOT / "python" / "results" / "scenes" / "predictions.png",
}
# Constants of those modules that are public but documented in prose, not in the reference.
NOT_IN_REFERENCE = {"cs_kernels.integrations.torchjd.INSTALL_HINT"}


def module_all(path: Path) -> list[str]:
    """The string entries of the module-level ``__all__`` list in ``path``."""
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets
        ):
            value = ast.literal_eval(node.value)
            return [str(v) for v in value]
    raise ValueError(f"{path} has no __all__")


def public_names() -> list[str]:
    """Every public name, dotted: ``cs_kernels.phase2``, ..."""
    names = [f"{m}.{n}" for m, path in PUBLIC_MODULES.items() for n in module_all(path)]
    return [n for n in names if n not in NOT_IN_REFERENCE]


def documented_names(markdown: str) -> set[str]:
    """The objects rendered by ``::: dotted.name`` lines."""
    return set(re.findall(r"^:::\s+([\w.]+)\s*$", markdown, flags=re.M))


def missing_from_reference(markdown: str) -> list[str]:
    documented = documented_names(markdown)
    return [n for n in public_names() if n not in documented]


def on_files(files: Any, config: Any) -> Any:
    from mkdocs.structure.files import File

    for uri, path in OUTSIDE_FILES.items():
        files.append(File.generated(config, uri, abs_src_path=str(path)))
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    if page.file.src_uri == API_PAGE:
        missing = missing_from_reference(markdown)
        if missing:
            from mkdocs.exceptions import PluginError

            raise PluginError(
                f"docs/{API_PAGE} has no entry for the public name(s) {missing}: add a "
                "'::: <name>' line for each"
            )
    return markdown
