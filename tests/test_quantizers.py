"""Post-softmax quantizers (spec section 5) and their integer tables (section 4.4)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from intsim.program import quantizers as Q

P = 16
GRID = np.arange(1 << P, dtype=np.int64)
X = GRID.astype(np.float64) / float(1 << P)

# A few parameter sets per family, chosen to cover the interesting shapes.
PARAMS = {
    "uniform": [dict(scale=None), dict(scale=0.01), dict(scale=0.5 / 7)],
    "log2": [dict(delta=1.0), dict(delta=0.5), dict(delta=0.3)],
    "log2sqrt": [dict(delta=1.0), dict(delta=0.7071), dict(delta=0.25)],
    "tanq": [dict(t0=-1.4, t1=1.3), dict(t0=-1.5, t1=1.5), dict(t0=0.0, t1=1.4), dict(t0=-1.55, t1=0.3),
             dict(t0=-0.05, t1=0.05), dict(t0=-1.5685, t1=1.5685)],
    "adalog": [dict(delta=1.0, q=10, r=37), dict(delta=1.0, q=37, r=37), dict(delta=1.0, q=109, r=37),
               dict(delta=0.5, q=23, r=37)],
    "sulq": [dict(eta=0.001, top=1.0), dict(eta=0.01, top=1.0), dict(eta=1.0, top=1.0), dict(eta=0.05, top=0.4)],
    "twin": [dict(m=0), dict(m=1), dict(m=3), dict(m=7), dict(m=14)],
}
CASES = [(t, b, p) for t, ps in PARAMS.items() for b in range(2, 9) for p in ps]


def _make(typ: str, bits: int, params: dict) -> Q.SoftmaxQuantizer:
    params = dict(params)
    if typ == "uniform" and params["scale"] is None:
        params["scale"] = 1.0 / ((1 << bits) - 1)
    return Q.make(typ, bits, **params)


def _check_exhaustive(q: Q.SoftmaxQuantizer, prob_bits: int = P) -> None:
    grid = np.arange(1 << prob_bits, dtype=np.int64)
    codes = q.encode(grid / float(1 << prob_bits))
    assert codes.dtype == np.int64
    assert codes.min() >= 0 and codes.max() <= q.n
    assert np.all(np.diff(codes) >= 0), "float encoder not monotone on the fixed-point grid"
    thr = Q.thresholds(q, prob_bits)
    assert thr.dtype == np.int64 and thr.shape == (q.n,)
    assert np.all(np.diff(thr) >= 0)
    # the integer encoder (count of thresholds <= p) equals the float encoder everywhere
    count = (thr[None, :] <= grid[:, None]).sum(axis=1) if q.n <= 15 else Q.encode_int(thr, grid)
    np.testing.assert_array_equal(count, codes)
    np.testing.assert_array_equal(Q.encode_int(thr, grid), codes)
    # definition: thresholds[k-1] = min p with enc >= k, 2^P if none
    for k in range(1, q.n + 1):
        hits = np.nonzero(codes >= k)[0]
        assert thr[k - 1] == (hits[0] if hits.size else 1 << prob_bits)
    # codes at or above used() are never produced
    assert codes.max() < q.used() and np.all(thr[q.used() - 1:] == 1 << prob_bits)


@pytest.mark.parametrize("typ,bits,params", CASES, ids=[f"{t}-{b}-{i}" for t, b, i in
                                                          [(t, b, i) for t, ps in PARAMS.items() for b in range(2, 9)
                                                           for i in range(len(ps))]])
def test_integer_encoder_equals_float_encoder_exhaustively(typ, bits, params):
    _check_exhaustive(_make(typ, bits, params))


@pytest.mark.parametrize("typ,bits,params", CASES[::3])
def test_torch_encoder_equals_numpy(typ, bits, params):
    q = _make(typ, bits, params)
    rng = np.random.default_rng(bits)
    x = np.concatenate([X, rng.random(10000), rng.random(1000) ** 8, q.levels(), [0.0, 1.0, 1e-300, 2 ** -P]])
    np.testing.assert_array_equal(q.encode_torch(torch.from_numpy(x)).numpy(), q.encode(x))
    # float32 input is evaluated in float64 as well
    x32 = x.astype(np.float32)
    np.testing.assert_array_equal(q.encode_torch(torch.from_numpy(x32)).numpy(), q.encode(x32.astype(np.float64)))


@pytest.mark.parametrize("typ,bits,params", CASES)
def test_levels_and_decode_table(typ, bits, params):
    q = _make(typ, bits, params)
    lv = q.levels()
    assert lv.dtype == np.float64 and lv.shape == (q.n + 1,)
    u = q.used()
    assert 2 <= u <= q.n + 1
    assert lv[0] == 0.0 and np.all(np.diff(lv[:u]) > 0)
    # unused codes (twin) repeat the top level
    assert np.all(lv[u:] == lv[u - 1])
    # every used level encodes to its own code
    np.testing.assert_array_equal(q.encode(lv[:u]), np.arange(u))
    for L in (8, 16, 24):
        dec = Q.decode_table(q, L)
        assert dec.dtype == np.int64 and dec.shape == (q.n + 1,)
        assert np.all(np.abs(dec - lv * 2.0 ** L) <= 0.5)
        np.testing.assert_array_equal(dec, np.floor(lv * 2.0 ** L + 0.5).astype(np.int64))


def test_spec_table_values():
    u = Q.make("uniform", 4, scale=0.1)
    np.testing.assert_array_equal(u.encode([0.0, 0.04, 0.06, 0.16, 1.0, 2.0]), [0, 0, 1, 2, 10, 15])
    lg = Q.make("log2", 3, delta=1.0)       # N = 7, levels 2^-6 .. 1
    np.testing.assert_allclose(lg.levels(), [0, 2 ** -6, 2 ** -5, 2 ** -4, 2 ** -3, 2 ** -2, 2 ** -1, 1])
    np.testing.assert_array_equal(lg.encode([0.0, 2 ** -6, 2 ** -7, 2 ** -8, 1.0, 1.3, 2.0, 0.5]),
                                  [0, 1, 0, 0, 7, 7, 7, 6])
    ls = Q.make("log2sqrt", 3, delta=1.0)
    np.testing.assert_allclose(ls.levels()[1:], 2.0 ** (-(7 - np.arange(1, 8)) / 2))
    t = Q.make("tanq", 4, t0=-1.2, t1=1.2)  # symmetric angles: symmetric levels
    lv = t.levels()
    np.testing.assert_allclose(lv + lv[::-1], 1.0, atol=1e-12)
    assert lv[-1] == 1.0
    # t0 = 0: dense near 1 only
    t = Q.make("tanq", 4, t0=0.0, t1=1.5)
    assert np.diff(t.levels())[-1] < np.diff(t.levels())[1]


def test_rounding_is_half_up_and_exact():
    v = np.array([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 0.5 - 2 ** -54, -0.5 - 2 ** -53, 1e17 + 0.0])
    np.testing.assert_array_equal(Q.rnd(v), [1, 2, 3, 0, -1, -2, 0, -1, 1e17])
    np.testing.assert_array_equal(Q.rnd_torch(torch.from_numpy(v)).numpy(), Q.rnd(v))


@pytest.mark.parametrize("typ,bits,params", CASES[::5])
def test_dict_roundtrip(typ, bits, params):
    q = _make(typ, bits, params)
    d = json.loads(json.dumps(q.to_dict()))
    assert d["type"] == typ and d["bits"] == bits
    q2 = Q.from_dict(d)
    assert q2 == q
    np.testing.assert_array_equal(q2.levels(), q.levels())


def test_invalid_parameters():
    with pytest.raises(ValueError):
        Q.make("tanq", 4, t0=1.0, t1=0.5)
    with pytest.raises(ValueError):
        Q.make("tanq", 4, t0=-2.0, t1=0.5)
    with pytest.raises(ValueError):
        Q.make("log2", 4, delta=0.0)
    with pytest.raises(ValueError):
        Q.make("uniform", 4, scale=-1.0)
    with pytest.raises(ValueError):
        Q.make("cubic", 4)
    with pytest.raises(ValueError):
        Q.from_dict({"type": "tanq", "bits": 4, "t0": 0.0, "t1": 1.0, "t2": 3.0})


@settings(max_examples=40, deadline=None)
@given(bits=st.integers(2, 8),
       a=st.floats(-1.5707, 1.5707), b=st.floats(-1.5707, 1.5707))
def test_tanq_random_angles_exhaustive(bits, a, b):
    if abs(a - b) < 1e-6:
        return
    t0, t1 = min(a, b), max(a, b)
    _check_exhaustive(Q.make("tanq", bits, t0=t0, t1=t1))


@settings(max_examples=40, deadline=None)
@given(bits=st.integers(2, 8), typ=st.sampled_from(["log2", "log2sqrt", "uniform"]),
       e=st.floats(-12.0, 1.0), prob_bits=st.sampled_from([8, 12, 16]))
def test_log_and_uniform_random_parameters_exhaustive(bits, typ, e, prob_bits):
    v = 2.0 ** e
    q = Q.make(typ, bits, **({"scale": v} if typ == "uniform" else {"delta": v}))
    _check_exhaustive(q, prob_bits)


def test_thresholds_none_reached_gives_2_pow_p():
    q = Q.make("uniform", 4, scale=1.0)        # x/s < 0.5 on the whole grid except near 1
    thr = Q.thresholds(q, 8)
    assert thr[0] == 128 and np.all(thr[1:] == 256)
    assert math.isclose(q.levels()[1], 1.0)


# ---- adalog, sulq, twin -----------------------------------------------------------------------

def test_new_types_registered():
    assert {"adalog", "sulq", "twin"} <= set(Q.TYPES)
    from intsim.options import SOFTMAX_QUANTS
    assert set(Q.TYPES) == set(SOFTMAX_QUANTS)


def test_adalog_special_bases_equal_log2_and_values():
    # q = r is base 2: the same codes and levels as log2
    a, lg = Q.make("adalog", 4, delta=0.7, q=37, r=37), Q.make("log2", 4, delta=0.7)
    np.testing.assert_array_equal(a.encode(X), lg.encode(X))
    np.testing.assert_allclose(a.levels(), lg.levels(), rtol=1e-15)
    # 2q = r is base sqrt 2: log2sqrt
    a2, ls = Q.make("adalog", 3, delta=1.0, q=1, r=2), Q.make("log2sqrt", 3, delta=1.0)
    np.testing.assert_array_equal(a2.encode(X), ls.encode(X))
    # base 2^(q/r): consecutive levels differ by that factor
    a3 = Q.make("adalog", 3, delta=1.0, q=20, r=37)
    np.testing.assert_allclose(a3.levels()[2:] / a3.levels()[1:-1], 2.0 ** (20 / 37), rtol=1e-12)
    assert a3.levels()[-1] == 1.0
    # the smallest nonzero level must be a normal float64
    with pytest.raises(ValueError):
        Q.make("adalog", 6, delta=1.0, q=70, r=4)
    for bad in (dict(q=0.0), dict(q=2.5), dict(r=0.0), dict(q=float("nan"))):
        with pytest.raises(ValueError):
            Q.make("adalog", 4, **{"delta": 1.0, "q": 20.0, "r": 37.0, **bad})


def test_sulq_values():
    s = Q.make("sulq", 3, eta=0.01, top=1.0)
    lv = s.levels()
    assert lv[0] == 0.0 and math.isclose(lv[-1], 1.0, rel_tol=1e-12)
    # uniform in the log2 domain of x + eta
    np.testing.assert_allclose(np.diff(np.log2(lv + 0.01)), math.log2(1.01 / 0.01) / 7, rtol=1e-12)
    # large eta: nearly uniform levels
    big = Q.make("sulq", 3, eta=1e6, top=1.0).levels()
    np.testing.assert_allclose(big, np.arange(8) / 7, atol=1e-6)
    np.testing.assert_array_equal(s.encode([0.0, 1.0, 2.0, -1.0]), [0, 7, 7, 0])
    for bad in (dict(eta=0.0), dict(eta=-1.0), dict(top=0.0)):
        with pytest.raises(ValueError):
            Q.make("sulq", 3, **{"eta": 0.01, "top": 1.0, **bad})


def _twin_published(x: np.ndarray, bits: int, m: int) -> np.ndarray:
    """PTQ4ViT's twin-uniform value as the paper states it (flag bit + (bits-1)-bit value)."""
    h = 1 << (bits - 1)
    d2 = 1.0 / h
    d1 = d2 / 2.0 ** m
    r1 = np.clip(np.floor(x / d1 + 0.5), 0, h - 1) * d1
    r2 = np.clip(np.floor(x / d2 + 0.5), 0, h - 1) * d2
    return np.where(x < h * d1, r1, r2)


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("m", [0, 1, 2, 3, 5, 8, 12])
def test_twin_is_the_published_quantizer_made_monotone(bits, m):
    q = Q.make("twin", bits, m=m)
    got = q.levels()[q.encode(X)]
    pub = _twin_published(X, bits, m)
    # equal to the published value where that is monotone; above R1 never below R1's top (the
    # running maximum of the published value over the reals)
    h = 1 << (bits - 1)
    r1_top = (h - 1) / h / 2.0 ** m
    np.testing.assert_array_equal(got, np.maximum(pub, np.where(X >= h / h / 2.0 ** m, r1_top, 0.0)))
    assert np.all(np.diff(got) >= 0)
    if m < bits:
        np.testing.assert_array_equal(got, pub)
    # the distinct values: R1's H steps and R2's steps above R1's top
    assert q.used() == h + sum(j / h > r1_top for j in range(h))
    assert q.used() <= q.n
    np.testing.assert_array_equal(np.unique(got), q.levels()[:q.used()][np.isin(q.levels()[:q.used()], got)])


