"""`ConnectionStrength`: connection strength-based multi-task training in a few calls.

    cs = ConnectionStrength(model, ["seg", "depth"], sample_batch)
    for epoch in range(num_epochs):
        for batch in loader:
            cs.step(optimizer, lambda task: loss_of(model(batch.x, task=task), batch, task),
                    epoch, num_epochs)

Phase 1 (learn task priority) takes one optimizer step per task; Phase 2 (conserve task
priority) back-propagates every task into its row of the zero-copy ``[T, N]`` buffer, reads
the strengths from the live shared weights and task-specific connections, and leaves the
combined gradient in ``.grad`` (docs/algorithm.md). The phase of each batch is drawn from the
controller's own seeded generator, saved by `state_dict`.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any, cast

import torch
from torch import Tensor, nn

from cs_kernels._validation import (
    MODES,
    UNIFORM_RULES,
    require_bool,
    require_choice,
    require_int,
)
from cs_kernels.backends import backend_names
from cs_kernels.plan import Phase2Plan
from cs_kernels.projection import Mode, UniformRule, phase2_from_weights
from cs_kernels.strength import channel_strength, plan_top_priority
from cs_kernels.training.buffer import GradientBuffer
from cs_kernels.training.discovery import (
    Connection,
    Registration,
    _as_args,
    format_summary,
    resolve_registration,
    trace_model,
)
from cs_kernels.training.discovery import discover as discover_model
from cs_kernels.training.distributed import Synchronizer, model_buffers, unwrap
from cs_kernels.training.factors import FactorTable
from cs_kernels.training.fsdp import (
    ShardedPhase2,
    Twins,
    check_agreement,
    check_layout,
    sharded_mesh,
    unsharded,
)
from cs_kernels.training.telemetry import PriorityTelemetry

LossFn = Callable[[str], Tensor]
#: ``loss_fn(task)``, or with ``accumulate=k > 1`` ``loss_fn(task, micro)``, micro in [0, k).
StepLossFn = Callable[..., Tensor]
HALF_ROWS = (torch.bfloat16, torch.float16)


def _check_scaler(scaler: object) -> torch.amp.GradScaler | None:
    if scaler is not None and not isinstance(scaler, torch.amp.GradScaler):
        raise TypeError(
            f"scaler must be a torch.amp.GradScaler or None, got {type(scaler).__name__}"
        )
    return scaler


def _check_max_norm(max_grad_norm: object) -> float | None:
    if max_grad_norm is None:
        return None
    if isinstance(max_grad_norm, bool) or not isinstance(max_grad_norm, (int, float)):
        raise TypeError(
            f"max_grad_norm must be a positive number or None, got {type(max_grad_norm).__name__}"
        )
    value = float(max_grad_norm)
    if not value > 0:  # NaN too
        raise ValueError(f"max_grad_norm must be > 0, got {max_grad_norm}")
    return value


def _check_buffer_dtype(buffer_dtype: object) -> torch.dtype | None:
    if buffer_dtype is None:
        return None
    if not isinstance(buffer_dtype, torch.dtype) or not buffer_dtype.is_floating_point:
        raise TypeError(
            "buffer_dtype must be a floating-point torch.dtype (torch.bfloat16, torch.float16) "
            f"or None, got {buffer_dtype!r}"
        )
    return buffer_dtype


def _check_tasks(tasks: object) -> tuple[str, ...]:
    if isinstance(tasks, (str, bytes)) or not isinstance(tasks, Sequence):
        raise TypeError("tasks must be a sequence of task names (str)")
    names = tuple(tasks)
    for t in names:
        if not isinstance(t, str):
            raise TypeError(f"tasks must be str names, got {type(t).__name__}")
    if len(names) < 2:
        raise ValueError(f"tasks needs at least two tasks, got {list(names)}")
    if len(set(names)) != len(names):
        raise ValueError(f"tasks must be distinct, got {list(names)}")
    return names


class ConnectionStrength:
    """Connection strength-based optimization of a multi-task model.

    Args:
        model: an ``nn.Module`` (or ``DistributedDataParallel``, or a model ``fully_shard``-ed
            by FSDP2; build the controller on every rank) whose forward is called as
            ``model(*inputs, task=name)``.
        tasks: the task names; their order is the row order of the ``[T, N]`` buffer.
        sample_input: one batch (a tensor or a tuple of positional arguments) used to trace
            the connections once; the model's buffers and RNG state are left untouched.
        mode: ``"group"`` (the paper) or ``"channel"``; see `cs_kernels.phase2`.
        uniform: ``"sum"`` (the authors' code) or ``"project"``; see `cs_kernels.phase2`.
        backend: ``"auto"`` or a name from `cs_kernels.available_backends`.
        seed: seed of the generator that draws the phase of each batch.
        connections: `connect` registrations; they replace discovered connections of the
            same weight.
        discover: also discover connections from the model's structure (default True).
        buffer_dtype: the dtype of the ``[T, N]`` rows: None (the parameters' dtype), or
            ``torch.bfloat16`` / ``torch.float16`` for an fp32 model (half-size rows; Phase 2
            accumulates in fp32 and writes the fp32 ``[N]`` gradient; a single process:
            refused under DDP and FSDP2). See docs/mixed-precision.md.

    Attributes:
        connections: the connection layers, in buffer order.
        plan: the `Phase2Plan` of the shared parameters in ``buffer`` (under FSDP2: this
            rank's shards).
        full_plan: the plan of the whole model (the same as ``plan`` unless sharded).
        buffer: the `GradientBuffer` (``buffer.grads`` is ``[T, N]``).
        telemetry: the `PriorityTelemetry` recorded at every Phase 2 step.
    """

    def __init__(
        self,
        model: nn.Module,
        tasks: Sequence[str],
        sample_input: Tensor | tuple[Any, ...],
        *,
        mode: Mode = "group",
        uniform: UniformRule = "sum",
        backend: str = "auto",
        seed: int = 0,
        connections: Sequence[Registration] | None = None,
        discover: bool = True,
        buffer_dtype: torch.dtype | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self.tasks = _check_tasks(tasks)
        self.mode = cast(Mode, require_choice(mode, "mode", MODES))
        self.uniform = cast(UniformRule, require_choice(uniform, "uniform", UNIFORM_RULES))
        self.backend = require_choice(backend, "backend", backend_names())
        self.seed = require_int(seed, "seed", 0)
        if not isinstance(discover, bool):
            raise TypeError(f"discover must be a bool, got {type(discover).__name__}")
        rows_dtype = _check_buffer_dtype(buffer_dtype)
        registrations = list(connections) if connections is not None else []
        for i, reg in enumerate(registrations):
            if not isinstance(reg, Registration):
                raise TypeError(
                    f"connections[{i}] must come from connect(), got {type(reg).__name__}"
                )
        self.model = model
        inner, ddp = unwrap(model)
        self.module = inner
        mesh = sharded_mesh(inner, ddp)  # FSDP2: Phase 2 on this rank's shards
        if mesh is not None:  # before any collective forward: a mismatch must not hang
            options = (self.mode, self.uniform, self.backend, self.seed, discover)
            layout = [(n, tuple(p.shape)) for n, p in inner.named_parameters()]
            check_agreement({"tasks": self.tasks, "options": options, "parameters": layout}, mesh)
        twins = Twins(inner) if mesh is not None else None

        watch = [s for r in registrations for s in r.scales.values() if isinstance(s, nn.Module)]
        with unsharded(
            inner, mesh, lambda: inner(*_as_args(sample_input), task=self.tasks[0])
        ) as refresh:
            trace = trace_model(inner, self.tasks, sample_input, watch=watch)
            refresh()
            if twins is not None:
                registrations = [
                    replace(r, weight=twins.unsharded_of(r.weight)) for r in registrations
                ]
            shared = trace.shared_params()
            if not shared:
                raise ValueError(
                    "the model has no parameter shared by two or more tasks in the sample "
                    f"forward (tasks {list(self.tasks)}): nothing for Phase 2 to combine"
                )
            shared_ids = {id(p) for _, p in shared}
            found = (
                discover_model(inner, self.tasks, sample_input, trace=trace) if discover else None
            )
            self.skipped = found.skipped if found is not None else ()
            chosen: dict[int, Connection] = {
                id(c.weight): c for c in (found.connections if found else ())
            }
            seen: set[int] = set()
            for i, reg in enumerate(registrations):
                if id(reg.weight) in seen:
                    name = trace.params.get(id(reg.weight), ("?",))[0]
                    raise ValueError(f"connections[{i}]: the weight {name} is registered twice")
                seen.add(id(reg.weight))
                chosen[id(reg.weight)] = resolve_registration(reg, trace, i, shared_ids)
        if not chosen:
            raise ValueError(
                "no task-specific connections found: discovery looks for shared Conv/Linear "
                "layers feeding per-task BatchNorm/LayerNorm/GroupNorm modules (e.g. "
                "nn.ModuleDict keyed by task) or per-task Linear heads"
                + (f"; left out: {dict(self.skipped)}" if self.skipped else "")
                + ". Declare connections with cs_kernels.training.connect()."
            )
        # Under FSDP2 the trace saw the unsharded parameters: from here on, the sharded ones.
        live = {
            pid: twins.sharded_of(n, p) if twins is not None else p
            for pid, (n, p) in trace.params.items()
        }
        params = [live[id(p)] for _, p in shared]
        self.task_parameters = [live[id(p)] for _, p in trace.task_specific_params()]
        self.shared_parameters = params
        dtype = params[0].dtype
        if rows_dtype is not None and rows_dtype != dtype:
            if dtype != torch.float32 or rows_dtype not in HALF_ROWS:
                raise ValueError(
                    f"buffer_dtype={rows_dtype} does not fit {dtype} parameters: give None, "
                    f"{dtype}, or torch.bfloat16 / torch.float16 for an fp32 model"
                )
            if ddp is not None or mesh is not None:
                raise ValueError(
                    f"buffer_dtype={rows_dtype} (half-size rows) is for a single process: under "
                    + ("DistributedDataParallel" if ddp is not None else "FSDP2 (fully_shard)")
                    + " the rows are reduced across ranks in the parameters' dtype; leave "
                    "buffer_dtype=None (FSDP2 already splits the rows over the ranks)"
                )
        self._sync = Synchronizer(ddp, model_buffers(inner, dtype))
        self.buffer = GradientBuffer(
            params,
            len(self.tasks),
            extra=self.task_parameters if self._sync.active else (),
            sync_numel=self._sync.sync_numel,
            dtype=rows_dtype,
        )
        order = {id(p): i for i, p in enumerate(params)}
        self.connections: tuple[Connection, ...] = tuple(
            sorted(
                (replace(c, weight=live[id(c.weight)]) for c in chosen.values()),
                key=lambda c: order[id(c.weight)],
            )
        )
        starts = list(itertools.accumulate((p.numel() for p in params), initial=0))
        #: The whole model's plan (every channel); `plan` is the local one under FSDP2.
        self.full_plan = Phase2Plan(
            [
                (starts[order[id(c.weight)]], c.channels, c.weight.numel() // c.channels)
                for c in self.connections
            ],
            starts[-1],
        )
        self._sharded: ShardedPhase2 | None = None
        if mesh is None:
            self.plan = self.full_plan
            acc = torch.float64 if dtype == torch.float64 else torch.float32
            self._factors = FactorTable(self.connections, self.tasks, params[0].device, acc)
        else:
            names = {id(p): n for n, p in inner.named_parameters()}
            connected = {id(c.weight) for c in self.connections}
            for p in (*params, *self.task_parameters):
                check_layout(names[id(p)], p, mesh, whole_rows=id(p) in connected)
            connected_layers = [(c.name, c.channels, c.kind, c.source) for c in self.connections]
            check_agreement({"the connections": connected_layers}, mesh)
            floating = [b for b in inner.buffers() if b.dtype.is_floating_point]
            self._sharded = ShardedPhase2(
                mesh, self.connections, self.tasks, self.buffer, self.full_plan, floating,
                mode=self.mode, uniform=self.uniform, backend=self.backend,
            )  # fmt: skip
            self.plan = self._sharded.plan
            self._factors = self._sharded.factors
        self._bounds = [
            (first, first + c.channels)
            for first, c in zip(self.full_plan.first_channels, self.connections, strict=True)
        ]
        self.telemetry = PriorityTelemetry(
            [c.name for c in self.connections], [c.channels for c in self.connections], self.tasks
        )
        self._reach = {
            t: frozenset(id(live[pid]) for pid in tr.reached) for t, tr in trace.per_task.items()
        }
        self._all_params = list(live.values())
        self._phase1_buffer: GradientBuffer | None = None
        self._generator = torch.Generator().manual_seed(self.seed)
        self.epoch = 0
        self.phase1_steps = 0
        self.phase2_steps = 0
        self.last_phase: int | None = None
        #: Tasks whose optimizer step the `GradScaler` skipped in the last `step` /
        #: `phase1_step` (every task for a skipped Phase 2 step).
        self.last_skipped: tuple[str, ...] = ()
        self._collected = False  # rows collected since the last combine
        self._pending_sync = False  # collect(sync=False) left the DDP all-reduce to combine

    # ---------------------------------------------------------------- inspection

    def summary(self) -> str:
        """Table of the connection layers: layer, channels, kind, tasks and their modules."""
        return format_summary(
            self.connections,
            self.tasks,
            self.skipped,
            shared_numel=self.buffer.numel,
            shared_count=len(self.shared_parameters),
        )

    def scales(self) -> Tensor:
        """``[T, total_channels]`` per-task factors from the live task-specific modules.

        Under FSDP2 this and `strengths` / `top_priority` make one all-reduce: call them on
        every rank."""
        if self._sharded is not None:
            return self._sharded.scales()
        return self._factors.compute()

    def strengths(self) -> Tensor:
        """``[T, total_channels]`` raw connection strengths ``||W[c]||^2 * f_t[c]``."""
        if self._sharded is not None:
            return self._sharded.strengths()
        scales = self._factors.compute()
        return torch.cat(
            [
                channel_strength(c.weight, scales[:, a:b], backend=self.backend)
                for c, (a, b) in zip(self.connections, self._bounds, strict=True)
            ],
            dim=1,
        )

    def top_priority(self) -> Tensor:
        """int64 ``[total_channels]``: the top-priority task of every connection channel."""
        return plan_top_priority(
            self.strengths(), self.full_plan, backend=self.backend, check=False
        )

    # ---------------------------------------------------------------- the phases

    def phase(self, epoch: int, num_epochs: int) -> int:
        """Draw this batch's phase: ``P ~ U(0, 1)``; Phase 1 if ``P >= epoch / num_epochs``.

        Epoch 0 is always Phase 1. The draw comes from the controller's own generator.
        """
        num_epochs = require_int(num_epochs, "num_epochs", 1)
        epoch = require_int(epoch, "epoch", 0)
        if epoch >= num_epochs:
            raise ValueError(f"epoch must be < num_epochs={num_epochs}, got {epoch}")
        p = float(torch.rand((), generator=self._generator))
        self.epoch = epoch
        self.last_phase = 1 if p >= epoch / num_epochs else 2
        return self.last_phase

    def phase1_step(
        self,
        optimizer: torch.optim.Optimizer,
        loss_fn: StepLossFn,
        *,
        scaler: torch.amp.GradScaler | None = None,
        max_grad_norm: float | None = None,
        accumulate: int = 1,
    ) -> dict[str, Tensor]:
        """Phase 1: for each task in order, zero the gradients, back-propagate its loss alone
        and take an optimizer step. Returns ``{task: detached loss}``.

        Args:
            optimizer: the optimizer of the model's parameters.
            loss_fn: ``loss_fn(task)`` -> scalar loss; with ``accumulate=k > 1``
                ``loss_fn(task, micro)`` for micro-batch ``micro`` in ``[0, k)``, each the
                mean over its micro-batch (the controller divides by ``k``).
            scaler: a ``torch.amp.GradScaler`` (fp16): each task's loss is scaled, its step
                goes through ``scaler.step`` (skipped on inf/NaN) and ``scaler.update()``
                runs after every task's step (a GradScaler allows one step per optimizer per
                update). Tasks whose step was skipped are in `last_skipped`.
            max_grad_norm: clip each task's gradient (all parameters, after unscaling) to
                this total norm before its step.
            accumulate: micro-batches per task step (``k >= 1``).
        """
        scaler = _check_scaler(scaler)
        max_norm = _check_max_norm(max_grad_norm)
        k = require_int(accumulate, "accumulate", 1)
        self._check_scaler_supported(scaler)
        losses, stepped = self._phase1(optimizer, loss_fn, scaler, max_norm, k)
        if stepped:
            self.phase1_steps += 1
        return losses

    def _phase1(
        self,
        optimizer: torch.optim.Optimizer,
        loss_fn: StepLossFn,
        scaler: torch.amp.GradScaler | None,
        max_norm: float | None,
        k: int,
    ) -> tuple[dict[str, Tensor], bool]:
        """Phase 1 with checked options; returns the losses and whether any task stepped."""
        losses: dict[str, Tensor] = {}
        skipped: list[str] = []
        for task in self.tasks:
            optimizer.zero_grad()
            if self._sync.active:
                buf = self._phase1_grads()
                buf.zero_()
                buf.attach_row(0, only=self._reach[task])
                with self._sync.no_sync():
                    loss = self._backward_micro(loss_fn, task, k, scaler)
                self._sync.all_reduce(buf.storage, buf.sync)
            else:
                loss = self._backward_micro(loss_fn, task, k, scaler)
            if not self._optimizer_step(optimizer, scaler, max_norm):
                skipped.append(task)
            losses[task] = loss
        if self._sharded is not None:  # FSDP2 reduced the gradients; the buffers remain
            self._sharded.sync_buffers()
        self.last_skipped = tuple(skipped)
        return losses, len(skipped) < len(self.tasks)

    def _backward_micro(
        self, loss_fn: StepLossFn, task: str, k: int, scaler: torch.amp.GradScaler | None
    ) -> Tensor:
        """Back-propagate ``task``'s loss over ``k`` micro-batches (each divided by ``k``)
        into the current ``.grad``; returns the detached mean loss."""
        total: Tensor | None = None
        for micro in range(k):
            loss = self._loss(loss_fn if k == 1 else _bind(loss_fn, micro), task)
            part = loss / k if k > 1 else loss
            (scaler.scale(part) if scaler is not None else part).backward()  # type: ignore[no-untyped-call]
            total = part.detach() if total is None else total + part.detach()
        assert total is not None
        return total

    def phase2_backward(
        self,
        loss_fn: LossFn,
        *,
        epoch: int | None = None,
        scaler: torch.amp.GradScaler | None = None,
    ) -> dict[str, Tensor]:
        """Phase 2 up to the optimizer step: the combined gradient is left in ``.grad``.

        Zeroes the model's gradients, back-propagates each task into its row of the
        ``[T, N]`` buffer (zero-copy ``.grad`` views), computes the top-priority tasks from
        the live weights and task-specific factors, runs `cs_kernels.phase2` into the
        ``[N]`` result that the shared ``.grad`` tensors then view, and records the
        telemetry under ``epoch`` (default: the last `phase` epoch). Task-specific
        parameters get their gradients as usual. Returns ``{task: detached loss}``.

        With ``scaler`` every task's loss is scaled before its backward, so ``.grad`` holds
        the scaled combined gradient: follow with ``scaler.step(optimizer)`` and
        ``scaler.update()``. (`step` does that, and also undoes the telemetry and counters
        of a step the scaler skips; here they are recorded at once.)
        """
        scaler = _check_scaler(scaler)
        if epoch is not None:
            require_int(epoch, "epoch", 0)
        losses = self.collect(loss_fn, scaler=scaler)
        top = self.combine()
        self.telemetry.record(top, self.epoch if epoch is None else epoch)
        self.phase2_steps += 1
        return losses

    def collect(
        self,
        loss_fn: LossFn,
        *,
        scaler: torch.amp.GradScaler | None = None,
        accumulate: bool = False,
        sync: bool = True,
        loss_factor: float = 1.0,
    ) -> dict[str, Tensor]:
        """Back-propagate every task into its row of ``buffer.grads`` (no per-task copies).

        Under DDP the rows, task-specific gradients and model buffers are then averaged
        across ranks with one all-reduce. Under FSDP2 each task's backward fills this rank's
        shard of its row (FSDP2 reduce-scatters and averages it).

        Args:
            loss_fn: ``loss_fn(task)`` -> scalar loss.
            scaler: a ``torch.amp.GradScaler``: each loss is scaled before its backward.
            accumulate: add into the rows (and the task-specific gradients) collected since
                the last `combine` instead of starting from zero: micro-batches, then one
                `combine`.
            sync: under DDP, all-reduce now; ``False`` leaves it to the next `combine` (so
                only the last of several accumulated micro-batches communicates).
            loss_factor: multiplies every loss before its backward (``1 / k`` for ``k``
                accumulated micro-batches whose losses are means over equal micro-batches).
        """
        scaler = _check_scaler(scaler)
        require_bool(accumulate, "accumulate")
        require_bool(sync, "sync")
        if isinstance(loss_factor, bool) or not isinstance(loss_factor, (int, float)):
            raise TypeError(f"loss_factor must be a number, got {type(loss_factor).__name__}")
        if not (math.isfinite(loss_factor) and loss_factor > 0):
            raise ValueError(f"loss_factor must be finite and > 0, got {loss_factor}")
        self._check_scaler_supported(scaler)
        add = accumulate and self._collected
        buf = self.buffer
        if not add:
            for p in self._all_params:
                p.grad = None
            buf.zero_()
            if self._sync.active:
                buf.attach_extra()
        losses: dict[str, Tensor] = {}
        with self._sync.no_sync():
            for t, task in enumerate(self.tasks):
                buf.attach_row(t)
                loss = self._loss(loss_fn, task)
                part = loss * loss_factor if loss_factor != 1 else loss
                (scaler.scale(part) if scaler is not None else part).backward()  # type: ignore[no-untyped-call]
                moved = buf.detached_from_row(t)
                if moved:
                    raise RuntimeError(
                        f"during task {task!r}'s backward the .grad of {len(moved)} shared "
                        "parameter(s) stopped viewing the gradient buffer: loss_fn must not "
                        "zero or replace gradients, and backward must not use create_graph"
                    )
                buf.end_row(t, add=add)
                losses[task] = loss.detach()
        self._collected = True
        if sync:
            self._sync.all_reduce(buf.storage, buf.sync)
            self._pending_sync = False
        else:
            self._pending_sync = self._sync.active
        return losses

    def combine(self) -> Tensor:
        """Phase 2 on the collected rows; points the shared ``.grad`` at the ``[N]`` result.

        Under FSDP2: one all-reduce of per-channel statistics and the model buffers, then
        this rank's rows (see `cs_kernels.training.fsdp`). Returns the int64
        ``[total_channels]`` top-priority tasks it used (of the whole model).

        Raises ValueError when nothing was collected since the last combine.
        """
        if not self._collected:
            raise ValueError(
                "combine() has nothing to combine: call collect(loss_fn) first (every "
                "combine consumes the rows collected since the previous one)"
            )
        if self._pending_sync:  # the accumulated micro-batches' one all-reduce
            self._sync.all_reduce(self.buffer.storage, self.buffer.sync)
            self._pending_sync = False
        self._collected = False
        if self._sharded is not None:  # one all-reduce, then this rank's rows
            top = self._sharded.combine(self.buffer.grads, self.buffer.out)
            self.buffer.attach_out()
            return top
        top = torch.empty(
            self.plan.total_channels, dtype=torch.int64, device=self.buffer.out.device
        )
        with torch.no_grad():  # strength, priority and projection: one fused call
            phase2_from_weights(
                self.buffer.grads,
                self.plan,
                [c.weight for c in self.connections],
                self._factors.compute(),
                mode=self.mode,
                uniform=self.uniform,
                out=self.buffer.out,
                backend=self.backend,
                check=False,
                top_out=top,
            )
        self.buffer.attach_out()
        return top

    def step(
        self,
        optimizer: torch.optim.Optimizer,
        loss_fn: StepLossFn,
        epoch: int,
        num_epochs: int,
        *,
        scaler: torch.amp.GradScaler | None = None,
        max_grad_norm: float | None = None,
        accumulate: int = 1,
    ) -> dict[str, Tensor]:
        """One batch: draw the phase, then `phase1_step`, or `phase2_backward` and
        ``optimizer.step()``. Returns ``{task: detached loss}`` (with ``accumulate=k``, the
        mean over the micro-batches).

        Args:
            optimizer: the optimizer of the model's parameters.
            loss_fn: ``loss_fn(task)``; with ``accumulate=k > 1`` ``loss_fn(task, micro)``
                for micro-batch ``micro`` in ``[0, k)``: each a mean over its micro-batch
                (equal sizes), divided by ``k`` here, so the gradients are the big batch's.
            epoch, num_epochs: for the phase draw (`phase`).
            scaler: a ``torch.amp.GradScaler`` (fp16). Phase 2 runs on the scaled rows
                (the projection is invariant to a common factor); ``scaler.step`` unscales,
                skips the step on inf/NaN, and ``scaler.update()`` runs once per Phase 2
                batch and once per task step in Phase 1. A skipped step changes nothing:
                parameters, optimizer state, `phase1_steps` / `phase2_steps`, telemetry and
                the phase generator (the next batch draws again); see `last_skipped`.
            max_grad_norm: clip the combined gradient (Phase 2) or each task's gradient
                (Phase 1) of all parameters to this total norm, after unscaling.
            accumulate: ``k >= 1`` micro-batches per step: in Phase 2 they add into the rows
                and the task-specific gradients, then one Phase 2 (under DDP one all-reduce,
                after the last); in Phase 1 each task's step sees all ``k``.
        """
        scaler = _check_scaler(scaler)
        max_norm = _check_max_norm(max_grad_norm)
        k = require_int(accumulate, "accumulate", 1)
        self._check_scaler_supported(scaler)
        before = (self._generator.get_state(), self.epoch, self.last_phase)
        if self.phase(epoch, num_epochs) == 1:
            losses, stepped = self._phase1(optimizer, loss_fn, scaler, max_norm, k)
            if stepped:
                self.phase1_steps += 1
            else:
                self._restore_draw(before)
            return losses
        sums: dict[str, Tensor] = {}
        for micro in range(k):
            fn = loss_fn if k == 1 else _bind(loss_fn, micro)
            part = self.collect(
                fn, scaler=scaler, accumulate=micro > 0, sync=False, loss_factor=1.0 / k
            )
            for task, loss in part.items():
                sums[task] = loss / k if task not in sums else sums[task] + loss / k
        top = self.combine()
        if self._optimizer_step(optimizer, scaler, max_norm):
            self.telemetry.record(top, self.epoch)
            self.phase2_steps += 1
            self.last_skipped = ()
        else:
            self.last_skipped = self.tasks
            self._restore_draw(before)
        return sums

    # ---------------------------------------------------------------- state

    def state_dict(self) -> dict[str, Any]:
        """The phase generator's state, the step counters and the telemetry."""
        return {
            "tasks": list(self.tasks),
            "seed": self.seed,
            "generator": self._generator.get_state(),
            "epoch": self.epoch,
            "phase1_steps": self.phase1_steps,
            "phase2_steps": self.phase2_steps,
            "last_phase": self.last_phase,
            "telemetry": self.telemetry.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore `state_dict`: a resumed run then draws the same phases."""
        if not isinstance(state, Mapping):
            raise TypeError(f"state must be a mapping, got {type(state).__name__}")
        if list(state["tasks"]) != list(self.tasks):
            raise ValueError(f"state is for tasks {state['tasks']}, not {list(self.tasks)}")
        self.telemetry.load_state_dict(state["telemetry"])
        self._generator.set_state(state["generator"])
        self.seed = int(state["seed"])
        self.epoch = int(state["epoch"])
        self.phase1_steps = int(state["phase1_steps"])
        self.phase2_steps = int(state["phase2_steps"])
        self.last_phase = state["last_phase"]

    # ---------------------------------------------------------------- helpers

    def _check_scaler_supported(self, scaler: torch.amp.GradScaler | None) -> None:
        if scaler is None or not scaler.is_enabled() or self._sharded is None:
            return
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        if not isinstance(scaler, ShardedGradScaler):
            raise ValueError(
                "scaler: a plain GradScaler under FSDP2 checks each rank's shards for inf/NaN "
                "alone (ranks could disagree on skipping a step); use torch.distributed.fsdp."
                "sharded_grad_scaler.ShardedGradScaler (it all-reduces the check), or bf16 "
                "without a scaler (MixedPrecisionPolicy(param_dtype=torch.bfloat16))"
            )

    def _optimizer_step(
        self,
        optimizer: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler | None,
        max_norm: float | None,
    ) -> bool:
        """Clip (after unscaling), then step (through the scaler); False when skipped."""
        if scaler is not None and max_norm is not None:
            scaler.unscale_(optimizer)
        if max_norm is not None:
            grads = [p for p in self.module.parameters() if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(grads, max_norm)
        if scaler is None or not scaler.is_enabled():
            optimizer.step()
            return True
        scale = scaler.get_scale()
        scaler.step(optimizer)
        scaler.update()
        return not scaler.get_scale() < scale  # the scale backs off only after inf/NaN

    def _restore_draw(self, before: tuple[Tensor, int, int | None]) -> None:
        """Undo the phase draw of a batch whose every step was skipped."""
        self._generator.set_state(before[0])
        self.epoch, self.last_phase = before[1], before[2]

    def _loss(self, loss_fn: LossFn, task: str) -> Tensor:
        loss = loss_fn(task)
        if not isinstance(loss, Tensor):
            raise TypeError(f"loss_fn({task!r}) must return a Tensor, got {type(loss).__name__}")
        if loss.numel() != 1:
            raise ValueError(f"loss_fn({task!r}) must return a scalar, got {tuple(loss.shape)}")
        if not loss.requires_grad:
            raise ValueError(
                f"loss_fn({task!r}) returned a loss that does not require grad "
                "(it reaches no trainable parameter)"
            )
        return loss

    def _phase1_grads(self) -> GradientBuffer:
        """Flat storage for every parameter's gradient in distributed Phase 1."""
        if self._phase1_buffer is None:
            self._phase1_buffer = GradientBuffer(
                self._all_params, 1, sync_numel=self._sync.sync_numel
            )
        return self._phase1_buffer


def _bind(loss_fn: StepLossFn, micro: int) -> LossFn:
    """``loss_fn(task, micro)`` as a one-argument ``loss_fn(task)``."""
    return lambda task: loss_fn(task, micro)
