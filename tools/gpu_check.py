"""The one prepared GPU run (`make gpu-check`): build, test, benchmark and train on a GPU.

For a machine with an NVIDIA GPU and no network whose ``python3`` already has torch (with
CUDA), triton, pytest, hypothesis, ninja and pybind11 (the GPU machines: H100/H200,
torch 2.11.0+cu130, triton 3.6.0). It installs nothing and never runs ``make setup``; it
uses the interpreter running it. Stages, in order, each timed against its budget:

1. ``build``: the C++/CUDA extension for the visible GPU's architecture only, in place, with
   every core (``MAX_JOBS``); then every triton kernel configuration compiled for that
   architecture in parallel (`cs_kernels.triton_kernels.aot`: the ahead-of-time check on
   the real toolchain; it fills triton's cache, which the AOT test reuses, as do the
   JIT launches of the later stages where their specialisation matches);
2. ``tests``: the whole suite with ``CS_KERNELS_TEST_DEVICE=cuda`` (parity, properties and
   bad input on CUDA; CUDA-graph capture and replay; no host sync under
   ``torch.cuda.set_sync_debug_mode("error")``; ``T * N > 2**31``), with the heuristic tile
   (``CS_KERNELS_TRITON_AUTOTUNE=0``) except in the autotuning test. Test modules whose
   packages are missing (e.g. torchjd offline) are left out, as the report header says;
3. ``bench``: the benchmark table (`benchmarks/phase2_table.py`: fp32 and bf16, T in
   {2, 3, 5, 10, 20}, ResNet-18, ResNet-50 and ResNet-50 x4 (93.8M), floor in the same run)
   saved as ``benchmarks/results/<device>-<date>.json``, then ``torch.compile`` of the
   ``torch`` backend at ResNet-50, T = 3, fp32 (``<device>-<date>-compiled.json``), then
   the Phase 2 steps of FSDP2 (`benchmarks/fsdp_phase2.py --steps-only`: every backend's
   ``channel_gram`` + ``apply_projection`` on one rank's rows of ResNet-50 x4 at W = 2,
   T = 3, beside the floor; figures in the log), then the half-size rows table
   (`benchmarks/memory_table.py`: the controller's memory with fp32, bf16 and fp16 rows at
   ResNet-50, T = 5, and Phase 2 on those rows against the floor over the same rows);
4. ``demo``: the training controller on the GPU (``python/demo.py --quick --device cuda``);
5. ``collect``: logs, the JSON files and a ``summary.json`` of the stages into ``--results``.

Usage (from the repository root)::

    python3 tools/gpu_check.py --results DIR              # everything
    python3 tools/gpu_check.py --results DIR --skip build  # a rerun: keep the built extension
    make gpu-check RESULTS=DIR GPU_CHECK_FLAGS="--skip build --skip demo"

Budget: 9 minutes of wall time on an H100/H200, build included (`STAGES`; how each figure
was estimated is written beside it). A stage past its budget is reported; a stage is
stopped only at its hard limit, and the whole run ends before ``--deadline`` seconds so a
10-minute session limit still gets the results. Without a GPU it stops at once (exit
status 2) with a message naming what is missing.

``--rehearse`` runs the same stages on a machine without a GPU, so that what can break
before the first kernel launch breaks here and not in a GPU session: the CUDA build for
``--arch`` (sm_90 by default) against this interpreter's torch, whose CUDA build it needs,
and the AOT compile for that architecture; the whole suite on the CPU with that build
(and the real torchvision/timm models required); the benchmark table and its
``torch.compile`` run at the CPU's quick sizes; the demo on the CPU. `tools/gpu_rehearsal.py`
(``make gpu-rehearsal``) runs it in a copy of the tree with the GPU machines' Python and
packages. Its timings are CPU timings: no budget applies, only the stage limits, times
``REHEARSAL_LIMIT_FACTOR``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH_RESULTS = ROOT / "benchmarks" / "results"
NEEDED = ("torch", "triton", "pytest", "hypothesis", "ninja", "pybind11")


@dataclass(frozen=True)
class Stage:
    name: str
    budget_s: int  # the planned wall time on an H100/H200
    limit_s: int  # stopped here (the run's deadline may stop it sooner)
    estimate: str  # how the budget was estimated


# Estimates from what the development machine (2 cores, no GPU) measures, scaled as written.
STAGES = (
    Stage(
        "build",
        90,
        240,
        "nvcc compiles csrc/cuda/phase2.cu for one architecture in about 45 s of one core "
        "here (99 s for sm_80 + sm_90 with --threads 2 under load), strength.cu in 10 s, "
        "steps.cu in 10-25 s for both; the "
        "five torch-including .cpp files take 20-60 s each and build in parallel beside it "
        "(MAX_JOBS = cores); then the 60 triton configurations of one architecture, "
        "1.4 CPU-s each, over 16 cores: about 10 s with the workers' start",
    ),
    Stage(
        "tests",
        180,
        300,
        "the suite is about 13 CPU-minutes here, 10 of them the two ahead-of-time compiles "
        "and the two interpreter children, which a GPU run skips (the interpreter, the "
        "triton 3.6 environment) or finds in triton's cache (the build stage compiled "
        "them); the other 3 are small, launch-bound calls, on CUDA also a few full-size "
        "ResNet-50 and 100M-element ones (milliseconds each) and triton's first-use "
        "compiles of the heuristic tiles (about 25 at 1.4 s)",
    ),
    Stage(
        "bench",
        210,
        300,
        "30 workloads (3 models x 5 T x 2 dtypes), about 10 timed cases each: 0.1 s of "
        "warm-up and 5 calls of at most a few ms (the floor at 100M, T = 20 moves 7.9 GB: "
        "about 2 ms at 4.3 TB/s) is about 0.2 s a case, 60 s in all; the authors' loop is "
        "timed by one call when it takes over 1 s (up to several s at T = 20, 100M): "
        "about 90 s; autotuning and graph capture about 20 s; then torch.compile of the "
        "torch backend for ResNet-50, T = 3, fp32, group mode: about 40 s; the FSDP2 steps "
        "at ResNet-50 x4 / 2 (47M elements, T = 3): 4 triton compiles (1.4 s each, or "
        "cached by the build stage) and 6 rounds of ms-long calls, about 10 s; the half-size "
        "rows table (ResNet-50, T = 5: three controllers, fp32/bf16/fp16 rows, 6 rounds of "
        "ms-long Phase 2 calls, triton's first-use compiles of the bf16/fp16 tiles): about "
        "15 s",
    ),
    Stage(
        "demo",
        45,
        120,
        "python/demo.py --quick takes about 20 s on 2 CPU cores here; on the GPU the "
        "training steps are launch-bound, plus triton's first-use compiles of its plan",
    ),
)
TOTAL_BUDGET_S = 540  # 9 minutes
DEADLINE_S = 570  # the whole run ends before this, results collected
REHEARSAL_LIMIT_FACTOR = 4  # the stage limits on 2 CPU cores instead of 16 and a GPU
REHEARSAL_DEADLINE_S = 3600
# On the CPU the interpreter child of the twin's triton 3.6 fails on numpy >= 2.4 (a triton
# 3.6 limitation, see tests/test_triton_interpreter.py); `make test` runs both interpreter
# suites in environments made for them, and on a GPU this module skips itself.
REHEARSAL_DESELECT = ("tests/test_triton_interpreter.py",)


@dataclass
class Outcome:
    name: str
    status: str  # ok, failed, skipped, timeout, over budget (ok but slow)
    seconds: float
    budget_s: int
    log: str | None = None
    note: str = ""
    files: list[str] = field(default_factory=list)


class MissingGpu(Exception):
    """What this machine lacks for the check, in words."""


def toolchain(missing: Sequence[str]) -> dict[str, str]:
    """This interpreter's versions (torch and triton must import)."""
    if missing:
        raise MissingGpu(f"{sys.executable} lacks {', '.join(missing)} (no network here?)")
    import torch
    import triton

    return {
        "torch": torch.__version__,
        "torch_cuda": str(torch.version.cuda),
        "triton": triton.__version__,
        "python": platform.python_version(),
        "executable": sys.executable,
        "cores": str(len(os.sched_getaffinity(0))),
    }


