"""`Phase2Plan`: layout, gaps, channel numbering and the cached device tables."""

from __future__ import annotations

import torch

import cs_kernels as ck


def test_gaps_and_first_channels() -> None:
    plan = ck.Phase2Plan([(10, 2, 5), (0, 3, 2)], 30)
    assert plan.first_channels == (0, 2)
    assert plan.total_channels == 5
    assert plan.gaps == ((6, 4), (20, 10))
    assert plan.connection_numel == 16
    assert plan.layer_table("cpu").tolist() == [[10, 2, 5, 0], [0, 3, 2, 2]]
    assert plan.gap_table("cpu").tolist() == [[6, 4], [20, 10]]


def test_from_shapes_lays_parameters_end_to_end() -> None:
    plan = ck.Phase2Plan.from_shapes([(4, 3, 3, 3), (4,), (8, 4)])
    assert plan.numel == 108 + 4 + 32
    assert [tuple(layer) for layer in plan.layers] == [(0, 4, 27), (112, 8, 4)]
    assert plan.gaps == ((108, 4),)
    only_first = ck.Phase2Plan.from_shapes([(4, 3), (8, 4)], connected=[True, False])
    assert only_first.num_layers == 1 and only_first.gaps == ((12, 32),)


def test_tables_are_built_once_per_device() -> None:
    plan = ck.Phase2Plan([(0, 2, 2)], 4)
    first = plan.layer_table("cpu")
    assert plan.layer_table(torch.device("cpu")) is first
    assert plan.layer_table("meta").device.type == "meta"


def test_empty_plan() -> None:
    plan = ck.Phase2Plan([], 0)
    assert plan.total_channels == 0 and plan.gaps == ()
    grads = torch.empty(2, 0)
    assert ck.phase2(grads, plan, top=torch.empty(0, dtype=torch.int64)).shape == (0,)


def test_plans_with_the_same_layout_are_equal_and_hash_alike() -> None:
    a = ck.Phase2Plan([(4, 2, 3), (0, 1, 4)], 12)
    b = ck.Phase2Plan([[4, 2, 3], [0, 1, 4]], 12)
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    assert a != ck.Phase2Plan([(4, 2, 3), (0, 1, 4)], 13)  # another numel
    assert a != ck.Phase2Plan([(0, 1, 4), (4, 2, 3)], 12)  # another channel order
    assert a != ck.Phase2Plan([(4, 2, 3)], 12)
    assert a != "plan" and a != (12, a.layers)
    a.layer_table("cpu")  # a filled cache does not change equality
    assert a == b and hash(a) == hash(b)
