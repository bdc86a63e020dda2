"""``token_pool``: average over tokens (docs/integer-spec.md section 9.4).

Everything about this op type except its golden function (``reference.golden``) lives here:
its schema, its export from calibration state, its fake-quant forward, its engine builder and
its cost figures.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from intsim.kernels.numeric import MAX_SHIFT
from intsim.kernels.window import token_pool_kernel
from intsim.program.fixedpoint import check_mult_shift
from intsim.program.program import Program, ProgramError

from .base import EngineOp, int_attr, ints
from .base import check_out_range

NAME = "token_pool"
SPEC = "9.4"
INPUTS = 1
ATTRS = ('mult', 'shift', 'zp', 'lo', 'hi')
# tensor name -> (dtype, shape symbols); the symbols are listed in intsim.ops.base.SHAPE_SYMBOLS
TENSORS = {}
# tensors read only by the fake-quant reference
FLOAT = {}


# ---- export: calibration state -> program attrs and tensors (called by calib) ----------------
def export(b, name: str, x: str) -> None:
    """Append the ``token_pool`` op ``name`` (section 9.4): the mean of the T tokens of ``x``,
    requantized by ``s_x / (T s_y)`` into the declared output codes."""
    T = b.values[x]["shape"][0]
    m, n = b.mult_shift(name, b.sc(x) / (T * b.sc(name)))
    lo, hi = b.out_range(name)
    b.op(name, NAME, [x], {"mult": m, "shift": n, "zp": b.zp(name), "lo": lo, "hi": hi}, {})


def check_bounds(prog, op) -> None:
    """Section 8 on a ``token_pool`` op: its multiplier and shift, zero point and output clamp within
    the output value's width."""
    check_mult_shift(op["name"], op["attrs"]["mult"], op["attrs"]["shift"], prog.settings["mult_bits"])
    check_out_range(prog, op, zp=True)


# ---- fake-quant forward: the paper's semantics in float (called by reference.fakequant) -------
# ``ctx`` is a reference.fakequant.FakeQuantContext (program, dtype, eps, params, ``ctx.F`` = the float
# functions of reference.functional); the model quantize-dequantizes the output value after the op.

def fq_forward(ctx, op, x):
    """Float mean over the tokens: (B, T, C) -> (B, 1, C)."""
    return ctx.F.token_pool(x)


# ---- engine: route choice, exactness proof, kernel call (called by intsim.engine) -------------
class TokenPoolEngine(EngineOp):
    """Spec 9.4 on the engine: the token sum, requantized (``intsim.kernels.window.token_pool_kernel``)."""

    def __init__(self, program: Program, op: dict[str, Any], gemm: str = "auto",
                 ranges: list[tuple[int, int] | None] | None = None, f32_max_k: int | None = None):
        super().__init__(program, op, gemm, ranges, f32_max_k)
        name = self.name
        at = op["attrs"]
        a = lambda n: int_attr(at[n], f"op '{name}' attribute '{n}'")  # noqa: E731
        self.mult, self.shift, self.zp, self.lo, self.hi = a("mult"), a("shift"), a("zp"), a("lo"), a("hi")
        if not 0 <= self.shift <= MAX_SHIFT:
            raise ProgramError(f"op '{name}': shift outside 0..{MAX_SHIFT}")

    def forward(self, x):
        (x,) = ints(x)
        if x.ndim != 3:
            raise ValueError(f"op '{self.name}': input (B, T, C) expected, got {x.shape}")
        y = np.empty((x.shape[0], 1, x.shape[2]), np.int64)
        na, no = token_pool_kernel(x, self.mult, self.shift, self.zp, self.lo, self.hi, self.acc_lo, self.acc_hi, y)
        return y, {"acc": int(na), "out": int(no), "prob": 0}


ENGINE = TokenPoolEngine


# ---- cost figures: MACs, bit operations, storage (called by intsim.studies.cost) -------------
def cost(prog: Program, op: dict[str, Any], c: dict[str, Any]) -> None:
    """No MACs, weights or tables (the cost model counts GEMMs and stored constants)."""


def scratch_bits(prog: Program, op: dict[str, Any]) -> int:
    return 0


# ---- onnx lowering: the op as standard ONNX nodes (called by intsim.onnx_export) -------------
def lower_onnx(g, op: dict[str, Any], prog: Program, inputs: list[str]) -> str:
    """9.4: y = sat(rq(accsat(sum_t x[t]), mult, shift) + zp, lo, hi) (ReduceSum over tokens, kept)."""
    (x,) = inputs
    at = op["attrs"]
    S = g.accsat(g.reduce("ReduceSum", x, 1), prog.settings["acc_bits"])
    return g.sat(g.add(g.rq(S, int(at["mult"]), int(at["shift"]), amax=2 ** (prog.settings["acc_bits"] - 1)), g.i64(int(at["zp"]))), at["lo"], at["hi"])
