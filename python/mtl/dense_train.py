"""Training on the paper's dense datasets (NYUD-v2, PASCAL-Context, MTAN's NYUv2 / Cityscapes):
the library behind ``python/train_dense.py``.

One run: a dataset from disk (`mtl.data.dense`), the dense multi-task network
(`mtl.models.dense.DenseMultiTaskNet` on a backbone of `mtl.models.zoo`, its norms made per
task by `cs_kernels.task_norms`), one method of `mtl.methods` (``single`` trains one network per
task), a loss weighting of `mtl.loss_weights`, the recipe's optimizer and schedule, then the
validation metrics of `mtl.dense_metrics` written to ``<out>/metrics.json``.

Every unset option comes from the dataset's recipe (``spec.recipe``). Each epoch ends with
``<out>/checkpoint.pt`` (written whole, then renamed): models, optimizers, schedules, the
method's state (the phase generator of ``ours_*``), the loss weighting and the RNG state; a
``resume`` run continues from it and ends with the same bits as an uninterrupted run (the batch
order of epoch ``e`` is drawn from ``(seed, e)``; the loaders augment deterministically by seed).

Under ``torchrun`` (``WORLD_SIZE > 1``) each rank trains on its share of every batch: ``ours_*``
run on a ``DistributedDataParallel`` model (`ConnectionStrength` all-reduces its buffer); the
other methods average each gradient over the ranks as it is accumulated, so every per-task
gradient a method combines is the whole batch's. Rank 0 evaluates and writes.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from mtl.data.spec import DenseDatasetSpec
from mtl.dense_losses import TASK_KINDS, task_loss, task_outputs
from mtl.loss_weights import WEIGHTINGS, LossWeighting, make_weighting
from mtl.methods import METHODS, TrainStep, make_step
from mtl.models.dense import DenseMultiTaskNet
from mtl.models.zoo import BACKBONE_NAMES, SOURCES, make_backbone

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.json"
OPTIMIZERS = ("adam", "adamw", "sgd")


@dataclass(frozen=True)
class DenseRunConfig:
    """One run's options; ``None`` means the dataset recipe's value."""

    dataset: str
    root: Path
    out: Path
    method: str = "ours_mixed"
    tasks: tuple[str, ...] | None = None
    backbone: str | None = None
    backbone_source: str = "auto"
    width: int | None = None  # first-stage channels of our backbone layouts
    head_width: int = 64
    weights: Path | None = None
    loss_weights: str = "recipe"
    epochs: int | None = None
    batch_size: int | None = None
    image_size: tuple[int, int] | None = None
    lr: float | None = None
    device: str = "cpu"
    seed: int = 0
    workers: int = 0
    resume: bool = False
    stop_after: int | None = None  # stop after this many epochs of this run (time limits)
    single_task_results: Path | None = None
    progress: bool = True
    cs_options: dict[str, Any] = field(default_factory=dict)

    def check(self) -> None:
        """Raise ValueError naming the first bad option."""
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.backbone is not None and self.backbone not in BACKBONE_NAMES:
            raise ValueError(f"backbone must be one of {BACKBONE_NAMES}, got {self.backbone!r}")
        if self.backbone_source not in SOURCES:
            raise ValueError(f"backbone source must be one of {SOURCES}")
        if self.loss_weights not in WEIGHTINGS:
            raise ValueError(f"loss weights must be one of {WEIGHTINGS}, got {self.loss_weights!r}")
        for name in ("epochs", "batch_size", "width", "stop_after"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.head_width < 1 or self.workers < 0 or self.seed < 0:
            raise ValueError("head_width must be >= 1, workers and seed >= 0")
        if self.image_size is not None and (len(self.image_size) != 2 or min(self.image_size) < 8):
            raise ValueError(f"image_size must be (H, W), each >= 8, got {self.image_size!r}")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr!r}")
        if self.single_task_results is not None and not Path(self.single_task_results).is_file():
            raise ValueError(f"single-task results file {self.single_task_results} does not exist")


@dataclass(frozen=True)
class Plan:
    """The options a run actually uses: ``config`` with the recipe filled in."""

    dataset: str
    tasks: tuple[str, ...]
    method: str
    backbone: str
    epochs: int
    batch_size: int
    image_size: tuple[int, int] | None
    optimizer: str
    lr: float
    weight_decay: float
    schedule: str
    loss_weights: str
    recipe_weights: dict[str, float]
    seed: int
    world_size: int

    def key(self) -> dict[str, Any]:
        """What a checkpoint must agree on to be resumed."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}


