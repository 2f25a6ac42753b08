"""The sharded Phase 2's fast fill of the strength inputs (FSDP2, 2 and 3 gloo processes, CPU).

With BatchNorm/GroupNorm connections only, the factors' ``a`` is constant and
`ShardedPhase2` copies every rank's share of ``g`` (its rows of each sharded gamma) straight
into the all-reduce payload with one ``_foreach_copy_``, instead of building a zero-filled
full tensor per entry (`ShardedPhase2.share`). Each rank checks that both fills give the same
payload bit for bit, and that `combine` then gives the same result and top tasks. The layers
have uneven splits (5 channels over 2 and 3 ranks) and an empty shard (2 channels over 3).
tests/test_fsdp_training.py compares the sharded Phase 2 with one process on a model whose
heads and LayerNorm make ``a`` computed, which takes the general fill.
"""

from __future__ import annotations

import os
import tempfile
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import Tensor, nn

from cs_kernels.training import ConnectionStrength

pytestmark = pytest.mark.skipif(
    not dist.is_available(), reason="torch.distributed is not available in this torch build"
)

TASKS = ["left", "right", "depth"]


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 5, 3, padding=1)
        self.bn1 = nn.ModuleDict({t: nn.BatchNorm2d(5) for t in TASKS})
        self.conv2 = nn.Conv2d(5, 2, 3, padding=1, bias=False)
        self.gn2 = nn.ModuleDict({t: nn.GroupNorm(1, 2) for t in TASKS})
        self.heads = nn.ModuleDict({t: nn.Conv2d(2, 3, 1) for t in TASKS})

    def forward(self, x: Tensor, task: str) -> Tensor:
        z = F.relu(self.bn1[task](self.conv1(x)))
        z = F.relu(self.gn2[task](self.conv2(z)))
        return self.heads[task](z).mean(dim=(2, 3))


def make_model() -> Net:
    torch.manual_seed(0)
    model = Net()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d | nn.GroupNorm):
                m.weight.uniform_(0.2, 2.0)
            if isinstance(m, nn.BatchNorm2d):
                m.running_var.uniform_(0.5, 2.0)
    return model


def worker(rank: int, world: int, init: str, folder: str) -> None:
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group(
        "gloo", init_method=init, rank=rank, world_size=world, timeout=timedelta(seconds=60)
    )
    try:
        model = make_model()
        fully_shard(model.conv1)
        fully_shard(model.conv2)
        fully_shard(model)
        model.eval()
        gen = torch.Generator().manual_seed(1 + rank)
        x = torch.randn(4, 2, 5, 5, generator=gen)
        y = {t: torch.randint(0, 3, (4,), generator=gen) for t in TASKS}
        cs = ConnectionStrength(model, TASKS, x)
        sharded = cs._sharded
        assert sharded is not None
        results: dict[str, object] = {"fast": sharded._share_copies is not None}
        cs.collect(lambda t: F.cross_entropy(model(x, task=t), y[t]))
        grads = cs.buffer.grads.clone()
        # combine averages the model buffers; each combine starts from the same ones
        buffers = [b.clone() for b in sharded.buffers]
        for name, copies in (("fast", sharded._share_copies), ("general", None)):
            sharded._share_copies = copies
            for b, saved in zip(sharded.buffers, buffers, strict=True):
                b.copy_(saved)
            sharded._fill_strength_inputs()
            results[f"payload-{name}"] = sharded.payload.clone()
            out = torch.empty_like(cs.buffer.out)
            results[f"top-{name}"] = sharded.combine(grads, out)
            results[f"out-{name}"] = out
        torch.save(results, os.path.join(folder, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3])
def test_fast_share_fill_equals_the_general_one(world: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        init = f"file://{Path(tmp) / 'store'}"
        mp.spawn(worker, args=(world, init, tmp), nprocs=world, join=True)
        ranks = [torch.load(Path(tmp) / f"rank{r}.pt") for r in range(world)]
    for rank, seen in enumerate(ranks):
        assert seen["fast"], f"rank {rank} did not take the fast fill"
        # Not all zero: the rows, norms and factors were really filled in.
        assert seen["payload-general"].abs().sum() > 0
        assert torch.equal(seen["payload-fast"], seen["payload-general"]), f"rank {rank}"
        assert torch.equal(seen["top-fast"], seen["top-general"]), f"rank {rank}"
        assert torch.equal(seen["out-fast"], seen["out-general"]), f"rank {rank}"
    for seen in ranks[1:]:  # every rank computed the same top tasks
        assert torch.equal(seen["top-fast"], ranks[0]["top-fast"])
