"""Numba kernels of ``attention`` (``docs/integer-spec.md`` 4.4): the integer softmax, threshold
encoding and decode between two batched BLAS products (``attn_softmax``, ``attn_output``), and the
whole op in int64 (``attention_i64``, the route when no float product is provably exact).
The integer rules come from :mod:`intsim.kernels.numeric`.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from .numeric import count_le, rq, rq_narrow, softmax_exp, softmax_inverse, softmax_prob, store_val, to_i64

# ---- attention: integer softmax between two batched BLAS products ----------------------------


@njit(cache=True)
def _softmax_row(S, g, i, A, acc_lo, acc_hi, score_mult, score_shift, exp_frac_bits, exp_table, etab, dz,
                 prob_bits, recip_frac, pmax, thresholds, binary, ctab, parts, P):
    """One score row (see ``attn_softmax``). Returns ``(n_acc, n_prob)``."""
    T = S.shape[2]
    npart = parts.shape[1]
    ntab = etab.shape[0] - 1          # etab ends with one extra 0 (the value of every gap >= dz)
    na = np.int64(0)
    mx = acc_lo
    for j in range(T):
        s = to_i64(S[g, i, j])
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
                e = softmax_exp(diff, score_mult, score_shift, exp_frac_bits, exp_table)
            A[j] = e
            Z += e
    inv = softmax_inverse(Z, prob_bits, recip_frac)
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
        p, sat = softmax_prob(A[j], inv, recip_frac, pmax)
        npr += sat
        if ctab.shape[0] > 0:
            code = np.int64(ctab[np.uint64(p)])
        else:
            code = np.int64(count_le(thresholds, binary, p))
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
                                   exp_table, etab, dz, prob_bits, recip_frac, pmax, thresholds, binary, ctab, parts, P)
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
        buf[r] = to_i64(O[g, i, r])
    for s_ in range(1, npart):
        sh = s_ * part_bits
        row = np.uint64(s_ * T + i)
        for r in range(d):
            buf[r] += to_i64(O[g, row, r]) << sh
    na = np.int64(0)
    no = np.int64(0)
    for r in range(d):
        o = buf[r]
        c = min(max(o, acc_lo), acc_hi)
        na += np.int64(c != o)
        val = rq_narrow(c, mult, off, shift, corr, shift, narrow) + zp
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
                out[b, i, c0 + np.uint64(r)] = store_val(out, buf[r])
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
            e = softmax_exp(mx - A[j], score_mult, score_shift, exp_frac_bits, exp_table)
            A[j] = e
            Z += e
        inv = softmax_inverse(Z, prob_bits, recip_frac)
        O = np.zeros(d, np.int64)
        for j in range(T):
            p, sat = softmax_prob(A[j], inv, recip_frac, pmax)
            npr += sat
            dv = decode[count_le(thresholds, sorted_thresholds, p)]
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
