"""Training integration: discovery, zero-copy collection, the controller, telemetry, state."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

import cs_kernels as ck
from cs_kernels.training import ConnectionStrength, connect, discover_connections

TASKS = ["seg", "depth", "normal"]


# ------------------------------------------------------------------------------- models


class Block(nn.Module):
    """The authors' convention: ``<block>.conv`` followed by ``<block>.bn[task]``."""

    def __init__(self, cin: int, cout: int, tasks: list[str], bias: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1, bias=bias)
        self.bn = nn.ModuleDict({t: nn.BatchNorm2d(cout) for t in tasks})

    def forward(self, x: Tensor, task: str) -> Tensor:
        return F.relu(self.bn[task](self.conv(x)))


class AuthorsNet(nn.Module):
    """Shared conv with a shared BatchNorm (not a connection), two connected blocks, one of
    which task ``normal`` skips, and per-task heads after the task BatchNorm."""

    def __init__(self, tasks: list[str] = TASKS) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.stem_bn = nn.BatchNorm2d(4)
        self.layer1 = Block(4, 6, tasks, bias=True)
        self.layer2 = Block(6, 6, tasks[:2])
        self.head = nn.ModuleDict({t: nn.Linear(6, 2) for t in tasks})

    def forward(self, x: Tensor, task: str) -> Tensor:
        h = self.layer1(F.relu(self.stem_bn(self.stem(x))), task)
        if task in self.layer2.bn:
            h = self.layer2(h, task)
        return self.head[task](h.mean(dim=(2, 3)))


class OtherNet(nn.Module):
    """No naming convention: a conv read by per-task GroupNorms, a conv -> ReLU -> per-task
    BatchNorm without affine scale, and a shared Linear read by per-task heads."""

    def __init__(self, tasks: list[str] = TASKS) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1))
        self.gn_by_task = nn.ModuleDict({t: nn.GroupNorm(2, 6) for t in tasks})
        self.mixer = nn.Conv2d(6, 8, 1, bias=False)
        self.stats = nn.ModuleList([nn.BatchNorm2d(8, affine=False) for _ in tasks])
        self.embed = nn.Linear(8, 5)
        self.readout = nn.ModuleDict({t: nn.Linear(5, 3) for t in tasks})
        self.index = {t: i for i, t in enumerate(tasks)}

    def forward(self, x: Tensor, task: str) -> Tensor:
        h = self.gn_by_task[task](self.features(x))
        h = self.stats[self.index[task]](F.relu(self.mixer(h)))
        return self.readout[task](F.relu(self.embed(h.mean(dim=(2, 3)))))


class MLPNet(nn.Module):
    """Linear -> per-task LayerNorm, and a flattened conv map read by per-task heads."""

    def __init__(self, tasks: list[str] = TASKS) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.ln = nn.ModuleDict({t: nn.LayerNorm(4 * 4 * 4) for t in tasks})
        self.heads = nn.ModuleDict({t: nn.Linear(64, 2) for t in tasks})

    def forward(self, x: Tensor, task: str) -> Tensor:
        return self.heads[task](F.relu(self.conv(x)).flatten(1))


class NoConnectionNet(nn.Module):
    """Shared layers and heads, but no task-specific normalisation or head reading a layer
    directly (a shared BatchNorm sits between)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.heads = nn.ModuleDict({t: nn.Linear(4, 2) for t in TASKS})

    def forward(self, x: Tensor, task: str) -> Tensor:
        return self.heads[task](self.bn(self.conv(x)).mean(dim=(2, 3)))


def make_batch(seed: int = 0, n: int = 6) -> tuple[Tensor, dict[str, Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 6, 6, generator=gen)
    return x, {t: torch.randint(0, 2, (n,), generator=gen) for t in TASKS}


def randomise_norms(model: nn.Module, seed: int = 1) -> None:
    """Spread the task norms so that strengths differ between tasks and channels."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)):
                if m.weight is not None:
                    m.weight.copy_(torch.rand(m.weight.shape, generator=gen) * 2 + 0.1)
                if getattr(m, "running_var", None) is not None:
                    m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)


def loss_fn_for(model: nn.Module, x: Tensor, y: dict[str, Tensor]):  # type: ignore[no-untyped-def]
    return lambda task: F.cross_entropy(model(x, task=task), y[task])


