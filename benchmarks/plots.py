"""The documentation's benchmark plots, drawn from the committed JSON in benchmarks/results/.

    python benchmarks/plots.py                  # writes docs/img/*.png
    python benchmarks/plots.py --out some/dir   # elsewhere

Plots (each from one results file, named in the plot's title):
- ``phase2-vs-floor.png``: whole-model Phase 2 as a ratio to the floor (``torch.sum`` of the
  same ``[T, N]`` rows, same run), quiet and beside three busy processes, with the
  authors'-style loop for scale (``phase2_table.py`` output).
- ``training-step.png``: one training step of the dense multi-task ResNet-50 per method,
  split into the time spent combining per-task gradients and the rest (``step_table.py``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
PHASE2_RUNS = {
    "quiet": "amd-epyc-2026-11-30.json",
    "beside 3 busy processes": "amd-epyc-2026-11-30-load3.json",
}
STEP_RUN = "amd-epyc-2026-11-30-step.json"
# (mode, backend) -> label, in bar order
PHASE2_CASES = [
    (("group", "cpu"), "cpu, group"),
    (("channel", "cpu"), "cpu, channel"),
    (("group", "torch"), "torch, group"),
    (("group", "authors' loop"), "authors'-style loop"),
]
STEP_METHODS = [
    ("per-task backward", "per-task backward"),
    ("ours phase 2", "ours, Phase 2"),
    ("authors' phase 2", "authors'-style Phase 2"),
    ("pcgrad", "PCGrad (torchjd)"),
    ("upgrad", "UPGrad (torchjd)"),
    ("cagrad", "CAGrad (torchjd)"),
]
SAVE = {"dpi": 110, "metadata": {"Software": None}}  # no version stamp: same input, same file


def load(name: str) -> dict[str, Any]:
    result: dict[str, Any] = json.loads((RESULTS / name).read_text())
    return result


def phase2_vs_floor(out: Path) -> Path:
    """Grouped bars of ``x_floor`` per workload, one panel per run (log scale)."""
    fig, axes = plt.subplots(1, len(PHASE2_RUNS), figsize=(11, 3.8), sharey=True)
    for ax, (condition, name) in zip(axes, PHASE2_RUNS.items(), strict=True):
        run = load(name)
        workloads = [tuple(w) for w in run["config"]["workloads"]]
        rows = {(r["model"], r["tasks"], r["mode"], r["backend"]): r for r in run["rows"]}
        width = 0.8 / len(PHASE2_CASES)
        for k, ((mode, backend), label) in enumerate(PHASE2_CASES):
            values = [rows[(m, t, mode, backend)]["x_floor"] for m, t in workloads]
            xs = [i + (k - (len(PHASE2_CASES) - 1) / 2) * width for i in range(len(workloads))]
            ax.bar(xs, values, width, label=label)
        ax.axhline(1.0, color="black", linewidth=1, linestyle="--", label="floor (torch.sum)")
        ax.set_yscale("log")
        ax.set_xticks(range(len(workloads)))
        ax.set_xticklabels([f"{m.replace('resnet', 'R')}\nT={t}" for m, t in workloads])
        ax.set_title(f"{condition} ({name})", fontsize=9)
        ax.grid(axis="y", which="both", alpha=0.3)
    axes[0].set_ylabel("time / floor (same run)")
    axes[0].legend(fontsize=8, loc="upper left")
    fig.suptitle(f"Whole-model Phase 2, fp32, {load(PHASE2_RUNS['quiet'])['device']}", fontsize=10)
    fig.tight_layout()
    path = out / "phase2-vs-floor.png"
    fig.savefig(path, **SAVE)
    plt.close(fig)
    return path


def training_step(out: Path, backbone: str = "resnet50", tasks: int = 3) -> Path:
    """Horizontal bars: ms per training step, the combining part in a darker shade."""
    run = load(STEP_RUN)
    rows = {r["method"]: r for r in run["rows"] if (r["backbone"], r["tasks"]) == (backbone, tasks)}
    methods = [(key, label) for key, label in STEP_METHODS if key in rows]
    fig, ax = plt.subplots(figsize=(8, 3.6))
    for i, (key, _) in enumerate(methods):
        row = rows[key]
        combine = row["combine_ms"] or 0.0
        ax.barh(i, row["ms"] - combine, color="#8fb3d9")
        ax.barh(i, combine, left=row["ms"] - combine, color="#c0392b")
        ax.text(
            row["ms"] + 8,
            i,
            f"{row['ms']:.0f} ms ({row['x_backward']:.2f}x)",
            va="center",
            fontsize=8,
        )
    ax.set_yticks(range(len(methods)))
    ax.set_yticklabels([label for _, label in methods], fontsize=9)
    ax.invert_yaxis()
    ax.set_xlabel("median ms per training step (x: over the per-task backward step)")
    ax.set_xlim(0, max(rows[k]["ms"] for k, _ in methods) * 1.25)
    ax.legend(
        ["forward, backward, update", "combining the per-task gradients"],
        fontsize=8,
        loc="upper center",
        bbox_to_anchor=(0.5, -0.22),
        ncol=2,
    )
    ax.set_title(
        f"One training step, dense multi-task {backbone}, T={tasks}, {run['device']} ({STEP_RUN})",
        fontsize=9,
    )
    fig.tight_layout()
    path = out / "training-step.png"
    fig.savefig(path, **SAVE)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img", help="output folder")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    written = [phase2_vs_floor(args.out), training_step(args.out)]
    for path in written:
        print(f"wrote {path}")
    return written


if __name__ == "__main__":
    main()
