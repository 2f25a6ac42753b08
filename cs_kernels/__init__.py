"""cs_kernels: fast connection strength-based multi-task optimization.

Jeong & Yoon, "Quantifying Task Priority for Multi-Task Optimization", CVPR 2024. The math
every backend follows is restated in docs/algorithm.md; docs/backends.md lists the backends.

Public API (autograd-free):
    batchnorm_scale, channel_strength, top_priority, plan_top_priority  -- strength
    project_layer, phase2, phase2_from_weights, Phase2Plan              -- Phase 2
    plan_row_sqnorm, channel_gram, projection_coefficients, apply_projection
                                                   -- Phase 2 in steps (sharded models)
    available_backends, backend_status                                  -- dispatch
    ConnectionStrength, connect, discover_connections, PriorityTelemetry -- training
    task_norms, task_scope, TaskNorm                                    -- bring your own model
"""

from cs_kernels._version import __version__ as __version__
from cs_kernels.backends import (
    BackendUnavailableError,
    available_backends,
    backend_names,
    backend_status,
)
from cs_kernels.phase2_steps import (
    apply_projection,
    channel_gram,
    plan_row_sqnorm,
    projection_coefficients,
)
from cs_kernels.plan import ConnectionLayer, Phase2Plan
from cs_kernels.projection import phase2, phase2_from_weights, project_layer
from cs_kernels.strength import (
    batchnorm_scale,
    channel_strength,
    plan_top_priority,
    top_priority,
)
from cs_kernels.training import (
    ConnectionStrength,
    PriorityTelemetry,
    TaskNorm,
    TaskScopeError,
    connect,
    discover_connections,
    task_norms,
    task_scope,
)

__all__ = [
    "BackendUnavailableError",
    "ConnectionLayer",
    "ConnectionStrength",
    "Phase2Plan",
    "PriorityTelemetry",
    "TaskNorm",
    "TaskScopeError",
    "apply_projection",
    "available_backends",
    "backend_names",
    "backend_status",
    "batchnorm_scale",
    "channel_gram",
    "channel_strength",
    "connect",
    "discover_connections",
    "phase2",
    "phase2_from_weights",
    "plan_row_sqnorm",
    "plan_top_priority",
    "project_layer",
    "projection_coefficients",
    "task_norms",
    "task_scope",
    "top_priority",
]