def built(model_cls: type[nn.Module] = AuthorsNet, **kw: object):  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    model = model_cls()
    randomise_norms(model)
    x, y = make_batch()
    cs = ConnectionStrength(model, TASKS, x, **kw)  # type: ignore[arg-type]
    return model, cs, x, y


# ---------------------------------------------------------------------------- discovery


def test_discovers_the_authors_naming_convention() -> None:
    model, cs, _, _ = built()
    names = [c.name for c in cs.connections]
    assert names == ["layer1.conv.weight", "layer2.conv.weight"]
    first, second = cs.connections
    assert first.kind == "batchnorm" and second.kind == "batchnorm"
    assert {t: link.module for t, link in first.links.items()} == {
        t: model.layer1.bn[t] for t in TASKS
    }
    assert set(second.links) == {"seg", "depth"}  # task `normal` does not reach layer2
    # Shared: stem (weight, bias), stem_bn (weight, bias), layer1.conv (weight, bias),
    # layer2.conv.weight. Task-specific: the BatchNorms of layer1/layer2 and the heads.
    shared = {id(p) for p in cs.shared_parameters}
    expected = [
        model.stem.weight,
        model.stem.bias,
        model.stem_bn.weight,
        model.stem_bn.bias,
        model.layer1.conv.weight,
        model.layer1.conv.bias,
        model.layer2.conv.weight,
    ]
    assert shared == {id(p) for p in expected}
    assert cs.plan.numel == sum(p.numel() for p in expected)
    summary = cs.summary()
    assert "layer1.conv.weight" in summary and "seg:layer1.bn.seg" in summary
    assert "normal:-" in summary  # layer2 row: the task that does not reach it
    assert "plainly summed: stem.weight" in summary


def test_discovers_other_names_and_kinds() -> None:
    model, cs, _, _ = built(OtherNet)
    kinds = {c.name: c.kind for c in cs.connections}
    assert kinds == {
        "features.0.weight": "groupnorm",
        "mixer.weight": "batchnorm",
        "embed.weight": "linear_head",
    }
    by_name = {c.name: c for c in cs.connections}
    assert by_name["mixer.weight"].links["depth"].module is model.stats[1]
    assert by_name["embed.weight"].links["normal"].module is model.readout["normal"]


def test_discovery_of_layernorm_and_flattened_heads() -> None:
    model = MLPNet()
    x = torch.randn(2, 3, 6, 6)
    conns = discover_connections(model, TASKS, x)
    # The conv output is ReLU'd and flattened into the heads: 16 columns per channel.
    assert [(c.name, c.kind) for c in conns] == [("conv.weight", "linear_head")]
    assert conns[0].links["seg"].group == 16
    # Per-task LayerNorm over the flattened map: no per-channel scale -> not a connection.


def test_discovery_leaves_the_model_untouched() -> None:
    torch.manual_seed(0)
    model = AuthorsNet()
    before = copy.deepcopy(model.state_dict())
    rng = torch.get_rng_state()
    discover_connections(model, TASKS, make_batch()[0])
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(rng, torch.get_rng_state())
    assert all(p.grad is None for p in model.parameters())


def test_factors_of_each_connection_kind() -> None:
    model, cs, _, _ = built(OtherNet)
    scales = cs.scales()
    gn = torch.stack([model.gn_by_task[t].weight.detach() ** 2 for t in TASKS])
    bn = ck.batchnorm_scale(None, [m.running_var for m in model.stats], eps=1e-5)
    head = torch.stack([model.readout[t].weight.detach().square().sum(0) for t in TASKS])
    torch.testing.assert_close(scales, torch.cat([gn, bn, head], dim=1), rtol=0, atol=0)