def rehearsal_preflight(arch: str) -> dict[str, str]:
    """`preflight` for ``--rehearse``: no GPU needed, but a CUDA build of torch (to build
    the CUDA kernels for sm_``arch``) and the same packages."""
    missing = [name for name in NEEDED if importlib.util.find_spec(name) is None]
    if "torch" in missing:
        raise MissingGpu(f"{sys.executable} has no torch: install torch with CUDA first")
    import torch

    if torch.version.cuda is None:
        raise MissingGpu(
            f"torch {torch.__version__} is a CPU-only build: the rehearsal builds the CUDA "
            "kernels, so it needs a CUDA build of torch (it runs on the CPU)"
        )
    if not (arch.isdigit() and len(arch) >= 2):
        raise MissingGpu(f"--arch must be like 90 (sm_90), got {arch!r}")
    return {
        "device": f"CPU rehearsal, no GPU ({platform.processor() or platform.machine()})",
        "capability": f"{arch[:-1]}.{arch[-1]}",
        "arch": arch,
        **toolchain(missing),
    }


def preflight() -> dict[str, str]:
    """The device and toolchain, or `MissingGpu` naming what is missing (no traceback)."""
    missing = [name for name in NEEDED if importlib.util.find_spec(name) is None]
    if "torch" in missing:
        raise MissingGpu(f"{sys.executable} has no torch: install torch with CUDA first")
    import torch

    if not torch.cuda.is_available():
        build = torch.version.cuda
        why = (
            f"torch {torch.__version__} is a CPU-only build (torch.version.cuda is None)"
            if build is None
            else f"torch {torch.__version__} (CUDA {build}) sees no GPU"
        )
        smi = shutil.which("nvidia-smi")
        raise MissingGpu(
            f"no CUDA GPU: {why}; nvidia-smi {'is at ' + smi if smi else 'is not installed'}. "
            "make gpu-check needs an NVIDIA GPU."
        )
    versions = toolchain(missing)
    major, minor = torch.cuda.get_device_capability(0)
    return {
        "device": torch.cuda.get_device_name(0),
        "capability": f"{major}.{minor}",
        "arch": f"{major}{minor}",
        **versions,
    }


