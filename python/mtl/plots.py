"""PNG plots of training runs (matplotlib, headless)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib
import torch

matplotlib.use("Agg")  # no display needed; must precede pyplot
import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator
from torch import Tensor

from mtl.data.base import Split, TaskSpec
from mtl.data.multidigits import TASKS
from mtl.results import RunResult


def plot_curves(
    runs: Mapping[str, RunResult],
    tasks: Sequence[str],
    path: Path,
    specs: Mapping[str, TaskSpec] | None = None,
) -> Path:
    """Per task: training loss (top row) and validation metric (bottom row) per epoch.

    ``runs`` maps a label (e.g. the method) to its result; one line per label. ``specs``
    describe the tasks (default: MultiDigits').
    """
    specs = specs or TASKS
    fig, axes = plt.subplots(2, len(tasks), figsize=(4 * len(tasks), 6), squeeze=False)
    for col, task in enumerate(tasks):
        spec = specs[task]
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


def _dense_image(kind: str, value: Tensor, depth_range: tuple[float, float]) -> dict[str, object]:
    """``imshow`` arguments for one example's target or prediction of a dense task."""
    if kind == "segment":
        return {"X": value.squeeze(0).numpy(), "cmap": "tab10", "vmin": 0, "vmax": 9}
    if kind == "depth":
        low, high = depth_range
        return {"X": value.squeeze(0).float().numpy(), "cmap": "viridis", "vmin": low, "vmax": high}
    if kind == "normal":  # unit vectors to colours: (n + 1) / 2
        return {"X": ((value.float() + 1) / 2).clamp(0, 1).permute(1, 2, 0).numpy()}
    raise ValueError(f"no picture for task kind {kind!r}")


def plot_dense_predictions(
    split: Split,
    tasks: Sequence[str],
    predictions: Mapping[str, Mapping[str, Tensor]],
    path: Path,
    specs: Mapping[str, TaskSpec],
    class_names: Sequence[str] = (),
) -> Path:
    """A grid of the first test examples: the input, then per task the ground truth and each
    label's prediction (``predictions[label][task]``: ``[n, ...]``, as ``predict`` gives them).

    Segmentation: one colour per class (legend below); depth: one colour scale per row, the
    ground truth's range; normals: ``(n + 1) / 2`` as RGB.
    """
    labels = list(predictions)
    count = min(len(next(iter(p.values()))) for p in predictions.values())
    columns = [("input", "", None)]
    for task in tasks:
        columns.append((task, "truth", None))
        columns += [(task, label, label) for label in labels]
    fig, axes = plt.subplots(
        count, len(columns), figsize=(1.3 * len(columns), 1.4 * count + 0.6), squeeze=False
    )
    for row in range(count):
        image = split.images[row].cpu()
        image = image.float() / 255 if image.dtype == torch.uint8 else image.float()
        targets = {t: split.targets[t][row].cpu() for t in tasks}
        depth = [targets[t] for t in tasks if specs[t].kind == "depth"]
        depth_range = (float(depth[0].min()), float(depth[0].max())) if depth else (0.0, 1.0)
        for col, (task, title, label) in enumerate(columns):
            ax = axes[row, col]
            ax.set_xticks([])
            ax.set_yticks([])
            if task == "input":
                ax.imshow(image.permute(1, 2, 0).clamp(0, 1).numpy())
            else:
                value = targets[task] if label is None else predictions[label][task][row]
                ax.imshow(**_dense_image(specs[task].kind, value, depth_range))  # type: ignore[arg-type]
            if row == 0:
                ax.set_title(task if task == "input" else f"{task}\n{title}", fontsize=7)
    if class_names:
        cmap = plt.get_cmap("tab10")
        handles = [
            matplotlib.patches.Patch(color=cmap(i), label=name)
            for i, name in enumerate(class_names)
        ]
        fig.legend(handles=handles, loc="lower center", ncol=len(class_names), fontsize=7)
    fig.tight_layout(rect=(0, 0.06 if class_names else 0, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
