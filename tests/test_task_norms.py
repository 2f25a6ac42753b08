"""`task_norms` / `task_scope`: conversion, scopes (nesting, exceptions, threads, replicas,
torch.compile), bad input, and discovery on converted third-party-style models."""

from __future__ import annotations

import copy
import sys
import threading
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import cs_kernels as ck
from cs_kernels.training.per_task_norms import TaskNorm, TaskScopeError, task_norms, task_scope
from tests import model_replicas as mr

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "python"))
from mtl.models.backbones import HRNetLite, resnet18, resnet50

TASKS = ["seg", "depth", "normal"]


class FrozenBatchNorm2d(nn.Module):
    """The frozen BatchNorm of torchvision.ops / timm: buffers only, eval-mode arithmetic."""

    def __init__(self, n: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        for name, value in (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0)):
            self.register_buffer(name, torch.full((n,), value))
        self.register_buffer("running_var", torch.ones(n))

    def forward(self, x: Tensor) -> Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale[:, None, None] + shift[:, None, None]


class AllNorms(nn.Module):
    """One of every converted norm kind, behind shared layers."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(4)
        self.gn = nn.GroupNorm(2, 4)
        self.ln2d = mr.LayerNorm2d(4)
        self.bnact = mr.BatchNormAct2d(4)
        self.sync = nn.SyncBatchNorm(4)
        self.frozen = FrozenBatchNorm2d(4)
        self.conv3 = nn.Conv3d(4, 4, 1)
        self.bn3 = nn.BatchNorm3d(4)
        self.fc = nn.Linear(4, 6)
        self.bn1 = nn.BatchNorm1d(6)
        self.ln = nn.LayerNorm(6)

    def forward(self, x: Tensor) -> Tensor:
        h = self.frozen(self.sync(self.bnact(self.ln2d(self.gn(self.bn2(self.conv(x)))))))
        h = self.bn3(self.conv3(h[:, :, None])).squeeze(2)
        return self.ln(self.bn1(self.fc(h.mean(dim=(2, 3)))))


def randomise(model: nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            if t.dtype.is_floating_point and "conv" not in name and name != "fc.weight":
                t.copy_(torch.rand(t.shape, generator=gen) + 0.5)


def norm_kinds(model: nn.Module) -> dict[str, str]:
    return {
        n: type(m).__name__
        for n, m in model.named_modules()
        if ck.training.per_task_norms.is_norm(m)
    }


# ------------------------------------------------------------------------------ conversion


def test_every_norm_kind_becomes_a_container_of_copies() -> None:
    torch.manual_seed(0)
    model = AllNorms()
    randomise(model)
    model.bn2.weight.requires_grad_(False)
    model.gn.eval()
    original = copy.deepcopy(model)
    x = torch.randn(5, 3, 6, 6)
    original.eval()
    expected = original(x)

    assert task_norms(model, TASKS) is model
    names = ["bn2", "gn", "ln2d", "bnact", "sync", "frozen", "bn3", "bn1", "ln"]
    for name in names:
        container = getattr(model, name)
        assert isinstance(container, TaskNorm), name
        assert container.tasks == tuple(TASKS) and container.source == name
        source = getattr(original, name)
        for t in TASKS:
            copy_ = container[t]
            kind = "BatchNorm2d" if name == "frozen" else type(source).__name__
            assert type(copy_).__name__ == kind
            for key, value in source.state_dict().items():
                assert torch.equal(copy_.state_dict()[key], value), (name, t, key)
            # Own storage per task: training one task never moves another.
            for p in copy_.parameters():
                others = [container[o] for o in TASKS if o != t]
                assert all(p.data_ptr() != q.data_ptr() for o in others for q in o.parameters())
    assert not model.bn2["depth"].weight.requires_grad and model.bn2["depth"].bias.requires_grad
    assert not model.gn.training and not model.gn["seg"].training and model.bn1["seg"].training
    assert isinstance(model.bnact["seg"].act, nn.ReLU)  # timm's activation and dropout kept
    assert isinstance(model.frozen["seg"].weight, nn.Parameter)  # frozen -> trainable
    model.eval()
    for t in TASKS:
        with task_scope(model, t):
            torch.testing.assert_close(model(x), expected)  # pretrained values carried over


def test_copies_train_separately() -> None:
    model = task_norms(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), TASKS)
    x = torch.randn(4, 3, 6, 6) * 3 + 1
    with task_scope(model, "depth"):
        model(x).square().sum().backward()
    assert model[1]["depth"].weight.grad is not None
    assert model[1]["seg"].weight.grad is None and model[1]["normal"].weight.grad is None
    assert model[1]["depth"].num_batches_tracked == 1 and model[1]["seg"].num_batches_tracked == 0
    assert not torch.equal(model[1]["depth"].running_mean, model[1]["seg"].running_mean)


def test_frozen_batchnorm_act_becomes_the_trainable_one_of_its_library() -> None:
    frozen = mr.FrozenBatchNormAct2d(4)
    frozen.running_var.fill_(4.0)
    model = task_norms(nn.Sequential(nn.Conv2d(3, 4, 1), frozen), ["a", "b"])
    converted = model[1]["a"]
    assert type(converted) is mr.BatchNormAct2d and isinstance(converted.act, nn.GELU)
    assert torch.equal(converted.running_var, torch.full((4,), 4.0))


def test_a_norm_registered_twice_stays_shared() -> None:
    bn = nn.BatchNorm2d(4)
    model = nn.ModuleDict({"a": nn.Sequential(nn.Conv2d(3, 4, 1), bn), "b": nn.Sequential(bn)})
    task_norms(model, ["x", "y"])
    assert model["a"][1] is model["b"][0] and isinstance(model["b"][0], TaskNorm)


@pytest.mark.parametrize(
    ("tasks", "error", "match"),
    [
        ([], ValueError, "at least 1"),
        (["a", "a"], ValueError, "distinct"),
        (["a", 3], TypeError, "str names"),
        ("ab", TypeError, "sequence of task names"),
        (["a", ""], ValueError, "cannot name a submodule"),
        (["a.b"], ValueError, "cannot name a submodule"),
        (["eval"], ValueError, "cannot name a submodule"),
    ],
)
def test_bad_tasks_leave_the_model_unchanged(tasks: object, error: type, match: str) -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    before = list(model.modules())
    with pytest.raises(error, match=match):
        task_norms(model, tasks)  # type: ignore[arg-type]
    assert list(model.modules()) == before


def test_bad_modules() -> None:
    with pytest.raises(ValueError, match="no normalisation module"):
        task_norms(nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU()), TASKS)
    with pytest.raises(ValueError, match="itself a norm"):
        task_norms(nn.BatchNorm2d(4), TASKS)
    with pytest.raises(TypeError, match=r"nn\.Module"):
        task_norms("model", TASKS)  # type: ignore[type-var]
    model = task_norms(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)), TASKS)
    with pytest.raises(ValueError, match="already converted: 1 is a TaskNorm"):
        task_norms(model, TASKS)
    with pytest.raises(ValueError, match="already converted"):
        task_norms(model, ["other", "tasks_"])


def test_an_error_midway_changes_nothing() -> None:
    """The lazy norm is met after the first BatchNorm: nothing may be replaced yet."""
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.LazyBatchNorm2d())
    before = list(model.named_modules())
    with pytest.raises(ValueError, match="2: LazyBatchNorm2d is not initialised"):
        task_norms(model, TASKS)
    assert list(model.named_modules()) == before


# ------------------------------------------------------------------------------ the scope


def small_model() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1), nn.GroupNorm(2, 4)
    )
    task_norms(model, TASKS)
    with torch.no_grad():  # distinct shifts per task: outputs tell which copy ran
        for i, t in enumerate(TASKS):
            model[1][t].bias.fill_(i)
            model[4][t].bias.fill_(10 * i)
    return model


def expected_mean(task: str) -> float:
    return 10.0 * TASKS.index(task)  # the GroupNorm output's mean is its bias


def test_outside_any_scope_is_an_error_naming_the_module() -> None:
    model = small_model()
    x = torch.randn(2, 3, 6, 6)
    with pytest.raises(TaskScopeError, match=r"^1 \(a per-task norm .*task_scope"):
        model(x)
    with task_scope(model, "seg"):
        model(x)
    with pytest.raises(TaskScopeError, match=r"outside cs_kernels\.task_scope"):
        model(x)  # after the scope: an error again, not the last task


def test_scope_bad_input() -> None:
    model = small_model()
    with pytest.raises(
        ValueError, match=r"unknown task 'sem': .* know \['seg', 'depth', 'normal'\]"
    ):
        task_scope(model, "sem")
    with pytest.raises(TypeError, match="task must be a task name"):
        task_scope(model, 0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"module must be an nn\.Module"):
        task_scope("model", "seg")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="holds no per-task norm"):
        task_scope(nn.Linear(2, 2), "seg")
    # Two parts converted with different tasks: only the common ones are accepted.
    mixed = nn.Sequential(small_model(), task_norms(nn.Sequential(nn.BatchNorm1d(2)), ["seg"]))
    with pytest.raises(ValueError, match=r"know \['seg'\]"):
        task_scope(mixed, "depth")


def test_nesting_and_exceptions_restore_the_state() -> None:
    model = small_model()
    x = torch.randn(2, 3, 6, 6)
    with task_scope(model, "seg"):
        assert model(x).mean().item() == pytest.approx(expected_mean("seg"), abs=1e-4)
        with task_scope(model[4], "normal"):  # inner scope on a part: that part switches
            assert model(x).mean().item() == pytest.approx(expected_mean("normal"), abs=1e-4)
            assert model[1].active_task() == "seg"
        assert model(x).mean().item() == pytest.approx(expected_mean("seg"), abs=1e-4)
        with pytest.raises(KeyError), task_scope(model, "depth"):
            raise KeyError("boom")
        assert model[1].active_task() == "seg" and model[4].active_task() == "seg"
    assert model[1].active_task() is None and model[4].active_task() is None
    scope = task_scope(model, "depth")  # a scope object may be re-entered
    with scope, scope:
        assert model[4].active_task() == "depth"
    assert model[4].active_task() is None


def test_threads_each_have_their_own_scope_on_one_model() -> None:
    model = small_model()
    model.eval()  # no running-statistics updates racing between threads
    x = torch.randn(2, 3, 6, 6)
    barrier = threading.Barrier(len(TASKS))
    seen: dict[str, list[float]] = {}
    errors: list[BaseException] = []

    def worker(task: str) -> None:
        try:
            for _ in range(5):
                barrier.wait()  # every thread enters before any leaves
                with task_scope(model, task):
                    barrier.wait()
                    seen.setdefault(task, []).append(model(x).mean().item())
                    barrier.wait()
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in TASKS]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    for t in TASKS:
        assert seen[t] == pytest.approx([expected_mean(t)] * 5, abs=1e-4)
    assert model[1].active_task() is None  # no thread's scope leaked into this one
    with pytest.raises(TaskScopeError):
        model(x)


def test_a_dataparallel_replica_keeps_the_replicating_threads_task() -> None:
    """DataParallel calls ``_replicate_for_data_parallel`` in the caller's thread and runs
    the replicas in worker threads; the replica must run the caller's task there."""
    model = small_model()
    model.eval()
    x = torch.randn(2, 3, 6, 6)
    with task_scope(model, "normal"):
        replica = nn.Sequential(
            model[0],
            model[1]._replicate_for_data_parallel(),
            model[2],
            model[3],
            model[4]._replicate_for_data_parallel(),
        )
    out: list[float] = []
    th = threading.Thread(target=lambda: out.append(replica(x).mean().item()))
    th.start()
    th.join()
    assert out == pytest.approx([expected_mean("normal")], abs=1e-4)
    with pytest.raises(TaskScopeError):
        model(x)  # the original is not pinned


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="DataParallel needs two CUDA devices")
def test_dataparallel_on_two_gpus() -> None:  # pragma: no cover - GPU machines only
    model = small_model().cuda().eval()
    dp = nn.DataParallel(model)
    x = torch.randn(4, 3, 6, 6, device="cuda")
    for t in TASKS:
        with task_scope(dp, t):
            assert dp(x).mean().item() == pytest.approx(expected_mean(t), abs=1e-4)


