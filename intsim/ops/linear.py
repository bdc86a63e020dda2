"""``linear``: integer GEMM + per-channel requantization (docs/integer-spec.md section 4.1).

Everything about this op type except its golden function (``reference.golden``) lives here:
its schema, its export from calibration state, its fake-quant forward, its engine builder and
its cost figures.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from intsim.kernels.epilogues import linear_epilogue
from intsim.kernels.gemm import Gemm
from intsim.kernels.numeric import narrow_ok, rq_offsets
from intsim.program.fixedpoint import ExportError, check_mult_shift, requant_array
from intsim.program.program import Program
from intsim.program.quantizers import rnd

from .base import EPI_ROWS_PER_TASK, SHIFT_BITS, WIDE, EngineOp, as_int_input, check_shifts, i64, tensor64, value_width
from .base import check_in, check_out_range, check_shape, value_range, max_abs

NAME = "linear"
SPEC = "4.1"
INPUTS = 1
ATTRS = ('lo', 'hi')
# tensor name -> (dtype, shape symbols); the symbols are listed in intsim.ops.base.SHAPE_SYMBOLS
TENSORS = {
    "w": ('int16', ('N', 'K')),
    "bias": ('int64', ('N',)),
    "mult": ('int32', ('N',)),
    "shift": ('int32', ('N',)),
    "zp": ('int32', ('N',)),
}
# tensors read only by the fake-quant reference
FLOAT = {
    "w_scale": ('float64', ('N',)),
    "bias_float": ('float32', ('N',)),
}


# ---- export: calibration state -> program attrs and tensors (called by calib) ----------------
def gemm_tensors(b, name: str, lin, s_x: float, z_x: int, s_y: float) -> dict[str, np.ndarray]:
    """The tensors of an integer GEMM (shared with ``patch_embed``): weight codes, the integer
    bias ``rnd(b / (s_x s_w)) - z_x sum(w)``, the per-channel multiplier / shift of ``s_x s_w / s_y``,
    and the float weight scale and bias.

    ``b``: the :class:`intsim.program.builder.ProgramBuilder`; ``lin``: the calibrated layer
    (``weight.w`` int codes (N, K), ``weight.scale`` (N,), ``bias`` float64 (N,), as
    ``calib.state.LinearCalib``). A bias that does not fit the accumulator is saturated here,
    once, and counted in ``b.bias_saturated`` (the header records it, spec section 8), so that
    narrow-accumulator studies still export.
    """
    wb, A = b.s["wbits"], b.s["acc_bits"]
    w = lin.weight.w
    if np.abs(w).max(initial=0) > (1 << wb) - 1:
        raise ExportError(f"{name}: weight code outside +-(2^{wb} - 1)")
    s_w = lin.weight.scale.astype(np.float64)
    bias = rnd(lin.bias / (s_x * s_w)).astype(np.int64) - int(z_x) * w.sum(axis=1)
    lim = (1 << (A - 1)) - 1
    n_sat = int((np.abs(bias) > lim).sum())
    if n_sat:
        b.bias_saturated[name] = n_sat
        bias = np.clip(bias, -lim, lim)
    try:
        mult, shift = requant_array(s_x * s_w / s_y, b.s["mult_bits"])
    except ExportError as e:
        raise ExportError(f"{name}: {e}") from None
    return {"w": w.astype(np.int16), "bias": bias.astype(np.int64), "mult": mult.astype(np.int32),
            "shift": shift.astype(np.int32), "w_scale": s_w.astype(np.float64),
            "bias_float": lin.bias.astype(np.float32)}


def export(b, name: str, x: str, lin) -> None:
    """Append the ``linear`` op ``name`` reading the value ``x``; the output value ``name`` must
    already be declared (its kind, bits and zero point give the saturation range and ``zp``).
    ``lin``: the calibrated layer (see :func:`gemm_tensors`)."""
    t = gemm_tensors(b, name, lin, b.sc(x), b.zp(x), b.sc(name))
    lo, hi = b.out_range(name)
    zp = b.zp(name) if b.values[name]["kind"] == "codes" else 0
    t["zp"] = np.full(t["bias"].shape, zp, dtype=np.int32)
    b.op(name, NAME, [x], {"lo": lo, "hi": hi}, t)


def check_bounds(prog, op) -> None:
    """Section 8 on a ``linear`` / ``patch_embed`` op of ``prog``: multipliers and shifts, biases
    within the accumulator, weight codes within ``+-(2^wbits - 1)``, zero points and the output
    clamp within the output value's width; for ``linear`` the output shape ``[..., N]`` of the
    input's ``[..., K]`` (raises ``ExportError``)."""
    s, name = prog.settings, op["name"]
    A = s["acc_bits"]
    check_mult_shift(name, prog.t(op, "mult"), prog.t(op, "shift"), s["mult_bits"])
    if max_abs(prog.t(op, "bias")) >= 1 << (A - 1):
        raise ExportError(f"{name}: |bias| >= 2^{A - 1}")
    if max_abs(prog.t(op, "w")) > (1 << s["wbits"]) - 1:
        raise ExportError(f"{name}: weights outside +-(2^wbits - 1)")
    check_out_range(prog, op)
    if "zp" in TENSORS and op["type"] == NAME:
        check_in(name, "zp", prog.t(op, "zp").astype(np.int64), *value_range(prog, op["output"]))
        ins, outs = prog.values[op["inputs"][0]]["shape"], prog.values[op["output"]]["shape"]
        check_shape(prog, op, op["output"], list(ins[:-1]) + [outs[-1]], "the input's shape but the last")


