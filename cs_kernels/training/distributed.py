"""Data-parallel training: one all-reduce per step instead of one per task.

With the model wrapped in ``DistributedDataParallel``, every per-task backward runs under
``model.no_sync()`` (DDP's own bucketed all-reduce would run once per task and could not see
the stacked buffer). The controller then averages its whole flat storage -- the ``[T, N]``
rows, the task-specific gradients and the model's floating-point buffers, packed behind
them -- with a single ``all_reduce``, and every rank runs Phase 2 on identical inputs.

Buffers: DDP normally broadcasts rank 0's buffers (BatchNorm running statistics) before each
forward, but not under ``no_sync``. Averaging them in the same all-reduce keeps the ranks
identical (the strengths read the running variances) at no extra collective.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn


def unwrap(model: nn.Module) -> tuple[nn.Module, nn.parallel.DistributedDataParallel | None]:
    """``(inner module, the DDP wrapper or None)``."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        inner = model.module
        assert isinstance(inner, nn.Module)
        return inner, model
    return model, None


class Synchronizer:
    """Averages a flat storage across the ranks of a DDP model's process group.

    Args:
        ddp: the wrapper (None: a single process; every method is then a no-op).
        buffers: the model buffers to average with the gradients (floating point, of the
            storage dtype); they are packed into the storage's ``sync`` area.
    """

    def __init__(
        self, ddp: nn.parallel.DistributedDataParallel | None, buffers: Sequence[Tensor] = ()
    ) -> None:
        self.ddp = ddp
        self.buffers = list(buffers) if ddp is not None else []
        self.group = ddp.process_group if ddp is not None else None
        self.world_size = dist.get_world_size(self.group) if ddp is not None else 1
        self.reductions = 0  # all-reduce calls made (for tests and logs)

    @property
    def active(self) -> bool:
        return self.ddp is not None

    @property
    def sync_numel(self) -> int:
        return sum(b.numel() for b in self.buffers)

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """DDP's ``no_sync`` (gradients stay local until `all_reduce`)."""
        if self.ddp is None:
            yield
            return
        with self.ddp.no_sync():
            yield

    def all_reduce(self, storage: Tensor, sync: Tensor) -> None:
        """Average ``storage`` over the ranks in place, model buffers included.

        ``sync`` is the storage's area for the packed buffers.
        """
        if self.ddp is None:
            return
        views = _split(sync, self.buffers)
        if views:
            torch._foreach_copy_(views, self.buffers)
        dist.all_reduce(storage, op=dist.ReduceOp.SUM, group=self.group)
        self.reductions += 1
        storage.div_(self.world_size)
        if views:
            with torch.no_grad():
                torch._foreach_copy_(self.buffers, views)


def model_buffers(model: nn.Module, dtype: torch.dtype) -> list[Tensor]:
    """The model's floating-point buffers of ``dtype`` (running statistics), in model order."""
    return [b for b in model.buffers() if b.dtype == dtype]


def _split(flat: Tensor, tensors: Sequence[Tensor]) -> list[Tensor]:
    views, o = [], 0
    for t in tensors:
        views.append(flat[o : o + t.numel()].view_as(t))
        o += t.numel()
    return views
