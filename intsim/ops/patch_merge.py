"""``patch_merge``: 2x2 neighbour concatenation (layout only) (docs/integer-spec.md section 9.2).

Everything about this op type except its golden function (``reference.golden``) lives here:
its schema, its export from calibration state, its fake-quant forward, its engine builder and
its cost figures.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from intsim.program.program import Program, ProgramError

from intsim.program.fixedpoint import ExportError

from .base import EngineOp, check_in, check_shape, i64, ints, tensor64, value_range, zero_counts

NAME = "patch_merge"
SPEC = "9.2"
INPUTS = 1
ATTRS = ('grid',)
# tensor name -> (dtype, shape symbols); the symbols are listed in intsim.ops.base.SHAPE_SYMBOLS
TENSORS = {
    "src": ('int32', ('T', '4')),
}
# tensors read only by the fake-quant reference
FLOAT = {}


def shape_dims(op: dict[str, Any], in_shape: list[int]) -> dict[str, int]:
    """Shape symbols of this op's schema beyond the generic ones: the four neighbours."""
    return {"4": 4}


# ---- export: calibration state -> program attrs and tensors (called by calib) ----------------
def export(b, name: str, x: str, grid: tuple[int, int], src: np.ndarray) -> None:
    """Declare the value ``name`` and append the ``patch_merge`` op (section 9.2) that gathers the
    2x2 neighbours of the (grid[0], grid[1]) tokens of ``x`` through ``src`` (T/4, 4) into
    4 C channels (same kind, bits, scale and zero point as ``x``)."""
    v = b.values[x]
    T2 = (grid[0] // 2) * (grid[1] // 2)
    b.value(name, v["kind"], v["bits"], [T2, 4 * v["shape"][-1]], v["scale"], v["zero_point"])
    b.op(name, NAME, [x], {"grid": [int(grid[0]), int(grid[1])]}, {"src": np.asarray(src).astype(np.int32)})


def check_bounds(prog, op) -> None:
    """Section 8 puts no bound on a layout op; ``grid`` two positive even integers covering the input
    tokens, ``src`` indices of input tokens, the output ``(T/4, 4 C)``."""
    name, grid = op["name"], op["attrs"]["grid"]
    shape = prog.values[op["inputs"][0]]["shape"]
    if len(grid) != 2 or not all(isinstance(g, int) and not isinstance(g, bool) and g >= 2 and g % 2 == 0
                                 for g in grid) or grid[0] * grid[1] != shape[0]:
        raise ExportError(f"{name}: grid = {str(grid)[:40]} breaks two even sizes covering {shape[0]} tokens")
    check_in(name, "src", prog.t(op, "src").astype(np.int64), 0, shape[0] - 1)
    check_shape(prog, op, op["output"], [shape[0] // 4, 4 * shape[-1]], "the merged layout")


# ---- fake-quant forward: the paper's semantics in float (called by reference.fakequant) -------
# ``ctx`` is a reference.fakequant.FakeQuantContext (program, dtype, eps, params, ``ctx.F`` = the float
# functions of reference.functional); the model quantize-dequantizes the output value after the op.

def fq_prepare(ctx, op) -> dict:
    """The gather table ``src`` (T/4, 4)."""
    return {"src": ctx.index(ctx.program.t(op, "src"))}


def fq_forward(ctx, op, x):
    """2x2 neighbours concatenated: (B, T, C) -> (B, T/4, 4C)."""
    return ctx.F.merge_tokens(x, ctx.params[op["name"]]["src"])


# ---- engine: route choice, exactness proof, kernel call (called by intsim.engine) -------------
class PatchMergeEngine(EngineOp):
    """Spec 9.2 on the engine: the 2x2 neighbours of each merged token concatenated (a gather through ``src``)."""

    def __init__(self, program: Program, op: dict[str, Any], gemm: str = "auto",
                 ranges: list[tuple[int, int] | None] | None = None, f32_max_k: int | None = None):
        super().__init__(program, op, gemm, ranges, f32_max_k)
        self.src = i64(program.t(op, "src"))
        if self.src.ndim != 2 or self.src.shape[1] != 4:
            raise ProgramError(f"op '{self.name}': src must be (T/4, 4)")
        r = self.ranges[0] if self.ranges and self.ranges[0] is not None else value_range(program, op["inputs"][0])
        self.lo, self.hi = int(r[0]), int(r[1])

    def forward(self, x):
        (x,) = ints(x)
        B, T, C = x.shape
        if self.src.shape[0] * 4 != T or (self.src.size and (self.src.min() < 0 or self.src.max() >= T)):
            raise ValueError(f"op '{self.name}': {T} input tokens do not match the merge table")
        return np.ascontiguousarray(x[:, self.src]).reshape(B, T // 4, 4 * C), zero_counts()


ENGINE = PatchMergeEngine


# ---- cost figures: MACs, bit operations, storage (called by intsim.studies.cost) -------------
def cost(prog: Program, op: dict[str, Any], c: dict[str, Any]) -> None:
    """No MACs, weights or tables (the cost model counts GEMMs and stored constants)."""


def scratch_bits(prog: Program, op: dict[str, Any]) -> int:
    return 0


# ---- onnx lowering: the op as standard ONNX nodes (called by intsim.onnx_export) -------------
def lower_onnx(g, op: dict[str, Any], prog: Program, inputs: list[str]) -> str:
    """9.2: y[t, k*C + c] = x[src[t, k], c]: ``Gather`` on the token axis with src (T/4, 4), then Reshape."""
    (x,) = inputs
    T, C = (int(s) for s in prog.values[op["inputs"][0]]["shape"])
    y = g.node("Gather", [x, g.const("src", tensor64(prog, op, "src"))], name="merge", axis=1)
    return g.reshape(y, [-1, T // 4, 4 * C])
