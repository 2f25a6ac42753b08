"""One training step per multi-task optimization method, behind one interface.

Every method gets the same model, optimizer and batch, and a ``loss_fn(task) -> Tensor`` that
runs that task's forward pass (with the task's own BatchNorms) and returns its scalar loss.
A step returns the detached per-task losses (no host sync).

=================  ==========================================================================
method             update of the shared parameters
=================  ==========================================================================
``single``         a single-task model: its one loss (the same step as ``gd`` with ``T = 1``)
``gd``             plain sum of the task losses, one backward pass
``pcgrad``         torchjd ``PCGrad`` on the ``[T, N]`` Jacobian of the shared parameters
``cagrad``         torchjd ``CAGrad(c=0.4)`` (the CAGrad paper's value), likewise
``mgda``           torchjd ``MGDA``, likewise
``aligned_mtl``    torchjd ``AlignedMTL``, likewise
``ours_phase1``    ``ConnectionStrength.phase1_step`` every batch (T optimizer steps)
``ours_phase2``    ``ConnectionStrength.phase2_backward`` then one optimizer step, every batch
``ours_mixed``     ``ConnectionStrength.step``: Phase 1 or 2 per batch, the paper's schedule
=================  ==========================================================================

Loss scaling. A method name may end in ``_uw`` (e.g. ``gd_uw``, ``ours_mixed_uw``): the same
update on losses scaled by uncertainty weighting (Kendall et al., 2018), whose learnable
log-variances are trained with the model (`UncertaintyWeighting`); see `parse_method`.

For the torchjd baselines, task-specific parameters (each task's BatchNorms and head) receive
their own task's gradient and only the shared parameters are aggregated, as in the paper's
comparison. The methods ``ours_*`` use ``cs_kernels.training.ConnectionStrength`` through its
public API only.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

LossFn = Callable[[str], Tensor]

BASELINES = ("pcgrad", "cagrad", "mgda", "aligned_mtl")
OURS = ("ours_phase1", "ours_phase2", "ours_mixed")
METHODS = ("single", "gd", *BASELINES, *OURS)
SCALINGS = ("uw",)  # loss scalings a method name may end in: ``<method>_<scaling>``
SCALED_METHODS = ("gd_uw", "ours_mixed_uw")  # the ones the reproductions run
CAGRAD_C = 0.4


def parse_method(name: str) -> tuple[str, str | None]:
    """``"ours_mixed_uw"`` -> ``("ours_mixed", "uw")``; ``"gd"`` -> ``("gd", None)``."""
    for scaling in SCALINGS:
        base = name.removesuffix(f"_{scaling}")
        if base != name and base in METHODS and base != "single":
            return base, scaling
    if name not in METHODS:
        scaled = [f"{m}_{s}" for s in SCALINGS for m in METHODS if m != "single"]
        raise ValueError(f"method must be one of {METHODS} or {scaled}, got {name!r}")
    return name, None


class UncertaintyWeighting(nn.Module):
    """Uncertainty weighting (Kendall, Gal and Cipolla, CVPR 2018) of the task losses.

    One learnable log-variance ``s_t`` per task (``log_var[t]``, a scalar parameter of its own,
    in task order, initialised to 0, i.e. weight 1/2)::

        scaled(task, L_t) = exp(-s_t) L_t / 2 + s_t / 2

    At its optimum ``exp(s_t) = L_t``, so every task's loss is scaled towards the same size.
    ``s_t`` is reached by task ``t``'s loss only: a task-specific parameter for every method
    (one tensor per task, so Phase 1's per-task optimizer steps leave the others alone).
    """

    def __init__(self, tasks: Sequence[str]) -> None:
        super().__init__()
        self.tasks = tuple(tasks)
        self.log_var = nn.ParameterList(nn.Parameter(torch.zeros(())) for _ in self.tasks)

    def forward(self, task: str, loss: Tensor) -> Tensor:
        s = self.log_var[self.tasks.index(task)]
        return 0.5 * torch.exp(-s) * loss + 0.5 * s

    @torch.no_grad()
    def weights(self) -> dict[str, float]:
        """The current factor ``exp(-s_t) / 2`` of every task's loss."""
        return {
            t: 0.5 * float(torch.exp(-s)) for t, s in zip(self.tasks, self.log_var, strict=True)
        }


class TrainStep(ABC):
    """One optimization step on one batch: ``step(loss_fn, epoch, num_epochs)``."""

    def __init__(
        self, model: nn.Module, tasks: Sequence[str], optimizer: torch.optim.Optimizer
    ) -> None:
        self.model = model
        self.tasks = tuple(tasks)
        self.optimizer = optimizer

    @abstractmethod
    def __call__(self, loss_fn: LossFn, epoch: int, num_epochs: int) -> dict[str, Tensor]:
        """Run the step; returns each task's detached loss."""


class SumStep(TrainStep):
    """``gd`` and ``single``: back-propagate the plain sum of the task losses once."""

    def __call__(self, loss_fn: LossFn, epoch: int, num_epochs: int) -> dict[str, Tensor]:
        self.optimizer.zero_grad(set_to_none=True)
        losses = {t: loss_fn(t) for t in self.tasks}
        torch.stack(list(losses.values())).sum().backward()  # type: ignore[no-untyped-call]
        self.optimizer.step()
        return {t: v.detach() for t, v in losses.items()}


class AggregatorStep(TrainStep):
    """A torchjd aggregator on the Jacobian ``[T, N]`` of the task losses w.r.t. ``shared``.

    One forward and one backward pass per task (each task's forward uses its own BatchNorms,
    the same cost as the paper's method). Row ``t`` of the Jacobian is task ``t``'s gradient
    of the shared parameters laid end to end; every other parameter keeps the gradient of the
    one task that reaches it.
    """

    def __init__(
        self,
        model: nn.Module,
        tasks: Sequence[str],
        optimizer: torch.optim.Optimizer,
        shared: Sequence[Tensor],
        aggregator: Callable[[Tensor], Tensor],
    ) -> None:
        super().__init__(model, tasks, optimizer)
        if not shared:
            raise ValueError("shared must hold at least one parameter")
        self.shared = list(shared)
        self.aggregator = aggregator
        self.numel = sum(p.numel() for p in self.shared)
        first = self.shared[0]
        self.jacobian = torch.zeros(
            len(self.tasks), self.numel, dtype=first.dtype, device=first.device
        )

    def __call__(self, loss_fn: LossFn, epoch: int, num_epochs: int) -> dict[str, Tensor]:
        self.optimizer.zero_grad(set_to_none=True)
        losses = {}
        for row, task in enumerate(self.tasks):
            loss = loss_fn(task)
            loss.backward()  # type: ignore[no-untyped-call]
            offset = 0
            for p in self.shared:
                n = p.numel()
                if p.grad is None:  # the task does not reach this parameter
                    self.jacobian[row, offset : offset + n].zero_()
                else:
                    self.jacobian[row, offset : offset + n].copy_(p.grad.reshape(-1))
                    p.grad = None
                offset += n
            losses[task] = loss.detach()
        combined = self.aggregator(self.jacobian)
        offset = 0
        for p in self.shared:
            n = p.numel()
            p.grad = combined[offset : offset + n].view_as(p).clone()
            offset += n
        self.optimizer.step()
        return losses


class OursStep(TrainStep):
    """Connection strength-based optimization through ``cs_kernels.training``.

    ``variant``: ``"phase1"`` (Phase 1 every batch), ``"phase2"`` (Phase 2 every batch) or
    ``"mixed"`` (the paper's per-batch draw, ``ConnectionStrength.step``).
    """

    def __init__(
        self,
        model: nn.Module,
        tasks: Sequence[str],
        optimizer: torch.optim.Optimizer,
        sample_input: Tensor | tuple[Tensor, ...],
        variant: str,
        seed: int = 0,
        **options: Any,
    ) -> None:
        super().__init__(model, tasks, optimizer)
        if variant not in ("phase1", "phase2", "mixed"):
            raise ValueError(f"variant must be 'phase1', 'phase2' or 'mixed', got {variant!r}")
        from cs_kernels.training import ConnectionStrength

        self.variant = variant
        self.cs = ConnectionStrength(model, self.tasks, sample_input, seed=seed, **options)

    def __call__(self, loss_fn: LossFn, epoch: int, num_epochs: int) -> dict[str, Tensor]:
        if self.variant == "phase1":
            return self.cs.phase1_step(self.optimizer, loss_fn)
        if self.variant == "phase2":
            losses = self.cs.phase2_backward(loss_fn)
            self.optimizer.step()
            return losses
        return self.cs.step(self.optimizer, loss_fn, epoch, num_epochs)


def make_aggregator(method: str) -> Callable[[Tensor], Tensor]:
    """The torchjd aggregator of a baseline method (see ``BASELINES``)."""
    from torchjd.aggregation import MGDA, AlignedMTL, CAGrad, PCGrad

    if method == "pcgrad":
        return PCGrad()
    if method == "cagrad":
        return CAGrad(c=CAGRAD_C)
    if method == "mgda":
        return MGDA()
    if method == "aligned_mtl":
        return AlignedMTL()
    raise ValueError(f"method must be one of {BASELINES}, got {method!r}")


def make_step(
    method: str,
    model: nn.Module,
    tasks: Sequence[str],
    optimizer: torch.optim.Optimizer,
    *,
    shared: Sequence[Tensor] | None = None,
    sample_input: Tensor | tuple[Tensor, ...] | None = None,
    seed: int = 0,
    cs_options: dict[str, Any] | None = None,
) -> TrainStep:
    """Build the training step of ``method`` (one of ``METHODS``).

    ``shared`` (the shared parameters) is needed by the torchjd baselines; ``sample_input``
    (one batch of inputs, to trace the connections) by ``ours_*``; ``cs_options`` are passed
    on to ``ConnectionStrength`` (e.g. ``mode``, ``uniform``, ``backend``).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "single" and len(tasks) != 1:
        raise ValueError(f"method 'single' trains one task, got tasks={list(tasks)}")
    if method in ("single", "gd"):
        return SumStep(model, tasks, optimizer)
    if method in BASELINES:
        if shared is None:
            raise ValueError(f"method {method!r} needs shared (the shared parameters)")
        return AggregatorStep(model, tasks, optimizer, shared, make_aggregator(method))
    if sample_input is None:
        raise ValueError(f"method {method!r} needs sample_input (one batch of inputs)")
    variant = method.removeprefix("ours_")
    return OursStep(model, tasks, optimizer, sample_input, variant, seed=seed, **(cs_options or {}))
