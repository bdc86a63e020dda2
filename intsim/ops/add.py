"""``add``: residual addition (docs/integer-spec.md section 4.6).

Everything about this op type except its golden function (``reference.golden``) lives here:
its schema, its export from calibration state, its fake-quant forward, its engine builder and
its cost figures.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from intsim.kernels.epilogues import add_requant
from intsim.kernels.numeric import narrow_ok, rq_offsets
from intsim.program.fixedpoint import check_mult_shift
from intsim.program.program import Program

from .base import WIDE, EngineOp, as_int_input, check_shifts
from .base import check_out_range, check_shape

NAME = "add"
SPEC = "4.6"
INPUTS = 2
ATTRS = ('mult', 'shift', 'lo', 'hi')
# tensor name -> (dtype, shape symbols); the symbols are listed in intsim.ops.base.SHAPE_SYMBOLS
TENSORS = {}
# tensors read only by the fake-quant reference
FLOAT = {}


# ---- export: calibration state -> program attrs and tensors (called by calib) ----------------
def export(b, name: str, a: str, skip: str) -> None:
    """Append the ``add`` op ``name`` (section 4.6): ``y = sat(a + rq(skip, s_skip / s_y))``; the
    output value (on the scale of ``a``) must be declared."""
    m, n = b.mult_shift(name, b.sc(skip) / b.sc(name))
    lo, hi = b.out_range(name)
    b.op(name, NAME, [a, skip], {"mult": m, "shift": n, "lo": lo, "hi": hi}, {})


def check_bounds(prog, op) -> None:
    """Section 8 on an ``add`` op: its multiplier and shift, the output clamp within the output
    value's width, both inputs and the output of one shape."""
    check_mult_shift(op["name"], op["attrs"]["mult"], op["attrs"]["shift"], prog.settings["mult_bits"])
    check_out_range(prog, op)
    shape = prog.values[op["inputs"][0]]["shape"]
    for v in (op["inputs"][1], op["output"]):
        check_shape(prog, op, v, shape, "the first input's shape")


# ---- fake-quant forward: the paper's semantics in float (called by reference.fakequant) -------
# ``ctx`` is a reference.fakequant.FakeQuantContext (program, dtype, eps, params, ``ctx.F`` = the float
# functions of reference.functional); the model quantize-dequantizes the output value after the op.

def fq_forward(ctx, op, a, b):
    """Float residual add."""
    return ctx.F.add(a, b)


# ---- engine: route choice, exactness proof, kernel call (called by intsim.engine) -------------
class AddEngine(EngineOp):
    """Spec 4.6 on the engine: ``sat(a + rq(skip, mult, shift), lo, hi)`` elementwise
    (``epilogues.add_requant``); the fused ``linear -> add`` epilogue reads ``add_off``,
    ``add_corr`` and ``add_narrow`` (the offset form, proven from the skip's range)."""

    def __init__(self, program: Program, op: dict[str, Any], gemm: str = "auto",
                 ranges: list[tuple[int, int] | None] | None = None, f32_max_k: int | None = None):
        super().__init__(program, op, gemm, ranges, f32_max_k)
        self.mult, self.shift_ = self.a("mult"), self.a("shift")
        self.lo, self.hi = self.a("lo"), self.a("hi")
        check_shifts(self.name, np.array([self.shift_]))
        a_off, a_corr = rq_offsets(np.array([self.shift_]))
        self.add_off, self.add_corr = int(a_off[0]), int(a_corr[0])
        sr = self.ranges[1]           # the skip's proven range decides the offset form's exactness
        self.add_narrow = narrow_ok(sr[0], sr[1], np.array([self.mult]), np.array([self.shift_])) if sr else 0

    def forward(self, a: np.ndarray, skip: np.ndarray) -> tuple[np.ndarray, dict[str, int]]:
        a = as_int_input(a, self.name)
        skip = as_int_input(skip, self.name)
        if a.shape != skip.shape:
            raise ValueError(f"op '{self.name}': a {a.shape} and skip {skip.shape} differ in shape")
        cols = a.shape[-1] if a.ndim and a.shape[-1] else 1
        y, no = add_requant(a.reshape(-1), skip.reshape(-1), self.mult, self.shift_, self.lo, self.hi, cols)
        return y.reshape(a.shape), {"acc": 0, "out": int(no), "prob": 0}


ENGINE = AddEngine


# ---- cost figures: MACs, bit operations, storage (called by intsim.studies.cost) -------------
def cost(prog: Program, op: dict[str, Any], c: dict[str, Any]) -> None:
    """No MACs; the requantized skip needs ``residual_bits + mult_bits``."""
    c["datapath_bits"] = prog.settings["residual_bits"] + prog.settings["mult_bits"]


def scratch_bits(prog: Program, op: dict[str, Any]) -> int:
    return 0


# ---- test vectors: the arrays a hardware testbench checks (called by intsim.studies.vectors) ---

#: the op's inputs by role, in input order
VECTOR_ROLES = ("a", "skip")


def vector_arrays(program: Program, op: dict[str, Any], steps: dict[str, np.ndarray]) -> list[tuple]:
    """The arrays of a test vector of this op beyond its inputs, attributes and output (``intsim vectors``)."""
    out: list = []
    out.append(("skip_rq", steps["skip_rq"], WIDE, True, "intermediate", "rq(skip, mult, shift): the skip at the output scale"))
    out.append(("sum", steps["sum"], WIDE, True, "intermediate", "a + skip_rq, before the output clamp"))
    return out


# ---- onnx lowering: the op as standard ONNX nodes (called by intsim.onnx_export) -------------
def lower_onnx(g, op: dict[str, Any], prog: Program, inputs: list[str]) -> str:
    """4.6: y = sat(a + rq(skip, mult, shift), lo, hi)."""
    a, skip = inputs
    at = op["attrs"]
    smax = 2 ** (int(prog.values[op["inputs"][1]]["bits"]) - 1)          # |skip| <= 2^(R-1) (an int value)
    return g.sat(g.add(a, g.rq(skip, int(at["mult"]), int(at["shift"]), amax=smax)), at["lo"], at["hi"])
