"""Numba kernels of the integer engine: one kernel per op of ``docs/integer-spec.md``.

Every kernel works on C-contiguous ``int64`` arrays and ``int64`` scalars only (one compiled
specialization each), in exact two's-complement int64 arithmetic as the specification states:

* ``rshift`` rounds half up (adds ``2^(n-1)`` then shifts arithmetically, i.e. floors negatives);
* ``rq(a, m, n) = rshift(a * m, n)`` with a 64-bit product;
* ``accsat`` saturates the exact int64 sum once to the accumulator range;
* saturation events are counted per row into arrays that are summed after the parallel loop, so
  results and counts never depend on the number of threads.

Kernels return ``(y, count_a, count_b, ...)`` with the counts already summed (int64 scalars).
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

# ---- scalar helpers ---------------------------------------------------------------------


@njit(cache=True, inline="always")
def rshift(a, n):
    """Round-half-up arithmetic right shift: ``floor((a + 2^(n-1)) / 2^n)``; ``a`` if n == 0; ``a * 2^-n`` if n < 0.

    For n >= 1 the sum is not formed (it could overflow near 2^63): with a = q 2^n + r, 0 <= r < 2^n,
    the result is q + (r >= 2^(n-1)) = (a >> n) + bit n-1 of a (``>>`` is arithmetic, i.e. floor).
    """
    if n > 0:
        return (a >> n) + ((a >> (n - 1)) & 1)
    if n == 0:
        return a
    return a << (-n)


@njit(cache=True, inline="always")
def rq(a, m, n):
    """Requantize: ``rshift(a * m, n)`` with the product in int64."""
    return rshift(a * m, n)


@njit(cache=True, inline="always")
def rdiv(a, b):
    """Rounded integer division ``floor((2a + b) / (2b))`` for ``b > 0``."""
    return (2 * a + b) // (2 * b)


@njit(cache=True)
def isqrt(v):
    """Exact ``floor(sqrt(v))`` for ``v >= 0`` by Newton's iteration from an over-estimate.

    The start ``2^ceil(bits(v)/2)`` is above ``sqrt(v)``; from an over-estimate the integer Newton
    iterates ``x' = (x + v // x) // 2`` decrease strictly until they reach ``floor(sqrt(v))``, so
    the loop stops as soon as an iterate does not decrease. ``v <= 0`` gives 0.
    """
    if v <= 0:
        return np.int64(0)
    bits = np.int64(0)
    t = v
    while t > 0:
        t >>= 1
        bits += 1
    x = np.int64(1) << ((bits + 1) // 2)
    while True:
        y = (x + v // x) >> 1
        if y >= x:
            return x
        x = y


# ---- linear / patch_embed ---------------------------------------------------------------


@njit(cache=True, parallel=True)
def gemm_i64(x, w):
    """Exact int64 GEMM ``S[m, n] = sum_k x[m, k] * w[n, k]`` (the fallback when float64 is not exact)."""
    M, K = x.shape
    N = w.shape[0]
    out = np.empty((M, N), np.int64)
    for m in prange(M):
        for n in range(N):
            s = np.int64(0)
            for k in range(K):
                s += x[m, k] * w[n, k]
            out[m, n] = s
    return out


@njit(cache=True, parallel=True)
def gemm_epilogue(S, bias, mult, shift, add, lo, hi, acc_lo, acc_hi):
    """``y[m, n] = sat(rq(accsat(bias[n] + S[m, n]), mult[n], shift[n]) + add[m % R, n], lo, hi)``.

    ``add`` is (R, N): the output zero point (R = 1) for ``linear``, the position embedding of the
    patch tokens (R = patches per image, rows ordered image-major) for ``patch_embed``.
    Returns ``(y, n_acc, n_out)``.
    """
    M, N = S.shape
    R = add.shape[0]
    y = np.empty((M, N), np.int64)
    cacc = np.zeros(M, np.int64)
    cout = np.zeros(M, np.int64)
    for m in prange(M):
        r = m % R
        na = np.int64(0)
        no = np.int64(0)
        for n in range(N):
            a = bias[n] + S[m, n]
            if a < acc_lo:
                a = acc_lo
                na += 1
            elif a > acc_hi:
                a = acc_hi
                na += 1
            v = rq(a, mult[n], shift[n]) + add[r, n]
            if v < lo:
                v = lo
                no += 1
            elif v > hi:
                v = hi
                no += 1
            y[m, n] = v
        cacc[m] = na
        cout[m] = no
    return y, cacc.sum(), cout.sum()


# ---- layernorm ----------------------------------------------------------------------------


@njit(cache=True, parallel=True)
def layernorm_rows(x, gmul, gadd, recip_bits, norm_frac, shift, zp, lo, hi):
    """Integer LayerNorm of every row of ``x`` (M, D) (spec 4.3). Returns ``(y, n_out)``."""
    M, D = x.shape
    y = np.empty((M, D), np.int64)
    cout = np.zeros(M, np.int64)
    num = np.int64(1) << recip_bits
    nshift = recip_bits - norm_frac
    for m in prange(M):
        s1 = np.int64(0)
        s2 = np.int64(0)
        for i in range(D):
            xi = x[m, i]
            s1 += xi
            s2 += xi * xi
        var = D * s2 - s1 * s1
        sd = isqrt(var)
        inv = np.int64(0)
        if sd != 0:
            inv = rdiv(num, sd)
        no = np.int64(0)
        for i in range(D):
            c = D * x[m, i] - s1
            nv = rshift(c * inv, nshift)
            v = rshift(nv * gmul[i] + gadd[i], shift) + zp
            if v < lo:
                v = lo
                no += 1
            elif v > hi:
                v = hi
                no += 1
            y[m, i] = v
        cout[m] = no
    return y, cout.sum()


# ---- attention ----------------------------------------------------------------------------


@njit(cache=True, parallel=True)
def attention(q, k, v, heads, zp_q, zp_k, zp_v, score_mult, score_shift, exp_frac_bits,
              prob_bits, recip_frac, mult, shift, zp, lo, hi, acc_lo, acc_hi,
              exp_table, thresholds, decode, sorted_thresholds):
    """Integer attention core (spec 4.4) on q, k, v (B, T, D). Returns ``(y, n_acc, n_out, n_prob)``.

    One parallel iteration per (image, head, query row). ``sorted_thresholds`` (0/1) selects a
    binary search for the threshold encoding; otherwise the literal count over all thresholds.
    """
    B, T, D = q.shape
    d = D // heads
    nq = thresholds.shape[0]
    emask = (np.int64(1) << exp_frac_bits) - 1
    num = np.int64(1) << (prob_bits + recip_frac)
    pmax = (np.int64(1) << prob_bits) - 1
    rows = B * heads * T
    y = np.empty((B, T, D), np.int64)
    cacc = np.zeros(rows, np.int64)
    cout = np.zeros(rows, np.int64)
    cprob = np.zeros(rows, np.int64)
    for idx in prange(rows):
        b = idx // (heads * T)
        rem = idx - b * heads * T
        h = rem // T
        i = rem - h * T
        c0 = h * d
        na = np.int64(0)
        no = np.int64(0)
        npr = np.int64(0)
        # scores A[i, j], saturated, and their maximum
        A = np.empty(T, np.int64)
        mx = acc_lo
        for j in range(T):
            s = np.int64(0)
            for r in range(d):
                s += (q[b, i, c0 + r] - zp_q) * (k[b, j, c0 + r] - zp_k)
            if s < acc_lo:
                s = acc_lo
                na += 1
            elif s > acc_hi:
                s = acc_hi
                na += 1
            A[j] = s
            if s > mx:
                mx = s
        # base-2 exponentials and their row sum (A is reused to hold e)
        Z = np.int64(0)
        for j in range(T):
            u = rq(mx - A[j], score_mult, score_shift)
            ip = u >> exp_frac_bits
            e = np.int64(0)
            if ip <= 62:
                e = rshift(exp_table[u & emask], ip)
            A[j] = e
            Z += e
        inv = rdiv(num, Z)
        # probabilities, threshold encoding, table decode times V
        O = np.zeros(d, np.int64)
        for j in range(T):
            p = rshift(A[j] * inv, recip_frac)
            if p > pmax:
                p = pmax
                npr += 1
            if sorted_thresholds != 0:
                lo_i = 0
                hi_i = nq
                while lo_i < hi_i:  # first index with thresholds[idx] > p
                    mid = (lo_i + hi_i) >> 1
                    if thresholds[mid] <= p:
                        lo_i = mid + 1
                    else:
                        hi_i = mid
                code = lo_i
            else:
                code = 0
                for t in range(nq):
                    if p >= thresholds[t]:
                        code += 1
            dv = decode[code]
            if dv != 0:
                for r in range(d):
                    O[r] += dv * (v[b, j, c0 + r] - zp_v)
        for r in range(d):
            o = O[r]
            if o < acc_lo:
                o = acc_lo
                na += 1
            elif o > acc_hi:
                o = acc_hi
                na += 1
            val = rq(o, mult, shift) + zp
            if val < lo:
                val = lo
                no += 1
            elif val > hi:
                val = hi
                no += 1
            y[b, i, c0 + r] = val
        cacc[idx] = na
        cout[idx] = no
        cprob[idx] = npr
    return y, cacc.sum(), cout.sum(), cprob.sum()


# ---- gelu / add -----------------------------------------------------------------------------


@njit(cache=True, parallel=True)
def gelu_lookup(x, table, offset):
    """``y = table[x + offset]`` on a flat array. Returns ``(y, n_bad)``: inputs outside the table
    are counted (and give -1), never read out of bounds."""
    n = x.shape[0]
    G = table.shape[0]
    y = np.empty(n, np.int64)
    bad = np.zeros(n, np.int64)
    for i in prange(n):
        j = x[i] + offset
        if j < 0 or j >= G:
            bad[i] = 1
            y[i] = -1
        else:
            y[i] = table[j]
    return y, bad.sum()


@njit(cache=True, parallel=True)
def add_requant(a, skip, mult, shift, lo, hi, cols):
    """``y = sat(a + rq(skip, mult, shift), lo, hi)`` on flat arrays, counted per row of ``cols``.
    Returns ``(y, n_out)``."""
    n = a.shape[0]
    rows = (n + cols - 1) // cols
    y = np.empty(n, np.int64)
    cout = np.zeros(rows, np.int64)
    for r in prange(rows):
        no = np.int64(0)
        end = min(n, (r + 1) * cols)
        for i in range(r * cols, end):
            v = a[i] + rq(skip[i], mult, shift)
            if v < lo:
                v = lo
                no += 1
            elif v > hi:
                v = hi
                no += 1
            y[i] = v
        cout[r] = no
    return y, cout.sum()
