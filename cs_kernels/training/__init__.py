"""Training integration: connection discovery, zero-copy gradient collection, the
`ConnectionStrength` controller, priority telemetry, DDP and FSDP2 (``fully_shard``) support.

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
from cs_kernels.training.telemetry import PriorityTelemetry

__all__ = [
    "Connection",
    "ConnectionStrength",
    "GradientBuffer",
    "PriorityTelemetry",
    "Registration",
    "TaskLink",
    "connect",
    "discover_connections",
]
