"""Per-task normalisation for models written without tasks: `task_norms` and `task_scope`.

The paper's task-specific connection is a normalisation layer of each task's own after every
shared conv. A torchvision or timm backbone has one norm per place and a forward that takes no
task. `task_norms` replaces each norm, in place, by a `TaskNorm`: a ``ModuleDict`` holding a
deep copy of the norm per task (affine parameters and running statistics copied, so pretrained
weights carry over). `task_scope` chooses, for the duration of a ``with`` block, which copy
every `TaskNorm` inside a module runs, so the model's own forward stays unchanged::

    backbone = ck.task_norms(torchvision.models.resnet50(weights=...), ["seg", "depth"])
    with ck.task_scope(backbone, "depth"):
        features = backbone(x)  # every norm runs its "depth" copy

Where the active task lives. Each thread has its own scopes (a ``threading.local`` mapping
``id(TaskNorm) -> task``), so threads running different tasks on one model do not see each
other's scopes, and a scope's exit restores exactly what its entry replaced (nesting and
exceptions included). `torch.compile` traces the thread-local lookup without a graph break and
guards on it: a compiled forward is specialised once per task (one recompilation per task,
then cached; raise ``torch._dynamo.config.cache_size_limit`` beyond 8 tasks). A
``DataParallel`` replica, which runs in a worker thread, is pinned to the task active in the
thread that made it (`TaskNorm._replicate_for_data_parallel`).

Frozen BatchNorm (torchvision's and timm's ``FrozenBatchNorm2d``, timm's
``FrozenBatchNormAct2d``): converted to a *trainable* ``BatchNorm2d`` (timm's
``BatchNormAct2d``, activation and dropout kept) per task, with the frozen statistics and
affine values. A frozen ``gamma`` never trains, so every task's factor would stay identical
and the priority uniform: Phase 1 could never learn it. Batch statistics are then used in
training mode, as for any BatchNorm; call ``.eval()`` on the copies to keep normalising with
the running statistics while ``gamma`` and ``beta`` train.

Converting twice is an error (the model already holds `TaskNorm` containers), as is a model
without any norm. On any error the caller's module is left unchanged.
"""

from __future__ import annotations

import copy
import sys
import threading
from collections.abc import Sequence
from types import TracebackType
from typing import TypeVar, cast

import torch
from torch import Tensor, nn

M = TypeVar("M", bound=nn.Module)

NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._BatchNorm,  # BatchNorm1d/2d/3d, SyncBatchNorm, timm BatchNormAct2d
    nn.GroupNorm,
    nn.LayerNorm,
)
_FROZEN_BUFFERS = ("weight", "bias", "running_mean", "running_var")

# This thread's active tasks: id(TaskNorm) -> task. Read by TaskNorm.forward.
_STATE = threading.local()
_NO_SCOPES: dict[int, str] = {}


class TaskScopeError(RuntimeError):
    """A `TaskNorm` ran outside any `task_scope` (it never falls back to a task silently)."""


def _thread_scopes() -> dict[int, str]:
    scopes: dict[int, str] | None = getattr(_STATE, "scopes", None)
    if scopes is None:
        scopes = {}
        _STATE.scopes = scopes
    return scopes


class TaskNorm(nn.ModuleDict):
    """One copy of a normalisation module per task; ``forward`` runs the active task's copy.

    ``norm[task]`` is task ``task``'s copy (a ``BatchNorm2d``, ``LayerNorm``, ...). The active
    task is set by `task_scope`; outside any scope ``forward`` raises `TaskScopeError` naming
    the module. Built by `task_norms`, not by hand.

    Args:
        copies: ``{task: norm}``, one module per task.
        source: the norm's qualified name in the converted model (for error messages).
    """

    def __init__(self, copies: dict[str, nn.Module], source: str) -> None:
        super().__init__(copies)
        self._cs_source = source
        self._cs_pinned: str | None = None

    @property
    def tasks(self) -> tuple[str, ...]:
        """The task names, in conversion order."""
        return tuple(self.keys())

    @property
    def source(self) -> str:
        """The qualified name of the norm this container replaced."""
        return self._cs_source

    def active_task(self) -> str | None:
        """The task this container runs now in this thread, or None outside any scope."""
        if self._cs_pinned is not None:
            return self._cs_pinned
        return getattr(_STATE, "scopes", _NO_SCOPES).get(id(self))

    def forward(self, *args: object, **kwargs: object) -> object:
        task = self.active_task()
        if task is None:
            raise TaskScopeError(
                f"{self._cs_source or 'the model'} (a per-task norm made by "
                "cs_kernels.task_norms) was called outside cs_kernels.task_scope: run the "
                f"forward inside `with task_scope(model, task):` with a task of {list(self)}"
            )
        return self[task](*args, **kwargs)

    def _replicate_for_data_parallel(self) -> TaskNorm:
        # DataParallel runs replicas in worker threads, which have no scopes of their own:
        # each replica keeps the task active in the thread that replicates the model.
        replica = cast(TaskNorm, super()._replicate_for_data_parallel())  # type: ignore[no-untyped-call]
        replica._cs_pinned = self.active_task()
        return replica

    def extra_repr(self) -> str:
        return f"source={self._cs_source!r}"


