"""Connection discovery: which shared Conv/Linear weights feed task-specific connections.

A *connection* (docs/algorithm.md, "Connection strength") is a shared weight ``W: [C, ...]``
whose output channels each task reaches through its own parameters: a per-task
BatchNorm/LayerNorm/GroupNorm right after the layer, or a per-task Linear head that reads the
layer's output. `discover_connections` finds them from the model's structure, traced once on
a sample batch: module hooks record which Conv/Linear produced a tensor and which module
read it, and the autograd graph links the two and tells which parameters each task reaches.
Parameter names play no part. `connect` registers a connection by hand.

Per-task factor ``f_t[c]`` of each connection kind (``S_t[c] = ||W[c]||^2 * f_t[c]``):

- ``batchnorm``: ``gamma^2 / (running_var + eps)`` (`cs_kernels.batchnorm_scale`; without
  affine scale ``1 / (running_var + eps)``, without running statistics ``gamma^2``, the
  paper's conventions).
- ``groupnorm``, ``layernorm``: ``gamma^2`` (no running statistics: the paper's convention).
  A LayerNorm whose scale spans more than the channel (``[C, H, W]`` after a conv) uses the
  mean of ``gamma^2`` over the channel's other entries.
- ``linear_head``: the squared norm of the head's input columns that read channel ``c``
  (``sum_k H_t[k, c]^2``; summed over the ``S`` columns of a channel when the head reads a
  flattened ``[C, S]`` map).
- ``tensor``: a ``[C]`` factor given to `connect`, read live at every step.

A task that does not reach a connection layer gets factor 0 (it never leads a channel).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn
from torch.autograd.graph import Node

ConnectionKind = Literal["batchnorm", "layernorm", "groupnorm", "linear_head", "tensor"]

NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._BatchNorm,
    nn.LayerNorm,
    nn.GroupNorm,
)
PRODUCER_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)

# Autograd nodes that keep channel c of their single differentiable input in channel c:
# activations, dropout, elementwise arithmetic with constants, copies.
_ELEMENTWISE = frozenset(
    {
        "Relu",
        "LeakyRelu",
        "Gelu",
        "Silu",
        "Sigmoid",
        "Tanh",
        "Elu",
        "Hardtanh",
        "Hardswish",
        "Hardsigmoid",
        "Mish",
        "Softplus",
        "Threshold",
        "Clamp",
        "ClampMin",
        "ClampMax",
        "NativeDropout",
        "Mul",
        "Div",
        "Add",
        "Sub",
        "Neg",
        "Clone",
        "ToCopy",
        "Alias",
    }
)
# Between a layer and a head that reads it: also spatial pooling and flattening.
_POOL_OR_VIEW = frozenset(
    {
        "Mean",
        "Sum",
        "Amax",
        "AdaptiveAvgPool2D",
        "AdaptiveAvgPool3D",
        "AvgPool2D",
        "AvgPool3D",
        "MaxPool2DWithIndices",
        "MaxPool3DWithIndices",
        "AdaptiveMaxPool2D",
        "AdaptiveMaxPool3D",
        "View",
        "UnsafeView",
        "ReshapeAlias",
        "Squeeze",
        "Unsqueeze",
        "Expand",
    }
)
_MAX_PATH = 64


def _op_name(node: Node) -> str:
    """``"ReluBackward0"`` -> ``"Relu"``."""
    name = node.name().rstrip("0123456789")
    return name.removesuffix("Backward")


@dataclass(frozen=True)
class TaskLink:
    """How one task reaches the output channels of a connection layer.

    Attributes:
        kind: the connection kind (see the module docstring for its factor).
        name: the module's qualified name in the model, or ``"<tensor>"``.
        module: the task-specific module (None for ``kind="tensor"``).
        tensor: ``[C]`` factor for ``kind="tensor"``.
        group: input columns per channel of a ``linear_head`` (``S``), entries per channel
            of a ``layernorm`` scale; 1 otherwise.
        channel_first: how a multi-column head or LayerNorm lays out the ``[C, S]`` map
            (conv outputs: channel first; Linear outputs: channel last).
    """

    kind: ConnectionKind
    name: str
    module: nn.Module | None = None
    tensor: Tensor | None = None
    group: int = 1
    channel_first: bool = True


@dataclass(frozen=True)
class Connection:
    """A shared connection-layer weight and each task's link to its output channels.

    Attributes:
        name: the weight's qualified parameter name in the model.
        weight: the shared weight ``[C, ...]`` (rows are output channels).
        links: task -> `TaskLink`; a task without a link has factor 0 on this layer.
        source: ``"discovered"`` or ``"registered"`` (`connect`).
    """

    name: str
    weight: nn.Parameter
    links: Mapping[str, TaskLink]
    source: Literal["discovered", "registered"] = "discovered"

    @property
    def channels(self) -> int:
        return int(self.weight.shape[0])

    @property
    def kind(self) -> str:
        """The connection kinds of the tasks, e.g. ``"batchnorm"`` or ``"batchnorm+tensor"``."""
        kinds = dict.fromkeys(link.kind for link in self.links.values())
        return "+".join(kinds)


@dataclass(frozen=True)
class Registration:
    """An explicit connection made by `connect`, checked against the model later."""

    weight: Tensor
    scales: Mapping[str, nn.Module | Tensor]


def _check_weight(weight: object, name: str) -> Tensor:
    if not isinstance(weight, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor (a shared weight), got {type(weight)}")
    if weight.dim() < 1 or weight.shape[0] < 1 or weight.numel() == 0:
        raise ValueError(f"{name} must be [C, ...] with C >= 1, got shape {tuple(weight.shape)}")
    if not weight.dtype.is_floating_point:
        raise TypeError(f"{name} must be a float tensor, got {weight.dtype}")
    return weight


def _module_link(
    module: nn.Module, name: str, channels: int, channel_first: bool, where: str
) -> TaskLink:
    """The link of a task-specific module to ``channels`` channels; ValueError on mismatch."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        if module.num_features != channels:
            raise ValueError(
                f"{where}: {type(module).__name__} has {module.num_features} features "
                f"but the weight has {channels} output channels"
            )
        if module.weight is None and module.running_var is None:
            raise ValueError(
                f"{where}: a BatchNorm without affine scale and without running statistics "
                "has no task-specific factor"
            )
        return TaskLink("batchnorm", name, module)
    if isinstance(module, nn.GroupNorm):
        if module.num_channels != channels:
            raise ValueError(
                f"{where}: GroupNorm has {module.num_channels} channels "
                f"but the weight has {channels} output channels"
            )
        if module.weight is None:
            raise ValueError(f"{where}: a GroupNorm without affine scale has no task factor")
        return TaskLink("groupnorm", name, module)
    if isinstance(module, nn.LayerNorm):
        if module.weight is None:
            raise ValueError(f"{where}: a LayerNorm without affine scale has no task factor")
        shape = tuple(module.normalized_shape)
        size = math.prod(shape)
        fits = shape[0] == channels if channel_first else shape[-1] == channels
        if size != channels and not fits:
            raise ValueError(
                f"{where}: LayerNorm{shape} does not scale the weight's {channels} channels"
            )
        return TaskLink(
            "layernorm", name, module, group=size // channels, channel_first=channel_first
        )
    if isinstance(module, nn.Linear):
        if module.in_features % channels != 0:
            raise ValueError(
                f"{where}: Linear head has {module.in_features} input features, "
                f"not a multiple of the weight's {channels} channels"
            )
        return TaskLink(
            "linear_head",
            name,
            module,
            group=module.in_features // channels,
            channel_first=channel_first,
        )
    raise TypeError(
        f"{where}: a scale module must be a BatchNorm, LayerNorm, GroupNorm or Linear head, "
        f"got {type(module).__name__}"
    )


