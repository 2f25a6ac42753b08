"""Reproduce the paper's comparison on MultiDigits: Δm of every method over 3 seeds.

Methods (``mtl_methods.METHODS``): single-task models, GD (plain sum), PCGrad, CAGrad, MGDA,
Aligned-MTL (from ``torchjd``), and ours: Phase 1 only, Phase 2 only, and mixed (the paper's
schedule). Every method trains the same ``MultiDigitsNet`` from the same initialisation, on the
same batches, with the same optimizer, learning rate and number of epochs.

Δm of a run is computed against the single-task models' test metrics averaged over the seeds
run here; the table reports its mean ± sample standard deviation over seeds.

    python python/reproduce.py                       # full: 3 seeds x 9 methods (< 60 min, CPU)
    python python/reproduce.py --quick --out /tmp/r  # a tiny smoke run
    python python/reproduce.py --methods single gd ours_mixed --seeds 0

Writes ``reproduce.md`` and ``reproduce.json`` to ``--out`` (default ``python/results/``;
``python/results/quick/`` with ``--quick``), rewritten after every run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import multiprocessing
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from mtl_methods import BASELINES, METHODS
from mtl_metrics import delta_m, lower_is_better, mean_std, relative_change
from mtl_train import WARMUP_STEPS, RunResult, TrainConfig, total_batches, train_run, warm_up
from multidigits import DEFAULT_TASKS, TASKS, MultiDigits, check_tasks, make_multidigits
from tqdm import tqdm

from cs_kernels._device import device_name

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

FULL = {"epochs": 15, "width": 16, "batch_size": 128, "sizes": (4096, 1024, 2048)}
QUICK = {"epochs": 1, "width": 8, "batch_size": 64, "sizes": (256, 128, 128)}
LABELS = {
    "single": "single-task",
    "gd": "GD (plain sum)",
    "pcgrad": "PCGrad",
    "cagrad": "CAGrad",
    "mgda": "MGDA",
    "aligned_mtl": "Aligned-MTL",
    "ours_phase1": "ours, Phase 1 only",
    "ours_phase2": "ours, Phase 2 only",
    "ours_mixed": "ours, mixed",
}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--tasks", nargs="+", choices=sorted(TASKS), default=list(DEFAULT_TASKS))
    p.add_argument("--epochs", type=int, help=f"default {FULL['epochs']} ({QUICK['epochs']} quick)")
    p.add_argument("--width", type=int, help=f"backbone width (default {FULL['width']})")
    p.add_argument("--batch-size", type=int, help=f"default {FULL['batch_size']}")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default 1e-3)")
    p.add_argument(
        "--loss-weights",
        nargs="+",
        default=[],
        metavar="TASK=W",
        help="loss weights, e.g. clean=10 (default 1 for every task, the paper's 'equal')",
    )
    p.add_argument("--data-seed", type=int, default=0, help="fixes the MultiDigits splits")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="tiny data and model, 1 epoch, seed 0")
    p.add_argument("--out", type=Path, help="output folder (default python/results[/quick])")
    p.add_argument(
        "--jobs",
        type=int,
        help="runs in parallel, each in its own process (default: 2 on a CPU with >= 2 cores, "
        "1 on a GPU or with --quick)",
    )
    p.add_argument("--threads", type=int, help="torch threads per run (default cores / jobs)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    preset = QUICK if args.quick else FULL
    for key in ("epochs", "width", "batch_size"):
        if getattr(args, key) is None:
            setattr(args, key, preset[key])
    args.sizes = preset["sizes"]
    if args.quick and args.seeds == [0, 1, 2]:
        args.seeds = [0]
    if args.out is None:
        args.out = RESULTS / "quick" if args.quick else RESULTS
    args.methods = [m for m in METHODS if m in args.methods]  # canonical order
    weights = {}
    for item in args.loss_weights:
        task, _, value = item.partition("=")
        if task not in args.tasks or not value:
            p.error(f"--loss-weights: expected TASK=W with TASK in {args.tasks}, got {item!r}")
        try:
            weights[task] = float(value)
        except ValueError:
            p.error(f"--loss-weights: {value!r} is not a number")
    args.loss_weights = weights
    cores = os.cpu_count() or 1
    if args.jobs is None:
        args.jobs = 1 if args.quick or args.device != "cpu" else min(2, cores)
    if args.threads is None:
        args.threads = max(1, cores // args.jobs) if args.device == "cpu" else 1
    if args.jobs < 1 or args.threads < 1:
        p.error("--jobs and --threads must be >= 1")
    args.tasks = list(check_tasks(args.tasks))
    return args


# ----------------------------------------------------------------------------- summary


def summarise(
    results: Sequence[RunResult], tasks: Sequence[str]
) -> tuple[dict[str, Any], dict[str, float] | None]:
    """Per method: Δm and metrics (mean, std over seeds), wall time; and the single-task base."""
    lower = lower_is_better(tasks)
    singles = [r for r in results if r.method == "single"]
    base = None
    if singles:
        base = {t: mean_std([r.test[t] for r in singles])[0] for t in tasks}
    summary: dict[str, Any] = {}
    for method in METHODS:
        runs = [r for r in results if r.method == method]
        if not runs:
            continue
        entry: dict[str, Any] = {
            "seeds": [r.seed for r in runs],
            "metrics": {t: mean_std([r.test[t] for r in runs]) for t in tasks},
            "wall_s": mean_std([r.wall_s for r in runs]),
            "step_ms": mean_std([r.step_ms[1] for r in runs]),
            "optimizer_steps": runs[0].optimizer_steps,
        }
        if base is not None:
            per_seed = [delta_m(r.test, base, lower) for r in runs]
            entry["delta_m_per_seed"] = per_seed
            entry["delta_m"] = mean_std(per_seed)
            entry["relative_change"] = {
                t: mean_std([relative_change(r.test, base, lower)[t] for r in runs]) for t in tasks
            }
        summary[method] = entry
    return summary, base


def ordering(summary: dict[str, Any]) -> list[str]:
    """Plain statements on the paper's orderings, from the mean Δm (only those computable)."""
    dm = {m: e["delta_m"][0] for m, e in summary.items() if "delta_m" in e}
    lines = []
    chain = ("ours_mixed", "ours_phase1", "ours_phase2")
    if all(m in dm for m in chain):
        holds = dm[chain[0]] > dm[chain[1]] > dm[chain[2]]
        lines.append(
            f"mixed > Phase 1 only > Phase 2 only: **{'holds' if holds else 'does not hold'}** "
            f"({dm[chain[0]]:+.2f} / {dm[chain[1]]:+.2f} / {dm[chain[2]]:+.2f} %)"
        )
    others = [m for m in ("gd", *BASELINES) if m in dm]
    if "ours_mixed" in dm and others:
        best = max(others, key=lambda m: dm[m])
        verdict = "holds" if all(dm["ours_mixed"] > dm[m] for m in others) else "does not hold"
        lines.append(
            f"ours (mixed) above GD and every baseline run: **{verdict}**"
            f" (ours {dm['ours_mixed']:+.2f} %, best other {LABELS[best]} {dm[best]:+.2f} %)"
        )
    return lines


