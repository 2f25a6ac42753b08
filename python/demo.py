"""cs_kernels demo: backends and their agreement, Phase 2 speed, and multi-task training.

Runs as a user would: only the public API of the installed package.

    (a) which backends run here and how far each is from the `reference` oracle on the first
        layers of ResNet-18;
    (b) the Phase 2 benchmark table (ratio to the floor `torch.sum`, speedup over the
        authors'-style loop), from benchmarks/phase2_table.py;
    (c) MultiDigits trained with connection-strength optimization (`ConnectionStrength`,
        the paper's mixed schedule) and with plainly summed gradients: per-task test metrics,
        loss curves and the priority telemetry written as PNG.

    python python/demo.py                  # a few minutes on a 2-core CPU; a GPU when present
    python python/demo.py --quick          # tiny sizes, under a minute, for a smoke test
    python python/demo.py --results DIR    # where (c) writes (default python/results/demo)
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path
from types import ModuleType

import torch
from tqdm import tqdm

import cs_kernels as ck
from cs_kernels.model_shapes import model_plan

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def head_of(plan: ck.Phase2Plan, layers: int) -> ck.Phase2Plan:
    """The first ``layers`` connection layers of a plan, as a plan of their own."""
    kept = plan.layers[:layers]
    return ck.Phase2Plan(kept, kept[-1].offset + kept[-1].numel)


# ------------------------------------------------------------------------------ (a) parity


def show_backends(device: torch.device) -> None:
    print(
        f"cs_kernels {ck.__version__}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, device {device}"
    )
    print("\nBackends:")
    for name, status in ck.backend_status().items():
        print(f"  {name:<10} {status}")


def show_parity(device: torch.device, tasks: int, quick: bool) -> None:
    """Every fast backend against the reference on the first layers of ResNet-18."""
    small = head_of(model_plan("resnet18"), 3 if quick else 6)
    gen = torch.Generator().manual_seed(0)
    grads = torch.randn(tasks, small.numel, generator=gen).to(device)
    strength = torch.rand(tasks, small.total_channels, generator=gen).to(device)
    print(f"\nAgreement with `reference` on {small} (fp32, T={tasks}, {device}):")
    for mode in ("group", "channel"):
        expected = ck.phase2(grads, small, strength, mode=mode, backend="reference")
        for backend in ck.available_backends(device):
            if backend == "reference":
                continue
            got = ck.phase2(grads, small, strength, mode=mode, backend=backend)
            err = float((got - expected).abs().max())
            print(f"  {mode:<8} {backend:<8} max |diff| = {err:.2e}")


# ---------------------------------------------------------------------------- (b) timing


def load_bench() -> ModuleType | None:
    """benchmarks/phase2_table.py as a module, or None (with the reason) if it fails."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import phase2_table
    except Exception as exc:  # the table is optional for the rest of the demo
        print(f"\n(benchmark table unavailable: {type(exc).__name__}: {exc})")
        return None
    module: ModuleType = phase2_table
    return module


def show_benchmark(device: torch.device, tasks: int, quick: bool) -> None:
    """The Phase 2 table, kept short on CPU (ResNet-18 only)."""
    bench = load_bench()
    if bench is None:
        return
    on_gpu = device.type != "cpu"
    models = ["resnet18", "resnet50"] if on_gpu and not quick else ["resnet18"]
    task_counts = [2] if quick else ([3, 5] if on_gpu else [tasks])
    args = argparse.Namespace(
        repeats=1 if quick else (7 if on_gpu else 3),
        slow_repeats=1,
        slow_seconds=0.1,
        warmup_seconds=0.0 if quick else 0.25,
    )
    backends = [b for b in ck.available_backends(device) if b != "reference"]
    rows = []
    try:
        with torch.inference_mode():
            for model in models:
                for t in task_counts:
                    work = bench.make_workload(model, t, torch.float32, device, 0)
                    rows.extend(bench.bench_workload(work, backends, ("group", "channel"), args))
                    del work
    except Exception as exc:  # benchmarks/ evolves on its own; keep the demo going
        print(f"\n(benchmark table failed: {type(exc).__name__}: {exc})")
        return
    name = bench.device_name(device)
    print(f"\nPhase 2, whole model, fp32 on {name} ({device.type}), median of {args.repeats}:")
    print("('x floor': time / torch.sum(grads, 0); 'speedup': over the authors'-style loop)\n")
    print(bench.markdown_table(rows))
    if not on_gpu:
        print("(full table: make bench; results in benchmarks/results/)")