def test_twin_examples():
    t = Q.make("twin", 3, m=1)          # H = 4, d2 = 1/4, d1 = 1/8: R1 = [0, 1/2)
    np.testing.assert_allclose(t.levels(), [0, 1 / 8, 2 / 8, 3 / 8, 1 / 2, 3 / 4, 3 / 4, 3 / 4])
    assert t.used() == 6
    np.testing.assert_array_equal(t.encode([0.0, 0.06, 0.07, 0.49, 0.5, 0.62, 0.63, 1.0]), [0, 0, 1, 3, 4, 4, 5, 5])
    t = Q.make("twin", 3, m=4)          # R1 = [0, 1/16) in steps of 1/64; [1/16, 1/8) -> 3/64
    np.testing.assert_allclose(t.levels()[:t.used()], [0, 1 / 64, 2 / 64, 3 / 64, 1 / 4, 1 / 2, 3 / 4])
    np.testing.assert_array_equal(t.encode([0.05, 0.07, 0.12, 0.13]), [3, 3, 3, 4])
    for bad in (dict(m=-1.0), dict(m=1.5), dict(m=41.0)):
        with pytest.raises(ValueError):
            Q.make("twin", 4, **bad)
    with pytest.raises(ValueError):
        Q.make("twin", 1, m=1)


