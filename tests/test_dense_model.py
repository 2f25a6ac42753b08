"""The dense multi-task model (python/mtl/models/dense.py) and its backbones
(python/mtl/models/backbones.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cs_kernels as ck

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "python"))

from mtl.models.backbones import HRNetLite, feature_channels, resnet18, resnet50
from mtl.models.dense import (
    IGNORE_INDEX,
    DenseMultiTaskNet,
    dense_loss,
    predict,
    random_batch,
)

SMALL = {"resnet18": 8, "resnet50": 8, "hrnet": 4}


@pytest.mark.parametrize("backbone", ["resnet18", "resnet50", "hrnet"])
@pytest.mark.parametrize("size", [64, 96])
def test_outputs_per_task_at_small_resolutions(backbone: str, size: int) -> None:
    torch.manual_seed(0)
    model = DenseMultiTaskNet(num_classes=7, backbone=backbone, width=SMALL[backbone], head_width=8)
    x = torch.randn(2, 3, size, size)
    shapes = {t: tuple(model(x, t).shape) for t in model.tasks}
    assert shapes == {
        "seg": (2, 7, size, size),
        "depth": (2, 1, size, size),
        "normal": (2, 3, size, size),
    }
    # Task-specific parts: the norm copies and the head; the rest of the backbone is shared.
    shared = {id(p) for p in model.shared_parameters()}
    for t in model.tasks:
        assert not shared & {id(p) for p in model.task_parameters(t)}
    assert len(shared) + sum(len(model.task_parameters(t)) for t in model.tasks) == len(
        list(model.parameters())
    )


@pytest.mark.parametrize("backbone", ["resnet18", "resnet50", "hrnet"])
def test_connection_strength_finds_every_backbone_conv(backbone: str) -> None:
    torch.manual_seed(0)
    model = DenseMultiTaskNet(num_classes=4, backbone=backbone, width=SMALL[backbone], head_width=8)
    x, _ = random_batch(2, 64, 4, model.kinds)
    cs = ck.ConnectionStrength(model, model.tasks, x)
    backbone_convs = [
        f"backbone.{n}.weight"
        for n, m in model.backbone.named_modules()
        if isinstance(m, nn.Conv2d)
    ]
    assert [c.name for c in cs.connections] == backbone_convs
    assert {id(p) for p in cs.shared_parameters} == {id(p) for p in model.shared_parameters()}
    assert "coverage: 100.0%" in cs.summary()


def test_training_with_connection_strength_lowers_every_loss() -> None:
    torch.manual_seed(0)
    model = DenseMultiTaskNet(
        num_classes=3, backbone="resnet18", width=8, layers=(1, 1, 1, 1), head_width=8
    )
    x, targets = random_batch(4, 32, 3, model.kinds, seed=1)
    cs = ck.ConnectionStrength(model, model.tasks, x)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)

    def loss_fn(task: str) -> torch.Tensor:
        return dense_loss(model.kinds[task], model(x, task), targets[task])

    first = {t: loss_fn(t).item() for t in model.tasks}
    epochs = 3
    for epoch in range(epochs):
        for _ in range(2):
            cs.step(opt, loss_fn, epoch, epochs)
    assert cs.phase1_steps > 0 and cs.phase2_steps > 0
    last = {t: loss_fn(t).item() for t in model.tasks}
    assert all(last[t] < first[t] for t in model.tasks), (first, last)
    bn = model.backbone.layer1[0].bn1
    assert not torch.equal(bn["seg"].weight, bn["depth"].weight)  # Phase 1 trained them apart


def test_single_task_model_and_other_task_names() -> None:
    model = DenseMultiTaskNet(["seg"], num_classes=3, width=8, head_width=8)
    assert model(torch.randn(2, 3, 32, 32), "seg").shape == (2, 3, 32, 32)
    model = DenseMultiTaskNet(
        ["seg", "edge"], kinds={"edge": "segment"}, num_classes=2, width=8, head_width=8
    )
    assert model.kinds == {"seg": "segment", "edge": "segment"}


def test_a_given_resnet_backbone_is_converted_in_place() -> None:
    net = resnet18(width=8)
    model = DenseMultiTaskNet(backbone=net, num_classes=3, head_width=8)
    assert model.backbone is net and isinstance(net.fc, nn.Identity)
    assert isinstance(net.bn1, ck.TaskNorm) and net.bn1.tasks == ("seg", "depth", "normal")
    assert feature_channels(resnet50(width=8)) == [32, 64, 128, 256]
    assert feature_channels(HRNetLite(width=4)) == [4, 8, 16]


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="task 'sal' has no kind"):
        DenseMultiTaskNet(["seg", "sal"])
    with pytest.raises(ValueError, match="kinds\\['sal'\\] must be one of"):
        DenseMultiTaskNet(["sal"], kinds={"sal": "saliency"})
    with pytest.raises(ValueError, match="backbone must be one of"):
        DenseMultiTaskNet(backbone="vgg16")
    with pytest.raises(TypeError, match="backbone must be a name or an nn"):
        DenseMultiTaskNet(backbone=3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="tasks must be distinct"):
        DenseMultiTaskNet(["seg", "seg"])
    model = DenseMultiTaskNet(width=8, head_width=8)
    with pytest.raises(ValueError, match="task must be one of"):
        model(torch.randn(1, 3, 32, 32), "edge")


def test_losses_and_predictions() -> None:
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (2, 5, 5), generator=gen)
    perfect = F.one_hot(labels, 4).permute(0, 3, 1, 2).float() * 50
    assert dense_loss("segment", perfect, labels).item() < 1e-6
    wrong = perfect.roll(1, dims=1)
    ignored = torch.full_like(labels, IGNORE_INDEX)
    ignored[0, 0, 0] = labels[0, 0, 0]
    assert dense_loss("segment", wrong, ignored).item() == pytest.approx(50.0, rel=1e-4)
    assert torch.equal(predict("segment", perfect), labels)

    depth = torch.rand(2, 1, 5, 5, generator=gen) + 1
    hole = depth.clone()
    hole[:, :, 0] = 0  # no depth measured in the first row
    guess = depth + 0.5
    guess[:, :, 0] = 100.0
    assert dense_loss("depth", guess, hole).item() == pytest.approx(0.5)
    assert torch.equal(predict("depth", -depth), torch.zeros_like(depth))

    normals = F.normalize(torch.randn(2, 3, 5, 5, generator=gen), dim=1)
    assert dense_loss("normal", 3 * normals, normals).item() < 1e-6  # scale-free
    assert dense_loss("normal", -normals, normals).item() > 0.5
    assert torch.allclose(predict("normal", 2 * normals), normals, atol=1e-6)
    with pytest.raises(ValueError, match="kind must be one of"):
        dense_loss("edges", normals, normals)