def make_plan(config: DenseRunConfig, spec: DenseDatasetSpec, world_size: int = 1) -> Plan:
    """Fill ``config``'s unset options from ``spec.recipe``."""
    recipe = spec.recipe
    tasks = spec.check_tasks(list(config.tasks) if config.tasks else None)
    unknown = [t for t in tasks if t not in TASK_KINDS]
    if unknown:
        raise ValueError(f"tasks {unknown} have no loss here (known: {tuple(TASK_KINDS)})")
    backbone = config.backbone or (
        recipe.backbone if recipe.backbone in BACKBONE_NAMES else "resnet18"
    )
    optimizer = recipe.optimizer.lower()
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"recipe optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    batch = config.batch_size or recipe.batch_size
    if batch % world_size:
        raise ValueError(f"batch_size {batch} must be divisible by the {world_size} ranks")
    image_size = config.image_size or recipe.image_size
    return Plan(
        dataset=config.dataset,
        tasks=tuple(tasks),
        method=config.method,
        backbone=backbone,
        epochs=config.epochs or recipe.epochs,
        batch_size=batch,
        image_size=tuple(image_size) if image_size else None,  # type: ignore[arg-type]
        optimizer=optimizer,
        lr=config.lr or recipe.lr,
        weight_decay=recipe.weight_decay,
        schedule=recipe.schedule,
        loss_weights=config.loss_weights,
        recipe_weights={t: float(recipe.loss_weights.get(t, 1.0)) for t in tasks},
        seed=config.seed,
        world_size=world_size,
    )


