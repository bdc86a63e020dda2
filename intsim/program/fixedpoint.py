"""Export-time fixed-point helpers (``docs/integer-spec.md`` sections 1 and 2), in exact Python integers.

* :func:`rnd_int` -- round half up of a float64, as a Python int (exact);
* :func:`rshift` -- ``floor((a + 2^(n-1)) / 2^n)`` on Python ints;
* :func:`requant` / :func:`requant_array` -- a real multiplier ``M > 0`` as ``(m, n)`` with
  ``m < 2^(B-1)`` (``B = mult_bits``) and ``0 <= n <= 62``, ``M ~ m * 2^-n``.
"""
from __future__ import annotations

import math

import numpy as np

from intsim.program.quantizers import rnd


class ExportError(ValueError):
    """A constant or setting breaks a bound of the integer specification (section 8)."""


def rnd_int(v: float) -> int:
    """``floor(v + 1/2)`` of a finite float64, as an exact Python int."""
    return int(rnd(float(v)))


def rshift(a: int, n: int) -> int:
    """Round-half-up arithmetic right shift of a Python int (spec section 1)."""
    if n == 0:
        return a
    if n < 0:
        return a * (1 << -n)
    return (a + (1 << (n - 1))) >> n


def requant(M: float, mult_bits: int) -> tuple[int, int]:
    """Multiplier and shift of a real rescale ``M > 0`` (spec section 2)."""
    M = float(M)
    if not (math.isfinite(M) and M > 0):
        raise ExportError(f"requantization factor must be a positive finite number, got {M!r}")
    B = int(mult_bits)
    f, e = math.frexp(M)                       # M = f * 2^e, f in [0.5, 1)
    m = rnd_int(math.ldexp(f, B - 1))          # exact: scaling by a power of two
    if m == 1 << (B - 1):
        m, e = 1 << (B - 2), e + 1
    n = (B - 1) - e
    if n > 62:
        m, n = rshift(m, n - 62), 62
    if n < 0:
        raise ExportError(f"requantization factor {M!r} >= 2^{B - 1} cannot be represented (negative shift)")
    return m, n


def requant_array(M: np.ndarray, mult_bits: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`requant` of every element: multipliers and shifts as int64 arrays (vectorized; the
    rare elements needing the n > 62 reduction or failing go through :func:`requant`)."""
    M = np.asarray(M, dtype=np.float64)
    B = int(mult_bits)
    f, e = np.frexp(M)
    m = rnd(np.ldexp(f, B - 1)).astype(np.int64)
    top = m == (1 << (B - 1))
    m = np.where(top, 1 << (B - 2), m)
    n = (B - 1) - (e.astype(np.int64) + top)
    slow = ~(np.isfinite(M) & (M > 0) & (n >= 0) & (n <= 62))
    for i in zip(*np.nonzero(slow)):
        m[i], n[i] = requant(float(M[i]), B)
    return m, n
