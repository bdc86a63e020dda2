"""``gelu``: table over every input code (docs/integer-spec.md section 4.5).

Everything about this op type except its golden function (``reference.golden``) lives here:
its schema, its export from calibration state, its fake-quant forward, its engine builder and
its cost figures.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from intsim.kernels.epilogues import gelu_lookup
from intsim.program.fixedpoint import ExportError
from intsim.program.program import Program, ProgramError
from intsim.program.quantizers import rnd

from .base import EngineOp, as_int_input, i64, int_attr, tensor64, value_width, zero_counts
from .base import check_in, check_shape, value_range

NAME = "gelu"
SPEC = "4.5"
INPUTS = 1
ATTRS = ()
# tensor name -> (dtype, shape symbols); the symbols are listed in intsim.ops.base.SHAPE_SYMBOLS
TENSORS = {
    "table": ('int32', ('G',)),
}
# tensors read only by the fake-quant reference
FLOAT = {}


# ---- export: calibration state -> program attrs and tensors (called by calib) ----------------
def export(b, name: str, x: str) -> None:
    """Append the ``gelu`` op ``name`` reading the ``int`` value ``x`` (g bits); the output codes
    must be declared. Section 4.5: ``table[i] = sat(rnd(gelu((i - 2^(g-1)) s_x) / s_y) + zp)``."""
    g = b.values[x]["bits"]
    z = (np.arange(1 << g, dtype=np.float64) - (1 << (g - 1))) * b.sc(x)
    phi = 0.5 * (1.0 + np.array([math.erf(t / math.sqrt(2.0)) for t in z]))
    lo, hi = b.out_range(name)
    table = np.clip(rnd(z * phi / b.sc(name)) + b.zp(name), lo, hi).astype(np.int32)
    b.op(name, NAME, [x], {}, {"table": table})


def check_bounds(prog, op) -> None:
    """Section 8 on a ``gelu`` op: one table entry per input code (``2^gelu_bits``), the input an int
    value of ``gelu_bits`` bits (so every input lies in the table: the producer clamps to its
    width), the entries within the output value's width, the output of the input's shape."""
    name, g = op["name"], prog.settings["gelu_bits"]
    if prog.t(op, "table").shape != (1 << g,):
        raise ExportError(f"{name}: GELU table of the wrong size")
    x = prog.values[op["inputs"][0]]
    if x["kind"] != "int" or x["bits"] != g:
        raise ExportError(f"{name}: input '{op['inputs'][0]}' ({x['kind']}, {x['bits']} bits) breaks "
                          f"an int value of gelu_bits = {g} bits")
    check_in(name, "table", prog.t(op, "table").astype(np.int64), *value_range(prog, op["output"]))
    check_shape(prog, op, op["output"], x["shape"], "the input's shape")


# ---- fake-quant forward: the paper's semantics in float (called by reference.fakequant) -------
# ``ctx`` is a reference.fakequant.FakeQuantContext (program, dtype, eps, params, ``ctx.F`` = the float
# functions of reference.functional); the model quantize-dequantizes the output value after the op.

def fq_forward(ctx, op, x):
    """Float (erf) GELU."""
    return ctx.F.gelu(x)


# ---- engine: route choice, exactness proof, kernel call (called by intsim.engine) -------------
class GeluEngine(EngineOp):
    """Spec 4.5 on the engine: one table lookup per element (``epilogues.gelu_lookup``)."""

    def __init__(self, program: Program, op: dict[str, Any], gemm: str = "auto",
                 ranges: list[tuple[int, int] | None] | None = None, f32_max_k: int | None = None):
        super().__init__(program, op, gemm, ranges, f32_max_k)
        self.table = i64(self.t("table"))
        g = int_attr(program.settings["gelu_bits"], "settings.gelu_bits")
        if self.table.shape[0] != 1 << g:
            raise ProgramError(f"op '{self.name}': gelu table has {self.table.shape[0]} entries, expected 2^{g}")
        self.offset = 1 << (g - 1)
        self.lo, self.hi = (int(self.table.min()), int(self.table.max())) if self.table.size else (0, 0)

    def forward(self, x: np.ndarray) -> tuple[np.ndarray, dict[str, int]]:
        x = as_int_input(x, self.name)
        y, bad = gelu_lookup(x.reshape(-1), self.table, self.offset)
        if bad:
            raise ValueError(f"op '{self.name}': {int(bad)} GELU inputs outside the table range "
                             f"[{-self.offset}, {self.offset - 1}]")
        return y.reshape(x.shape), zero_counts()


ENGINE = GeluEngine


# ---- cost figures: MACs, bit operations, storage (called by intsim.studies.cost) -------------
def cost(prog: Program, op: dict[str, Any], c: dict[str, Any]) -> None:
    """The table over every input code; the datapath is the input code width."""
    c["table_bits"] = len(prog.t(op, "table")) * prog.values[op["output"]]["bits"]
    c["datapath_bits"] = prog.values[op["inputs"][0]]["bits"]


def scratch_bits(prog: Program, op: dict[str, Any]) -> int:
    return 0


# ---- test vectors: the arrays a hardware testbench checks (called by intsim.studies.vectors) ---

#: the op's inputs by role, in input order
VECTOR_ROLES = ("x",)


def vector_arrays(program: Program, op: dict[str, Any], steps: dict[str, np.ndarray]) -> list[tuple]:
    """The arrays of a test vector of this op beyond its inputs, attributes and output (``intsim vectors``)."""
    out: list = []
    gb = int(program.settings["gelu_bits"])
    out_bits = value_width(program, op["output"])[0]
    out.append(("table", tensor64(program, op, "table"), out_bits, False, "table",
            "GELU table[i] = output code of input i - 2^(g-1) (2^g)"))
    out.append(("index", steps["index"], gb, False, "intermediate", "table index x + 2^(g-1)"))
    return out


# ---- onnx lowering: the op as standard ONNX nodes (called by intsim.onnx_export) -------------
def lower_onnx(g, op: dict[str, Any], prog: Program, inputs: list[str]) -> str:
    """4.5: y = table[x + 2^(g-1)] as a ``Gather`` (the input is in range: it is a saturated g-bit value)."""
    (x,) = inputs
    gb = int(prog.settings["gelu_bits"])
    return g.node("Gather", [g.const("table", tensor64(prog, op, "table")), g.add(x, g.i64(2 ** (gb - 1)))],
                  name="table_lookup", axis=0)
