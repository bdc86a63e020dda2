"""Numba epilogue kernels of the GEMM ops and the elementwise ops (``docs/integer-spec.md`` 4.1-4.3,
4.5, 4.6): bias, accumulator saturation, requantization and clamp of a GEMM result, fused with the
residual add, the next LayerNorm or the GELU table where the graph allows (``intsim.engine``),
plus LayerNorm rows, the GELU lookup and the standalone residual add.

GEMM results arrive as a C-contiguous 3-D stack ``S[c, m, n]`` of float32, float64 or int64
partial sums over ``c`` (K-chunks or split-operand parts); every element holds an exact integer
(the engine proves it before it picks a route), so ``to_i64(S[...])`` is exact and the chunks are
added in int64. Activations written for the next GEMM are float32 codes (exact: float32 storage is
chosen only for values whose proven range lies within +-2^24) or uint8; everything else is int64.
The integer rules come from :mod:`intsim.kernels.numeric`.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from .numeric import isqrt, rdiv, rq, rq_narrow, rshift, rshift_bf, store_val, to_i64

@njit(cache=True)
def _acc_row(S, m, buf):
    """``buf[n] = sum_c S[c, m, n]`` exactly in int64."""
    N = S.shape[2]
    for n in range(N):
        buf[n] = to_i64(S[0, m, n])
    for c in range(1, S.shape[0]):
        for n in range(N):
            buf[n] += to_i64(S[c, m, n])


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
                out[b, t + row_off, n] = store_val(out, buf[n])
    tot = cnt.sum(axis=0)
    return tot[0], tot[1]


@njit(cache=True, inline="always")
def _residual_add_row(buf, skip, m, amult, aoff, ashift, acorr, anarrow, alo, ahi, out):
    """The residual ``add`` (spec 4.6) of one row: ``out[m, n] = buf[n] = sat(buf[n] + rq(skip[m, n],
    amult, ashift), alo, ahi)``; returns how many elements the saturation changed."""
    nd = np.int64(0)
    for n in range(buf.shape[0]):
        y = buf[n] + rq_narrow(skip[m, n], amult, aoff, ashift, acorr, ashift, anarrow)
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
                out[m, i] = store_val(out, y)
        else:
            for i in range(D):
                nv = np.int64((np.uint64((D * x[i] - s1) * inv) + off1) >> sh1) - corr1
                v = np.int64((np.uint64(nv * gmul[i] + gadd[i]) + off2) >> sh2) - corr2
                y = min(max(v, lo), hi)
                no += np.int64(y != v)
                out[m, i] = store_val(out, y)
    else:
        for i in range(D):
            c = D * x[i] - s1
            nv = rshift(c * inv, nshift)
            v = rshift(nv * gmul[i] + gadd[i], shift) + zp
            y = min(max(v, lo), hi)
            no += np.int64(y != v)
            out[m, i] = store_val(out, y)
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