def run_logged(
    commands: Sequence[Sequence[str]], log: Path, env: dict[str, str], timeout: float
) -> tuple[int | None, float]:
    """Run ``commands`` one after another, output to the terminal and ``log``. Returns the
    first non-zero exit status (None when stopped at ``timeout``) and the seconds taken."""
    start = time.monotonic()
    with log.open("w") as out:
        for command in commands:
            out.write(f"$ {' '.join(command)}\n")
            out.flush()
            left = max(timeout - (time.monotonic() - start), 1.0)
            proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True, bufsize=1)  # fmt: skip
            watchdog = threading.Timer(left, proc.kill)  # also stops a silent hang
            watchdog.start()
            assert proc.stdout is not None
            for line in proc.stdout:
                out.write(line)
                sys.stdout.write(line)
            status = proc.wait()
            watchdog.cancel()
            if time.monotonic() - start >= timeout:
                out.write(f"\n[gpu-check] stopped after {timeout:.0f} s\n")
                return None, time.monotonic() - start
            if status != 0:
                return status, time.monotonic() - start
    return 0, time.monotonic() - start


def base_env(info: dict[str, str]) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        PYTHONUNBUFFERED="1",
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
        CS_KERNELS_AOT_WORKERS=info["cores"],
        MAX_JOBS=info["cores"],
    )
    env.pop("CS_KERNELS_BACKEND", None)
    return env


