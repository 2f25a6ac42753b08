"""Bad input to the public API is rejected, with the right exception and a useful message.

Every rejected call must raise TypeError (wrong type or dtype) or ValueError (wrong shape,
value, device or name), and its message must name the offending argument. A rejected call
must leave the caller's tensors as they were, and a successful call writes only ``out``.

The cases are tables: one row per bad input, ``case(id, call, exception, match, **replace)``,
where ``call`` runs one public function on an `Inputs` of small, valid tensors and
``replace`` swaps some of those inputs for bad ones before the call (each replacement is
built from the valid inputs, so the table reads "this argument, made bad like so").
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch import Tensor

from cs_kernels import (
    Phase2Plan,
    batchnorm_scale,
    channel_strength,
    phase2,
    plan_top_priority,
    project_layer,
    top_priority,
)
from tests.conftest import FAST_BACKENDS as BACKENDS_HERE

T, C, D = 2, 3, 4  # tasks, channels of the connection layer, row length
N = C * D + 8  # one layer at [0, 12), then a plainly summed gap [12, 20)
FAST_BACKENDS = (*BACKENDS_HERE, "reference")
NAN, INF = float("nan"), float("inf")
ENV_VAR = "CS_KERNELS_BACKEND"


@dataclass
class Inputs:
    """Valid arguments for every public function; a case replaces some of them."""

    grads: Any  # [T, N] for phase2
    plan: Any  # the Phase2Plan of grads
    top: Any  # int64 [C]
    strength: Any  # [T, C]
    out: Any  # [N], filled with a sentinel so a stray write shows
    layer: Any  # [T, C, D] for project_layer
    weight: Any  # [C, D] shared weight for channel_strength
    scale: Any  # [T, C] per-task factors for channel_strength
    gamma: Any  # [T, C] BatchNorm weights for batchnorm_scale
    var: Any  # [T, C] BatchNorm running variances
    eps: Any = 1e-5


def make_inputs() -> Inputs:
    gen = torch.Generator().manual_seed(0)
    grads = torch.randn(T, N, generator=gen)
    # Task 1 pulls against task 0, so the projections really happen (a backend that wrote
    # into grads would be caught by the no-modification test).
    grads[1] = -0.5 * grads[0] + 0.1 * grads[1]
    return Inputs(
        grads=grads,
        plan=Phase2Plan([(0, C, D)], N),
        top=torch.tensor([0, 1, 0]),
        strength=torch.rand(T, C, generator=gen) + 0.1,
        out=torch.full((N,), 7.0),
        layer=grads[:, : C * D].reshape(T, C, D).clone(),
        weight=torch.randn(C, D, generator=gen),
        scale=torch.rand(T, C, generator=gen) + 0.1,
        gamma=torch.rand(T, C, generator=gen) + 0.5,
        var=torch.rand(T, C, generator=gen) + 0.5,
    )


@dataclass(frozen=True)
class Case:
    call: Callable[[Inputs], object]
    exc: type[Exception]
    match: str
    replace: Mapping[str, Callable[[Inputs], object]] = field(default_factory=dict)

    def inputs(self) -> Inputs:
        x = make_inputs()
        for name, build in self.replace.items():
            setattr(x, name, build(x))
        return x


def case(
    case_id: str,
    call: Callable[[Inputs], object],
    exc: type[Exception],
    match: str,
    **replace: Callable[[Inputs], object],
) -> Any:
    return pytest.param(Case(call, exc, match, replace), id=case_id)


def arg(name: str) -> str:
    """Regex: the message names argument ``name`` (``layers[0].offset`` names ``layers``)."""
    return rf"(?<![\w.]){name}(?!\w)"


def meta(t: Tensor) -> Tensor:
    return t.to("meta")


def poke(t: Tensor, value: float, index: int = 1) -> Tensor:
    """A copy of ``t`` with one element set to ``value``."""
    t = t.clone()
    t.view(-1)[index] = value
    return t


# The calls, each with valid defaults (see test_valid_inputs_are_accepted).
def P2(x: Inputs, **kw: Any) -> object:  # phase2 given top (and out)
    return phase2(x.grads, x.plan, top=x.top, out=x.out, **kw)


def P2S(x: Inputs, **kw: Any) -> object:  # phase2 given strength (and out)
    return phase2(x.grads, x.plan, x.strength, out=x.out, **kw)


def PL(x: Inputs, **kw: Any) -> object:
    return project_layer(x.layer, x.top, **kw)


def CS(x: Inputs, **kw: Any) -> object:
    return channel_strength(x.weight, x.scale, **kw)


def BN(x: Inputs) -> object:
    return batchnorm_scale(x.gamma, x.var, eps=x.eps)


def TP(x: Inputs, **kw: Any) -> object:
    return top_priority(x.strength, **kw)


def PTP(x: Inputs, **kw: Any) -> object:
    return plan_top_priority(x.strength, x.plan, **kw)


def with_kw(call: Callable[..., object], **kw: Any) -> Callable[[Inputs], object]:
    return lambda x: call(x, **kw)


def _meta_of(name: str) -> Callable[[Inputs], Tensor]:
    return lambda x: meta(getattr(x, name))


# Every tensor on "meta": a device the cpu backend cannot run on.
ALL_META = {
    name: _meta_of(name) for name in ("grads", "top", "strength", "layer", "weight", "scale")
}


def P2_NO_OUT(x: Inputs, **kw: Any) -> object:
    return phase2(x.grads, x.plan, top=x.top, **kw)


def P2S_NO_OUT(x: Inputs, **kw: Any) -> object:
    return phase2(x.grads, x.plan, x.strength, **kw)


PHASE2_CASES = [
    # -- grads: type, dtype, rank, T, layout, size, values --------------------------------
    case("grads-list", P2, TypeError, arg("grads"), grads=lambda x: x.grads.tolist()),
    case("grads-int64", P2, TypeError, arg("grads"), grads=lambda x: x.grads.long()),
    case("grads-complex", P2, TypeError, arg("grads"), grads=lambda x: x.grads.cfloat()),
    case("grads-rank-1", P2, ValueError, arg("grads"), grads=lambda x: x.grads[0]),
    case("grads-rank-3", P2, ValueError, arg("grads"), grads=lambda x: x.grads[..., None]),
    case("grads-T0", P2, ValueError, arg("grads"), grads=lambda x: x.grads[:0]),
    case(
        "grads-non-contiguous",
        P2,
        ValueError,
        arg("grads"),
        grads=lambda x: x.grads.t().contiguous().t(),
    ),
    case(
        "grads-numel-not-plan-numel",
        P2,
        ValueError,
        rf"{arg('grads')}.*plan\.numel",
        grads=lambda x: x.grads[:, :-1].contiguous(),
    ),
    case(
        "grads-nan-check-finite",
        with_kw(P2, check_finite=True),
        ValueError,
        arg("grads"),
        grads=lambda x: poke(x.grads, NAN),
    ),
    case(
        "grads-inf-check-finite",
        with_kw(P2S, check_finite=True),
        ValueError,
        arg("grads"),
        grads=lambda x: poke(x.grads, -INF, index=N + 15),  # in the plainly summed gap
    ),
    # -- plan ----------------------------------------------------------------------------
    case("plan-list", P2, TypeError, arg("plan"), plan=lambda x: [(0, C, D)]),
    case("plan-none", P2S, TypeError, arg("plan"), plan=lambda x: None),
    # -- strength / top: exactly one -----------------------------------------------------
    case(
        "strength-and-top",
        lambda x: phase2(x.grads, x.plan, x.strength, top=x.top),
        ValueError,
        r"strength.*top",
    ),
    case(
        "neither-strength-nor-top", lambda x: phase2(x.grads, x.plan), ValueError, "strength.*top"
    ),
    # -- strength ------------------------------------------------------------------------
    case("strength-list", P2S, TypeError, arg("strength"), strength=lambda x: x.strength.tolist()),
    case("strength-int64", P2S, TypeError, arg("strength"), strength=lambda x: x.strength.long()),
    case(
        "strength-complex", P2S, TypeError, arg("strength"), strength=lambda x: x.strength.cfloat()
    ),
    case("strength-rank-1", P2S, ValueError, arg("strength"), strength=lambda x: x.strength[0]),
    case(
        "strength-T-rows-not-grads-T",
        P2S,
        ValueError,
        arg("strength"),
        strength=lambda x: torch.cat([x.strength, x.strength[:1]]),
    ),
    case(
        "strength-channels-not-plan",
        P2S,
        ValueError,
        arg("strength"),
        strength=lambda x: x.strength[:, :-1].contiguous(),
    ),
    case("strength-negative", P2S, ValueError, arg("strength"), strength=lambda x: -x.strength),
    case(
        "strength-nan", P2S, ValueError, arg("strength"), strength=lambda x: poke(x.strength, NAN)
    ),
    case(
        "strength-inf", P2S, ValueError, arg("strength"), strength=lambda x: poke(x.strength, INF)
    ),
    case("strength-on-meta", P2S, ValueError, arg("strength"), strength=lambda x: meta(x.strength)),
    # -- top -----------------------------------------------------------------------------
    case("top-list", P2, TypeError, arg("top"), top=lambda x: x.top.tolist()),
    case("top-float", P2, TypeError, arg("top"), top=lambda x: x.top.float()),
    case("top-bool", P2, TypeError, arg("top"), top=lambda x: x.top.bool()),
    case("top-complex", P2, TypeError, arg("top"), top=lambda x: x.top.cfloat()),
    case("top-negative", P2, ValueError, arg("top"), top=lambda x: x.top - 1),
    case("top-value-eq-T", P2, ValueError, arg("top"), top=lambda x: x.top + 1),
    case("top-value-gt-T", P2, ValueError, arg("top"), top=lambda x: x.top * 7),
    case("top-too-long", P2, ValueError, arg("top"), top=lambda x: torch.cat([x.top, x.top])),
    case("top-too-short", P2, ValueError, arg("top"), top=lambda x: x.top[:-1]),
    case("top-rank-2", P2, ValueError, arg("top"), top=lambda x: x.top[None]),
    case("top-on-meta", P2, ValueError, arg("top"), top=lambda x: meta(x.top)),
    # -- out -----------------------------------------------------------------------------
    case("out-list", P2, TypeError, arg("out"), out=lambda x: x.out.tolist()),
    case("out-float64", P2, TypeError, arg("out"), out=lambda x: x.out.double()),
    case("out-int64", P2S, TypeError, arg("out"), out=lambda x: x.out.long()),
    case("out-complex", P2, TypeError, arg("out"), out=lambda x: x.out.cfloat()),
    case("out-too-short", P2, ValueError, arg("out"), out=lambda x: x.out[:-1]),
    case("out-rank-2", P2, ValueError, arg("out"), out=lambda x: x.out[None]),
    case(
        "out-non-contiguous",
        P2,
        ValueError,
        arg("out"),
        out=lambda x: torch.full((2 * N,), 7.0)[::2],
    ),
    case("out-on-meta", P2, ValueError, arg("out"), out=lambda x: meta(x.out)),
    case("out-is-grads-row-0", P2, ValueError, arg("out"), out=lambda x: x.grads[0]),
    case("out-is-grads-row-1", P2S, ValueError, arg("out"), out=lambda x: x.grads[1]),
    case(
        "out-straddles-grads-rows",
        P2,
        ValueError,
        arg("out"),
        out=lambda x: x.grads.view(-1)[5 : 5 + N],
    ),
    # -- mode, uniform, backend ----------------------------------------------------------
    case("mode-unknown", with_kw(P2, mode="groups"), ValueError, arg("mode")),
    case("uniform-unknown", with_kw(P2, uniform="skip"), ValueError, arg("uniform")),
    case("backend-unknown", with_kw(P2, backend="tpu"), ValueError, arg("backend")),
    case("backend-unknown-strength", with_kw(P2S, backend="fast"), ValueError, arg("backend")),
    case(
        "backend-cpu-on-meta",
        with_kw(P2_NO_OUT, backend="cpu", check=False),
        ValueError,
        arg("backend"),
        **ALL_META,
    ),
    case(
        "backend-cpu-on-meta-strength",
        with_kw(P2S_NO_OUT, backend="cpu", check=False),
        ValueError,
        arg("backend"),
        **ALL_META,
    ),
]

PROJECT_LAYER_CASES = [
    case("layer-grads-list", PL, TypeError, arg("grads"), layer=lambda x: x.layer.tolist()),
    case("layer-grads-int32", PL, TypeError, arg("grads"), layer=lambda x: x.layer.int()),
    case("layer-grads-rank-1", PL, ValueError, arg("grads"), layer=lambda x: x.layer[0, 0]),
    case("layer-grads-T0", PL, ValueError, arg("grads"), layer=lambda x: x.layer[:0]),
    case("layer-grads-C0", PL, ValueError, arg("grads"), layer=lambda x: x.layer[:, :0]),
    case("layer-grads-D0", PL, ValueError, arg("grads"), layer=lambda x: x.layer[:, :, :0]),
    case(
        "layer-grads-non-contiguous",
        PL,
        ValueError,
        arg("grads"),
        layer=lambda x: x.layer.transpose(1, 2).contiguous().transpose(1, 2),
    ),
    case(
        "layer-grads-nan-check-finite",
        with_kw(PL, check_finite=True),
        ValueError,
        arg("grads"),
        layer=lambda x: poke(x.layer, NAN),
    ),
    case("layer-top-float", PL, TypeError, arg("top"), top=lambda x: x.top.double()),
    case("layer-top-bool", PL, TypeError, arg("top"), top=lambda x: x.top.bool()),
    case("layer-top-negative", PL, ValueError, arg("top"), top=lambda x: x.top - 2),
    case("layer-top-value-eq-T", PL, ValueError, arg("top"), top=lambda x: torch.full((C,), T)),
    case("layer-top-wrong-length", PL, ValueError, arg("top"), top=lambda x: x.top[:2]),
    case("layer-top-on-meta", PL, ValueError, arg("top"), top=lambda x: meta(x.top)),
    case("layer-mode-unknown", with_kw(PL, mode="row"), ValueError, arg("mode")),
    case("layer-uniform-unknown", with_kw(PL, uniform="Sum"), ValueError, arg("uniform")),
    case("layer-backend-unknown", with_kw(PL, backend="gpu"), ValueError, arg("backend")),
    case(
        "layer-backend-cpu-on-meta",
        with_kw(PL, backend="cpu", check=False),
        ValueError,
        arg("backend"),
        **ALL_META,
    ),
]

STRENGTH_CASES = [
    # -- channel_strength ----------------------------------------------------------------
    case(
        "cs-scale-channels-not-weight-dim0",
        CS,
        ValueError,
        arg("scale"),
        scale=lambda x: torch.ones(T, C + 1),
    ),
    case("cs-scale-rank-1", CS, ValueError, arg("scale"), scale=lambda x: x.scale[0]),
    case("cs-scale-rank-3", CS, ValueError, arg("scale"), scale=lambda x: x.scale[..., None]),
    case("cs-scale-int64", CS, TypeError, arg("scale"), scale=lambda x: x.scale.long()),
    case("cs-scale-on-meta", CS, ValueError, arg("scale"), scale=lambda x: meta(x.scale)),
    case("cs-weight-rank-0", CS, ValueError, arg("weight"), weight=lambda x: x.weight[0, 0]),
    case("cs-weight-C0", CS, ValueError, arg("weight"), weight=lambda x: x.weight[:0]),
    case("cs-weight-int64", CS, TypeError, arg("weight"), weight=lambda x: x.weight.long()),
    case("cs-weight-complex", CS, TypeError, arg("weight"), weight=lambda x: x.weight.cfloat()),
    case("cs-weight-ndarray", CS, TypeError, arg("weight"), weight=lambda x: x.weight.numpy()),
    case("cs-backend-unknown", with_kw(CS, backend="cpp"), ValueError, arg("backend")),
    case(
        "cs-backend-cpu-on-meta",
        with_kw(CS, backend="cpu"),
        ValueError,
        arg("backend"),
        **ALL_META,
    ),
    # -- batchnorm_scale -----------------------------------------------------------------
    case(
        "bn-both-none",
        lambda x: batchnorm_scale(None, None),
        ValueError,
        rf"{arg('weight')}.*{arg('running_var')}",
    ),
    case("bn-var-shape", BN, ValueError, arg("running_var"), var=lambda x: torch.ones(T, C + 1)),
    case("bn-var-tasks", BN, ValueError, arg("running_var"), var=lambda x: torch.ones(T + 1, C)),
    case("bn-var-negative", BN, ValueError, arg("running_var"), var=lambda x: poke(x.var, -0.5)),
    case("bn-var-nan", BN, ValueError, arg("running_var"), var=lambda x: poke(x.var, NAN)),
    case("bn-var-rank-1", BN, ValueError, arg("running_var"), var=lambda x: x.var[0]),
    case("bn-var-on-meta", BN, ValueError, arg("running_var"), var=lambda x: meta(x.var)),
    case("bn-weight-int64", BN, TypeError, arg("weight"), gamma=lambda x: x.gamma.long()),
    case("bn-weight-rank-3", BN, ValueError, arg("weight"), gamma=lambda x: x.gamma[None]),
    case("bn-weight-int", BN, TypeError, arg("weight"), gamma=lambda x: 3),
    case("bn-weight-empty-list", BN, TypeError, arg("weight"), gamma=lambda x: []),
    case(
        "bn-weight-list-of-floats",
        BN,
        TypeError,
        arg("weight"),
        gamma=lambda x: x.gamma[0].tolist(),
    ),
    case(
        "bn-weight-list-ragged",
        BN,
        ValueError,
        arg("weight"),
        gamma=lambda x: [x.gamma[0], x.gamma[1, :-1]],
    ),
    case("bn-eps-negative", BN, ValueError, arg("eps"), eps=lambda x: -1e-5),
    case("bn-eps-nan", BN, ValueError, arg("eps"), eps=lambda x: NAN),
    case("bn-eps-str", BN, TypeError, arg("eps"), eps=lambda x: "1e-5"),
    # -- top_priority --------------------------------------------------------------------
    case("tp-strength-list", TP, TypeError, arg("strength"), strength=lambda x: [[1.0, 2.0]]),
    case("tp-strength-int64", TP, TypeError, arg("strength"), strength=lambda x: x.strength.long()),
    case("tp-strength-bool", TP, TypeError, arg("strength"), strength=lambda x: x.strength > 0),
    case("tp-strength-rank-1", TP, ValueError, arg("strength"), strength=lambda x: x.strength[0]),
    case(
        "tp-strength-rank-3",
        TP,
        ValueError,
        arg("strength"),
        strength=lambda x: x.strength[None],
    ),
    case("tp-strength-T0", TP, ValueError, arg("strength"), strength=lambda x: x.strength[:0]),
    case(
        "tp-strength-negative",
        TP,
        ValueError,
        arg("strength"),
        strength=lambda x: poke(x.strength, -1.0),
    ),
    case(
        "tp-strength-nan", TP, ValueError, arg("strength"), strength=lambda x: poke(x.strength, NAN)
    ),
    case(
        "tp-strength-inf", TP, ValueError, arg("strength"), strength=lambda x: poke(x.strength, INF)
    ),
    case("tp-backend-unknown", with_kw(TP, backend="Torch"), ValueError, arg("backend")),
    case(
        "tp-backend-cpu-on-meta",
        with_kw(TP, backend="cpu", check=False),
        ValueError,
        arg("backend"),
        **ALL_META,
    ),
    # -- plan_top_priority ---------------------------------------------------------------
    case(
        "ptp-strength-channels-not-plan",
        PTP,
        ValueError,
        arg("strength"),
        strength=lambda x: torch.ones(T, C + 1),
    ),
    case("ptp-plan-tuple", PTP, TypeError, arg("plan"), plan=lambda x: ((0, C, D),)),
    case("ptp-strength-T0", PTP, ValueError, arg("strength"), strength=lambda x: x.strength[:0]),
    case(
        "ptp-strength-nan",
        PTP,
        ValueError,
        arg("strength"),
        strength=lambda x: poke(x.strength, NAN),
    ),
    case("ptp-strength-negative", PTP, ValueError, arg("strength"), strength=lambda x: -x.strength),
    case(
        "ptp-strength-int32", PTP, TypeError, arg("strength"), strength=lambda x: x.strength.int()
    ),
    case("ptp-backend-unknown", with_kw(PTP, backend=""), ValueError, arg("backend")),
]

TENSOR_CASES = PHASE2_CASES + PROJECT_LAYER_CASES + STRENGTH_CASES


@pytest.mark.parametrize("case", TENSOR_CASES)
def test_bad_tensor_input_is_rejected(case: Case) -> None:
    x = case.inputs()
    with pytest.raises(case.exc, match=case.match):
        case.call(x)


# -- Phase2Plan(layers, numel) -------------------------------------------------------------
PLAN_CASES = [
    # (id, layers, numel, exception, match)
    ("layers-overlap", [(0, 2, 2), (2, 1, 2)], 8, ValueError, r"layers\[1\].*overlap"),
    ("layers-overlap-out-of-order", [(2, 1, 2), (0, 2, 2)], 8, ValueError, r"layers\[0\]"),
    ("layers-duplicate", [(0, 2, 2), (0, 2, 2)], 8, ValueError, r"layers\[1\]"),
    ("layer-past-numel", [(4, 2, 3)], 8, ValueError, r"layers\[0\].*numel"),
    ("layer-channels-zero", [(0, 0, 4)], 8, ValueError, r"layers\[0\]\.channels"),
    ("layer-channels-negative", [(0, -2, 4)], 8, ValueError, r"layers\[0\]\.channels"),
    ("layer-row-length-zero", [(0, 2, 0)], 8, ValueError, r"layers\[0\]\.row_length"),
    ("layer-row-length-negative", [(0, 2, -4)], 8, ValueError, r"layers\[0\]\.row_length"),
    ("layer-offset-negative", [(0, 1, 2), (-2, 1, 2)], 8, ValueError, r"layers\[1\]\.offset"),
    ("layer-offset-float", [(0.0, 2, 4)], 8, TypeError, r"layers\[0\]\.offset"),
    ("layer-channels-float", [(0, 2.0, 4)], 8, TypeError, r"layers\[0\]\.channels"),
    ("layer-channels-bool", [(0, True, 4)], 8, TypeError, r"layers\[0\]\.channels"),
    ("layer-row-length-bool", [(0, 2, True)], 8, TypeError, r"layers\[0\]\.row_length"),
    ("layer-row-length-tensor", [(0, 2, torch.tensor(4))], 8, TypeError, r"layers\[0\]\.row"),
    ("layer-pair", [(0, 2)], 8, TypeError, r"layers\[0\]"),
    ("layer-quadruple", [(0, 2, 4, 0)], 8, TypeError, r"layers\[0\]"),
    ("layer-int", [(0, 2, 2), 5], 8, TypeError, r"layers\[1\]"),
    ("layers-none", None, 8, TypeError, arg("layers")),
    ("layers-int", 3, 8, TypeError, arg("layers")),
    ("layers-str", "0,2,4", 8, TypeError, arg("layers")),
    ("layers-generator", ((0, 2, 4) for _ in range(1)), 8, TypeError, arg("layers")),
    ("layers-set", {(0, 2, 4)}, 8, TypeError, arg("layers")),
    ("numel-negative", [], -1, ValueError, arg("numel")),
    ("numel-float", [(0, 2, 4)], 8.0, TypeError, arg("numel")),
    ("numel-bool", [], True, TypeError, arg("numel")),
    ("numel-none", [], None, TypeError, arg("numel")),
]


@pytest.mark.parametrize(
    ("layers", "numel", "exc", "match"),
    [pytest.param(*row[1:], id=row[0]) for row in PLAN_CASES],
)
def test_bad_plan_is_rejected(layers: Any, numel: Any, exc: type[Exception], match: str) -> None:
    with pytest.raises(exc, match=match):
        Phase2Plan(layers, numel)


# -- Phase2Plan.from_shapes(shapes, connected) ---------------------------------------------
FROM_SHAPES_CASES = [
    # (id, shapes, connected, exception, match): the message must name `shapes`, not the
    # internal Phase2Plan arguments it is turned into.
    ("connected-too-long", [(2, 3)], [True, False], ValueError, arg("connected")),
    ("connected-too-short", [(2, 3), (4,)], [True], ValueError, arg("connected")),
    ("shape-zero-size-connected", [(0, 3)], None, ValueError, arg("shapes")),
    ("shape-scalar-connected", [()], [True], ValueError, arg("shapes")),
    ("shape-negative-dim", [(4,), (-2, 3)], None, ValueError, arg("shapes")),
    ("shape-negative-dim-unconnected", [(2, -3)], [False], ValueError, arg("shapes")),
    ("shape-float-dim", [(2.5, 4)], None, TypeError, arg("shapes")),
    ("shape-bool-dim", [(True, 4)], None, TypeError, arg("shapes")),
    ("shape-not-a-sequence", [(2, 3), 5], None, TypeError, arg("shapes")),
    ("shapes-not-a-sequence", 5, None, TypeError, arg("shapes")),
]


@pytest.mark.parametrize(
    ("shapes", "connected", "exc", "match"),
    [pytest.param(*row[1:], id=row[0]) for row in FROM_SHAPES_CASES],
)
def test_bad_shapes_are_rejected(
    shapes: Any, connected: Any, exc: type[Exception], match: str
) -> None:
    with pytest.raises(exc, match=match):
        Phase2Plan.from_shapes(shapes, connected)


# -- the table's premise: the untouched inputs are valid -----------------------------------
@pytest.mark.parametrize("call", [P2, P2S, PL, CS, BN, TP, PTP])
def test_valid_inputs_are_accepted(call: Callable[[Inputs], object]) -> None:
    """Each call of the tables succeeds on the valid inputs, so each case fails for its row's
    reason only."""
    call(make_inputs())
    Phase2Plan([(0, C, D)], N)
    Phase2Plan.from_shapes([(C, D), (8,)])


# -- env override and backends ----------------------------------------------------------
ENV_CALLS = [
    pytest.param(P2_NO_OUT, id="phase2-top"),
    pytest.param(P2S_NO_OUT, id="phase2-strength"),
    pytest.param(PL, id="project_layer"),
    pytest.param(CS, id="channel_strength"),
    pytest.param(TP, id="top_priority"),
    pytest.param(PTP, id="plan_top_priority"),
]


@pytest.mark.parametrize("call", ENV_CALLS)
def test_env_override_with_unknown_backend_is_rejected(
    monkeypatch: pytest.MonkeyPatch, call: Callable[[Inputs], object]
) -> None:
    monkeypatch.setenv(ENV_VAR, "no-such-backend")
    with pytest.raises(ValueError, match=ENV_VAR):
        call(make_inputs())


@pytest.mark.parametrize("call", ENV_CALLS)
def test_env_override_naming_a_backend_that_cannot_run_is_rejected(
    monkeypatch: pytest.MonkeyPatch, call: Callable[..., object]
) -> None:
    monkeypatch.setenv(ENV_VAR, "cpu")
    x = make_inputs()
    for name, build in ALL_META.items():
        setattr(x, name, build(x))
    kw = {} if call is CS else {"check": False}  # value checks cannot read meta tensors
    with pytest.raises(ValueError, match=ENV_VAR):
        call(x, **kw)


def test_out_on_meta_is_not_mistaken_for_memory_shared_with_grads() -> None:
    """Meta tensors have no storage (``data_ptr() == 0`` for all of them), so ``out`` and
    ``grads`` on meta cannot overlap; the same call without ``out`` succeeds."""
    x = make_inputs()
    grads, top, out = meta(x.grads), meta(x.top), meta(x.out)
    assert phase2(grads, x.plan, top=top, check=False).shape == (N,)
    assert phase2(grads, x.plan, top=top, out=out, check=False) is out


def test_env_override_does_not_apply_to_an_explicit_backend(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(ENV_VAR, "no-such-backend")
    x = make_inputs()
    assert P2(x, backend="torch") is x.out


# -- check=False / check_finite=False skip the value checks ---------------------------------
@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("value", [NAN, INF, -INF], ids=["nan", "inf", "-inf"])
def test_non_finite_grads_pass_without_check_finite(backend: str, value: float) -> None:
    x = make_inputs()
    grads = poke(x.grads, value)
    result = phase2(grads, x.plan, top=x.top, backend=backend)  # check_finite=False default
    assert result.shape == (N,)
    layer = poke(x.layer, value)
    assert project_layer(layer, x.top, backend=backend, check_finite=False).shape == (C, D)


def test_check_false_skips_the_strength_value_checks() -> None:
    x = make_inputs()
    assert top_priority(-x.strength, check=False).shape == (C,)


@pytest.mark.skipif("cpu" not in BACKENDS_HERE, reason="the compiled cpu backend is not built")
def test_cpu_backend_survives_out_of_range_top_with_check_false() -> None:
    """check=False skips the *Python* range check of ``top``, but an out-of-range task index
    must still not read or write outside the buffers (the C++ kernel indexes
    ``grads + top * N`` and ``group_dots + top * T`` with it), so the C++ op checks it too.
    Run in a child process, so that a regression shows as a crash, not a dead test run."""
    code = textwrap.dedent(
        """
        import torch
        from cs_kernels import Phase2Plan, phase2
        grads = torch.randn(2, 12)
        plan = Phase2Plan([(0, 3, 4)], 12)
        top = torch.tensor([0, 1, 1 << 40])
        try:
            phase2(grads, plan, top=top, check=False, backend="cpu")
        except (ValueError, RuntimeError) as exc:
            print("raised", type(exc).__name__, exc)
        else:
            print("returned")
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, f"child died with {proc.returncode}: {proc.stderr[-2000:]}"
    assert proc.stdout.startswith("raised"), proc.stdout
    assert "top" in proc.stdout


