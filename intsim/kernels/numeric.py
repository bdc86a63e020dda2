"""The numeric core of the engine: the integer rules of ``docs/integer-spec.md`` section 1 and 2,
written once and used by every kernel module (``epilogues``, ``attention``, ``window``) and by the
engine's construction-time proofs.

* ``rshift`` rounds half up (adds ``2^(n-1)`` then shifts arithmetically, i.e. floors negatives);
  shifts are bounded by ``MAX_SHIFT`` (62) in every program;
* ``rq(a, m, n) = rshift(a * m, n)`` with a 64-bit product; ``rdiv`` the rounded division; ``isqrt``
  the exact integer square root;
* ``to_i64`` / ``store_val``: how values convert between the storage types of the kernels;
* ``rq_offsets`` / ``narrow_ok``: the constants and the proof of the offset form of ``rq`` (one
  int32 x int32 product and one logical shift) used by the epilogue kernels;
* ``count_le``: the post-softmax code of a probability (number of thresholds <= p).

Conventions of every kernel (they keep the number of compiled specializations small and fixed, so
that a warm ``cache=True`` cache serves every call and nothing compiles in a fresh process): every
parameter array is C-contiguous ``int64``, every scalar a Python ``int``; saturation events are
counted per row or task and summed after the parallel loop, so results and counts never depend on
the number of threads.
"""
from __future__ import annotations

import numpy as np
from numba import njit, types
from numba.extending import overload

from intsim.program.program import MAX_SHIFT

#: The offset form of ``rq`` needs ``|a|, |m| <= 2^NARROW_BITS`` so that ``|a * m| <= 2^MAX_SHIFT``.
NARROW_BITS = 31

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


def to_i64(x):  # pragma: no cover - replaced by the overload below inside jitted code
    return np.int64(x)


@overload(to_i64, inline="always")
def _to_i64_impl(x):
    """float32 -> int64 through int32 (a vectorizable conversion; float32 partial sums are exact
    integers of magnitude <= 2^24); anything else converts directly."""
    if isinstance(x, types.Float) and x.bitwidth == 32:
        return lambda x: np.int64(np.int32(x))
    return lambda x: np.int64(x)


def store_val(arr, v):  # pragma: no cover - replaced by the overload below inside jitted code
    return v


@overload(store_val, inline="always")
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


@njit(cache=True, inline="always")
def rq_narrow(a, m, off, sh, corr, n, narrow):
    """``rq(a, m, n)`` for scalars; the offset form (see ``epilogues._requant_row``; ``off``, ``corr`` from ``rq_offsets``) when ``narrow``."""
    if narrow != 0:
        u = np.uint64(np.int64(np.int32(a)) * np.int64(np.int32(m))) + np.uint64(off)
        return np.int64(u >> np.uint64(sh)) - corr
    return rshift_bf(a * m, n)

# ---- the integer softmax of one row, in three rules (spec 4.4; used by every attention kernel) ----


@njit(cache=True, inline="always")
def softmax_exp(gap, score_mult, score_shift, E, exp_table):
    """``e`` of a score gap ``m - A >= 0``: ``u = rq(gap, score_mult, score_shift)``,
    ``e = rshift(exp_table[u mod 2^E], u >> E)``, and 0 when ``u >> E > MAX_SHIFT``."""
    u = rq(gap, score_mult, score_shift)
    ip = u >> E
    if ip <= MAX_SHIFT:
        return rshift(exp_table[u & ((np.int64(1) << E) - 1)], ip)
    return np.int64(0)


@njit(cache=True, inline="always")
def softmax_inverse(Z, P, G):
    """The row's reciprocal ``rdiv(2^(P+G), Z)`` (``Z`` the sum of the row's ``e``, >= 1)."""
    return rdiv(np.int64(1) << (P + G), Z)


@njit(cache=True, inline="always")
def softmax_prob(e, inv, G, pmax):
    """``(p, saturated)``: ``p = min(rshift(e * inv, G), pmax)`` with ``pmax = 2^P - 1``; ``saturated``
    is 1 where the clamp changed the value (counted as ``prob``)."""
    p = rshift(e * inv, G)
    if p > pmax:
        return pmax, np.int64(1)
    return p, np.int64(0)

@njit(cache=True, inline="always")
def count_le(thr, sorted_thr, p):
    """The post-softmax code of probability p: the number of thresholds <= p (spec 4.4; binary
    search when ``sorted_thr`` is nonzero, else the literal count)."""
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


# ---- numpy-side helpers of the engine's construction-time proofs -------------------------------


def rshift_array(a: np.ndarray, n: np.ndarray | int) -> np.ndarray:
    """Spec ``rshift`` on int64 arrays (elementwise shift n in -MAX_SHIFT..MAX_SHIFT)."""
    a, n = np.broadcast_arrays(np.asarray(a, np.int64), np.asarray(n, np.int64))
    m = np.maximum(n, 1)
    y = np.where(n >= 1, (a >> m) + ((a >> (m - 1)) & 1), a)
    return np.where(n < 0, a << np.clip(-n, 0, MAX_SHIFT), y)


def rq_int(a: int, m: int, n: int) -> int:
    """Spec ``rq`` on Python integers (arbitrary precision)."""
    p = a * m
    if n > 0:
        return (p + (1 << (n - 1))) >> n
    return p << (-n)


def rq_offsets(shift: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``off = 2^62 + 2^(n-1)`` (``2^62`` for n = 0) and ``corr = 2^(62-n)`` per shift n in 0..62
    (``epilogues._requant_row``: ``rshift(p, n) = ((p + off) >>> n) - corr`` for ``|p| <= 2^62``);
    shifts outside 0..62 get zeros (those columns never use the offset form)."""
    n = np.asarray(shift, np.int64)
    ok = (n >= 0) & (n <= MAX_SHIFT)
    nn = np.where(ok, n, 0)
    off = np.where(ok, (np.int64(1) << MAX_SHIFT) + np.where(nn >= 1, np.int64(1) << np.maximum(nn - 1, 0), 0), 0)
    corr = np.where(ok, np.int64(1) << (MAX_SHIFT - nn), 0)
    return off.astype(np.int64), corr.astype(np.int64)


def narrow_ok(acc_lo: int, acc_hi: int, mult: np.ndarray, shift: np.ndarray) -> int:
    """1 when the offset form of ``rq(a, mult, shift)`` is exact for every accumulator a in
    ``[acc_lo, acc_hi]``: |a| and |mult| <= 2^31 (so |a * mult| <= 2^62) and shifts in 0..62."""
    lim = 2 ** NARROW_BITS
    mult = np.asarray(mult, np.int64)
    shift = np.asarray(shift, np.int64)
    return int(acc_lo >= -lim and acc_hi < lim
               and (mult.size == 0 or (int(mult.min()) >= -lim and int(mult.max()) < lim))
               and (shift.size == 0 or (int(shift.min()) >= 0 and int(shift.max()) <= MAX_SHIFT)))
