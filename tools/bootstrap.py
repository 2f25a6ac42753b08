"""Set up `.venv` for cs_kernels on a fresh machine, or reuse what is already there.

Steps (each one is skipped when already satisfied, so the set-up also succeeds offline):
1. create the virtual environment with ``--system-site-packages`` (an installed torch is reused);
2. install torch only if none imports (``torch==2.13.0``, the CPU wheel on this machine's disk);
3. install the missing packages of ``requirements-dev.txt``;
4. build and install the package with its C++ extension (editable, no build isolation);
5. make ``.venv-triton36``, the GPU machines' triton toolchain (``triton==3.6.0``, numpy < 2.4)
   over the same torch: a virtual environment whose own site-packages holds only those two,
   and which sees ``.venv``'s packages (torch, the test tools, this package) through a ``.pth``
   file processed after its own. ``make test`` compiles every kernel configuration and runs
   the interpreter suites under it too. Nothing is reinstalled when it is already there.

Run with the system Python: ``python3 tools/bootstrap.py --venv .venv``. Under ``CI=true`` every
step is mandatory; elsewhere a development tool that cannot be installed (offline machine) is
reported and skipped, and so is the GPU toolchain environment (its tests then say so).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import site
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TORCH_PIN = "torch==2.13.0"
# Needed for the tests to run at all; the rest (linters, ninja, ...) may be skipped offline.
REQUIRED = {"pytest", "hypothesis", "numpy"}
# The GPU machines' toolchain (torch 2.11.0+cu130, triton 3.6.0): its triton, beside the
# newest one in `.venv`. numpy < 2.4: triton 3.6's interpreter needs it (see the tests).
GPU_TOOLCHAIN_VENV = ".venv-triton36"
GPU_TOOLCHAIN_TRITON = "3.6.0"
GPU_TOOLCHAIN_PINS = [f"triton=={GPU_TOOLCHAIN_TRITON}", "numpy<2.4"]
PARENT_PTH = "_cs_kernels_dev_env.pth"


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


def link_parent_environment(venv_dir: Path, python: Path) -> None:
    """Let ``.venv`` see the packages of the interpreter running this script.

    ``--system-site-packages`` exposes the *base* installation only. When this interpreter
    is itself a virtual environment holding torch (the GPU machines' ``python3`` is one),
    a ``.pth`` file in ``.venv`` adds that environment's site-packages after its own.
    """
    if sys.prefix == sys.base_prefix or Path(sys.prefix).resolve() == venv_dir:
        return
    if importlib.util.find_spec("torch") is None:
        return
    parents = [p for p in site.getsitepackages() if Path(p).is_dir()]
    (site_packages(python) / "_cs_kernels_parent_env.pth").write_text("\n".join(parents) + "\n")
    log(f"{sys.prefix} is a virtual environment with torch: .venv also sees {parents}")


def missing_requirements(python: Path) -> list[str]:
    lines = (ROOT / "requirements-dev.txt").read_text().splitlines()
    requirements = [line.split("#")[0].strip() for line in lines]
    missing = []
    for requirement in filter(None, requirements):
        name, _, pinned = requirement.partition("==")
        name = name.partition("[")[0]  # `pkg[extra]`: the distribution is `pkg`
        check = f"v = m.version({name!r})" + (f"; assert v == {pinned!r}" if pinned else "")
        if not probe(python, f"import importlib.metadata as m; {check}"):
            missing.append(requirement)
    return missing


def site_packages(python: Path) -> Path:
    code = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    result = subprocess.run([str(python), "-c", code], capture_output=True, text=True, cwd="/")
    return Path(result.stdout.strip())


def install_package(python: Path) -> bool:
    """Editable install with the C++ extension built in place.

    pip's editable install needs a setuptools that can build wheels (>= 70.1, or the
    `wheel` package). Where the environment has an older one and nothing can be fetched,
    build the extension in place and put the repository on the path with a ``.pth`` file:
    the same result, without pip's metadata.
    """
    pip = [str(python), "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-e", "."]
    if run(pip, check=False) == 0:
        return True
    log("pip could not install the package in editable mode; building in place instead")
    if run([str(python), "setup.py", "build_ext", "--inplace"], check=False) != 0:
        return False
    (site_packages(python) / "_cs_kernels_source.pth").write_text(f"{ROOT}\n")
    return True


def gpu_toolchain_python(root: Path | None = None) -> tuple[Path | None, str]:
    """The GPU toolchain environment's python, or None and why it is not usable. An
    interpreter that has triton 3.6.0 itself (the GPU machines' ``python3``) is its own."""
    python = venv_python((root or ROOT) / GPU_TOOLCHAIN_VENV)
    try:
        import importlib.metadata

        if importlib.metadata.version("triton") == GPU_TOOLCHAIN_TRITON and not python.exists():
            return Path(sys.executable), f"triton {GPU_TOOLCHAIN_TRITON} in {sys.executable}"
    except importlib.metadata.PackageNotFoundError:
        pass
    if not python.exists():
        return None, (
            f"{GPU_TOOLCHAIN_VENV} (triton {GPU_TOOLCHAIN_TRITON}) was not made: run `make setup` "
            "with access to the package registry"
        )
    code = ("import importlib.metadata as m, importlib.util as u; "
            "assert u.find_spec('torch'), 'no torch'; print(m.version('triton'))")  # fmt: skip
    result = subprocess.run([str(python), "-c", code], capture_output=True, text=True, cwd="/")
    found = result.stdout.strip()
    if result.returncode != 0 or found != GPU_TOOLCHAIN_TRITON:
        detail = found or result.stderr.strip().splitlines()[-1:]
        return None, f"{GPU_TOOLCHAIN_VENV} does not give triton {GPU_TOOLCHAIN_TRITON} ({detail})"
    return python, f"triton {GPU_TOOLCHAIN_TRITON} in {GPU_TOOLCHAIN_VENV}"


def make_gpu_toolchain(dev_python: Path, strict: bool) -> bool:
    """Step 5: the GPU machines' triton over ``.venv``'s torch. False only on a failure that
    must stop the set-up (under CI)."""
    target = ROOT / GPU_TOOLCHAIN_VENV
    python = venv_python(target)
    found, why = gpu_toolchain_python()
    if found is not None:
        log(f"the GPU machines' toolchain is there: {why}")
        return True
    if not python.exists():
        log(f"creating {target} (the GPU machines' triton {GPU_TOOLCHAIN_TRITON})")
        venv.EnvBuilder(system_site_packages=True, with_pip=False).create(target)
    # .pth files are read in name order after the directory itself is on sys.path: this one
    # appends .venv's site-packages (and runs its own .pth files) after triton 3.6 and numpy.
    dev_site = site_packages(dev_python)
    line = f"import site; site.addsitedir({str(dev_site)!r})\n"
    (site_packages(python) / PARENT_PTH).write_text(line)
    # .venv's pip installs into this environment (`--python`): no pip of its own needed.
    pip = [str(dev_python), "-m", "pip", "--python", str(python), "install", "--no-deps",
           "--retries", "1", "--timeout", "30", *GPU_TOOLCHAIN_PINS]  # fmt: skip
    if run(pip, check=False) == 0 and gpu_toolchain_python()[0] is not None:
        log(f"{GPU_TOOLCHAIN_VENV}: triton {GPU_TOOLCHAIN_TRITON} over .venv's torch")
        return True
    if strict:
        log(f"CI=true: could not make {GPU_TOOLCHAIN_VENV}: {gpu_toolchain_python()[1]}")
        return False
    log(f"offline? no triton {GPU_TOOLCHAIN_TRITON}: its checks will be skipped, saying so")
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--venv", default=".venv")
    parser.add_argument(
        "--no-gpu-toolchain", action="store_true", help=f"do not make {GPU_TOOLCHAIN_VENV}"
    )
    args = parser.parse_args()
    strict = os.environ.get("CI", "").lower() == "true"

    venv_dir = (ROOT / args.venv).resolve()
    python = venv_python(venv_dir)
    if not python.exists():
        log(f"creating {venv_dir} (with system site-packages)")
        venv.EnvBuilder(system_site_packages=True, with_pip=True).create(venv_dir)
    link_parent_environment(venv_dir, python)

    if probe(python, "import torch"):
        version = subprocess.run(
            [str(python), "-c", "import torch; print(torch.__version__)"],
            capture_output=True,
            text=True,
            cwd="/",
        ).stdout.strip()
        log(f"reusing the installed torch {version}")
    elif run([str(python), "-m", "pip", "install", TORCH_PIN], check=False) != 0:
        log(f"no torch imports and `pip install {TORCH_PIN}` failed: install torch first")
        return 1

    missing = missing_requirements(python)
    # Few retries and a short timeout: an offline machine should fail fast, then skip.
    pip_install = [str(python), "-m", "pip", "install", "--retries", "1", "--timeout", "30"]
    if missing and run([*pip_install, *missing], check=False) != 0:
        for requirement in missing:  # one by one: what can be had still gets installed
            run([*pip_install, requirement], check=False)
        still = missing_requirements(python)
        fatal = [r for r in still if strict or r.partition("==")[0] in REQUIRED]
        if fatal:
            log(f"could not install {fatal}")
            return 1
        log(f"offline? skipped optional tools {still}; their checks will say so")

    if not install_package(python):
        log("building the C++ extension failed: the cpu backend would be unavailable")
        return 1
    if not args.no_gpu_toolchain and not make_gpu_toolchain(python, strict):
        return 1
    log("ready")
    return 0


if __name__ == "__main__":
    sys.exit(main())
