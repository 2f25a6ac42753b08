"""cs_kernels demo: which backends run here, that they agree with the reference, and how fast.

Runs as a user would: only the public API of the installed package.

    python python/demo.py            # ResNet-18 layer set, T = 3
    python python/demo.py --quick    # a smaller layer set, for a smoke test
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

import cs_kernels as ck
from cs_kernels.baseline_loop import authors_style_phase2
from cs_kernels.model_shapes import model_plan


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``fn`` in milliseconds, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1e3


def head_of(plan: ck.Phase2Plan, layers: int) -> ck.Phase2Plan:
    """The first ``layers`` connection layers of a plan, as a plan of their own."""
    kept = plan.layers[:layers]
    return ck.Phase2Plan(kept, kept[-1].offset + kept[-1].numel)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes, a few seconds")
    parser.add_argument("--tasks", type=int, default=3)
    args = parser.parse_args()

    device = torch.device("cpu")
    print(
        f"cs_kernels {ck.__version__}, torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    print("\nBackends:")
    for name, status in ck.backend_status().items():
        print(f"  {name:<10} {status}")

    # 1. Agreement with the reference on the first layers of ResNet-18 (the oracle is slow).
    full = model_plan("resnet18")
    small = head_of(full, 3 if args.quick else 6)
    gen = torch.Generator().manual_seed(0)
    grads = torch.randn(args.tasks, small.numel, generator=gen)
    strength = torch.rand(args.tasks, small.total_channels, generator=gen)
    print(f"\nAgreement with `reference` on {small} (fp32, T={args.tasks}):")
    for mode in ("group", "channel"):
        expected = ck.phase2(grads, small, strength, mode=mode, backend="reference")
        for backend in ck.available_backends(device):
            if backend == "reference":
                continue
            got = ck.phase2(grads, small, strength, mode=mode, backend=backend)
            err = float((got - expected).abs().max())
            print(f"  {mode:<8} {backend:<8} max |diff| = {err:.2e}")

    # 2. Whole-model Phase 2 timing against the floor and the authors'-style loop.
    plan = small if args.quick else full
    repeats = 3 if args.quick else 7
    grads = torch.randn(args.tasks, plan.numel, generator=gen)
    top = ck.plan_top_priority(torch.rand(args.tasks, plan.total_channels, generator=gen), plan)
    out = torch.empty(plan.numel)
    floor = median_ms(lambda: torch.sum(grads, 0, out=out), repeats)
    loop = median_ms(lambda: authors_style_phase2(grads, plan, top), max(1, repeats // 3))
    print(f"\nPhase 2 on {plan}, T={args.tasks}, fp32, {device}:")
    print(f"  {'':<18}{'ms':>9}{'x floor':>9}{'vs loop':>9}")
    print(f"  {'floor (sum)':<18}{floor:>9.2f}{1.0:>9.2f}{loop / floor:>8.1f}x")
    print(f"  {'authors loop':<18}{loop:>9.2f}{loop / floor:>9.2f}{1.0:>8.1f}x")
    for backend in ck.available_backends(device):
        if backend == "reference":
            continue
        for mode in ("group", "channel"):
            ms = median_ms(
                lambda b=backend, m=mode: ck.phase2(
                    grads, plan, top=top, mode=m, out=out, backend=b, check=False
                ),
                repeats if backend == "cpu" else 1,
            )
            label = f"{backend} {mode}"
            print(f"  {label:<18}{ms:>9.2f}{ms / floor:>9.2f}{loop / ms:>8.1f}x")


if __name__ == "__main__":
    main()
