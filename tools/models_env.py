"""The GPU machines' twin (``.venv-gpu-twin``), and the real-model tests (torchvision, timm) in it.

The development `.venv` holds torch 2.13's CPU build, beside which PyPI's torchvision does not
import (its C++ operators need the CUDA build of torch). The GPU machines run Python 3.12 with
torch 2.11.0+cu130, triton 3.6.0, torchvision 0.26.0, timm and numpy 2. The twin is an
environment with those versions (`TWIN_PACKAGES`, on ``python3.12`` where one is found): PyPI's
torch 2.11.0 is that CUDA 13.0 build, and it runs on the CPU. It serves the real-model tests
and the rehearsal of the GPU run (`tools/gpu_rehearsal.py`, ``make gpu-rehearsal``). This script:

1. uses the main interpreter (``--main``, the `.venv` python) when it already imports
   torchvision and timm (the GPU machines);
2. otherwise creates the twin (``--venv``, default ``.venv-gpu-twin``; about 4.8 GB and a
   minute). The compiled ``cs_kernels._C`` in the tree is built for the main torch and is not
   loaded there (``CS_KERNELS_NO_EXTENSION=1``): the package runs on its pure-PyTorch backends
   (the rehearsal builds its own, in a copy of the tree);
3. runs ``pytest tests/test_real_models.py`` with ``CS_KERNELS_REQUIRE_MODELS=1``, so a model
   library that does not import is a failure, not a skip.

Every step is skipped when already satisfied. Under ``CI=true`` a failed set-up is an error;
elsewhere (an offline machine) it is reported and the tests are not run (exit code 0).

    python3 tools/models_env.py --main .venv/bin/python            # set up and test
    python3 tools/models_env.py --setup-only                        # only the environment
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TWIN_VENV = ".venv-gpu-twin"
TWIN_PYTHON = "python3.12"  # the GPU machines' Python (3.12.3)
# The GPU machines' versions (the device tool's KINDS.md): torch's CUDA 13.0 build from PyPI,
# its torchvision and triton, timm for its models.
MODEL_PACKAGES = ["torch==2.11.0", "torchvision==0.26.0", "triton==3.6.0", "timm==1.0.31"]
# What the GPU run needs there (`tools/gpu_check.py`), and the programs' packages it has (not
# torchjd: the GPU machines lack it, so its test modules are left out, as there).
TEST_PACKAGES = ["pytest", "hypothesis", "pytest-benchmark", "ninja", "pybind11", "setuptools",
                 "wheel", "numpy>=2", "tqdm", "matplotlib", "scikit-learn"]  # fmt: skip
IMPORTS = "import torch, torchvision, timm, triton, pytest, hypothesis, ninja, pybind11"
# The twin also has the pinned versions (one made for older pins is brought up to date).
TWIN_IMPORTS = "; ".join([
    IMPORTS,
    "import importlib.metadata as m",
    *(f"assert m.version({name!r}).split('+')[0] == {version!r}, {name!r}"
      for name, version in (pin.split("==") for pin in MODEL_PACKAGES)),
])  # fmt: skip
TESTS = ["tests/test_real_models.py"]


def log(message: str) -> None:
    print(f"[models_env] {message}", flush=True)


def imports(python: Path, code: str = IMPORTS) -> bool:
    """Whether ``python`` runs ``code`` (the model libraries and test tools import)."""
    if not python.exists():
        return False
    result = subprocess.run([str(python), "-c", code], cwd="/", capture_output=True)
    return result.returncode == 0


def twin_ready(venv_dir: Path) -> bool:
    """Whether ``venv_dir`` is a twin with the pinned versions."""
    return imports(venv_dir.absolute() / "bin" / "python", TWIN_IMPORTS)


def base_python() -> str:
    """``python3.12`` where one runs here (on the PATH, or installed by pyenv but not selected),
    else this interpreter (said so)."""
    pyenv = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    candidates = [
        shutil.which(TWIN_PYTHON),
        *sorted(map(str, pyenv.glob(f"3.12*/bin/{TWIN_PYTHON}"))),
    ]
    for found in filter(None, candidates):
        if subprocess.run([found, "-c", "import venv"], capture_output=True).returncode == 0:
            return found
    log(
        f"{TWIN_PYTHON} not found: the twin uses {sys.executable} (Python {sys.version.split()[0]})"
    )
    return sys.executable


def create(venv_dir: Path) -> bool:
    """Create ``venv_dir`` with the model libraries; True when they import afterwards."""
    python = venv_dir / "bin" / "python"
    if not python.exists():
        log(f"creating {venv_dir}")
        if subprocess.run([base_python(), "-m", "venv", str(venv_dir)]).returncode != 0:
            return False
    start = time.perf_counter()
    cmd = [str(python), "-m", "pip", "install", "-q", *MODEL_PACKAGES, *TEST_PACKAGES]
    log("$ " + " ".join(cmd))
    code = subprocess.run(cmd, cwd=ROOT).returncode
    log(f"pip finished with code {code} in {time.perf_counter() - start:.0f} s")
    return code == 0 and twin_ready(venv_dir)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--main", default=".venv/bin/python", help="the development python")
    parser.add_argument("--venv", default=TWIN_VENV, help="the second environment")
    parser.add_argument("--setup-only", action="store_true", help="do not run the tests")
    parser.add_argument("pytest_args", nargs="*", help="extra arguments for pytest")
    args = parser.parse_args()
    strict = os.environ.get("CI", "").lower() == "true"

    main_python = (ROOT / args.main).absolute()
    venv_dir = (ROOT / args.venv).resolve()
    env = dict(os.environ)
    if imports(main_python):
        python = main_python
        log(f"{main_python} imports torchvision and timm: using it")
    else:
        python = venv_dir / "bin" / "python"
        if not twin_ready(venv_dir) and not create(venv_dir):
            message = f"could not set up {venv_dir} with {' '.join(MODEL_PACKAGES)}"
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