def stage_commands(
    name: str, info: dict[str, str], work: Path, built: bool, rehearse: bool = False
) -> tuple[list[list[str]], dict[str, str]]:
    """The commands of one stage and their environment (``rehearse``: on the CPU)."""
    py = sys.executable
    env = base_env(info)
    device = "cpu" if rehearse else "cuda"
    if name == "build":
        env.update(CS_KERNELS_CUDA="1", TORCH_CUDA_ARCH_LIST=info["capability"])
        if rehearse:  # built with the CUDA kernels; the CPU ones run
            check = ("import cs_kernels as ck; from cs_kernels import _extension as e; "
                     "s = ck.backend_status(); print(s); "
                     "assert e.cuda_kernels_built() and s['cpu'] == 'available', s")  # fmt: skip
        else:
            check = ("import cs_kernels as ck; s = ck.backend_status(); print(s); "
                     "assert s['cuda'] == 'available' and s['cpu'] == 'available', s")  # fmt: skip
        return [
            [py, "setup.py", "build_ext", "--inplace"],
            [py, "-c", check],
            [py, "-m", "cs_kernels.triton_kernels.aot", "--arch", info["arch"]],
        ], env
    if name == "tests":
        # The heuristic tile (no autotuning) outside the tests that turn tuning on: each new
        # plan of the property tests would otherwise time every candidate.
        env.update(CS_KERNELS_TEST_DEVICE=device, CS_KERNELS_TRITON_AUTOTUNE="0")
        if built:
            env.update(CS_KERNELS_REQUIRE_CPU="1")
        else:  # a rerun without the build: whatever is built is tested
            env.pop("CS_KERNELS_REQUIRE_CPU", None)
        extra: list[str] = []
        if rehearse:
            env.update(CS_KERNELS_REQUIRE_MODELS="1")
            extra = [arg for path in REHEARSAL_DESELECT for arg in ("--deselect", path)]
        return [[py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--durations=15",
                 *extra, "tests"]], env  # fmt: skip
    if name == "bench":
        table = [py, "benchmarks/phase2_table.py", "--device", device, "--save", "--repeats",
                 "5", "--warmup-seconds", "0.1", "--very-slow-seconds", "1"]  # fmt: skip
        model, steps_model = "resnet50", "resnet50x4"
        if rehearse:  # the CPU's quick sizes: ResNet-18, T = 2
            table.append("--quick")
            model, steps_model = "resnet18", "resnet18"
        return [
            [*table, "--no-compiled"],
            [*table, "--compiled", "--models", model, "--tasks", "3", "--dtypes",
             "float32", "--modes", "group"],
            # Phase 2 in steps (FSDP2): every backend's two steps on one rank's rows of W = 2
            [py, "benchmarks/fsdp_phase2.py", "--steps-only", "--steps-model", steps_model,
             "--device", device, "--repeats", "5"],
            # half-size rows: the controller's memory, Phase 2 on bf16 rows against the floor
            [py, "benchmarks/memory_table.py", "--device", device, "--repeats", "5",
             *(["--model", "tiny"] if rehearse else [])],
        ], env  # fmt: skip
    if name == "demo":
        return [[py, "python/demo.py", "--quick", "--device", device, "--results",
                 str(work / "demo")]], env  # fmt: skip
    raise ValueError(name)


def saved_benchmarks(log: Path) -> list[Path]:
    """The JSON files the benchmark runs of ``log`` saved, in order."""
    found = []
    for line in log.read_text().splitlines():
        if line.startswith("saved ") and line.endswith(".json"):
            found.append(ROOT / line.removeprefix("saved ").strip())
    return found


def run_bench(
    info: dict[str, str], work: Path, log: Path, timeout: float, rehearse: bool = False
) -> tuple[int | None, float, list[Path]]:
    """Both benchmark runs. They save under one name (device and date), so the table's file
    is kept aside while the torch.compile run writes, then that one becomes ``-compiled``."""
    commands, env = stage_commands("bench", info, work, True, rehearse)
    start = time.monotonic()
    status, _ = run_logged(commands[:1], log, env, timeout)
    files = saved_benchmarks(log)
    if status != 0 or not files:
        return status, time.monotonic() - start, files
    table = files[0]
    aside = work / table.name
    shutil.copy2(table, aside)
    second = log.with_name(log.stem + "-compiled.log")
    status, _ = run_logged(commands[1:], second, env, timeout - (time.monotonic() - start))
    with log.open("a") as out:
        out.write(second.read_text())
    compiled = saved_benchmarks(second)
    kept = [table]
    if compiled:
        renamed = table.with_name(table.stem + "-compiled.json")
        compiled[0].replace(renamed)
        kept.append(renamed)
    shutil.copy2(aside, table)
    return status, time.monotonic() - start, kept


