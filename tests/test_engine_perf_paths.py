"""The engine's fast arithmetic routes against its exact int64 route (and the golden model).

Every GEMM route (oneDNN int8, float32 in one pass or K-chunked, float64, int64), the attention
fast path (float32 scores, decode product in one float32 GEMM by the softmax-normalization bound
or split into digits, float64) and the fused plan must give results and saturation counts
identical to ``gemm="int"``; the route choices must follow the proven bounds; results must not
depend on the thread count; a fresh process with a warm Numba cache must compile nothing.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numba
import numpy as np
import pytest

from intsim.program.format import save
from intsim.studies.random_program import exp_table, make_program, random_images, softmax_quant_tables

from intsim.engine import Engine, compile_stats, run_op
from intsim.engine import build_op
from intsim.kernels import gemm as G
from intsim.kernels import numeric as K
from intsim.ops import attention as attn_op

REPO = Path(__file__).resolve().parents[1]


def _same(a, b):
    np.testing.assert_array_equal(a.logits, b.logits)
    assert a.counts == b.counts


def _gemm_kinds(eng: Engine) -> set[str]:
    kinds = set()
    for g in eng._fused.gemms:
        kinds.add(g.last_kind)
    return kinds


def _attn_routes(eng: Engine) -> list[attn_op.AttnRoute]:
    return [r for o in eng.ops if o.type == "attention" for r in o._routes.values()]


# ---- programs of several shapes and precisions ----------------------------------------------

CASES = [
    # (seed, make_program kwargs): small T, K large enough that 8-bit float32 needs K-chunks
    (0, dict(embed_dim=24, heads=2, depth=2, img=32, patch=16)),
    (1, dict(embed_dim=24, heads=2, depth=2, img=32, patch=16, wbits=8, abits=8)),
    (2, dict(embed_dim=144, heads=3, depth=1, img=16, patch=8, wbits=8, abits=8)),
    (3, dict(embed_dim=16, heads=4, depth=2, img=12, patch=4, wbits=3, abits=5, settings={"acc_bits": 14})),
    (4, dict(embed_dim=12, heads=2, depth=2, img=8, patch=4, wbits=6, abits=6,
             settings={"exp_frac_bits": 5, "prob_bits": 12, "decode_bits": 10})),
]


@pytest.mark.parametrize("seed,kw", CASES)
def test_every_route_equals_int64(seed, kw):
    prog = make_program(seed, **kw)
    images = random_images(seed + 50, 3, prog.model["img_size"])
    ref = Engine(prog, gemm="int").run(images, batch_size=2)
    for mode in ("auto", "float", "f32", "f64"):
        _same(Engine(prog, gemm=mode).run(images, batch_size=2), ref)
    # forced chunking of every float32 GEMM (chunks of at most 7 columns of K)
    eng = Engine(prog, gemm="f32", f32_max_k=7)
    _same(eng.run(images, batch_size=3), ref)
    assert all(k.startswith("f32x") for k in _gemm_kinds(eng))
    # the op-by-op path (int64 values, same kernels) and keep=True
    _same(Engine(prog, fuse=False).run(images, batch_size=2), ref)
    out, counts, vals = Engine(prog).forward(images[:2], keep=True)
    np.testing.assert_array_equal(out[:, 0, :], ref.logits[:2])
    assert set(vals) == set(prog.values)


def test_int8_route_when_provable_and_refused_when_not():
    prog = make_program(5, embed_dim=24, heads=2, depth=1, img=32, patch=16)       # 4 bits: int8 provable
    images = random_images(5, 3, 32)
    eng = Engine(prog, gemm="i8")
    _same(eng.run(images), Engine(prog, gemm="int").run(images))
    assert _gemm_kinds(eng) == {"i8"}
    assert "i8" in {line.rsplit("[", 1)[1].rstrip("]") for line in Engine(prog).routes() if "[" in line}
    # codes read only by int8 GEMMs are stored as uint8; by float32 GEMMs as float32
    assert "layernorm -> uint8" in " ".join(eng._fused.describe)
    assert "layernorm -> float32" in " ".join(Engine(prog, gemm="f32")._fused.describe)
    prog8 = make_program(5, embed_dim=24, heads=2, depth=1, img=32, patch=16, wbits=8, abits=8)
    with pytest.raises(ValueError, match="int8"):
        Engine(prog8, gemm="i8")                        # |w| up to 255: not an int8 operand
    assert "i8" not in str(Engine(prog8).routes())


def test_int8_library_failing_its_self_check(monkeypatch):
    """A library whose int8 product is off by one (another CPU or version): ``auto`` falls back to
    the exact float routes and stays bit-exact; a forced ``i8`` refuses."""
    prog = make_program(5, embed_dim=24, heads=2, depth=1, img=32, patch=16)
    images = random_images(5, 3, 32)
    ref = Engine(prog, gemm="int").run(images)
    good = G.Gemm._run_i8
    monkeypatch.setattr(G.Gemm, "_run_i8", staticmethod(lambda prep, x: good(prep, x) + 1))
    with pytest.warns(RuntimeWarning, match="self-check"):
        eng = Engine(prog)
    _same(eng.run(images), ref)
    kinds = _gemm_kinds(eng)
    assert "i8" not in kinds and kinds <= {"f32", "f64"} | {f"f32x{c}" for c in range(2, 5)}, kinds
    with pytest.raises(RuntimeError, match="self-check"):
        Engine(prog, gemm="i8")


def test_natural_k_chunking_at_8_bits():
    """At 8 bits, K = 768 patch vectors and K = 576 fc2 inputs exceed one exact float32 pass."""
    prog = make_program(6, embed_dim=144, heads=2, depth=1, img=32, patch=16, wbits=8, abits=8)
    images = random_images(6, 2, 32)
    eng = Engine(prog)
    _same(eng.run(images), Engine(prog, gemm="int").run(images))
    kinds = _gemm_kinds(eng)
    assert any(k.startswith("f32x") for k in kinds), kinds
    pe = eng.ops[0].gemm
    xmax = 255
    for k0, k1 in pe.chunks:                          # each chunk's proven bound
        assert xmax * pe._chunk_l1(k0, k1) <= 2 ** 24
    assert xmax * pe.l1 > 2 ** 24                      # and one pass would not be exact


def test_linear_routes_on_edge_values():
    """Single linear op: the float32 route at its exact limit, negative inputs, huge inputs."""
    rng = np.random.default_rng(7)
    N, Kd = 5, 300
    w = rng.integers(-255, 256, size=(N, Kd)).astype(np.int16)
    w[0] = 255
    w[1] = -255
    from test_engine_ops import check, mults, one_op
    prog, op = one_op("linear", {"lo": -(2 ** 15), "hi": 2 ** 15 - 1},
                      {"w": w, "bias": rng.integers(-1000, 1000, N), "mult": mults(rng, N).astype(np.int32),
                       "shift": np.full(N, 40, np.int32), "zp": np.zeros(N, np.int32)})
    for x in (np.full((1, 2, Kd), 255), rng.integers(-255, 256, size=(2, 3, Kd)), rng.integers(0, 256, (1, 4, Kd))):
        for mode in ("auto", "f32", "f64", "int"):
            check(prog, op, x, gemm=mode)
    o = build_op(prog, op, "f32")
    o(np.full((1, 1, Kd), 255))
    assert o.gemm.last_kind.startswith("f32x")        # 255 * 255 * 300 > 2^24: chunked
    with pytest.raises(ValueError):
        run_op(prog, op, np.full((1, 1, Kd), 2 ** 20), gemm="f32")   # a single product above 2^24


def test_attention_digit_split_and_float64(monkeypatch):
    """Without the normalization bound the 8-bit decode product needs digits; f64 forced also agrees."""
    prog = make_program(8, embed_dim=32, heads=2, depth=1, img=32, patch=8, wbits=8, abits=8)
    images = random_images(8, 2, 32)
    ref = Engine(prog, gemm="int").run(images)
    eng = Engine(prog)
    _same(eng.run(images), ref)
    assert all(r.route == "fast" and r.parts.shape[1] == 1 for r in _attn_routes(eng))
    monkeypatch.setattr(attn_op, "USE_ROW_BOUND", False)
    eng = Engine(prog)
    _same(eng.run(images), ref)
    routes = _attn_routes(eng)
    assert routes and all(r.route == "fast" and r.parts.shape[1] >= 2 and r.pv_dtype == np.float32 for r in routes)
    eng = Engine(prog, gemm="f64")
    _same(eng.run(images), ref)
    assert all(r.pv_dtype == np.float64 and r.score_dtype == np.float64 for r in _attn_routes(eng))


def test_attention_op_fast_path_matches_int_kernel():
    """The standalone attention op (ranges from the data) on random codes, all precisions."""
    from test_engine_ops import _attn_program
    rng = np.random.default_rng(9)
    for trial in range(12):
        H, d, ab = int(rng.integers(1, 4)), int(rng.integers(1, 9)), int(rng.integers(2, 9))
        prog, op = _attn_program(rng, H, d, ab, acc_bits=int(rng.choice([10, 32])), shuffle_thresholds=trial % 3 == 0)
        T = int(rng.integers(1, 40))
        q, k, v = (rng.integers(0, 2 ** ab, size=(2, T, H * d)) for _ in range(3))
        y1, c1 = run_op(prog, op, q, k, v, gemm="int")
        for mode in ("auto", "f32", "f64"):
            y2, c2 = run_op(prog, op, q, k, v, gemm=mode)
            np.testing.assert_array_equal(y1, y2)
            assert c1 == c2


def test_decode_row_bound_holds():
    """The proven bound of sum_j |decode[code]| is above what adversarial rows reach."""
    from reference.golden import encode, int_softmax
    rng = np.random.default_rng(10)
    for trial in range(30):
        ab = int(rng.integers(2, 9))
        E, X, P, G, L = 8, 16, int(rng.choice([12, 16])), 30, 16
        sq = {"type": "uniform", "scale": float(rng.uniform(0.3, 1.5) / (2 ** ab - 1))} if trial % 2 else \
            {"type": "log2", "delta": float(rng.uniform(0.5, 1.0))}
        thr, dec, _ = softmax_quant_tables(sq, ab, P, L)
        T = int(rng.integers(1, 300))
        tab = exp_table(E, X)
        bound = attn_op.decode_row_bound(dec, thr, T, P, G, int(tab.max()))
        score_mult, score_shift = int(rng.integers(2 ** 30, 2 ** 31)), int(rng.integers(20, 40))
        rows = [np.zeros((1, T), np.int64),                                   # all equal
                rng.integers(-2 ** 12, 2 ** 12, (4, T)),
                np.where(np.arange(T) < max(1, T // 3), 0, -10 ** 6)[None, :],  # a plateau of equal maxima
                -np.arange(T)[None, :] * int(rng.integers(1, 50))]
        for A in rows:
            p, _ = int_softmax(A, tab, score_mult, score_shift, E, P, G)
            s = np.abs(dec[encode(p, thr)]).sum(axis=-1).max()
            assert s <= bound, (s, bound)


def test_softmax_tables_are_exact():
    rng = np.random.default_rng(11)
    for _ in range(20):
        E = int(rng.integers(2, 10))
        tab = exp_table(E, int(rng.integers(8, 20)))
        sm, ss = int(rng.integers(0, 2 ** 31)), int(rng.integers(0, 45))
        thr = np.sort(rng.integers(0, 2 ** 12, size=int(rng.integers(1, 20))))
        etab, dz, ctab = attn_op.softmax_tables(tab, sm, ss, E, thr, 12, 2 ** 32 - 1)
        diffs = np.concatenate([np.arange(min(len(etab) + 5, 3000)), rng.integers(0, 2 ** 32, 200),
                                [dz, dz + 1, max(dz - 1, 0)]])
        for diff in diffs.tolist():
            u = K.rq_int(int(diff), sm, ss)
            ip = u >> E
            want = 0 if ip > 62 else int(K.rshift_array(tab[u & ((1 << E) - 1)], ip))
            if diff < len(etab) - 1:
                assert int(etab[diff]) == want
            if diff >= dz:
                assert want == 0
        assert etab[-1] == 0
        p = np.arange(2 ** 12)
        np.testing.assert_array_equal(ctab, (p[:, None] >= thr[None, :]).sum(1))


def test_route_bounds_are_documented_and_asserted():
    assert G.F32_EXACT == 2 ** 24 and G.F64_EXACT == 2 ** 53 and G.I16_MAX == 2 ** 15 - 1
    for fn in (G.Gemm, attn_op.decode_row_bound, attn_op.softmax_tables, K.rq_offsets, attn_op.attn_route):
        assert fn.__doc__
    # forced routes that are not provably exact are refused at construction
    prog = make_program(12, embed_dim=12, heads=2, depth=1, img=8, patch=4, wbits=8, abits=8)
    with pytest.raises(ValueError, match="int8"):
        Engine(prog, gemm="i8")
    eng = Engine(prog, gemm="f32")          # 8-bit operands: float32 with K-chunks where needed
    for g in eng._fused.gemms:
        assert g.route == "f32"
        xmax = max(abs(v) for v in g.xrange)
        assert all(xmax * g._chunk_l1(a, b) <= 2 ** 24 for a, b in g.chunks)


# ---- fused plan, pool, threads ---------------------------------------------------------------

def test_results_do_not_alias_pooled_buffers():
    prog = make_program(13, embed_dim=24, heads=2, depth=2, img=32, patch=16)
    eng = Engine(prog)
    a, b = random_images(1, 4, 32), random_images(2, 4, 32)
    ra = eng.run(a)
    keep = ra.logits.copy()
    eng.run(b)
    np.testing.assert_array_equal(ra.logits, keep)
    _same(eng.run(a), ra)
    _same(eng.run(a, batch_size=3), ra)           # other batch shapes, pool cleared in between
    assert eng.run(a[:0]).logits.shape == (0, 5)


def _with_threads(n, f):
    import torch
    old_n, old_t = numba.get_num_threads(), torch.get_num_threads()
    numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    torch.set_num_threads(n)
    try:
        return f()
    finally:
        numba.set_num_threads(old_n)
        torch.set_num_threads(old_t)


@pytest.mark.parametrize("seed,kw", [CASES[0], CASES[1], CASES[3]])
def test_thread_count_independence(seed, kw):
    prog = make_program(seed, **kw)
    images = random_images(seed, 5, prog.model["img_size"])
    runs = [_with_threads(n, lambda: Engine(prog).run(images, batch_size=5)) for n in (1, 2, 1)]
    for r in runs[1:]:
        _same(r, runs[0])


def test_fast_engine_matches_golden_at_8_bits_with_chunks():
    from reference import golden
    prog = make_program(14, embed_dim=144, heads=2, depth=1, img=32, patch=16, wbits=8, abits=8)
    images = random_images(14, 2, 32)
    e = Engine(prog).run(images)
    g = golden.run(prog, images)
    np.testing.assert_array_equal(e.logits, np.asarray(g.logits))
    assert e.counts == {k: {kk: int(v) for kk, v in c.items()} for k, c in g.counts.items()}


def test_isqrt_from_float_start():
    rng = np.random.default_rng(15)
    vals = [0, 1, 2, 3, 2 ** 62, 2 ** 63 - 1, (2 ** 31 - 1) ** 2, (2 ** 31) ** 2 - 1, 2 ** 52 + 1]
    vals += rng.integers(0, 2 ** 63 - 1, 2000, dtype=np.int64).tolist()
    vals += [int(r) ** 2 + dd for r in rng.integers(1, 2 ** 31, 500) for dd in (-1, 0, 1)]
    for v in vals:
        assert K.isqrt(v) == math.isqrt(v)


# ---- compile cache -------------------------------------------------------------------------------

_FRESH = """
import json, sys
import numpy as np
from intsim.program.format import load
from intsim.engine import Engine, compile_stats
prog = load(sys.argv[1])
imgs = np.random.default_rng(0).integers(0, 256, (3, 3, 32, 32), dtype=np.uint8)
for mode in ("auto", "int"):
    Engine(prog, gemm=mode).run(imgs, batch_size=2)
