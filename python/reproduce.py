"""Reproduce the paper's comparison on a benchmark: Δm of every method over 3 seeds.

Benchmarks (``--benchmark``, `mtl.benchmarks`): ``multidigits`` (the default; two digit
classes and a reconstruction) and ``scenes`` (segmentation, depth and surface normals of
rendered rooms, on the dense multi-task ResNet).

Methods (``mtl.methods.METHODS``): single-task models, GD (plain sum), PCGrad, CAGrad, MGDA,
Aligned-MTL (from ``torchjd``), and ours: Phase 1 only, Phase 2 only, and mixed (the paper's
schedule); on Scenes also GD and ours (mixed) with uncertainty weighting (``gd_uw``,
``ours_mixed_uw``). Every method trains the same model from the same initialisation, on the
same batches, with the same optimizer, learning rate and number of epochs.

Δm of a run is computed against the single-task models' test metrics averaged over the seeds
run here; the table reports its mean ± sample standard deviation over seeds.

    python python/reproduce.py                       # MultiDigits: 3 seeds x 9 methods (CPU)
    python python/reproduce.py --benchmark scenes    # Scenes: 3 seeds x 11 methods (CPU)
    python python/reproduce.py --quick --out /tmp/r  # a tiny smoke run
    python python/reproduce.py --methods single gd ours_mixed --seeds 0

Writes ``reproduce.md`` and ``reproduce.json`` to ``--out`` (default ``python/results/`` for
MultiDigits, ``python/results/scenes/`` for Scenes; a ``quick/`` folder below with
``--quick``), rewritten after every run; on Scenes also a figure of test predictions.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import multiprocessing
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from mtl.benchmarks import BENCHMARKS, Benchmark, get_benchmark
from mtl.methods import BASELINES, METHODS, SCALED_METHODS
from mtl.metrics import arrow, delta_m, evaluate, lower_is_better, mean_std, relative_change
from mtl.train import (
    WARMUP_STEPS,
    RunResult,
    TrainConfig,
    time_steps,
    total_batches_of,
    train_run,
    warm_up,
)
from tqdm import tqdm

from cs_kernels._device import device_name

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

ALL_METHODS = (*METHODS, *SCALED_METHODS)
# Per benchmark: the full run and the --quick smoke run. ``resolution`` None: fixed by the data.
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "multidigits": {
        "full": {"epochs": 15, "width": 16, "batch_size": 128, "sizes": (4096, 1024, 2048)},
        "quick": {"epochs": 1, "width": 8, "batch_size": 64, "sizes": (256, 128, 128)},
    },
    "scenes": {
        "full": {
            "epochs": 14,
            "width": 16,
            "batch_size": 32,
            "sizes": (2048, 256, 512),
            "resolution": 64,
        },
        "quick": {
            "epochs": 1,
            "width": 4,
            "batch_size": 8,
            "sizes": (32, 8, 8),
            "resolution": 16,
        },
    },
}
DEFAULT_METHODS = {"multidigits": METHODS, "scenes": ALL_METHODS}
FULL, QUICK = PRESETS["multidigits"]["full"], PRESETS["multidigits"]["quick"]
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
    "gd_uw": "GD + uncertainty weighting",
    "ours_mixed_uw": "ours, mixed + uncertainty weighting",
}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--benchmark", choices=BENCHMARKS, default="multidigits")
    p.add_argument("--methods", nargs="+", choices=ALL_METHODS, help="default: every method")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--tasks", nargs="+", help="default: the benchmark's three tasks")
    p.add_argument("--epochs", type=int, help="default: the benchmark's preset (see PRESETS)")
    p.add_argument("--width", type=int, help="backbone width (default: the preset's)")
    p.add_argument("--batch-size", type=int, help="default: the preset's")
    p.add_argument("--resolution", type=int, help="Scenes: image side in pixels (default 64)")
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
    p.add_argument(
        "--estimate",
        type=int,
        metavar="STEPS",
        help="do not train: time STEPS steps of each method (CPU time) and one evaluation, "
        "and print the projected duration of this run",
    )
    args = p.parse_args(argv)
    bench = get_benchmark(args.benchmark)
    preset = PRESETS[bench.name]["quick" if args.quick else "full"]
    for key in ("epochs", "width", "batch_size", "resolution"):
        if getattr(args, key) is None:
            setattr(args, key, preset.get(key))
    if args.resolution is not None and "resolution" not in preset:
        p.error(f"--resolution: {bench.title} has a fixed image size")
    args.sizes = preset["sizes"]
    if args.quick and args.seeds == [0, 1, 2]:
        args.seeds = [0]
    if args.out is None:
        base = RESULTS if bench.name == "multidigits" else RESULTS / bench.name
        args.out = base / "quick" if args.quick else base
    chosen = args.methods or DEFAULT_METHODS[bench.name]
    args.methods = [m for m in ALL_METHODS if m in chosen]  # canonical order
    if args.tasks is None:
        args.tasks = list(bench.default_tasks)
    try:
        args.tasks = list(bench.check_tasks(args.tasks))
    except ValueError as exc:
        p.error(f"--tasks: {exc}")
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
    return args


# ----------------------------------------------------------------------------- summary


def summarise(
    results: Sequence[RunResult], tasks: Sequence[str], bench: Benchmark | None = None
) -> tuple[dict[str, Any], dict[str, float] | None]:
    """Per method: Δm and metrics (mean, std over seeds), wall time; and the single-task base.

    ``extra_metrics``: each task's other metrics (e.g. depth abs-rel), mean and std.
    """
    bench = bench or get_benchmark("multidigits")
    lower = lower_is_better(tasks, bench.specs)
    singles = [r for r in results if r.method == "single"]
    base = None
    if singles:
        base = {t: mean_std([r.test[t] for r in singles])[0] for t in tasks}
    summary: dict[str, Any] = {}
    for method in ALL_METHODS:
        runs = [r for r in results if r.method == method]
        if not runs:
            continue
        entry: dict[str, Any] = {
            "seeds": [r.seed for r in runs],
            "metrics": {t: mean_std([r.test[t] for r in runs]) for t in tasks},
            "extra_metrics": {
                t: {m: mean_std([r.test_all[t][m] for r in runs]) for m in extra}
                for t in tasks
                if (extra := bench.specs[t].extra_metrics) and all(r.test_all for r in runs)
            },
            "wall_s": mean_std([r.wall_s for r in runs]),
            "step_ms": mean_std([r.step_ms[1] for r in runs]),
            "optimizer_steps": runs[0].optimizer_steps,
        }
        scales = [r.loss_scales for r in runs if r.loss_scales]
        if scales:
            entry["loss_scales"] = {t: mean_std([s[t] for s in scales]) for t in tasks}
        if base is not None:
            per_seed = [delta_m(r.test, base, lower) for r in runs]
            entry["delta_m_per_seed"] = per_seed
            entry["delta_m"] = mean_std(per_seed)
            entry["relative_change"] = {
                t: mean_std([relative_change(r.test, base, lower)[t] for r in runs]) for t in tasks
            }
        summary[method] = entry
    return summary, base


def _paired(summary: dict[str, Any], a: str, b: str) -> str:
    """``a`` minus ``b`` seed by seed (same initialisation and batches): mean ± std, and in
    how many seeds ``a`` is ahead."""
    ea, eb = summary[a], summary[b]
    da = dict(zip(ea["seeds"], ea["delta_m_per_seed"], strict=True))
    db = dict(zip(eb["seeds"], eb["delta_m_per_seed"], strict=True))
    diffs = [da[s] - db[s] for s in da if s in db]
    if not diffs:
        return "no common seed"
    mean, std = mean_std(diffs)
    ahead = sum(d > 0 for d in diffs)
    return f"{mean:+.2f} ± {std:.2f} pp, ahead in {ahead} of {len(diffs)} seeds"


def ordering(summary: dict[str, Any]) -> list[str]:
    """Plain statements on the paper's orderings, from the mean Δm (only those computable),
    each with the seed-by-seed differences behind it."""
    dm = {m: e["delta_m"][0] for m, e in summary.items() if "delta_m" in e}
    lines = []
    chain = ("ours_mixed", "ours_phase1", "ours_phase2")
    if all(m in dm for m in chain):
        holds = dm[chain[0]] > dm[chain[1]] > dm[chain[2]]
        lines.append(
            f"mixed > Phase 1 only > Phase 2 only: **{'holds' if holds else 'does not hold'}** "
            f"({dm[chain[0]]:+.2f} / {dm[chain[1]]:+.2f} / {dm[chain[2]]:+.2f} %; "
            f"mixed - Phase 1: {_paired(summary, chain[0], chain[1])}; "
            f"Phase 1 - Phase 2: {_paired(summary, chain[1], chain[2])})"
        )
    others = [m for m in ("gd", *BASELINES) if m in dm]
    if "ours_mixed" in dm and others:
        best = max(others, key=lambda m: dm[m])
        verdict = "holds" if all(dm["ours_mixed"] > dm[m] for m in others) else "does not hold"
        lines.append(
            f"ours (mixed) above GD and every baseline run: **{verdict}**"
            f" (ours {dm['ours_mixed']:+.2f} %, best other {LABELS[best]} {dm[best]:+.2f} %; "
            f"ours - {LABELS[best]}: {_paired(summary, 'ours_mixed', best)})"
        )
    if "ours_mixed_uw" in dm and "gd_uw" in dm:
        verdict = "holds" if dm["ours_mixed_uw"] > dm["gd_uw"] else "does not hold"
        lines.append(
            f"with uncertainty weighting, ours (mixed) above GD: **{verdict}** "
            f"({dm['ours_mixed_uw']:+.2f} vs {dm['gd_uw']:+.2f} %; "
            f"{_paired(summary, 'ours_mixed_uw', 'gd_uw')})"
        )
    return lines


def _pm(value: tuple[float, float], fmt: str) -> str:
    return f"{value[0]:{fmt}} ± {value[1]:{fmt.lstrip('+')}}"


def _metric_format(metric: str) -> str:
    return ".4f" if metric in ("rmse", "abs_rel") else ".2f"


def markdown(
    summary: dict[str, Any],
    base: dict[str, float] | None,
    results: Sequence[RunResult],
    meta: dict[str, Any],
    bench: Benchmark | None = None,
) -> str:
    """The report: setting, Δm table, per-task metrics, per-seed Δm, ordering statements."""
    bench = bench or get_benchmark(meta.get("benchmark", "multidigits"))
    tasks = meta["tasks"]
    specs = bench.specs
    columns = [(t, m) for t in tasks for m in specs[t].metrics]
    cfg = meta["config"]
    resolution = f", {cfg['resolution']}×{cfg['resolution']} px" if cfg.get("resolution") else ""
    lines = [
        f"# {bench.title} reproduction",
        "",
        f"Device: {meta['device_name']} ({meta['device']}; {meta['jobs']} run(s) in parallel, "
        f"{meta['threads']} thread(s) each) | "
        f"torch {meta['torch']} | {meta['date']} | total {meta['total_s'] / 60:.1f} min",
        "",
        f"Tasks: {', '.join(f'`{t}` ({arrow(specs[t].metric)})' for t in tasks)}. "
        f"Data: {bench.title} (data seed {cfg['data_seed']}{resolution}), {cfg['sizes'][0]} / "
        f"{cfg['sizes'][1]} / {cfg['sizes'][2]} train / val / test examples. "
        f"Model: {meta['model']}. Budget for every method: "
        f"{cfg['epochs']} epochs, batch {cfg['batch_size']}, Adam lr {cfg['lr']}, loss weights "
        f"{', '.join(f'{t} {w:g}' for t, w in cfg['loss_weights'].items())}. "
        f"Seeds: {', '.join(map(str, meta['seeds']))}. Metrics on the test split after the "
        "last epoch; Δm (over each task's first metric) against the single-task models' mean "
        "over these seeds.",
        "",
    ]
    header = "| method | Δm (%) ↑ | " + " | ".join(f"{t} {arrow(m)}" for t, m in columns)
    header += " | ms / step | wall s / run | optimizer steps |"
    lines += [header, "|---|---:|" + "---:|" * len(columns) + "---:|---:|---:|"]
    for method, e in summary.items():
        dm = _pm(e["delta_m"], "+.2f") if "delta_m" in e else "n/a"
        cells = []
        for t, m in columns:
            value = (
                e["metrics"][t] if m == specs[t].metric else e["extra_metrics"].get(t, {}).get(m)
            )
            cells.append(_pm(value, _metric_format(m)) if value is not None else "n/a")
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
    scaled = {m: e["loss_scales"] for m, e in summary.items() if "loss_scales" in e}
    if scaled:
        lines += [
            "",
            "Final uncertainty-weighting factors exp(-s_t)/2 (mean ± std over seeds):",
            "",
        ]
        lines += ["| method | " + " | ".join(tasks) + " |", "|---|" + "---:|" * len(tasks)]
        for method, scales in scaled.items():
            cells = [_pm(scales[t], ".3f") for t in tasks]
            lines.append(f"| {LABELS[method]} | {' | '.join(cells)} |")
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
    if meta.get("figure"):
        lines += ["", f"Test predictions: `{meta['figure']}`."]
    lines += ["", f"Runs: {len(results)}. Raw figures: `reproduce.json`."]
    return "\n".join(lines) + "\n"


def write(out: Path, results: Sequence[RunResult], meta: dict[str, Any]) -> tuple[Path, Path]:
    """Write ``reproduce.json`` and ``reproduce.md`` to ``out``."""
    bench = get_benchmark(meta.get("benchmark", "multidigits"))
    summary, base = summarise(results, meta["tasks"], bench)
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
    md_path.write_text(markdown(summary, base, results, meta, bench))
    return json_path, md_path


# Methods whose seed-0 test predictions go into the figure (benchmarks that draw one).
FIGURE_METHODS = ("gd", "ours_mixed")
FIGURE_SCENES = 4


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
    benchmark: str = "multidigits"
    resolution: int | None = None
    predictions: int = 0  # return the predictions on this many test examples


_DATA: dict[tuple[Any, ...], Any] = {}


def data_for(job: Job) -> Any:
    """The job's splits on its device (built once per process)."""
    key = (job.benchmark, job.data_seed, job.sizes, job.resolution, job.device)
    if key not in _DATA:
        bench = get_benchmark(job.benchmark)
        data = bench.make_data(job.data_seed, job.sizes, job.resolution)
        _DATA[key] = data.to(torch.device(job.device))
    return _DATA[key]