def test_explicit_registration_with_tensor_and_module() -> None:
    torch.manual_seed(0)
    model = AuthorsNet()
    x, _ = make_batch()
    factor = torch.rand(4) + 0.5
    # layer1.bn.seg is called in task seg's forward, but before layer2, not after it.
    reg = connect(model.layer2.conv.weight, {"seg": model.layer1.bn["seg"]})
    with pytest.raises(ValueError, match=r"does not read the output of layer2\.conv"):
        ConnectionStrength(model, TASKS, x, connections=[reg])
    reg = connect(model.stem.weight, {"seg": factor})
    cs = ConnectionStrength(model, TASKS, x, connections=[reg])
    stem = next(c for c in cs.connections if c.name == "stem.weight")
    assert stem.source == "registered" and stem.kind == "tensor"
    assert cs.connections[0].name == "stem.weight"  # buffer order
    scales = cs.scales()[:, :4]
    torch.testing.assert_close(scales[0], factor)
    assert bool((scales[1:] == 0).all())  # tasks left out of `scales` get factor 0
    # Registration replaces the discovered connection of the same weight.
    reg = connect(model.layer1.conv.weight, {t: model.layer1.bn[t] for t in TASKS[:2]})
    cs = ConnectionStrength(model, TASKS, x, connections=[reg])
    layer1 = next(c for c in cs.connections if c.name == "layer1.conv.weight")
    assert layer1.source == "registered" and set(layer1.links) == set(TASKS[:2])


# ------------------------------------------------------------------------- bad configs


def test_bad_configuration_errors() -> None:
    torch.manual_seed(0)
    model = AuthorsNet()
    x, _ = make_batch()
    w = model.layer1.conv.weight
    with pytest.raises(ValueError, match="unknown task 'sky'"):
        ConnectionStrength(
            model, TASKS, x, connections=[connect(w, {"sky": model.layer1.bn["seg"]})]
        )
    with pytest.raises(ValueError, match="registered twice"):
        ConnectionStrength(
            model,
            TASKS,
            x,
            connections=[connect(w, {"seg": torch.ones(6)}), connect(w, {"depth": torch.ones(6)})],
        )
    with pytest.raises(ValueError, match="no task-specific connections"):
        ConnectionStrength(NoConnectionNet(), TASKS, x)
    with pytest.raises(ValueError, match="not a trainable parameter of the model"):
        ConnectionStrength(
            model,
            TASKS,
            x,
            connections=[connect(nn.Conv2d(3, 6, 1).weight, {"seg": torch.ones(6)})],
        )
    with pytest.raises(ValueError, match="not shared"):
        head = model.head["seg"].weight
        ConnectionStrength(model, TASKS, x, connections=[connect(head, {"seg": torch.ones(2)})])
    with pytest.raises(ValueError, match="not a submodule"):
        ConnectionStrength(model, TASKS, x, connections=[connect(w, {"seg": nn.BatchNorm2d(6)})])
    with pytest.raises(ValueError, match="not called in task 'normal'"):
        ConnectionStrength(
            model, TASKS, x, connections=[connect(w, {"normal": model.layer1.bn["seg"]})]
        )
    with pytest.raises(ValueError, match="has 4 features"):
        connect(w, {"seg": nn.BatchNorm2d(4)})
    with pytest.raises(ValueError, match=r"must be \[6\]"):
        connect(w, {"seg": torch.ones(5)})
    with pytest.raises(TypeError, match="must be a BatchNorm, LayerNorm, GroupNorm or Linear"):
        connect(w, {"seg": nn.ReLU()})
    with pytest.raises(ValueError, match="at least two tasks"):
        ConnectionStrength(model, ["seg"], x)
    with pytest.raises(ValueError, match="distinct"):
        ConnectionStrength(model, ["seg", "seg"], x)
    with pytest.raises(ValueError, match="mode must be one of"):
        ConnectionStrength(model, TASKS, x, mode="rows")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="backend must be one of"):
        ConnectionStrength(model, TASKS, x, backend="fortran")
    with pytest.raises(TypeError, match="must come from connect"):
        ConnectionStrength(model, TASKS, x, connections=[w])  # type: ignore[list-item]


def test_bad_loss_fn_errors() -> None:
    model, cs, x, y = built()
    with pytest.raises(ValueError, match="must return a scalar"):
        cs.phase2_backward(lambda t: model(x, task=t))
    with pytest.raises(TypeError, match="must return a Tensor"):
        cs.phase2_backward(lambda t: 1.0)  # type: ignore[arg-type,return-value]

    def zeroing(task: str) -> Tensor:
        model.zero_grad()
        return loss_fn_for(model, x, y)(task)

    with pytest.raises(RuntimeError, match="stopped viewing the gradient buffer"):
        cs.phase2_backward(zeroing)
    with pytest.raises(ValueError, match="epoch must be < num_epochs"):
        cs.phase(3, 3)


