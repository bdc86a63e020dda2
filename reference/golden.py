"""The golden model: docs/integer-spec.md in executable form.

Plain numpy on int64, written to be checked line by line against the specification (section
numbers are quoted next to the code). It shares no code with the engine (``intsim/``) and reads
no float scale: only the integer tensors and integer attributes of the program. Every place where
an int64 could overflow is asserted on the actual data, so an overflow can never pass silently.

    res = run(program, images)        # images uint8 (B, C, H, W)
    res.logits, res.scale, res.counts, res.values

``OPS[type](program, op, *inputs) -> (y, counts)`` evaluates one op; ``counts`` is
``{"acc": .., "out": .., "prob": ..}``, the number of elements changed by each saturation point.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

I64_MIN, I64_MAX = -(2**63), 2**63 - 1


# ---- int64 guards -------------------------------------------------------------------------

def _i64(a: Any) -> np.ndarray:
    return np.asarray(a, dtype=np.int64)


def _exact(f: Callable, a: Any, b: Any) -> np.ndarray:
    """f(a, b) for f in (operator.add, operator.sub, operator.mul) in int64, asserting that no element
    leaves int64. When the bound max|a| * max|b| (mul) or max|a| + max|b| (add, sub), computed with
    Python integers, fits int64, no element can overflow. Otherwise a float64 estimate (error far
    below 2^61) clears the small elements and the rest are decided exactly with Python integers."""
    a, b = _i64(a), _i64(b)
    ma, mb = _absmax(a), _absmax(b)
    if (ma * mb if f is operator.mul else ma + mb) <= I64_MAX:
        return f(a, b)
    a, b = np.broadcast_arrays(a, b)
    big = np.abs(f(a.astype(np.float64), b.astype(np.float64))) >= 2.0**62
    if big.any():
        for x, y in zip(a[big].tolist(), b[big].tolist()):
            assert I64_MIN <= f(x, y) <= I64_MAX, f"int64 overflow: {f.__name__}({x}, {y})"
    return f(a, b)


def _mul(a: Any, b: Any) -> np.ndarray:
    return _exact(operator.mul, a, b)


def _add(a: Any, b: Any) -> np.ndarray:
    return _exact(operator.add, a, b)


def _sub(a: Any, b: Any) -> np.ndarray:
    return _exact(operator.sub, a, b)


def _absmax(a: np.ndarray) -> int:
    """max |a| as a Python int (0 for an empty array)."""
    return max(abs(int(a.min())), abs(int(a.max()))) if a.size else 0


def _assert_dot_fits(k: int, x: np.ndarray, w: np.ndarray, bias: np.ndarray | int = 0) -> None:
    """Bound of an exact sum of k products plus a bias: k * max|x| * max|w| + max|bias| < 2^63."""
    bound = k * _absmax(x) * _absmax(w) + _absmax(_i64(bias))
    assert bound <= I64_MAX, f"a sum of {k} products may overflow int64 (bound {bound})"


def _dot(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """The integer product ``x @ w`` (matmul broadcasting rules), exact, as int64.

    numpy has no BLAS for int64, so when k * max|x| * max|w| <= 2^53 (k the summed length) the
    product is taken in float64 and converted back: every product and every partial sum, in any
    order of summation, is then an integer of magnitude at most 2^53, which float64 represents
    exactly, so the result equals the int64 product. Otherwise the int64 product is used."""
    k = x.shape[-1]
    if k * _absmax(x) * _absmax(w) <= 2**53:
        return np.matmul(x.astype(np.float64), w.astype(np.float64)).astype(np.int64)
    return np.matmul(x, w)


# ---- section 1: the rounding rule and saturation --------------------------------------------

def rshift(a: Any, n: Any) -> np.ndarray:
    """rshift(a, n): a if n == 0; floor((a + 2^(n-1)) / 2^n) for 1 <= n <= 62; a * 2^-n for n < 0.

    For n >= 1 the sum a + 2^(n-1) is not formed (it could overflow for a near 2^63); with
    a = q * 2^n + r, 0 <= r < 2^n, floor((a + 2^(n-1)) / 2^n) = q + (r >= 2^(n-1)), and
    q = a >> n (arithmetic shift = floor), (r >= 2^(n-1)) = bit n-1 of a = (a >> (n-1)) & 1.
    """
    a, n = _i64(a), _i64(n)
    assert (n <= 62).all(), "rshift: shift above 62"
    if (n >= 1).all():                                     # the usual case, without the select below
        return (a >> n) + ((a >> (n - 1)) & 1)
    a, n = np.broadcast_arrays(a, n)
    m = np.maximum(n, 1)                                   # the shift used where n >= 1
    y = np.where(n >= 1, (a >> m) + ((a >> (m - 1)) & 1), a)
    if (n < 0).any():                                      # never produced by the exporter
        assert (n >= -62).all(), "rshift: left shift beyond 62"
        y = np.where(n < 0, _mul(a, np.int64(1) << np.clip(-n, 0, 62)), y)
    return y


def rq(a: Any, m: Any, n: Any) -> np.ndarray:
    """Section 2: rq(a, m, n) = rshift(a * m, n); |a * m| < 2^63 is asserted on the data."""
    return rshift(_mul(a, m), n)


def rdiv(a: Any, b: Any) -> np.ndarray:
    """rdiv(a, b) = floor((2a + b) / (2b)) for b > 0 (numpy // on int64 is floor division)."""
    a, b = np.broadcast_arrays(_i64(a), _i64(b))
    assert (b > 0).all(), "rdiv: divisor must be > 0"
    assert (np.abs(a) < 2**61).all() and (b < 2**61).all(), "rdiv: 2a + b may overflow int64"
    return (2 * a + b) // (2 * b)


def isqrt(v: Any) -> np.ndarray:
    """Exact floor square root, element by element with Python's math.isqrt."""
    v = _i64(v)
    assert (v >= 0).all(), "isqrt of a negative number"
    return np.array([math.isqrt(x) for x in v.ravel().tolist()], dtype=np.int64).reshape(v.shape)


def sat(v: Any, lo: int, hi: int) -> tuple[np.ndarray, int]:
    """sat(v, lo, hi) = min(max(v, lo), hi) and the number of elements it changed."""
    v = _i64(v)
    y = np.minimum(np.maximum(v, np.int64(lo)), np.int64(hi))
    return y, int(np.count_nonzero(y != v))


def accsat(v: Any, acc_bits: int) -> tuple[np.ndarray, int]:
    """accsat(v) = sat(v, -2^(A-1), 2^(A-1) - 1) and the number of elements it changed."""
    assert 1 <= acc_bits <= 64
    return sat(v, -(2 ** (acc_bits - 1)), 2 ** (acc_bits - 1) - 1)


def _counts(acc: int = 0, out: int = 0, prob: int = 0) -> dict[str, int]:
    return {"acc": acc, "out": out, "prob": prob}


def _t(program: Any, op: dict, name: str) -> np.ndarray:
    return _i64(program.t(op, name))


# ---- section 4.1: linear ------------------------------------------------------------------

def linear(program: Any, op: dict, x: np.ndarray) -> tuple[np.ndarray, dict[str, int]]:
    at = op["attrs"]
    w, bias = _t(program, op, "w"), _t(program, op, "bias")                       # (N, K), (N)
    mult, shift, zp = _t(program, op, "mult"), _t(program, op, "shift"), _t(program, op, "zp")
    x = _i64(x)                                                                      # (B, T, K)
    assert x.shape[-1] == w.shape[1]
    _assert_dot_fits(w.shape[1], x, w, bias)
    acc, n_acc = accsat(bias + _dot(x, w.T), program.settings["acc_bits"])          # acc[t, c]
    y, n_out = sat(_add(rq(acc, mult, shift), zp), at["lo"], at["hi"])               # y[t, c]
    return y, _counts(acc=n_acc, out=n_out)


# ---- section 4.2: patch_embed -------------------------------------------------------------

def patch_embed(program: Any, op: dict, image: np.ndarray) -> tuple[np.ndarray, dict[str, int]]:
    at = op["attrs"]
    p = at["patch"]
    w, bias = _t(program, op, "w"), _t(program, op, "bias")                        # (D, C*p*p), (D)
    mult, shift, pos = _t(program, op, "mult"), _t(program, op, "shift"), _t(program, op, "pos")
    img = _i64(image)
    B, C, H, W = img.shape
    assert H % p == 0 and W % p == 0, "image size is not a multiple of the patch size"
    # x[b, 1 + i*(W/p) + j, (ch*p + ky)*p + kx] = image[b, ch, i*p + ky, j*p + kx]
    x = img.reshape(B, C, H // p, p, W // p, p).transpose(0, 2, 4, 1, 3, 5).reshape(B, (H // p) * (W // p), C * p * p)
    assert pos.shape[0] == x.shape[1] + 1 and w.shape[1] == C * p * p
    _assert_dot_fits(w.shape[1], x, w, bias)
    acc, n_acc = accsat(bias + _dot(x, w.T), program.settings["acc_bits"])          # tokens 1..P
    patches = _add(rq(acc, mult, shift), pos[1:])                                   # rq(acc) + pos[t], t >= 1
    cls = np.broadcast_to(pos[0], (B, 1, pos.shape[1]))                            # class token: pos[0]
    y, n_out = sat(np.concatenate([cls, patches], axis=1), at["lo"], at["hi"])
    return y, _counts(acc=n_acc, out=n_out)


# ---- section 4.3: layernorm ---------------------------------------------------------------

def layernorm(program: Any, op: dict, x: np.ndarray) -> tuple[np.ndarray, dict[str, int]]:
    at = op["attrs"]
    K, F, S = at["recip_bits"], at["norm_frac"], at["shift"]
    gmul, gadd = _t(program, op, "gmul"), _t(program, op, "gadd")
    x = _i64(x)
    assert at["tokens"] in ("all", "first"), f"layernorm tokens {at['tokens']!r}"
    if at["tokens"] == "first":
        x = x[:, :1, :]                                     # only the class token
    D = x.shape[-1]
    # S1, S2, c, V below stay within D^2 * max|x|^2 in magnitude
    assert D * D * _absmax(x) ** 2 <= I64_MAX, "layernorm: row sums may overflow int64"
    assert 0 <= K - F <= 62                               # (rdiv asserts 2^K < 2^61)
    S1 = x.sum(axis=-1, keepdims=True)
    S2 = (x * x).sum(axis=-1, keepdims=True)
    c = D * x - S1
    V = D * S2 - S1 * S1
    assert (V >= 0).all()
    sd = isqrt(V)
    inv = np.where(sd == 0, 0, rdiv(2**K, np.maximum(sd, 1)))   # 0 if sd == 0 else rdiv(2^K, sd)
    n = rshift(_mul(c, inv), K - F)
    y, n_out = sat(_add(rshift(_add(_mul(n, gmul), gadd), S), at["zp"]), at["lo"], at["hi"])
    return y, _counts(out=n_out)


# ---- section 4.4: attention ---------------------------------------------------------------

def int_softmax(A: np.ndarray, exp_table: np.ndarray, score_mult: int, score_shift: int,
                E: int, P: int, G: int) -> tuple[np.ndarray, int]:
    """Integer softmax over the last axis of the scores A: returns p (P fractional bits) and the
    number of probabilities clamped to 2^P - 1."""
    assert len(exp_table) == 2**E and 2**(P + G) < 2**61
    m = A.max(axis=-1, keepdims=True)                                  # m[i]
    u = rq(_sub(m, A), score_mult, score_shift)                        # u[i, j] >= 0
    assert (u >= 0).all()
    hi_part, lo_part = u >> E, u & (2**E - 1)
    e = np.where(hi_part <= 62, rshift(exp_table[lo_part], np.minimum(hi_part, 62)), 0)
    _assert_dot_fits(A.shape[-1], e, np.int64(1))
    Z = e.sum(axis=-1, keepdims=True)                                  # Z[i]
    inv = rdiv(2 ** (P + G), Z)                                        # inv[i] (asserts Z > 0)
    p, n_prob = sat(rshift(_mul(e, inv), G), I64_MIN, 2**P - 1)        # min(., 2^P - 1)
    return p, n_prob


def encode(p: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """code = number of k in 1..N with p >= thresholds[k-1]."""
    code = np.zeros(np.shape(p), dtype=np.int64)
    for t in _i64(thresholds).tolist():
        code += p >= t
    return code


def attention(program: Any, op: dict, q: np.ndarray, k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, dict[str, int]]:
    at = op["attrs"]
    Ab = program.settings["acc_bits"]
    exp_table, thresholds, decode = _t(program, op, "exp_table"), _t(program, op, "thresholds"), _t(program, op, "decode")
    q, k, v = _i64(q), _i64(k), _i64(v)
    B, T, D = q.shape
    H = at["heads"]
    assert k.shape == v.shape == (B, T, D) and D % H == 0
    d = D // H

    def heads(a: np.ndarray, zp: int) -> np.ndarray:       # (B, T, D) -> (B, H, T, d), channels h*d .. h*d+d-1
        return (a - zp).reshape(B, T, H, d).transpose(0, 2, 1, 3)

    qh, kh, vh = heads(q, at["zp_q"]), heads(k, at["zp_k"]), heads(v, at["zp_v"])
    _assert_dot_fits(d, qh, kh)
    A, n_acc1 = accsat(_dot(qh, kh.transpose(0, 1, 3, 2)), Ab)                  # A[i, j]
    p, n_prob = int_softmax(A, exp_table, at["score_mult"], at["score_shift"],
                            at["exp_frac_bits"], at["prob_bits"], at["recip_frac"])
    code = encode(p, thresholds)
    assert len(decode) == len(thresholds) + 1
    dec = decode[code]                                                            # decode[code[i, j]]
    _assert_dot_fits(T, dec, vh)
    O, n_acc2 = accsat(_dot(dec, vh), Ab)                                        # O[i, r]
    y, n_out = sat(_add(rq(O, at["mult"], at["shift"]), at["zp"]), at["lo"], at["hi"])
    return y.transpose(0, 2, 1, 3).reshape(B, T, D), _counts(acc=n_acc1 + n_acc2, out=n_out, prob=n_prob)


# ---- section 4.5: gelu --------------------------------------------------------------------

def gelu(program: Any, op: dict, x: np.ndarray) -> tuple[np.ndarray, dict[str, int]]:
    g = program.settings["gelu_bits"]
    table = _t(program, op, "table")
    assert len(table) == 2**g
    i = _i64(x) + 2 ** (g - 1)
    assert ((i >= 0) & (i < 2**g)).all(), f"gelu input outside the signed {g}-bit range"
    return table[i], _counts()


# ---- section 4.6: add ---------------------------------------------------------------------

def add(program: Any, op: dict, a: np.ndarray, skip: np.ndarray) -> tuple[np.ndarray, dict[str, int]]:
    at = op["attrs"]
    y, n_out = sat(_add(a, rq(skip, at["mult"], at["shift"])), at["lo"], at["hi"])
    return y, _counts(out=n_out)


OPS: dict[str, Callable[..., tuple[np.ndarray, dict[str, int]]]] = {
    "linear": linear, "patch_embed": patch_embed, "layernorm": layernorm,
    "attention": attention, "gelu": gelu, "add": add,
}


# ---- the program ----------------------------------------------------------------------------

@dataclass
class GoldenResult:
    logits: np.ndarray                    # int64 (B, classes)
    scale: float                          # the output value's scale (for reporting only)
    counts: dict[str, dict[str, int]]     # op name -> {"acc", "out", "prob"}
    values: dict[str, np.ndarray] | None  # every value, with keep_values=True


def _check_value(program: Any, name: str, y: np.ndarray) -> None:
    """Section 3: every value has its declared per-image shape and fits its kind and bits."""
    info = program.values[name]
    assert y.dtype == np.int64
    assert tuple(y.shape[1:]) == tuple(info["shape"]), f"value '{name}': shape {y.shape[1:]}, header {info['shape']}"
    b = info["bits"]
    lo, hi = {"codes": (0, 2**b - 1), "int": (-(2 ** (b - 1)), 2 ** (b - 1) - 1), "image": (0, 255)}[info["kind"]]
    assert y.size == 0 or (lo <= int(y.min()) and int(y.max()) <= hi), \
        f"value '{name}' ({info['kind']}, {b} bits) outside {lo}..{hi}"


def run(program: Any, images: np.ndarray, keep_values: bool = False) -> GoldenResult:
    """Evaluate the program's ops in order on ``images`` (uint8, (B, C, H, W))."""
    (inp,) = program.header["inputs"]
    images = np.asarray(images)
    assert np.issubdtype(images.dtype, np.integer) and images.ndim == 4, "images must be integer (B, C, H, W)"
    values: dict[str, np.ndarray] = {inp: images.astype(np.int64)}
    _check_value(program, inp, values[inp])
    counts: dict[str, dict[str, int]] = {}
    for op in program.ops:
        assert op["name"] not in counts, f"duplicate op name {op['name']}"
        y, counts[op["name"]] = OPS[op["type"]](program, op, *(values[i] for i in op["inputs"]))
        _check_value(program, op["output"], y)
        values[op["output"]] = y
    out = values[program.output]
    assert out.ndim == 3 and out.shape[1] == 1, f"output value has shape {out.shape}, expected (B, 1, classes)"
    return GoldenResult(logits=out[:, 0, :], scale=float(program.values[program.output]["scale"]),
                        counts=counts, values=values if keep_values else None)


# ---- section 9: Swin Transformer op types ----------------------------------------------------------

def patchify(program: Any, op: dict, image: np.ndarray) -> tuple[np.ndarray, dict[str, int]]:
    """9.1: x[b, i*(W/p) + j, (ch*p + ky)*p + kx] = image[b, ch, i*p + ky, j*p + kx] (layout only)."""
    p = op["attrs"]["patch"]
    img = _i64(image)
    B, C, H, W = img.shape
    assert H % p == 0 and W % p == 0, "image size is not a multiple of the patch size"
    x = img.reshape(B, C, H // p, p, W // p, p).transpose(0, 2, 4, 1, 3, 5).reshape(B, (H // p) * (W // p), C * p * p)
    return x, _counts()


def patch_merge(program: Any, op: dict, x: np.ndarray) -> tuple[np.ndarray, dict[str, int]]:
    """9.2: y[t, k*C + c] = x[src[t, k], c] (layout only)."""
    src = _t(program, op, "src")                                       # (T/4, 4)
    x = _i64(x)
    B, T, C = x.shape
    Hg, Wg = op["attrs"]["grid"]
    assert T == Hg * Wg and src.shape == (T // 4, 4) and (src >= 0).all() and (src < T).all()
    return x[:, src].reshape(B, T // 4, 4 * C), _counts()


def int_softmax_masked(A: np.ndarray, valid: np.ndarray, exp_table: np.ndarray, score_mult: int, score_shift: int,
                       E: int, P: int, G: int) -> tuple[np.ndarray, int]:
    """9.3: the integer softmax of 4.4 over the valid positions of each row; e = 0 (so p = 0) where masked."""
    assert len(exp_table) == 2**E and 2**(P + G) < 2**61
    assert valid.any(axis=-1).all(), "a softmax row with every position masked"
    m = np.where(valid, A, I64_MIN).max(axis=-1, keepdims=True)       # m[i] = max over valid j
    diff = np.where(valid, _sub(m, np.where(valid, A, m)), 0)          # m - A on valid positions
    u = rq(diff, score_mult, score_shift)
    assert (u >= 0).all()
    hi_part, lo_part = u >> E, u & (2**E - 1)
    e = np.where(hi_part <= 62, rshift(exp_table[lo_part], np.minimum(hi_part, 62)), 0)
    e = np.where(valid, e, 0)                                           # masked: e = 0
    _assert_dot_fits(A.shape[-1], e, np.int64(1))
    Z = e.sum(axis=-1, keepdims=True)
    inv = rdiv(2 ** (P + G), Z)
    p, n_prob = sat(rshift(_mul(e, inv), G), I64_MIN, 2**P - 1)
    return p, n_prob


def window_probs(program: Any, op: dict, q: np.ndarray, k: np.ndarray) -> tuple[np.ndarray, int, int]:
    """9.3 up to the probabilities: p (B, nW, H, n, n), and the acc / prob saturation counts."""
    at = op["attrs"]
    tokens = _t(program, op, "tokens")                                  # (nW, n)
    rel, mask = _t(program, op, "rel_index"), _t(program, op, "mask")
    table = _t(program, op, "bias_table")                               # (H, R)
    q, k = _i64(q), _i64(k)
    B, T, D = q.shape
    H, Fb = at["heads"], at["score_frac"]
    nW, n = tokens.shape
    assert D % H == 0 and nW * n == T and np.array_equal(np.sort(tokens.ravel()), np.arange(T))
    assert 0 <= Fb <= 30 and rel.shape == (n, n) and mask.shape == (nW, n, n)
    d = D // H

    def win(a: np.ndarray, zp: int) -> np.ndarray:                      # (B, nW, H, n, d)
        return (a[:, tokens] - zp).reshape(B, nW, n, H, d).transpose(0, 1, 3, 2, 4)

    qw, kw = win(q, at["zp_q"]), win(k, at["zp_k"])
    _assert_dot_fits(d, qw, kw)
    dot = _dot(qw, kw.transpose(0, 1, 2, 4, 3))                         # sum_r (q - zq)(k - zk)
    bias = table[:, rel]                                                # bias[h, i, j] = bias_table[h, rel_index[i, j]]
    A, n_acc = accsat(_add(_mul(dot, 2**Fb), bias[None, None]), program.settings["acc_bits"])
    valid = np.broadcast_to((mask == 0)[None, :, None], A.shape)
    p, n_prob = int_softmax_masked(A, valid, _t(program, op, "exp_table"), at["score_mult"], at["score_shift"],
                                   at["exp_frac_bits"], at["prob_bits"], at["recip_frac"])
    return p, n_acc, n_prob


def window_attention(program: Any, op: dict, q: np.ndarray, k: np.ndarray, v: np.ndarray
                     ) -> tuple[np.ndarray, dict[str, int]]:
    """9.3: attention inside (shifted) windows with an integer score bias and the shift mask."""
    at = op["attrs"]
    Ab = program.settings["acc_bits"]
    thresholds, decode = _t(program, op, "thresholds"), _t(program, op, "decode")
    tokens = _t(program, op, "tokens")
    v = _i64(v)
    B, T, D = v.shape
    H = at["heads"]
    nW, n = tokens.shape
    d = D // H
    p, n_acc1, n_prob = window_probs(program, op, q, k)
    code = encode(p, thresholds)
    assert len(decode) == len(thresholds) + 1
    dec = decode[code]                                                  # (B, nW, H, n, n)
    vw = (v[:, tokens] - at["zp_v"]).reshape(B, nW, n, H, d).transpose(0, 1, 3, 2, 4)
    _assert_dot_fits(n, dec, vw)
    O, n_acc2 = accsat(_dot(dec, vw), Ab)                               # O[i, r]
    yw, n_out = sat(_add(rq(O, at["mult"], at["shift"]), at["zp"]), at["lo"], at["hi"])
    y = np.empty((B, T, D), np.int64)
    y[:, tokens.reshape(-1)] = yw.transpose(0, 1, 3, 2, 4).reshape(B, nW * n, D)   # window reverse
    return y, _counts(acc=n_acc1 + n_acc2, out=n_out, prob=n_prob)


def token_pool(program: Any, op: dict, x: np.ndarray) -> tuple[np.ndarray, dict[str, int]]:
    """9.4: y[c] = sat(rq(accsat(sum_t x[t, c]), mult, shift) + zp, lo, hi), output (B, 1, C)."""
    at = op["attrs"]
    x = _i64(x)
    _assert_dot_fits(x.shape[1], x, np.int64(1))
    S, n_acc = accsat(x.sum(axis=1, keepdims=True), program.settings["acc_bits"])
    y, n_out = sat(_add(rq(S, at["mult"], at["shift"]), at["zp"]), at["lo"], at["hi"])
    return y, _counts(acc=n_acc, out=n_out)


OPS.update({"patchify": patchify, "patch_merge": patch_merge, "window_attention": window_attention,
            "token_pool": token_pool})