def _pm(value: tuple[float, float], fmt: str) -> str:
    return f"{value[0]:{fmt}} ± {value[1]:{fmt.lstrip('+')}}"


def markdown(
    summary: dict[str, Any],
    base: dict[str, float] | None,
    results: Sequence[RunResult],
    meta: dict[str, Any],
) -> str:
    """The report: setting, Δm table, per-task metrics, per-seed Δm, ordering statements."""
    tasks = meta["tasks"]
    arrows = {t: f"{TASKS[t].metric} {'↓' if TASKS[t].lower_is_better else '↑'}" for t in tasks}
    cfg = meta["config"]
    lines = [
        "# MultiDigits reproduction",
        "",
        f"Device: {meta['device_name']} ({meta['device']}; {meta['jobs']} run(s) in parallel, "
        f"{meta['threads']} thread(s) each) | "
        f"torch {meta['torch']} | {meta['date']} | total {meta['total_s'] / 60:.1f} min",
        "",
        f"Tasks: {', '.join(f'`{t}` ({arrows[t]})' for t in tasks)}. "
        f"Data: MultiDigits (data seed {cfg['data_seed']}), {cfg['sizes'][0]} / "
        f"{cfg['sizes'][1]} / {cfg['sizes'][2]} train / val / test pairs. "
        f"Model: MultiDigitsNet width {cfg['width']}. Budget for every method: "
        f"{cfg['epochs']} epochs, batch {cfg['batch_size']}, Adam lr {cfg['lr']}, loss weights "
        f"{', '.join(f'{t} {w:g}' for t, w in cfg['loss_weights'].items())}. "
        f"Seeds: {', '.join(map(str, meta['seeds']))}. Metrics on the test split after the "
        "last epoch; Δm against the single-task models' mean over these seeds.",
        "",
    ]
    header = "| method | Δm (%) ↑ | " + " | ".join(f"{t} {arrows[t]}" for t in tasks)
    header += " | ms / step | wall s / run | optimizer steps |"
    lines += [header, "|---|---:|" + "---:|" * len(tasks) + "---:|---:|---:|"]
    for method, e in summary.items():
        dm = _pm(e["delta_m"], "+.2f") if "delta_m" in e else "n/a"
        cells = [_pm(e["metrics"][t], ".4f" if TASKS[t].metric == "rmse" else ".2f") for t in tasks]
        lines.append(
            f"| {LABELS[method]} | {dm} | {' | '.join(cells)} | "
            f"{_pm(e['step_ms'], '.1f')} | {_pm(e['wall_s'], '.1f')} | {e['optimizer_steps']} |"
        )
    lines += [
        "",
        f"ms / step: the median time of one training step (every task's forward and backward, "
        f"the update) after each run's first {WARMUP_STEPS} steps, mean ± std over seeds; "
        "wall s / run: the whole run (model set-up, every step, validation each epoch, test), "
        f"with {meta['jobs']} run(s) in parallel. Each worker process warms every method up "
        "before its first timed run.",
    ]
    if base is not None:
        lines += ["", "Relative change per task (%, sign flipped where lower is better):", ""]
        lines += ["| method | " + " | ".join(tasks) + " |", "|---|" + "---:|" * len(tasks)]
        for method, e in summary.items():
            cells = [_pm(e["relative_change"][t], "+.2f") for t in tasks]
            lines.append(f"| {LABELS[method]} | {' | '.join(cells)} |")
        seeds = meta["seeds"]
        lines += ["", "Δm per seed (%):", ""]
        lines += ["| method | " + " | ".join(f"seed {s}" for s in seeds) + " |"]
        lines += ["|---|" + "---:|" * len(seeds)]
        for method, e in summary.items():
            by_seed = dict(zip(e["seeds"], e["delta_m_per_seed"], strict=True))
            cells = [f"{by_seed[s]:+.2f}" if s in by_seed else "-" for s in seeds]
            lines.append(f"| {LABELS[method]} | {' | '.join(cells)} |")
        statements = ordering(summary)
        if statements:
            lines += ["", "The paper's orderings on this benchmark:", ""]
            lines += [f"- {s}" for s in statements]
    lines += ["", f"Runs: {len(results)}. Raw figures: `reproduce.json`."]
    return "\n".join(lines) + "\n"


