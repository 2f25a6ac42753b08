"""The on-disk dense datasets by name: their specs, and opening or detecting one.

==============  ====================  ================================================
name            module                data
==============  ====================  ================================================
``nyud``        `mtl.data.nyud`       NYUD-v2, ``NYUD_MT`` layout (three variants)
``pascal``      `mtl.data.pascal`     PASCAL-Context, ``PASCAL_MT`` layout
``nyuv2-mtan``  `mtl.data.mtan`       MTAN's preprocessed NYUv2 arrays (13 classes)
``cityscapes``  `mtl.data.mtan`       MTAN's preprocessed Cityscapes arrays (7 classes)
==============  ====================  ================================================

Usage::

    spec = SPECS["nyud"]                       # tasks, classes, metrics, recipe
    train = open_dense("nyud", root, "train")  # a torch Dataset of sample dicts
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

from mtl.data.disk import DenseDataset
from mtl.data.spec import DenseDatasetSpec, Recipe

__all__ = [
    "DENSE_DATASETS",
    "SPECS",
    "DenseDataset",
    "DenseDatasetSpec",
    "Recipe",
    "dense_module",
    "detect",
    "open_dense",
    "spec_of",
]

# name -> (module, the module's attribute holding the spec)
DENSE_DATASETS: Mapping[str, tuple[str, str]] = {
    "nyud": ("mtl.data.nyud", "SPEC"),
    "pascal": ("mtl.data.pascal", "SPEC"),
    "nyuv2-mtan": ("mtl.data.mtan", "NYUV2_SPEC"),
    "cityscapes": ("mtl.data.mtan", "CITYSCAPES_SPEC"),
}


def _check(name: str) -> None:
    if name not in DENSE_DATASETS:
        raise ValueError(f"dataset must be one of {tuple(DENSE_DATASETS)}, got {name!r}")


def dense_module(name: str) -> ModuleType:
    """The module of dataset ``name``, imported."""
    _check(name)
    return importlib.import_module(DENSE_DATASETS[name][0])


def spec_of(name: str) -> DenseDatasetSpec:
    """The spec of dataset ``name``."""
    spec = getattr(dense_module(name), DENSE_DATASETS[name][1])
    assert isinstance(spec, DenseDatasetSpec)
    return spec


class _Specs(Mapping[str, DenseDatasetSpec]):
    """``SPECS[name]``: the specs, their modules imported on first use."""

    def __getitem__(self, name: str) -> DenseDatasetSpec:
        if name not in DENSE_DATASETS:
            raise KeyError(name)
        return spec_of(name)

    def __iter__(self) -> Any:
        return iter(DENSE_DATASETS)

    def __len__(self) -> int:
        return len(DENSE_DATASETS)


SPECS: Mapping[str, DenseDatasetSpec] = _Specs()


def _name_kw(name: str) -> dict[str, str]:
    return {"name": name} if DENSE_DATASETS[name][0] == "mtl.data.mtan" else {}


def open_dense(name: str, root: str | Path, split: str, **kwargs: Any) -> DenseDataset:
    """Split ``split`` of dataset ``name`` under ``root`` (keyword arguments: those of the
    module's ``open_dataset``: ``tasks``, ``train``, ``image_size``, ``seed``)."""
    dataset = dense_module(name).open_dataset(root, split, **_name_kw(name), **kwargs)
    assert isinstance(dataset, DenseDataset)
    return dataset


def detect(name: str, root: str | Path) -> str:
    """The layout variant of dataset ``name`` found under ``root`` (a ValueError listing what
    was looked for if there is none)."""
    variant = dense_module(name).detect(root, **_name_kw(name))
    assert isinstance(variant, str)
    return variant