# -- nothing the caller owns is modified --------------------------------------------------
def _identical(a: Tensor, b: Tensor) -> bool:
    """Same dtype, shape and values (NaN equal to NaN); meta tensors hold no values."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.device.type == "meta":
        return True
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())


def _snapshot(x: Inputs) -> dict[str, Tensor]:
    return {name: v.clone() for name, v in vars(x).items() if isinstance(v, Tensor)}


def _assert_unchanged(x: Inputs, before: Mapping[str, Tensor]) -> None:
    for name, snapshot in before.items():
        assert _identical(getattr(x, name), snapshot), f"{name} was modified"


# Failing calls that get furthest before they fail: value checks, late shape checks, the
# backend resolution, and `out` given alongside.
UNCHANGED_IDS = {
    "grads-nan-check-finite",
    "grads-inf-check-finite",
    "strength-channels-not-plan",
    "strength-negative",
    "strength-nan",
    "top-value-eq-T",
    "top-negative",
    "out-is-grads-row-0",
    "out-is-grads-row-1",
    "out-straddles-grads-rows",
    "backend-unknown",
    "backend-unknown-strength",
    "layer-grads-nan-check-finite",
    "layer-top-value-eq-T",
    "layer-backend-unknown",
    "bn-var-negative",
    "tp-strength-nan",
    "ptp-strength-channels-not-plan",
}
UNCHANGED_CASES = [p for p in TENSOR_CASES if p.id in UNCHANGED_IDS]
assert len(UNCHANGED_CASES) == len(UNCHANGED_IDS)


@pytest.mark.parametrize("case", UNCHANGED_CASES)
def test_rejected_call_leaves_caller_tensors_unchanged(case: Case) -> None:
    x = case.inputs()
    before = _snapshot(x)
    with pytest.raises(case.exc):
        case.call(x)
    _assert_unchanged(x, before)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("mode", ["group", "channel"])
@pytest.mark.parametrize("uniform", ["sum", "project"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_successful_calls_write_only_out(
    backend: str, mode: str, uniform: str, dtype: torch.dtype
) -> None:
    x = make_inputs()
    for name in ("grads", "layer", "strength", "out"):
        setattr(x, name, getattr(x, name).to(dtype))
    before = _snapshot(x)
    del before["out"]
    kw: dict[str, Any] = {"mode": mode, "uniform": uniform, "backend": backend}

    result = phase2(x.grads, x.plan, top=x.top, out=x.out, **kw)
    assert result is x.out
    plain = x.grads.sum(dim=0)
    # The conflict in the inputs makes the projection change the layer's combined gradient.
    assert not torch.allclose(x.out[: C * D], plain[: C * D])
    torch.testing.assert_close(x.out[C * D :], plain[C * D :])

    combined, projected = phase2(x.grads, x.plan, x.strength, per_task=True, **kw)
    torch.testing.assert_close(projected.sum(dim=0), combined)
    combined, projected = project_layer(x.layer, x.top, per_task=True, **kw)
    torch.testing.assert_close(combined, result[: C * D].view(C, D))
    plan_top_priority(x.strength, x.plan, backend=backend)
    top_priority(x.strength, backend=backend)
    channel_strength(x.weight, x.scale, backend=backend)
    batchnorm_scale(x.gamma, x.var)
    batchnorm_scale(list(x.gamma), None)

    _assert_unchanged(x, before)
