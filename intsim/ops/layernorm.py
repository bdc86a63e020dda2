"""``layernorm``: integer LayerNorm with the affine and the output quantizer fused (docs/integer-spec.md section 4.3).

Everything about this op type except its golden function (``reference.golden``) lives here:
its schema, its export from calibration state, its fake-quant forward, its engine builder and
its cost figures.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from intsim.kernels.epilogues import layernorm_rows
from intsim.kernels.gemm import absmax, data_range
from intsim.kernels.numeric import MAX_SHIFT, rq_offsets
from intsim.program.fixedpoint import ExportError, check_mult_shift
from intsim.program.program import Program, ProgramError
from intsim.program.quantizers import rnd

from .base import EPI_ROWS_PER_TASK, WIDE, EngineOp, as_int_input, check_shifts, i64, tensor64
from .base import check_out_range, max_abs

#: Bound on ``|gadd|`` (section 8): the LayerNorm accumulation stays within int64.
GADD_LIMIT = 1 << 55
#: Largest LayerNorm width (section 8).
MAX_WIDTH = 4096

NAME = "layernorm"
SPEC = "4.3"
INPUTS = 1
ATTRS = ('tokens', 'recip_bits', 'norm_frac', 'shift', 'zp', 'lo', 'hi')
# tensor name -> (dtype, shape symbols); the symbols are listed in intsim.ops.base.SHAPE_SYMBOLS
TENSORS = {
    "gmul": ('int64', ('D',)),
    "gadd": ('int64', ('D',)),
}
# tensors read only by the fake-quant reference
FLOAT = {
    "gamma": ('float32', ('D',)),
    "beta": ('float32', ('D',)),
}


# ---- export: calibration state -> program attrs and tensors (called by calib) ----------------
def fused_constants(gm: np.ndarray, ga: np.ndarray, B: int, F: int, name: str = "layernorm"
                    ) -> tuple[int, np.ndarray, np.ndarray]:
    """``(S, gmul, gadd)`` of section 4.3 for the real per-channel factors ``gm = gamma / s_y`` and
    addends ``ga = beta / s_y`` (float64, (D,)): ``gmul = rnd(gm 2^(S-F))``, ``gadd = rnd(ga 2^S)``
    with S the largest shift keeping ``|gmul| < 2^(B-1)`` and ``|gadd| < 2^55``."""
    # start just above the analytic bound and walk down to the first shift that fits
    top = float(np.abs(gm).max())
    start = MAX_SHIFT if top == 0 else min(MAX_SHIFT, F + int(math.floor(math.log2(((1 << (B - 1)) - 1) / top))) + 1)
    for S in range(max(start, 0), -1, -1):
        gmul = rnd(gm * 2.0 ** (S - F))
        gadd = rnd(ga * 2.0 ** S)
        if np.abs(gmul).max() <= (1 << (B - 1)) - 1 and np.abs(gadd).max() < GADD_LIMIT:
            return S, gmul.astype(np.int64), gadd.astype(np.int64)
    raise ExportError(f"{name}: no LayerNorm shift keeps gmul below 2^{B - 1} and gadd below 2^55")


def export(b, name: str, x: str, ln, tokens: str) -> None:
    """Append the ``layernorm`` op ``name`` reading ``x`` over ``tokens`` ("all" or "first"); the
    output value ``name`` must already be declared. ``ln``: the calibrated (reparameterized) affine,
    ``gamma`` / ``beta`` float64 (D,) (``calib.state.LNCalib``). Section 4.3:
    ``gmul = rnd(gamma / s_y 2^(S-F))``, ``gadd = rnd(beta / s_y 2^S)``, S the largest shift that fits."""
    B, K, F = b.s["mult_bits"], b.s["ln_recip_bits"], b.s["ln_norm_frac"]
    D = ln.gamma.shape[0]
    if D > MAX_WIDTH:
        raise ExportError(f"{name}: LayerNorm width {D} > {MAX_WIDTH}")
    s_y = b.sc(name)
    S, gmul, gadd = fused_constants(ln.gamma / s_y, ln.beta / s_y, B, F, name)
    lo, hi = b.out_range(name)
    attrs = {"tokens": tokens, "recip_bits": K, "norm_frac": F, "shift": S, "zp": b.zp(name), "lo": lo, "hi": hi}
    b.op(name, NAME, [x], attrs,
         {"gmul": gmul.astype(np.int64), "gadd": gadd.astype(np.int64),
          "gamma": ln.gamma.astype(np.float32), "beta": ln.beta.astype(np.float32)})


def check_bounds(prog, op) -> None:
    """Section 8 on a ``layernorm`` op: shift, width, ``|gmul| < 2^(B-1)``, ``|gadd| < 2^55``, K and F
    (equal to the settings ``ln_recip_bits`` and ``ln_norm_frac``), ``tokens`` "all" or "first",
    zero point and output clamp within the output value's width."""
    B, name, a = prog.settings["mult_bits"], op["name"], op["attrs"]
    check_mult_shift(name, 0, a["shift"], B)
    if prog.t(op, "gmul").shape[0] > MAX_WIDTH:
        raise ExportError(f"{name}: D > {MAX_WIDTH}")
    if max_abs(prog.t(op, "gmul")) >= 1 << (B - 1):
        raise ExportError(f"{name}: |gmul| >= 2^{B - 1}")
    if max_abs(prog.t(op, "gadd")) >= GADD_LIMIT:
        raise ExportError(f"{name}: |gadd| >= 2^55")
    if a["recip_bits"] > 48 or a["norm_frac"] > 20:
        raise ExportError(f"{name}: recip_bits > 48 or norm_frac > 20")
    for k, sk in (("recip_bits", "ln_recip_bits"), ("norm_frac", "ln_norm_frac")):
        if a[k] != prog.settings[sk]:
            raise ExportError(f"{name}: {k} = {a[k]} breaks {k} == settings.{sk} ({prog.settings[sk]})")
    if a["tokens"] not in ("all", "first"):
        raise ExportError(f"{name}: tokens = {a['tokens']!r:.40} breaks tokens in ('all', 'first')")
    check_out_range(prog, op, zp=True)
    if prog.values[op["output"]]["shape"][-1] != prog.values[op["inputs"][0]]["shape"][-1]:
        raise ExportError(f"{name}: the output's width differs from the input's")


