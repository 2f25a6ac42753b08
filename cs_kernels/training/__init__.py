"""Training integration: connection discovery, zero-copy gradient collection, the
`ConnectionStrength` controller, priority telemetry, DDP and FSDP2 (``fully_shard``) support,
and per-task norms for models written without tasks (`task_norms`, `task_scope`).

    from cs_kernels.training import ConnectionStrength, connect, discover_connections
"""

from cs_kernels.training.buffer import GradientBuffer
from cs_kernels.training.controller import ConnectionStrength
from cs_kernels.training.discovery import (
    Connection,
    Registration,
    TaskLink,
    connect,
    discover_connections,
)
from cs_kernels.training.per_task_norms import TaskNorm, TaskScopeError, task_norms, task_scope
from cs_kernels.training.telemetry import PriorityTelemetry

__all__ = [
    "Connection",
    "ConnectionStrength",
    "GradientBuffer",
    "PriorityTelemetry",
    "Registration",
    "TaskLink",
    "TaskNorm",
    "TaskScopeError",
    "connect",
    "discover_connections",
    "task_norms",
    "task_scope",
]
