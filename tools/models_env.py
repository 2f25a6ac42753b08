"""The second environments that import torchvision and timm, and the real-model tests in one.

The development `.venv` holds torch 2.13's CPU build, beside which PyPI's torchvision does not
import (its C++ operators need the CUDA build of torch). Two environments hold a CUDA build of
torch instead, which runs on the CPU (`EnvSpec`):

* ``NEWEST`` (``.venv-models``): the newest torch and torchvision pip takes here (torch
  2.14.1 and torchvision 0.29.1, from this machine's disk on Python 3.11), with timm: the
  real-model tests (``make test-models``) on the newest versions;
* ``TWIN`` (``.venv-gpu-twin``): the GPU machines' versions, Python 3.12 with torch
  2.11.0+cu130, triton 3.6.0, torchvision 0.26.0, timm and the tools of the GPU run (not
  torchjd, which they lack): the rehearsal of the GPU run (`tools/gpu_rehearsal.py`).

Each is made on first use (about 5 GB and one to a few minutes) and remade when its pinned
versions change. This script, for the real-model tests:

1. uses the main interpreter (``--main``, the `.venv` python) when it already imports
   torchvision and timm (the GPU machines);
2. otherwise makes the environment (``--env newest`` by default, or ``twin``; ``--venv``
   overrides its folder). The compiled ``cs_kernels._C`` is built for the main torch and is
   not loaded there (``CS_KERNELS_NO_EXTENSION=1``): the package runs on its pure-PyTorch
   backends;
3. runs ``pytest tests/test_real_models.py`` with ``CS_KERNELS_REQUIRE_MODELS=1``, so a model
   library that does not import is a failure, not a skip.

Under ``CI=true`` a failed set-up is an error; elsewhere (an offline machine) it is reported
and the tests are not run (exit code 0).

    python3 tools/models_env.py --main .venv/bin/python            # set up and test
    python3 tools/models_env.py --setup-only --env twin             # only the GPU twin
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
IMPORTS = "import torch, torchvision, timm, pytest, hypothesis"
TESTS = ["tests/test_real_models.py"]


@dataclass(frozen=True)
class EnvSpec:
    """An environment with a CUDA build of torch (run on the CPU), torchvision and timm."""

    venv: str  # its folder under the repository root
    pins: tuple[str, ...]  # name==version: checked, and the environment remade when they differ
    tools: tuple[str, ...]  # unpinned
    python: str | None = None  # its base Python (found on the PATH or by pyenv), else this one
    imports: str = IMPORTS

    def check_code(self) -> str:
        """Python that imports everything and asserts the pinned versions."""
        asserts = [
            f"assert m.version({name!r}).split('+')[0] == {version!r}, {name!r}"
            for name, version in (pin.split("==") for pin in self.pins)
        ]
        return "; ".join([self.imports, "import importlib.metadata as m", *asserts])


NEWEST = EnvSpec(
    ".venv-models",
    ("torch==2.14.1", "torchvision==0.29.1", "timm==1.0.31"),
    ("pytest", "hypothesis", "numpy"),
)
# The GPU machines' versions (the device tool's KINDS.md: Python 3.12.3, torch 2.11.0+cu130,
# triton 3.6.0, torchvision 0.26.0, numpy 2); what `tools/gpu_check.py` needs; the programs'
# packages that they have.
TWIN = EnvSpec(
    ".venv-gpu-twin",
    ("torch==2.11.0", "torchvision==0.26.0", "triton==3.6.0", "timm==1.0.31"),
    (
        "pytest",
        "hypothesis",
        "pytest-benchmark",
        "ninja",
        "pybind11",
        "setuptools",
        "wheel",
        "numpy>=2",
        "tqdm",
        "matplotlib",
        "scikit-learn",
    ),
    python="python3.12",
    imports=IMPORTS + ", triton, ninja, pybind11",
)
SPECS = {"newest": NEWEST, "twin": TWIN}


def log(message: str) -> None:
    print(f"[models_env] {message}", flush=True)


def imports(python: Path, code: str = IMPORTS) -> bool:
    """Whether ``python`` runs ``code`` (by default: the model libraries and test tools import)."""
    if not python.exists():
        return False
    result = subprocess.run([str(python), "-c", code], cwd="/", capture_output=True)
    return result.returncode == 0


def ready(venv_dir: Path, spec: EnvSpec) -> bool:
    """Whether ``venv_dir`` holds ``spec``'s packages at its pinned versions."""
    return imports(venv_dir.absolute() / "bin" / "python", spec.check_code())


def base_python(name: str | None) -> str:
    """``name`` (e.g. ``python3.12``) where one runs here, on the PATH or installed by pyenv
    but not selected; else this interpreter (said so when ``name`` was asked for)."""
    if name is None:
        return sys.executable
    pyenv = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    version = name.removeprefix("python")
    candidates = [shutil.which(name), *sorted(map(str, pyenv.glob(f"{version}*/bin/{name}")))]
    for found in filter(None, candidates):
        if subprocess.run([found, "-c", "import venv"], capture_output=True).returncode == 0:
            return found
    log(f"{name} not found: using {sys.executable} (Python {sys.version.split()[0]})")
    return sys.executable


def create(venv_dir: Path, spec: EnvSpec) -> bool:
    """Create (or bring up to date) ``venv_dir`` with ``spec``; True when it is ready after."""
    python = venv_dir / "bin" / "python"
    if not python.exists():
        log(f"creating {venv_dir}")
        if subprocess.run([base_python(spec.python), "-m", "venv", str(venv_dir)]).returncode:
            return False
    start = time.perf_counter()
    cmd = [str(python), "-m", "pip", "install", "-q", *spec.pins, *spec.tools]
    log("$ " + " ".join(cmd))
    code = subprocess.run(cmd, cwd=ROOT).returncode
    log(f"pip finished with code {code} in {time.perf_counter() - start:.0f} s")
    return code == 0 and ready(venv_dir, spec)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--main", default=".venv/bin/python", help="the development python")
    parser.add_argument("--env", choices=list(SPECS), default="newest", help="which environment")
    parser.add_argument("--venv", help="its folder (default: .venv-models or .venv-gpu-twin)")
    parser.add_argument("--setup-only", action="store_true", help="do not run the tests")
    parser.add_argument("pytest_args", nargs="*", help="extra arguments for pytest")
    args = parser.parse_args()
    strict = os.environ.get("CI", "").lower() == "true"
    spec = SPECS[args.env]

    main_python = (ROOT / args.main).absolute()
    venv_dir = (ROOT / (args.venv or spec.venv)).resolve()
    env = dict(os.environ)
    if imports(main_python):
        python = main_python
        log(f"{main_python} imports torchvision and timm: using it")
    else:
        python = venv_dir / "bin" / "python"
        if not ready(venv_dir, spec) and not create(venv_dir, spec):
            message = f"could not set up {venv_dir} with {' '.join(spec.pins)}"
            if strict:
                log(f"error: {message}")
                return 1
            log(f"{message}: the real-model tests did not run (offline machine?)")
            return 0
        # The extension in cs_kernels/ is built against the main torch: leave it unloaded.
        env["CS_KERNELS_NO_EXTENSION"] = "1"
    if args.setup_only:
        return 0
    env["CS_KERNELS_REQUIRE_MODELS"] = "1"
    cmd = [str(python), "-m", "pytest", "-q", *TESTS, *args.pytest_args]
    log("$ " + " ".join(cmd))
    return subprocess.run(cmd, cwd=ROOT, env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