# ---- fake-quant forward: the paper's semantics in float (called by reference.fakequant) -------
# ``ctx`` is a reference.fakequant.FakeQuantContext (program, dtype, eps, params, ``ctx.F`` = the float
# functions of reference.functional); the model quantize-dequantizes the output value after the op.

def fq_prepare(ctx, op) -> dict:
    """The (reparameterized) affine ``gamma``, ``beta``."""
    t = ctx.program.t
    return {"gamma": ctx.tensor(t(op, "gamma")), "beta": ctx.tensor(t(op, "beta"))}


def fq_forward(ctx, op, x):
    """Float LayerNorm with the model's epsilon, of every token or (``tokens == "first"``) the first."""
    p = ctx.params[op["name"]]
    if op["attrs"]["tokens"] == "first":
        x = x[:, :1]
    return ctx.F.layer_norm(x, p["gamma"], p["beta"], ctx.eps)


# ---- engine: route choice, exactness proof, kernel call (called by intsim.engine) -------------
class LayerNormEngine(EngineOp):
    """Spec 4.3 on the engine: one parallel kernel over the rows (``epilogues.layernorm_rows``), the
    offset form of both rounding shifts where ``ln_params`` proves it exact."""

    def __init__(self, program: Program, op: dict[str, Any], gemm: str = "auto",
                 ranges: list[tuple[int, int] | None] | None = None, f32_max_k: int | None = None):
        super().__init__(program, op, gemm, ranges, f32_max_k)
        name = self.name
        self.gmul = i64(self.t("gmul"))
        self.gadd = i64(self.t("gadd"))
        self.tokens = self.attrs["tokens"]
        if self.tokens not in ("all", "first"):
            raise ProgramError(f"op '{name}': layernorm tokens must be 'all' or 'first', got {self.tokens!r}")
        self.recip_bits, self.norm_frac = self.a("recip_bits"), self.a("norm_frac")
        self.ln_shift, self.zp, self.lo, self.hi = self.a("shift"), self.a("zp"), self.a("lo"), self.a("hi")
        if not 0 <= self.recip_bits <= MAX_SHIFT - 1:
            raise ProgramError(f"op '{name}': recip_bits={self.recip_bits} outside 0..{MAX_SHIFT - 1}")
        check_shifts(name, np.array([self.ln_shift, self.recip_bits - self.norm_frac]))
        self._lnp: dict[tuple[int, int], np.ndarray] = {}

    def forward(self, x: np.ndarray) -> tuple[np.ndarray, dict[str, int]]:
        x = as_int_input(x, self.name)
        if x.ndim != 3 or x.shape[-1] != self.gmul.shape[0]:
            raise ValueError(f"op '{self.name}': input (B, T, {self.gmul.shape[0]}) expected, got {x.shape}")
        B, T, D = x.shape
        rows = np.ascontiguousarray(x[:, 0, :]) if self.tokens == "first" else x.reshape(B * T, D)
        y = np.empty(rows.shape, np.int64)
        no = self.layernorm_into(rows, y, self.ranges[0])
        return y.reshape(B, -1, D), {"acc": 0, "out": int(no), "prob": 0}

    def ln_params(self, xr: tuple[int, int]) -> np.ndarray:
        """The scalar table ``lnp`` of ``epilogues._ln_row`` for inputs within ``xr``.

        The offset form of both rounding shifts (``L_FAST``) needs ``|c * inv| <= 2^62`` and
        ``|n * gmul + gadd| <= 2^62``. With ``c_i = D x_i - S1``: ``sum_i c_i^2 = D * V`` so
        ``|c| <= sqrt(D V)``; ``sd = floor(sqrt(V)) >= sqrt(V) / 2`` (V >= 1) and
        ``inv <= 2^K / sd + 1/2``, hence ``|c * inv| <= 2 sqrt(D) 2^K + |c| / 2`` with
        ``|c| <= 2 D max|x|`` (0 when sd = 0); ``|n| <= |c * inv| / 2^(K-F) + 1``.
        """
        key = (int(xr[0]), int(xr[1]))
        cache = self._lnp
        if key in cache:
            return cache[key]
        D = int(self.gmul.shape[0])
        Kb, F, Sh = self.recip_bits, self.norm_frac, self.ln_shift
        fast = narrow = 0
        off1 = corr1 = off2 = corr2 = 0
        if 0 <= Kb - F <= MAX_SHIFT and 0 <= Sh <= MAX_SHIFT and D > 0:
            xmax = absmax(key)
            b1 = 2 * (math.isqrt(D) + 1) * (1 << Kb) + 2 * D * xmax
            if b1 <= 2 ** MAX_SHIFT:
                bnv = (b1 >> (Kb - F)) + 1
                gm = int(np.abs(self.gmul).max())
                b2 = bnv * gm + int(np.abs(self.gadd).max())
                if b2 <= 2 ** MAX_SHIFT:
                    fast = 1
                    narrow = int(bnv < 2 ** 31 and gm < 2 ** 31)
                    (off1,), (corr1,) = rq_offsets(np.array([Kb - F]))
                    (off2,), (corr2,) = rq_offsets(np.array([Sh]))
        lnp = np.array([Kb, F, Sh, self.zp, self.lo, self.hi, fast, off1, corr1, off2, corr2, narrow], np.int64)
        cache[key] = lnp
        return lnp

    @property
    def channels(self) -> int:
        """D, the normalized width."""
        return int(self.gmul.shape[0])

    def fused_args(self, xr: tuple[int, int] | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(gmul, gadd, lnp)``: what a fused epilogue (``epilogues.linear_add_ln_epilogue``) needs
        to normalize rows whose values lie in ``xr``."""
        return self.gmul, self.gadd, self.ln_params(xr)

    def layernorm_into(self, rows: np.ndarray, out: np.ndarray, xr: tuple[int, int] | None = None) -> int:
        lnp = self.ln_params(xr if xr is not None else data_range(rows))
        return layernorm_rows(rows, self.gmul, self.gadd, lnp, out, EPI_ROWS_PER_TASK)


ENGINE = LayerNormEngine


# ---- cost figures: MACs, bit operations, storage (called by intsim.studies.cost) -------------
def cost(prog: Program, op: dict[str, Any], c: dict[str, Any]) -> None:
    """The fused per-channel constants (multiplier and 56-bit addend); a 64-bit datapath."""
    d = prog.values[op["inputs"][0]]["shape"][1]
    c["table_bits"] = d * (prog.settings["mult_bits"] + 56)
    c["datapath_bits"] = 64


def scratch_bits(prog: Program, op: dict[str, Any]) -> int:
    return 0


# ---- test vectors: the arrays a hardware testbench checks (called by intsim.studies.vectors) ---

#: the op's inputs by role, in input order
VECTOR_ROLES = ("x",)


def vector_arrays(program: Program, op: dict[str, Any], steps: dict[str, np.ndarray]) -> list[tuple]:
    """The arrays of a test vector of this op beyond its inputs, attributes and output (``intsim vectors``)."""
    out: list = []
    out.append(("gmul", tensor64(program, op, "gmul"), int(program.settings["mult_bits"]), True, "param",
            "fused gamma multiplier gmul[i] (D)"))
    out.append(("gadd", tensor64(program, op, "gadd"), 56, True, "param", "fused beta addend gadd[i] (D), |gadd| < 2^55"))
    st = steps
    out.append(("S1", st["S1"][..., 0], WIDE, True, "intermediate", "S1 = sum_i x[i] per row (B, T')"))
    out.append(("S2", st["S2"][..., 0], WIDE, True, "intermediate", "S2 = sum_i x[i]^2 per row (B, T')"))
    out.append(("c", st["c"], WIDE, True, "intermediate", "c[i] = D x[i] - S1 (B, T', D)"))
    out.append(("V", st["V"][..., 0], WIDE, True, "intermediate", "V = D S2 - S1^2 per row (B, T')"))
    out.append(("sd", st["sd"][..., 0], WIDE, True, "intermediate", "sd = isqrt(V) per row (B, T')"))
    out.append(("inv", st["inv"][..., 0], WIDE, True, "intermediate", "inv = rdiv(2^K, sd) (0 if sd == 0) per row (B, T')"))
    out.append(("n", st["n"], WIDE, True, "intermediate", "n[i] = rshift(c[i] inv, K - F) (B, T', D)"))
    out.append(("pre_sat", st["pre_sat"], WIDE, True, "intermediate", "rshift(n gmul + gadd, S) + zp, before the output clamp"))
    return out


# ---- onnx lowering: the op as standard ONNX nodes (called by intsim.onnx_export) -------------
def lower_onnx(g, op: dict[str, Any], prog: Program, inputs: list[str]) -> str:
    """4.3 row by row (reductions over the last axis, kept): S1, S2, c = D x - S1, V = D S2 - S1^2,
    sd = isqrt(V) (float64 estimate + exact integer correction, ``OnnxGraph.isqrt``),
    inv = 0 if sd == 0 else rdiv(2^K, sd), n = rshift(c inv, K - F), y = sat(rshift(n gmul + gadd, S) + zp)."""
    (x,) = inputs
    at = op["attrs"]
    K, F, S = int(at["recip_bits"]), int(at["norm_frac"]), int(at["shift"])
    if not 0 <= K - F <= 62 or K > 60:
        raise ProgramError(f"onnx export: layernorm {op['name']!r}: recip_bits {K} / norm_frac {F} cannot be lowered")
    if at["tokens"] == "first":
        x = g.node("Slice", [x, g.i64([0]), g.i64([1]), g.i64([1])], name="first_token")
    elif at["tokens"] != "all":
        raise ProgramError(f"onnx export: layernorm {op['name']!r}: tokens {at['tokens']!r}")
    D = int(prog.values[op["inputs"][0]]["shape"][-1])
    Dc = g.i64(D)
    S1 = g.reduce("ReduceSum", x, -1)
    S2 = g.reduce("ReduceSum", g.mul(x, x), -1)
    c = g.sub(g.mul(x, Dc), S1)
    V = g.sub(g.mul(S2, Dc), g.mul(S1, S1))
    sd = g.isqrt(V)
    zero = g.node("Equal", [sd, g.i64(0)], name="sd_zero")
    inv = g.rdiv_pos(2**K, g.node("Max", [sd, g.i64(1)]))
    inv = g.node("Where", [zero, g.i64(0), inv], name="inv")
    # bounds for the short rshift form: |c_i| <= sqrt(D V) <= D 2^R (|x| <= 2^(R-1)), sd >= sqrt(V)/2,
    # inv <= 2^K / sd + 1/2, so |c inv| <= 2 sqrt(D) 2^K + D 2^R; |n| <= that / 2^(K-F) + 1
    R = int(prog.values[op["inputs"][0]]["bits"])
    cinv = 2 * (math.isqrt(D) + 1) * 2**K + D * 2**R
    n = g.rshift(g.mul(c, inv), K - F, amax=cinv)
    gmul, gadd = tensor64(prog, op, "gmul"), tensor64(prog, op, "gadd")
    pmax = (cinv // 2 ** (K - F) + 1) * int(np.abs(gmul).max()) + int(np.abs(gadd).max())
    pre = g.add(g.mul(n, g.const("gmul", gmul)), g.const("gadd", gadd))
    pre = g.add(g.rshift(pre, S, amax=pmax), g.i64(int(at["zp"])))
    return g.sat(pre, at["lo"], at["hi"])
