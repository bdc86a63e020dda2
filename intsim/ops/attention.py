"""``attention``: scores, integer softmax, post-softmax encoding, table decode, times V (docs/integer-spec.md section 4.4).

Everything about this op type except its golden function (``reference.golden``) lives here:
its schema, its export from calibration state, its fake-quant forward, its engine builder and
its cost figures.

The engine's routes
-------------------
The scores ``A = (q - zp_q)(k - zp_k)^T`` per head (d products) and the decode product
``O = decode[code] (v - zp_v)`` (T products) are batched BLAS products (torch.matmul); the
integer softmax and threshold encoding between them run per row in a parallel Numba kernel, with
exact lookup tables built at construction (``softmax_tables``: e by score gap, code by
probability). Bounds, with ``qmax = max |q - zp_q|`` over the proven range of q (likewise k, v):

* scores in float32 when ``d * qmax * kmax <= 2^24``, else float64 when ``<= 2^53``;
* decode product: ``R`` = a proven bound of ``sum_j |decode[code[i, j]]|`` over any row, the
  smaller of ``T * max|decode|`` and the softmax-normalization bound of ``decode_row_bound``
  (the probabilities of a row sum to about 2^P, and ``|decode[code(p)]|`` is bounded by an
  affine function of p). One float32 GEMM when ``R * vmax <= 2^24``; else ``decode`` is split
  into ``np <= 3`` base-``2^s`` digits (``decode = sum_i digit_i 2^(s i)``, low digits in
  ``[0, 2^s)``, the top digit signed) with ``T * max|digit_i| * vmax <= 2^24`` per digit, the np
  products one batched GEMM (digit matrices stacked along rows) recombined in int64; else float64
  when ``R * vmax <= 2^53``; else the whole op runs in the int64 kernel.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from intsim.kernels.attention import attention_i64, attn_output, attn_softmax
from intsim.kernels.gemm import F32_EXACT, F64_EXACT, data_range, torch_module
from intsim.kernels.numeric import MAX_SHIFT, narrow_ok, rq_int, rq_offsets, rshift_array
from intsim.program import quantizers as Q
from intsim.program.fixedpoint import ExportError, check_mult_shift
from intsim.program.program import Program, ProgramError

from .base import (WIDE, EngineOp, as_int_input, check_in, check_out_range, check_shape, check_shifts, i64, tensor64,
                   value_range, value_width)

NAME = "attention"
SPEC = "4.4"
INPUTS = 3
ATTRS = ('heads', 'zp_q', 'zp_k', 'zp_v', 'score_mult', 'score_shift', 'exp_frac_bits', 'exp_bits', 'prob_bits', 'recip_frac', 'decode_bits', 'mult', 'shift', 'zp', 'lo', 'hi', 'softmax_quant')
# tensor name -> (dtype, shape symbols); the symbols are listed in intsim.ops.base.SHAPE_SYMBOLS
TENSORS = {
    "exp_table": ('int64', ('E',)),
    "thresholds": ('int64', ('Q',)),
    "decode": ('int64', ('Q+1',)),
}
# tensors read only by the fake-quant reference
FLOAT = {
    "levels": ('float64', ('Q+1',)),
}


# ---- export: calibration state -> program attrs and tensors (called by calib) ----------------
def exp_table(E: int, X: int) -> np.ndarray:
    """The exp table of spec 4.4, int64 (2^E,): ``exp_table[j] = rnd(2^(X - j / 2^E))``."""
    j = np.arange(1 << E, dtype=np.float64)
    return Q.rnd(np.exp2(X - j / 2.0 ** E)).astype(np.int64)


def softmax_constants(b, name: str, q: str, k: str, v: str, heads: int, sq,
                      score_frac: int = 0) -> tuple[dict, dict[str, np.ndarray]]:
    """The attributes and tensors of the integer softmax attention (shared with
    ``window_attention``): the score rescale of ``s_q s_k 2^-score_frac / sqrt(d)`` into base-2
    exponent units with E fractional bits, the exp table, the post-softmax thresholds and decode
    table of ``sq`` (a :class:`intsim.program.quantizers.SoftmaxQuantizer`), the output rescale."""
    s = b.s
    E, X, P, G, L = s["exp_frac_bits"], s["exp_bits"], s["prob_bits"], s["recip_frac"], s["decode_bits"]
    if sq.bits != s["abits"]:
        raise ExportError(f"{name}: post-softmax quantizer has {sq.bits} bits, abits is {s['abits']}")
    d = b.values[q]["shape"][-1] // heads
    m_s, n_s = b.mult_shift(f"{name} score rescale",
                            b.sc(q) * b.sc(k) * 2.0 ** -score_frac / math.sqrt(d) * 2.0 ** E / math.log(2.0))
    m_o, n_o = b.mult_shift(f"{name} output rescale", b.sc(v) * 2.0 ** -L / b.sc(name))
    lo, hi = b.out_range(name)
    attrs = {"heads": int(heads), "zp_q": b.zp(q), "zp_k": b.zp(k), "zp_v": b.zp(v),
             "score_mult": m_s, "score_shift": n_s, "exp_frac_bits": E, "exp_bits": X, "prob_bits": P,
             "recip_frac": G, "decode_bits": L, "mult": m_o, "shift": n_o, "zp": b.zp(name),
             "lo": lo, "hi": hi, "softmax_quant": sq.to_dict()}
    tensors = {"exp_table": exp_table(E, X), "thresholds": Q.thresholds(sq, P), "decode": Q.decode_table(sq, L),
               "levels": sq.levels()}
    return attrs, tensors


def export(b, name: str, q: str, k: str, v: str, heads: int, sq) -> None:
    """Append the ``attention`` op ``name`` (section 4.4) over the codes ``q``, ``k``, ``v`` with
    ``heads`` heads and the post-softmax quantizer ``sq``; the output value must be declared."""
    attrs, tensors = softmax_constants(b, name, q, k, v, heads, sq)
    b.op(name, NAME, [q, k, v], attrs, tensors)


#: Largest sum of exp values over one softmax row (``T * exp_table[0]``): far from int64 overflow,
#: and every product ``e * inv`` of the kernels stays below 2^63 (``inv <= 2^(P+G) <= 2^48``).
MAX_ROW_SUM = 1 << 62
#: Largest |decode| entry (int32; the decode product ``sum_j decode (v - zp_v)`` of a row stays
#: below 2^62 by the check ``T * max|decode| * (2^abits - 1) <= 2^62``).
MAX_DECODE = (1 << 31) - 1


def check_softmax_bounds(prog, op, row_tokens: int | None = None) -> None:
    """Section 8 on the softmax constants of an ``attention`` / ``window_attention`` op (at export and
    at load): multipliers and shifts; the widths E, X, P, G, L equal to the settings (X <= 30,
    P + G <= 48, E <= 12); zero points within the input codes, the output clamp within the output
    codes; ``heads >= 1`` dividing the width; the exp table non-negative, non-increasing, with
    ``1 <= exp_table[0] <= 2^X`` and ``T * exp_table[0] <= 2^62`` (``T = row_tokens``, the scores of
    one softmax row; default the op's tokens); the thresholds sorted within ``0..2^P``; the decode
    table within int32 and ``T * max|decode| * (2^abits - 1) <= 2^62``; ``softmax_quant`` a quantizer of ``abits`` bits.
    These are the premises of the engine's construction-time proofs (``AttentionEngine``)."""
    s, name, a = prog.settings, op["name"], op["attrs"]
    check_mult_shift(name, [a["score_mult"], a["mult"]], [a["score_shift"], a["shift"]], s["mult_bits"])
    for k in ("exp_frac_bits", "exp_bits", "prob_bits", "recip_frac", "decode_bits"):
        if a[k] != s[k]:
            raise ExportError(f"{name}: {k} = {a[k]} breaks {k} == settings.{k} ({s[k]})")
    if a["exp_bits"] > 30 or a["prob_bits"] + a["recip_frac"] > 48 or a["exp_frac_bits"] > 12:
        raise ExportError(f"{name}: softmax widths out of bounds")
    n = (1 << s["abits"]) - 1
    if prog.t(op, "thresholds").shape != (n,) or prog.t(op, "decode").shape != (n + 1,):
        raise ExportError(f"{name}: threshold / decode tables of the wrong size")
    if prog.t(op, "exp_table").shape != (1 << a["exp_frac_bits"],):
        raise ExportError(f"{name}: exp table of the wrong size")
    q, k, v = op["inputs"]
    shape = list(prog.values[q]["shape"])
    for x in (k, v):
        check_shape(prog, op, x, shape, "the shape of q")
    check_shape(prog, op, op["output"], shape, "the shape of q")
    check_in(name, "heads", a["heads"], 1, shape[-1])
    if shape[-1] % a["heads"]:
        raise ExportError(f"{name}: heads = {a['heads']} breaks heads divides the width {shape[-1]}")
    for zname, x in (("zp_q", q), ("zp_k", k), ("zp_v", v)):
        check_in(name, zname, a[zname], *value_range(prog, x))
    check_out_range(prog, op, zp=True)
    X, P = a["exp_bits"], a["prob_bits"]
    et = prog.t(op, "exp_table").astype(np.int64)
    check_in(name, "exp_table[0]", et[0], 1, 1 << X)
    check_in(name, "exp_table", et, 0, 1 << X)
    if et.size > 1 and np.any(np.diff(et) > 0):
        j = int(np.nonzero(np.diff(et) > 0)[0][0])
        raise ExportError(f"{name}: exp_table[{j + 1}] = {int(et[j + 1])} breaks exp_table non-increasing "
                          f"(exp_table[{j}] = {int(et[j])})")
    T = int(row_tokens if row_tokens is not None else shape[0])
    if T * int(et[0]) > MAX_ROW_SUM:
        raise ExportError(f"{name}: exp_table[0] = {int(et[0])} breaks {T} tokens * exp_table[0] <= 2^62")
    thr = prog.t(op, "thresholds").astype(np.int64)
    check_in(name, "thresholds", thr, 0, 1 << P)
    if thr.size > 1 and np.any(np.diff(thr) < 0):
        raise ExportError(f"{name}: thresholds = {thr.tolist()[:8]}... breaks thresholds sorted")
    dec = prog.t(op, "decode").astype(np.int64)
    check_in(name, "decode", dec, -MAX_DECODE, MAX_DECODE)
    dmax, vmax = int(np.abs(dec).max(initial=0)), (1 << s["abits"]) - 1
    if T * dmax * vmax > MAX_ROW_SUM:
        raise ExportError(f"{name}: max |decode| = {dmax} breaks {T} tokens * max|decode| * (2^abits - 1) <= 2^62")
    try:
        d = dict(a["softmax_quant"])
        d.setdefault("bits", s["abits"])
        sq = Q.from_dict(d)
        bits = int(sq.bits)
        if not all(math.isfinite(float(x)) for k, x in d.items() if k not in ("type", "bits")):
            raise ValueError("a parameter is not finite")
    except (TypeError, ValueError, KeyError, AttributeError, ArithmeticError) as e:
        raise ExportError(f"{name}: softmax_quant = {str(a['softmax_quant'])[:60]} is not a post-softmax "
                          f"quantizer ({e})") from None
    if bits != s["abits"]:
        raise ExportError(f"{name}: softmax_quant bits = {bits} breaks bits == settings.abits ({s['abits']})")


def check_bounds(prog, op) -> None:
    """Section 8 on an ``attention`` op (:func:`check_softmax_bounds`)."""
    check_softmax_bounds(prog, op)


# ---- fake-quant forward: the paper's semantics in float (called by reference.fakequant) -------
# ``ctx`` is a reference.fakequant.FakeQuantContext (program, dtype, eps, params, ``ctx.F`` = the float
# functions of reference.functional); the model quantize-dequantizes the output value after the op.

def fq_prepare(ctx, op) -> dict:
    """The post-softmax function: the experiment's edit (if any), then the ``softmax_quant`` quantizer."""
    return {"probs": ctx.post_softmax(op)}


def fq_forward(ctx, op, q, k, v):
    """Float softmax(q k^T / sqrt(d)) v per head, probabilities quantized: (B, T, D) x3 -> (B, T, D)."""
    return ctx.F.attention(q, k, v, int(op["attrs"]["heads"]), ctx.params[op["name"]]["probs"])


# ---- engine: route choice, exactness proof, kernel call (called by intsim.engine) -------------
#: ``auto`` splits the decode table into at most this many float32 digits before float64.
MAX_AUTO_PARTS = 3
#: Rows of one softmax task (parallel work item): B * H * ceil(T / rows) tasks.
SOFTMAX_ROWS_PER_TASK = 8
#: Use the softmax-normalization bound of the decode product (``decode_row_bound``); tests turn it
#: off to exercise the digit split.
USE_ROW_BOUND = True
#: Largest exp table by score gap (int32 entries) and code table by probability (2^P int16 entries).
MAX_ETAB = 1 << 16
MAX_CTAB_BITS = 18


def digits(decode: np.ndarray, bits: int, n: int) -> np.ndarray:
    """decode = sum_i digit_i * 2^(bits * i): low digits in [0, 2^bits), the top one signed (floor)."""
    out = np.empty((decode.shape[0], n), np.int64)
    rest = decode.astype(np.int64).copy()
    for i in range(n - 1):
        out[:, i] = rest & ((1 << bits) - 1)
        rest = rest >> bits
    out[:, n - 1] = rest
    return out


@dataclass
class AttnRoute:
    route: str                  # "fast" or "int"
    score_dtype: Any = None     # np.float32 / np.float64
    pv_dtype: Any = None
    part_bits: int = 0
    parts: np.ndarray | None = None   # (Q+1, np) digits of decode, in pv_dtype
    why: str = ""


def decode_row_bound(decode: np.ndarray, thresholds: np.ndarray, T: int, P: int, G: int, tabmax: int) -> int:
    """An upper bound of ``sum_j |decode[code[i, j]]|`` over one softmax row of T tokens, from the
    softmax normalization (the probabilities of a row sum to about 2^P), proven from constants:

    * ``p_j = min(rshift(e_j inv, G), 2^P - 1) <= e_j inv / 2^G + 1/2``, ``inv = rdiv(2^(P+G), Z)
      <= 2^(P+G) / Z + 1/2`` and ``Z = sum_j e_j <= T * max(exp_table)`` (``e <= exp_table`` entry
      for nonnegative tables), so ``SP = sum_j p_j <= 2^P + T * max(exp_table) / 2^(G+1) + T / 2``;
    * for any ``a >= 0``: ``|decode[code(p)]| * 2^16 <= a * p + b`` for every p in ``0 .. 2^P - 1``
      with ``b = max_p (|decode[code(p)]| * 2^16 - a * p)``; code(p) is constant between
      consecutive thresholds, so that maximum is attained at p = 0 or at a threshold and is
      computed exactly there. Hence ``sum_j |decode| <= (a * SP + T * b) / 2^16``.

    The best of a few slopes a (and the plain ``T * max|decode|``) is returned.
    """
    dmax = int(np.abs(decode).max()) if decode.size else 0
    plain = T * dmax
    if G < 1 or tabmax < 0 or P < 1:
        return plain
    pmax = (1 << P) - 1
    sp = (1 << P) + -(-(T * tabmax) // (1 << (G + 1))) + -(-T // 2)
    u = np.sort(np.asarray(thresholds, np.int64))
    starts = np.unique(np.concatenate([[0], u[(u >= 0) & (u <= pmax)]]))       # left ends of the code intervals
    codes = np.searchsorted(u, starts, side="right")                              # code(p) = #{thresholds <= p}
    dec16 = np.abs(np.asarray(decode, np.int64))[codes] << 16
    pos = (starts > 0) & (dec16 > 0)
    cand = [0]
    if pos.any():
        r = -(-dec16[pos] // starts[pos])                                         # slopes through each start
        cand += sorted(set(np.quantile(r, np.linspace(0.0, 1.0, 9), method="higher").tolist()))
    best = plain
    for a in cand:
        b = max(int((dec16 - a * starts).max()), 0)
        best = min(best, -(-(a * sp + T * b) // (1 << 16)))
    return best


def attn_route(mode: str, d: int, T: int, qmax: int, kmax: int, vmax: int, decode: np.ndarray,
                name: str, row_bound: int | None = None) -> AttnRoute:
    """Choose the attention arithmetic (module docstring); ValueError when a forced route is not exact.

    ``row_bound``: a proven bound of ``sum_j |decode[code]|`` per row (``decode_row_bound``).
    """
    if mode == "int":
        return AttnRoute("int", why="gemm='int'")
    sb = d * qmax * kmax
    dmax = int(np.abs(decode).max()) if decode.size else 0
    pb = vmax * min(T * dmax, row_bound if row_bound is not None else T * dmax)
    # scores
    if sb <= F32_EXACT and mode != "f64":
        sdt = np.float32
    elif sb <= F64_EXACT and mode != "f32":
        sdt = np.float64
    else:
        if mode in ("float", "f32", "f64"):
            raise ValueError(f"attention '{name}': the score product is not exact in the requested "
                             f"float type (d={d}, max|q-zq|={qmax}, max|k-zk|={kmax})")
        return AttnRoute("int", why=f"score bound {sb} > 2^53")
    # decode product: float32 digits
    parts = None
    if mode != "f64" and T * vmax > 0:
        cap = MAX_AUTO_PARTS if mode != "f32" else 8
        for n in range(1, cap + 1):
            if n == 1:
                if pb <= F32_EXACT:
                    parts, bits = decode.reshape(-1, 1).astype(np.int64), 0
                    break
                continue
            bits = int(math.floor(math.log2(F32_EXACT / (T * vmax)))) if F32_EXACT >= T * vmax else 0
            while bits >= 1 and (1 << bits) * T * vmax > F32_EXACT:
                bits -= 1
            if bits < 1:
                break
            dg = digits(decode, bits, n)
            if all(int(np.abs(dg[:, i]).max()) * T * vmax <= F32_EXACT for i in range(n)):
                parts = dg
                break
    elif T * vmax == 0:
        parts, bits = decode.reshape(-1, 1).astype(np.int64), 0
    if parts is not None:
        return AttnRoute("fast", sdt, np.float32, bits, np.ascontiguousarray(parts, dtype=np.float32),
                          why=f"scores {np.dtype(sdt).name} (bound {sb}), decode product float32 in "
                              f"{parts.shape[1]} digit(s) of {bits} bits (bound {pb})")
    if pb <= F64_EXACT and mode != "f32":
        return AttnRoute("fast", sdt, np.float64, 0, np.ascontiguousarray(decode.reshape(-1, 1), dtype=np.float64),
                          why=f"scores {np.dtype(sdt).name} (bound {sb}), decode product float64 (bound {pb})")
    if mode in ("float", "f32", "f64"):
        raise ValueError(f"attention '{name}': the decode product is not exact in the requested float type "
                         f"(T={T}, max|decode|={dmax}, max|v-zv|={vmax})")
    return AttnRoute("int", why=f"decode product bound {pb} > 2^53")


def softmax_tables(exp_table: np.ndarray, score_mult: int, score_shift: int, E: int,
                    thresholds: np.ndarray, P: int, max_diff: int) -> tuple[np.ndarray, int, np.ndarray]:
    """Exact lookup tables of the softmax kernel (``intsim.kernels.attention.attn_softmax``).

    ``etab[diff]`` (int32) is ``e`` for the score gap ``diff = m - A`` (spec 4.4: ``u = rq(diff,
    score_mult, score_shift)``, ``e = rshift(exp_table[u & (2^E - 1)], u >> E)`` or 0 beyond shift
    62), computed here with the same integer formulas for the gaps ``0 .. len(etab) - 2``; the last
    entry is 0 (the value of every gap ``>= dz``).
    ``dz``: every gap ``>= dz`` has ``e = 0``. Proof: with ``score_mult >= 0`` u is nondecreasing in
    the gap; with ``0 <= exp_table < 2^b`` every ``u >= (b + 1) * 2^E`` has ``ip = u >> E >= b + 1``
    and ``rshift(t, ip) = (t >> ip) + bit ip-1 of t = 0`` for ``t < 2^(ip-1)`` (and ``ip > 62`` gives
    0 by definition). ``dz`` is the smallest gap reaching that u (binary search), or ``max_diff + 1``
    (never) when the premises fail or it is not reached. Gaps between ``len(etab)`` and ``dz`` are
    computed by the kernel itself.
    ``ctab[p]`` (int16) is the code of a probability p in ``0 .. 2^P - 1``: the number of thresholds
    ``<= p`` (the literal count of spec 4.4, order-independent); empty when ``P > MAX_CTAB_BITS``.
    """
    never = min(max_diff + 1, 2 ** MAX_SHIFT)
    tab = np.asarray(exp_table, np.int64)
    dz = never
    if score_mult >= 0 and tab.size and int(tab.min()) >= 0:
        ustop = (int(tab.max()).bit_length() + 1) << E
        top = never - 1
        if rq_int(top, score_mult, score_shift) >= ustop:
            lo, hi = 0, top                         # invariant: u(hi) >= ustop
            while lo < hi:
                mid = (lo + hi) // 2
                if rq_int(mid, score_mult, score_shift) >= ustop:
                    hi = mid
                else:
                    lo = mid + 1
            dz = lo
    ntab = int(min(dz, MAX_ETAB, never))
    diff = np.arange(ntab, dtype=np.int64)
    u = rshift_array(diff * np.int64(score_mult), score_shift)
    ip = u >> E
    e = np.where(ip <= MAX_SHIFT, rshift_array(tab[u & ((1 << E) - 1)], np.minimum(ip, MAX_SHIFT)), 0)
    if e.size and (int(e.min()) < -(2 ** 31) or int(e.max()) >= 2 ** 31):
        e = e[:0]                                      # not representable in int32: no table
    etab = np.ascontiguousarray(np.concatenate([e, [0]]), dtype=np.int32)     # + the 0 of gaps >= dz
    if P <= MAX_CTAB_BITS and thresholds.shape[0] < 2 ** 15:
        ctab = np.searchsorted(np.sort(thresholds), np.arange(1 << P, dtype=np.int64), side="right").astype(np.int16)
    else:
        ctab = np.zeros(0, np.int16)
    return etab, int(dz), ctab


class AttentionEngine(EngineOp):
    """Spec 4.4 on the engine (the routes are described in this module's docstring): the score and
    decode products in BLAS where ``attn_route`` proves them exact, the integer softmax, encoding
    and decode in ``intsim.kernels.attention``; else the whole op in int64."""

    def __init__(self, program: Program, op: dict[str, Any], gemm: str = "auto",
                 ranges: list[tuple[int, int] | None] | None = None, f32_max_k: int | None = None):
        super().__init__(program, op, gemm, ranges, f32_max_k)
        name = self.name
        self.heads = self.a("heads")
        self.zp_q, self.zp_k, self.zp_v = self.a("zp_q"), self.a("zp_k"), self.a("zp_v")
        self.score_mult, self.score_shift = self.a("score_mult"), self.a("score_shift")
        self.exp_frac_bits, self.prob_bits = self.a("exp_frac_bits"), self.a("prob_bits")
        self.recip_frac = self.a("recip_frac")
        self.mult, self.shift_ = self.a("mult"), self.a("shift")
        self.zp, self.lo, self.hi = self.a("zp"), self.a("lo"), self.a("hi")
        self.exp_table = i64(self.t("exp_table"))
        self.thresholds = i64(self.t("thresholds"))
        self.decode = i64(self.t("decode"))
        if self.exp_table.shape[0] != 1 << self.exp_frac_bits:
            raise ProgramError(f"op '{name}': exp_table has {self.exp_table.shape[0]} entries, "
                               f"expected 2^exp_frac_bits = {1 << self.exp_frac_bits}")
        if self.decode.shape[0] != self.thresholds.shape[0] + 1:
            raise ProgramError(f"op '{name}': decode must have one entry more than thresholds")
        if not 0 <= self.prob_bits + self.recip_frac <= MAX_SHIFT - 1:
            raise ProgramError(f"op '{name}': prob_bits + recip_frac outside 0..{MAX_SHIFT - 1}")
        if self.exp_table.size == 0 or self.exp_table[0] < 1:
            raise ProgramError(f"op '{name}': exp_table[0] must be positive (it is 2^exp_bits)")
        # Proof that every table index of the softmax kernels is in range (``_softmax_row``,
        # ``attention_i64``), from the bounds ``check_softmax_bounds`` validates at load (and the
        # Engine validates again); the premises the kernels need are re-checked here, cheaply,
        # because ``run_op`` may be handed a program that was never validated:
        # * ``etab[min(gap, ntab)]``: ``gap = m - A >= 0`` (m is the row maximum);
        # * ``exp_table[u & (2^E - 1)]``: the table has 2^E entries (checked above);
        # * ``ctab[p]``: with ``score_mult >= 0`` every ``u >= 0``, so ``e = rshift(exp_table[.], u >> E)``
        #   lies in ``0..max(exp_table) = exp_table[0]`` (a non-negative, non-increasing table);
        #   ``Z >= exp_table[0] >= 1`` (the maximum's gap is 0) and ``Z <= T exp_table[0] <= 2^62``
        #   (``max_row_tokens``, checked per call in ``forward``); ``inv = rdiv(2^(P+G), Z)`` in
        #   ``0..2^(P+G)``, ``e inv <= 2^(P+G) + Z / 2 < 2^63`` (no overflow), so ``p`` is in
        #   ``0..2^P - 1``, the indices of ``ctab``;
        # * ``parts[code]`` / ``decode[code]``: ``code`` = number of thresholds ``<= p`` is in ``0..N``
        #   and the decode table has N + 1 entries (checked above).
        if self.score_mult < 0 or int(self.exp_table.min()) < 0 or bool(np.any(np.diff(self.exp_table) > 0)):
            raise ProgramError(f"op '{name}': score_mult must be >= 0 and exp_table non-negative and non-increasing")
        self.max_row_tokens = MAX_ROW_SUM // int(self.exp_table[0])
        check_shifts(name, np.array([self.score_shift, self.shift_, self.recip_frac]))
        self.sorted_thresholds = int(bool(np.all(np.diff(self.thresholds) >= 0)))
        o_off, o_corr = rq_offsets(np.array([self.shift_]))
        self.out_off, self.out_corr = int(o_off[0]), int(o_corr[0])
        self.out_narrow = narrow_ok(self.acc_lo, self.acc_hi, np.array([self.mult]), np.array([self.shift_]))
        self.etab, self.dz, self.ctab = softmax_tables(
            self.exp_table, self.score_mult, self.score_shift, self.exp_frac_bits, self.thresholds,
            self.prob_bits, self.acc_hi - self.acc_lo)
        self._routes: dict[tuple, AttnRoute] = {}

    # ---- attention routes ------------------------------------------------------------------------
    def attn_route(self, T: int, qr: tuple[int, int], kr: tuple[int, int], vr: tuple[int, int], d: int) -> AttnRoute:
        key = (T, qr, kr, vr, d)
        r = self._routes.get(key)
        if r is None:
            qmax = max(abs(qr[0] - self.zp_q), abs(qr[1] - self.zp_q))
            kmax = max(abs(kr[0] - self.zp_k), abs(kr[1] - self.zp_k))
            vmax = max(abs(vr[0] - self.zp_v), abs(vr[1] - self.zp_v))
            rb = decode_row_bound(self.decode, self.thresholds, T, self.prob_bits, self.recip_frac,
                                   int(self.exp_table.max()) if int(self.exp_table.min()) >= 0 else -1) \
                if USE_ROW_BOUND else None
            r = attn_route(self.mode, d, T, qmax, kmax, vmax, self.decode, self.name, rb)
            self._routes[key] = r
        return r

    def attention_core(self, qh: np.ndarray, kh: np.ndarray, vh: np.ndarray, route: AttnRoute,
                       out: np.ndarray, pool: Any = None) -> dict[str, int]:
        """The float route of spec 4.4 on centered head-major operands: ``qh`` (B, H, T, d),
        ``kh`` (B, H, T, d), ``vh`` (B, H, T, d), float32 (exact by the route's proof);
        writes ``out`` (B, T, H * d) (uint8 or float32 codes, or int64)."""
        torch = torch_module()
        B, H, T, d = qh.shape
        G = B * H
        get = pool.get if pool is not None else (lambda shape, dt: np.empty(shape, dt))
        npart = route.parts.shape[1]
        if route.score_dtype == np.float32:
            S = get((G, T, T), np.float32)
            torch.matmul(torch.from_numpy(qh.reshape(G, T, d)), torch.from_numpy(kh.reshape(G, T, d)).transpose(1, 2),
                         out=torch.from_numpy(S))
        else:
            S = torch.matmul(torch.from_numpy(qh).double(),
                             torch.from_numpy(kh).double().transpose(2, 3)).numpy().reshape(G, T, T)
        P = get((G, npart * T, T), route.pv_dtype)
        na1, npr = attn_softmax(S, self.acc_lo, self.acc_hi, self.score_mult, self.score_shift,
                                  self.exp_frac_bits, self.exp_table, self.etab, self.dz, self.prob_bits,
                                  self.recip_frac, self.thresholds, self.sorted_thresholds, self.ctab,
                                  route.parts, P, SOFTMAX_ROWS_PER_TASK)
        if pool is not None and S.dtype == np.float32:
            pool.put(S)
        V = torch.from_numpy(vh.reshape(G, T, d))
        if route.pv_dtype == np.float64:
            V = V.double()
        O = get((G, npart * T, d), route.pv_dtype)
        torch.matmul(torch.from_numpy(P), V, out=torch.from_numpy(O))
        if pool is not None:
            pool.put(P)
        na2, no = attn_output(O, route.part_bits, self.mult, self.shift_, self.out_off, self.out_corr,
                                self.out_narrow, self.zp, self.lo, self.hi, self.acc_lo, self.acc_hi, H, out,
                                SOFTMAX_ROWS_PER_TASK)
        if pool is not None:
            pool.put(O)
        return {"acc": int(na1 + na2), "out": int(no), "prob": int(npr)}

    def forward(self, q: np.ndarray, k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, dict[str, int]]:
        q, k, v = (as_int_input(z, self.name) for z in (q, k, v))
        if q.ndim != 3 or q.shape != k.shape or q.shape != v.shape or q.shape[2] % self.heads:
            raise ValueError(f"op '{self.name}': q, k, v must share a shape (B, T, H*d), got {q.shape}, {k.shape}, {v.shape}")
        B, T, D = q.shape
        if T > self.max_row_tokens:
            raise ValueError(f"op '{self.name}': {T} tokens; the exp table allows at most {self.max_row_tokens} "
                             f"(T * exp_table[0] <= 2^62)")
        H = self.heads
        d = D // H
        rs = [r if r is not None else data_range(z) for r, z in zip(self.ranges, (q, k, v))]
        route = self.attn_route(T, rs[0], rs[1], rs[2], d) if B * T * D else AttnRoute("int")
        self.last_route = route.route
        if route.route == "int":
            return self.attention_int(q, k, v)

        def heads(z: np.ndarray, zp: int) -> np.ndarray:
            return (z - zp).reshape(B, T, H, d).transpose(0, 2, 1, 3)

        qh = np.ascontiguousarray(heads(q, self.zp_q), dtype=np.float32)
        kh = np.ascontiguousarray(heads(k, self.zp_k), dtype=np.float32)
        vh = np.ascontiguousarray(heads(v, self.zp_v), dtype=np.float32)
        y = np.empty((B, T, D), np.int64)
        c = self.attention_core(qh, kh, vh, route, y)
        return y, c

    def attention_int(self, q: np.ndarray, k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, dict[str, int]]:
        """Spec 4.4 entirely in int64 on the codes q, k, v (B, T, D) int64."""
        y, na, no, npr = attention_i64(
            q, k, v, self.heads, self.zp_q, self.zp_k, self.zp_v, self.score_mult, self.score_shift,
            self.exp_frac_bits, self.prob_bits, self.recip_frac, self.mult, self.shift_, self.zp,
            self.lo, self.hi, self.acc_lo, self.acc_hi, self.exp_table, self.thresholds, self.decode,
            self.sorted_thresholds)
        return y, {"acc": int(na), "out": int(no), "prob": int(npr)}


ENGINE = AttentionEngine


# ---- cost figures: MACs, bit operations, storage (called by intsim.studies.cost) -------------
def cost(prog: Program, op: dict[str, Any], c: dict[str, Any]) -> None:
    """MACs / BOPs of the score and decode products and the softmax tables (docs/cost-model.md);
    fills ``c`` in place. Shared by ``window_attention`` (its pairs come from the window table)."""
    s, vals, at = prog.settings, prog.values, op["attrs"]
    t, d_model = vals[op["inputs"][0]]["shape"]
    heads = at["heads"]
    d = d_model // heads
    pairs = t * t
    if op["type"] == "window_attention":
        n_win, n_tok = prog.t(op, "tokens").shape      # windowed: nW windows of n x n
        pairs = n_win * n_tok * n_tok
    ab = s["abits"]
    L, E, X, P = at["decode_bits"], at["exp_frac_bits"], at["exp_bits"], at["prob_bits"]
    n_codes = len(prog.t(op, "thresholds"))
    score_macs = heads * pairs * d
    pv_macs = heads * pairs * d
    c["macs"][f"{ab}x{ab}"] = score_macs
    c["macs"][f"{L + 1}x{ab}"] = pv_macs
    c["bops"] = score_macs * ab * ab + pv_macs * (L + 1) * ab
    c["table_bits"] = (2 ** E) * (X + 1) + n_codes * P + (n_codes + 1) * (L + 1)
    c["datapath_bits"] = 64 if P + at["recip_frac"] > 31 else 32


def scratch_bits(prog: Program, op: dict[str, Any]) -> int:
    """One head's T x T probability matrix at ``prob_bits``."""
    t = prog.values[op["inputs"][0]]["shape"][0]
    return t * t * op["attrs"]["prob_bits"]


# ---- test vectors: the arrays a hardware testbench checks (called by intsim.studies.vectors) ---

#: the op's inputs by role, in input order
VECTOR_ROLES = ("q", "k", "v")


def vector_arrays(program: Program, op: dict[str, Any], steps: dict[str, np.ndarray]) -> list[tuple]:
    """The arrays of a test vector of this op beyond its inputs, attributes and output (``intsim vectors``)."""
    out: list = []
    at = op["attrs"]
    Ab = int(program.settings["acc_bits"])
    X, P, L = at["exp_bits"], at["prob_bits"], at["decode_bits"]
    a_bits = value_width(program, op["output"])[0]
    out.append(("exp_table", tensor64(program, op, "exp_table"), X + 1, False, "table",
            "exp_table[j] = rnd(2^X 2^(-j / 2^E)) (2^E)"))
    out.append(("thresholds", tensor64(program, op, "thresholds"), P + 1, False, "table",
            "thresholds[k-1]: smallest P-bit probability with code >= k (N)"))
    out.append(("decode", tensor64(program, op, "decode"), L + 1, False, "table",
            "decode[k] = rnd(level_k 2^L) (N + 1), decode[0] = 0"))
    st = steps
    out.append(("A_raw", st["A_raw"], WIDE, True, "intermediate",
            "scores sum_r (q[i, r] - zp_q)(k[j, r] - zp_k) per head (B, H, T, T), exact, before accsat"))
    out.append(("A", st["A"], Ab, True, "intermediate", "accsat(A_raw): the score accumulator (B, H, T, T)"))
    out.append(("m", st["m"][..., 0], Ab, True, "intermediate", "row maximum m[i] = max_j A[i, j] (B, H, T)"))
    out.append(("u", st["u"], WIDE, True, "intermediate", "u = rq(m - A, score_mult, score_shift) >= 0 (B, H, T, T)"))
    out.append(("e", st["e"], X + 1, False, "intermediate", "e = rshift(exp_table[u & (2^E-1)], u >> E), 0 if u >> E > 62"))
    out.append(("Z", st["Z"][..., 0], WIDE, True, "intermediate", "row sum Z[i] = sum_j e[i, j] (B, H, T)"))
    out.append(("inv", st["inv"][..., 0], WIDE, True, "intermediate", "row reciprocal inv[i] = rdiv(2^(P+G), Z[i]) (B, H, T)"))
    out.append(("p", st["p"], P, False, "intermediate", "probability min(rshift(e inv, G), 2^P - 1) (B, H, T, T)"))
    out.append(("code", st["code"], a_bits, False, "intermediate",
            "post-softmax code = #{k: p >= thresholds[k-1]} (B, H, T, T)"))
    out.append(("dec", st["dec"], L + 1, False, "intermediate", "decode[code] (B, H, T, T)"))
    out.append(("O_raw", st["O_raw"], WIDE, True, "intermediate",
            "sum_j decode[code[i, j]] (v[j, r] - zp_v) per head (B, H, T, d), exact, before accsat"))
    out.append(("O", st["O"], Ab, True, "intermediate", "accsat(O_raw): the output accumulator (B, H, T, d)"))
    out.append(("rq", st["rq"], WIDE, True, "intermediate", "rq(O, mult, shift) (B, H, T, d)"))
    return out


# ---- onnx lowering: the op as standard ONNX nodes (called by intsim.onnx_export) -------------
def lower_onnx(g, op: dict[str, Any], prog: Program, inputs: list[str]) -> str:
    """4.4 per image and head: heads by Reshape/Transpose, A = accsat((q - zp_q)(k - zp_k)^T) as an
    int64 ``MatMul``, m = ReduceMax, u = rq(m - A), e by the exp table (``OnnxGraph.exp_of``), p by the
    row reciprocal (``OnnxGraph.probs``), the threshold encoding and the decode table
    (``OnnxGraph.encode_decode``), O = accsat(dec (v - zp_v)), y = sat(rq(O) + zp)."""
    q, k, v = inputs
    at = op["attrs"]
    T, D = (int(s) for s in prog.values[op["inputs"][0]]["shape"])
    H = int(at["heads"])
    if D % H:
        raise ProgramError(f"onnx export: attention {op['name']!r}: width {D} is not a multiple of {H} heads")
    d = D // H
    P, G, E = int(at["prob_bits"]), int(at["recip_frac"]), int(at["exp_frac_bits"])
    if P + G >= 61:
        raise ProgramError(f"onnx export: attention {op['name']!r}: prob_bits + recip_frac = {P + G} >= 61")
    Ab = prog.settings["acc_bits"]

    def heads(a: str, zp: int) -> str:                  # (B, T, D) -> (B, H, T, d)
        return g.transpose(g.reshape(g.sub(a, g.i64(int(zp))), [-1, T, H, d]), [0, 2, 1, 3])

    qh, kh, vh = heads(q, at["zp_q"]), heads(k, at["zp_k"]), heads(v, at["zp_v"])
    cmax = {n: max(int(at[f"zp_{n}"]), 2 ** int(prog.values[i]["bits"]) - 1 - int(at[f"zp_{n}"]))
            for n, i in zip("qkv", op["inputs"])}                        # max |code - zp|
    A = g.accsat(g.matmul(qh, g.transpose(kh, [0, 1, 3, 2]), d * cmax["q"] * cmax["k"], name="scores"), Ab)
    m = g.reduce("ReduceMax", A, -1)
    u = g.rq(g.sub(m, A), int(at["score_mult"]), int(at["score_shift"]), amax=2**Ab - 1, nonneg=True)   # 0 <= m - A < 2^A
    e = g.exp_of(u, tensor64(prog, op, "exp_table"), E)
    p = g.probs(e, P, G, int(tensor64(prog, op, "exp_table").max()))
    dec = g.encode_decode(p, tensor64(prog, op, "thresholds"), tensor64(prog, op, "decode"), prob_bits=P,
                          layout="NCHW")                                   # (batch, heads, queries, keys)
    dmax = int(np.abs(tensor64(prog, op, "decode")).max())
    O = g.accsat(g.matmul(dec, vh, T * dmax * cmax["v"], name="output_gemm"), Ab)
    y = g.sat(g.add(g.rq(O, int(at["mult"]), int(at["shift"]), amax=2 ** (Ab - 1)), g.i64(int(at["zp"]))), at["lo"], at["hi"])
    return g.reshape(g.transpose(y, [0, 2, 1, 3]), [-1, T, D])
