"""Priority telemetry: per layer, the share of channels whose top-priority task is each task.

This is what the paper plots in its Figures 4 and 5 (how task priority settles across the
layers and over training). `PriorityTelemetry.record` runs at every Phase 2 step on the
device, without a host synchronisation: it adds one ``[L, T]`` count tensor into the
current epoch's running sum. The counts reach the host only when read (`fractions`,
`state_dict`, `plot`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor


class PriorityTelemetry:
    """Per-epoch top-priority shares of every connection layer.

    Args:
        layers: the connection layers' names, in plan order.
        channels: their channel counts.
        tasks: the task names, in buffer-row order.
    """

    def __init__(self, layers: Sequence[str], channels: Sequence[int], tasks: Sequence[str]):
        if len(layers) != len(channels):
            raise ValueError(f"{len(layers)} layer names but {len(channels)} channel counts")
        self.layers = tuple(layers)
        self.channels = tuple(int(c) for c in channels)
        self.tasks = tuple(tasks)
        self._layer_of_channel = torch.repeat_interleave(
            torch.arange(len(self.layers)), torch.tensor(self.channels, dtype=torch.int64)
        )
        self._by_device: dict[torch.device, Tensor] = {}
        self._counts: dict[int, Tensor] = {}  # epoch -> int64 [L, T] summed over its steps
        self._steps: dict[int, int] = {}

    def record(self, top: Tensor, epoch: int) -> None:
        """Add one step's top-priority tasks (int64 ``[total_channels]``) to ``epoch``."""
        if top.shape != self._layer_of_channel.shape:
            raise ValueError(
                f"top must be [{self._layer_of_channel.numel()}], got {tuple(top.shape)}"
            )
        index = self._by_device.get(top.device)
        if index is None:
            index = self._by_device.setdefault(
                top.device, (self._layer_of_channel * len(self.tasks)).to(top.device)
            )
        size = len(self.layers) * len(self.tasks)
        counts = torch.bincount(index + top, minlength=size).view(len(self.layers), -1)
        if epoch in self._counts:
            self._counts[epoch] += counts.to(self._counts[epoch].device)
        else:
            self._counts[epoch] = counts
        self._steps[epoch] = self._steps.get(epoch, 0) + 1

    @property
    def epochs(self) -> list[int]:
        """The epochs with at least one recorded step, in order."""
        return sorted(self._counts)

    def fractions(self) -> Tensor:
        """``[E, L, T]`` float64 on the CPU: for each recorded epoch and layer, the mean share
        of channels whose top-priority task is each task (each ``[L, T]`` row sums to 1)."""
        if not self._counts:
            return torch.zeros(0, len(self.layers), len(self.tasks), dtype=torch.float64)
        counts = torch.stack([self._counts[e].cpu() for e in self.epochs]).double()
        steps = torch.tensor([self._steps[e] for e in self.epochs], dtype=torch.float64)
        channels = torch.tensor(self.channels, dtype=torch.float64)
        return counts / (steps[:, None, None] * channels[None, :, None])

    def latest(self) -> dict[str, dict[str, float]]:
        """``{layer: {task: share}}`` for the last recorded epoch."""
        frac = self.fractions()
        if frac.shape[0] == 0:
            return {}
        last = frac[-1]
        return {
            layer: {t: float(last[i, j]) for j, t in enumerate(self.tasks)}
            for i, layer in enumerate(self.layers)
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "layers": list(self.layers),
            "tasks": list(self.tasks),
            "epochs": self.epochs,
            "counts": [self._counts[e].cpu() for e in self.epochs],
            "steps": [self._steps[e] for e in self.epochs],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if list(state["layers"]) != list(self.layers) or list(state["tasks"]) != list(self.tasks):
            raise ValueError(
                "telemetry state is for other layers or tasks: "
                f"{list(state['layers'])} / {list(state['tasks'])}"
            )
        device = next(iter(self._by_device), None)
        self._counts = {
            int(e): c.clone().to(device) if device is not None else c.clone()
            for e, c in zip(state["epochs"], state["counts"], strict=True)
        }
        self._steps = {int(e): int(s) for e, s in zip(state["epochs"], state["steps"], strict=True)}

    def plot(self, path: str, *, title: str | None = None) -> None:
        """Write a PNG: (a) the last epoch's shares per layer as stacked bars (paper Fig. 4);
        (b) each task's share over epochs in the first, middle and last layers (Fig. 5)."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator

        frac = self.fractions()
        if frac.shape[0] == 0:
            raise ValueError("no Phase 2 step recorded yet: nothing to plot")
        fig = Figure(figsize=(12, 4.5))
        FigureCanvasAgg(fig)
        bars, lines = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
        last = frac[-1].numpy()
        x = range(len(self.layers))
        bottom = [0.0] * len(self.layers)
        for j, task in enumerate(self.tasks):
            bars.bar(x, last[:, j], bottom=bottom, label=task)
            bottom = [b + v for b, v in zip(bottom, last[:, j], strict=True)]
        bars.set_xticks(list(x))
        bars.set_xticklabels(self.layers, rotation=90, fontsize=6)
        bars.set_ylim(0, 1)
        bars.set_ylabel("share of channels (top-priority task)")
        bars.set_title(f"(a) per layer, epoch {self.epochs[-1]}")
        bars.legend(fontsize=7)
        shown = sorted({0, len(self.layers) // 2, len(self.layers) - 1})
        styles = ["-", "--", ":"]
        for k, i in enumerate(shown):
            for j, task in enumerate(self.tasks):
                lines.plot(
                    self.epochs,
                    frac[:, i, j].numpy(),
                    styles[k % 3],
                    marker="o" if len(self.epochs) < 20 else None,
                    color=f"C{j}",
                    label=f"{self.layers[i]}: {task}",
                )
        lines.set_ylim(0, 1)
        lines.set_xlabel("epoch")
        lines.xaxis.set_major_locator(MaxNLocator(integer=True))
        lines.set_title("(b) over training")
        lines.legend(fontsize=6)
        if title:
            fig.suptitle(title)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
