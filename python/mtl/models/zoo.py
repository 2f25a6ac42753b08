"""Backbones by name, from the installed model libraries or our own layouts, with local weights.

=============  ======================================  =====================================
name           library (when importable)               ours (otherwise, or ``source="ours"``)
=============  ======================================  =====================================
``resnet18``   ``torchvision.models.resnet18``         `mtl.models.backbones.resnet18`
``resnet50``   ``torchvision.models.resnet50``         `mtl.models.backbones.resnet50`
``hrnet18``    ``timm`` ``hrnet_w18``, features only   `mtl.models.backbones.HRNetLite`, four
               (its four branches, 18/36/72/144)       branches 18/36/72/144
=============  ======================================  =====================================

Our ResNets have torchvision's parameter names, so a torchvision checkpoint loads into either.
Nothing is downloaded: ``weights`` is a local file (a state dict, or a dict holding one under
``state_dict`` or ``model``); a missing file, or one whose tensors do not fit the backbone, is
an error naming the file. The backbone returned is plain (no tasks): the dense network converts
it with `cs_kernels.task_norms`.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mtl.models.backbones import HRNetLite, resnet18, resnet50

BACKBONE_NAMES = ("resnet18", "resnet50", "hrnet18")
SOURCES = ("auto", "library", "ours")
# classification parts of a checkpoint the dense backbones do not have (ignored when loading)
HEAD_PREFIXES = (
    "fc.",
    "classifier.",
    "head.",
    "final_layer.",
    "downsamp_modules.",
    "incre_modules.",
)
_LIBRARY = {"resnet18": "torchvision", "resnet50": "torchvision", "hrnet18": "timm"}


class FeatureBackbone(nn.Module):
    """A timm ``features_only`` model: ``forward(x) -> [features]`` finest first, with
    ``feature_channels`` (the protocol of `mtl.models.backbones.backbone_features`)."""

    def __init__(self, net: nn.Module, channels: list[int]) -> None:
        super().__init__()
        self.net = net
        self.feature_channels = channels

    def forward(self, x: Tensor) -> list[Tensor]:
        return list(self.net(x))


def _library(name: str) -> Any | None:
    try:
        return importlib.import_module(_LIBRARY[name])
    except Exception:  # absent, or broken against this torch: use our layout
        return None


def _ours(name: str, width: int | None) -> nn.Module:
    if name == "resnet18":
        return resnet18(width or 64)
    if name == "resnet50":
        return resnet50(width or 64)
    return HRNetLite(width or 18, branches=4, modules=3, blocks=2)


def make_backbone(
    name: str, *, source: str = "auto", width: int | None = None, weights: Path | None = None
) -> tuple[nn.Module, str]:
    """The backbone ``name`` (one of ``BACKBONE_NAMES``) and where it came from
    (``"torchvision"``, ``"timm"`` or ``"ours"``).

    ``source``: ``"auto"`` (the library when importable, else ours), ``"library"`` (an error
    if it is not importable) or ``"ours"``. ``width``: first-stage channels of our layouts
    (library backbones have their published widths; passing a width selects ours under
    ``"auto"``). ``weights``: a local checkpoint loaded into the backbone (see the module
    docstring).
    """
    if name not in BACKBONE_NAMES:
        raise ValueError(f"backbone must be one of {BACKBONE_NAMES}, got {name!r}")
    if source not in SOURCES:
        raise ValueError(f"backbone source must be one of {SOURCES}, got {source!r}")
    if width is not None and (isinstance(width, bool) or not isinstance(width, int) or width < 1):
        raise ValueError(f"width must be a positive int, got {width!r}")
    if weights is not None and not Path(weights).is_file():
        raise ValueError(f"weights file {weights} does not exist (nothing is downloaded)")
    library = None if source == "ours" or (source == "auto" and width) else _library(name)
    if source == "library" and library is None:
        raise ValueError(f"backbone {name!r} from its library needs {_LIBRARY[name]} installed")
    if source == "library" and width is not None:
        raise ValueError("width applies to our layouts only (source 'ours' or 'auto')")
    net: nn.Module
    if library is None:
        net, origin = _ours(name, width), "ours"
    elif name == "hrnet18":
        model = library.create_model(  # the four branch outputs, 18/36/72/144 channels
            "hrnet_w18",
            pretrained=False,
            features_only=True,
            feature_location="",
            out_indices=(1, 2, 3, 4),
        )
        net, origin = FeatureBackbone(model, list(model.feature_info.channels())), "timm"
    else:
        net, origin = getattr(library.models, name)(weights=None), "torchvision"
    if weights is not None:
        target = net.net if isinstance(net, FeatureBackbone) else net
        load_weights(target, Path(weights), name)
    return net, origin


def _state_dict(path: Path) -> dict[str, Tensor]:
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(f"weights file {path} is not a torch checkpoint: {error}") from None
    for key in ("state_dict", "model"):
        if isinstance(loaded, Mapping) and isinstance(loaded.get(key), Mapping):
            loaded = loaded[key]
    if not isinstance(loaded, Mapping) or not all(isinstance(v, Tensor) for v in loaded.values()):
        raise ValueError(f"weights file {path} holds no state dict of tensors")
    return {k.removeprefix("module."): v for k, v in loaded.items()}


def load_weights(net: nn.Module, path: Path, name: str) -> None:
    """Load the state dict in ``path`` into ``net`` (the backbone ``name``), in place.

    Classifier heads (``HEAD_PREFIXES``) in the file are ignored; any other key the backbone
    lacks, any parameter or buffer of the backbone the file lacks, and any tensor of another
    shape is an error naming the file.
    """
    state = _state_dict(path)
    own = net.state_dict()
    head = tuple(p for p in HEAD_PREFIXES if not any(k.startswith(p) for k in own))
    state = {k: v for k, v in state.items() if not k.startswith(head) or k in own}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or shapes:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape", shapes)):
            if keys:
                parts.append(f"{len(keys)} {label} (first: {', '.join(keys[:3])})")
        raise ValueError(f"weights file {path} does not match backbone {name}: " + "; ".join(parts))
    net.load_state_dict(state, strict=True)