# ---- fake-quant forward: the paper's semantics in float (called by reference.fakequant) -------
# ``ctx`` is a reference.fakequant.FakeQuantContext (program, dtype, eps, params, ``ctx.F`` = the float
# functions of reference.functional); the model quantize-dequantizes the output value after the op.

def fq_prepare(ctx, op) -> dict:
    """Float weight ``w * w_scale`` (N, K) and ``bias_float``."""
    t = ctx.program.t
    return {"w": ctx.tensor(t(op, "w").astype(np.float64) * t(op, "w_scale")[:, None]),
            "b": ctx.tensor(t(op, "bias_float"))}


def fq_forward(ctx, op, x):
    """``x w^T + b`` on (B, T, K) -> (B, T, N)."""
    p = ctx.params[op["name"]]
    return ctx.F.linear(x, p["w"], p["b"])


# ---- engine: route choice, exactness proof, kernel call (called by intsim.engine) -------------
class LinearEngine(EngineOp):
    """Spec 4.1 on the engine: ``S = x @ w.T`` by a proven GEMM route (``intsim.kernels.gemm``),
    then bias, ``accsat``, ``rq``, ``+ zp`` and the clamp in one epilogue kernel.

    ``cols`` (7, N) int64 holds the per-column constants of the epilogue (rows ``C_*`` of
    ``intsim.kernels.epilogues``); ``add`` (1, N) the value added after requantization (``zp``);
    ``narrow`` (0/1) whether the offset form of ``rq`` is proven exact.
    """

    def __init__(self, program: Program, op: dict[str, Any], gemm: str = "auto",
                 ranges: list[tuple[int, int] | None] | None = None, f32_max_k: int | None = None):
        super().__init__(program, op, gemm, ranges, f32_max_k)
        self.gemm = Gemm(self.t("w"), gemm, self.ranges[0], f32_max_k, name=f"op '{self.name}'")
        self.bias = i64(self.t("bias"))
        self.mult = i64(self.t("mult"))
        self.shift = i64(self.t("shift"))
        check_shifts(self.name, self.shift)
        self.lo, self.hi = self.a("lo"), self.a("hi")
        N = self.bias.shape[0]
        lo_n = np.full(N, self.lo, np.int64)
        hi_n = np.full(N, self.hi, np.int64)
        off, corr = rq_offsets(self.shift)
        self.cols = np.ascontiguousarray(np.stack([self.bias, self.mult, self.shift, off, corr, lo_n, hi_n]))
        self.narrow = narrow_ok(self.acc_lo, self.acc_hi, self.mult, self.shift)
        self.add = self.epilogue_add()

    def epilogue_add(self) -> np.ndarray:
        """(rows, N) int64 added after requantization: the output zero point."""
        return i64(self.t("zp")).reshape(1, -1)

    def forward(self, x: np.ndarray) -> tuple[np.ndarray, dict[str, int]]:
        x = np.asarray(x)
        if x.dtype not in (np.float32, np.uint8):       # codes stored for the GEMM pass as they are
            x = as_int_input(x, self.name)
        Kdim = self.gemm.K
        if x.shape[-1] != Kdim:
            raise ValueError(f"op '{self.name}': input has {x.shape[-1]} channels, expected {Kdim}")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, Kdim)
        M = x2.shape[0]
        S = self.gemm(x2)
        y = np.empty((1, M, S.shape[2]), np.int64)
        na, no = linear_epilogue(S, self.cols, self.add, self.acc_lo, self.acc_hi, self.narrow, max(M, 1), 0, y,
                                 EPI_ROWS_PER_TASK)
        return y.reshape(*lead, -1), {"acc": int(na), "out": int(no), "prob": 0}


ENGINE = LinearEngine