# ----------------------------------------------------------------------------- conversion


def check_tasks(tasks: object, *, minimum: int = 1) -> tuple[str, ...]:
    """Task names as a tuple; TypeError/ValueError naming ``tasks`` when they are unusable."""
    if isinstance(tasks, (str, bytes)) or not isinstance(tasks, Sequence):
        raise TypeError(f"tasks must be a sequence of task names (str), got {type(tasks).__name__}")
    names = tuple(tasks)
    for t in names:
        if not isinstance(t, str):
            raise TypeError(f"tasks must hold str names, got {t!r} ({type(t).__name__})")
    if len(names) < minimum:
        raise ValueError(f"tasks needs at least {minimum} task name(s), got {list(names)}")
    duplicated = sorted({t for t in names if names.count(t) > 1})
    if duplicated:
        raise ValueError(f"tasks must be distinct, got {list(names)} ({duplicated} repeated)")
    probe = TaskNorm({}, "")
    for t in names:
        if not t or "." in t or hasattr(probe, t):
            raise ValueError(
                f"task name {t!r} cannot name a submodule: it must be non-empty, without '.', "
                "and not an attribute of nn.Module (e.g. 'eval', 'forward', 'training')"
            )
    return names


def is_frozen_batchnorm(module: nn.Module) -> bool:
    """torchvision's / timm's ``FrozenBatchNorm2d`` and timm's ``FrozenBatchNormAct2d``."""
    buffers = dict(module.named_buffers(recurse=False))
    return (
        type(module).__name__.startswith("FrozenBatchNorm")
        and all(isinstance(buffers.get(b), Tensor) for b in _FROZEN_BUFFERS)
        and not any(True for _ in module.parameters(recurse=False))
    )


def is_norm(module: nn.Module) -> bool:
    """A module `task_norms` converts."""
    return isinstance(module, NORM_TYPES) or is_frozen_batchnorm(module)


