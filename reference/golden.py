"""The golden model: docs/integer-spec.md in executable form.

Plain numpy on int64, written to be checked line by line against the specification (section
numbers are quoted next to the code). It shares no code with the engine (``intsim/``) and reads
no float scale: only the integer tensors and integer attributes of the program. Every place where
an int64 could overflow, and every other bound of the specification, is checked on the actual data
by an explicit test that raises :class:`SpecViolation` (not an ``assert``, so ``python -O`` keeps
the checks), so an overflow can never pass silently.

    res = run(program, images)        # images uint8 (B, C, H, W)
    res.logits, res.scale, res.counts, res.values

``OPS[type](program, op, *inputs, steps=None) -> (y, counts)`` evaluates one op; ``counts`` is
``{"acc": .., "out": .., "prob": ..}``, the number of elements changed by each saturation point.
When ``steps`` is a dict, the op also stores its named intermediates in it (see ``STEPS``).

Tracing: ``run(program, images, trace=fn)`` calls ``fn(op, inputs, output, counts, steps)`` after
each op, in program order, with the op's header dict, its input values (a tuple of int64 arrays),
its output value (int64), its saturation counts and its intermediates ``{name: int64 array}``
(names in ``STEPS[op["type"]]``, shapes as computed, reductions with a kept last axis of length 1).
Inputs and output are read-only views of the values the run goes on with. An exception raised by
``fn`` ends the run (a way to stop after the op of interest). With ``trace=None`` nothing is
recorded.
"""
from __future__ import annotations

import functools
import math
import operator
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

I64_MIN, I64_MAX = -(2**63), 2**63 - 1


class SpecViolation(ArithmeticError):
    """A bound of docs/integer-spec.md that the program or the data breaks, found by the golden model.

    Raised instead of computing a number the specification does not define: an int64 that would
    overflow, a shift outside -62..62, a divisor that is not positive, a value outside its declared
    kind and bits, a table or shape that does not match the op. It is an explicit ``raise`` (not an
    ``assert``), so it is raised under ``python -O`` too.

    Attributes: ``check`` (what was checked, e.g. ``"rshift: shift n"``), ``bound`` (the bound,
    as text), ``value`` (the offending value, or the figure that broke the bound), ``op`` and
    ``op_type`` (the program op's name and type when raised while evaluating an op, else None).
    """

    def __init__(self, check: str, bound: str, value: Any, op: str | None = None, op_type: str | None = None):
        super().__init__(check, bound, value)
        self.check, self.bound, self.value = check, bound, value
        self.op, self.op_type = op, op_type

    def __str__(self) -> str:
        where = f"op '{self.op}' ({self.op_type}): " if self.op is not None else ""
        return f"{where}{self.check}: got {self.value}, bound: {self.bound}"


def _names_op(f: Callable) -> Callable:
    """Decorator of an op function: a SpecViolation raised inside it names the program op."""
    @functools.wraps(f)
    def op_function(program: Any, op: dict, *inputs: Any, steps: dict | None = None):
        try:
            return f(program, op, *inputs, steps=steps)
        except SpecViolation as e:
            if e.op is None:
                e.op, e.op_type = op.get("name"), op.get("type")
            raise
    return op_function


# ---- int64 guards -------------------------------------------------------------------------

def _i64(a: Any) -> np.ndarray:
    return np.asarray(a, dtype=np.int64)


