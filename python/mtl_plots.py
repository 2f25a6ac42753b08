"""PNG plots of training runs (matplotlib, headless)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display needed; must precede pyplot
import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator
from mtl_train import RunResult
from multidigits import TASKS


def plot_curves(runs: Mapping[str, RunResult], tasks: Sequence[str], path: Path) -> Path:
    """Per task: training loss (top row) and validation metric (bottom row) per epoch.

    ``runs`` maps a label (e.g. the method) to its result; one line per label.
    """
    fig, axes = plt.subplots(2, len(tasks), figsize=(4 * len(tasks), 6), squeeze=False)
    for col, task in enumerate(tasks):
        spec = TASKS[task]
        for label, run in runs.items():
            epochs = range(1, len(run.history) + 1)
            axes[0, col].plot(epochs, [h["loss"][task] for h in run.history], label=label)
            axes[1, col].plot(epochs, [h["val"][task] for h in run.history], label=label)
        axes[0, col].set_title(f"{task}: training loss")
        axes[0, col].set_yscale("log")
        arrow = "lower is better" if spec.lower_is_better else "higher is better"
        axes[1, col].set_title(f"{task}: validation {spec.metric} ({arrow})")
        axes[1, col].set_xlabel("epoch")
        for ax in axes[:, col]:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0, 0].legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
