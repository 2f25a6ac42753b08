"""`Phase2Plan`: where the connection layers sit inside the flat shared-parameter space.

A plan describes the stacked gradient buffer ``grads: [T, N]`` (docs/algorithm.md, "The stacked
gradient buffer"): ``N`` shared parameter elements, among which some runs are *connection
layers* ``(offset, channels, row_length)``: ``channels`` contiguous rows of ``row_length``
elements starting at ``offset``. Everything outside the layers is plainly summed.

A plan is built once and reused every step; the small index tables the backends need are
built on first use for each device and cached on the plan.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import NamedTuple, TypeVar, cast

import torch
import torch.utils._pytree as pytree
from torch import Tensor

from cs_kernels._validation import require_int

_T = TypeVar("_T")


class ConnectionLayer(NamedTuple):
    """One connection layer: ``channels`` rows of ``row_length`` elements from ``offset``."""

    offset: int
    channels: int
    row_length: int

    @property
    def numel(self) -> int:
        return self.channels * self.row_length


class Phase2Plan:
    """The layout of a model's shared parameters for `phase2`.

    Args:
        layers: connection layers as ``(offset, channels, row_length)`` triples, in the order
            the strength columns follow (layer 0's channels first). They must not overlap.
        numel: ``N``, the number of shared parameter elements (the buffer's row length).

    Attributes:
        layers: the layers as `ConnectionLayer` tuples, in the given order.
        numel: ``N``.
        total_channels: ``sum(channels)``, the width of the ``[T, total_channels]`` strengths.
        first_channels: for each layer, the index of its first channel in plan order.
        gaps: the plainly summed runs ``(offset, length)`` between the layers, by offset.
    """

    def __init__(self, layers: Sequence[tuple[int, int, int]], numel: int) -> None:
        self.numel = require_int(numel, "numel", 0)
        if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence):
            raise TypeError("layers must be a sequence of (offset, channels, row_length)")
        parsed = []
        for i, layer in enumerate(layers):
            if not isinstance(layer, Sequence) or len(layer) != 3:
                raise TypeError(f"layers[{i}] must be an (offset, channels, row_length) triple")
            offset = require_int(layer[0], f"layers[{i}].offset", 0)
            channels = require_int(layer[1], f"layers[{i}].channels", 1)
            row_length = require_int(layer[2], f"layers[{i}].row_length", 1)
            end = offset + channels * row_length
            if end > self.numel:
                raise ValueError(f"layers[{i}] ends at {end}, past numel={self.numel}")
            parsed.append(ConnectionLayer(offset, channels, row_length))
        self.layers: tuple[ConnectionLayer, ...] = tuple(parsed)

        order = sorted(range(len(parsed)), key=lambda i: parsed[i].offset)
        gaps: list[tuple[int, int]] = []
        cursor = 0
        for i in order:
            layer = parsed[i]
            if layer.offset < cursor:
                raise ValueError(f"layers[{i}] overlaps another layer (starts at {layer.offset})")
            if layer.offset > cursor:
                gaps.append((cursor, layer.offset - cursor))
            cursor = layer.offset + layer.numel
        if cursor < self.numel:
            gaps.append((cursor, self.numel - cursor))
        self.gaps: tuple[tuple[int, int], ...] = tuple(gaps)

        firsts, total = [], 0
        for layer in parsed:
            firsts.append(total)
            total += layer.channels
        self.first_channels: tuple[int, ...] = tuple(firsts)
        self.total_channels = total
        self._layout = (self.numel, self.layers)
        self._hash = hash(self._layout)
        self._cache: dict[tuple[str, torch.device], object] = {}

    def __eq__(self, other: object) -> bool:
        """Plans are equal when they describe the same layout (``numel`` and ``layers``)."""
        if self is other:
            return True
        if not isinstance(other, Phase2Plan):
            return NotImplemented
        return self._hash == other._hash and self._layout == other._layout

    def __hash__(self) -> int:
        return self._hash

    @classmethod
    def from_shapes(
        cls, shapes: Sequence[Sequence[int]], connected: Sequence[bool] | None = None
    ) -> Phase2Plan:
        """Lay parameters of the given shapes end to end, in order.

        Args:
            shapes: one shape per shared parameter, e.g. ``(64, 3, 7, 7)`` for a conv weight.
            connected: which parameters are connection layers (dim 0 = output channels);
                by default every parameter of rank >= 2.
        """
        if isinstance(shapes, (str, bytes)) or not isinstance(shapes, Sequence):
            raise TypeError("shapes must be a sequence of shapes (sequences of ints)")
        if connected is None:
            connected = [isinstance(s, Sequence) and len(s) >= 2 for s in shapes]
        if isinstance(connected, (str, bytes)) or not isinstance(connected, Sequence):
            raise TypeError("connected must be a sequence of bools")
        if len(connected) != len(shapes):
            raise ValueError(f"connected has {len(connected)} entries but shapes has {len(shapes)}")
        layers, offset = [], 0
        for i, (shape, is_layer) in enumerate(zip(shapes, connected, strict=True)):
            if isinstance(shape, (str, bytes)) or not isinstance(shape, Sequence):
                raise TypeError(
                    f"shapes[{i}] must be a sequence of ints, got {type(shape).__name__}"
                )
            if not isinstance(is_layer, bool):
                raise TypeError(f"connected[{i}] must be a bool, got {type(is_layer).__name__}")
            sizes = [require_int(size, f"shapes[{i}][{j}]", 0) for j, size in enumerate(shape)]
            numel = math.prod(sizes)
            if is_layer:
                if len(sizes) == 0 or numel == 0:
                    raise ValueError(
                        f"shapes[{i}] is a connection layer: needs a non-empty shape, not {shape}"
                    )
                layers.append((offset, sizes[0], numel // sizes[0]))
            offset += numel
        return cls(layers, offset)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def connection_numel(self) -> int:
        """How many of the ``N`` elements belong to connection layers."""
        return sum(layer.numel for layer in self.layers)

    def layer_table(self, device: torch.device | str) -> Tensor:
        """int64 ``[L, 4]``: ``(offset, channels, row_length, first_channel)`` per layer."""

        def build() -> Tensor:
            rows = [
                (*layer, first)
                for layer, first in zip(self.layers, self.first_channels, strict=True)
            ]
            return torch.tensor(rows, dtype=torch.int64).reshape(len(rows), 4)

        return self.cached("layer_table", device, build)

    def gap_table(self, device: torch.device | str) -> Tensor:
        """int64 ``[G, 2]``: ``(offset, length)`` of each plainly summed run, by offset."""
        return self.cached(
            "gap_table",
            device,
            lambda: torch.tensor(self.gaps, dtype=torch.int64).reshape(len(self.gaps), 2),
        )

    def cached(self, key: str, device: torch.device | str, build: Callable[[], _T]) -> _T:
        """Build ``build()`` once per (key, device) and keep it: tensors are moved to device."""
        dev = torch.device(device)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        slot = (key, dev)
        if slot not in self._cache:
            value = build()
            if isinstance(value, Tensor):
                value = value.to(dev)  # type: ignore[assignment]
            elif isinstance(value, tuple):
                moved = [v.to(dev) if isinstance(v, Tensor) else v for v in value]
                # NamedTuples are rebuilt with their own type.
                value = type(value)(*moved) if hasattr(value, "_fields") else tuple(moved)  # type: ignore[assignment]
            self._cache[slot] = value
        return self._cache[slot]  # type: ignore[return-value]

    def __repr__(self) -> str:
        return (
            f"Phase2Plan(numel={self.numel}, layers={self.num_layers}, "
            f"channels={self.total_channels}, connection_numel={self.connection_numel})"
        )


# Under torch.compile a plan is a constant (guarded by equality): the backends' host-built index
# tables are computed from it while tracing (`traced_as_constant`), which torch 2.11 allows only
# for arguments Dynamo can treat as constants.
pytree.register_constant(Phase2Plan)

_F = TypeVar("_F", bound=Callable[..., object])
traced_as_constant = cast(Callable[[_F], _F], torch.compiler.assume_constant_result)
"""Decorator for a function of a plan (and other constants) that builds host-side tables:
under torch.compile it runs once while tracing and its tensors enter the graph as constants,
so a plan whose tables were never built eagerly compiles too (Dynamo does not trace the
building, which may use Python that it cannot put in a graph)."""


@functools.lru_cache(maxsize=256)
def single_layer_plan(channels: int, row_length: int) -> Phase2Plan:
    """The plan of a lone ``[C, D]`` layer, cached so its device tables are built once."""
    return Phase2Plan([(0, channels, row_length)], channels * row_length)
