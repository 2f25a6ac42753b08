"""The stacked gradient buffer ``[T, N]`` whose rows the shared parameters' ``.grad`` view.

Zero-copy collection: before task ``t``'s backward, every shared parameter's ``.grad`` is set
to its segment of row ``t`` (``grads[t, off:off + n].view_as(p)``). Autograd accumulates into
an existing ``.grad`` in place (``AccumulateGrad`` adds into it when the backward runs
without ``create_graph``), so each task's gradient lands in its row with no clone, stack or
copy. After Phase 2 the ``.grad`` tensors are views into the ``[N]`` result instead, ready for
``optimizer.step()``.

Everything lives in one flat storage so that a distributed run reduces it with a single
all-reduce: ``[T * N | extra gradients | packed model buffers]``.

Parameters sharded by FSDP2 (DTensors) take their local shard's place: ``N`` counts local
elements and each ``.grad`` is a DTensor wrapping its segment of the row.

Half-size rows (``dtype=torch.bfloat16`` or ``torch.float16`` for fp32 parameters): autograd
only accumulates into a ``.grad`` of the parameter's dtype, so a row cannot be viewed as
``.grad``. Each task's backward then lands in the fp32 ``[N]`` ``out`` (free until Phase 2
writes it) and is rounded into its row once (`end_row`): ``T * N`` half-size elements plus
one fp32 ``[N]`` instead of ``T * N`` fp32 ones, for one extra pass over ``N`` per task.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import torch
from torch import Tensor, nn

from cs_kernels.training.fsdp import as_grad, local_tensor


class GradientBuffer:
    """One flat storage for the per-task gradients of ``params`` (and optional extras).

    Args:
        params: the shared parameters, in buffer order (one dtype, one device; a DTensor
            contributes its local shard).
        num_tasks: ``T``, the number of rows.
        extra: parameters whose ``.grad`` also lives in the storage, after the rows, summed
            over tasks (task-specific parameters, for the distributed all-reduce).
        sync_numel: room for packed model buffers at the end of the storage.
        dtype: the rows' dtype (default: the parameters'); bf16/fp16 for fp32 parameters
            gives half-size rows (single process only: no ``extra``, no ``sync_numel``).

    Attributes:
        grads: ``[T, N]`` rows of per-task gradients (a view of ``storage``).
        out: ``[N]`` combined gradient, of the parameters' dtype (separate memory: Phase 2
            may not write its input); with half-size rows also each task's staging area.
        reduced: whether the rows are narrower than the parameters.
        tail: ``[M]`` gradients of ``extra``; sync: ``[sync_numel]``.
        offsets: each parameter's first element in a row.
    """

    def __init__(
        self,
        params: Sequence[nn.Parameter],
        num_tasks: int,
        *,
        extra: Sequence[nn.Parameter] = (),
        sync_numel: int = 0,
        dtype: torch.dtype | None = None,
    ) -> None:
        if not params:
            raise ValueError("params must hold at least one shared parameter")
        first = params[0]
        for p in (*params, *extra):
            if p.dtype != first.dtype or p.device != first.device:
                raise TypeError(
                    "every shared parameter must have one dtype and device for the stacked "
                    f"buffer: found {p.dtype} on {p.device} beside {first.dtype} on {first.device}"
                )
        self.params = tuple(params)
        self.extra = tuple(extra)
        self.num_tasks = num_tasks
        self._shapes = [local_tensor(p).shape for p in self.params]
        offsets, n = [], 0
        for shape in self._shapes:
            offsets.append(n)
            n += shape.numel()
        self.offsets: tuple[int, ...] = tuple(offsets)
        self.numel = n
        extra_numel = sum(p.numel() for p in self.extra)
        device = first.device
        row_dtype = first.dtype if dtype is None else dtype
        self.reduced = row_dtype != first.dtype
        if self.reduced and (extra_numel or sync_numel):
            raise ValueError("half-size rows hold no extra gradients or packed buffers")
        self.storage = torch.zeros(
            num_tasks * n + extra_numel + sync_numel, dtype=row_dtype, device=device
        )
        self.grads = self.storage[: num_tasks * n].view(num_tasks, n)
        self.tail = self.storage[num_tasks * n : num_tasks * n + extra_numel]
        self.sync = self.storage[num_tasks * n + extra_numel :]
        self.out = torch.zeros(n, dtype=first.dtype, device=device)
        # Views are built once: attaching a row is then only attribute assignments.
        self._out_views = self._views(self.out)
        self._rows = (
            [self._out_views] * num_tasks
            if self.reduced
            else [self._views(self.grads[t]) for t in range(num_tasks)]
        )
        self._extra_views = _split(self.tail, self.extra)

    def _views(self, row: Tensor) -> list[Tensor]:
        return [
            as_grad(p, row[o : o + shape.numel()].view(shape))
            for o, p, shape in zip(self.offsets, self.params, self._shapes, strict=True)
        ]

    def offset_of(self, param: Tensor) -> int:
        """First element of ``param`` within a row."""
        for o, p in zip(self.offsets, self.params, strict=True):
            if p is param:
                return o
        raise KeyError("not a buffered parameter")

    def zero_(self) -> None:
        """Zero every row, the extra gradients and the sync area (one kernel)."""
        self.storage.zero_()

    def attach_row(self, task: int, only: Collection[int] | None = None) -> None:
        """Point each parameter's ``.grad`` at row ``task`` (those in ``only`` ids, if given).

        With half-size rows: at the zeroed fp32 staging area instead (see `end_row`)."""
        if self.reduced:
            self.out.zero_()
        for p, view in zip(self.params, self._rows[task], strict=True):
            if only is None or id(p) in only:
                p.grad = view

    def end_row(self, task: int, *, add: bool) -> None:
        """After task ``task``'s backward: with half-size rows, round the staged fp32
        gradient into its row (``add``: add it to what the row holds, in fp32, rounded once).
        Full-size rows already hold it: nothing to do."""
        if not self.reduced:
            return
        row = self.grads[task]
        if add:
            row.add_(self.out)
        else:
            row.copy_(self.out)

    def attach_out(self) -> None:
        """Point each parameter's ``.grad`` at its segment of ``out``."""
        for p, view in zip(self.params, self._out_views, strict=True):
            p.grad = view

    def attach_extra(self) -> None:
        for p, view in zip(self.extra, self._extra_views, strict=True):
            p.grad = view

    def detached_from_row(self, task: int, only: Collection[int] | None = None) -> list[int]:
        """Indices of parameters whose ``.grad`` is no longer row ``task``'s view."""
        return [
            i
            for i, (p, view) in enumerate(zip(self.params, self._rows[task], strict=True))
            if (only is None or id(p) in only) and p.grad is not view
        ]


def _split(flat: Tensor, params: Sequence[Tensor]) -> list[Tensor]:
    views, o = [], 0
    for p in params:
        views.append(flat[o : o + p.numel()].view_as(p))
        o += p.numel()
    return views
