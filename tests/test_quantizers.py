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
    assert lv[0] == 0.0 and np.all(np.diff(lv) > 0)
    # every level encodes to its own code
    np.testing.assert_array_equal(q.encode(lv), np.arange(q.n + 1))
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
