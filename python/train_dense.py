"""Train one method on one of the paper's dense datasets and write its validation metrics.

    python python/train_dense.py --dataset nyud --root /data/NYUD_MT --method ours_mixed \\
        --backbone hrnet18 --weights hrnetv2_w18_imagenet.pth --device cuda --out runs/nyud-ours
    torchrun --nproc-per-node 4 python/train_dense.py --dataset pascal --root /data/PASCAL_MT ...

Datasets (``--dataset``): ``nyud`` (NYUD-v2, ``NYUD_MT`` layout), ``pascal`` (PASCAL-Context,
``PASCAL_MT`` layout), ``nyuv2-mtan`` and ``cityscapes`` (MTAN's preprocessed arrays). Every
option left unset takes the dataset recipe's value (image size, epochs, batch size, optimizer,
learning rate and schedule, loss weights, backbone). Methods (``--method``): ``single`` (one
network per task), ``gd``, ``pcgrad``, ``cagrad``, ``mgda``, ``aligned_mtl``, ``ours_phase1``,
``ours_phase2``, ``ours_mixed``. Nothing is downloaded: ``--weights`` is a local file.

Writes ``<out>/checkpoint.pt`` after every epoch (``--resume`` continues from it, bit for bit)
and ``<out>/metrics.json`` at the end: every ``task/metric`` on the validation split, and Δm
against ``--single-task-results`` (a ``metrics.json`` of a ``--method single`` run).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from mtl.data import ON_DISK  # noqa: E402
from mtl.dense_train import DenseRunConfig, run  # noqa: E402
from mtl.loss_weights import WEIGHTINGS  # noqa: E402
from mtl.methods import METHODS  # noqa: E402
from mtl.models.zoo import BACKBONE_NAMES, SOURCES  # noqa: E402


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--dataset", required=True, choices=ON_DISK)
    p.add_argument("--root", required=True, type=Path, help="the dataset's folder (read only)")
    p.add_argument("--method", default="ours_mixed", choices=METHODS)
    p.add_argument("--tasks", nargs="+", help="a subset of the dataset's tasks (default: all)")
    p.add_argument("--backbone", choices=BACKBONE_NAMES, help="default: the recipe's")
    p.add_argument(
        "--backbone-source",
        default="auto",
        choices=SOURCES,
        help="auto: timm/torchvision when installed, else our layouts",
    )
    p.add_argument("--width", type=int, help="first-stage channels of our backbone layouts")
    p.add_argument("--head-width", type=int, default=64, help="channels of each dense head")
    p.add_argument("--weights", type=Path, help="a local backbone checkpoint (a state dict)")
    p.add_argument("--loss-weights", default="recipe", choices=WEIGHTINGS)
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int, help="the whole batch (over all ranks)")
    p.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"))
    p.add_argument("--lr", type=float, help="base learning rate (default: the recipe's)")
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=4, help="DataLoader worker processes")
    p.add_argument("--out", type=Path, required=True, help="folder for checkpoint + metrics")
    p.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint.pt")
    p.add_argument(
        "--stop-after", type=int, help="stop after this many epochs (time limits; then --resume)"
    )
    p.add_argument(
        "--single-task-results", type=Path, help="metrics.json of a --method single run (Δm)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar or epoch lines")
    return p


def _cuda() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    config = DenseRunConfig(
        dataset=args.dataset,
        root=args.root,
        out=args.out,
        method=args.method,
        tasks=tuple(args.tasks) if args.tasks else None,
        backbone=args.backbone,
        backbone_source=args.backbone_source,
        width=args.width,
        head_width=args.head_width,
        weights=args.weights,
        loss_weights=args.loss_weights,
        epochs=args.epochs,
        batch_size=args.batch_size,
        image_size=tuple(args.image_size) if args.image_size else None,
        lr=args.lr,
        device=args.device,
        seed=args.seed,
        workers=args.workers,
        resume=args.resume,
        stop_after=args.stop_after,
        single_task_results=args.single_task_results,
        progress=not args.no_progress,
    )
    try:
        result = run(config)
    except ValueError as error:
        print(f"train_dense.py: error: {error}", file=sys.stderr)
        return 2
    if result.get("metrics") and not args.no_progress:
        print(json.dumps({"metrics": result["metrics"], "delta_m": result["delta_m"]}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
