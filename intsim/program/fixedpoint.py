"""Export-time fixed-point helpers (``docs/integer-spec.md`` sections 1 and 2), in exact Python integers.

* :func:`rnd_int` -- round half up of a float64, as a Python int (exact);
* :func:`rshift` -- ``floor((a + 2^(n-1)) / 2^n)`` on Python ints;
* :func:`requant` / :func:`requant_array` -- a real multiplier ``M > 0`` as ``(m, n)`` with
  ``m < 2^(B-1)`` (``B = mult_bits``) and ``0 <= n <= MAX_SHIFT``, ``M ~ m * 2^-n``;
* :func:`check_mult_shift` -- the section 8 bound on a program's multipliers and shifts.
"""
from __future__ import annotations

import math

import numpy as np

from intsim.program.program import MAX_SHIFT
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
    if n > MAX_SHIFT:
        m, n = rshift(m, n - MAX_SHIFT), MAX_SHIFT
    if n < 0:
        raise ExportError(f"requantization factor {M!r} >= 2^{B - 1} cannot be represented (negative shift)")
    return m, n


def requant_array(M: np.ndarray, mult_bits: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`requant` of every element: multipliers and shifts as int64 arrays (vectorized; the
    rare elements needing the n > MAX_SHIFT reduction or failing go through :func:`requant`)."""
    M = np.asarray(M, dtype=np.float64)
    B = int(mult_bits)
    f, e = np.frexp(M)
    m = rnd(np.ldexp(f, B - 1)).astype(np.int64)
    top = m == (1 << (B - 1))
    m = np.where(top, 1 << (B - 2), m)
    n = (B - 1) - (e.astype(np.int64) + top)
    slow = ~(np.isfinite(M) & (M > 0) & (n >= 0) & (n <= MAX_SHIFT))
    for i in zip(*np.nonzero(slow)):
        m[i], n[i] = requant(float(M[i]), B)
    return m, n


def check_mult_shift(where: str, m, n, mult_bits: int) -> None:
    """``ExportError`` unless every multiplier is in ``0..2^(B-1)-1`` and every shift in
    ``0..MAX_SHIFT`` (``m``, ``n``: ints or arrays; section 8)."""
    B = int(mult_bits)
    m, n = np.asarray(m, np.int64), np.asarray(n, np.int64)
    if m.min(initial=0) < 0 or m.max(initial=0) > (1 << (B - 1)) - 1:
        raise ExportError(f"{where}: multiplier outside 0..2^{B - 1}-1")
    if n.min(initial=0) < 0 or n.max(initial=0) > MAX_SHIFT:
        raise ExportError(f"{where}: shift outside 0..{MAX_SHIFT}")