def _trainable_batchnorm(frozen: nn.Module, where: str) -> nn.Module:
    """A trainable BatchNorm2d (timm: BatchNormAct2d) with ``frozen``'s values."""
    weight = cast(Tensor, frozen.weight)
    num_features = int(weight.shape[0])
    eps = float(cast(float, frozen.eps))
    if hasattr(frozen, "act"):  # timm's FrozenBatchNormAct2d: BatchNormAct2d of its library
        library = sys.modules.get(type(frozen).__module__)
        norm_act = getattr(library, "BatchNormAct2d", None)
        if norm_act is None:
            raise TypeError(
                f"{where}: {type(frozen).__name__} has an activation but its library has no "
                "trainable BatchNormAct2d to convert it to; unfreeze it first "
                "(timm.layers.unfreeze_batch_norm_2d)"
            )
        trainable = norm_act(num_features).to(device=weight.device, dtype=weight.dtype)
        trainable.eps = eps
        trainable.act = copy.deepcopy(frozen.act)
        trainable.drop = copy.deepcopy(frozen.drop)
    else:
        trainable = nn.BatchNorm2d(num_features, eps=eps, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        for name in _FROZEN_BUFFERS:
            getattr(trainable, name).copy_(getattr(frozen, name))
    trainable.train(frozen.training)
    return cast(nn.Module, trainable)


def _copies(norm: nn.Module, tasks: Sequence[str], where: str) -> dict[str, nn.Module]:
    if isinstance(norm, nn.modules.lazy.LazyModuleMixin) and norm.has_uninitialized_params():
        raise ValueError(
            f"{where}: {type(norm).__name__} is not initialised yet; run one forward before "
            "task_norms so its parameters exist"
        )
    source = _trainable_batchnorm(norm, where) if is_frozen_batchnorm(norm) else norm
    return {t: copy.deepcopy(source) for t in tasks}


def task_norms(module: M, tasks: Sequence[str]) -> M:
    """Give every normalisation module inside ``module`` one copy per task, in place.

    Converts ``BatchNorm1d/2d/3d``, ``SyncBatchNorm``, ``GroupNorm``, ``LayerNorm`` and their
    subclasses (timm's ``BatchNormAct2d`` keeps its activation and dropout, ``LayerNorm2d``
    its layout), and frozen BatchNorms into trainable ones (see the module docstring). Each
    becomes a `TaskNorm` holding a deep copy per task (parameters, running statistics,
    ``requires_grad``, device, dtype and train/eval mode copied). A norm registered at several
    places stays one shared container. Build the optimizer after converting: the copies are
    new parameters.

    Args:
        module: the model (or backbone) to convert; it must not itself be a norm.
        tasks: distinct task names (str), usable as submodule names.

    Returns:
        ``module`` itself, converted.

    Raises:
        TypeError / ValueError: bad ``tasks``; ``module`` not an ``nn.Module``, itself a norm,
            already converted, or without any norm. ``module`` is then unchanged.
    """
    names = check_tasks(tasks)
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    for name, sub in module.named_modules():
        if isinstance(sub, TaskNorm):
            raise ValueError(
                f"module is already converted: {name or type(module).__name__} is a TaskNorm "
                f"with tasks {list(sub.tasks)}; task_norms converts a model once"
            )
    if is_norm(module):
        raise ValueError(
            f"module is itself a norm ({type(module).__name__}): task_norms replaces norms "
            "inside a model, so pass the module that holds it"
        )
    # Every place a norm is registered (a shared norm has several), then one container per norm.
    places: dict[tuple[int, str], tuple[nn.Module, str, nn.Module]] = {}
    first_name: dict[int, str] = {}
    for prefix, parent in module.named_modules(remove_duplicate=False):
        for attr, child in parent._modules.items():
            if child is not None and is_norm(child):
                places[(id(parent), attr)] = (parent, attr, child)
                first_name.setdefault(id(child), f"{prefix}.{attr}" if prefix else attr)
    if not places:
        raise ValueError(
            f"{type(module).__name__} has no normalisation module to convert (task_norms "
            "converts BatchNorm1d/2d/3d, SyncBatchNorm, GroupNorm, LayerNorm and their "
            "subclasses, and frozen BatchNorm)"
        )
    containers: dict[int, TaskNorm] = {}
    for _, _, norm in places.values():
        if id(norm) not in containers:
            where = first_name[id(norm)]
            container = TaskNorm(_copies(norm, names, where), where)
            container.training = norm.training
            containers[id(norm)] = container
    for parent, attr, norm in places.values():  # nothing above touched the caller's module
        setattr(parent, attr, containers[id(norm)])
    return module


def task_norm_modules(module: nn.Module) -> list[tuple[str, TaskNorm]]:
    """The `TaskNorm` containers inside ``module`` (itself included), with their names."""
    return [(n, m) for n, m in module.named_modules() if isinstance(m, TaskNorm)]


# ----------------------------------------------------------------------------- the scope


class task_scope:
    """Run every `TaskNorm` inside ``module`` with ``task``'s copy, for a ``with`` block.

    ``with task_scope(model, "seg"): y = model(x)``. Scopes nest (the inner one wins for the
    containers it covers, and the outer task returns on exit), survive exceptions, and belong
    to the thread that enters them. Arguments are checked when the scope is created.

    Args:
        module: a module converted by `task_norms` (or one that contains converted parts).
        task: one of the tasks every container inside ``module`` knows.

    Raises:
        TypeError: ``module`` not an ``nn.Module``, ``task`` not a str.
        ValueError: no `TaskNorm` inside ``module``; ``task`` unknown (the message lists the
            known tasks).
    """

    def __init__(self, module: nn.Module, task: str) -> None:
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
        if not isinstance(task, str):
            raise TypeError(f"task must be a task name (str), got {type(task).__name__}")
        found = task_norm_modules(module)
        if not found:
            raise ValueError(
                f"{type(module).__name__} holds no per-task norm: convert it with "
                "cs_kernels.task_norms(module, tasks) first"
            )
        known = [t for t in found[0][1].tasks if all(t in c for _, c in found)]
        if task not in known:
            raise ValueError(
                f"unknown task {task!r}: the per-task norms in {type(module).__name__} know {known}"
            )
        self.module = module
        self.task = task
        self._keys = [id(c) for _, c in found]
        self._saved: list[list[tuple[int, str | None]]] = []

    def __enter__(self) -> nn.Module:
        scopes = _thread_scopes()
        self._saved.append([(k, scopes.get(k)) for k in self._keys])
        for k in self._keys:
            scopes[k] = self.task
        return self.module

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        scopes = _thread_scopes()
        for k, previous in self._saved.pop():
            if previous is None:
                scopes.pop(k, None)
            else:
                scopes[k] = previous
