"""Phase 2 as a TorchJD aggregator: `ConnectionStrengthAggregator`.

TorchJD (``pip install "torchjd>=0.18"``, or ``cs_kernels[train]``) computes the Jacobian of
several losses with ``torchjd.autojac.backward`` and reduces it to one gradient with an
aggregator in ``torchjd.autojac.jac_to_grad``. The aggregator here is bound to a
`ConnectionStrength`: it reads the ``[T, N]`` Jacobian of ``cs.shared_parameters`` (rows in
``cs.tasks`` order, columns laid out as ``cs.plan``) and returns what `ConnectionStrength.combine`
computes from the same rows, with the live shared weights and per-task norms.

This module imports without TorchJD; building the aggregator then raises ``ImportError``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from cs_kernels.projection import phase2_from_weights
from cs_kernels.training import ConnectionStrength

INSTALL_HINT = (
    'ConnectionStrengthAggregator needs TorchJD: pip install "torchjd>=0.18" '
    '(or pip install "cs_kernels[train]")'
)

_import_error: ImportError | None = None
if TYPE_CHECKING:
    from torchjd.aggregation import Aggregator
else:
    try:
        from torchjd.aggregation import Aggregator
    except ImportError as error:  # the class still exists; building one says what to install
        _import_error = error
        Aggregator = nn.Module


class ConnectionStrengthAggregator(Aggregator):
    """A ``torchjd.aggregation.Aggregator`` that applies connection-strength Phase 2.

    Use it after one forward per task::

        losses = [loss_fn(task) for task in cs.tasks]
        torchjd.autojac.backward(losses)
        torchjd.autojac.jac_to_grad(cs.shared_parameters, ConnectionStrengthAggregator(cs))

    ``jac_to_grad`` then leaves in the shared ``.grad`` what `ConnectionStrength.combine`
    computes on the same rows (same mode, uniform rule and backend as ``cs``). The
    task-specific parameters are each reached by one task: ``jac_to_grad(cs.task_parameters,
    torchjd.aggregation.Sum())`` gives them their own task's gradient.

    Args:
        cs: the controller whose plan, connections, per-task norms and options are used.
            Under FSDP2 (sharded parameters) use ``cs.step`` instead: TorchJD's Jacobians are
            not sharded.

    Attributes:
        last_top: int64 ``[cs.plan.total_channels]``, the top-priority task of every channel
            in the last call (``None`` before it); ``cs.telemetry.record(last_top, epoch)``
            records it.

    Raises:
        ImportError: TorchJD is not installed.
        TypeError: ``cs`` is not a `ConnectionStrength`.
        ValueError: ``cs`` holds sharded (FSDP2) parameters.
    """

    def __init__(self, cs: ConnectionStrength) -> None:
        if _import_error is not None:
            raise ImportError(INSTALL_HINT) from _import_error
        if not isinstance(cs, ConnectionStrength):
            raise TypeError(f"cs must be a ConnectionStrength, got {type(cs).__name__}")
        if cs.plan.numel != cs.full_plan.numel or any(
            isinstance(p, torch.distributed.tensor.DTensor) for p in cs.shared_parameters
        ):
            raise ValueError(
                "cs holds sharded (FSDP2) parameters: the aggregator needs the whole model's "
                "Jacobian; use cs.step or cs.phase2_backward under FSDP2"
            )
        super().__init__()
        self.cs = cs
        self.last_top: Tensor | None = None

    def forward(self, matrix: Tensor, /) -> Tensor:
        """Phase 2 of a ``[T, N]`` Jacobian; returns the ``[N]`` combined gradient.

        ``matrix`` is not modified. Raises ``ValueError`` when its shape is not
        ``[len(cs.tasks), cs.plan.numel]``, naming both shapes.
        """
        cs = self.cs
        expected = (len(cs.tasks), cs.plan.numel)
        if matrix.dim() != 2 or tuple(matrix.shape) != expected:
            raise ValueError(
                f"matrix has shape {list(matrix.shape)}, but the bound ConnectionStrength needs "
                f"[T, N] = {list(expected)} (rows: the tasks {list(cs.tasks)}; columns: the "
                f"shared parameters' elements in cs.plan)"
            )
        weights = [c.weight for c in cs.connections]
        top = torch.empty(cs.plan.total_channels, dtype=torch.int64, device=matrix.device)
        with torch.no_grad():  # the kernels are autograd-free
            combined = phase2_from_weights(
                matrix.contiguous(),
                cs.plan,
                weights,
                cs.scales(),
                mode=cs.mode,
                uniform=cs.uniform,
                backend=cs.backend,
                check=False,
                top_out=top,
            )
        self.last_top = top
        return combined

    def __repr__(self) -> str:
        cs = self.cs
        return (
            f"ConnectionStrengthAggregator(tasks={list(cs.tasks)}, mode={cs.mode!r}, "
            f"uniform={cs.uniform!r}, backend={cs.backend!r})"
        )

    def __str__(self) -> str:
        return "ConnectionStrengthAggregator"


__all__ = ["INSTALL_HINT", "ConnectionStrengthAggregator"]