@pytest.fixture
def fresh_dynamo():  # type: ignore[no-untyped-def]
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()  # reset() keeps the counters of earlier tests
    yield torch._dynamo.utils.counters
    torch._dynamo.reset()


def test_compiled_backbone_inside_scopes(fresh_dynamo) -> None:  # type: ignore[no-untyped-def]
    """The unmodified forward compiles whole (fullgraph) and specialises once per task."""
    model = small_model()
    twin = copy.deepcopy(model)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 3, 6, 6)
    for t in [*TASKS, *TASKS]:
        with task_scope(model, t):
            got = compiled(x)
            got.square().mean().backward()
        with task_scope(twin, t):
            want = twin(x)
            want.square().mean().backward()
        torch.testing.assert_close(got, want)
    for t in TASKS:  # gradients went to each task's own copies, as in eager
        torch.testing.assert_close(model[1][t].weight.grad, twin[1][t].weight.grad)
    assert fresh_dynamo["stats"]["unique_graphs"] == len(TASKS)


def test_scope_inside_a_compiled_forward(fresh_dynamo) -> None:  # type: ignore[no-untyped-def]
    class Wrapper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = small_model()

        def forward(self, x: Tensor, task: str) -> Tensor:
            with task_scope(self.body, task):
                return self.body(x)

    model = Wrapper()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 3, 6, 6)
    for t in TASKS:
        assert compiled(x, t).mean().item() == pytest.approx(expected_mean(t), abs=1e-4)
        assert model.body[1].active_task() is None