def _tensor_link(tensor: Tensor, channels: int, where: str) -> TaskLink:
    if not tensor.dtype.is_floating_point:
        raise TypeError(f"{where}: a scale tensor must be float, got {tensor.dtype}")
    if tuple(tensor.shape) != (channels,):
        raise ValueError(f"{where}: a scale tensor must be [{channels}], got {tuple(tensor.shape)}")
    if not bool(torch.isfinite(tensor).all()) or bool((tensor < 0).any()):
        raise ValueError(f"{where}: a scale tensor must be finite and non-negative")
    return TaskLink("tensor", "<tensor>", tensor=tensor)


def connect(weight: Tensor, scales: Mapping[str, nn.Module | Tensor]) -> Registration:
    """Declare a connection by hand: ``scales`` maps each task to its task-specific module
    (BatchNorm, LayerNorm, GroupNorm, or a Linear head reading the layer) or to a ``[C]``
    factor tensor (read live each step).

    Args:
        weight: the shared weight ``[C, ...]`` (a parameter of the model).
        scales: ``{task: module or [C] tensor}``; tasks left out get factor 0.

    Returns:
        A `Registration` for ``ConnectionStrength(..., connections=[...])``, which checks it
        against the model (unknown task, foreign weight or module, channel mismatch, a module
        that does not read the weight's output).
    """
    w = _check_weight(weight, "weight")
    if not isinstance(scales, Mapping) or len(scales) == 0:
        raise TypeError("scales must be a non-empty mapping {task: module or [C] tensor}")
    channel_first = w.dim() != 2
    for task, scale in scales.items():
        if not isinstance(task, str):
            raise TypeError(f"scales keys must be task names (str), got {type(task).__name__}")
        where = f"connect(): scales[{task!r}]"
        if isinstance(scale, nn.Module):
            _module_link(scale, "", int(w.shape[0]), channel_first, where)
        elif isinstance(scale, Tensor):
            _tensor_link(scale, int(w.shape[0]), where)
        else:
            raise TypeError(f"{where} must be an nn.Module or a Tensor, got {type(scale)}")
    return Registration(w, dict(scales))


