"""Static checks run by `make test`: ruff (lint + format check) and mypy over the package.

A tool that is not installed (an offline machine) is reported and skipped, except under
``CI=true`` where every check is mandatory.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHECKS = [
    ("ruff", ["-m", "ruff", "check", "."]),
    ("ruff", ["-m", "ruff", "format", "--check", "."]),
    ("mypy", ["-m", "mypy", "cs_kernels"]),
]


def main() -> int:
    strict = os.environ.get("CI", "").lower() == "true"
    failed = []
    for module, args in CHECKS:
        if importlib.util.find_spec(module) is None:
            if strict:
                failed.append(module)
            print(f"[static] {module} is not installed: skipped", flush=True)
            continue
        print(f"[static] {' '.join(args[1:])}", flush=True)
        if subprocess.run([sys.executable, *args], cwd=ROOT).returncode != 0:
            failed.append(" ".join(args[1:]))
    if failed:
        print(f"[static] failed: {failed}")
        return 1
    print("[static] clean")
    return 0


if __name__ == "__main__":
    sys.exit(main())