# ------------------------------------------------------------------ zero-copy collection


def flat_task_grads(model: nn.Module, params: list[nn.Parameter], x, y) -> Tensor:  # type: ignore[no-untyped-def]
    """``[T, N]`` per-task gradients by hand: one ordinary backward per task, copied out.
    The other parameters accumulate over the tasks as usual."""
    rows = []
    model.zero_grad(set_to_none=True)
    for task in TASKS:
        for p in params:
            p.grad = None
        F.cross_entropy(model(x, task=task), y[task]).backward()
        rows.append(
            torch.cat(
                [
                    (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                    for p in params
                ]
            )
        )
    return torch.stack(rows)


def test_collection_rows_are_each_task_gradient_and_grads_view_the_buffer() -> None:
    model, cs, x, y = built()
    twin = copy.deepcopy(model)
    twin_params = [dict(twin.named_parameters())[n] for n in _names(model, cs.shared_parameters)]
    seen: list[bool] = []

    def probe(task: str) -> Tensor:
        loss = loss_fn_for(model, x, y)(task)
        t = TASKS.index(task)
        row = cs.buffer.grads[t]
        for p in cs.shared_parameters:  # .grad is a view into row t of the one buffer
            assert p.grad is not None
            same = (
                p.grad.untyped_storage().data_ptr()
                == cs.buffer.storage.untyped_storage().data_ptr()
            )
            offset = p.grad.storage_offset() - row.storage_offset()
            seen.append(same and offset == cs.buffer.offset_of(p))
        return loss

    cs.collect(probe)
    assert seen and all(seen)
    expected = flat_task_grads(twin, twin_params, x, y)
    assert torch.equal(cs.buffer.grads, expected)
    # Task `normal` does not reach layer2: its row stays zero there.
    off = cs.buffer.offset_of(model.layer2.conv.weight)
    assert bool((cs.buffer.grads[2, off : off + model.layer2.conv.weight.numel()] == 0).all())
    assert bool((cs.buffer.grads[0, off : off + model.layer2.conv.weight.numel()] != 0).any())
    # Task-specific parameters got their gradients as usual.
    twin_named = dict(twin.named_parameters())
    for name, p in model.named_parameters():
        if name.startswith(("head.", "layer1.bn.", "layer2.bn.")):
            assert torch.equal(p.grad, twin_named[name].grad), name


def _names(model: nn.Module, params: list[nn.Parameter]) -> list[str]:
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for p in params]


class AllocationCounter(TorchDispatchMode):
    """Bytes of freshly allocated op outputs, and every op that touched ``watched`` storage."""

    def __init__(self, watched: Tensor | None = None) -> None:
        super().__init__()
        self.bytes = 0
        self.copies = 0
        self.touching: list[str] = []
        self._ptr = watched.untyped_storage().data_ptr() if watched is not None else None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        mutating = func._schema.is_mutable
        flat = torch.utils._pytree.tree_leaves((args, kwargs or {}))
        if self._ptr is not None and any(
            isinstance(a, Tensor) and a.untyped_storage().data_ptr() == self._ptr for a in flat
        ):
            self.touching.append(name)
        if not mutating and not func.is_view:
            for o in torch.utils._pytree.tree_leaves(out):
                if isinstance(o, Tensor):
                    self.bytes += o.numel() * o.element_size()
        if func.overloadpacket in (torch.ops.aten.clone, torch.ops.aten.copy_, torch.ops.aten.cat):
            self.copies += 1
        return out


