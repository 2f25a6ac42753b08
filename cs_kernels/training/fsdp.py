"""FSDP2 (``fully_shard``): Phase 2 on sharded gradients with one small all-reduce per step.

FSDP2 splits every parameter along dim 0 over the ranks of a 1-D device mesh the way
``torch.chunk`` does (rank ``r`` holds rows ``[r*s, min(C, (r+1)*s))``, ``s = ceil(C / W)``;
ranks past the end hold none), so every rank holds *whole output channels* of each
connection layer. The controller then works on the local shards:

- **Collection.** The local buffer is ``[T, N_local]``. Before task ``t``'s backward every
  shared parameter's ``.grad`` is a ``DTensor`` wrapping this rank's segment of row ``t``;
  FSDP2 reduce-scatters the task's gradient (averaged over the ranks) and adds it into that
  ``.grad`` in place, so the row fills with no copy of ours. (The reduce-scatter itself
  writes FSDP2's own output buffer, then adds it in: one pass over ``N_local``, the price
  of not owning FSDP2's buffer.)
- **One all-reduce per Phase 2 step** (`ShardedPhase2.combine`). Everything the priorities
  and the group sums need from other ranks goes into one payload, summed over the ranks:
  ``[C]`` squared row norms of the connection weights (this rank's channels, zeros
  elsewhere), ``[2, T, C]`` shares of the strength factors (`FactorTable.parts`), the
  ``[C, T(T+1)/2]`` per-channel Gram matrices in group mode, and the model's floating-point
  buffers (BatchNorm running statistics, averaged: the strengths read them, and ranks that
  normalised different batches would otherwise pick different top tasks). Then every rank
  computes the same top tasks and projection coefficients for the whole model and projects
  its own rows (`cs_kernels.apply_projection`).
- Why per-channel Gram matrices rather than per-group sums: the groups are known only once
  the top tasks are, and those need every rank's strengths (normalised over the whole layer)
  and the averaged running statistics. The Gram matrices of the channels let one collective
  carry both; the group sums are then formed after it, identically on every rank.

Phase 1 lets FSDP2 reduce each task's gradient as usual and averages the buffers with one
all-reduce at the end of the step.
"""

from __future__ import annotations

import contextlib
import hashlib
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from cs_kernels._validation import accumulation_dtype
from cs_kernels.phase2_steps import (
    apply_projection,
    channel_gram,
    plan_row_sqnorm,
    projection_coefficients,
)
from cs_kernels.plan import Phase2Plan
from cs_kernels.strength import plan_top_priority
from cs_kernels.training.factors import FactorTable

if TYPE_CHECKING:
    from cs_kernels.projection import Mode, UniformRule
    from cs_kernels.training.buffer import GradientBuffer
    from cs_kernels.training.discovery import Connection


def _dtensor_type() -> type | None:
    """``DTensor``, if torch.distributed.tensor is loaded (a model holding DTensors loaded it:
    importing it ourselves would cost half a second at every ``import cs_kernels``)."""
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None)


def is_dtensor(tensor: object) -> bool:
    kind = _dtensor_type()
    return kind is not None and isinstance(tensor, kind)


def local_tensor(tensor: Tensor) -> Tensor:
    """This rank's shard of a DTensor (a view), or the tensor itself."""
    return tensor.to_local() if is_dtensor(tensor) else tensor  # type: ignore[attr-defined]


def local_data(tensor: Tensor) -> Tensor:
    """This rank's shard of a DTensor as a plain tensor, for reading on the hot path: the
    DTensor's own local tensor when it exposes one (no dispatch through the subclass, which
    costs tens of microseconds a call), else `local_tensor`."""
    if not is_dtensor(tensor):
        return tensor
    local = getattr(tensor, "_local_tensor", None)
    return local if isinstance(local, Tensor) else local_tensor(tensor)


def as_grad(param: Tensor, view: Tensor) -> Tensor:
    """What ``param.grad`` must be to hold ``view`` (this rank's shard): a DTensor for a
    DTensor parameter, with the parameter's mesh, placements, shape and stride."""
    if not is_dtensor(param):
        return view
    from torch.distributed.tensor import DTensor

    assert isinstance(param, DTensor)
    return DTensor.from_local(
        view,
        param.device_mesh,
        param.placements,
        run_check=False,
        shape=param.shape,
        stride=param.stride(),
    )


def fsdp_modules(model: nn.Module) -> list[nn.Module]:
    module = sys.modules.get("torch.distributed.fsdp")
    kind = getattr(module, "FSDPModule", None)
    if kind is None:
        return []
    return [m for m in model.modules() if isinstance(m, kind)]