Predictions = dict[str, Any]  # task -> predictions [n, ...] on the first test examples (CPU)


@torch.no_grad()
def predictions_on(
    model: torch.nn.Module, bench: Benchmark, split: Any, tasks: Sequence[str], count: int
) -> Predictions:
    """The model's predictions (eval mode) for the first ``count`` examples of ``split``."""
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        images, _ = split.batch(torch.arange(min(count, len(split)), device=device))
        return {t: bench.predict(t, model(images, task=t)).cpu() for t in tasks}
    finally:
        model.train(was_training)


def run_job(
    job: Job, progress: Callable[[int], None] | None = None
) -> tuple[RunResult, Predictions | None]:
    """Train and evaluate one job (in this process or a worker); with ``job.predictions``,
    also return the trained model's predictions on the first test examples."""
    torch.set_num_threads(job.threads)
    bench = get_benchmark(job.benchmark)
    data = data_for(job)
    warm_up(job.warm_up, job.tasks, data, job.config, bench=bench)  # once per process, method
    result, step = train_run(
        job.method, job.tasks, data, job.config, job.seed, progress, bench=bench
    )
    predictions = None
    if job.predictions and step is not None:
        predictions = predictions_on(step.model, bench, data.test, job.tasks, job.predictions)
    return result, predictions