def test_collection_makes_no_per_task_copies() -> None:
    model, cs, x, y = built()
    loss_fn = loss_fn_for(model, x, y)
    cs.collect(loss_fn)  # warm-up: every lazy table exists now
    with AllocationCounter(cs.buffer.storage) as ours:
        cs.collect(loss_fn)
    # Plain per-task backward passes, nothing kept: the allocation floor of autograd itself.
    with AllocationCounter() as plain:
        model.zero_grad(set_to_none=True)
        for task in TASKS:
            loss_fn(task).backward()
    assert ours.bytes <= plain.bytes, (ours.bytes, plain.bytes)
    assert ours.copies == 0
    # The buffer is only ever zeroed, accumulated into (autograd) and viewed.
    assert set(ours.touching) <= {"zero_", "add_", "view", "slice", "detach"}, ours.touching
    assert ours.touching.count("add_") >= len(cs.shared_parameters) * 2

    # The counter catches a collector that clones each task's gradients.
    with AllocationCounter() as naive:
        rows = []
        for task in TASKS:
            model.zero_grad(set_to_none=True)
            loss_fn(task).backward()
            rows.append([p.grad.clone() for p in cs.shared_parameters if p.grad is not None])
    grad_bytes = sum(p.numel() * p.element_size() for row in rows for p in row)
    assert naive.bytes >= plain.bytes + grad_bytes
    assert naive.bytes > ours.bytes and naive.copies >= len(TASKS)


# -------------------------------------------------------------------------- Phase 2


@pytest.mark.parametrize(
    ("mode", "uniform", "model_cls", "backend"),
    [
        ("group", "sum", AuthorsNet, "auto"),
        ("channel", "sum", AuthorsNet, "torch"),
        ("group", "project", OtherNet, "auto"),
        ("channel", "project", OtherNet, "auto"),
        ("group", "sum", OtherNet, "reference"),
    ],
)
def test_phase2_equals_reference_by_hand(
    mode: str, uniform: str, model_cls: type, backend: str
) -> None:
    model, cs, x, y = built(model_cls, mode=mode, uniform=uniform, backend=backend)
    twin = copy.deepcopy(model)
    names = _names(model, cs.shared_parameters)
    twin_params = dict(twin.named_parameters())
    shared = [twin_params[n] for n in names]
    cs.phase2_backward(loss_fn_for(model, x, y))

    # By hand on the twin: per-task gradients, the plan, the factors, the oracle.
    grads = flat_task_grads(twin, shared, x, y)
    conn_names = [c.name for c in cs.connections]
    plan = ck.Phase2Plan.from_shapes(
        [tuple(p.shape) for p in shared], [n in conn_names for n in names]
    )
    twin_modules = dict(twin.named_modules())
    columns = []
    for conn in cs.connections:
        weight = twin_params[conn.name]
        rows = []
        for task in TASKS:
            link = conn.links.get(task)
            if link is None:
                rows.append(torch.zeros(conn.channels))
                continue
            m = twin_modules[link.name]
            if link.kind == "batchnorm":
                rows.append(
                    ck.batchnorm_scale(
                        None if m.weight is None else m.weight[None], m.running_var[None], m.eps
                    )[0]
                )
            elif link.kind == "groupnorm":
                rows.append(m.weight.detach() ** 2)
            else:
                rows.append(m.weight.detach().square().sum(0))
        columns.append(ck.channel_strength(weight, torch.stack(rows), backend="reference"))
    strength = torch.cat(columns, dim=1)
    expected = ck.phase2(grads, plan, strength, mode=mode, uniform=uniform, backend="reference")

    got = torch.cat([p.grad.reshape(-1) for p in cs.shared_parameters])  # type: ignore[union-attr]
    torch.testing.assert_close(got, expected, rtol=2e-5, atol=2e-6)
    if backend == "reference":  # the backend is passed through: the oracle's exact bits
        assert torch.equal(got, expected)
    assert torch.equal(cs.top_priority(), ck.plan_top_priority(strength, plan, backend="reference"))
    # The result differs from the plain sum: the projection did act.
    assert not torch.allclose(got, grads.sum(0), rtol=1e-4, atol=1e-5)
    # Task-specific parameters: their own task's gradient.
    for n, p in model.named_parameters():
        if n.startswith(("head.", "readout.")):
            torch.testing.assert_close(p.grad, twin_params[n].grad)


def test_phase1_step_is_one_optimizer_step_per_task() -> None:
    model, cs, x, y = built()
    twin = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    twin_opt = torch.optim.SGD(twin.parameters(), lr=0.05, momentum=0.9)
    losses = cs.phase1_step(opt, loss_fn_for(model, x, y))
    for task in TASKS:
        twin_opt.zero_grad()
        loss = F.cross_entropy(twin(x, task=task), y[task])
        loss.backward()
        twin_opt.step()
        assert torch.equal(losses[task], loss.detach())
    for (n, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q), n