# ------------------------------------------------------------------------------ discovery


class WithHeads(nn.Module):
    """A task-free backbone converted by task_norms, plus one linear head per task."""

    def __init__(self, body: nn.Module, features: int, tasks: list[str] = TASKS) -> None:
        super().__init__()
        self.body = task_norms(body, tasks)
        self.heads = nn.ModuleDict({t: nn.Linear(features, 2) for t in tasks})

    def forward(self, x: Tensor, task: str) -> Tensor:
        with task_scope(self.body, task):
            f = self.body(x)
        f = torch.cat([g.mean(dim=(2, 3)) for g in f], 1) if isinstance(f, list) else f
        return self.heads[task](f)


def convs(module: nn.Module) -> list[str]:
    return [f"{n}.weight" for n, m in module.named_modules() if isinstance(m, nn.Conv2d)]


@pytest.mark.parametrize("make", [resnet18, resnet50], ids=["resnet18", "resnet50"])
def test_discovery_finds_every_conv_of_a_converted_resnet(make) -> None:  # type: ignore[no-untyped-def]
    body = make(width=8)
    body.fc = nn.Identity()
    model = WithHeads(body, 64 if make is resnet18 else 256)
    cs = ck.ConnectionStrength(model, TASKS, torch.randn(2, 3, 32, 32))
    found = [c.name for c in cs.connections]
    assert found == [f"body.{n}" for n in convs(body)]
    assert any("downsample.0" in n for n in found)
    assert all(c.kind == "batchnorm" for c in cs.connections)
    layer = next(c for c in cs.connections if c.name == "body.layer2.0.downsample.0.weight")
    assert layer.links["depth"].module is body.layer2[0].downsample[1]["depth"]
    assert (
        cs.summary()
        .splitlines()[1]
        .startswith(f"coverage: 100.0% of the shared parameter elements ({cs.plan.numel:,} of")
    )


