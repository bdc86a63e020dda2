"""``window_attention``: shifted windows, relative position bias, masked integer softmax (docs/integer-spec.md section 9.3).

Everything about this op type except its golden function (``reference.golden``) lives here:
its schema, its export from calibration state, its fake-quant forward, its engine builder and
its cost figures.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from intsim.kernels.numeric import MAX_SHIFT
from intsim.kernels.window import window_attention_kernel
from intsim.program.fixedpoint import ExportError
from intsim.program.program import Program, ProgramError

from . import attention
from .base import EngineOp, check_in, i64, int_attr, ints, max_abs, tensor64

NAME = "window_attention"
SPEC = "9.3"
INPUTS = 3
ATTRS = ('heads', 'window', 'cyclic_shift', 'grid', 'score_frac', 'zp_q', 'zp_k', 'zp_v', 'score_mult', 'score_shift', 'exp_frac_bits', 'exp_bits', 'prob_bits', 'recip_frac', 'decode_bits', 'mult', 'shift', 'zp', 'lo', 'hi', 'softmax_quant')
# tensor name -> (dtype, shape symbols); the symbols are listed in intsim.ops.base.SHAPE_SYMBOLS
TENSORS = {
    "exp_table": ('int64', ('E',)),
    "thresholds": ('int64', ('Q',)),
    "decode": ('int64', ('Q+1',)),
    "tokens": ('int32', ('Wc', 'Wn')),
    "bias_table": ('int64', ('Hh', 'Wr')),
    "rel_index": ('int32', ('Wn', 'Wn')),
    "mask": ('int8', ('Wc', 'Wn', 'Wn')),
}
# tensors read only by the fake-quant reference
FLOAT = {
    "levels": ('float64', ('Q+1',)),
}


def shape_dims(op: dict[str, Any], in_shape: list[int]) -> dict[str, int]:
    """Shape symbols of this op's schema beyond the generic ones (window tables); ``ProgramError``
    when the tokens do not split into windows."""
    a = op["attrs"]
    try:
        ws, heads = int(a["window"]), int(a["heads"])
    except (TypeError, ValueError):
        raise ProgramError(f"op '{op['name']}': window and heads must be integers") from None
    if ws < 1 or heads < 1 or in_shape[0] % (ws * ws):
        raise ProgramError(f"op '{op['name']}': {in_shape[0]} tokens do not split into windows of {ws}x{ws}")
    return {"Wn": ws * ws, "Wr": (2 * ws - 1) ** 2, "Wc": in_shape[0] // (ws * ws), "Hh": heads}


# ---- export: calibration state -> program attrs and tensors (called by calib) ----------------
def export(b, name: str, q: str, k: str, v: str, *, heads: int, sq, score_frac: int, bias_table: np.ndarray,
           window: int, cyclic_shift: int, grid: tuple[int, int], tokens: np.ndarray, rel_index: np.ndarray,
           mask: np.ndarray) -> None:
    """Append the ``window_attention`` op ``name`` (section 9.3): the softmax constants of
    ``attention`` (:func:`intsim.ops.attention.softmax_constants`) with scores carrying
    ``score_frac`` fractional bits, plus the integer relative position bias ``bias_table``
    (heads, (2 window - 1)^2) and the window geometry of the (grid[0], grid[1]) token grid:
    ``tokens`` (windows, window^2), ``rel_index`` (window^2, window^2), ``mask`` (windows,
    window^2, window^2) nonzero where a shifted window's pair is masked."""
    attrs, tensors = attention.softmax_constants(b, name, q, k, v, heads, sq, score_frac)
    attrs.update({"window": int(window), "cyclic_shift": int(cyclic_shift), "grid": [int(grid[0]), int(grid[1])],
                  "score_frac": int(score_frac)})
    tensors.update({"tokens": tokens.astype(np.int32), "bias_table": bias_table.astype(np.int64),
                    "rel_index": rel_index.astype(np.int32), "mask": mask.astype(np.int8)})
    b.op(name, NAME, [q, k, v], attrs, tensors)