def test_phase_draw() -> None:
    _, cs, _, _ = built(seed=7)
    assert all(cs.phase(0, 10) == 1 for _ in range(50))  # epoch 0 is always Phase 1
    gen = torch.Generator().manual_seed(7)
    draws = [float(torch.rand((), generator=gen)) for _ in range(50 + 400)][50:]
    _, fresh, _, _ = built(seed=7)
    for _ in range(50):
        fresh.phase(0, 10)
    phases = [fresh.phase(6, 10) for _ in range(400)]
    assert phases == [1 if p >= 0.6 else 2 for p in draws]
    assert 0.3 < phases.count(1) / 400 < 0.5


# ------------------------------------------------------------------------- telemetry


def test_telemetry_records_top_priority_shares(tmp_path) -> None:  # type: ignore[no-untyped-def]
    model, cs, x, y = built()
    loss_fn = loss_fn_for(model, x, y)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    tops = {}
    for epoch in (1, 1, 2):
        cs.phase2_backward(loss_fn, epoch=epoch)
        # What the step used: the weights, and the running statistics after its forwards.
        tops.setdefault(epoch, []).append(cs.top_priority())
        opt.step()
    frac = cs.telemetry.fractions()
    assert cs.telemetry.epochs == [1, 2] and frac.shape == (2, 2, 3)
    torch.testing.assert_close(frac.sum(-1), torch.ones(2, 2, dtype=torch.float64))
    for i, epoch in enumerate((1, 2)):
        for layer, (a, b) in enumerate(cs._bounds):
            for t in range(3):
                share = sum(float((top[a:b] == t).double().mean()) for top in tops[epoch])
                assert frac[i, layer, t].item() == pytest.approx(share / len(tops[epoch]))
    assert frac[:, 1, 2].abs().sum() == 0  # `normal` does not reach layer2: never its top
    pytest.importorskip("matplotlib")  # the plot helper's optional dependency
    path = tmp_path / "priority.png"
    cs.telemetry.plot(str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------- resume


def run(model: nn.Module, cs: ConnectionStrength, opt: torch.optim.Optimizer, batches, epochs):  # type: ignore[no-untyped-def]
    for epoch in epochs:
        for x, y in batches:
            cs.step(opt, loss_fn_for(model, x, y), epoch, 4)


def test_resume_is_identical_to_an_uninterrupted_run() -> None:
    batches = [make_batch(seed) for seed in range(3)]

    def fresh():  # type: ignore[no-untyped-def]
        torch.manual_seed(0)
        model = AuthorsNet()
        randomise_norms(model)
        cs = ConnectionStrength(model, TASKS, batches[0][0], seed=3)
        return model, cs, torch.optim.Adam(model.parameters(), lr=1e-2)

    model, cs, opt = fresh()
    run(model, cs, opt, batches, range(4))

    first, cs1, opt1 = fresh()
    run(first, cs1, opt1, batches, range(2))
    saved = copy.deepcopy(
        {"model": first.state_dict(), "opt": opt1.state_dict(), "cs": cs1.state_dict()}
    )
    second, cs2, opt2 = fresh()
    second.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    cs2.load_state_dict(saved["cs"])
    run(second, cs2, opt2, batches, range(2, 4))

    assert cs.phase2_steps > 0 and cs.phase1_steps > 0
    assert (cs2.phase1_steps, cs2.phase2_steps) == (cs.phase1_steps, cs.phase2_steps)
    for (n, p), q in zip(model.state_dict().items(), second.state_dict().values(), strict=True):
        assert torch.equal(p, q), n
    assert torch.equal(cs.telemetry.fractions(), cs2.telemetry.fractions())
    # Without the controller state the phases differ: the test can fail.
    third, cs3, opt3 = fresh()
    third.load_state_dict(saved["model"])
    opt3.load_state_dict(saved["opt"])
    run(third, cs3, opt3, batches, range(2, 4))
    assert any(
        not torch.equal(p, q) for p, q in zip(model.parameters(), third.parameters(), strict=True)
    )


def test_state_dict_rejects_other_tasks() -> None:
    _, cs, _, _ = built()
    state = cs.state_dict()
    state["tasks"] = ["a", "b", "c"]
    with pytest.raises(ValueError, match="state is for tasks"):
        cs.load_state_dict(state)
