"""Every triton kernel compiles for real GPUs, ahead of time, without a GPU.

The interpreter forgives what the compiler does not (types of loop-carried values, constexpr
misuse, int64/pointer casts, layouts), so each kernel is compiled here to a cubin for
Hopper (sm_90) and Ampere (sm_80) with the ptxas triton ships: ``triton.compile`` on an
``ASTSource`` with an explicit signature. Skipped only where that toolchain cannot run, or
where the kernels are interpreted (``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

from typing import Any

import pytest

try:
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from cs_kernels.triton_kernels import phase2, strength, tuning
except Exception as exc:  # triton missing or broken
    pytest.skip(f"triton does not import: {exc}", allow_module_level=True)

if tuning.INTERPRETED:
    pytest.skip("kernels are interpreted (TRITON_INTERPRET=1)", allow_module_level=True)

ACC = {"fp32": tl.float32, "bf16": tl.float32, "fp16": tl.float32, "fp64": tl.float64}
VEC = {"fp32": 4, "bf16": 8, "fp16": 8, "fp64": 2}


def _acc(dtype: str) -> str:
    return "fp64" if dtype == "fp64" else "fp32"


def compile_kernel(fn: Any, types: dict[str, str], constexprs: dict[str, Any], arch: int,
                   num_warps: int) -> Any:  # fmt: skip
    """Compile ``fn`` for ``sm_<arch>``: ``types`` names every runtime argument's type."""
    signature = {name: "constexpr" if name in constexprs else types[name] for name in fn.arg_names}
    source = ASTSource(fn, signature, constexprs=constexprs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": num_warps, "enable_fp_fusion": False})  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def _toolchain() -> None:
    """Skip the module when the compiler itself cannot run here (not when a kernel fails)."""

    @triton.jit
    def probe(x_ptr, BLOCK: tl.constexpr):  # type: ignore[no-untyped-def]
        tl.store(x_ptr + tl.arange(0, BLOCK), tl.zeros([BLOCK], tl.float32))

    try:
        compile_kernel(probe, {"x_ptr": "*fp32"}, {"BLOCK": 32}, 90, 1)
    except Exception as exc:  # no ptxas, unsupported host, ...
        pytest.skip(f"triton cannot compile for sm_90 here: {type(exc).__name__}: {exc}")


def _pass1(dtype: str) -> dict[str, str]:
    return {
        **{name: f"*{dtype}" for name in ("grads_ptr", "out_ptr", "proj_ptr")},
        **{name: "*i64" for name in ("top_ptr", "items_ptr", "layers_ptr")},
        "dots_ptr": f"*{_acc(dtype)}",
        **{name: "i32" for name in ("stride", "num_tasks", "per_task", "project_uniform")},
    }


def _pass2(dtype: str) -> dict[str, str]:
    return {
        **{name: f"*{dtype}" for name in ("grads_ptr", "out_ptr", "proj_ptr")},
        **{name: "*i64" for name in ("top_ptr", "items_ptr")},
        "coef_ptr": f"*{_acc(dtype)}",
        "stride": "i64",  # T * N past 2**31
        **{name: "i32" for name in ("num_tasks", "per_task")},
    }


def _tiles(dtype: str) -> dict[str, Any]:
    """The heuristic GPU configuration of this dtype (`tuning.phase2_candidates`)."""
    subrows = 32 if dtype == "fp64" else 64
    return {"SUB": subrows, "WIDTH": 64, "VEC": VEC[dtype], "ACC": ACC[dtype],
            "EXACT": dtype in ("fp32", "fp64")}  # fmt: skip


CASES = [
    # (id, kernel, types, constexprs, arch, warps)
    ("pass1-channel-fp32-sm90", "pass1", _pass1("fp32"),
     {**_tiles("fp32"), "TB": 4, "GROUP": False, "UNIFORM_BLOCK": 1024}, 90, 16),
    ("pass1-group-bf16-sm90", "pass1", _pass1("bf16"),
     {**_tiles("bf16"), "TB": 32, "GROUP": True, "UNIFORM_BLOCK": 1024}, 90, 16),
    ("pass1-channel-fp64-sm90", "pass1", _pass1("fp64"),
     {**_tiles("fp64"), "TB": 2, "GROUP": False, "UNIFORM_BLOCK": 1024}, 90, 16),
    ("pass1-group-fp16-sm80", "pass1", _pass1("fp16"),
     {**_tiles("fp16"), "TB": 8, "GROUP": True, "UNIFORM_BLOCK": 1024}, 80, 8),
    ("pass2-fp32-sm90", "pass2", _pass2("fp32"), {**_tiles("fp32"), "TB": 4}, 90, 16),
    ("pass2-bf16-sm80", "pass2", _pass2("bf16"), {**_tiles("bf16"), "TB": 16}, 80, 16),
    ("group-fp32-sm90", "group",
     {"top_ptr": "*i64", "layers_ptr": "*i64", "dots_ptr": "*fp32", "coef_ptr": "*fp32",
      "num_tasks": "i32", "project_uniform": "i32"},
     {"TB": 32, "BLOCK": 128, "ACC": tl.float32}, 90, 4),
    ("group-fp64-sm80", "group",
     {"top_ptr": "*i64", "layers_ptr": "*i64", "dots_ptr": "*fp64", "coef_ptr": "*fp64",
      "num_tasks": "i32", "project_uniform": "i32"},
     {"TB": 4, "BLOCK": 128, "ACC": tl.float64}, 80, 4),
    ("strength-fused-fp32-sm90", "strength",
     {"addresses_ptr": "*i64", "anchor_ptr": "*fp32", "items_ptr": "*i64", "layers_ptr": "*i64",
      "counts_ptr": "*i32", "arrived_ptr": "*i32", "norms_ptr": "*fp32", "scales_ptr": "*fp32",
      "top_ptr": "*i64", "channels_total": "i32", "num_tasks": "i32"},
     {"SUB": 32, "WIDTH": 64, "TB": 4, "BLOCK": 128, "FUSED": True, "ACC": tl.float32}, 90, 8),
    ("strength-norms-bf16-sm80", "strength",
     {"addresses_ptr": "*i64", "anchor_ptr": "*bf16", "items_ptr": "*i64", "layers_ptr": "*i64",
      "counts_ptr": "*i32", "arrived_ptr": "*i32", "norms_ptr": "*fp32", "scales_ptr": "*fp32",
      "top_ptr": "*i64", "channels_total": "i32", "num_tasks": "i32"},
     {"SUB": 32, "WIDTH": 64, "TB": 1, "BLOCK": 128, "FUSED": False, "ACC": tl.float32}, 80, 8),
    ("strength-fused-fp64-sm90", "strength",
     {"addresses_ptr": "*i64", "anchor_ptr": "*fp64", "items_ptr": "*i64", "layers_ptr": "*i64",
      "counts_ptr": "*i32", "arrived_ptr": "*i32", "norms_ptr": "*fp64", "scales_ptr": "*fp64",
      "top_ptr": "*i64", "channels_total": "i32", "num_tasks": "i32"},
     {"SUB": 32, "WIDTH": 64, "TB": 32, "BLOCK": 128, "FUSED": True, "ACC": tl.float64}, 90, 8),
    ("priority-fp64-sm90", "priority",
     {"strength_ptr": "*fp64", "layers_ptr": "*i64", "top_ptr": "*i64",
      "channels_total": "i32", "num_tasks": "i32"},
     {"TB": 8, "BLOCK": 128}, 90, 4),
]  # fmt: skip

KERNELS = {
    "pass1": phase2.pass1_kernel,
    "pass2": phase2.pass2_kernel,
    "group": phase2.group_kernel,
    "strength": strength.strength_kernel,
    "priority": strength.priority_kernel,
}


@pytest.mark.parametrize(
    ("kernel", "types", "constexprs", "arch", "warps"),
    [pytest.param(*case[1:], id=case[0]) for case in CASES],
)
def test_kernel_compiles_to_a_cubin(
    kernel: str, types: dict[str, str], constexprs: dict[str, Any], arch: int, warps: int
) -> None:
    compiled = compile_kernel(KERNELS[kernel], types, constexprs, arch, warps)
    assert compiled.asm["cubin"], "no cubin"
    assert f"sm_{arch}" in compiled.asm["ptx"]


def test_every_kernel_is_compiled() -> None:
    """A new kernel must join CASES: every ``@triton.jit`` launch target is listed."""
    launched = {
        name
        for module in (phase2, strength)
        for name, value in vars(module).items()
        if name.endswith("_kernel") and isinstance(value, triton.runtime.JITFunction)
    }
    assert launched == {kernel.__name__ for kernel in KERNELS.values()}
    assert {case[1] for case in CASES} == set(KERNELS)
