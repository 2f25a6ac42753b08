"""The datasets, one module each, and the registry naming them.

==============  =======================  ====================================================
name            module                   data
==============  =======================  ====================================================
``multidigits`` `mtl.data.multidigits`   generated in memory (two digits, a reconstruction)
``scenes``      `mtl.data.scenes`        rendered rooms (segmentation, depth, normals), cached
``nyud``        `mtl.data.nyud`          NYUD-v2, ``NYUD_MT`` folder layout, read from disk
``pascal``      `mtl.data.pascal`        PASCAL-Context, ``PASCAL_MT`` folder layout
``nyuv2-mtan``  `mtl.data.mtan`          MTAN's preprocessed NYUv2 arrays (13 classes)
``cityscapes``  `mtl.data.mtan`          MTAN's preprocessed Cityscapes arrays (7 classes)
==============  =======================  ====================================================

Adding a dataset is one module here and one line in `DATASETS`. The synthetic ones are run by
the in-memory harness (`mtl.benchmarks`, ``demo.py``, ``reproduce.py``); the on-disk ones
(`ON_DISK`) are opened through `mtl.data.dense.open_dense` and trained by ``train_dense.py``.
Modules are imported on first use only.
"""

from __future__ import annotations

import importlib
from types import ModuleType

DATASETS: dict[str, str] = {
    "multidigits": "mtl.data.multidigits",
    "scenes": "mtl.data.scenes",
    "nyud": "mtl.data.nyud",
    "pascal": "mtl.data.pascal",
    "nyuv2-mtan": "mtl.data.mtan",
    "cityscapes": "mtl.data.mtan",
}
SYNTHETIC = ("multidigits", "scenes")
ON_DISK = ("nyud", "pascal", "nyuv2-mtan", "cityscapes")


def dataset_module(name: str) -> ModuleType:
    """The module of dataset ``name`` (one of `DATASETS`), imported."""
    if name not in DATASETS:
        raise ValueError(f"dataset must be one of {tuple(DATASETS)}, got {name!r}")
    return importlib.import_module(DATASETS[name])