def _exact(f: Callable, a: Any, b: Any) -> np.ndarray:
    """f(a, b) for f in (operator.add, operator.sub, operator.mul) in int64, raising SpecViolation when
    an element leaves int64. When the bound max|a| * max|b| (mul) or max|a| + max|b| (add, sub), computed with
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
            r = f(x, y)
            if not I64_MIN <= r <= I64_MAX:
                raise SpecViolation(f"int64 {f.__name__}", "-2^63 <= result <= 2^63 - 1", f"{f.__name__}({x}, {y}) = {r}")
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


def _check_dot_fits(what: str, k: int, x: np.ndarray, w: np.ndarray, bias: np.ndarray | int = 0) -> None:
    """Bound of an exact sum of k products plus a bias: k * max|x| * max|w| + max|bias| < 2^63."""
    bound = k * _absmax(x) * _absmax(w) + _absmax(_i64(bias))
    if bound > I64_MAX:
        raise SpecViolation(f"{what}: a sum of {k} products", "k max|x| max|w| + max|bias| <= 2^63 - 1", bound)


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
    if (n > 62).any():
        raise SpecViolation("rshift: shift n", "n <= 62", int(n.max()))
    if (n >= 1).all():                                     # the usual case, without the select below
        return (a >> n) + ((a >> (n - 1)) & 1)
    a, n = np.broadcast_arrays(a, n)
    m = np.maximum(n, 1)                                   # the shift used where n >= 1
    y = np.where(n >= 1, (a >> m) + ((a >> (m - 1)) & 1), a)
    if (n < 0).any():                                      # never produced by the exporter
        if (n < -62).any():
            raise SpecViolation("rshift: shift n", "n >= -62", int(n.min()))
        y = np.where(n < 0, _mul(a, np.int64(1) << np.clip(-n, 0, 62)), y)
    return y


def rq(a: Any, m: Any, n: Any) -> np.ndarray:
    """Section 2: rq(a, m, n) = rshift(a * m, n); |a * m| < 2^63 is checked on the data."""
    return rshift(_mul(a, m), n)


def rdiv(a: Any, b: Any) -> np.ndarray:
    """rdiv(a, b) = floor((2a + b) / (2b)) for b > 0 (numpy // on int64 is floor division)."""
    a, b = np.broadcast_arrays(_i64(a), _i64(b))
    if not (b > 0).all():
        raise SpecViolation("rdiv: divisor b", "b > 0", int(b.min()))
    if _absmax(a) >= 2**61:                               # (exact: np.abs(-2^63) would wrap)
        raise SpecViolation("rdiv: dividend a (2a + b must fit int64)", "|a| < 2^61", _absmax(a))
    if b.size and int(b.max()) >= 2**61:
        raise SpecViolation("rdiv: divisor b (2a + b must fit int64)", "b < 2^61", int(b.max()))
    return (2 * a + b) // (2 * b)


def isqrt(v: Any) -> np.ndarray:
    """Exact floor square root, element by element with Python's math.isqrt."""
    v = _i64(v)
    if (v < 0).any():
        raise SpecViolation("isqrt: argument", ">= 0", int(v.min()))
    return np.array([math.isqrt(x) for x in v.ravel().tolist()], dtype=np.int64).reshape(v.shape)


def sat(v: Any, lo: int, hi: int) -> tuple[np.ndarray, int]:
    """sat(v, lo, hi) = min(max(v, lo), hi) and the number of elements it changed."""
    v = _i64(v)
    y = np.minimum(np.maximum(v, np.int64(lo)), np.int64(hi))
    return y, int(np.count_nonzero(y != v))


def accsat(v: Any, acc_bits: int) -> tuple[np.ndarray, int]:
    """accsat(v) = sat(v, -2^(A-1), 2^(A-1) - 1) and the number of elements it changed."""
    if not 1 <= acc_bits <= 64:
        raise SpecViolation("accsat: accumulator bits A", "1 <= A <= 64", acc_bits)
    return sat(v, -(2 ** (acc_bits - 1)), 2 ** (acc_bits - 1) - 1)


def _counts(acc: int = 0, out: int = 0, prob: int = 0) -> dict[str, int]:
    return {"acc": acc, "out": out, "prob": prob}


def _t(program: Any, op: dict, name: str) -> np.ndarray:
    return _i64(program.t(op, name))


def _record(steps: dict | None, **arrays: np.ndarray) -> None:
    """Store named intermediates for the trace (nothing when steps is None)."""
    if steps is not None:
        steps.update(arrays)


def _check_patch_grid(H: int, W: int, p: int) -> None:
    if H % p or W % p:
        raise SpecViolation("image size H x W", f"H and W multiples of the patch size {p}", f"{H} x {W}")


# ---- section 4.1: linear ------------------------------------------------------------------

@_names_op
def linear(program: Any, op: dict, x: np.ndarray, steps: dict | None = None) -> tuple[np.ndarray, dict[str, int]]:
    at = op["attrs"]
    w, bias = _t(program, op, "w"), _t(program, op, "bias")                       # (N, K), (N)
    mult, shift, zp = _t(program, op, "mult"), _t(program, op, "shift"), _t(program, op, "zp")
    x = _i64(x)                                                                      # (B, T, K)
    if x.shape[-1] != w.shape[1]:
        raise SpecViolation("input width K", f"the weights' K = {w.shape[1]}", x.shape[-1])
    _check_dot_fits("accumulator", w.shape[1], x, w, bias)
    acc_raw = bias + _dot(x, w.T)
    acc, n_acc = accsat(acc_raw, program.settings["acc_bits"])                      # acc[t, c]
    r = rq(acc, mult, shift)
    y, n_out = sat(_add(r, zp), at["lo"], at["hi"])                                  # y[t, c]
    _record(steps, acc_raw=acc_raw, acc=acc, rq=r)
    return y, _counts(acc=n_acc, out=n_out)


# ---- section 4.2: patch_embed -------------------------------------------------------------

@_names_op
def patch_embed(program: Any, op: dict, image: np.ndarray, steps: dict | None = None
                ) -> tuple[np.ndarray, dict[str, int]]:
    at = op["attrs"]
    p = at["patch"]
    w, bias = _t(program, op, "w"), _t(program, op, "bias")                        # (D, C*p*p), (D)
    mult, shift, pos = _t(program, op, "mult"), _t(program, op, "shift"), _t(program, op, "pos")
    img = _i64(image)
    B, C, H, W = img.shape
    _check_patch_grid(H, W, p)
    # x[b, 1 + i*(W/p) + j, (ch*p + ky)*p + kx] = image[b, ch, i*p + ky, j*p + kx]
    x = img.reshape(B, C, H // p, p, W // p, p).transpose(0, 2, 4, 1, 3, 5).reshape(B, (H // p) * (W // p), C * p * p)
    if pos.shape[0] != x.shape[1] + 1:
        raise SpecViolation("rows of pos", f"patches + 1 = {x.shape[1] + 1}", pos.shape[0])
    if w.shape[1] != C * p * p:
        raise SpecViolation("width of w", f"C p^2 = {C * p * p}", w.shape[1])
    _check_dot_fits("accumulator", w.shape[1], x, w, bias)
    acc_raw = bias + _dot(x, w.T)
    acc, n_acc = accsat(acc_raw, program.settings["acc_bits"])                      # tokens 1..P
    r = rq(acc, mult, shift)
    patches = _add(r, pos[1:])                                                      # rq(acc) + pos[t], t >= 1
    cls = np.broadcast_to(pos[0], (B, 1, pos.shape[1]))                            # class token: pos[0]
    y, n_out = sat(np.concatenate([cls, patches], axis=1), at["lo"], at["hi"])
    _record(steps, x=x, acc_raw=acc_raw, acc=acc, rq=r)
    return y, _counts(acc=n_acc, out=n_out)


# ---- section 4.3: layernorm ---------------------------------------------------------------

@_names_op
def layernorm(program: Any, op: dict, x: np.ndarray, steps: dict | None = None) -> tuple[np.ndarray, dict[str, int]]:
    at = op["attrs"]
    K, F, S = at["recip_bits"], at["norm_frac"], at["shift"]
    gmul, gadd = _t(program, op, "gmul"), _t(program, op, "gadd")
    x = _i64(x)
    if at["tokens"] not in ("all", "first"):
        raise SpecViolation("tokens", "'all' or 'first'", repr(at["tokens"]))
    if at["tokens"] == "first":
        x = x[:, :1, :]                                     # only the class token
    D = x.shape[-1]
    # S1, S2, c, V below stay within D^2 * max|x|^2 in magnitude
    if D * D * _absmax(x) ** 2 > I64_MAX:
        raise SpecViolation("row sums (S1, S2, c, V)", "D^2 max|x|^2 <= 2^63 - 1", D * D * _absmax(x) ** 2)
    if not 0 <= K - F <= 62:                              # (rdiv checks 2^K < 2^61)
        raise SpecViolation("shift K - F (recip_bits - norm_frac)", "0 <= K - F <= 62", K - F)
    S1 = x.sum(axis=-1, keepdims=True)
    S2 = (x * x).sum(axis=-1, keepdims=True)
    c = D * x - S1
    V = D * S2 - S1 * S1
    if (V < 0).any():
        raise SpecViolation("V = D S2 - S1^2", "V >= 0", int(V.min()))
    sd = isqrt(V)
    inv = np.where(sd == 0, 0, rdiv(2**K, np.maximum(sd, 1)))   # 0 if sd == 0 else rdiv(2^K, sd)
    n = rshift(_mul(c, inv), K - F)
    pre = _add(rshift(_add(_mul(n, gmul), gadd), S), at["zp"])
    y, n_out = sat(pre, at["lo"], at["hi"])
    _record(steps, S1=S1, S2=S2, c=c, V=V, sd=sd, inv=inv, n=n, pre_sat=pre)
    return y, _counts(out=n_out)


# ---- section 4.4: attention ---------------------------------------------------------------

def _check_softmax_consts(exp_table: np.ndarray, E: int, P: int, G: int) -> None:
    if len(exp_table) != 2**E:
        raise SpecViolation("softmax: exp table length", f"2^exp_frac_bits = {2**E}", len(exp_table))
    if not 2**(P + G) < 2**61:
        raise SpecViolation("softmax: prob_bits + recip_frac", "P + G < 61", P + G)


def _exp_of(u: np.ndarray, exp_table: np.ndarray, E: int) -> np.ndarray:
    """e = rshift(exp_table[u & (2^E - 1)], u >> E), 0 where u >> E > 62 (u >= 0 checked)."""
    if (u < 0).any():
        raise SpecViolation("softmax: u = rq(m - A, score_mult, score_shift)", "u >= 0", int(u.min()))
    hi_part, lo_part = u >> E, u & (2**E - 1)
    return np.where(hi_part <= 62, rshift(exp_table[lo_part], np.minimum(hi_part, 62)), 0)


def int_softmax(A: np.ndarray, exp_table: np.ndarray, score_mult: int, score_shift: int,
                E: int, P: int, G: int, steps: dict | None = None) -> tuple[np.ndarray, int]:
    """Integer softmax over the last axis of the scores A: returns p (P fractional bits) and the
    number of probabilities clamped to 2^P - 1. With ``steps``, stores m, u, e, Z, inv and p."""
    _check_softmax_consts(exp_table, E, P, G)
    m = A.max(axis=-1, keepdims=True)                                  # m[i]
    u = rq(_sub(m, A), score_mult, score_shift)                        # u[i, j] >= 0
    e = _exp_of(u, exp_table, E)
    _check_dot_fits("softmax row sum", A.shape[-1], e, np.int64(1))
    Z = e.sum(axis=-1, keepdims=True)                                  # Z[i]
    inv = rdiv(2 ** (P + G), Z)                                        # inv[i] (checks Z > 0)
    p, n_prob = sat(rshift(_mul(e, inv), G), I64_MIN, 2**P - 1)        # min(., 2^P - 1)
    _record(steps, m=m, u=u, e=e, Z=Z, inv=inv, p=p)
    return p, n_prob


def encode(p: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """code = number of k in 1..N with p >= thresholds[k-1]."""
    code = np.zeros(np.shape(p), dtype=np.int64)
    for t in _i64(thresholds).tolist():
        code += p >= t
    return code


def _check_decode(decode: np.ndarray, thresholds: np.ndarray) -> None:
    if len(decode) != len(thresholds) + 1:
        raise SpecViolation("decode table length", f"len(thresholds) + 1 = {len(thresholds) + 1}", len(decode))


def _check_heads(D: int, H: int) -> None:
    if D % H:
        raise SpecViolation("width D", f"a multiple of heads = {H}", D)


@_names_op
def attention(program: Any, op: dict, q: np.ndarray, k: np.ndarray, v: np.ndarray, steps: dict | None = None
              ) -> tuple[np.ndarray, dict[str, int]]:
    at = op["attrs"]
    Ab = program.settings["acc_bits"]
    exp_table, thresholds, decode = _t(program, op, "exp_table"), _t(program, op, "thresholds"), _t(program, op, "decode")
    q, k, v = _i64(q), _i64(k), _i64(v)
    B, T, D = q.shape
    H = at["heads"]
    if not k.shape == v.shape == (B, T, D):
        raise SpecViolation("shapes of k and v", f"q's shape {(B, T, D)}", f"k {k.shape}, v {v.shape}")
    _check_heads(D, H)
    d = D // H

    def heads(a: np.ndarray, zp: int) -> np.ndarray:       # (B, T, D) -> (B, H, T, d), channels h*d .. h*d+d-1
        return (a - zp).reshape(B, T, H, d).transpose(0, 2, 1, 3)

    qh, kh, vh = heads(q, at["zp_q"]), heads(k, at["zp_k"]), heads(v, at["zp_v"])
    _check_dot_fits("scores", d, qh, kh)
    A_raw = _dot(qh, kh.transpose(0, 1, 3, 2))
    A, n_acc1 = accsat(A_raw, Ab)                                                # A[i, j]
    _record(steps, A_raw=A_raw, A=A)
    p, n_prob = int_softmax(A, exp_table, at["score_mult"], at["score_shift"],
                            at["exp_frac_bits"], at["prob_bits"], at["recip_frac"], steps=steps)
    code = encode(p, thresholds)
    _check_decode(decode, thresholds)
    dec = decode[code]                                                            # decode[code[i, j]]
    _check_dot_fits("output accumulator", T, dec, vh)
    O_raw = _dot(dec, vh)
    O, n_acc2 = accsat(O_raw, Ab)                                                # O[i, r]
    r = rq(O, at["mult"], at["shift"])
    y, n_out = sat(_add(r, at["zp"]), at["lo"], at["hi"])
    _record(steps, code=code, dec=dec, O_raw=O_raw, O=O, rq=r)
    return y.transpose(0, 2, 1, 3).reshape(B, T, D), _counts(acc=n_acc1 + n_acc2, out=n_out, prob=n_prob)


# ---- section 4.5: gelu --------------------------------------------------------------------

@_names_op
def gelu(program: Any, op: dict, x: np.ndarray, steps: dict | None = None) -> tuple[np.ndarray, dict[str, int]]:
    g = program.settings["gelu_bits"]
    table = _t(program, op, "table")
    if len(table) != 2**g:
        raise SpecViolation("table length", f"2^gelu_bits = {2**g}", len(table))
    i = _i64(x) + 2 ** (g - 1)
    bad = (i < 0) | (i >= 2**g)
    if bad.any():
        raise SpecViolation("input", f"the signed {g}-bit range {-(2 ** (g - 1))}..{2 ** (g - 1) - 1}",
                            int(i[bad].ravel()[0]) - 2 ** (g - 1))
    _record(steps, index=i)
    return table[i], _counts()


# ---- section 4.6: add ---------------------------------------------------------------------

@_names_op
def add(program: Any, op: dict, a: np.ndarray, skip: np.ndarray, steps: dict | None = None
        ) -> tuple[np.ndarray, dict[str, int]]:
    at = op["attrs"]
    r = rq(skip, at["mult"], at["shift"])
    s = _add(a, r)
    y, n_out = sat(s, at["lo"], at["hi"])
    _record(steps, skip_rq=r, sum=s)
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


def _check_value(program: Any, name: str, y: np.ndarray, op: dict | None = None) -> None:
    """Section 3: every value has its declared per-image shape and fits its kind and bits."""
    on = (op["name"], op["type"]) if op is not None else (None, None)
    info = program.values[name]
    if y.dtype != np.int64:
        raise SpecViolation(f"value '{name}': dtype", "int64", y.dtype, *on)
    if tuple(y.shape[1:]) != tuple(info["shape"]):
        raise SpecViolation(f"value '{name}': per-image shape", f"the header's {tuple(info['shape'])}",
                            tuple(y.shape[1:]), *on)
    b = info["bits"]
    lo, hi = {"codes": (0, 2**b - 1), "int": (-(2 ** (b - 1)), 2 ** (b - 1) - 1), "image": (0, 255)}[info["kind"]]
    if y.size and not (lo <= int(y.min()) and int(y.max()) <= hi):
        raise SpecViolation(f"value '{name}' ({info['kind']}, {b} bits)", f"{lo}..{hi}",
                            f"{int(y.min())}..{int(y.max())}", *on)


def _read_only(a: np.ndarray) -> np.ndarray:
    v = a.view()
    v.flags.writeable = False
    return v


def run(program: Any, images: np.ndarray, keep_values: bool = False,
        trace: Callable[[dict, tuple, np.ndarray, dict, dict], Any] | None = None) -> GoldenResult:
    """Evaluate the program's ops in order on ``images`` (uint8, (B, C, H, W)).

    ``trace``, when given, is called after each op as
    ``trace(op, inputs, output, counts, steps)``: ``op`` the op's header dict, ``inputs`` a tuple of
    its input values and ``output`` its output value (read-only int64 arrays, batch axis first;
    ``output`` has passed the value checks of section 3), ``counts`` its saturation counts
    ``{"acc", "out", "prob"}``, ``steps`` its named int64 intermediates (``STEPS[op["type"]]``).
    Calls come in program order; an exception raised by ``trace`` propagates and ends the run.
    Raises :class:`SpecViolation` when the program or the data breaks a bound of the spec."""
    (inp,) = program.header["inputs"]
    images = np.asarray(images)
    if not (np.issubdtype(images.dtype, np.integer) and images.ndim == 4):
        raise SpecViolation("run: images", "an integer array (B, C, H, W)",
                            f"a {images.dtype} array of shape {images.shape}")
    values: dict[str, np.ndarray] = {inp: images.astype(np.int64)}
    _check_value(program, inp, values[inp])
    counts: dict[str, dict[str, int]] = {}
    for op in program.ops:
        if op["name"] in counts:
            raise SpecViolation("run: op names", "unique", f"'{op['name']}' twice")
        ins = [values[i] for i in op["inputs"]]
        steps: dict[str, np.ndarray] | None = None if trace is None else {}
        y, counts[op["name"]] = OPS[op["type"]](program, op, *ins, steps=steps)
        _check_value(program, op["output"], y, op)
        values[op["output"]] = y
        if trace is not None:
            trace(op, tuple(_read_only(a) for a in ins), _read_only(y), dict(counts[op["name"]]), steps)
    out = values[program.output]
    if not (out.ndim == 3 and out.shape[1] == 1):
        raise SpecViolation(f"run: output value '{program.output}'", "shape (B, 1, classes)", out.shape)
    return GoldenResult(logits=out[:, 0, :], scale=float(program.values[program.output]["scale"]),
                        counts=counts, values=values if keep_values else None)


# ---- section 9: Swin Transformer op types ----------------------------------------------------------

@_names_op
def patchify(program: Any, op: dict, image: np.ndarray, steps: dict | None = None) -> tuple[np.ndarray, dict[str, int]]:
    """9.1: x[b, i*(W/p) + j, (ch*p + ky)*p + kx] = image[b, ch, i*p + ky, j*p + kx] (layout only)."""
    p = op["attrs"]["patch"]
    img = _i64(image)
    B, C, H, W = img.shape
    _check_patch_grid(H, W, p)
    x = img.reshape(B, C, H // p, p, W // p, p).transpose(0, 2, 4, 1, 3, 5).reshape(B, (H // p) * (W // p), C * p * p)
    return x, _counts()


@_names_op
def patch_merge(program: Any, op: dict, x: np.ndarray, steps: dict | None = None) -> tuple[np.ndarray, dict[str, int]]:
    """9.2: y[t, k*C + c] = x[src[t, k], c] (layout only)."""
    src = _t(program, op, "src")                                       # (T/4, 4)
    x = _i64(x)
    B, T, C = x.shape
    Hg, Wg = op["attrs"]["grid"]
    if T != Hg * Wg:
        raise SpecViolation("tokens T", f"the grid's {Hg} x {Wg} = {Hg * Wg}", T)
    if src.shape != (T // 4, 4):
        raise SpecViolation("shape of src", f"(T/4, 4) = {(T // 4, 4)}", src.shape)
    if not ((src >= 0).all() and (src < T).all()):
        raise SpecViolation("src", f"0 <= src < T = {T}", f"{int(src.min())}..{int(src.max())}")
    return x[:, src].reshape(B, T // 4, 4 * C), _counts()


def int_softmax_masked(A: np.ndarray, valid: np.ndarray, exp_table: np.ndarray, score_mult: int, score_shift: int,
                       E: int, P: int, G: int, steps: dict | None = None) -> tuple[np.ndarray, int]:
    """9.3: the integer softmax of 4.4 over the valid positions of each row; e = 0 (so p = 0) where masked.
    With ``steps``, stores m, u, e, Z, inv and p."""
    _check_softmax_consts(exp_table, E, P, G)
    if not valid.any(axis=-1).all():
        raise SpecViolation("softmax: masked row", "at least one valid position per row", "a row with none")
    m = np.where(valid, A, I64_MIN).max(axis=-1, keepdims=True)       # m[i] = max over valid j
    diff = np.where(valid, _sub(m, np.where(valid, A, m)), 0)          # m - A on valid positions
    u = rq(diff, score_mult, score_shift)
    e = _exp_of(u, exp_table, E)
    e = np.where(valid, e, 0)                                           # masked: e = 0
    _check_dot_fits("softmax row sum", A.shape[-1], e, np.int64(1))
    Z = e.sum(axis=-1, keepdims=True)
    inv = rdiv(2 ** (P + G), Z)
    p, n_prob = sat(rshift(_mul(e, inv), G), I64_MIN, 2**P - 1)
    _record(steps, m=m, u=u, e=e, Z=Z, inv=inv, p=p)
    return p, n_prob


@_names_op
def window_probs(program: Any, op: dict, q: np.ndarray, k: np.ndarray, steps: dict | None = None
                 ) -> tuple[np.ndarray, int, int]:
    """9.3 up to the probabilities: p (B, nW, H, n, n), and the acc / prob saturation counts.
    With ``steps``, stores dot, A_raw, A and the softmax's m, u, e, Z, inv, p."""
    at = op["attrs"]
    tokens = _t(program, op, "tokens")                                  # (nW, n)
    rel, mask = _t(program, op, "rel_index"), _t(program, op, "mask")
    table = _t(program, op, "bias_table")                               # (H, R)
    q, k = _i64(q), _i64(k)
    B, T, D = q.shape
    H, Fb = at["heads"], at["score_frac"]
    nW, n = tokens.shape
    _check_heads(D, H)
    if nW * n != T:
        raise SpecViolation("windows x window size", f"tokens T = {T}", f"{nW} x {n}")
    if not np.array_equal(np.sort(tokens.ravel()), np.arange(T)):
        raise SpecViolation("tokens", f"a permutation of 0..{T - 1}", "a table that is not")
    if not 0 <= Fb <= 30:
        raise SpecViolation("score_frac", "0 <= score_frac <= 30", Fb)
    if rel.shape != (n, n):
        raise SpecViolation("shape of rel_index", f"{(n, n)}", rel.shape)
    if mask.shape != (nW, n, n):
        raise SpecViolation("shape of mask", f"{(nW, n, n)}", mask.shape)
    d = D // H

    def win(a: np.ndarray, zp: int) -> np.ndarray:                      # (B, nW, H, n, d)
        return (a[:, tokens] - zp).reshape(B, nW, n, H, d).transpose(0, 1, 3, 2, 4)

    qw, kw = win(q, at["zp_q"]), win(k, at["zp_k"])
    _check_dot_fits("scores", d, qw, kw)
    dot = _dot(qw, kw.transpose(0, 1, 2, 4, 3))                         # sum_r (q - zq)(k - zk)
    bias = table[:, rel]                                                # bias[h, i, j] = bias_table[h, rel_index[i, j]]
    A_raw = _add(_mul(dot, 2**Fb), bias[None, None])
    A, n_acc = accsat(A_raw, program.settings["acc_bits"])
    _record(steps, dot=dot, A_raw=A_raw, A=A)
    valid = np.broadcast_to((mask == 0)[None, :, None], A.shape)
    p, n_prob = int_softmax_masked(A, valid, _t(program, op, "exp_table"), at["score_mult"], at["score_shift"],
                                   at["exp_frac_bits"], at["prob_bits"], at["recip_frac"], steps=steps)
    return p, n_acc, n_prob


@_names_op
def window_attention(program: Any, op: dict, q: np.ndarray, k: np.ndarray, v: np.ndarray, steps: dict | None = None
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
    p, n_acc1, n_prob = window_probs(program, op, q, k, steps=steps)
    code = encode(p, thresholds)
    _check_decode(decode, thresholds)
    dec = decode[code]                                                  # (B, nW, H, n, n)
    vw = (v[:, tokens] - at["zp_v"]).reshape(B, nW, n, H, d).transpose(0, 1, 3, 2, 4)
    _check_dot_fits("output accumulator", n, dec, vw)
    O_raw = _dot(dec, vw)
    O, n_acc2 = accsat(O_raw, Ab)                                       # O[i, r]
    r = rq(O, at["mult"], at["shift"])
    yw, n_out = sat(_add(r, at["zp"]), at["lo"], at["hi"])
    y = np.empty((B, T, D), np.int64)
    y[:, tokens.reshape(-1)] = yw.transpose(0, 1, 3, 2, 4).reshape(B, nW * n, D)   # window reverse
    _record(steps, code=code, dec=dec, O_raw=O_raw, O=O, rq=r)
    return y, _counts(acc=n_acc1 + n_acc2, out=n_out, prob=n_prob)


@_names_op
def token_pool(program: Any, op: dict, x: np.ndarray, steps: dict | None = None) -> tuple[np.ndarray, dict[str, int]]:
    """9.4: y[c] = sat(rq(accsat(sum_t x[t, c]), mult, shift) + zp, lo, hi), output (B, 1, C)."""
    at = op["attrs"]
    x = _i64(x)
    _check_dot_fits("token sum", x.shape[1], x, np.int64(1))
    S_raw = x.sum(axis=1, keepdims=True)
    S, n_acc = accsat(S_raw, program.settings["acc_bits"])
    r = rq(S, at["mult"], at["shift"])
    y, n_out = sat(_add(r, at["zp"]), at["lo"], at["hi"])
    _record(steps, S_raw=S_raw, S=S, rq=r)
    return y, _counts(acc=n_acc, out=n_out)


OPS.update({"patchify": patchify, "patch_merge": patch_merge, "window_attention": window_attention,
            "token_pool": token_pool})

#: the intermediates each op type stores in ``steps`` (tracing), in order of computation
STEPS: dict[str, tuple[str, ...]] = {
    "linear": ("acc_raw", "acc", "rq"),
    "patch_embed": ("x", "acc_raw", "acc", "rq"),
    "layernorm": ("S1", "S2", "c", "V", "sd", "inv", "n", "pre_sat"),
    "attention": ("A_raw", "A", "m", "u", "e", "Z", "inv", "p", "code", "dec", "O_raw", "O", "rq"),
    "gelu": ("index",),
    "add": ("skip_rq", "sum"),
    "patchify": (),
    "patch_merge": (),
    "window_attention": ("dot", "A_raw", "A", "m", "u", "e", "Z", "inv", "p", "code", "dec", "O_raw", "O", "rq"),
    "token_pool": ("S_raw", "S", "rq"),
}