def check_bounds(prog, op) -> None:
    """Section 8 on a ``window_attention`` op: the softmax constants (one softmax row spans a window),
    ``score_frac`` in 0..30, the bias within the accumulator, the token table a permutation, the
    relative-position indices within the bias table, no query masked from itself."""
    name, a = op["name"], op["attrs"]
    A = prog.settings["acc_bits"]
    ws = a["window"]
    attention.check_softmax_bounds(prog, op, row_tokens=ws * ws)
    if not 0 <= a["score_frac"] <= 30:
        raise ExportError(f"{name}: score_frac outside 0..30")
    if max_abs(prog.t(op, "bias_table")) >= 1 << (A - 1):
        raise ExportError(f"{name}: |bias_table| >= 2^{A - 1}")
    tok = prog.t(op, "tokens").ravel()
    if not np.array_equal(np.sort(tok), np.arange(tok.size)):
        raise ExportError(f"{name}: the token table is not a permutation")
    check_in(name, "rel_index", prog.t(op, "rel_index").astype(np.int64), 0, (2 * ws - 1) ** 2 - 1)
    mask = prog.t(op, "mask")
    if mask.size and np.any(np.diagonal(mask, axis1=1, axis2=2) != 0):
        raise ExportError(f"{name}: a query is masked from itself")


# ---- fake-quant forward: the paper's semantics in float (called by reference.fakequant) -------
# ``ctx`` is a reference.fakequant.FakeQuantContext (program, dtype, eps, params, ``ctx.F`` = the float
# functions of reference.functional); the model quantize-dequantizes the output value after the op.

def fq_prepare(ctx, op) -> dict:
    """Token table, mask, post-softmax function, and the bias: the integer table dequantized with the
    score unit ``s_q s_k 2^-score_frac / sqrt(d)`` (so the bias is the quantized one), (H, n, n)."""
    t, a, values = ctx.program.t, op["attrs"], ctx.program.values
    vq, vk = values[op["inputs"][0]], values[op["inputs"][1]]
    d = vq["shape"][-1] // int(a["heads"])
    unit = float(vq["scale"]) * float(vk["scale"]) * 2.0 ** -int(a["score_frac"]) / math.sqrt(d)
    rel = t(op, "rel_index").astype(np.int64)
    n = rel.shape[0]
    bias = (t(op, "bias_table").astype(np.float64) * unit)[:, rel.reshape(-1)].reshape(-1, n, n)
    return {"tokens": ctx.index(t(op, "tokens")), "bias": ctx.tensor(bias), "mask": ctx.mask(t(op, "mask")),
            "probs": ctx.post_softmax(op)}


def fq_forward(ctx, op, q, k, v):
    """Float window attention with the dequantized bias; masked positions get probability exactly 0;
    probabilities quantized: (B, T, D) x3 -> (B, T, D)."""
    p = ctx.params[op["name"]]
    return ctx.F.window_attention(q, k, v, int(op["attrs"]["heads"]), p["tokens"], p["bias"], p["mask"],
                                  p["probs"], mask_value=float("-inf"))


