"""Numba kernels of the Swin op types (``docs/integer-spec.md`` 9.3, 9.4): shifted-window attention
and the token average pool, in exact int64 arithmetic.

Window attention runs one parallel task per (image, window, head): the window's centered q, k,
v rows are gathered through ``tokens``, the n x n scores are exact int64 dot products scaled by
``2^score_frac`` plus ``bias_table[h, rel_index[i, j]]`` and saturated once to the accumulator;
the integer softmax skips masked positions (their probability is exactly 0), the probabilities
are threshold-encoded, decoded through the table inside the int64 product with v, requantized,
and scattered back to the tokens' own rows (window reverse and reverse shift in one step).
Counts are summed per task, so results and counts do not depend on the number of threads.
The integer rules come from :mod:`intsim.kernels.numeric`.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from .numeric import count_le, rshift, softmax_exp, softmax_inverse, softmax_prob

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
    pmax = (1 << P) - 1
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
                e[j] = softmax_exp(m - A[j], score_mult, score_shift, E, exp_table)
                Z += e[j]
            inv = softmax_inverse(Z, P, G)
            for j in range(n):
                p, sat = softmax_prob(e[j], inv, G, pmax)
                npr += sat
                if want_p:
                    probs[b, w, h, i, j] = p
                dec[j] = decode[count_le(thresholds, sorted_thr, p)]
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
                y = rshift(o * mult, shift) + zp
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
            y = rshift(s * mult, shift) + zp
            if y > hi:
                y = hi
                cnt[b, 1] += 1
            elif y < lo:
                y = lo
                cnt[b, 1] += 1
            out[b, 0, c] = y
    return cnt[:, 0].sum(), cnt[:, 1].sum()


# ---- op objects ---------------------------------------------------------------------------