def summary_table(outcomes: Sequence[Outcome]) -> str:
    lines = ["| stage | status | seconds | budget |", "|---|---|---:|---:|"]
    for o in outcomes:
        lines.append(f"| {o.name} | {o.status} | {o.seconds:.0f} | {o.budget_s} |")
    total = sum(o.seconds for o in outcomes)
    lines.append(f"| total | | {total:.0f} | {TOTAL_BUDGET_S} |")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    names = [stage.name for stage in STAGES]
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", type=Path, default=ROOT / "gpu-check-results",
                   help="folder for the logs, JSON files and summary.json")  # fmt: skip
    p.add_argument("--skip", action="append", default=[], choices=names,
                   help="leave a stage out (repeatable), e.g. --skip build on a rerun")  # fmt: skip
    p.add_argument("--only", action="append", default=[], choices=names,
                   help="run only these stages (repeatable)")  # fmt: skip
    p.add_argument("--deadline", type=float,
                   help=f"end every stage within this many seconds ({DEADLINE_S}; "
                   f"{REHEARSAL_DEADLINE_S} with --rehearse)")  # fmt: skip
    p.add_argument("--rehearse", action="store_true",
                   help="no GPU: the stages on the CPU (the CUDA build for --arch)")  # fmt: skip
    p.add_argument("--arch", default="90", help="with --rehearse: build for sm_ARCH (90)")
    p.add_argument("--plan", action="store_true",
                   help="print the stages, budgets and estimates; run nothing")  # fmt: skip
    args = p.parse_args(argv)
    if args.deadline is None:
        args.deadline = REHEARSAL_DEADLINE_S if args.rehearse else DEADLINE_S
    return args


def print_plan() -> None:
    for stage in STAGES:
        print(f"{stage.name}: budget {stage.budget_s} s (stopped at {stage.limit_s} s)")
        print(f"    estimate: {stage.estimate}")
    print(f"total budget {sum(s.budget_s for s in STAGES)} s of {TOTAL_BUDGET_S} s")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.plan:
        print_plan()
        return 0
    started = time.monotonic()
    rehearse = bool(args.rehearse)
    try:
        info = rehearsal_preflight(args.arch) if rehearse else preflight()
    except MissingGpu as missing:
        print(f"[gpu-check] stopped: {missing}", file=sys.stderr)
        return 2
    results = args.results.resolve()
    results.mkdir(parents=True, exist_ok=True)
    print(f"[gpu-check] {info['device']} (sm_{info['arch']}), torch {info['torch']}, "
          f"triton {info['triton']}, {info['cores']} cores; results in {results}")  # fmt: skip
    wanted = set(args.only or [s.name for s in STAGES]) - set(args.skip)
    selected = [s for s in STAGES if s.name in wanted]
    outcomes: list[Outcome] = []
    built = "build" in {s.name for s in selected}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for stage in STAGES:
            if stage not in selected:
                outcomes.append(Outcome(stage.name, "skipped", 0.0, stage.budget_s))
                continue
            left = args.deadline - (time.monotonic() - started)
            if left < 10:
                outcomes.append(Outcome(stage.name, "not run: deadline", 0.0, stage.budget_s))
                continue
            limit = stage.limit_s * (REHEARSAL_LIMIT_FACTOR if rehearse else 1)
            timeout = min(limit, left)
            log = results / f"{stage.name}.log"
            print(f"\n[gpu-check] == {stage.name} (budget {stage.budget_s} s) ==", flush=True)
            files: list[Path] = []
            if stage.name == "bench":
                status, seconds, files = run_bench(info, work, log, timeout, rehearse)
            else:
                commands, env = stage_commands(stage.name, info, work, built, rehearse)
                status, seconds = run_logged(commands, log, env, timeout)
                if stage.name == "demo":
                    files = sorted((work / "demo").glob("*.json"))
            for file in files:
                if file.exists():
                    shutil.copy2(file, results / file.name)
            state = "timeout" if status is None else "failed" if status else "ok"
            if state == "ok" and seconds > stage.budget_s and not rehearse:
                state = "ok, over budget"
            outcomes.append(Outcome(stage.name, state, seconds, stage.budget_s, log.name,
                                    files=[f.name for f in files]))  # fmt: skip
            print(f"[gpu-check] {stage.name}: {state} in {seconds:.0f} s", flush=True)
    (results / "bench-compiled.log").unlink(missing_ok=True)  # appended to bench.log
    summary = {
        **info,
        "rehearsal": rehearse,
        "total_seconds": round(time.monotonic() - started, 1),
        "total_budget_s": TOTAL_BUDGET_S,
        "stages": [asdict(o) for o in outcomes],
    }
    (results / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print("\n" + summary_table(outcomes))
    failed = [o.name for o in outcomes if o.status in ("failed", "timeout")]
    print(f"[gpu-check] {'FAILED: ' + ', '.join(failed) if failed else 'passed'}; "
          f"{time.monotonic() - started:.0f} s; results in {results}")  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