# --------------------------------------------------------------------------------------
# Tracing


@dataclass
class _Consumer:
    module: nn.Module
    node: Node | None
    shape: tuple[int, ...]


@dataclass
class TaskTrace:
    """What one task's forward on the sample batch touched (no graph references kept)."""

    reached: set[int] = field(default_factory=set)  # ids of parameters reached
    called: set[int] = field(default_factory=set)  # ids of modules called
    # id(consumer module) -> the producers reaching its input
    feeds: dict[int, list[Feed]] = field(default_factory=dict)
    # id(consumer module) -> ids of every producer module upstream of its input
    upstream: dict[int, set[int]] = field(default_factory=dict)


@dataclass
class ModelTrace:
    """The structure of a multi-task model, from one forward per task on a sample batch."""

    tasks: tuple[str, ...]
    params: dict[int, tuple[str, nn.Parameter]]
    modules: dict[int, tuple[str, nn.Module]]
    per_task: dict[str, TaskTrace]

    def reach_count(self, param: Tensor) -> int:
        return sum(id(param) in t.reached for t in self.per_task.values())

    def shared_params(self) -> list[tuple[str, nn.Parameter]]:
        """Trainable parameters reached by at least two tasks, in model order."""
        return [(n, p) for n, p in self.params.values() if self.reach_count(p) >= 2]

    def task_specific_params(self) -> list[tuple[str, nn.Parameter]]:
        """Trainable parameters reached by exactly one task, in model order."""
        return [(n, p) for n, p in self.params.values() if self.reach_count(p) == 1]

    def owner_task(self, module: nn.Module) -> str | None:
        """The one task whose forward calls ``module``, or None (shared or unused)."""
        users = [t for t, tr in self.per_task.items() if id(module) in tr.called]
        return users[0] if len(users) == 1 else None


def _as_args(sample_input: object) -> tuple[object, ...]:
    return sample_input if isinstance(sample_input, tuple) else (sample_input,)


