"""The benchmarks the training harness knows: data, model, losses and metrics behind one record.

`mtl.train` and ``reproduce.py`` run every method on a `Benchmark`; each benchmark says how to
build its splits (``make_data``), its model (``build_model``: a ``forward(x, task=...)`` model
with ``shared_parameters()``), each task's training loss and prediction, and how each task is
scored (``specs``). Two are registered:

==============  ==================================================================  =========
name            tasks                                                               data
==============  ==================================================================  =========
``multidigits`` two digit classes and a reconstruction (mtl/data/multidigits.py)        in memory
``scenes``      segmentation, depth, surface normals of rendered rooms              disk cache
                (mtl/data/scenes.py, model mtl/models/scenes.py)
==============  ==================================================================  =========
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from mtl.data.base import Split, TaskSpec


@dataclass(frozen=True)
class Benchmark:
    """One benchmark's data, model, losses and metrics.

    ``make_data(seed, sizes, resolution)`` returns an object with ``train``/``val``/``test``
    `mtl.data.base.Split` attributes and ``to(device)``; ``resolution`` is ``None`` where the data
    has one fixed size. ``build_model(tasks, width)`` returns the multi-task model and
    ``describe_model(tasks, width)`` names it for reports. ``plot_predictions(split, tasks,
    {label: {task: predictions}}, path)``, where given, draws the first examples of ``split``
    with their targets and each label's predictions.
    """

    name: str
    title: str
    specs: Mapping[str, TaskSpec]
    default_tasks: tuple[str, ...]
    check_tasks: Callable[[Sequence[str]], tuple[str, ...]]
    make_data: Callable[[int, tuple[int, int, int], int | None], Any]
    build_model: Callable[[Sequence[str], int], nn.Module]
    task_loss: Callable[[str, Tensor, Tensor], Tensor]
    predict: Callable[[str, Tensor], Tensor]
    describe_model: Callable[[Sequence[str], int], str]
    eval_batch_size: int = 512
    plot_predictions: (
        Callable[[Split, list[str], dict[str, dict[str, Tensor]], Path], Path] | None
    ) = None


def _multidigits() -> Benchmark:
    from mtl.data.multidigits import DEFAULT_TASKS, TASKS, check_tasks, make_multidigits
    from mtl.models.multidigits import MultiDigitsNet, predict, task_loss

    def make_data(seed: int, sizes: tuple[int, int, int], resolution: int | None) -> Any:
        if resolution is not None:
            raise ValueError("MultiDigits has a fixed 20x20 canvas: resolution must be None")
        return make_multidigits(seed, *sizes)

    def build_model(tasks: Sequence[str], width: int) -> nn.Module:
        return MultiDigitsNet(tasks, width=width)

    return Benchmark(
        name="multidigits",
        title="MultiDigits",
        specs=TASKS,
        default_tasks=DEFAULT_TASKS,
        check_tasks=lambda tasks: check_tasks(list(tasks)),
        make_data=make_data,
        build_model=build_model,
        task_loss=task_loss,
        predict=predict,
        describe_model=lambda tasks, width: f"MultiDigitsNet width {width}",
    )


def _scenes() -> Benchmark:
    from mtl.data.scenes import CLASSES, DEFAULT_TASKS, TASKS, check_tasks, make_scenes
    from mtl.models.scenes import build_scenes_model, describe_scenes_model, predict, task_loss
    from mtl.plots import plot_dense_predictions

    def make_data(seed: int, sizes: tuple[int, int, int], resolution: int | None) -> Any:
        return make_scenes(seed, *sizes, resolution=resolution or 64)

    return Benchmark(
        name="scenes",
        title="Scenes",
        specs=TASKS,
        default_tasks=DEFAULT_TASKS,
        check_tasks=lambda tasks: check_tasks(list(tasks)),
        make_data=make_data,
        build_model=build_scenes_model,
        task_loss=task_loss,
        predict=predict,
        describe_model=describe_scenes_model,
        eval_batch_size=128,
        plot_predictions=lambda split, tasks, predictions, path: plot_dense_predictions(
            split, tasks, predictions, path, TASKS, CLASSES
        ),
    )


_FACTORIES: dict[str, Callable[[], Benchmark]] = {"multidigits": _multidigits, "scenes": _scenes}
BENCHMARKS = tuple(_FACTORIES)
_CACHE: dict[str, Benchmark] = {}


def get_benchmark(name: str) -> Benchmark:
    """The registered benchmark ``name`` (one of ``BENCHMARKS``)."""
    if name not in _FACTORIES:
        raise ValueError(f"benchmark must be one of {BENCHMARKS}, got {name!r}")
    if name not in _CACHE:
        _CACHE[name] = _FACTORIES[name]()
    return _CACHE[name]