# ---- engine: route choice, exactness proof, kernel call (called by intsim.engine) -------------
class WindowAttentionEngine(EngineOp):
    """Spec 9.3 on the engine: one Numba kernel (``intsim.kernels.window``) per batch."""

    def __init__(self, program: Program, op: dict[str, Any], gemm: str = "auto",
                 ranges: list[tuple[int, int] | None] | None = None, f32_max_k: int | None = None):
        super().__init__(program, op, gemm, ranges, f32_max_k)
        name = self.name
        at = op["attrs"]
        a = lambda n: int_attr(at[n], f"op '{name}' attribute '{n}'")  # noqa: E731
        self.heads, self.frac = a("heads"), a("score_frac")
        self.zp_q, self.zp_k, self.zp_v = a("zp_q"), a("zp_k"), a("zp_v")
        self.score_mult, self.score_shift = a("score_mult"), a("score_shift")
        self.E, self.P, self.G = a("exp_frac_bits"), a("prob_bits"), a("recip_frac")
        self.mult, self.shift = a("mult"), a("shift")
        self.zp, self.lo, self.hi = a("zp"), a("lo"), a("hi")
        t = lambda n: i64(program.t(op, n))  # noqa: E731
        self.exp_table, self.thresholds, self.decode = t("exp_table"), t("thresholds"), t("decode")
        self.tokens, self.bias_table, self.rel_index = t("tokens"), t("bias_table"), t("rel_index")
        self.mask = np.ascontiguousarray(program.t(op, "mask"), dtype=np.int8)
        nW, n = self.tokens.shape
        if self.exp_table.shape[0] != 1 << self.E or self.exp_table[0] < 1:
            raise ProgramError(f"op '{name}': exp_table must have 2^exp_frac_bits entries, the first positive")
        if self.decode.shape[0] != self.thresholds.shape[0] + 1:
            raise ProgramError(f"op '{name}': decode must have one entry more than thresholds")
        if not 0 <= self.P + self.G <= MAX_SHIFT - 1 or not 0 <= self.frac <= 30:
            raise ProgramError(f"op '{name}': prob_bits + recip_frac or score_frac out of range")
        for s in (self.score_shift, self.shift, self.G):
            if not 0 <= s <= MAX_SHIFT:
                raise ProgramError(f"op '{name}': shift {s} outside 0..{MAX_SHIFT}")
        if self.rel_index.shape != (n, n) or self.mask.shape != (nW, n, n) or self.bias_table.shape[0] != self.heads:
            raise ProgramError(f"op '{name}': window tables of inconsistent shapes")
        if self.rel_index.size and (self.rel_index.min() < 0 or self.rel_index.max() >= self.bias_table.shape[1]):
            raise ProgramError(f"op '{name}': rel_index outside the bias table")
        if not np.array_equal(np.sort(self.tokens.ravel()), np.arange(nW * n)):
            raise ProgramError(f"op '{name}': the window token table is not a permutation of the tokens")
        if n and np.any(np.diagonal(self.mask, axis1=1, axis2=2) != 0):
            raise ProgramError(f"op '{name}': a query is masked from itself (empty softmax row)")
        # The softmax table indices of ``window_attention_i64`` are in range by the proof of
        # ``intsim.ops.attention.AttentionEngine`` (one softmax row spans one window of n tokens);
        # ``tokens`` (a permutation), ``rel_index`` (within the bias table's columns) and the
        # shapes of the window tables are checked above. The premises of that proof:
        if self.score_mult < 0 or int(self.exp_table.min()) < 0 or bool(np.any(np.diff(self.exp_table) > 0)) \
                or n * int(self.exp_table[0]) > attention.MAX_ROW_SUM:
            raise ProgramError(f"op '{name}': score_mult must be >= 0, exp_table non-negative and non-increasing "
                               f"with window tokens * exp_table[0] <= 2^62")
        self.sorted_thr = int(bool(np.all(np.diff(self.thresholds) >= 0)))
        self._nop = np.zeros((1, 1, 1, 1, 1), np.int64)

    def _run(self, q, k, v, want_p: bool):
        q, k, v = ints(q, k, v)
        if q.ndim != 3 or q.shape != k.shape or q.shape != v.shape or q.shape[2] % self.heads:
            raise ValueError(f"op '{self.name}': q, k, v must share a shape (B, T, H*d), got {q.shape}, {k.shape}, "
                             f"{v.shape}")
        B, T, D = q.shape
        nW, n = self.tokens.shape
        if T != nW * n:
            raise ValueError(f"op '{self.name}': {T} tokens, the window table covers {nW * n}")
        y = np.empty((B, T, D), np.int64)
        probs = np.zeros((B, nW, self.heads, n, n), np.int64) if want_p else self._nop
        na, no, npr = window_attention_kernel(
            q, k, v, self.heads, self.tokens, self.bias_table, self.rel_index, self.mask, self.frac,
            self.zp_q, self.zp_k, self.zp_v, self.score_mult, self.score_shift, self.E, self.exp_table, self.P,
            self.G, self.thresholds, self.sorted_thr, self.decode, self.mult, self.shift, self.zp, self.lo, self.hi,
            self.acc_lo, self.acc_hi, y, int(want_p), probs)
        return y, probs, {"acc": int(na), "out": int(no), "prob": int(npr)}

    def forward(self, q, k, v):
        y, _, c = self._run(q, k, v, False)
        return y, c

    def probabilities(self, q, k, v) -> np.ndarray:
        """The integer probabilities p (B, nW, H, n, n) (P fractional bits) the engine computes."""
        return self._run(q, k, v, True)[1]


ENGINE = WindowAttentionEngine


def window_probabilities(program: Program, op: dict[str, Any] | str, q, k, v) -> np.ndarray:
    """Integer probabilities (B, nW, H, n, n) of a ``window_attention`` op, computed by the engine kernel."""
    if isinstance(op, str):
        op = program.op(op)
    return WindowAttentionEngine(program, op).probabilities(q, k, v)


# ---- cost figures: MACs, bit operations, storage (called by intsim.studies.cost) -------------
def cost(prog: Program, op: dict[str, Any], c: dict[str, Any]) -> None:
    """As ``attention`` over the windows, plus the relative position bias table at accumulator
    width and the 1-bit mask; fills ``c`` in place."""
    attention.cost(prog, op, c)
    c["table_bits"] += prog.t(op, "bias_table").size * prog.settings["acc_bits"] + prog.t(op, "mask").size


def scratch_bits(prog: Program, op: dict[str, Any]) -> int:
    """One window's n x n probability matrix at ``prob_bits``."""
    n_tok = prog.t(op, "tokens").shape[1]
    return n_tok * n_tok * op["attrs"]["prob_bits"]


