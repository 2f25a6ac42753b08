"""task_norms, task_scope and discovery on real torchvision and timm models.

Runs wherever torchvision / timm import (the GPU machines; here `make test-models`, which
sets CS_KERNELS_REQUIRE_MODELS=1 so that a library that does not import fails instead of
skipping). The structural replicas in tests/model_replicas.py and
python/mtl/models/backbones.py cover
the same ground in every run; the first tests here check that the ResNet replica is faithful.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from torch import Tensor, nn

import cs_kernels as ck
from tests.model_libraries import REQUIRED, load

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "python"))
from mtl.models import backbones

TASKS = ["seg", "depth"]


def library(name: str) -> ModuleType:
    module = load(name)
    if isinstance(module, ModuleType):
        return module
    if REQUIRED:
        pytest.fail(f"{name} does not import ({module}) but CS_KERNELS_REQUIRE_MODELS=1")
    pytest.skip(f"{name} does not import here ({module}); `make test-models` runs this")


class WithHeads(nn.Module):
    """A converted task-free model and one linear head per task on its output."""

    def __init__(self, body: nn.Module, features: int) -> None:
        super().__init__()
        self.body = ck.task_norms(body, TASKS)
        self.heads = nn.ModuleDict({t: nn.Linear(features, 2) for t in TASKS})

    def forward(self, x: Tensor, task: str) -> Tensor:
        with ck.task_scope(self.body, task):
            return self.heads[task](self.body(x))


def conv_names(module: nn.Module, prefix: str = "body.") -> list[str]:
    return [f"{prefix}{n}.weight" for n, m in module.named_modules() if isinstance(m, nn.Conv2d)]


def randomised(model: nn.Module, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            if t.dtype.is_floating_point and ("bn" in name or "norm" in name):
                t.copy_(torch.rand(t.shape, generator=gen) + 0.5)
    return model


# ------------------------------------------------------------------------------ torchvision


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_the_resnet_replica_is_torchvisions_layout(name: str) -> None:
    tv = library("torchvision")
    theirs, ours = getattr(tv.models, name)(), getattr(backbones, name)()
    assert [(n, type(m).__name__) for n, m in theirs.named_modules()] == [
        (n, type(m).__name__) for n, m in ours.named_modules()
    ]
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(theirs.eval()(x), ours.eval()(x))


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_torchvision_resnet_converted_and_discovered(name: str) -> None:
    tv = library("torchvision")
    torch.manual_seed(0)
    net = randomised(getattr(tv.models, name)())  # stands in for pretrained weights
    reference = copy.deepcopy(net).eval()
    features = net.fc.in_features
    net.fc = nn.Identity()
    model = WithHeads(net, features)
    x = torch.randn(2, 3, 64, 64)
    model.eval()
    for t in TASKS:  # the copies start from the original's values
        with ck.task_scope(net, t):
            torch.testing.assert_close(net(x), reference.avgpool(_stages(reference, x)).flatten(1))
    model.train()
    cs = ck.ConnectionStrength(model, TASKS, x)
    found = [c.name for c in cs.connections]
    assert found == conv_names(net)  # every conv, the downsample convs included
    assert any("downsample.0" in n for n in found)
    assert "coverage: 100.0%" in cs.summary()
    # The factor of a downsample conv is its own task copy's gamma^2 / (var + eps).
    conn = cs.connections[found.index("body.layer3.0.downsample.0.weight")]
    bn = net.layer3[0].downsample[1]["depth"]
    factor = bn.weight.detach() ** 2 / (bn.running_var + bn.eps)
    expected = conn.weight.detach().square().sum(dim=(1, 2, 3)) * factor
    first = cs.plan.first_channels[found.index(conn.name)]
    torch.testing.assert_close(cs.strengths()[1, first : first + conn.channels], expected)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    y = {t: torch.randint(0, 2, (2,)) for t in TASKS}
    cs.phase2_backward(lambda t: nn.functional.cross_entropy(model(x, t), y[t]))
    opt.step()
    assert cs.phase2_steps == 1


def _stages(resnet: nn.Module, x: Tensor) -> Tensor:
    return backbones.backbone_features(resnet, x)[-1]


def test_torchvision_frozen_batchnorm_becomes_trainable() -> None:
    tv = library("torchvision")
    torch.manual_seed(0)
    net = tv.models.resnet18(norm_layer=tv.ops.FrozenBatchNorm2d)
    randomised(net)
    reference = copy.deepcopy(net)
    ck.task_norms(net, TASKS)
    copies = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(copies) == 2 * sum(
        isinstance(m, tv.ops.FrozenBatchNorm2d) for m in reference.modules()
    )
    assert all(m.weight.requires_grad for m in copies)
    net.eval()
    x = torch.randn(2, 3, 64, 64)
    with ck.task_scope(net, "depth"):
        torch.testing.assert_close(net(x), reference(x))


def test_compiled_torchvision_resnet_under_scopes() -> None:
    tv = library("torchvision")
    torch.manual_seed(0)
    net = ck.task_norms(tv.models.resnet18(num_classes=4), TASKS)
    with torch.no_grad():
        net.bn1["depth"].bias.fill_(1.0)  # the tasks' outputs differ
    twin = copy.deepcopy(net)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(net, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 3, 32, 32)
    outs = {}
    for t in [*TASKS, *TASKS]:
        with ck.task_scope(net, t):
            outs[t] = compiled(x)
        with ck.task_scope(twin, t):
            torch.testing.assert_close(outs[t], twin(x))
    assert not torch.allclose(outs["seg"], outs["depth"])
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == len(TASKS)
    torch._dynamo.reset()


# ------------------------------------------------------------------------------------ timm


@pytest.mark.parametrize(
    ("name", "plainly_summed"),
    [
        ("resnet18", ()),
        ("regnetx_002", ()),
        ("regnety_002", (".se.",)),  # squeeze-and-excitation convs: no norm after them
        ("hrnet_w18_small", ()),
        # One LayerNorm per block, after the depthwise conv: the MLP convs and the
        # downsampling convs read no norm of their own.
        ("convnext_atto", (".mlp.", "downsample")),
    ],
)
def test_timm_models(name: str, plainly_summed: tuple[str, ...]) -> None:
    timm = library("timm")
    torch.manual_seed(0)
    body = timm.create_model(name, pretrained=False, num_classes=8)
    original = randomised(copy.deepcopy(body)).eval()
    body.load_state_dict(original.state_dict())
    model = WithHeads(body, 8)
    x = torch.randn(2, 3, 64, 64)
    body.eval()
    with ck.task_scope(body, "depth"):
        torch.testing.assert_close(body(x), original(x))  # copies carry the values over
    body.train()
    cs = ck.ConnectionStrength(model, TASKS, x)
    found = {c.name for c in cs.connections}
    expected = {n for n in conv_names(body) if not any(s in n for s in plainly_summed)}
    assert expected <= found, sorted(expected - found)
    assert not any(s in n for n in found for s in plainly_summed)
    if name.startswith("regnet"):  # timm's BatchNormAct2d keeps its activation per copy
        norm_act = next(m for m in body.modules() if type(m).__name__ == "BatchNormAct2d")
        assert isinstance(norm_act.act, nn.Module)
    y = {t: torch.randint(0, 2, (2,)) for t in TASKS}
    cs.phase2_backward(lambda t: nn.functional.cross_entropy(model(x, t), y[t]))
    assert all(p.grad is not None for p in cs.shared_parameters)


def test_timm_frozen_batchnorm_act() -> None:
    timm = library("timm")
    torch.manual_seed(0)
    body = timm.create_model("regnetx_002", pretrained=False, num_classes=8)
    randomised(body)
    body = timm.layers.freeze_batch_norm_2d(body)
    reference = copy.deepcopy(body).eval()
    assert any(type(m).__name__ == "FrozenBatchNormAct2d" for m in body.modules())
    ck.task_norms(body, TASKS)
    copies = [m for m in body.modules() if type(m).__name__ == "BatchNormAct2d"]
    assert copies and all(m.weight.requires_grad for m in copies)
    body.eval()
    x = torch.randn(2, 3, 64, 64)
    with ck.task_scope(body, "seg"):
        torch.testing.assert_close(body(x), reference(x))


def test_timm_vit_pre_norm_blocks() -> None:
    """proj and fc2 write the residual stream that the next per-task LayerNorm scales."""
    timm = library("timm")
    torch.manual_seed(0)
    body = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, num_classes=8)
    model = WithHeads(body, 8)
    x = torch.randn(2, 3, 32, 32)
    cs = ck.ConnectionStrength(model, TASKS, x)
    links = {c.name: c.links["seg"].name for c in cs.connections if c.kind == "layernorm"}
    depth = len(body.blocks)
    expected = {}
    for i in range(depth):
        expected[f"body.blocks.{i}.attn.proj.weight"] = f"body.blocks.{i}.norm2.seg"
        after = f"body.blocks.{i + 1}.norm1.seg" if i + 1 < depth else "body.norm.seg"
        expected[f"body.blocks.{i}.mlp.fc2.weight"] = after
    assert links == expected
    y = {t: torch.randint(0, 2, (2,)) for t in TASKS}
    cs.phase2_backward(lambda t: nn.functional.cross_entropy(model(x, t), y[t]))
    assert all(p.grad is not None for p in cs.shared_parameters)


@pytest.mark.parametrize(("name", "lib"), [("resnet18", "torchvision"), ("hrnet18", "timm")])
def test_train_dense_backbones_from_the_libraries(name: str, lib: str, tmp_path: Path) -> None:
    """train_dense.py's library backbones: built without downloading, a saved checkpoint
    loaded back (its classifier ignored), four scales, and a Phase 2 step on the dense net."""
    from mtl.models.dense import DenseMultiTaskNet
    from mtl.models.zoo import make_backbone

    library(lib)
    torch.manual_seed(0)
    net, origin = make_backbone(name)
    assert origin == lib
    if lib == "timm":
        assert net.feature_channels == [18, 36, 72, 144]
        full = library("timm").create_model("hrnet_w18", pretrained=False)
        state = full.state_dict()  # incl. incre/downsamp modules and the classifier
    else:
        state = library("torchvision").models.resnet18(weights=None).state_dict()
    path = tmp_path / f"{name}.pth"
    torch.save(state, path)
    loaded, _ = make_backbone(name, weights=path)
    target = loaded.net if lib == "timm" else loaded
    for key, value in target.state_dict().items():
        assert torch.equal(value, state[key]), key
    model = DenseMultiTaskNet(
        TASKS, backbone=loaded, kinds={"seg": "segment", "depth": "depth"}, outputs={"seg": 3},
        head_width=8,
    )  # fmt: skip
    x = torch.randn(2, 3, 64, 64)
    y = torch.randint(0, 3, (2, 64, 64))
    cs = ck.ConnectionStrength(model, TASKS, x)
    losses = {
        "seg": lambda: nn.functional.cross_entropy(model(x, task="seg"), y),
        "depth": lambda: model(x, task="depth").abs().mean(),
    }
    cs.phase2_backward(lambda t: losses[t]())
    assert all(p.grad is not None for p in cs.shared_parameters)