def lr_factor(spec: DenseDatasetSpec, epoch: int, epochs: int) -> float:
    """The schedule's factor of the base learning rate in ``epoch`` (0-based)."""
    recipe = spec.recipe
    if recipe.schedule == "poly":
        return float((1.0 - epoch / epochs) ** recipe.poly_power)
    if recipe.schedule == "step":
        return float(recipe.gamma ** (epoch // recipe.step_size)) if recipe.step_size else 1.0
    if recipe.schedule in ("constant", "none"):
        return 1.0
    raise ValueError(f"recipe schedule must be 'poly', 'step' or 'constant': {recipe.schedule!r}")


# ------------------------------------------------------------------------------ distributed


@dataclass(frozen=True)
class World:
    """This process's place in a ``torchrun`` job (rank 0 of 1 without one)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def join_world(device: str) -> World:
    """Join the ``torchrun`` process group when ``WORLD_SIZE > 1`` (nccl on CUDA, gloo else)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def average_gradients_on_accumulation(model: nn.Module, world: World) -> list[Any]:
    """Average every parameter's gradient over the ranks each time a backward pass has
    accumulated it (linear, so repeated backwards stay exact). Returns the hook handles."""

    def hook(param: Tensor) -> None:
        if param.grad is not None:
            dist.all_reduce(param.grad)
            param.grad.div_(world.size)

    return [
        p.register_post_accumulate_grad_hook(hook) for p in model.parameters() if p.requires_grad
    ]


def ranks_agree(members: Sequence[Member], world: World) -> bool:
    """Whether every rank holds rank 0's parameters and buffers, bit for bit (True alone)."""
    if world.size == 1:
        return True
    ok = True
    device = next(members[0].model.parameters()).device
    for m in members:
        for t in [*m.model.state_dict().values(), *m.weighting.state_dict().values()]:
            theirs = t.detach().clone()
            dist.broadcast(theirs, 0)
            ok = ok and torch.equal(t, theirs)
    flag = torch.tensor(int(ok), device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag)


def average_buffers(model: nn.Module, world: World) -> None:
    """Average the floating buffers (BatchNorm statistics) over the ranks."""
    if world.size == 1:
        return
    for buf in model.buffers():
        if buf.is_floating_point():
            dist.all_reduce(buf)
            buf.div_(world.size)


# ------------------------------------------------------------------------------ members


@dataclass
class Member:
    """One network and what trains it: the whole run for a multi-task method, one task each
    for ``single``."""

    tasks: tuple[str, ...]
    model: DenseMultiTaskNet
    runner: nn.Module  # ``model``, or its DistributedDataParallel wrapper
    weighting: LossWeighting
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    step: TrainStep

    def state(self) -> dict[str, Any]:
        cs = getattr(self.step, "cs", None)
        return {
            "tasks": list(self.tasks),
            "model": self.model.state_dict(),
            "weighting": self.weighting.state_dict(),
            "weighting_extra": self.weighting.extra_state(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "step": cs.state_dict() if cs is not None else None,
        }

    def load(self, state: Mapping[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.weighting.load_state_dict(state["weighting"])
        self.weighting.load_extra_state(state["weighting_extra"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        cs = getattr(self.step, "cs", None)
        if cs is not None:
            cs.load_state_dict(state["step"])


def _optimizer(plan: Plan, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    if plan.optimizer == "adam":
        return torch.optim.Adam(params, lr=plan.lr, weight_decay=plan.weight_decay)
    if plan.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=plan.lr, weight_decay=plan.weight_decay)
    return torch.optim.SGD(params, lr=plan.lr, momentum=0.9, weight_decay=plan.weight_decay)


def build_member(
    tasks: tuple[str, ...],
    plan: Plan,
    spec: DenseDatasetSpec,
    config: DenseRunConfig,
    sample: Tensor,
    device: torch.device,
    world: World,
) -> Member:
    """The network of ``tasks``, its weighting, optimizer, schedule and training step."""
    torch.manual_seed(plan.seed)
    backbone, _ = make_backbone(
        plan.backbone, source=config.backbone_source, width=config.width, weights=config.weights
    )
    kinds = {t: TASK_KINDS[t] for t in tasks}
    model = DenseMultiTaskNet(
        tasks,
        backbone=backbone,
        head_width=config.head_width,
        kinds=kinds,
        outputs=task_outputs(tasks, spec.num_classes),
    ).to(device)
    weighting = make_weighting(plan.loss_weights, tasks, plan.recipe_weights).to(device)
    optimizer = _optimizer(plan, [*model.parameters(), *weighting.parameters()])
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda e: lr_factor(spec, e, plan.epochs)
    )
    method = "single" if plan.method == "single" else plan.method
    runner: nn.Module = model
    if world.size > 1:
        if method.startswith("ours_"):
            ids = [device.index] if device.type == "cuda" else None
            runner = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        else:
            average_gradients_on_accumulation(model, world)
            average_gradients_on_accumulation(weighting, world)
    step = make_step(
        method,
        runner,
        tasks,
        optimizer,
        shared=model.shared_parameters(),
        sample_input=sample,
        seed=plan.seed,
        cs_options=config.cs_options,
    )
    return Member(tasks, model, runner, weighting, optimizer, scheduler, step)


# ------------------------------------------------------------------------------ data


def epoch_batches(size: int, batch: int, epoch: int, seed: int, world: World) -> list[list[int]]:
    """This rank's batches of epoch ``epoch``: a permutation drawn from ``(seed, epoch)``, cut
    into full batches of ``batch`` (the last partial one dropped), each split over the ranks."""
    if size < batch:
        raise ValueError(f"batch_size {batch} exceeds the {size} training samples")
    gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(size, generator=gen).tolist()
    per_rank = batch // world.size
    batches = []
    for start in range(0, size - batch + 1, batch):
        whole = order[start : start + batch]
        batches.append(whole[world.rank * per_rank : (world.rank + 1) * per_rank])
    return batches


def _collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in samples[0]:
        if key == "meta":
            out[key] = [s["meta"] for s in samples]
        else:
            out[key] = torch.stack([s[key] for s in samples])
    return out


def _loader(dataset: Dataset[Any], batches: Sequence[Sequence[int]], workers: int) -> DataLoader:
    return DataLoader(dataset, batch_sampler=batches, num_workers=workers, collate_fn=_collate)


def _to(batch: Mapping[str, Any], device: torch.device) -> dict[str, Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items() if k != "meta"}


# ------------------------------------------------------------------------------ run


def _progress(total: int, desc: str, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True)


def _checkpoint_path(out: Path) -> Path:
    return out / CHECKPOINT


def save_checkpoint(out: Path, state: dict[str, Any]) -> Path:
    """Write ``state`` to ``out/checkpoint.pt`` whole (a temporary file, then renamed)."""
    path = _checkpoint_path(out)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _loss_fn(
    member: Member, data: Mapping[str, Tensor], raw: dict[str, Tensor]
) -> Callable[[str], Tensor]:
    """The methods' ``loss_fn(task)``: the task's forward and weighted loss on ``data``; each
    unweighted loss is kept (detached) in ``raw``."""

    def loss_fn(task: str) -> Tensor:
        output = member.runner(data["image"], task=task)
        loss = task_loss(task, output, data[task])
        raw[task] = loss.detach()
        return member.weighting.scale(task, loss)

    return loss_fn


def train_epoch(
    members: Sequence[Member],
    dataset: Dataset[Any],
    plan: Plan,
    epoch: int,
    config: DenseRunConfig,
    device: torch.device,
    world: World,
) -> dict[str, float]:
    """One epoch of every member; returns the mean training loss per task (unweighted)."""
    if hasattr(dataset, "set_epoch"):
        dataset.set_epoch(epoch)
    batches = epoch_batches(len(dataset), plan.batch_size, epoch, plan.seed, world)  # type: ignore[arg-type]
    sums = {t: torch.zeros((), device=device) for m in members for t in m.tasks}
    bar = _progress(
        len(batches), f"epoch {epoch + 1}/{plan.epochs}", config.progress and world.main
    )
    for m in members:
        m.model.train()
    for batch in _loader(dataset, batches, config.workers):
        data = _to(batch, device)
        for m in members:
            raw: dict[str, Tensor] = {}
            m.step(_loss_fn(m, data, raw), epoch, plan.epochs)
            for t, v in raw.items():
                sums[t] += v
        bar.update(1)
    bar.close()
    means = {t: float(v) / len(batches) for t, v in sums.items()}  # one sync per epoch
    if world.size > 1:
        packed = torch.tensor([means[t] for t in sums], dtype=torch.float64, device=device)
        dist.all_reduce(packed)
        means = {t: float(v) / world.size for t, v in zip(sums, packed.tolist(), strict=True)}
    for m in members:
        m.scheduler.step()
        m.weighting.end_epoch({t: means[t] for t in m.tasks})
        average_buffers(m.model, world)
    return means


@torch.no_grad()
def evaluate(
    members: Sequence[Member],
    dataset: Dataset[Any],
    spec: DenseDatasetSpec,
    batch_size: int,
    workers: int,
    device: torch.device,
    progress: bool = False,
) -> dict[str, float]:
    """Every metric of every scored task over ``dataset`` (`mtl.dense_metrics.DenseMetrics`)."""
    from mtl.dense_metrics import DenseMetrics

    metrics = DenseMetrics(spec)
    size = len(dataset)  # type: ignore[arg-type]
    batches = [list(range(i, min(i + batch_size, size))) for i in range(0, size, batch_size)]
    scored = set(spec.scored_tasks)
    for m in members:
        m.model.eval()
    bar = _progress(len(batches), "validation", progress)
    for batch in _loader(dataset, batches, workers):
        data = _to(batch, device)
        pred = {}
        for m in members:
            for t in m.tasks:
                if t in scored:
                    pred[t] = m.model(data["image"], task=t)
        metrics.update(pred, {t: data[t] for t in pred})
        bar.update(1)
    bar.close()
    return {k: float(v) for k, v in metrics.compute().items()}


def read_single_task_results(path: Path) -> dict[str, float]:
    """The ``"task/metric"`` figures of a single-task run's ``metrics.json`` (or of a flat
    JSON object of them)."""
    try:
        loaded = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"single-task results file {path} is not JSON: {error}") from None
    table = loaded.get("metrics", loaded) if isinstance(loaded, dict) else None
    if not isinstance(table, dict) or not all(isinstance(v, (int, float)) for v in table.values()):
        raise ValueError(f"single-task results file {path} holds no {{'task/metric': number}}")
    return {str(k): float(v) for k, v in table.items()}


def dataset_spec(name: str) -> DenseDatasetSpec:
    """The `DenseDatasetSpec` of the on-disk dataset ``name``."""
    from mtl.data.dense import spec_of

    return spec_of(name)


def run(config: DenseRunConfig) -> dict[str, Any]:
    """Train and evaluate as ``config`` says; returns what ``metrics.json`` holds (written on
    rank 0 at the end; ``{"stopped_after": epochs}`` when ``stop_after`` ended the run early)."""
    from mtl.data.dense import open_dense

    config.check()
    spec = dataset_spec(config.dataset)
    world = join_world(config.device)
    device = torch.device(config.device)
    if device.type == "cuda" and world.size > 1:
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    plan = make_plan(config, spec, world.size)
    opts = {"tasks": plan.tasks, "image_size": plan.image_size, "seed": plan.seed}
    train_set = open_dense(config.dataset, config.root, "train", train=True, **opts)
    val_set = open_dense(config.dataset, config.root, "val", train=False, **opts)
    first = _collate([train_set[i] for i in range(min(2, len(train_set)))])["image"].to(device)
    groups = [(t,) for t in plan.tasks] if plan.method == "single" else [plan.tasks]
    members = [build_member(g, plan, spec, config, first, device, world) for g in groups]

    out = Path(config.out)
    if world.main:
        out.mkdir(parents=True, exist_ok=True)
    start, history = 0, []
    if config.resume:
        path = _checkpoint_path(out)
        if not path.is_file():
            raise ValueError(f"--resume: no checkpoint at {path}")
        state = torch.load(path, map_location=device, weights_only=False)
        if state["plan"] != plan.key():
            diff = sorted(k for k in plan.key() if state["plan"].get(k) != plan.key()[k])
            raise ValueError(f"checkpoint {path} is of another run (differs in {diff})")
        for m, s in zip(members, state["members"], strict=True):
            m.load(s)
        start, history = int(state["epoch"]), list(state["history"])
        _set_rng_state(state["rng"])

    began = time.perf_counter()
    for epoch in range(start, plan.epochs):
        tick = time.perf_counter()
        losses = train_epoch(members, train_set, plan, epoch, config, device, world)
        history.append({"epoch": epoch + 1, "loss": losses, "seconds": time.perf_counter() - tick})
        if world.main:
            state = {
                "plan": plan.key(),
                "epoch": epoch + 1,
                "history": history,
                "members": [m.state() for m in members],
                "rng": _rng_state(),
            }
            save_checkpoint(out, state)
            if config.progress:
                shown = ", ".join(f"{t} {v:.4g}" for t, v in losses.items())
                print(f"epoch {epoch + 1}/{plan.epochs}: loss {shown}", flush=True)
        stop = config.stop_after is not None and epoch + 1 - start >= config.stop_after
        if stop and epoch + 1 < plan.epochs:
            return {"stopped_after": epoch + 1}

    agree = ranks_agree(members, world)
    result: dict[str, Any] = {}
    if world.main:
        results = evaluate(
            members, val_set, spec, plan.batch_size, config.workers, device, config.progress
        )
        result = {
            "dataset": plan.dataset,
            "method": plan.method,
            "tasks": list(plan.tasks),
            "backbone": plan.backbone,
            "plan": plan.key(),
            "split": "val",
            "metrics": results,
            "delta_m": None,
            "single_task_results": None,
            "history": history,
            "world_size": world.size,
            "ranks_agree": agree,
            "train_seconds": time.perf_counter() - began,
        }
        if config.single_task_results is not None:
            from mtl.dense_metrics import delta_m

            single = read_single_task_results(config.single_task_results)
            missing = [k for k in spec.delta_metrics if k not in single]
            if missing:
                raise ValueError(
                    f"single-task results file {config.single_task_results} lacks {missing}"
                )
            value = float(delta_m(results, single, spec))
            result["delta_m"] = value if math.isfinite(value) else None
            result["single_task_results"] = str(config.single_task_results)
        (out / METRICS).write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    if world.size > 1:
        dist.barrier()
    return result
