"""Rehearse the GPU run (`make gpu-check`) on this machine, in the GPU machines' twin.

A GPU session is short (about 15 minutes, start-up included), so what can fail before the
first kernel launch should fail here: the CUDA build against the GPU machines' torch, an API
their torch 2.11 or Python 3.12 lacks, a stage's own plumbing. ``make gpu-rehearsal``:

1. makes the twin, ``.venv-gpu-twin`` (`models_env.TWIN`: Python 3.12, torch 2.11.0+cu130,
   triton 3.6.0, torchvision 0.26.0, timm; once, about 4.8 GB);
2. copies the working tree (git's tracked and untracked, not ignored files) into
   ``build/gpu-rehearsal/tree``, so that the CUDA build and the benchmark files there leave
   the working tree alone;
3. runs ``tools/gpu_check.py --rehearse`` there with the twin's python: the CUDA build for
   sm_90 and the AOT compile for it, the whole suite on the CPU with that build (the real
   models required), the benchmark table and its ``torch.compile`` run at the CPU's quick
   sizes, the demo on the CPU. Logs and ``summary.json`` go to ``--results``
   (``gpu-rehearsal-results/``).

Under ``CI=true`` a twin that cannot be made is an error; elsewhere (offline) the rehearsal
is skipped with a message (exit status 0). Extra arguments go to ``gpu_check.py``, e.g.
``--only tests``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

import models_env

ROOT = Path(__file__).resolve().parent.parent
COPY = ROOT / "build" / "gpu-rehearsal" / "tree"
# Left out of the copy when the tree is not a git checkout.
NOT_COPIED = (
    *(".git", ".venv*", "build", "*-results", "__pycache__", "*.so", "*.egg-info"),
    *(".pytest_cache", ".mypy_cache", ".ruff_cache", ".hypothesis", ".benchmarks"),
)


def log(message: str) -> None:
    print(f"[gpu-rehearsal] {message}", flush=True)


def tree_files(root: Path) -> list[Path] | None:
    """The working tree's files as git sees them (tracked, and untracked but not ignored),
    or None outside a git checkout."""
    result = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=root, capture_output=True)  # fmt: skip
    if result.returncode != 0:
        return None
    names = [name for name in result.stdout.decode().split("\0") if name]
    return [Path(name) for name in names if (root / name).is_file()]


def copy_tree(root: Path, dest: Path) -> int:
    """Copy the working tree of ``root`` into a fresh ``dest``; returns the files copied."""
    if dest.exists():
        shutil.rmtree(dest)
    files = tree_files(root)
    if files is None:
        shutil.copytree(root, dest, ignore=shutil.ignore_patterns(*NOT_COPIED))
        return sum(1 for path in dest.rglob("*") if path.is_file())
    for name in files:
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / name, target)
    return len(files)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--venv", default=models_env.TWIN.venv, help="the twin's folder")
    parser.add_argument("--results", type=Path, default=ROOT / "gpu-rehearsal-results")
    args, passed = parser.parse_known_args(argv)
    strict = os.environ.get("CI", "").lower() == "true"

    venv_dir = (ROOT / args.venv).resolve()
    twin = models_env.TWIN
    if not models_env.ready(venv_dir, twin) and not models_env.create(venv_dir, twin):
        message = f"could not set up {venv_dir} with {' '.join(twin.pins)}"
        if strict:
            log(f"error (CI=true): {message}")
            return 1
        log(f"{message}: the rehearsal did not run (offline machine?)")
        return 0
    count = copy_tree(ROOT, COPY)
    log(f"copied {count} files into {COPY}")
    python = venv_dir / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CS_KERNELS_")}
    cmd = [str(python), "tools/gpu_check.py", "--rehearse",
           "--results", str(args.results.resolve()), *passed]  # fmt: skip
    log("$ " + " ".join(cmd))
    return subprocess.run(cmd, cwd=COPY, env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