def _tensors_in(value: object) -> Iterator[Tensor]:
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, Mapping):
        for v in value.values():
            yield from _tensors_in(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors_in(v)


# Views that move the channel dimension without mixing channels (a channels-last LayerNorm
# after a conv); accepted on the way to a norm that scales each channel alone.
_LAYOUT = frozenset({"Permute", "Transpose"})
# Residual sums: both summands keep their channels, so a norm after ``x + f(x)`` scales the
# channels that ``f``'s last layer writes (pre-norm transformers, pre-activation ResNets).
_RESIDUAL = frozenset({"Add", "Sub"})


@dataclass(frozen=True)
class Feed:
    """A producer's output reaching a consumer module's input.

    Attributes:
        producer: id of the Conv/Linear module.
        shape: the producer's output shape.
        rank: how directly: 0 channel-preserving ops only, 1 through one residual sum,
            2 through pooling or flattening; lower wins.
        moved: the channel dimension was permuted on the way.
    """

    producer: int
    shape: tuple[int, ...]
    rank: int
    moved: bool


def _graph_inputs(node: Node) -> list[Node]:
    inputs = [n for n, _ in node.next_functions if n is not None]
    return [n for n in inputs if n.name() != "torch::autograd::AccumulateGrad"]


def _walk(
    node: Node | None, producers: Mapping[Node, object], *, pool: bool, residual: bool
) -> list[tuple[Node, bool]]:
    """Producer outputs reached upward from ``node`` through channel-preserving ops.

    ``pool`` also crosses pooling and views (for heads), ``residual`` one two-input sum (both
    summands are followed). Returns ``(producer node, channel dimension moved)`` pairs.
    """
    allowed = _ELEMENTWISE | _POOL_OR_VIEW if pool else _ELEMENTWISE
    found: list[tuple[Node, bool]] = []
    stack: list[tuple[Node | None, int, bool, int]] = [(node, 0, False, 0)]
    while stack:
        n, sums, moved, steps = stack.pop()
        if n is None or steps > _MAX_PATH:
            continue
        if n in producers:
            found.append((n, moved))
            continue
        op, inputs = _op_name(n), _graph_inputs(n)
        if len(inputs) == 1 and (op in allowed or (op in _LAYOUT and not pool)):
            stack.append((inputs[0], sums, moved or op in _LAYOUT, steps + 1))
        elif residual and sums == 0 and op in _RESIDUAL and len(inputs) == 2:
            stack.extend((m, 1, moved, steps + 1) for m in inputs)
    return found


def _upstream(node: Node | None, producers: Mapping[Node, int]) -> set[int]:
    """Every producer module whose output lies upstream of ``node``."""
    found: set[int] = set()
    seen: set[Node] = set()
    stack = [node] if node is not None else []
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n in producers:
            found.add(producers[n])
        stack.extend(m for m, _ in n.next_functions if m is not None)
    return found


def _reached(outputs: Sequence[Tensor], params: Mapping[int, object]) -> set[int]:
    reached: set[int] = set()
    seen: set[Node] = set()
    stack = [t.grad_fn for t in outputs if t.grad_fn is not None]
    while stack:
        n = stack.pop()
        if n is None or n in seen:
            continue
        seen.add(n)
        variable = getattr(n, "variable", None)
        if isinstance(variable, Tensor) and id(variable) in params:
            reached.add(id(variable))
        stack.extend(m for m, _ in n.next_functions if m is not None)
    return reached


def trace_model(
    model: nn.Module,
    tasks: Sequence[str],
    sample_input: object,
    *,
    watch: Sequence[nn.Module] = (),
) -> ModelTrace:
    """Run ``model(*sample_input, task=t)`` once per task and record its structure.

    The model's buffers (BatchNorm running statistics) and the random number generators are
    restored afterwards, so tracing leaves no trace. ``watch``: modules whose every upstream
    producer is recorded (to check `connect` registrations).
    """
    params = {id(p): (n, p) for n, p in model.named_parameters() if p.requires_grad}
    modules = {id(m): (n, m) for n, m in model.named_modules()}
    watched = {id(m) for m in watch}
    saved = [(b, b.detach().clone()) for b in model.buffers()]
    devices = sorted(
        {p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"}
        | {b.device.index or 0 for b in model.buffers() if b.device.type == "cuda"}
    )
    per_task: dict[str, TaskTrace] = {}
    try:
        with torch.random.fork_rng(devices=devices), torch.enable_grad():
            for task in tasks:
                per_task[task] = _trace_task(model, task, sample_input, params, watched)
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)
    return ModelTrace(tuple(tasks), params, modules, per_task)


def _trace_task(
    model: nn.Module,
    task: str,
    sample_input: object,
    params: Mapping[int, object],
    watched: set[int],
) -> TaskTrace:
    trace = TaskTrace()
    producers: dict[Node, tuple[int, tuple[int, ...]]] = {}
    consumers: list[_Consumer] = []

    def on_call(module: nn.Module, args: tuple[object, ...]) -> None:
        trace.called.add(id(module))
        is_consumer = isinstance(module, (*NORM_TYPES, nn.Linear)) or id(module) in watched
        if is_consumer and args and isinstance(args[0], Tensor):
            x = args[0]
            consumers.append(_Consumer(module, x.grad_fn, tuple(x.shape)))

    def on_output(module: nn.Module, args: tuple[object, ...], out: object) -> None:
        if isinstance(out, Tensor) and out.grad_fn is not None:
            producers[out.grad_fn] = (id(module), tuple(out.shape))

    handles = []
    for module in model.modules():
        handles.append(module.register_forward_pre_hook(on_call))
        if isinstance(module, PRODUCER_TYPES):
            handles.append(module.register_forward_hook(on_output))
    try:
        output = model(*_as_args(sample_input), task=task)
    finally:
        for handle in handles:
            handle.remove()
    outputs = list(_tensors_in(output))
    if not outputs:
        raise ValueError(f"model(sample_input, task={task!r}) returned no tensor to trace")
    trace.reached = _reached(outputs, params)
    producer_ids = {node: pid for node, (pid, _) in producers.items()}
    for consumer in consumers:
        key = id(consumer.module)
        # The most direct kind of path wins: plain, then through a residual sum, then pooled.
        for rank, (pool, residual) in enumerate(((False, False), (False, True), (True, False))):
            reached = _walk(consumer.node, producers, pool=pool, residual=residual)
            for node, moved in reached:
                pid, shape = producers[node]
                if pid != key:
                    trace.feeds.setdefault(key, []).append(Feed(pid, shape, rank, moved))
            if reached:
                break
        if key in watched:
            trace.upstream.setdefault(key, set()).update(_upstream(consumer.node, producer_ids))
    return trace


# --------------------------------------------------------------------------------------
# Discovery


def _links_of(
    trace: ModelTrace, producer: nn.Module, weight: nn.Parameter, shared: set[int]
) -> tuple[dict[str, TaskLink], str | None]:
    """Each task's link to ``producer``'s output channels, or why there is none."""
    channels = int(weight.shape[0])
    channel_first = not isinstance(producer, nn.Linear)
    links: dict[str, TaskLink] = {}
    for task, tt in trace.per_task.items():
        if id(weight) not in tt.reached:
            continue
        candidates: list[tuple[int, TaskLink]] = []
        for key, feeds in tt.feeds.items():
            name, module = trace.modules[key]
            if trace.owner_task(module) != task:
                continue  # shared (or unused) consumers are not task-specific connections
            for feed in feeds:
                if feed.producer != id(producer):
                    continue
                if isinstance(module, NORM_TYPES):
                    try:
                        link = _module_link(module, name, channels, channel_first, name)
                    except ValueError:
                        continue  # e.g. a norm over a flattened map: no per-channel scale
                    if feed.moved and link.group != 1:
                        continue  # a permuted map under a multi-entry scale: no clear channel
                    candidates.append((feed.rank, link))
                elif _head_fits(module, feed.shape, channels, channel_first):
                    link = _module_link(module, name, channels, channel_first, name)
                    candidates.append((3, link))
        if not candidates:
            return {}, f"task {task!r} reaches it without a task-specific norm or head"
        # A norm right after the layer wins over one after a residual sum, then one after
        # pooling, then a head.
        links[task] = min(candidates, key=lambda c: c[0])[1]
    return links, None


def _head_fits(module: nn.Module, shape: tuple[int, ...], channels: int, first: bool) -> bool:
    """A Linear head reading the producer's output of ``shape`` maps its columns to channels."""
    if not isinstance(module, nn.Linear):
        return False
    spatial = math.prod(shape[2:]) if first else math.prod(shape[1:-1])
    return module.in_features in (channels, channels * spatial)


@dataclass(frozen=True)
class Discovery:
    """Result of `discover_connections`: the connections and the layers left out."""

    connections: tuple[Connection, ...]
    skipped: tuple[tuple[str, str], ...]  # (weight name, reason)
    trace: ModelTrace


def discover(
    model: nn.Module, tasks: Sequence[str], sample_input: object, *, trace: ModelTrace | None = None
) -> Discovery:
    """`discover_connections` with the layers it left out and the trace it used."""
    trace = trace if trace is not None else trace_model(model, tasks, sample_input)
    shared = {id(p) for _, p in trace.shared_params()}
    connections: list[Connection] = []
    skipped: list[tuple[str, str]] = []
    for module in model.modules():
        if not isinstance(module, PRODUCER_TYPES):
            continue
        weight = module.weight
        if not isinstance(weight, nn.Parameter) or id(weight) not in shared:
            continue
        links, reason = _links_of(trace, module, weight, shared)
        weight_name = trace.params[id(weight)][0]
        if reason is not None:
            skipped.append((weight_name, reason))
        elif links:
            connections.append(Connection(weight_name, weight, links))
    return Discovery(tuple(connections), tuple(skipped), trace)


def discover_connections(
    model: nn.Module, tasks: Sequence[str], sample_input: object
) -> list[Connection]:
    """Find every shared Conv/Linear weight that feeds task-specific connections.

    Args:
        model: called as ``model(*sample_input, task=t)`` for each task (a
            ``DistributedDataParallel`` wrapper is traced through its ``.module``).
        tasks: the task names.
        sample_input: one batch: a tensor or a tuple of positional arguments.

    Returns:
        The connections in model order: shared weights (reached by two or more tasks) whose
        output is read by a per-task BatchNorm/LayerNorm/GroupNorm (directly or after an
        activation) or by a per-task Linear head (possibly after pooling and flattening).
    """
    inner = getattr(model, "module", model) if _is_ddp(model) else model
    return list(discover(inner, list(tasks), sample_input).connections)


def _is_ddp(model: nn.Module) -> bool:
    return isinstance(model, nn.parallel.DistributedDataParallel)


def resolve_registration(
    reg: Registration, trace: ModelTrace, index: int, shared: set[int]
) -> Connection:
    """Check ``reg`` against the traced model; ValueError says what does not match."""
    where = f"connections[{index}]"
    entry = trace.params.get(id(reg.weight))
    if entry is None:
        raise ValueError(f"{where}: the weight is not a trainable parameter of the model")
    weight_name, weight = entry
    if id(weight) not in shared:
        raise ValueError(
            f"{where}: {weight_name} is not shared: the sample forward reaches it from "
            f"{trace.reach_count(weight)} task(s), a connection layer needs at least two"
        )
    producer = next(
        (
            (n, m)
            for n, m in trace.modules.values()
            if isinstance(m, PRODUCER_TYPES) and m.weight is weight
        ),
        None,
    )
    channel_first = weight.dim() != 2
    links: dict[str, TaskLink] = {}
    for task, scale in reg.scales.items():
        if task not in trace.tasks:
            raise ValueError(f"{where}: unknown task {task!r}; tasks are {list(trace.tasks)}")
        at = f"{where} ({weight_name}), task {task!r}"
        if isinstance(scale, Tensor):
            links[task] = _tensor_link(scale, int(weight.shape[0]), at)
            continue
        owned = trace.modules.get(id(scale))
        if owned is None:
            raise ValueError(f"{at}: the scale module is not a submodule of the model")
        module_name, module = owned
        link = _module_link(module, module_name, int(weight.shape[0]), channel_first, at)
        tt = trace.per_task[task]
        if id(module) not in tt.called:
            raise ValueError(f"{at}: {module_name} is not called in task {task!r}'s forward")
        if id(weight) not in tt.reached:
            raise ValueError(f"{at}: task {task!r}'s forward does not reach {weight_name}")
        if producer is not None and id(producer[1]) not in tt.upstream.get(id(module), set()):
            raise ValueError(
                f"{at}: {module_name} does not read the output of {producer[0]} "
                "in the traced forward: the declared connection does not match the model"
            )
        links[task] = link
    return Connection(weight_name, weight, links, source="registered")


def coverage_line(connections: Sequence[Connection], shared_numel: int) -> str:
    """How much of the shared parameters Phase 2 projects: the elements of the connection
    layers over all shared elements (the rest, biases and unconnected layers, is summed)."""
    in_layers = sum(c.weight.numel() for c in connections)
    share = 100.0 * in_layers / shared_numel if shared_numel else 0.0
    return (
        f"coverage: {share:.1f}% of the shared parameter elements ({in_layers:,} of "
        f"{shared_numel:,}) are in connection layers; the rest is plainly summed"
    )


def format_summary(
    connections: Sequence[Connection],
    tasks: Sequence[str],
    skipped: Sequence[tuple[str, str]] = (),
    *,
    shared_numel: int | None = None,
    shared_count: int | None = None,
) -> str:
    """A readable table: layer, channels, tasks (with their modules), connection kind."""
    rows = [("layer", "channels", "kind", "source", "tasks")]
    for c in connections:
        linked = ", ".join(f"{t}:{c.links[t].name}" if t in c.links else f"{t}:-" for t in tasks)
        rows.append((c.name, str(c.channels), c.kind, c.source, linked))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(r[i].ljust(widths[i]) for i in range(4)) + "  " + r[4] for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    total = sum(c.channels for c in connections)
    head = f"{len(connections)} connection layer(s), {total} channels, tasks {list(tasks)}"
    if shared_numel is not None:
        head += f"; {shared_count} shared parameter tensor(s), {shared_numel} elements"
        lines.insert(0, coverage_line(connections, shared_numel))
    lines.insert(0, head)
    for name, reason in skipped:
        lines.append(f"plainly summed: {name} ({reason})")
    return "\n".join(lines)