Done = Callable[[Job, RunResult, "Predictions | None"], None]


def run_all(jobs: Sequence[Job], workers: int, bar: tqdm, done: Done) -> None:
    """Run ``jobs`` (``workers`` at a time in spawned processes when > 1), calling ``done``
    in job order as results arrive."""
    if workers <= 1:
        for job in jobs:
            bar.set_description(f"seed {job.seed} {job.method}")
            done(job, *run_job(job, bar.update))
        return
    ctx = multiprocessing.get_context("spawn")  # fork is unsafe once torch's threads exist
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        futures = [pool.submit(run_job, job) for job in jobs]
        for job, future in zip(jobs, futures, strict=True):
            result, predictions = future.result()
            bar.update(total_batches_of(job.method, job.tasks, job.sizes[0], job.config))
            done(job, result, predictions)


def estimate(jobs: Sequence[Job], steps: int, workers: int) -> tuple[str, float]:
    """Time ``steps`` training steps of each method of ``jobs`` and one evaluation (CPU time of
    this process, one run's threads) and project the run's duration with ``workers`` runs in
    parallel. Returns a report and the projected seconds.

    A run costs its steps, a validation pass per epoch and at the end, and a test pass; the
    runs are then spread over the workers (their sum divided by ``workers``, plus the longest
    run for the imbalance of the last ones). CPU time is what a quiet machine's wall clock
    would show with one thread per run and a core per worker.
    """
    first = jobs[0]
    torch.set_num_threads(first.threads)
    bench = get_benchmark(first.benchmark)
    data = data_for(first)
    config = first.config
    methods = list(dict.fromkeys(j.method for j in jobs))
    warm_up(methods, first.tasks, data, config, bench=bench)
    step_s = {
        m: statistics.median(time_steps(m, first.tasks, data, config, steps, bench=bench))
        for m in methods
    }
    torch.manual_seed(0)
    model = bench.build_model(first.tasks, config.width)
    start = time.process_time()
    evaluate(
        model,
        data.val,
        first.tasks,
        bench.eval_batch_size,
        specs=bench.specs,
        predict=bench.predict,
    )
    val_s = time.process_time() - start
    test_s = val_s * len(data.test) / len(data.val)
    per_run = {}
    lines = ["| method | CPU ms / step | steps / run | min / run |", "|---|---:|---:|---:|"]
    for m in methods:
        batches = total_batches_of(m, first.tasks, first.sizes[0], config)
        per_run[m] = batches * step_s[m] + (config.epochs + 1) * val_s + test_s
        lines.append(f"| {m} | {1e3 * step_s[m]:.1f} | {batches} | {per_run[m] / 60:.1f} |")
    total = (
        sum(per_run[j.method] for j in jobs) / workers
        + max(per_run.values()) * (workers - 1) / workers
    )
    lines += [
        "",
        f"validation pass {val_s:.1f} s, test pass {test_s:.1f} s (CPU); {len(jobs)} runs, "
        f"{workers} in parallel: about {total / 60:.0f} min on a quiet machine",
    ]
    return "\n".join(lines), total


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    bench = get_benchmark(args.benchmark)
    device = torch.device(args.device)
    config = TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        width=args.width,
        loss_weights=args.loss_weights,
    )
    figure_seed = args.seeds[0]
    drawn = bench.plot_predictions is not None
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
            bench.name,
            args.resolution,
            FIGURE_SCENES if drawn and seed == figure_seed and m in FIGURE_METHODS else 0,
        )
        for seed in args.seeds
        for m in args.methods
    ]
    # Build (or fill the cache of) the data once here, before the workers race to.
    data = data_for(jobs[0])
    if args.estimate:
        report, _ = estimate(jobs, args.estimate, args.jobs)
        print(report)
        return 0
    meta: dict[str, Any] = {
        "benchmark": bench.name,
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
        "model": bench.describe_model(args.tasks, config.width),
        "config": {
            "epochs": config.epochs,
            "batch_size": config.batch_size,
            "lr": config.lr,
            "width": config.width,
            "optimizer": "Adam",
            "loss_weights": {t: config.weight(t) for t in args.tasks},
            "data_seed": args.data_seed,
            "sizes": list(args.sizes),
            "resolution": args.resolution,
        },
        "total_s": 0.0,
    }
    total = sum(total_batches_of(j.method, j.tasks, j.sizes[0], config) for j in jobs)
    results: list[RunResult] = []
    drawn_predictions: dict[str, Predictions] = {}
    start = time.perf_counter()
    paths: tuple[Path, Path] | None = None

    with tqdm(total=total, unit="batch", disable=args.no_progress, file=sys.stderr) as bar:

        def done(job: Job, result: RunResult, predictions: Predictions | None) -> None:
            nonlocal paths
            results.append(result)
            if predictions is not None:
                drawn_predictions[LABELS[job.method]] = predictions
            if bench.plot_predictions is not None and drawn_predictions:
                figure = args.out / "predictions.png"
                args.out.mkdir(parents=True, exist_ok=True)
                bench.plot_predictions(data.test, list(args.tasks), drawn_predictions, figure)
                meta["figure"] = figure.name
            meta["total_s"] = time.perf_counter() - start
            paths = write(args.out, results, meta)  # after every run: nothing is lost
            metrics = ", ".join(f"{t} {v:.4g}" for t, v in result.test.items())
            bar.write(
                f"seed {result.seed} {result.method:<13} {result.step_ms[1]:7.1f} ms/step "
                f"{result.wall_s:6.1f} s  {metrics}"
            )

        run_all(jobs, args.jobs, bar, done)
    assert paths is not None
    print(paths[1].read_text())
    print(f"wrote {paths[0]} and {paths[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