def test_coverage_counts_the_plainly_summed_parameters() -> None:
    model = WithHeads(mr.RegNetLike(), 5)
    cs = ck.ConnectionStrength(model, TASKS, torch.randn(2, 3, 16, 16))
    in_layers = sum(c.weight.numel() for c in cs.connections)
    share = 100 * in_layers / cs.plan.numel
    assert share < 100
    assert f"coverage: {share:.1f}% " in cs.summary()
    # Every conv followed by a (timm-style) BatchNormAct2d is a connection, shortcut included;
    # the squeeze-and-excitation convs are not followed by norms and are plainly summed.
    found = {c.name for c in cs.connections}
    assert {n for n in convs(model) if ".se." not in n} <= found
    assert not any(".se." in n for n in found)


def test_discovery_on_convnext_and_hrnet_style_models() -> None:
    model = WithHeads(mr.ConvNeXtLike(), 5)
    cs = ck.ConnectionStrength(model, TASKS, torch.randn(2, 3, 16, 16))
    kinds = {c.name: c.kind for c in cs.connections}
    # depthwise conv -> permute to channels-last -> LayerNorm: a connection through the permute
    assert kinds["body.stages.0.0.conv_dw.weight"] == "layernorm"
    assert kinds["body.stem.0.weight"] == "layernorm"  # conv -> channels-first LayerNorm
    # fc2 -> layer scale -> permute -> residual sum -> the next stage's LayerNorm
    assert kinds["body.stages.0.0.fc2.weight"] == "layernorm"
    link = cs.connections[[c.name for c in cs.connections].index("body.stages.0.0.fc2.weight")]
    assert link.links["seg"].name == "body.stages.1.0.seg"
    assert "body.stages.0.0.fc1.weight" not in kinds  # GELU then a shared linear: summed

    hr = HRNetLite(width=4, branches=3, modules=1)
    model = WithHeads(hr, 4 + 8 + 16)
    cs = ck.ConnectionStrength(model, TASKS, torch.randn(2, 3, 32, 32))
    assert [c.name for c in cs.connections] == [f"body.{n}" for n in convs(hr)]


