"""Phase 2 in steps (`channel_gram`, `projection_coefficients`, `apply_projection`): the steps
compose to `phase2` on one process, and to the unsharded `phase2` when the channels are split
over simulated processes the way FSDP2 splits them (``torch.chunk`` along dim 0)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import cs_kernels as ck
from cs_kernels.backends import BACKENDS as BACKEND_TABLE
from cs_kernels.backends import phase2_steps as steps_impl
from cs_kernels.backends.base import Backend
from tests.cases import CASES, LONG, MIXED, Case
from tests.conftest import DTYPES, FAST_BACKENDS, assert_close

SETTINGS = [(m, u) for m in ("group", "channel") for u in ("sum", "project")]


def _own_steps(name: str) -> bool:
    """Whether a backend overrides the defaults of the steps (else it runs `torch`'s code)."""
    kind = type(BACKEND_TABLE[name])
    return any(getattr(kind, m) is not getattr(Backend, m) for m in STEP_METHODS)


STEP_METHODS = ("channel_gram", "projection_coefficients", "project")
# The default implementation (every fast backend that does not override it runs the same
# code: testing it once, through "torch", is enough), the overrides, and the oracle.
BACKENDS = ["torch", *(b for b in FAST_BACKENDS if b != "torch" and _own_steps(b)), "reference"]


def stepwise(grads, plan, top, mode, uniform, backend, per_task=True):
    gram = ck.channel_gram(grads, plan, backend=backend)
    coef = ck.projection_coefficients(gram, plan, top, mode=mode, uniform=uniform, backend=backend)
    return ck.apply_projection(grads, plan, top, coef, per_task=per_task, backend=backend)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_steps_compose_to_phase2(case: Case, dtype: torch.dtype, device: torch.device) -> None:
    grads, top = case.build(device, dtype)
    for mode, uniform in SETTINGS:
        expected, expected_tasks = ck.phase2(
            grads, case.plan, top=top, mode=mode, uniform=uniform, per_task=True,
            backend="reference",
        )  # fmt: skip
        for backend in BACKENDS:
            if backend == "reference" and dtype != torch.float64:
                continue  # the oracle computes in float64 whatever the input: once is enough
            what = f"{backend} {mode}/{uniform}"
            combined, per_task = stepwise(grads, case.plan, top, mode, uniform, backend)
            assert_close(combined, expected, dtype, what)
            assert_close(per_task, expected_tasks, dtype, what + " per_task")


# Backends with their own coefficient step (the cpu kernel), beside the default code.
COEF_BACKENDS = [
    "torch",
    *(
        b for b in FAST_BACKENDS
        if type(BACKEND_TABLE[b]).projection_coefficients is not Backend.projection_coefficients
    ),
]  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_coefficients_match_the_reference(case: Case, dtype: torch.dtype, device) -> None:
    """The coefficient step alone, on the oracle's Gram matrices: group sums, the conflict
    test, the uniform-priority rule, empty groups, zero rows, T = 1 and T = 24."""
    grads, top = case.build(device, dtype)
    gram = ck.channel_gram(grads, case.plan, backend="reference").to(dtype)
    for mode, uniform in SETTINGS:
        expected = ck.projection_coefficients(
            gram, case.plan, top, mode=mode, uniform=uniform, backend="reference"
        )
        for backend in COEF_BACKENDS:
            if not BACKEND_TABLE[backend].supports(gram.device):
                continue
            actual = ck.projection_coefficients(
                gram, case.plan, top, mode=mode, uniform=uniform, backend=backend
            )
            what = f"{backend} {mode}/{uniform}"
            assert_close(actual, expected, dtype, what)
            # The same channels project (no sign decided differently near zero here).
            assert torch.equal(actual != 0, expected != 0), what


@pytest.mark.parametrize("backend", BACKENDS)
def test_gram_matches_the_rows(backend: str, device: torch.device) -> None:
    gen = torch.Generator().manual_seed(3)
    grads = torch.randn(4, MIXED.numel, generator=gen, dtype=torch.float64).to(device)
    gram = ck.channel_gram(grads, MIXED, backend=backend)
    assert gram.shape == (MIXED.total_channels, 4, 4) and gram.dtype == torch.float64
    for layer, first in zip(MIXED.layers, MIXED.first_channels, strict=True):
        rows = grads[:, layer.offset : layer.offset + layer.numel].view(4, layer.channels, -1)
        want = torch.einsum("icd,jcd->cij", rows, rows)
        torch.testing.assert_close(gram[first : first + layer.channels], want)


# Rows of 64-multiples after an odd row and an odd gap (a new chunk must realign them), and
# rows longer than a chunk.
ODD_THEN_ALIGNED = ck.Phase2Plan([(0, 3, 147), (441 + 10, 8, 64), (963, 4, 128)], 1600)
PLANS = {"long": LONG, "odd-then-aligned": ODD_THEN_ALIGNED, "mixed": MIXED}


@pytest.mark.parametrize("name", list(PLANS))
def test_chunked_walk_matches_the_reference(
    name: str, monkeypatch: pytest.MonkeyPatch, device
) -> None:
    """Tiny chunks and gap limits: rows and gaps split over many chunks, long gaps skipped;
    rows in whole blocks where they are 64-multiples, element by element elsewhere."""
    plan = PLANS[name]
    gen = torch.Generator().manual_seed(4)
    grads = torch.randn(3, plan.numel, generator=gen, dtype=torch.float64).to(device)
    top = torch.randint(0, 3, (plan.total_channels,), generator=gen).to(device)
    want = ck.phase2(grads, plan, top=top, uniform="project", per_task=True, backend="reference")
    monkeypatch.setattr(steps_impl, "CHUNK_ELEMENTS", 5 * 100)
    monkeypatch.setattr(steps_impl, "CHUNK_ELEMENTS_MIN", 5 * 100)
    monkeypatch.setattr(steps_impl, "GRAM_GAP_LIMIT", 100)
    chunks = steps_impl._chunks(plan, grads.device, steps_impl._budget(grads, 5), gram=True)
    assert len(chunks) > 1  # the walk really is chunked
    row_length = torch.tensor(
        [layer.row_length for layer in plan.layers for _ in range(layer.channels)]
    )
    loose = torch.cat([c.element_channel.cpu() for c in chunks])
    assert not bool((row_length[loose] % steps_impl.BLOCK == 0).any())  # whole blocks there
    got = stepwise(grads, plan, top, "group", "project", "torch")
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------ simulated FSDP2 shards


def shard_rows(channels: int, world: int, rank: int) -> tuple[int, int]:
    """FSDP2's split of dim 0 (``torch.chunk``): rank r holds rows [start, stop)."""
    size = -(-channels // world)
    start = min(channels, rank * size)
    return start, min(channels, start + size)


def sharded_phase2(grads, plan, top, world, mode, uniform, backend):
    """Each simulated rank holds whole channels of every layer (and a share of the gaps),
    sums its Gram matrices into the [C, T, T] total, then projects its own rows."""
    num_tasks = grads.shape[0]
    gram = torch.zeros(plan.total_channels, num_tasks, num_tasks, dtype=torch.float64)
    ranks = []
    for rank in range(world):
        segments, layers, index, offset = [], [], [], 0
        for layer, first in zip(plan.layers, plan.first_channels, strict=True):
            start, stop = shard_rows(layer.channels, world, rank)
            if stop > start:
                a = layer.offset + start * layer.row_length
                segments.append(grads[:, a : a + (stop - start) * layer.row_length])
                layers.append((offset, stop - start, layer.row_length))
                index.extend(range(first + start, first + stop))
                offset += (stop - start) * layer.row_length
        for gap_offset, length in plan.gaps:
            start, stop = shard_rows(length, world, rank)
            segments.append(grads[:, gap_offset + start : gap_offset + stop])
            offset += stop - start
        local = torch.cat(segments, dim=1).contiguous() if segments else grads[:, :0]
        local_plan = ck.Phase2Plan(layers, offset)
        idx = torch.tensor(index, dtype=torch.int64)
        gram[idx] += ck.channel_gram(local, local_plan, backend=backend).double()
        ranks.append((local, local_plan, idx))
    coef = ck.projection_coefficients(gram, plan, top, mode=mode, uniform=uniform)
    return [
        ck.apply_projection(local, local_plan, top[idx], coef[:, idx], backend=backend)
        for local, local_plan, idx in ranks
    ]


def unshard(outs, plan, world):
    """Put the ranks' results back in the unsharded order."""
    full = torch.zeros(plan.numel, dtype=outs[0].dtype)
    for rank, out in enumerate(outs):
        o = 0
        for layer in plan.layers:
            start, stop = shard_rows(layer.channels, world, rank)
            n = (stop - start) * layer.row_length
            a = layer.offset + start * layer.row_length
            full[a : a + n] = out[o : o + n]
            o += n
        for gap_offset, length in plan.gaps:
            start, stop = shard_rows(length, world, rank)
            full[gap_offset + start : gap_offset + stop] = out[o : o + stop - start]
            o += stop - start
    return full


@pytest.mark.parametrize("world", [2, 3, 5])
@pytest.mark.parametrize("backend", BACKENDS)
def test_sharded_steps_equal_unsharded_phase2(world: int, backend: str) -> None:
    """Uneven splits and layers with fewer channels than ranks (empty shards) included."""
    plan = MIXED  # layers of 3, 4, 7, 2 and 1 channels
    gen = torch.Generator().manual_seed(world)
    grads = torch.randn(3, plan.numel, generator=gen, dtype=torch.float64)
    for top in (
        torch.randint(0, 3, (plan.total_channels,), generator=gen),
        torch.ones(plan.total_channels, dtype=torch.int64),  # every layer uniform
        # one rank's rows of the 7-channel layer all led by task 2, the layer is not uniform
        torch.tensor([0] * 7 + [2, 2, 2, 0, 1, 1, 1] + [0] * 3, dtype=torch.int64),
    ):
        for mode, uniform in SETTINGS:
            want = ck.phase2(grads, plan, top=top, mode=mode, uniform=uniform, backend="reference")
            outs = sharded_phase2(grads, plan, top, world, mode, uniform, backend)
            got = unshard(outs, plan, world)
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(
    channels=st.lists(st.integers(1, 6), min_size=1, max_size=4),
    row=st.integers(1, 7),
    tasks=st.integers(2, 4),
    world=st.integers(2, 4),
    seed=st.integers(0, 2**16),
    mode=st.sampled_from(["group", "channel"]),
    uniform=st.sampled_from(["sum", "project"]),
)
def test_sharded_steps_property(channels, row, tasks, world, seed, mode, uniform) -> None:
    plan = ck.Phase2Plan.from_shapes([(c, row) for c in channels] + [(5,)])
    gen = torch.Generator().manual_seed(seed)
    grads = torch.randn(tasks, plan.numel, generator=gen, dtype=torch.float64)
    top = torch.randint(0, tasks, (plan.total_channels,), generator=gen)
    want = ck.phase2(grads, plan, top=top, mode=mode, uniform=uniform, backend="reference")
    got = unshard(sharded_phase2(grads, plan, top, world, mode, uniform, "torch"), plan, world)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------ arguments


def test_steps_leave_inputs_untouched_and_write_out(device) -> None:
    gen = torch.Generator().manual_seed(5)
    grads = torch.randn(3, MIXED.numel, generator=gen).to(device)
    top = torch.randint(0, 3, (MIXED.total_channels,), generator=gen).to(device)
    saved = grads.clone(), top.clone()
    gram = ck.channel_gram(grads, MIXED)
    coef = ck.projection_coefficients(gram, MIXED, top)
    gram_saved, coef_saved = gram.clone(), coef.clone()
    out = torch.empty(MIXED.numel, device=device)
    result = ck.apply_projection(grads, MIXED, top, coef, out=out)
    assert result is out
    for before, after in zip(saved, (grads, top), strict=True):
        assert torch.equal(before, after)
    assert torch.equal(gram, gram_saved) and torch.equal(coef, coef_saved)
    weights = [torch.randn(layer.channels, layer.row_length) for layer in MIXED.layers]
    norms = ck.plan_row_sqnorm(weights, MIXED)
    torch.testing.assert_close(norms, torch.cat([w.square().sum(1) for w in weights]))


def test_steps_reject_bad_arguments() -> None:
    plan = MIXED
    grads = torch.randn(3, plan.numel)
    top = torch.zeros(plan.total_channels, dtype=torch.int64)
    gram = ck.channel_gram(grads, plan)
    coef = ck.projection_coefficients(gram, plan, top)
    with pytest.raises(TypeError, match="plan"):
        ck.channel_gram(grads, "plan")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="grads has 10 elements"):
        ck.channel_gram(torch.randn(3, 10), plan)
    with pytest.raises(ValueError, match="grads contains NaN"):
        ck.channel_gram(torch.full((3, plan.numel), float("nan")), plan, check_finite=True)
    with pytest.raises(ValueError, match="gram must be"):
        ck.projection_coefficients(gram[:-1], plan, top)
    with pytest.raises(ValueError, match="gram must be"):
        ck.projection_coefficients(gram[:, :2], plan, top)
    with pytest.raises(ValueError, match="mode"):
        ck.projection_coefficients(gram, plan, top, mode="rows")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="top holds task indices"):
        ck.projection_coefficients(gram, plan, top + 3)
    with pytest.raises(ValueError, match="gram contains NaN"):
        ck.projection_coefficients(gram * float("nan"), plan, top)
    with pytest.raises(ValueError, match="coefficients must be"):
        ck.apply_projection(grads, plan, top, coef[:2])
    with pytest.raises(ValueError, match="coefficients contains NaN"):
        ck.apply_projection(grads, plan, top, coef * float("nan"))
    with pytest.raises(TypeError, match="coefficients must be float"):
        ck.apply_projection(grads, plan, top, top)
    with pytest.raises(ValueError, match="out must not share memory with grads"):
        ck.apply_projection(grads, plan, top, coef, out=grads[0])
    with pytest.raises(TypeError, match="weights must be a list"):
        ck.plan_row_sqnorm(torch.randn(3, 3), plan)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="weights has 1 tensors"):
        ck.plan_row_sqnorm([torch.randn(3, 17)], plan)
    with pytest.raises(ValueError, match="weights has 0 tensors"):
        ck.plan_row_sqnorm([], plan)
