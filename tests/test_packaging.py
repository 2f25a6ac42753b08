"""Packaging: the sdist builds, holds what a build needs, installs into a fresh virtual
environment and imports there; a build without torch stops with a message saying what to do.

Lean on purpose (2 CPU cores): the fresh environment reuses this interpreter's torch and
setuptools through a ``.pth`` file, and the install uses ``--no-build-isolation --no-deps``
with ``CS_KERNELS_EXTENSION=0`` (no compile). ``CS_KERNELS_TEST_SDIST_BUILD=1`` compiles the
extension from the sdist too (minutes).
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import tarfile
import venv
from pathlib import Path

import pytest

import cs_kernels

ROOT = Path(__file__).resolve().parent.parent


def _need(module: str) -> None:
    """Skip where a tool is missing (the GPU image); `make test` installs it, strictly
    under CI=true (tools/bootstrap.py)."""
    spec = importlib.util.find_spec(module)
    # A folder of that name in the checkout (e.g. setup.py's build/) is only a namespace
    # package: no origin, nothing to run.
    if spec is None or spec.origin is None:
        pytest.skip(f"{module} not installed (requirements-dev.txt lists it)")


def _run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{cmd} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout + done.stderr


@pytest.fixture(scope="module")
def sdist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    _need("build")
    out = tmp_path_factory.mktemp("dist")
    # Run from outside the checkout, whose build/ folder would shadow the build package.
    command = [sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", str(out)]
    _run([*command, str(ROOT)], out)
    (archive,) = out.glob("cs_kernels-*.tar.gz")
    return archive


def test_the_version_is_written_once() -> None:
    pattern = re.compile(r"""^\s*(__version__|version)\s*=\s*["'][0-9]""", re.M)
    holders = [
        str(p.relative_to(ROOT))
        for p in [ROOT / "setup.py", ROOT / "pyproject.toml", *ROOT.glob("cs_kernels/**/*.py")]
        if pattern.search(p.read_text())
    ]
    assert holders == ["cs_kernels/_version.py"], holders
    assert re.fullmatch(r"\d+\.\d+\.\d+", cs_kernels.__version__)


def test_sdist_holds_the_sources_and_the_metadata(sdist: Path) -> None:
    assert sdist.name == f"cs_kernels-{cs_kernels.__version__}.tar.gz"
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
        pkg_info = tar.extractfile(f"cs_kernels-{cs_kernels.__version__}/PKG-INFO")
        assert pkg_info is not None
        metadata = pkg_info.read().decode()
    sources = [p.relative_to(ROOT).as_posix() for p in (ROOT / "csrc").rglob("*") if p.is_file()]
    assert sources and not set(sources) - names, set(sources) - names
    for needed in ("setup.py", "pyproject.toml", "LICENSE", "README.md", "CHANGELOG.md"):
        assert needed in names
    assert "cs_kernels/_version.py" in names and "cs_kernels/py.typed" in names
    assert not any(n.startswith(("tests/", "docs/", "benchmarks/")) for n in names)
    assert not any(n.endswith(".so") for n in names)
    assert f"Version: {cs_kernels.__version__}" in metadata
    assert "License-Expression: MIT" in metadata
    for extra in ("triton", "train"):
        assert f"Provides-Extra: {extra}" in metadata
    for needed in (
        "tqdm",
        "matplotlib",
        "scikit-learn",
        "torchjd[cagrad,quadprog-projector]>=0.18",
    ):
        assert f'Requires-Dist: {needed}; extra == "train"' in metadata, needed


def _fresh_venv(path: Path) -> Path:
    """A venv that sees this interpreter's packages (torch, setuptools) after its own."""
    venv.EnvBuilder(with_pip=False).create(path)
    python = path / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    parents = [p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir()]
    (Path(purelib) / "_parent_env.pth").write_text("\n".join(parents) + "\n")
    return python


def _clean_env() -> dict[str, str]:
    """This environment without PYTHONPATH: the fresh venv must import its installed copy."""
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def _install(sdist: Path, python: Path, extension: bool, cwd: Path) -> str:
    env = {**_clean_env(), "CS_KERNELS_EXTENSION": "1" if extension else "0"}
    pip = [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-input"]
    return _run([*pip, "--no-build-isolation", "--no-deps", str(sdist)], cwd, env)


IMPORT_CHECK = """
import torch, cs_kernels as ck
assert "site-packages" in ck.__file__, ck.__file__
print(ck.__version__)
plan = ck.Phase2Plan.from_shapes([(4, 3), (5,)])
grads = torch.tensor([[1.0] * 12 + [2.0] * 5, [-1.0] * 12 + [3.0] * 5])
top = torch.zeros(4, dtype=torch.int64)
out = ck.phase2(grads, plan, top=top, backend="torch")
assert torch.equal(out, ck.phase2(grads, plan, top=top, backend="reference"))
print(sorted(ck.backend_status()))
"""


def test_sdist_installs_and_imports_in_a_fresh_venv(sdist: Path, tmp_path: Path) -> None:
    python = _fresh_venv(tmp_path / "venv")
    _install(sdist, python, extension=False, cwd=tmp_path)
    shown = _run([str(python), "-c", IMPORT_CHECK], tmp_path, _clean_env())
    assert shown.splitlines()[0] == cs_kernels.__version__


@pytest.mark.skipif(
    os.environ.get("CS_KERNELS_TEST_SDIST_BUILD") != "1",
    reason="compiles the extension from the sdist (minutes): CS_KERNELS_TEST_SDIST_BUILD=1",
)
def test_sdist_builds_the_extension_in_a_fresh_venv(sdist: Path, tmp_path: Path) -> None:
    python = _fresh_venv(tmp_path / "venv")
    _install(sdist, python, extension=True, cwd=tmp_path)
    code = (
        "import cs_kernels as ck; assert 'cpu' in ck.available_backends('cpu'), ck.backend_status()"
    )
    _run([str(python), "-c", code], tmp_path, _clean_env())


def test_a_build_without_torch_says_to_use_no_build_isolation(tmp_path: Path) -> None:
    """What ``pip install .`` meets in an isolated build environment: no torch."""
    (tmp_path / "torch.py").write_text("raise ImportError('no torch in this environment')\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, str(ROOT / "setup.py"), "bdist_wheel"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0
    assert "pip install --no-build-isolation ." in done.stderr, done.stderr[-2000:]


def test_setup_py_extension_setting_is_checked() -> None:
    spec = importlib.util.spec_from_file_location("cs_kernels_setup_packaging", ROOT / "setup.py")
    assert spec is not None and spec.loader is not None
    setup_py = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(setup_py)
    assert setup_py.extension_wanted({}) and setup_py.extension_wanted(
        {"CS_KERNELS_EXTENSION": "1"}
    )
    assert not setup_py.extension_wanted({"CS_KERNELS_EXTENSION": "0"})
    with pytest.raises(ValueError, match="CS_KERNELS_EXTENSION"):
        setup_py.extension_wanted({"CS_KERNELS_EXTENSION": "yes"})
    setup_py.check_setuptools("77.0.3")
    setup_py.check_setuptools("84.2.1")
    with pytest.raises(SystemExit, match=r'pip install "setuptools>=77"'):
        setup_py.check_setuptools("70.1.0")
    assert setup_py.needs_torch(["setup.py", "bdist_wheel"])
    assert not setup_py.needs_torch(["setup.py", "sdist"])