# ---- onnx lowering: the op as standard ONNX nodes (called by intsim.onnx_export) -------------
def lower_onnx(g, op: dict[str, Any], prog: Program, inputs: list[str]) -> str:
    """9.3: windows by ``Gather`` of the token table on the token axis, A = accsat(2^F dot + bias)
    with bias = bias_table[:, rel_index] (a ``Gather``), the masked softmax (m over valid positions by
    ``Where`` with -2^63, e = 0 where masked), then the encoding, decode and output GEMM of 4.4;
    the window reverse is a ``Gather`` with the inverse permutation of the token table."""
    q, k, v = inputs
    at = op["attrs"]
    T, D = (int(s) for s in prog.values[op["inputs"][0]]["shape"])
    H, Fb = int(at["heads"]), int(at["score_frac"])
    tokens = tensor64(prog, op, "tokens")
    nW, n = tokens.shape
    if D % H or nW * n != T or not np.array_equal(np.sort(tokens.ravel()), np.arange(T)):
        raise ProgramError(f"onnx export: window_attention {op['name']!r}: inconsistent heads, windows or token table")
    d = D // H
    P, G, E = int(at["prob_bits"]), int(at["recip_frac"]), int(at["exp_frac_bits"])
    if P + G >= 61 or not 0 <= Fb <= 30:
        raise ProgramError(f"onnx export: window_attention {op['name']!r}: prob_bits + recip_frac or score_frac out of range")
    Ab = prog.settings["acc_bits"]
    tok = g.const("tokens", tokens)

    def win(a: str, zp: int) -> str:                    # (B, T, D) -> (B, nW, H, n, d)
        w = g.node("Gather", [g.sub(a, g.i64(int(zp))), tok], name="window_partition", axis=1)
        return g.transpose(g.reshape(w, [-1, nW, n, H, d]), [0, 1, 3, 2, 4])

    qw, kw, vw = win(q, at["zp_q"]), win(k, at["zp_k"]), win(v, at["zp_v"])
    cmax = {c: max(int(at[f"zp_{c}"]), 2 ** int(prog.values[i]["bits"]) - 1 - int(at[f"zp_{c}"]))
            for c, i in zip("qkv", op["inputs"])}                        # max |code - zp|
    dot = g.matmul(qw, g.transpose(kw, [0, 1, 2, 4, 3]), d * cmax["q"] * cmax["k"], name="scores")
    bias = g.node("Gather", [g.const("bias_table", tensor64(prog, op, "bias_table")),
                             g.const("rel_index", tensor64(prog, op, "rel_index"))], name="rel_bias", axis=1)
    A = g.accsat(g.add(g.mul(dot, g.i64(2**Fb)), bias), Ab)              # (B, nW, H, n, n)
    mask = g.const("mask", np.asarray(prog.t(op, "mask"), np.int64).reshape(1, nW, 1, n, n))
    valid = g.node("Equal", [mask, g.i64(0)], name="valid")
    m = g.reduce("ReduceMax", g.node("Where", [valid, A, g.i64(-(2**63))], name="masked_scores"), -1)
    diff = g.sub(m, g.node("Where", [valid, A, m]))
    diff = g.node("Where", [valid, diff, g.i64(0)], name="masked_diff")
    u = g.rq(diff, int(at["score_mult"]), int(at["score_shift"]), amax=2**Ab - 1, nonneg=True)   # 0 <= m - A < 2^A
    e = g.node("Where", [valid, g.exp_of(u, tensor64(prog, op, "exp_table"), E), g.i64(0)], name="masked_exp")
    p = g.probs(e, P, G, int(tensor64(prog, op, "exp_table").max()))
    dec = g.encode_decode(p, tensor64(prog, op, "thresholds"), tensor64(prog, op, "decode"), prob_bits=P,
                          layout="NDCHW")                   # (batch, windows, heads, queries, keys)
    dmax = int(np.abs(tensor64(prog, op, "decode")).max())
    O = g.accsat(g.matmul(dec, vw, n * dmax * cmax["v"], name="output_gemm"), Ab)
    y = g.sat(g.add(g.rq(O, int(at["mult"]), int(at["shift"]), amax=2 ** (Ab - 1)), g.i64(int(at["zp"]))), at["lo"], at["hi"])
    y = g.reshape(g.transpose(y, [0, 1, 3, 2, 4]), [-1, nW * n, D])
    inverse = np.argsort(tokens.ravel()).astype(np.int64)
    return g.node("Gather", [y, g.const("tokens_inverse", inverse)], name="window_reverse", axis=1)
