"""MultiDigits (python/mtl/data/multidigits.py) and its model (python/mtl/models/multidigits.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "python"))

from mtl.data.multidigits import (
    CANVAS,
    DEFAULT_TASKS,
    DIGIT,
    MASK_THRESHOLD,
    SHIFT,
    TASKS,
    make_multidigits,
)
from mtl.models.multidigits import MultiDigitsNet, predict, task_loss

SIZES = {"train_size": 96, "val_size": 32, "test_size": 48}


@pytest.fixture(scope="module")
def data():  # type: ignore[no-untyped-def]
    return make_multidigits(3, **SIZES)


def test_same_seed_gives_identical_tensors(data) -> None:  # type: ignore[no-untyped-def]
    again = make_multidigits(3, **SIZES)
    for name in ("train", "val", "test"):
        a, b = data.split(name), again.split(name)
        assert torch.equal(a.images, b.images)
        assert a.targets.keys() == b.targets.keys()
        for key in a.targets:
            assert torch.equal(a.targets[key], b.targets[key]), (name, key)


def test_other_seed_gives_other_data(data) -> None:  # type: ignore[no-untyped-def]
    other = make_multidigits(4, **SIZES)
    assert not torch.equal(data.train.images, other.train.images)


def test_shapes_dtypes_and_ranges(data) -> None:  # type: ignore[no-untyped-def]
    for name, size in zip(("train", "val", "test"), SIZES.values(), strict=True):
        split = data.split(name)
        assert len(split) == size
        assert split.images.shape == (size, 1, CANVAS, CANVAS)
        assert split.images.dtype == torch.float32
        assert float(split.images.min()) >= 0.0 and float(split.images.max()) <= 1.0
        for task in ("left", "right"):
            labels = split.targets[task]
            assert labels.shape == (size,) and labels.dtype == torch.int64
            assert int(labels.min()) >= 0 and int(labels.max()) <= 9
        clean, mask = split.targets["clean"], split.targets["mask"]
        assert clean.shape == mask.shape == (size, 1, CANVAS, CANVAS)
        assert set(mask.unique().tolist()) <= {0.0, 1.0}
        assert torch.equal(mask, (clean > MASK_THRESHOLD).float())


def test_composition_overlaps_and_takes_the_maximum(data) -> None:  # type: ignore[no-untyped-def]
    images, clean = data.train.images, data.train.targets["clean"]
    # The left digit lives in the top-left DIGIT x DIGIT square only.
    assert float(clean[..., DIGIT:, :].abs().sum()) == 0.0
    assert float(clean[..., :, DIGIT:].abs().sum()) == 0.0
    # The composite dominates the left digit and adds the right one (bottom-right corner).
    assert bool((images >= clean).all())
    assert float(images[..., DIGIT:, DIGIT:].sum()) > 0.0
    # The two digits overlap: both have ink inside the shared square for many examples.
    right = images - clean  # >= 0; non-zero where the right digit is brighter
    overlap = (clean[..., SHIFT:DIGIT, SHIFT:DIGIT] > 0.3).flatten(1).any(1) & (
        right[..., SHIFT:DIGIT, SHIFT:DIGIT] > 0.3
    ).flatten(1).any(1)
    assert float(overlap.float().mean()) > 0.5


def test_labels_cover_all_classes() -> None:
    big = make_multidigits(0, train_size=2000, val_size=1, test_size=1)
    for task in ("left", "right"):
        counts = torch.bincount(big.train.targets[task], minlength=10)
        assert bool((counts > 100).all()), counts


def test_splits_use_disjoint_source_digits() -> None:
    # No test image equals any training image's left digit: source digits are split first.
    d = make_multidigits(1, train_size=512, val_size=8, test_size=64)
    train_left = d.train.targets["clean"][:, 0, :DIGIT, :DIGIT].flatten(1)
    test_left = d.test.targets["clean"][:, 0, :DIGIT, :DIGIT].flatten(1)
    dist = torch.cdist(test_left, train_left)
    assert float(dist.min()) > 0.0


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"train_size": 0}, ValueError),
        ({"val_size": -1}, ValueError),
        ({"test_size": 2.0}, ValueError),
        ({"seed": "0"}, TypeError),
    ],
)
def test_bad_arguments_raise(kwargs, error) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(error, match=next(iter(kwargs))):
        make_multidigits(**kwargs)


def test_bad_split_name_raises(data) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match="split"):
        data.split("dev")


def test_model_outputs_and_losses(data) -> None:  # type: ignore[no-untyped-def]
    tasks = list(TASKS)
    model = MultiDigitsNet(tasks, width=4)
    images, targets = data.train.batch(torch.arange(5))
    for task in tasks:
        out = model(images, task=task)
        expected = (5, 10) if TASKS[task].kind == "classify" else (5, 1, CANVAS, CANVAS)
        assert out.shape == expected
        loss = task_loss(task, out, targets[task])
        assert loss.shape == () and torch.isfinite(loss)
        assert predict(task, out).shape == targets[task].shape


def test_model_follows_the_papers_layout() -> None:
    model = MultiDigitsNet(DEFAULT_TASKS, width=4)
    names = dict(model.named_modules())
    for block in ("block1", "block2", "block3", "block4"):
        assert isinstance(names[f"{block}.conv"], torch.nn.Conv2d)
        for task in DEFAULT_TASKS:
            assert isinstance(names[f"{block}.bn.{task}"], torch.nn.BatchNorm2d)
    shared = {id(p) for p in model.shared_parameters()}
    specific = [{id(p) for p in model.task_parameters(t)} for t in DEFAULT_TASKS]
    everything = {id(p) for p in model.parameters()}
    assert shared.isdisjoint(set().union(*specific))
    assert shared | set().union(*specific) == everything
    assert all(a.isdisjoint(b) for i, a in enumerate(specific) for b in specific[i + 1 :])


def test_a_task_reaches_only_shared_and_its_own_parameters(data) -> None:  # type: ignore[no-untyped-def]
    model = MultiDigitsNet(DEFAULT_TASKS, width=4)
    images, targets = data.train.batch(torch.arange(8))
    task_loss("right", model(images, task="right"), targets["right"]).backward()
    own = {id(p) for p in model.shared_parameters() + model.task_parameters("right")}
    for p in model.parameters():
        assert (p.grad is not None) == (id(p) in own)


def test_model_rejects_unknown_tasks() -> None:
    with pytest.raises(ValueError, match="tasks"):
        MultiDigitsNet(["left", "depth"])
    model = MultiDigitsNet(["left"], width=4)
    with pytest.raises(ValueError, match="task"):
        model(torch.zeros(1, 1, CANVAS, CANVAS), task="right")