def test_a_direct_norm_wins_over_one_after_a_residual_sum() -> None:
    class PreNorm(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 4)
            self.n1 = nn.LayerNorm(4)
            self.n2 = nn.LayerNorm(4)

        def forward(self, x: Tensor) -> Tensor:
            h = self.n1(self.a(x))  # a -> n1 directly
            return self.n2(h + self.b(h)) + self.n2(self.a(x) + x)  # a also via a sum

    model = WithHeads(PreNorm(), 4)
    cs = ck.ConnectionStrength(model, TASKS, torch.randn(3, 4))
    links = {c.name: c.links["seg"].name for c in cs.connections}
    assert links["body.a.weight"] == "body.n1.seg"
    assert links["body.b.weight"] == "body.n2.seg"


# ------------------------------------------------------------------------ transformers


def test_vit_end_to_end_with_per_task_layernorms() -> None:
    """Pre-norm blocks: proj and fc2 write into the residual stream that the next per-task
    LayerNorm scales channel by channel; their factor is gamma_t[c]^2."""
    torch.manual_seed(0)
    vit = mr.ViTLike(image=8, patch=4, dim=8, depth=2)
    model = WithHeads(vit, 8)
    randomise_layernorms(model)
    x = torch.randn(6, 3, 8, 8)
    y = {t: torch.randint(0, 2, (6,)) for t in TASKS}
    cs = ck.ConnectionStrength(model, TASKS, x)
    assert {c.name: c.links["depth"].name for c in cs.connections} == {
        "body.blocks.0.attn.proj.weight": "body.blocks.0.norm2.depth",
        "body.blocks.0.fc2.weight": "body.blocks.1.norm1.depth",
        "body.blocks.1.attn.proj.weight": "body.blocks.1.norm2.depth",
        "body.blocks.1.fc2.weight": "body.norm.depth",
    }
    expected = torch.cat(
        [
            torch.stack(
                [
                    c.weight.detach().square().sum(1) * c.links[t].module.weight.detach() ** 2
                    for t in TASKS
                ]
            )
            for c in cs.connections
        ],
        dim=1,
    )
    torch.testing.assert_close(cs.strengths(), expected)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def loss_fn(task: str) -> Tensor:
        return F.cross_entropy(model(x, task=task), y[task])

    first = {t: loss_fn(t).item() for t in TASKS}
    for epoch in range(4):
        for _ in range(3):
            cs.step(opt, loss_fn, epoch, 4)
    assert cs.phase1_steps > 0 and cs.phase2_steps > 0
    last = {t: loss_fn(t).item() for t in TASKS}
    assert sum(last.values()) < sum(first.values())
    # Phase 1 trained each task's LayerNorms apart.
    assert not torch.equal(vit.norm["seg"].weight, vit.norm["depth"].weight)


def randomise_layernorms(model: nn.Module) -> None:
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
