"""Engine kernels of the Swin Transformer op types (``docs/integer-spec.md`` section 9).

``patchify`` and ``patch_merge`` are pure layout (numpy gathers of int64 values, no arithmetic);
``window_attention`` and ``token_pool`` are Numba kernels in exact int64 arithmetic with the
rounding rule of the specification (``rshift`` rounds half up, floors negatives). Every constant
comes from the program (the window token table, the relative position index, the integer bias
table, the shift mask, the softmax tables, multipliers and shifts); nothing is recomputed here.

The runner (``runner._Op``) hands an op of these types to :func:`build`, which returns the op's
callable ``(*inputs) -> (y, counts)`` and sets the op's proven output range (``lo``, ``hi``).

Window attention runs one parallel task per (image, window, head): the window's centered q, k,
v rows are gathered through ``tokens``, the n x n scores are exact int64 dot products scaled by
``2^score_frac`` plus ``bias_table[h, rel_index[i, j]]`` and saturated once to the accumulator;
the integer softmax skips masked positions (their probability is exactly 0), the probabilities
are threshold-encoded (binary search when the thresholds are sorted, else the literal count),
decoded through the table inside the int64 product with v, requantized, and scattered back to
the tokens' own rows (window reverse and reverse shift in one step). Counts are summed per task,
so results and counts do not depend on the number of threads.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
from numba import njit, prange

from intsim.program.format import ProgramError

OP_TYPES = ("patchify", "patch_merge", "window_attention", "token_pool")


# ---- scalar rules (spec section 1) -------------------------------------------------------------

@njit(cache=True, inline="always")
def _rshift(a, n):
    """``floor((a + 2^(n-1)) / 2^n)`` for n >= 1 as ``(a >> n) + bit n-1 of a``; ``a`` for n == 0."""
    if n > 0:
        return (a >> n) + ((a >> (n - 1)) & 1)
    if n == 0:
        return a
    return a << (-n)


@njit(cache=True, inline="always")
def _rdiv(a, b):
    return (2 * a + b) // (2 * b)


@njit(cache=True, inline="always")
def _count_le(thr, sorted_thr, p):
    """Number of thresholds <= p."""
    N = thr.shape[0]
    if sorted_thr:
        lo, hi = 0, N
        while lo < hi:
            mid = (lo + hi) >> 1
            if thr[mid] <= p:
                lo = mid + 1
            else:
                hi = mid
        return lo
    c = 0
    for t in range(N):
        if p >= thr[t]:
            c += 1
    return c


# ---- window attention ----------------------------------------------------------------------

@njit(cache=True, parallel=True)
def window_attention_kernel(q, k, v, heads, tokens, bias_table, rel_index, mask, frac, zp_q, zp_k, zp_v,
                            score_mult, score_shift, E, exp_table, P, G, thresholds, sorted_thr, decode,
                            mult, shift, zp, lo, hi, acc_lo, acc_hi, out, want_p, probs):
    """Spec 9.3 on int64 codes q, k, v (B, T, D); writes ``out`` (B, T, D) int64 and, when ``want_p``,
    the probabilities into ``probs`` (B, nW, H, n, n). Returns (acc, out, prob) saturation counts."""
    B, T, D = q.shape
    nW, n = tokens.shape
    d = D // heads
    ntask = B * nW * heads
    cnt = np.zeros((ntask, 3), np.int64)
    emask = (1 << E) - 1
    pmax = (1 << P) - 1
    one = np.int64(1) << (P + G)
    for task in prange(ntask):
        b = task // (nW * heads)
        w = (task // heads) % nW
        h = task % heads
        c0 = h * d
        qw = np.empty((n, d), np.int64)
        kw = np.empty((n, d), np.int64)
        vw = np.empty((n, d), np.int64)
        for i in range(n):
            t = tokens[w, i]
            for r in range(d):
                qw[i, r] = q[b, t, c0 + r] - zp_q
                kw[i, r] = k[b, t, c0 + r] - zp_k
                vw[i, r] = v[b, t, c0 + r] - zp_v
        A = np.empty(n, np.int64)
        e = np.empty(n, np.int64)
        dec = np.empty(n, np.int64)
        na = 0
        no = 0
        npr = 0
        for i in range(n):
            # scores of row i: accsat(2^frac * dot + bias)
            for j in range(n):
                s = np.int64(0)
                for r in range(d):
                    s += qw[i, r] * kw[j, r]
                s = (s << frac) + bias_table[h, rel_index[i, j]]
                if s > acc_hi:
                    s = acc_hi
                    na += 1
                elif s < acc_lo:
                    s = acc_lo
                    na += 1
                A[j] = s
            # integer softmax over the valid (unmasked) positions
            m = np.int64(0)
            first = True
            for j in range(n):
                if mask[w, i, j] == 0 and (first or A[j] > m):
                    m = A[j]
                    first = False
            Z = np.int64(0)
            for j in range(n):
                if mask[w, i, j] != 0:
                    e[j] = 0
                    continue
                u = _rshift((m - A[j]) * score_mult, score_shift)
                ip = u >> E
                if ip <= 62:
                    e[j] = _rshift(exp_table[u & emask], ip)
                else:
                    e[j] = 0
                Z += e[j]
            inv = _rdiv(one, Z)
            for j in range(n):
                p = _rshift(e[j] * inv, G)
                if p > pmax:
                    p = pmax
                    npr += 1
                if want_p:
                    probs[b, w, h, i, j] = p
                dec[j] = decode[_count_le(thresholds, sorted_thr, p)]
            # O = decode[code] (v - zp_v), requantized, written to the query token's own row
            ti = tokens[w, i]
            for r in range(d):
                o = np.int64(0)
                for j in range(n):
                    o += dec[j] * vw[j, r]
                if o > acc_hi:
                    o = acc_hi
                    na += 1
                elif o < acc_lo:
                    o = acc_lo
                    na += 1
                y = _rshift(o * mult, shift) + zp
                if y > hi:
                    y = hi
                    no += 1
                elif y < lo:
                    y = lo
                    no += 1
                out[b, ti, c0 + r] = y
        cnt[task, 0] = na
        cnt[task, 1] = no
        cnt[task, 2] = npr
    return cnt[:, 0].sum(), cnt[:, 1].sum(), cnt[:, 2].sum()


@njit(cache=True, parallel=True)
def token_pool_kernel(x, mult, shift, zp, lo, hi, acc_lo, acc_hi, out):
    """Spec 9.4: out[b, 0, c] = sat(rq(accsat(sum_t x[b, t, c]), mult, shift) + zp, lo, hi); (acc, out) counts."""
    B, T, C = x.shape
    cnt = np.zeros((B, 2), np.int64)
    for b in prange(B):
        for c in range(C):
            s = np.int64(0)
            for t in range(T):
                s += x[b, t, c]
            if s > acc_hi:
                s = acc_hi
                cnt[b, 0] += 1
            elif s < acc_lo:
                s = acc_lo
                cnt[b, 0] += 1
            y = _rshift(s * mult, shift) + zp
            if y > hi:
                y = hi
                cnt[b, 1] += 1
            elif y < lo:
                y = lo
                cnt[b, 1] += 1
            out[b, 0, c] = y
    return cnt[:, 0].sum(), cnt[:, 1].sum()


# ---- op objects ---------------------------------------------------------------------------

def _i64(a) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.int64)


def _int(v: Any, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise ProgramError(f"{what} must be an integer, got {v!r}")
    return int(v)


def _ints(*xs: np.ndarray) -> list[np.ndarray]:
    out = []
    for x in xs:
        x = np.asarray(x)
        if x.dtype.kind not in "iu":
            raise TypeError(f"integer input expected, got dtype {x.dtype}")
        out.append(_i64(x))
    return out


def _zero() -> dict[str, int]:
    return {"acc": 0, "out": 0, "prob": 0}


def _value_range(program, name: str) -> tuple[int, int]:
    v = program.header.get("values", {}).get(name)
    if v is None:
        return -(1 << 62), (1 << 62)
    b = int(v["bits"])
    if v["kind"] == "int":
        return -(1 << (b - 1)), (1 << (b - 1)) - 1
    return 0, (1 << b) - 1


class _Patchify:
    def __init__(self, o, program, op):
        self.name = o.name
        self.patch = _int(op["attrs"]["patch"], f"op '{o.name}' attribute 'patch'")
        if self.patch < 1:
            raise ProgramError(f"op '{o.name}': patch must be >= 1")
        self.lo, self.hi = 0, 255

    def __call__(self, img):
        (img,) = _ints(img)
        if img.ndim != 4:
            raise ValueError(f"op '{self.name}': image batch (B, C, H, W) expected, got {img.shape}")
        B, C, H, W = img.shape
        p = self.patch
        if H % p or W % p:
            raise ValueError(f"op '{self.name}': image {H}x{W} is not a multiple of the patch size {p}")
        x = img.reshape(B, C, H // p, p, W // p, p).transpose(0, 2, 4, 1, 3, 5)
        return np.ascontiguousarray(x).reshape(B, (H // p) * (W // p), C * p * p), _zero()


class _PatchMerge:
    def __init__(self, o, program, op):
        self.name = o.name
        self.src = _i64(program.t(op, "src"))
        if self.src.ndim != 2 or self.src.shape[1] != 4:
            raise ProgramError(f"op '{o.name}': src must be (T/4, 4)")
        r = o.ranges[0] if o.ranges and o.ranges[0] is not None else _value_range(program, op["inputs"][0])
        self.lo, self.hi = int(r[0]), int(r[1])

    def __call__(self, x):
        (x,) = _ints(x)
        B, T, C = x.shape
        if self.src.shape[0] * 4 != T or (self.src.size and (self.src.min() < 0 or self.src.max() >= T)):
            raise ValueError(f"op '{self.name}': {T} input tokens do not match the merge table")
        return np.ascontiguousarray(x[:, self.src]).reshape(B, T // 4, 4 * C), _zero()


class _WindowAttention:
    def __init__(self, o, program, op):
        name = self.name = o.name
        at = op["attrs"]
        a = lambda n: _int(at[n], f"op '{name}' attribute '{n}'")  # noqa: E731
        self.heads, self.frac = a("heads"), a("score_frac")
        self.zp_q, self.zp_k, self.zp_v = a("zp_q"), a("zp_k"), a("zp_v")
        self.score_mult, self.score_shift = a("score_mult"), a("score_shift")
        self.E, self.P, self.G = a("exp_frac_bits"), a("prob_bits"), a("recip_frac")
        self.mult, self.shift = a("mult"), a("shift")
        self.zp, self.lo, self.hi = a("zp"), a("lo"), a("hi")
        self.acc_lo, self.acc_hi = o.acc_lo, o.acc_hi
        t = lambda n: _i64(program.t(op, n))  # noqa: E731
        self.exp_table, self.thresholds, self.decode = t("exp_table"), t("thresholds"), t("decode")
        self.tokens, self.bias_table, self.rel_index = t("tokens"), t("bias_table"), t("rel_index")
        self.mask = np.ascontiguousarray(program.t(op, "mask"), dtype=np.int8)
        nW, n = self.tokens.shape
        if self.exp_table.shape[0] != 1 << self.E or self.exp_table[0] < 1:
            raise ProgramError(f"op '{name}': exp_table must have 2^exp_frac_bits entries, the first positive")
        if self.decode.shape[0] != self.thresholds.shape[0] + 1:
            raise ProgramError(f"op '{name}': decode must have one entry more than thresholds")
        if not 0 <= self.P + self.G <= 61 or not 0 <= self.frac <= 30:
            raise ProgramError(f"op '{name}': prob_bits + recip_frac or score_frac out of range")
        for s in (self.score_shift, self.shift, self.G):
            if not 0 <= s <= 62:
                raise ProgramError(f"op '{name}': shift {s} outside 0..62")
        if self.rel_index.shape != (n, n) or self.mask.shape != (nW, n, n) or self.bias_table.shape[0] != self.heads:
            raise ProgramError(f"op '{name}': window tables of inconsistent shapes")
        if self.rel_index.size and (self.rel_index.min() < 0 or self.rel_index.max() >= self.bias_table.shape[1]):
            raise ProgramError(f"op '{name}': rel_index outside the bias table")
        if not np.array_equal(np.sort(self.tokens.ravel()), np.arange(nW * n)):
            raise ProgramError(f"op '{name}': the window token table is not a permutation of the tokens")
        if n and np.any(np.diagonal(self.mask, axis1=1, axis2=2) != 0):
            raise ProgramError(f"op '{name}': a query is masked from itself (empty softmax row)")
        self.sorted_thr = int(bool(np.all(np.diff(self.thresholds) >= 0)))
        self._nop = np.zeros((1, 1, 1, 1, 1), np.int64)

    def _run(self, q, k, v, want_p: bool):
        q, k, v = _ints(q, k, v)
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

    def __call__(self, q, k, v):
        y, _, c = self._run(q, k, v, False)
        return y, c

    def probabilities(self, q, k, v) -> np.ndarray:
        """The integer probabilities p (B, nW, H, n, n) (P fractional bits) the engine computes."""
        return self._run(q, k, v, True)[1]


class _TokenPool:
    def __init__(self, o, program, op):
        name = self.name = o.name
        at = op["attrs"]
        a = lambda n: _int(at[n], f"op '{name}' attribute '{n}'")  # noqa: E731
        self.mult, self.shift, self.zp, self.lo, self.hi = a("mult"), a("shift"), a("zp"), a("lo"), a("hi")
        if not 0 <= self.shift <= 62:
            raise ProgramError(f"op '{name}': shift outside 0..62")
        self.acc_lo, self.acc_hi = o.acc_lo, o.acc_hi

    def __call__(self, x):
        (x,) = _ints(x)
        if x.ndim != 3:
            raise ValueError(f"op '{self.name}': input (B, T, C) expected, got {x.shape}")
        y = np.empty((x.shape[0], 1, x.shape[2]), np.int64)
        na, no = token_pool_kernel(x, self.mult, self.shift, self.zp, self.lo, self.hi, self.acc_lo, self.acc_hi, y)
        return y, {"acc": int(na), "out": int(no), "prob": 0}


_CLASSES = {"patchify": _Patchify, "patch_merge": _PatchMerge, "window_attention": _WindowAttention,
            "token_pool": _TokenPool}


def build(o, program, op: dict[str, Any]) -> Callable[..., tuple[np.ndarray, dict[str, int]]]:
    """The callable of a Swin op for ``runner._Op`` ``o``; sets ``o.lo`` / ``o.hi`` (proven output range)
    and ``o.swin`` (the op object, e.g. for ``o.swin.probabilities``)."""
    impl = _CLASSES[o.type](o, program, op)
    o.swin = impl
    o.lo, o.hi = impl.lo, impl.hi
    return impl


def window_probabilities(program, op: dict[str, Any] | str, q, k, v) -> np.ndarray:
    """Integer probabilities (B, nW, H, n, n) of a ``window_attention`` op, computed by the engine kernel."""
    from .runner import _Op
    if isinstance(op, str):
        op = program.op(op)
    return _Op(program, op).swin.probabilities(q, k, v)
