"""Train a small multi-task conv net with connection strength-based optimization.

The network shares its convolutions between three tasks and gives every task its own
BatchNorm after each shared conv (``nn.ModuleDict`` keyed by task) and its own head; the
data is synthetic (targets from fixed random "teacher" rules), so it runs anywhere in
seconds. The cs_kernels part is the block marked INTEGRATION below.

    python python/train_multitask.py                  # 6 epochs, priority plot to PNG
    python python/train_multitask.py --quick          # a few steps, for a smoke test
    python python/train_multitask.py --amp fp16 --accumulate 2 --clip 1.0
                                 # fp16 autocast + GradScaler, 2 micro-batches, clipping
    python python/train_multitask.py --amp bf16 --buffer-dtype bf16   # bf16, half-size rows
"""

from __future__ import annotations

import argparse
import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn

TASKS = ["brightness", "colour", "texture"]


class Block(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.bn = nn.ModuleDict({t: nn.BatchNorm2d(cout) for t in TASKS})

    def forward(self, x: Tensor, task: str) -> Tensor:
        return F.relu(self.bn[task](self.conv(x)))


class MultiTaskNet(nn.Module):
    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            [Block(3, width), Block(width, 2 * width), Block(2 * width, 2 * width)]
        )
        self.heads = nn.ModuleDict({t: nn.Linear(2 * width, 3) for t in TASKS})

    def forward(self, x: Tensor, task: str) -> Tensor:
        for i, block in enumerate(self.blocks):
            x = block(x, task)
            if i < 2:
                x = F.max_pool2d(x, 2)
        return self.heads[task](x.mean(dim=(2, 3)))


def synthetic_batch(gen: torch.Generator, n: int) -> tuple[Tensor, dict[str, Tensor]]:
    """Images ``[n, 3, 16, 16]`` and a 3-class target per task."""
    texture = torch.randint(0, 3, (n,), generator=gen)
    scale = torch.tensor([0.5, 1.0, 2.0])[texture].view(n, 1, 1, 1)
    x = torch.randn(n, 3, 16, 16, generator=gen) * scale
    x[:, :, :8] += torch.randn(n, 3, 1, 1, generator=gen)  # a brighter or darker top half
    diff = x[:, :, :8].mean(dim=(1, 2, 3)) - x[:, :, 8:].mean(dim=(1, 2, 3))
    return x, {
        "brightness": torch.bucketize(diff, torch.tensor([-0.4, 0.4])),
        "colour": x.mean(dim=(2, 3)).argmax(dim=1),
        "texture": texture,
    }


def autocast_problem(dtype: torch.dtype) -> str | None:
    """None when CPU autocast runs matrix products in ``dtype`` here, else why not."""
    try:
        with torch.autocast("cpu", dtype=dtype):
            result = torch.ones(2, 2) @ torch.ones(2, 2)
    except (RuntimeError, ValueError) as exc:
        return str(exc)
    return None if result.dtype == dtype else f"CPU autocast gave {result.dtype}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--steps", type=int, default=30, help="batches per epoch")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--mode", choices=["group", "channel"], default="group")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--plot", default="priority.png", help="telemetry PNG ('' for none)")
    parser.add_argument("--quick", action="store_true", help="2 epochs of 3 steps")
    parser.add_argument("--amp", choices=["fp16", "bf16"], help="CPU autocast (fp16: + scaler)")
    parser.add_argument("--accumulate", type=int, default=1, help="micro-batches per step")
    parser.add_argument("--clip", type=float, help="max gradient norm")
    parser.add_argument("--buffer-dtype", choices=["bf16", "fp16"], help="half-size [T, N] rows")
    args = parser.parse_args()
    if args.quick:
        args.epochs, args.steps = 2, 3
    if args.accumulate < 1 or args.batch % args.accumulate:
        parser.error(f"--accumulate must be >= 1 and divide --batch {args.batch}")
    if args.clip is not None and not args.clip > 0:
        parser.error("--clip must be > 0")
    dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16, None: None}
    amp_dtype = dtypes[args.amp]
    if amp_dtype is not None and (problem := autocast_problem(amp_dtype)) is not None:
        parser.error(f"--amp {args.amp}: this CPU/torch cannot autocast to it ({problem})")

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = MultiTaskNet()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    test_x, test_y = synthetic_batch(gen, 256)

    # ---- INTEGRATION (cs_kernels): everything the training loop needs ------------------
    from cs_kernels.training import ConnectionStrength

    cs = ConnectionStrength(
        model, TASKS, synthetic_batch(gen, 8)[0], mode=args.mode, backend=args.backend,
        buffer_dtype=dtypes[args.buffer_dtype],
    )  # fmt: skip
    scaler = torch.amp.GradScaler("cpu") if args.amp == "fp16" else None
    k = args.accumulate
    autocast = (
        (lambda: torch.autocast("cpu", dtype=amp_dtype)) if amp_dtype else contextlib.nullcontext
    )
    print(cs.summary())
    for epoch in range(args.epochs):
        totals = {t: torch.zeros(()) for t in TASKS}
        for _ in range(args.steps):
            x, y = synthetic_batch(gen, args.batch)

            def loss_fn(
                task: str, micro: int = 0, x: Tensor = x, y: dict[str, Tensor] = y
            ) -> Tensor:
                part = slice(micro * args.batch // k, (micro + 1) * args.batch // k)
                with autocast():  # the mean over the micro-batch; the controller divides by k
                    return F.cross_entropy(model(x[part], task=task).float(), y[task][part])

            losses = cs.step(optimizer, loss_fn, epoch, args.epochs, scaler=scaler,
                             max_grad_norm=args.clip, accumulate=k)  # fmt: skip
            for t in TASKS:
                totals[t] += losses[t]
        report = "  ".join(f"{t} {float(totals[t]) / args.steps:.3f}" for t in TASKS)
        print(f"epoch {epoch}: phase1 {cs.phase1_steps} phase2 {cs.phase2_steps}  loss {report}")
    if args.plot and cs.phase2_steps:
        cs.telemetry.plot(args.plot, title="top-priority task share per layer")
        print(f"priority plot: {args.plot}")
    # ---- end of INTEGRATION ------------------------------------------------------------

    model.eval()
    with torch.no_grad():
        accuracy = {
            t: float((model(test_x, task=t).argmax(1) == test_y[t]).float().mean()) for t in TASKS
        }
    print("test accuracy: " + "  ".join(f"{t} {a:.2f}" for t, a in accuracy.items()))
    print("top-priority share per layer (last epoch):")
    for layer, shares in cs.telemetry.latest().items():
        print(f"  {layer:<22}" + "  ".join(f"{t} {s:.2f}" for t, s in shares.items()))


if __name__ == "__main__":
    main()
