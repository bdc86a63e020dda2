"""docs/integer-spec.md sections 1-2 with Python integers and fractions (exact, unbounded): the
reference both the golden model (tests/test_golden.py) and the engine (tests/test_engine_ops.py)
are tested against. It shares no code with either."""
from __future__ import annotations

import math
from fractions import Fraction


def r_rnd(v: Fraction) -> int:
    return math.floor(v + Fraction(1, 2))


def r_rshift(a: int, n: int) -> int:
    if n == 0:
        return a
    if n < 0:
        return a * 2 ** (-n)
    return r_rnd(Fraction(a, 2**n))


def r_rq(a: int, m: int, n: int) -> int:
    return r_rshift(a * m, n)


def r_rdiv(a: int, b: int) -> int:
    return r_rnd(Fraction(a, b))


def r_isqrt(v: int) -> int:
    lo, hi = 0, v + 1                        # bisection: lo^2 <= v < hi^2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if mid * mid <= v else (lo, mid)
    return lo


def r_sat(v: int, lo: int, hi: int, cnt: dict, key: str) -> int:
    y = min(max(v, lo), hi)
    cnt[key] += y != v
    return y


def r_accsat(v: int, A: int, cnt: dict) -> int:
    return r_sat(v, -(2 ** (A - 1)), 2 ** (A - 1) - 1, cnt, "acc")


def zero_counts() -> dict:
    return {"acc": 0, "out": 0, "prob": 0}
