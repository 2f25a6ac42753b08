"""Run the real-model tests (torchvision and timm backbones) in an interpreter that imports both.

The development `.venv` holds torch 2.13's CPU build, beside which PyPI's torchvision does not
import (its C++ operators need the CUDA build of torch). So this script:

1. uses the main interpreter (``--main``, the `.venv` python) when it already imports
   torchvision and timm (the GPU machines: torch 2.11 + torchvision 0.26 + timm);
2. otherwise creates a second virtual environment (``--venv``, default ``.venv-models``) with a
   CUDA build of torch that also runs on the CPU, a matching torchvision, timm and the test
   tools (about 5.5 GB; pip on Python 3.11 takes torch and torchvision from this machine's
   disk). The compiled ``cs_kernels._C`` is built for the main torch and is not loaded there
   (``CS_KERNELS_NO_EXTENSION=1``): the package runs on its pure-PyTorch backends;
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
import subprocess
import sys
import time
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# A CUDA build of torch with its torchvision (both run on the CPU); timm for its models.
MODEL_PACKAGES = ["torch==2.14.1", "torchvision==0.29.1", "timm==1.0.31"]
TEST_PACKAGES = ["pytest", "hypothesis", "numpy"]
IMPORTS = "import torch, torchvision, timm, pytest, hypothesis"
TESTS = ["tests/test_real_models.py"]


def log(message: str) -> None:
    print(f"[models_env] {message}", flush=True)


def imports(python: Path) -> bool:
    if not python.exists():
        return False
    result = subprocess.run([str(python), "-c", IMPORTS], cwd="/", capture_output=True)
    return result.returncode == 0


def create(venv_dir: Path) -> bool:
    """Create ``venv_dir`` with the model libraries; True when they import afterwards."""
    python = venv_dir / "bin" / "python"
    if not python.exists():
        log(f"creating {venv_dir}")
        venv.EnvBuilder(with_pip=True).create(venv_dir)
    start = time.perf_counter()
    cmd = [str(python), "-m", "pip", "install", "-q", *MODEL_PACKAGES, *TEST_PACKAGES]
    log("$ " + " ".join(cmd))
    code = subprocess.run(cmd, cwd=ROOT).returncode
    log(f"pip finished with code {code} in {time.perf_counter() - start:.0f} s")
    return code == 0 and imports(python)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--main", default=".venv/bin/python", help="the development python")
    parser.add_argument("--venv", default=".venv-models", help="the second environment")
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
        if not imports(python) and not create(venv_dir):
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
