"""A small multi-task conv net for MultiDigits, in the paper's layout, and the task losses.

Every shared conv is followed by a task-specific BatchNorm (the paper's task-specific
connection), named as in the authors' convention: ``<block>.conv`` then ``<block>.bn[task]``.
The forward pass runs one task: ``model(x, task="left")``. A single-task baseline is the same
class built with one task.

Layout for ``width=w`` on a ``[B, 1, 20, 20]`` input::

    block1: conv 3x3 1->w,   bn[task], ReLU, maxpool 2   [B, w, 10, 10]
    block2: conv 3x3 w->w,   bn[task], ReLU              [B, w, 10, 10]
    block3: conv 3x3 w->2w,  bn[task], ReLU              [B, 2w, 10, 10]
    block4: conv 3x3 2w->2w, bn[task], ReLU              [B, 2w, 10, 10]
    head (classify):        avgpool to 5x5, flatten, linear 50w->64, ReLU, linear 64->10
    head (regress/segment): conv 3x3 2w->w, ReLU, transposed conv 2x2 stride 2 w->1
                                                         [B, 1, 20, 20]
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from mtl.data.multidigits import NUM_CLASSES, TASKS, check_tasks


class SharedBlock(nn.Module):
    """A shared conv followed by one BatchNorm per task (``bn[task]``) and a ReLU."""

    def __init__(self, in_channels: int, out_channels: int, tasks: Sequence[str]) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.bn = nn.ModuleDict({t: nn.BatchNorm2d(out_channels) for t in tasks})

    def forward(self, x: Tensor, task: str) -> Tensor:
        return F.relu(self.bn[task](self.conv(x)))


def _head(task: str, width: int) -> nn.Module:
    if TASKS[task].kind == "classify":
        return nn.Sequential(
            nn.AdaptiveAvgPool2d(5),
            nn.Flatten(),
            nn.Linear(2 * width * 25, 64),
            nn.ReLU(),
            nn.Linear(64, NUM_CLASSES),
        )
    return nn.Sequential(
        nn.Conv2d(2 * width, width, 3, padding=1),
        nn.ReLU(),
        nn.ConvTranspose2d(width, 1, 2, stride=2),
    )


class MultiDigitsNet(nn.Module):
    """Shared conv backbone with task-specific BatchNorms and one head per task.

    ``forward(x: [B, 1, 20, 20], task)`` returns logits ``[B, 10]`` for a classification task
    and ``[B, 1, 20, 20]`` (logits for ``mask``, intensities for ``clean``) for a dense one.
    """

    def __init__(self, tasks: Sequence[str], width: int = 32) -> None:
        super().__init__()
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise ValueError(f"width must be a positive int, got {width!r}")
        self.tasks = check_tasks(list(tasks))
        self.block1 = SharedBlock(1, width, self.tasks)
        self.block2 = SharedBlock(width, width, self.tasks)
        self.block3 = SharedBlock(width, 2 * width, self.tasks)
        self.block4 = SharedBlock(2 * width, 2 * width, self.tasks)
        self.heads = nn.ModuleDict({t: _head(t, width) for t in self.tasks})

    def forward(self, x: Tensor, task: str) -> Tensor:
        if task not in self.heads:
            raise ValueError(f"task must be one of {list(self.tasks)}, got {task!r}")
        x = F.max_pool2d(self.block1(x, task), 2)
        x = self.block2(x, task)
        x = self.block4(self.block3(x, task), task)
        out: Tensor = self.heads[task](x)
        return out

    def blocks(self) -> Iterator[SharedBlock]:
        """The shared blocks, input to output."""
        yield from (self.block1, self.block2, self.block3, self.block4)

    def shared_parameters(self) -> list[Tensor]:
        """Parameters every task uses: the shared convs' weights."""
        return [b.conv.weight for b in self.blocks()]

    def task_parameters(self, task: str) -> list[Tensor]:
        """Parameters only ``task`` uses: its BatchNorms and its head."""
        params: list[Tensor] = [p for b in self.blocks() for p in b.bn[task].parameters()]
        return params + list(self.heads[task].parameters())


def task_loss(task: str, output: Tensor, target: Tensor) -> Tensor:
    """The training loss of ``task`` (mean over the batch): see multidigits.TASKS."""
    kind = TASKS[task].kind
    if kind == "classify":
        return F.cross_entropy(output, target)
    if kind == "segment":
        return F.binary_cross_entropy_with_logits(output, target)
    return F.mse_loss(output, target)


def predict(task: str, output: Tensor) -> Tensor:
    """Turn a head's output into a prediction: class ids, 0/1 mask, or clipped intensities."""
    kind = TASKS[task].kind
    if kind == "classify":
        return output.argmax(dim=1)
    if kind == "segment":
        return (output > 0).float()
    return output.clamp(0.0, 1.0)


def count_parameters(model: nn.Module) -> int:
    """Number of parameter elements."""
    return sum(p.numel() for p in model.parameters())
