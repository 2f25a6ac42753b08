"""A small multi-task model and helpers shared by the mixed-precision, accumulation and
clipping suites (single process and DDP/FSDP2 workers)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

TASKS = ["seg", "depth", "normal"]


class AmpNet(nn.Module):
    """Two shared convs, each read by per-task BatchNorms (or GroupNorms: no running
    statistics, for bf16 parameters), and per-task heads."""

    def __init__(self, tasks: list[str] = TASKS, norm: str = "batch") -> None:
        super().__init__()

        def norm_of(c: int) -> nn.Module:
            return nn.BatchNorm2d(c) if norm == "batch" else nn.GroupNorm(2, c)

        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn1 = nn.ModuleDict({t: norm_of(6) for t in tasks})
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1, bias=False)
        self.bn2 = nn.ModuleDict({t: norm_of(8) for t in tasks})
        self.heads = nn.ModuleDict({t: nn.Linear(8, 3) for t in tasks})

    def forward(self, x: Tensor, task: str) -> Tensor:
        h = F.relu(self.bn1[task](self.conv1(x)))
        h = F.relu(self.bn2[task](self.conv2(h)))
        return self.heads[task](h.mean(dim=(2, 3)))


def make_model(
    dtype: torch.dtype = torch.float32, *, eval_mode: bool = True, norm: str = "batch"
) -> AmpNet:
    """Seeded weights; spread BatchNorm scales and running statistics (so strengths differ
    between tasks and channels); eval mode by default (a batch's gradient is then the mean
    of its parts' gradients)."""
    torch.manual_seed(0)
    model = AmpNet(norm=norm)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.GroupNorm):
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) * 2 + 0.1)
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) * 2 + 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
    model.train(not eval_mode)
    return model.to(dtype)


def make_batch(n: int = 8, seed: int = 2, dtype: torch.dtype = torch.float32):  # type: ignore[no-untyped-def]
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 6, 6, generator=gen).to(dtype)
    return x, {t: torch.randint(0, 3, (n,), generator=gen) for t in TASKS}


def loss_fn_for(model: nn.Module, x: Tensor, y: dict[str, Tensor]) -> Callable[[str], Tensor]:
    return lambda task: F.cross_entropy(model(x, task=task), y[task])


def micro_loss_fn(
    model: nn.Module, x: Tensor, y: dict[str, Tensor], k: int
) -> Callable[[str, int], Tensor]:
    """``loss_fn(task, micro)``: the mean loss over micro-batch ``micro`` of ``k`` equal ones."""
    xs, size = x.chunk(k), x.shape[0] // k

    def loss(task: str, micro: int) -> Tensor:
        part = slice(micro * size, (micro + 1) * size)
        return F.cross_entropy(model(xs[micro], task=task), y[task][part])

    return loss


def snapshot(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Tensor]:
    """Every parameter and every optimizer state tensor, cloned."""
    state = {f"p.{n}": p.detach().clone() for n, p in model.named_parameters()}
    for i, st in enumerate(opt.state.values()):
        for key, value in st.items():
            if isinstance(value, Tensor):
                state[f"opt.{i}.{key}"] = value.clone()
    return state


def same(a: dict[str, Tensor], b: dict[str, Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