def write(out: Path, results: Sequence[RunResult], meta: dict[str, Any]) -> tuple[Path, Path]:
    """Write ``reproduce.json`` and ``reproduce.md`` to ``out``."""
    summary, base = summarise(results, meta["tasks"])
    out.mkdir(parents=True, exist_ok=True)
    payload = {
        **meta,
        "single_task_base": base,
        "summary": summary,
        "ordering": ordering(summary),
        "runs": [r.to_json() for r in results],
    }
    json_path, md_path = out / "reproduce.json", out / "reproduce.md"
    json_path.write_text(json.dumps(payload, indent=2) + "\n")
    md_path.write_text(markdown(summary, base, results, meta))
    return json_path, md_path


@dataclass(frozen=True)
class Job:
    """One (method, seed) run, with everything a worker process needs to rebuild it."""

    method: str
    seed: int
    tasks: tuple[str, ...]
    config: TrainConfig
    data_seed: int
    sizes: tuple[int, int, int]
    device: str
    threads: int
    warm_up: tuple[str, ...] = ()  # methods to warm up in this process before timing


_DATA: dict[tuple[int, tuple[int, int, int], str], MultiDigits] = {}


def data_for(job: Job) -> MultiDigits:
    """The job's MultiDigits splits on its device (built once per process)."""
    key = (job.data_seed, job.sizes, job.device)
    if key not in _DATA:
        _DATA[key] = make_multidigits(job.data_seed, *job.sizes).to(torch.device(job.device))
    return _DATA[key]


