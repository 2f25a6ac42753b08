"""Per-task factors ``f_t[c]`` of every connection layer, read live from the model.

`FactorTable.compute` returns the ``[T, total_channels]`` scales that
`cs_kernels.phase2_from_weights` and the strength take (layers in plan order). Every entry
has the form ``f = a * g^2 / (v + e)``:

- BatchNorm: ``a = 1``, ``g = gamma`` (1 without affine), ``v = running_var`` (0 without
  running statistics, then ``e = 1``), ``e = eps`` -- exactly `cs_kernels.batchnorm_scale`.
- GroupNorm, LayerNorm over the channel alone: ``g = gamma``, ``v = 0``, ``e = 1``.
- Linear head, LayerNorm over more than the channel, ``[C]`` tensor: ``a`` = the factor
  (computed per entry), ``g = 1``, ``v = 0``, ``e = 1``.
- A task without a link: ``a = 0``.

So the BatchNorm/GroupNorm case, the common one, costs three concatenations and a few
elementwise kernels for the whole model, whatever the number of layers and tasks.

Sharded models (FSDP2) compute the factors in two halves: `FactorTable.parts` gives ``(a, g)``
from what this process holds, through a ``read`` function that makes every entry a share
that sums over the processes to the whole (the model's own sum of squares are taken after
``read``); `FactorTable.combine` finishes ``a * g^2 / (v + e)`` once the shares are summed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from cs_kernels.training.discovery import Connection, TaskLink

Read = Callable[[Tensor], Tensor]
_Source = Callable[[Read], Tensor]


def _same(tensor: Tensor) -> Tensor:
    return tensor


def _head_factor(link: TaskLink, channels: int) -> _Source:
    weight = link.module.weight if link.module is not None else None
    assert isinstance(weight, Tensor)

    def compute(read: Read) -> Tensor:
        columns = read(weight.detach()).square().sum(dim=0)  # ||H[:, col]||^2 per input column
        if link.channel_first:
            return columns.view(channels, link.group).sum(dim=1)
        return columns.view(link.group, channels).sum(dim=0)

    return compute


def _layernorm_factor(link: TaskLink, channels: int) -> _Source:
    weight = link.module.weight if link.module is not None else None
    assert isinstance(weight, Tensor)

    def compute(read: Read) -> Tensor:
        g2 = read(weight.detach()).square()
        if link.channel_first:
            return g2.reshape(channels, -1).mean(dim=1)
        return g2.reshape(-1, channels).mean(dim=0)

    return compute


class FactorTable:
    """Builds ``[T, total_channels]`` factors for ``connections`` (plan order) and ``tasks``.

    Args:
        connections: the connection layers in plan order.
        tasks: task names, in buffer-row order.
        device: where the factors live (the shared weights' device).
        dtype: the result dtype (fp32, or fp64 for fp64 weights).
        read: for `parts`: maps each tensor an entry is made of (module parameters, the
            table's own constants; never ``running_var``) to this process's share of it.
    """

    def __init__(
        self,
        connections: Sequence[Connection],
        tasks: Sequence[str],
        device: torch.device,
        dtype: torch.dtype,
        read: Read | None = None,
    ) -> None:
        self.num_tasks = len(tasks)
        self._read = read
        self.total_channels = sum(c.channels for c in connections)
        self.dtype = dtype
        ones: dict[int, Tensor] = {}
        zeros: dict[int, Tensor] = {}

        def one(c: int) -> Tensor:
            return ones.setdefault(c, torch.ones(c, device=device, dtype=dtype))

        def zero(c: int) -> Tensor:
            return zeros.setdefault(c, torch.zeros(c, device=device, dtype=dtype))

        self._a: list[Tensor | _Source] = []  # a tensor is read as is (live), else called
        dynamic = False
        self._g: list[Tensor] = []
        self._v: list[Tensor] = []
        eps: list[Tensor] = []
        for task in tasks:  # row-major: task t's channels, layer by layer
            for conn in connections:
                c = conn.channels
                link = conn.links.get(task)
                a: Tensor | _Source = one(c)
                g, v, e = one(c), zero(c), 1.0
                if link is None:
                    a = zero(c)
                elif link.kind == "batchnorm":
                    assert link.module is not None
                    gamma, var = link.module.weight, link.module.running_var
                    if isinstance(gamma, Tensor):
                        g = gamma
                    if isinstance(var, Tensor):
                        eps_value = link.module.eps
                        assert isinstance(eps_value, float)
                        v, e = var, eps_value
                elif link.kind == "groupnorm" or (link.kind == "layernorm" and link.group == 1):
                    assert link.module is not None and isinstance(link.module.weight, Tensor)
                    weight = link.module.weight
                    g = weight if read is not None else weight.view(c)
                elif link.kind == "layernorm":
                    a, dynamic = _layernorm_factor(link, c), True
                elif link.kind == "linear_head":
                    a, dynamic = _head_factor(link, c), True
                else:
                    assert link.tensor is not None
                    a, dynamic = link.tensor, True
                self._a.append(a)
                self._g.append(g)
                self._v.append(v)
                eps.append(torch.full((c,), e, dtype=dtype, device=device))
        self._eps = (
            torch.cat(eps) if eps else torch.empty(0, dtype=dtype, device=device)
        ).contiguous()
        # Without heads, LayerNorm maps or user tensors, `a` is constant: fold it once.
        self._a_cache = None if dynamic or not self._a else self._gather_a()

    def _gather_a(self, read: Read = _same) -> Tensor:
        return torch.cat([read(a) if isinstance(a, Tensor) else a(read) for a in self._a]).to(
            self.dtype
        )

    def constant_a(self) -> Tensor | None:
        """``[T * total_channels]`` ``a`` when it is constant (no linear heads, LayerNorm maps
        or user tensors: the table's own ones and zeros), else None."""
        return self._a_cache

    def g_entries(self) -> list[tuple[int, Tensor]]:
        """``(offset, tensor)`` of every ``g`` entry: its place in the flat ``[T *
        total_channels]`` layout of `parts`' second half, and the tensor it is read from
        (a module parameter or a table constant, ``numel`` = the layer's channels)."""
        entries, offset = [], 0
        for g in self._g:
            entries.append((offset, g))
            offset += g.numel()
        return entries

    def compute(self) -> Tensor:
        """``[T, total_channels]`` factors from the live module parameters (detached)."""
        with torch.no_grad():
            if self.total_channels == 0:
                return self._eps.new_zeros(self.num_tasks, 0)
            if self._read is not None:
                raise RuntimeError("a FactorTable with read= computes parts(), then combine()")
            a = self._a_cache if self._a_cache is not None else self._gather_a()
            return self._finish(a, torch.cat(self._g).to(self.dtype))

    def parts(self) -> Tensor:
        """``[2, T, total_channels]``: this process's shares of ``a`` and ``g`` (via ``read``)."""
        read = self._read if self._read is not None else _same
        with torch.no_grad():
            a = self._gather_a(read)
            g = torch.cat([read(g.detach()).reshape(-1) for g in self._g]).to(self.dtype)
            return torch.stack([a, g]).view(2, self.num_tasks, self.total_channels)

    def combine(self, parts: Tensor) -> Tensor:
        """``[T, total_channels]`` factors from the summed `parts` and the live ``v``."""
        with torch.no_grad():
            flat = parts.reshape(2, -1)
            return self._finish(flat[0], flat[1])

    def _finish(self, a: Tensor, g: Tensor) -> Tensor:
        v = torch.cat(self._v).to(self.dtype)
        factor = a * g.square() / (v + self._eps)
        return factor.view(self.num_tasks, self.total_channels)