# -------------------------------------------------------------------------- (c) training


def train_demo(device: torch.device, quick: bool, epochs: int | None, out: Path) -> Path:
    """Train MultiDigits with ours (mixed) and GD; print metrics, write PNGs and JSON."""
    sys.path.insert(0, str(HERE))
    from mtl.data.multidigits import DEFAULT_TASKS, TASKS, make_multidigits
    from mtl.plots import plot_curves
    from mtl.train import WARMUP_STEPS, TrainConfig, total_batches, train_run, warm_up

    tasks = list(DEFAULT_TASKS)
    sizes = (256, 128, 128) if quick else (4096, 1024, 2048)
    config = TrainConfig(
        epochs=epochs or (3 if quick else 8),
        batch_size=64 if quick else 128,
        width=8 if quick else 16,
    )
    data = make_multidigits(0, *sizes).to(device)
    methods = {"ours_mixed": "ours (mixed)", "gd": "GD (plain sum)"}
    print(
        f"\nMultiDigits: {sizes[0]} / {sizes[1]} / {sizes[2]} train / val / test pairs, tasks "
        f"{tasks}; {config.epochs} epochs, batch {config.batch_size}, Adam lr {config.lr}, "
        f"width {config.width}, {device}"
    )
    warm_up(methods, tasks, data, config)  # so the first method timed pays no process warm-up
    total = sum(total_batches(m, tasks, data, config) for m in methods)
    runs = {}
    controller = None
    with tqdm(total=total, unit="batch") as bar:  # on stderr, like every progress bar
        for method, label in methods.items():
            bar.set_description(label)
            result, step = train_run(method, tasks, data, config, 0, bar.update)
            runs[label] = result
            if method == "ours_mixed":
                controller = getattr(step, "cs", None)
    if controller is not None:
        print("\nConnections found by ConnectionStrength:")
        print(controller.summary())

    arrows = {t: f"{TASKS[t].metric} {'↓' if TASKS[t].lower_is_better else '↑'}" for t in tasks}
    print("\nTest metrics and cost:")
    print(
        f"  {'method':<16}"
        + "".join(f"{t + ' ' + arrows[t]:>22}" for t in tasks)
        + f"  {'ms / step':>18}  wall s"
    )
    for label, run in runs.items():
        cells = "".join(f"{run.test[t]:>22.4f}" for t in tasks)
        q1, median, q3 = run.step_ms
        step = f"{median:.1f} [{q1:.1f}-{q3:.1f}]"
        print(f"  {label:<16}{cells}  {step:>18}  {run.wall_s:6.1f}")
    print(
        f"  ms / step: median [quartiles] of one training step (every task's forward and "
        f"backward, the update), over {runs[next(iter(runs))].timed_steps} steps after each "
        f"run's first {WARMUP_STEPS};\n  wall s: the whole run (model set-up, every step, "
        "validation each epoch, test). Each method was warmed up first, so neither pays the "
        "process's one-time start-up."
    )

    out.mkdir(parents=True, exist_ok=True)
    curves = plot_curves(runs, tasks, out / "loss_curves.png")
    print(f"\nwrote {curves}")
    if controller is not None and controller.telemetry.epochs:
        telemetry = out / "priority_telemetry.png"
        controller.telemetry.plot(telemetry)
        print(f"wrote {telemetry}")
    elif controller is not None:  # one epoch is all Phase 1 (the schedule): nothing recorded
        print("(no Phase 2 step in this run: no priority telemetry to plot)")
    summary = {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "device": str(device),
        "config": {"epochs": config.epochs, "batch_size": config.batch_size, "lr": config.lr},
        "runs": {label: run.to_json() for label, run in runs.items()},
    }
    (out / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, under a minute")
    parser.add_argument("--tasks", type=int, default=3, help="T for parts (a) and (b)")
    parser.add_argument("--epochs", type=int, help="epochs for part (c) (default 8; 3 quick)")
    parser.add_argument(
        "--results", type=Path, help="folder for part (c) (default python/results/demo)"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    out = args.results or HERE / "results" / ("demo-quick" if args.quick else "demo")

    show_backends(device)
    show_parity(device, args.tasks, args.quick)
    show_benchmark(device, args.tasks, args.quick)
    folder = train_demo(device, args.quick, args.epochs, out)
    print(f"\nResults folder: {folder}")


if __name__ == "__main__":
    main()