def run_job(job: Job, progress: Callable[[int], None] | None = None) -> RunResult:
    """Train and evaluate one job (in this process or a worker)."""
    torch.set_num_threads(job.threads)
    warm_up(job.warm_up, job.tasks, data_for(job), job.config)  # once per process and method
    result, _ = train_run(job.method, job.tasks, data_for(job), job.config, job.seed, progress)
    return result


def run_all(
    jobs: Sequence[Job], workers: int, bar: tqdm, done: Callable[[RunResult], None]
) -> None:
    """Run ``jobs`` (``workers`` at a time in spawned processes when > 1), calling ``done``
    in job order as results arrive."""
    if workers <= 1:
        for job in jobs:
            bar.set_description(f"seed {job.seed} {job.method}")
            done(run_job(job, bar.update))
        return
    ctx = multiprocessing.get_context("spawn")  # fork is unsafe once torch's threads exist
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        futures = [pool.submit(run_job, job) for job in jobs]
        for job, future in zip(jobs, futures, strict=True):
            result = future.result()
            bar.update(total_batches(job.method, job.tasks, data_for(job), job.config))
            done(result)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    config = TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        width=args.width,
        loss_weights=args.loss_weights,
    )
    jobs = [
        Job(
            m,
            seed,
            tuple(args.tasks),
            config,
            args.data_seed,
            args.sizes,
            args.device,
            args.threads,
            tuple(args.methods),
        )
        for seed in args.seeds
        for m in args.methods
    ]
    meta: dict[str, Any] = {
        "device": device.type,
        "device_name": device_name(device),
        "jobs": args.jobs,
        "threads": args.threads,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "tasks": args.tasks,
        "methods": args.methods,
        "seeds": args.seeds,
        "quick": args.quick,
        "config": {
            "epochs": config.epochs,
            "batch_size": config.batch_size,
            "lr": config.lr,
            "width": config.width,
            "optimizer": "Adam",
            "loss_weights": {t: config.weight(t) for t in args.tasks},
            "data_seed": args.data_seed,
            "sizes": list(args.sizes),
        },
        "total_s": 0.0,
    }
    total = sum(total_batches(j.method, j.tasks, data_for(j), config) for j in jobs)
    results: list[RunResult] = []
    start = time.perf_counter()
    paths: tuple[Path, Path] | None = None

    with tqdm(total=total, unit="batch", disable=args.no_progress, file=sys.stderr) as bar:

        def done(result: RunResult) -> None:
            nonlocal paths
            results.append(result)
            meta["total_s"] = time.perf_counter() - start
            paths = write(args.out, results, meta)  # after every run: nothing is lost
            metrics = ", ".join(f"{t} {v:.4g}" for t, v in result.test.items())
            bar.write(
                f"seed {result.seed} {result.method:<12} {result.step_ms[1]:7.1f} ms/step "
                f"{result.wall_s:6.1f} s  {metrics}"
            )

        run_all(jobs, args.jobs, bar, done)
    assert paths is not None
    print(paths[1].read_text())
    print(f"wrote {paths[0]} and {paths[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