_NEW = st.one_of(
    # bases 2^(q/r) up to 2^3 (AdaLog searches up to 2^2.95)
    st.builds(lambda b, q, r, e: ("adalog", b, dict(delta=2.0 ** e, q=1 + q % (3 * r), r=r)),
              st.integers(2, 8), st.integers(0, 191), st.integers(4, 64), st.floats(-6.0, 0.5)),
    st.builds(lambda b, e, t: ("sulq", b, dict(eta=10.0 ** e, top=t)),
              st.integers(2, 8), st.floats(-5.0, 3.0), st.floats(0.05, 1.0)),
    st.builds(lambda b, m: ("twin", b, dict(m=m)), st.integers(2, 8), st.integers(0, 20)),
)


@settings(max_examples=40, deadline=None)
@given(case=_NEW, prob_bits=st.sampled_from([8, 12, 16]))
def test_new_types_random_parameters_exhaustive(case, prob_bits):
    typ, bits, params = case
    _check_exhaustive(Q.make(typ, bits, **params), prob_bits)


@settings(max_examples=40, deadline=None)
@given(case=_NEW, seed=st.integers(0, 2 ** 32 - 1))
def test_new_types_torch_equals_numpy_and_levels_increase(case, seed):
    typ, bits, params = case
    q = Q.make(typ, bits, **params)
    rng = np.random.default_rng(seed)
    lv = q.levels()
    x = np.concatenate([rng.random(4096), rng.random(1024) ** 8, lv, np.nextafter(lv, 2.0), np.nextafter(lv, -1.0),
                        [0.0, 1.0, 1e-300, 2 ** -P, 2.0]])
    np.testing.assert_array_equal(q.encode_torch(torch.from_numpy(x)).numpy(), q.encode(x))
    u = q.used()
    assert lv[0] == 0.0 and np.all(np.diff(lv[:u]) > 0) and np.all(lv[u:] == lv[u - 1])