Engine(prog, fuse=False).run(imgs[:1])
print(json.dumps(compile_stats()))
"""


@pytest.mark.slow
def test_fresh_process_compiles_nothing(tmp_path):
    prog = make_program(16, embed_dim=24, heads=2, depth=1, img=32, patch=16)
    path = tmp_path / "p.safetensors"
    save(prog, path)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))

    def fresh():
        r = subprocess.run([sys.executable, "-c", _FRESH, str(path)], capture_output=True, text=True, env=env,
                           cwd=str(REPO), timeout=1200)
        assert r.returncode == 0, r.stderr[-2000:]
        return json.loads(r.stdout.strip().splitlines()[-1])

    fresh()                                 # fills the cache if needed
    st = fresh()
    assert st["misses"] == 0, st            # nothing compiled
    assert st["hits"] > 0


@pytest.mark.slow
def test_second_intsim_run_compiles_nothing(tmp_path):
    """The issue's must-show, through the command itself: a second ``intsim run`` in a fresh process
    (bundled model and images) reports no Numba compilation, and reports its start-up time."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))

    def run(i):
        out = tmp_path / f"r{i}.json"
        r = subprocess.run([sys.executable, "-m", "intsim.cli", "--no-progress", "run", "--images", "8",
                            "--golden-images", "2", "--json", str(out)],
                           capture_output=True, text=True, env=env, cwd=str(REPO), timeout=1200)
        assert r.returncode == 0, r.stderr[-2000:]
        return json.loads(out.read_text())["timing"], r.stdout

    run(1)                                  # fills the cache if needed
    timing, stdout = run(2)
    assert timing["numba_compiled"] == 0 and timing["numba_compiled_kernels"] == [], timing
    assert timing["numba_cache_hits"] > 0
    assert 0 < timing["calibration_s"] < timing["setup_s"]
    assert "Numba compilations in this run: 0 (" in stdout


def test_compile_stats_shape():
    st = compile_stats()
    assert set(st) == {"hits", "misses", "compiled", "loaded"}