def is_sharded(model: nn.Module) -> bool:
    """Whether ``fully_shard`` (or anything else that makes DTensor parameters) touched it."""
    return bool(fsdp_modules(model)) or any(is_dtensor(p) for p in model.parameters())


def sharded_mesh(inner: nn.Module, ddp: nn.Module | None) -> Mesh | None:
    """The mesh of a ``fully_shard``-ed model, None for an unsharded one. Mixing DDP and
    FSDP2 on one model is out of scope: a clear error."""
    if not is_sharded(inner):
        return None
    if ddp is not None or any(
        isinstance(m, nn.parallel.DistributedDataParallel) for m in inner.modules()
    ):
        raise ValueError(
            "the model mixes DistributedDataParallel and FSDP2 (fully_shard): ConnectionStrength "
            "supports one or the other. Use fully_shard alone (it averages the gradients "
            "across ranks itself), or DistributedDataParallel on an unsharded model."
        )
    return Mesh(inner)


class Mesh:
    """The 1-D device mesh every DTensor parameter of the model is sharded over."""

    def __init__(self, model: nn.Module) -> None:
        mesh: Any = None
        first = ""
        self.device = torch.device("cpu")
        for name, p in model.named_parameters():
            if not is_dtensor(p):
                continue
            dmesh = p.device_mesh  # type: ignore[attr-defined]
            if dmesh.ndim != 1:
                raise ValueError(
                    f"parameter {name} is sharded over a {dmesh.ndim}-D device mesh "
                    f"{tuple(dmesh.shape)}: sharded Phase 2 supports a 1-D FSDP2 mesh "
                    "(HSDP or tensor parallelism is out of scope)"
                )
            if mesh is None:
                mesh, first = dmesh, name
                self.device = local_tensor(p).device
            elif dmesh != mesh:
                raise ValueError(
                    f"parameter {name} is sharded over another device mesh than {first}: "
                    "every sharded parameter must share one mesh"
                )
        if mesh is None:
            raise ValueError("the model has FSDP2 modules but no sharded (DTensor) parameter")
        self.mesh = mesh
        self.group = mesh.get_group()
        self.world = int(mesh.size())
        coordinate = mesh.get_coordinate()
        assert coordinate is not None  # this rank is part of the mesh
        self.rank = int(coordinate[0])

    def rows(self, size: int) -> tuple[int, int]:
        """``[start, stop)`` of dim 0 (of ``size``) that this rank holds: ``torch.chunk``."""
        step = -(-size // self.world)
        start = min(size, self.rank * step)
        return start, min(size, start + step)


def check_layout(name: str, param: Tensor, mesh: Mesh, *, whole_rows: bool) -> None:
    """ValueError naming ``name`` unless ``param`` is sharded over ``mesh`` by FSDP2; with
    ``whole_rows`` it must also be split along dim 0 as ``torch.chunk`` does (each rank then
    holds whole output channels)."""
    if not is_dtensor(param):
        raise ValueError(
            f"parameter {name} is not sharded: under FSDP2 every trainable parameter must "
            "belong to a fully_shard-ed module (FSDP2 averages its gradients across ranks; "
            "nothing else would)"
        )
    if param.device_mesh != mesh.mesh:  # type: ignore[attr-defined]
        raise ValueError(f"parameter {name} is sharded over another device mesh")
    if not whole_rows:
        return
    placements = tuple(param.placements)  # type: ignore[attr-defined]
    if not (
        len(placements) == 1 and type(placements[0]).__name__ == "Shard" and placements[0].dim == 0
    ):
        raise ValueError(
            f"{name} is sharded as {placements}: Phase 2 needs whole output channels (rows "
            "of dim 0) on each rank, i.e. fully_shard's default Shard(0)"
        )
    start, stop = mesh.rows(int(param.shape[0]))
    local = local_tensor(param)
    if tuple(local.shape) != (stop - start, *param.shape[1:]):
        raise ValueError(
            f"{name}: this rank's shard has shape {tuple(local.shape)}, not rows "
            f"[{start}, {stop}) of {tuple(param.shape)}: the plan cannot map it to whole "
            "channels (expected FSDP2's torch.chunk split along dim 0)"
        )


def check_agreement(items: Mapping[str, object], mesh: Mesh) -> None:
    """Every rank must hold the same ``items`` (tasks, options, plan): one all_gather of
    fixed-size digests, made by every rank at the same point, so a mismatch is an error on
    every rank rather than a hang in a later collective."""
    digests = torch.tensor(
        [list(hashlib.sha256(repr(value).encode()).digest()) for value in items.values()],
        dtype=torch.uint8,
    ).to(mesh.device)
    gathered = [torch.empty_like(digests) for _ in range(mesh.world)]
    dist.all_gather(gathered, digests, group=mesh.group)
    table = torch.stack(gathered).cpu()  # [W, K, 32]
    for k, (key, value) in enumerate(items.items()):
        differ = [r for r in range(mesh.world) if not torch.equal(table[r, k], table[0, k])]
        if differ:
            raise ValueError(
                f"the ranks disagree on {key}: rank(s) {differ} differ from rank 0 (this rank "
                f"{mesh.rank} has {value!r}); every rank must build ConnectionStrength with the "
                "same tasks and options on the same model"
            )


@contextlib.contextmanager
def unsharded(
    model: nn.Module, mesh: Mesh | None, run_forward: Callable[[], object]
) -> Iterator[Callable[[], None]]:
    """Hold every FSDP2 module's parameters unsharded (plain full tensors) for tracing.

    ``run_forward`` makes one forward through the root under ``no_grad`` in eval mode first:
    FSDP2 sets up its state on the first forward through the root. Yields ``refresh``,
    which unshards again (FSDP2 reshards non-root modules after each forward). The parameter
    objects an unsharded module holds are the same at every unshard, so the trace's
    parameters are the ones `refresh` restores. With ``mesh=None`` it does nothing.
    """
    if mesh is None:
        yield lambda: None
        return
    modules = fsdp_modules(model)
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            run_forward()
    finally:
        for m, mode in modes:
            m.training = mode

    def refresh() -> None:
        for m in modules:
            m.unshard()  # type: ignore[operator]

    refresh()
    try:
        yield refresh
    finally:
        for m in modules:
            m.reshard()  # type: ignore[operator]


class Twins:
    """The sharded parameter of each unsharded one, by name (FSDP2 swaps the objects).

    Built before `unsharded`; `unsharded_of` maps a user's (sharded) parameter to the object
    the trace sees, `sharded_of` maps traced parameters back after it.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.sharded = dict(model.named_parameters())
        self._names = {id(p): n for n, p in self.sharded.items()}

    def unsharded_of(self, param: Tensor) -> Tensor:
        """The object ``param`` is while the model is unsharded (itself if not a parameter)."""
        name = self._names.get(id(param))
        if name is None:
            return param
        return dict(self.model.named_parameters())[name]

    def sharded_of(self, name: str, traced: nn.Parameter) -> nn.Parameter:
        """The sharded parameter ``name``; checks that ``traced`` really was its unsharded
        form (the same object at every unshard)."""
        param = self.sharded[name]
        if tuple(traced.shape) != tuple(param.shape):
            raise RuntimeError(
                f"parameter {name}: traced with shape {tuple(traced.shape)}, but the sharded "
                f"parameter is {tuple(param.shape)}"
            )
        return param


def _split(flat: Tensor, tensors: Sequence[Tensor]) -> list[Tensor]:
    views, o = [], 0
    for t in tensors:
        views.append(flat[o : o + t.numel()].view(t.shape))
        o += t.numel()
    return views


class ShardedPhase2:
    """Phase 2 of a ``fully_shard``-ed model on the local ``[T, N_local]`` rows.

    Args:
        mesh: the model's `Mesh`.
        connections: the connection layers (sharded weights that passed `check_layout`), in
            plan order.
        tasks: the task names, in buffer-row order.
        buffer: the local `GradientBuffer` of the shared parameters.
        plan: the whole model's plan (every channel; offsets in the unsharded layout).
        buffers: the model buffers to average (floating point, any dtype).
        mode, uniform, backend: as in `cs_kernels.phase2`.

    Attributes:
        plan: the local plan (this rank's rows of every layer that has any) over the buffer.
        local_channels: int64 ``[C_local]``, each local channel's index in the whole plan.
        factors: the `FactorTable` of the whole model, read through `share`.
        reductions: all-reduce calls made (for tests and logs).
    """

    def __init__(
        self,
        mesh: Mesh,
        connections: Sequence[Connection],
        tasks: Sequence[str],
        buffer: GradientBuffer,
        plan: Phase2Plan,
        buffers: Sequence[Tensor],
        *,
        mode: Mode,
        uniform: UniformRule,
        backend: str,
    ) -> None:
        self.mesh = mesh
        self.mode, self.uniform, self.backend = mode, uniform, backend
        self.num_tasks = buffer.num_tasks
        self.full_plan = plan
        for conn in connections:
            for link in conn.links.values():
                sources = [link.tensor, getattr(link.module, "weight", None)]
                for source in sources:
                    if is_dtensor(source):
                        assert isinstance(source, Tensor)
                        check_layout(f"{link.name}.weight", source, mesh, whole_rows=True)
        layers: list[tuple[int, int, int]] = []
        index: list[int] = []
        weights: list[Tensor] = []
        for conn, first in zip(connections, plan.first_channels, strict=True):
            start, stop = mesh.rows(conn.channels)  # checked by `check_layout`
            if stop == start:
                continue  # an empty shard: this rank holds none of the layer's channels
            rows = local_tensor(conn.weight)
            layers.append((buffer.offset_of(conn.weight), stop - start, rows[0].numel()))
            index.extend(range(first + start, first + stop))
            weights.append(conn.weight)
        self.plan = Phase2Plan(layers, buffer.numel)
        self._weights = weights
        device = buffer.grads.device
        self.local_channels = torch.tensor(index, dtype=torch.int64, device=device)
        self.acc = accumulation_dtype(buffer.grads.dtype)
        self.buffers = list(buffers)
        t, c = self.num_tasks, plan.total_channels
        upper = torch.triu_indices(t, t)
        pairs = upper.shape[1]
        # [pairs] flat positions i*T+j (i <= j) of a T x T Gram matrix, and [T*T] the pair of
        # every position: packing and unpacking are one index_select each.
        self._upper_flat = (upper[0] * t + upper[1]).to(device)
        pair_of = torch.empty(t, t, dtype=torch.int64)
        pair_of[upper[0], upper[1]] = torch.arange(pairs)
        pair_of[upper[1], upper[0]] = torch.arange(pairs)
        self._pair_of = pair_of.view(-1).to(device)
        gram = c * pairs if mode == "group" else 0
        self._sizes = (c, 2 * t * c, gram, sum(b.numel() for b in self.buffers))
        self.payload = torch.zeros(sum(self._sizes), dtype=self.acc, device=device)
        norms, parts, grams, packed = torch.split(self.payload, list(self._sizes))
        self._norms, self._parts, self._packed = norms, parts.view(2, t, c), packed
        self._gram = grams.view(-1, pairs)  # [C, pairs] in group mode, empty otherwise
        self._buffer_views = _split(packed, self.buffers)
        self._buffers_cat = all(
            b.dtype == self.acc and b.is_contiguous() and b.device == device for b in self.buffers
        )
        self.factors = FactorTable(connections, tasks, device, self.acc, read=self.share)
        self._share_copies = self._plan_share_copies()
        self.reductions = 0

    # ------------------------------------------------------------------ shares

    def share(self, tensor: Tensor) -> Tensor:
        """This rank's share of a tensor every rank needs whole, such that the shares sum to
        it over the ranks: a Shard(0) DTensor's rows in place (zeros elsewhere); a plain
        (replicated) tensor from rank 0 only."""
        if is_dtensor(tensor):
            local = local_tensor(tensor)
            start, stop = self.mesh.rows(int(tensor.shape[0]))
            full = local.new_zeros(tensor.shape)
            full[start:stop] = local
            return full
        return tensor if self.mesh.rank == 0 else torch.zeros_like(tensor)

    def _plan_share_copies(self) -> tuple[list[Tensor], list[Tensor]] | None:
        """This rank's shares of the factor parts as copies into the (zeroed) payload:
        ``(destinations, sources)``, the sources being the tensors to read (DTensors are read
        through `local_data` at each call). None when the factors need `FactorTable.parts`
        (``a`` computed from the model, or a tensor not split as ``torch.chunk`` does).

        So filling the parts costs one ``_foreach_copy_`` instead of a zero-filled full
        tensor per entry: what `share` does, and most of the sharded Phase 2's time besides
        the passes over the rows at ResNet-50 scale (318 entries at T = 3).
        """
        a = self.factors.constant_a()
        if a is None:
            return None
        dests: list[Tensor] = []
        sources: list[Tensor] = []
        if self.mesh.rank == 0:  # the table's own constants: rank 0's share is all of it
            dests.append(self._parts[0].view(-1))
            sources.append(a)
        flat_g = self._parts[1].view(-1)
        for offset, g in self.factors.g_entries():
            if is_dtensor(g):
                placements = tuple(g.placements)  # type: ignore[attr-defined]
                if not (
                    g.dim() == 1 and len(placements) == 1
                    and type(placements[0]).__name__ == "Shard" and placements[0].dim == 0
                ):  # fmt: skip
                    return None
                start, stop = self.mesh.rows(int(g.shape[0]))
                if local_data(g).numel() != stop - start:
                    return None
                if stop > start:
                    dests.append(flat_g[offset + start : offset + stop])
                    sources.append(g)
            elif self.mesh.rank == 0:
                dests.append(flat_g[offset : offset + g.numel()])
                sources.append(g)
        return dests, sources

    def _local_norms(self) -> Tensor:
        weights = [local_data(w) for w in self._weights]
        return plan_row_sqnorm(weights, self.plan, backend=self.backend).to(self.acc)

    def _fill_strength_inputs(self) -> None:
        self.payload.zero_()
        self._norms.index_copy_(0, self.local_channels, self._local_norms())
        if self._share_copies is None:
            self._parts.copy_(self.factors.parts())
            return
        dests, sources = self._share_copies
        if dests:
            torch._foreach_copy_(dests, [local_data(s).view(-1) for s in sources])

    def _pack_buffers(self) -> None:
        """The model buffers into the payload: one concatenation when they share its dtype
        (hundreds of BatchNorm statistics: one op rather than a copy each)."""
        if not self.buffers:
            return
        if self._buffers_cat:
            torch.cat([b.view(-1) for b in self.buffers], out=self._packed)
        else:
            torch._foreach_copy_(self._buffer_views, self.buffers)

    def _all_reduce(self, tensor: Tensor) -> None:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.mesh.group)
        self.reductions += 1

    def _strengths(self) -> Tensor:
        strengths: Tensor = self._norms[None, :] * self.factors.combine(self._parts)
        return strengths

    # ------------------------------------------------------------------ the steps

    def combine(self, grads: Tensor, out: Tensor) -> Tensor:
        """Phase 2 of the local rows ``grads: [T, N_local]`` into ``out: [N_local]``, with one
        all-reduce; also averages the model buffers. Returns the int64 ``[C]`` top tasks of
        the whole model (the same on every rank)."""
        t = self.num_tasks
        with torch.no_grad():
            self._fill_strength_inputs()
            # The plain sum goes into `out` in the same pass over the rows; the projection
            # then rewrites only the rows that project (fused backends).
            fuse_sum = out.dtype == grads.dtype
            local_gram = channel_gram(
                grads, self.plan, out=out if fuse_sum else None, backend=self.backend
            )  # [C_loc, T, T]
            if self.mode == "group":
                packed = local_gram.reshape(-1, t * t).index_select(1, self._upper_flat)
                self._gram.index_copy_(0, self.local_channels, packed)
            self._pack_buffers()
            self._all_reduce(self.payload)
            if self.buffers:
                self._packed.div_(self.mesh.world)
                torch._foreach_copy_(self.buffers, self._buffer_views)
            top = plan_top_priority(
                self._strengths(), self.full_plan, backend=self.backend, check=False
            )
            channels = self.full_plan.total_channels
            if self.mode == "group":
                gram = self._gram.index_select(1, self._pair_of).view(channels, t, t)
            else:  # channel mode reads only this rank's own channels
                gram = torch.zeros(channels, t, t, dtype=self.acc, device=grads.device)
                gram.index_copy_(0, self.local_channels, local_gram)
            coef = projection_coefficients(
                gram, self.full_plan, top, mode=self.mode, uniform=self.uniform,
                backend=self.backend, check=False,
            )  # fmt: skip
            apply_projection(
                grads,
                self.plan,
                top.index_select(0, self.local_channels),
                coef.index_select(1, self.local_channels),
                out=out,
                out_holds_sum=fuse_sum,
                backend=self.backend,
                check=False,
            )
        return top

    def strengths(self) -> Tensor:
        """``[T, C]`` raw strengths of the whole model (one all-reduce: call on every rank)."""
        with torch.no_grad():
            self._fill_strength_inputs()
            head = self._sizes[0] + self._sizes[1]
            self._all_reduce(self.payload[:head])
            return self._strengths()

    def scales(self) -> Tensor:
        """``[T, C]`` factors of the whole model (one all-reduce: call on every rank)."""
        with torch.no_grad():
            parts = self.factors.parts()
            self._all_reduce(parts)
            return self.factors.combine(parts)

    def sync_buffers(self) -> None:
        """Average the model buffers over the ranks (one all-reduce; none without buffers)."""
        if not self.buffers:
            return
        with torch.no_grad():
            self._pack_buffers()
            self._all_reduce(self._packed)
            self._packed.div_(self.mesh.world)
            torch._foreach_copy_(self.buffers, self._buffer_views)
