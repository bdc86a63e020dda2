"""Numba kernels of the integer engine (``docs/integer-spec.md``).

The matrix products themselves run in a BLAS (see ``runner.py``: float32/float64 products that are
provably exact, oneDNN's int8 GEMM, or the int64 kernel ``gemm_i64`` here); these kernels do
everything else, in exact two's-complement int64 arithmetic as the specification states:

* ``rshift`` rounds half up (adds ``2^(n-1)`` then shifts arithmetically, i.e. floors negatives);
* ``rq(a, m, n) = rshift(a * m, n)`` with a 64-bit product;
* ``accsat`` saturates the exact int64 sum once to the accumulator range;
* saturation events are counted per row into arrays that are summed after the parallel loop, so
  results and counts never depend on the number of threads.

Conventions (they keep the number of compiled specializations small and fixed, so that a warm
``cache=True`` cache serves every call and nothing compiles in a fresh process):

* every parameter array is C-contiguous ``int64``; every scalar is a Python ``int`` (int64);
* GEMM results arrive as a C-contiguous 3-D stack ``S[c, m, n]`` of ``float32``, ``float64`` or
  ``int64`` partial sums over ``c`` (K-chunks or split-operand parts). Every element holds an
  exact integer (that is what the runner proves before it picks a route), so ``np.int64(S[...])``
  is exact and the chunks are added in int64;
* activations written for the next GEMM are ``float32`` codes (exact: the runner only chooses
  float32 storage for values whose proven range lies within +-2^24); everything else is ``int64``.

Kernels return their saturation counts as int64 scalars (already summed).
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange, types
from numba.extending import overload

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

    The start ``floor(sqrt_f64(v)) + 2`` is above ``sqrt(v)``: the float64 square root of an int64
    has a relative error below 2^-51, an absolute error below 2^-19 for v < 2^63, so its floor is
    at least ``floor(sqrt(v)) - 1``. From an over-estimate (or from ``floor(sqrt(v))`` itself) the
    integer Newton iterates ``x' = (x + v // x) // 2`` decrease strictly until they reach
    ``floor(sqrt(v))``, so the loop stops as soon as an iterate does not decrease (one or two
    steps from this start). ``v <= 0`` gives 0.
    """
    if v <= 0:
        return np.int64(0)
    x = np.int64(np.sqrt(np.float64(v))) + 2
    while True:
        y = (x + v // x) >> 1
        if y >= x:
            return x
        x = y


# ---- typed helpers (inlined; they fix how values convert, without branching on dtypes) -------------


def _to_i64(x):  # pragma: no cover - replaced by the overload below inside jitted code
    return np.int64(x)


@overload(_to_i64, inline="always")
def _to_i64_impl(x):
    """float32 -> int64 through int32 (a vectorizable conversion; float32 partial sums are exact
    integers of magnitude <= 2^24); anything else converts directly."""
    if isinstance(x, types.Float) and x.bitwidth == 32:
        return lambda x: np.int64(np.int32(x))
    return lambda x: np.int64(x)


def _store_val(arr, v):  # pragma: no cover - replaced by the overload below inside jitted code
    return v


@overload(_store_val, inline="always")
def _store_val_impl(arr, v):
    """The int64 ``v`` as an element of ``arr``: float32 codes go through int32 (exact, the runner
    stores float32 only for values within +-2^24), uint8 codes are truncated (exact, the runner
    stores uint8 only for values within 0..255), int64 stays as is."""
    if isinstance(arr.dtype, types.Float) and arr.dtype.bitwidth == 32:
        return lambda arr, v: np.float32(np.int32(v))
    if isinstance(arr.dtype, types.Integer) and arr.dtype.bitwidth == 8 and not arr.dtype.signed:
        return lambda arr, v: np.uint8(v)
    return lambda arr, v: v


@njit(cache=True, inline="always")
def rshift_bf(a, n):
    """``rshift`` without branches (vectorizable): for n >= 1 ``(a >> n) + ((a >> (n-1)) & 1)``,
    for n == 0 ``a``, for n < 0 ``a << -n``, selected arithmetically."""
    nn = max(n, 0)
    k = max(n - 1, 0)
    bit = np.int64(n > 0)
    ln = max(-n, 0)
    return ((a >> nn) + ((a >> k) & bit)) << ln


@njit(cache=True)
def _acc_row(S, m, buf):
    """``buf[n] = sum_c S[c, m, n]`` exactly in int64."""
    N = S.shape[2]
    for n in range(N):
        buf[n] = _to_i64(S[0, m, n])
    for c in range(1, S.shape[0]):
        for n in range(N):
            buf[n] += _to_i64(S[c, m, n])


#: Rows of the per-column parameter table ``cols`` (7, N) of a linear epilogue.
C_BIAS, C_MULT, C_SHIFT, C_OFF, C_CORR, C_LO, C_HI = 0, 1, 2, 3, 4, 5, 6


@njit(cache=True)
def _requant_row(buf, n0, n1, cols, add, ar, acc_lo, acc_hi, narrow):
    """In place for n0 <= n < n1 (spec 4.1):
    ``buf[n] = sat(rq(accsat(bias[n] + buf[n]), mult[n], shift[n]) + add[ar, n], lo[n], hi[n])``
    with the per-column constants in ``cols`` (rows ``C_*``). Returns ``(n_acc, n_out)``.

    ``narrow`` (0/1): the accumulator range and every multiplier lie within +-2^31 and every shift
    in 0..62 (the runner checks it). Then ``|p| = |a * m| <= 2^62`` and the rounding shift is one
    logical shift of an offset value: with ``off = 2^62 + h`` (``h = 2^(n-1)``, 0 for n = 0) and
    ``corr = 2^(62-n)``, ``p + off`` lies in ``[0, 2^64)`` and
    ``floor((p + h) / 2^n) = ((p + off) >>> n) - corr`` (unsigned shift), exactly ``rshift(p, n)``.
    Otherwise the general ``rshift_bf``.
    """
    na = np.int64(0)
    no = np.int64(0)
    u0 = np.uint64(n0)
    if narrow != 0:
        for k in range(n1 - n0):
            n = u0 + np.uint64(k)
            a = buf[n] + cols[C_BIAS, n]
            c = min(max(a, acc_lo), acc_hi)
            na += np.int64(c != a)
            u = np.uint64(np.int64(np.int32(c)) * np.int64(np.int32(cols[C_MULT, n]))) + np.uint64(cols[C_OFF, n])
            v = np.int64(u >> np.uint64(cols[C_SHIFT, n])) - cols[C_CORR, n] + add[ar, n]
            y = min(max(v, cols[C_LO, n]), cols[C_HI, n])
            no += np.int64(y != v)
            buf[n] = y
    else:
        for k in range(n1 - n0):
            n = u0 + np.uint64(k)
            a = buf[n] + cols[C_BIAS, n]
            c = min(max(a, acc_lo), acc_hi)
            na += np.int64(c != a)
            v = rshift_bf(c * cols[C_MULT, n], cols[C_SHIFT, n]) + add[ar, n]
            y = min(max(v, cols[C_LO, n]), cols[C_HI, n])
            no += np.int64(y != v)
            buf[n] = y
    return na, no


@njit(cache=True, inline="always")
def _rq_scalar(a, m, off, sh, corr, n, narrow):
    """``rq(a, m, n)`` for scalars; the offset form (see ``_requant_row``) when ``narrow``."""
    if narrow != 0:
        u = np.uint64(np.int64(np.int32(a)) * np.int64(np.int32(m))) + np.uint64(off)
        return np.int64(u >> np.uint64(sh)) - corr
    return rshift_bf(a * m, n)


# ---- linear / patch_embed: the int64 GEMM and the fused epilogues --------------------------------


@njit(cache=True, parallel=True)
def gemm_i64(x, w):
    """Exact int64 GEMM ``S[0, m, n] = sum_k x[m, k] * w[n, k]`` (the route when no BLAS route is exact)."""
    M, K = x.shape
    N = w.shape[0]
    out = np.empty((1, M, N), np.int64)
    for m in prange(M):
        for n in range(N):
            s = np.int64(0)
            for k in range(K):
                s += x[m, k] * w[n, k]
            out[0, m, n] = s
    return out


@njit(cache=True, parallel=True)
def linear_epilogue(S, cols, add, acc_lo, acc_hi, narrow, R, row_off, out, rows_per_task):
    """``y[m, n] = sat(rq(accsat(bias[n] + sum_c S[c, m, n]), mult[n], shift[n]) + add[., n], lo[n], hi[n])``.

    Row ``m`` of the GEMM is token ``m % R`` of image ``m // R`` and is written to
    ``out[m // R, m % R + row_off, n]`` (``out`` is (B, Tout, N), float32 or int64). ``add`` is
    (Ra, N): the output zero point (Ra = 1) for ``linear``, the position embedding of the patch
    tokens (Ra = R, ``row_off = 1`` leaves the class token row to the caller) for ``patch_embed``.
    Returns ``(n_acc, n_out)``.
    """
    M = S.shape[1]
    N = S.shape[2]
    Ra = add.shape[0]
    ntask = (M + rows_per_task - 1) // rows_per_task
    cnt = np.zeros((ntask, 2), np.int64)
    for tk in prange(ntask):
        buf = np.empty(N, np.int64)
        for m in range(tk * rows_per_task, min(M, (tk + 1) * rows_per_task)):
            b = m // R
            t = m - b * R
            _acc_row(S, m, buf)
            na, no = _requant_row(buf, 0, N, cols, add, t if Ra > 1 else 0, acc_lo, acc_hi, narrow)
            cnt[tk, 0] += na
            cnt[tk, 1] += no
            for n in range(N):
                out[b, t + row_off, n] = _store_val(out, buf[n])
    tot = cnt.sum(axis=0)
    return tot[0], tot[1]


@njit(cache=True, inline="always")
def _residual_add_row(buf, skip, m, amult, aoff, ashift, acorr, anarrow, alo, ahi, out):
    """The residual ``add`` (spec 4.6) of one row: ``out[m, n] = buf[n] = sat(buf[n] + rq(skip[m, n],
    amult, ashift), alo, ahi)``; returns how many elements the saturation changed."""
    nd = np.int64(0)
    for n in range(buf.shape[0]):
        y = buf[n] + _rq_scalar(skip[m, n], amult, aoff, ashift, acorr, ashift, anarrow)
        c = min(max(y, alo), ahi)
        nd += np.int64(c != y)
        out[m, n] = c
        buf[n] = c
    return nd


@njit(cache=True, parallel=True)
def linear_add_epilogue(S, cols, zp, acc_lo, acc_hi, narrow, skip, amult, ashift, aoff, acorr, alo, ahi,
                        anarrow, out, rows_per_task):
    """``linear`` (int output) fused with the residual ``add`` that consumes it (spec 4.1, 4.6):

        p[m, n]   = sat(rq(accsat(bias[n] + S[m, n]), mult[n], shift[n]) + zp[0, n], lo[n], hi[n])
        out[m, n] = sat(p[m, n] + rq(skip[m, n], amult, ashift), alo, ahi)

    ``skip`` and ``out`` are (M, N) int64; ``anarrow``: the offset form of the add's rq is exact
    (skip and amult within +-2^31, shift 0..62). Returns ``(n_acc, n_out linear, n_out add)``.
    """
    M = S.shape[1]
    N = S.shape[2]
    ntask = (M + rows_per_task - 1) // rows_per_task
    cnt = np.zeros((ntask, 3), np.int64)
    for tk in prange(ntask):
        buf = np.empty(N, np.int64)
        for m in range(tk * rows_per_task, min(M, (tk + 1) * rows_per_task)):
            _acc_row(S, m, buf)
            na, no = _requant_row(buf, 0, N, cols, zp, 0, acc_lo, acc_hi, narrow)
            nd = _residual_add_row(buf, skip, m, amult, aoff, ashift, acorr, anarrow, alo, ahi, out)
            cnt[tk, 0] += na
            cnt[tk, 1] += no
            cnt[tk, 2] += nd
    tot = cnt.sum(axis=0)
    return tot[0], tot[1], tot[2]


@njit(cache=True, parallel=True)
def linear_gelu_epilogue(S, cols, zp, acc_lo, acc_hi, narrow, table, offset, out, rows_per_task):
    """``linear`` (int output) fused with the ``gelu`` table lookup that consumes it (spec 4.1, 4.5):
    ``out[m, n] = table[p[m, n] + offset]`` with ``p`` as in ``linear_epilogue``; ``out`` (M, N)
    and ``table`` both uint8 or float32 (codes, exact) or both int64. Returns ``(n_acc, n_out, n_bad)``;
    ``n_bad`` counts GELU inputs outside the table (an error for the caller; those elements hold
    the nearest table entry)."""
    M = S.shape[1]
    N = S.shape[2]
    G = table.shape[0]
    ntask = (M + rows_per_task - 1) // rows_per_task
    cnt = np.zeros((ntask, 3), np.int64)
    for tk in prange(ntask):
        buf = np.empty(N, np.int64)
        idx = np.empty(N, np.int32)
        for m in range(tk * rows_per_task, min(M, (tk + 1) * rows_per_task)):
            _acc_row(S, m, buf)
            na, no = _requant_row(buf, 0, N, cols, zp, 0, acc_lo, acc_hi, narrow)
            nb = np.int64(0)
            for n in range(N):
                j = buf[n] + offset
                jj = min(max(j, 0), G - 1)
                nb += np.int64(jj != j)
                idx[n] = np.int32(jj)
            for n in range(N):                 # the gather on 32-bit indices (a faster loop)
                out[m, n] = table[np.uint32(idx[n])]
            cnt[tk, 0] += na
            cnt[tk, 1] += no
            cnt[tk, 2] += nb
    tot = cnt.sum(axis=0)
    return tot[0], tot[1], tot[2]


@njit(cache=True, parallel=True)
def qkv_epilogue(S, cols, zp, acc_lo, acc_hi, narrow, center, T, H, qh, kh, vh, rows_per_task):
    """The three ``linear`` ops q, k, v (one GEMM over their concatenated weights, N = 3 D) with
    the attention's head split and zero-point centering fused (spec 4.1, 4.4):

        y[m, n]  = sat(rq(accsat(bias[n] + S[m, n]), mult[n], shift[n]) + zp[0, n], lo[n], hi[n])
        section s = n // D (q, k, v), channel c = n % D, head h = c // d, r = c % d, b = m // T, t = m % T
        qh[b, h, t, r] = y - zp_q,   kh[b, h, t, r] = y - zp_k,   vh[b, h, t, r] = y - zp_v

    with ``center[n]`` the zero point of the attention input of the column's section. The outputs
    are float32 (their range was proven to lie within +-2^24). Returns the counts
    ``(acc_q, out_q, acc_k, out_k, acc_v, out_v)``.
    """
    M = S.shape[1]
    N = S.shape[2]
    D = N // 3
    d = D // H
    ntask = (M + rows_per_task - 1) // rows_per_task
    cnt = np.zeros((ntask, 6), np.int64)
    for tk in prange(ntask):
        buf = np.empty(N, np.int64)
        for m in range(tk * rows_per_task, min(M, (tk + 1) * rows_per_task)):
            b = m // T
            t = m - b * T
            _acc_row(S, m, buf)
            for sec in range(3):
                na, no = _requant_row(buf, sec * D, (sec + 1) * D, cols, zp, 0, acc_lo, acc_hi, narrow)
                cnt[tk, 2 * sec] += na
                cnt[tk, 2 * sec + 1] += no
            for h in range(H):
                cq = np.uint64(h * d)
                ck = np.uint64(D + h * d)
                cv = np.uint64(2 * D + h * d)
                for r in range(d):
                    n = cq + np.uint64(r)
                    qh[b, h, t, r] = np.float32(np.int32(buf[n] - center[n]))
                for r in range(d):
                    n = ck + np.uint64(r)
                    kh[b, h, t, r] = np.float32(np.int32(buf[n] - center[n]))
                for r in range(d):
                    n = cv + np.uint64(r)
                    vh[b, h, t, r] = np.float32(np.int32(buf[n] - center[n]))
    tot = cnt.sum(axis=0)
    return tot[0], tot[1], tot[2], tot[3], tot[4], tot[5]


# ---- layernorm ----------------------------------------------------------------------------


#: Entries of the LayerNorm scalar table ``lnp`` (int64).
L_RECIP, L_FRAC, L_SHIFT, L_ZP, L_LO, L_HI, L_FAST, L_OFF1, L_CORR1, L_OFF2, L_CORR2, L_NARROW = range(12)


@njit(cache=True)
def _ln_row(x, gmul, gadd, lnp, out, m):
    """Integer LayerNorm (spec 4.3) of the int64 row ``x`` (D,) into ``out[m, :]``. Returns ``n_out``.

    ``lnp[L_FAST]``: the runner proved ``|c * inv| <= 2^62`` and ``|n * gmul + gadd| <= 2^62`` for
    every input in the row's range, so both rounding shifts take the offset form of
    ``_requant_row`` (``off``/``corr`` in ``lnp``); ``lnp[L_NARROW]``: n and gmul lie within
    +-2^31 (an int32 product).
    """
    D = x.shape[0]
    recip_bits = lnp[L_RECIP]
    nshift = recip_bits - lnp[L_FRAC]
    shift = lnp[L_SHIFT]
    zp = lnp[L_ZP]
    lo = lnp[L_LO]
    hi = lnp[L_HI]
    s1 = np.int64(0)
    s2 = np.int64(0)
    for i in range(D):
        xi = x[i]
        s1 += xi
        s2 += xi * xi
    var = D * s2 - s1 * s1
    sd = isqrt(var)
    inv = np.int64(0)
    if sd != 0:
        inv = rdiv(np.int64(1) << recip_bits, sd)
    no = np.int64(0)
    if lnp[L_FAST] != 0:
        off1 = np.uint64(lnp[L_OFF1])
        corr1 = lnp[L_CORR1]
        off2 = np.uint64(lnp[L_OFF2])
        corr2 = lnp[L_CORR2] - zp
        sh1 = np.uint64(nshift)
        sh2 = np.uint64(shift)
        if lnp[L_NARROW] != 0:
            for i in range(D):
                nv = np.int64((np.uint64((D * x[i] - s1) * inv) + off1) >> sh1) - corr1
                t = np.int64(np.int32(nv)) * np.int64(np.int32(gmul[i])) + gadd[i]
                v = np.int64((np.uint64(t) + off2) >> sh2) - corr2
                y = min(max(v, lo), hi)
                no += np.int64(y != v)
                out[m, i] = _store_val(out, y)
        else:
            for i in range(D):
                nv = np.int64((np.uint64((D * x[i] - s1) * inv) + off1) >> sh1) - corr1
                v = np.int64((np.uint64(nv * gmul[i] + gadd[i]) + off2) >> sh2) - corr2
                y = min(max(v, lo), hi)
                no += np.int64(y != v)
                out[m, i] = _store_val(out, y)
    else:
        for i in range(D):
            c = D * x[i] - s1
            nv = rshift(c * inv, nshift)
            v = rshift(nv * gmul[i] + gadd[i], shift) + zp
            y = min(max(v, lo), hi)
            no += np.int64(y != v)
            out[m, i] = _store_val(out, y)
    return no


@njit(cache=True, parallel=True)
def layernorm_rows(x, gmul, gadd, lnp, out, rows_per_task):
    """Integer LayerNorm of every row of ``x`` (M, D) int64 (spec 4.3) into ``out`` (M, D): uint8 or
    float32 codes, or int64. Returns ``n_out``."""
    M = x.shape[0]
    ntask = (M + rows_per_task - 1) // rows_per_task
    cnt = np.zeros(ntask, np.int64)
    for tk in prange(ntask):
        for m in range(tk * rows_per_task, min(M, (tk + 1) * rows_per_task)):
            cnt[tk] += _ln_row(x[m], gmul, gadd, lnp, out, m)
    return cnt.sum()


@njit(cache=True, parallel=True)
def linear_add_ln_epilogue(S, cols, zp, acc_lo, acc_hi, narrow, skip, amult, ashift, aoff, acorr, alo, ahi,
                           anarrow, out, gmul, gadd, lnp, ln_out, rows_per_task):
    """``linear_add_epilogue`` followed, row by row, by the ``layernorm`` (tokens ``all``) that
    reads the sum: ``ln_out[m, :] = LN(out[m, :])`` (spec 4.3). Returns
    ``(n_acc, n_out linear, n_out add, n_out layernorm)``."""
    M = S.shape[1]
    N = S.shape[2]
    ntask = (M + rows_per_task - 1) // rows_per_task
    cnt = np.zeros((ntask, 4), np.int64)
    for tk in prange(ntask):
        buf = np.empty(N, np.int64)
        for m in range(tk * rows_per_task, min(M, (tk + 1) * rows_per_task)):
            _acc_row(S, m, buf)
            na, no = _requant_row(buf, 0, N, cols, zp, 0, acc_lo, acc_hi, narrow)
            nd = _residual_add_row(buf, skip, m, amult, aoff, ashift, acorr, anarrow, alo, ahi, out)
            nl = _ln_row(buf, gmul, gadd, lnp, ln_out, m)
            cnt[tk, 0] += na
            cnt[tk, 1] += no
            cnt[tk, 2] += nd
            cnt[tk, 3] += nl
    tot = cnt.sum(axis=0)
    return tot[0], tot[1], tot[2], tot[3]


# ---- attention: integer softmax between two batched BLAS products ----------------------------


@njit(cache=True)
def _softmax_row(S, g, i, A, acc_lo, acc_hi, score_mult, score_shift, exp_frac_bits, exp_table, etab, dz,
                 num, recip_frac, pmax, thresholds, binary, ctab, parts, P):
    """One score row (see ``attn_softmax``). Returns ``(n_acc, n_prob)``."""
    T = S.shape[2]
    npart = parts.shape[1]
    ntab = etab.shape[0] - 1          # etab ends with one extra 0 (the value of every gap >= dz)
    nq = thresholds.shape[0]
    emask = (np.int64(1) << exp_frac_bits) - 1
    na = np.int64(0)
    mx = acc_lo
    for j in range(T):
        s = _to_i64(S[g, i, j])
        c = min(max(s, acc_lo), acc_hi)
        na += np.int64(c != s)
        A[j] = c
        mx = max(mx, c)
    Z = np.int64(0)
    if dz <= ntab:
        # every gap is in the table (gaps >= dz read its final 0): one branch-free lookup
        for j in range(T):
            e = np.int64(etab[np.uint64(min(mx - A[j], ntab))])
            A[j] = e
            Z += e
    else:
        for j in range(T):
            diff = mx - A[j]
            if diff < ntab:
                e = np.int64(etab[np.uint64(diff)])
            elif diff >= dz:
                e = np.int64(0)
            else:
                u = rq(diff, score_mult, score_shift)
                ip = u >> exp_frac_bits
                e = np.int64(0)
                if ip <= 62:
                    e = rshift(exp_table[u & emask], ip)
            A[j] = e
            Z += e
    inv = rdiv(num, Z)
    npr = np.int64(0)
    row = np.uint64(i)
    if ctab.shape[0] > 0 and recip_frac >= 1 and npart == 1:
        # e >= 0 and inv >= 0: the rounding shift of e * inv (< 2^48) is a logical one
        g1 = np.uint64(recip_frac)
        g0 = np.uint64(recip_frac - 1)
        for j in range(T):
            x = np.uint64(A[j] * inv)
            p = np.int64((x >> g1) + ((x >> g0) & np.uint64(1)))
            pc = min(p, pmax)
            npr += np.int64(pc != p)
            P[g, row, j] = parts[np.uint64(ctab[np.uint64(pc)]), 0]
        return na, npr
    for j in range(T):
        p = rshift(A[j] * inv, recip_frac)
        pc = min(p, pmax)
        npr += np.int64(pc != p)
        p = pc
        if ctab.shape[0] > 0:
            code = np.int64(ctab[np.uint64(p)])
        elif binary != 0:
            lo_i = 0
            hi_i = nq
            while lo_i < hi_i:  # first index with thresholds[idx] > p
                mid = (lo_i + hi_i) >> 1
                if thresholds[mid] <= p:
                    lo_i = mid + 1
                else:
                    hi_i = mid
            code = np.int64(lo_i)
        else:
            code = np.int64(0)
            for t in range(nq):
                code += np.int64(p >= thresholds[t])
        A[j] = code
    for s_ in range(npart):
        row = np.uint64(s_ * T + i)
        for j in range(T):
            P[g, row, j] = parts[np.uint64(A[j]), s_]
    return na, npr


@njit(cache=True, parallel=True)
def attn_softmax(S, acc_lo, acc_hi, score_mult, score_shift, exp_frac_bits, exp_table, etab, dz, prob_bits,
                 recip_frac, thresholds, sorted_thresholds, ctab, parts, P, rows_per_task):
    """Integer softmax, threshold encoding and decode of every score row (spec 4.4).

    ``S`` (G, T, T) holds the exact scores ``sum_r (q - zp_q)(k - zp_k)`` of G = B * H (image, head)
    pairs (float32/float64/int64, exact integers). For row i of pair g the kernel forms ``accsat``,
    the row maximum m, the base-2 exponentials e of ``m - A``, their sum Z, the reciprocal, the
    probabilities (clamp counted as ``prob``) and the code, and writes the decode value
    ``decode[code]`` split into ``np = parts.shape[1]`` digits: ``P[g, s * T + i, j] = parts[code, s]``
    (``decode[code] = sum_s parts[code, s] * 2^(s * bits)``, chosen by the runner so that each
    digit's product with V is exact in P's float type).

    Two exact lookup tables, computed by the runner from the op's constants, replace per-element
    work: ``etab[diff]`` is e for the gap ``diff = m - A < len(etab) - 1`` (and e = 0 for
    ``diff >= dz``, proven by the runner; ``etab`` ends with that 0; other gaps are computed as the
    specification states);
    ``ctab[p]`` is the code of probability p (when empty: binary search of the sorted thresholds,
    or the literal count when they are not sorted). Returns ``(n_acc, n_prob)``.
    """
    G = S.shape[0]
    T = S.shape[1]
    num = np.int64(1) << (prob_bits + recip_frac)
    pmax = (np.int64(1) << prob_bits) - 1
    binary = np.int64(sorted_thresholds != 0)
    nrb = (T + rows_per_task - 1) // rows_per_task
    ntask = G * nrb
    cnt = np.zeros((ntask, 2), np.int64)
    for task in prange(ntask):
        g = task // nrb
        i0 = (task - g * nrb) * rows_per_task
        A = np.empty(T, np.int64)
        for i in range(i0, min(T, i0 + rows_per_task)):
            na, npr = _softmax_row(S, g, i, A, acc_lo, acc_hi, score_mult, score_shift, exp_frac_bits,
                                   exp_table, etab, dz, num, recip_frac, pmax, thresholds, binary, ctab, parts, P)
            cnt[task, 0] += na
            cnt[task, 1] += npr
    tot = cnt.sum(axis=0)
    return tot[0], tot[1]


@njit(cache=True)
def _attn_output_row(O, g, i, T, part_bits, mult, shift, off, corr, narrow, zp, lo, hi, acc_lo, acc_hi, buf):
    """One output row of ``attn_output`` into ``buf`` (d,). Returns ``(n_acc, n_out)``."""
    d = O.shape[2]
    npart = O.shape[1] // T
    for r in range(d):
        buf[r] = _to_i64(O[g, i, r])
    for s_ in range(1, npart):
        sh = s_ * part_bits
        row = np.uint64(s_ * T + i)
        for r in range(d):
            buf[r] += _to_i64(O[g, row, r]) << sh
    na = np.int64(0)
    no = np.int64(0)
    for r in range(d):
        o = buf[r]
        c = min(max(o, acc_lo), acc_hi)
        na += np.int64(c != o)
        val = _rq_scalar(c, mult, off, shift, corr, shift, narrow) + zp
        y = min(max(val, lo), hi)
        no += np.int64(y != val)
        buf[r] = y
    return na, no


@njit(cache=True, parallel=True)
def attn_output(O, part_bits, mult, shift, off, corr, narrow, zp, lo, hi, acc_lo, acc_hi, H, out, rows_per_task):
    """Attention output (spec 4.4): ``O[g, s * T + i, r]`` are the exact products of the decode
    digits s with ``v - zp_v``; ``O = sum_s O_s * 2^(s * part_bits)`` in int64, then
    ``out[b, i, h * d + r] = sat(rq(accsat(O), mult, shift) + zp, lo, hi)`` with g = b * H + h
    (``off``, ``corr``, ``narrow``: the offset form of ``rq``, see ``_requant_row``).
    ``out`` is (B, T, H * d), uint8 or float32 codes, or int64. Returns ``(n_acc, n_out)``."""
    G = O.shape[0]
    d = O.shape[2]
    T = out.shape[1]
    nrb = (T + rows_per_task - 1) // rows_per_task
    ntask = G * nrb
    cnt = np.zeros((ntask, 2), np.int64)
    for task in prange(ntask):
        g = task // nrb
        i0 = (task - g * nrb) * rows_per_task
        b = g // H
        h = g - b * H
        buf = np.empty(d, np.int64)
        for i in range(i0, min(T, i0 + rows_per_task)):
            na, no = _attn_output_row(O, g, i, T, part_bits, mult, shift, off, corr, narrow, zp, lo, hi,
                                      acc_lo, acc_hi, buf)
            cnt[task, 0] += na
            cnt[task, 1] += no
            c0 = np.uint64(h * d)
            for r in range(d):
                out[b, i, c0 + np.uint64(r)] = _store_val(out, buf[r])
    tot = cnt.sum(axis=0)
    return tot[0], tot[1]


@njit(cache=True, parallel=True)
def attention_i64(q, k, v, heads, zp_q, zp_k, zp_v, score_mult, score_shift, exp_frac_bits,
                  prob_bits, recip_frac, mult, shift, zp, lo, hi, acc_lo, acc_hi,
                  exp_table, thresholds, decode, sorted_thresholds):
    """Integer attention core (spec 4.4) on int64 q, k, v (B, T, D), entirely in int64 (the route
    when no float product is provably exact, and ``gemm="int"``). Returns ``(y, n_acc, n_out, n_prob)``.

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
        O = np.zeros(d, np.int64)
        for j in range(T):
            p = rshift(A[j] * inv, recip_frac)
            if p > pmax:
                p = pmax
                npr += 1
            if sorted_thresholds != 0:
                lo_i = 0
                hi_i = nq
                while lo_i < hi_i:
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
