"""Set up `.venv` for cs_kernels on a fresh machine, or reuse what is already there.

Steps (each one is skipped when already satisfied, so the set-up also succeeds offline):
1. create the virtual environment with ``--system-site-packages`` (an installed torch is reused);
2. install torch only if none imports (``torch==2.13.0``, the CPU wheel on this machine's disk);
3. install the missing packages of ``requirements-dev.txt``;
4. build and install the package with its C++ extension (editable, no build isolation).

Run with the system Python: ``python3 tools/bootstrap.py --venv .venv``. Under ``CI=true`` every
step is mandatory; elsewhere a development tool that cannot be installed (offline machine) is
reported and skipped.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TORCH_PIN = "torch==2.13.0"
# Needed for the tests to run at all; the rest (linters, ninja, ...) may be skipped offline.
REQUIRED = {"pytest", "hypothesis", "numpy"}


def log(message: str) -> None:
    print(f"[bootstrap] {message}", flush=True)


def run(cmd: list[str], check: bool = True) -> int:
    log("$ " + " ".join(cmd))
    return subprocess.run(cmd, cwd=ROOT, check=check).returncode


def venv_python(venv_dir: Path) -> Path:
    return venv_dir / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def probe(python: Path, code: str) -> bool:
    result = subprocess.run([str(python), "-c", code], cwd="/", capture_output=True)
    return result.returncode == 0


def missing_requirements(python: Path) -> list[str]:
    lines = (ROOT / "requirements-dev.txt").read_text().splitlines()
    names = [line.split("#")[0].strip() for line in lines]
    missing = []
    for name in filter(None, names):
        code = f"import importlib.metadata as m; m.version({name!r})"
        if not probe(python, code):
            missing.append(name)
    return missing


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--venv", default=".venv")
    args = parser.parse_args()
    strict = os.environ.get("CI", "").lower() == "true"

    venv_dir = (ROOT / args.venv).resolve()
    python = venv_python(venv_dir)
    if not python.exists():
        log(f"creating {venv_dir} (with system site-packages)")
        venv.EnvBuilder(system_site_packages=True, with_pip=True).create(venv_dir)

    if probe(python, "import torch"):
        version = subprocess.run(
            [str(python), "-c", "import torch; print(torch.__version__)"],
            capture_output=True,
            text=True,
            cwd="/",
        ).stdout.strip()
        log(f"reusing the installed torch {version}")
    else:
        run([str(python), "-m", "pip", "install", TORCH_PIN])

    missing = missing_requirements(python)
    # Few retries and a short timeout: an offline machine should fail fast, then skip.
    pip_install = [str(python), "-m", "pip", "install", "--retries", "1", "--timeout", "30"]
    if missing and run([*pip_install, *missing], check=False) != 0:
        still = missing_requirements(python)
        fatal = [name for name in still if strict or name in REQUIRED]
        if fatal:
            log(f"could not install {fatal}")
            return 1
        log(f"offline? skipped optional tools {still}; their checks will say so")

    build = [str(python), "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-e", "."]
    if run(build, check=False) != 0:
        log("building the C++ extension failed: the cpu backend will be unavailable")
        return 1
    log("ready")
    return 0


if __name__ == "__main__":
    sys.exit(main())