# ---- cost figures: MACs, bit operations, storage (called by intsim.studies.cost) -------------
def cost(prog: Program, op: dict[str, Any], c: dict[str, Any]) -> None:
    """MACs / BOPs of the GEMM and the packed weights with their per-channel constants
    (docs/cost-model.md); fills ``c`` in place. Shared by ``patch_embed``."""
    s, vals = prog.settings, prog.values
    w = prog.t(op, "w")
    n, k = w.shape
    tokens = vals[op["output"]]["shape"][0] - (1 if op["type"] == "patch_embed" else 0)
    xbits = vals[op["inputs"][0]]["bits"]
    wb = s["wbits"]
    macs = tokens * n * k
    c["macs"][f"{xbits}x{wb}"] = macs
    c["bops"] = macs * xbits * wb
    c["weight_bits"] = n * k * wb + n * (wb + s["mult_bits"] + SHIFT_BITS + s["acc_bits"])
    c["datapath_bits"] = s["acc_bits"] + s["mult_bits"]


def scratch_bits(prog: Program, op: dict[str, Any]) -> int:
    """Working storage inside the op beyond its input and output values (bits per image)."""
    return 0


# ---- test vectors: the arrays a hardware testbench checks (called by intsim.studies.vectors) ---

#: the op's inputs by role, in input order
VECTOR_ROLES = ("x",)


def vector_arrays(program: Program, op: dict[str, Any], steps: dict[str, np.ndarray]) -> list[tuple]:
    """The arrays of a test vector of this op beyond its inputs, attributes and output (``intsim vectors``):
    ``(name, int64 values, bits, signed, group, meaning)`` from the golden trace ``steps``. Shared by
    ``patch_embed``."""
    out: list = []
    s = program.settings
    patch = op["type"] == "patch_embed"
    A, B, wb = int(s["acc_bits"]), int(s["mult_bits"]), int(s["wbits"])
    out_bits, out_signed = value_width(program, op["output"])
    out.append(("w", tensor64(program, op, "w"), wb + 1, True, "param", "centered weight codes w[c, k] (N, K): wq - zw[c]"))
    out.append(("bias", tensor64(program, op, "bias"), A, True, "param", "bias[c] (N) with the input zero point folded in"))
    out.append(("mult", tensor64(program, op, "mult"), B, True, "param", "requantization multiplier per output channel (N)"))
    out.append(("shift", tensor64(program, op, "shift"), SHIFT_BITS, False, "param",
            "requantization right shift per output channel (N)"))
    if patch:
        out.append(("pos", tensor64(program, op, "pos"), out_bits, True, "param",
                "position table pos[t, c] (P + 1, N); row 0 is the class token"))
    else:
        out.append(("zp", tensor64(program, op, "zp"), out_bits, False, "param", "output zero point per channel (N)"))
    st = steps
    out.append(("acc_raw", st["acc_raw"], WIDE, True, "intermediate", "bias[c] + sum_k x[t, k] w[c, k], exact, before accsat"))
    out.append(("acc", st["acc"], A, True, "intermediate", "accsat(acc_raw): the accumulator"))
    out.append(("rq", st["rq"], WIDE, True, "intermediate", "rq(acc, mult[c], shift[c]) = rshift(acc * mult[c], shift[c])"))
    return out


# ---- onnx lowering: the op as standard ONNX nodes (called by intsim.onnx_export) -------------
def lower_gemm(g, op: dict[str, Any], prog: Program, x: str) -> str:
    """acc = accsat(bias + x @ w^T): the GEMM exactly (``OnnxGraph.matmul``: float32/float64 where the
    bound K * max|x| * max|w| proves it exact, else int64), then the bias in int64."""
    w = tensor64(prog, op, "w").T                                        # (K, N)
    info = prog.values[op["inputs"][0]]
    xmax = 255 if info["kind"] == "image" else 2 ** int(info["bits"]) - 1
    bound = w.shape[0] * xmax * (int(np.abs(w).max()) if w.size else 0)
    acc = g.add(g.matmul(x, w, bound), g.const("bias", tensor64(prog, op, "bias")))
    return g.accsat(acc, prog.settings["acc_bits"])


def lower_onnx(g, op: dict[str, Any], prog: Program, inputs: list[str]) -> str:
    """4.1: y = sat(rq(accsat(bias + x w^T), mult[c], shift[c]) + zp[c], lo, hi), per-channel constants
    broadcast over the last axis."""
    (x,) = inputs
    acc = lower_gemm(g, op, prog, x)
    r = g.rq(acc, tensor64(prog, op, "mult"), tensor64(prog, op, "shift"), amax=2 ** (prog.settings["acc_bits"] - 1))
    return g.sat(g.add(r, g.const("zp", tensor64(prog, op, "zp"))), op["attrs"]["lo"], op["attrs"]["hi"])
