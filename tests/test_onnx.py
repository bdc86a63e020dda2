"""ONNX export (issue 22): onnxruntime executes the exported graph bit for bit like golden and the engine.

Tiny random programs (every ViT op type, uniform / log2 / log2sqrt / tanq post-softmax quantizers,
narrow accumulators that saturate, odd settings), a tiny calibrated Swin program (patchify,
patch_merge, window_attention with shifted-window masks, token_pool), the rounding building blocks
on ties and negatives, and the ``intsim export`` command's bad-input handling.
"""
import math

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from intsim.cli import main  # noqa: E402
from intsim.engine import Engine  # noqa: E402
from intsim.onnx_export import OnnxGraph, build_onnx, export_onnx, run_onnx, session  # noqa: E402
from intsim.program.format import save  # noqa: E402
from intsim.program.program import Program, ProgramError  # noqa: E402
from intsim.program import quantizers as Q  # noqa: E402
from intsim.studies.random_program import make_program, random_images  # noqa: E402
from reference import golden  # noqa: E402


def onnx_logits(prog, images, batch_size=4):
    return run_onnx(session(build_onnx(prog)), images, batch_size)


def assert_three_agree(prog, images):
    g = golden.run(prog, images)
    e = Engine(prog).run(images, batch_size=3)
    o = onnx_logits(prog, images)
    np.testing.assert_array_equal(e.logits, g.logits)
    np.testing.assert_array_equal(o, g.logits)
    assert o.dtype == np.int64
    return g


# ---- the rounding building blocks, on ties and negatives ---------------------------------------------

def _run_graph(build, inputs: dict[str, np.ndarray]):
    """Build a one-output graph from int64 inputs with ``build(g, names) -> output`` and run it."""
    g = OnnxGraph()
    T = onnx.TensorProto
    names = list(inputs)
    out = build(g, names)
    g.nodes.append(g.helper.make_node("Identity", [out], ["y"]))
    ins = [g.helper.make_tensor_value_info(n, T.INT64, list(v.shape)) for n, v in inputs.items()]
    m = g.model(ins, [g.helper.make_tensor_value_info("y", T.INT64, list(inputs[names[0]].shape))], "t")
    onnx.checker.check_model(m)
    return session(m).run(["y"], inputs)[0]


def _tie_values(n):
    """Values at, around and far from the rounding points of a shift by n, both signs."""
    base = np.arange(-5, 6, dtype=np.int64)
    d = 1 << n
    v = [k * d + off for k in (-3, -1, 0, 1, 2, 1000) for off in (0, d // 2 - 1, d // 2, d // 2 + 1, d - 1) if d > 1]
    v += base.tolist() + [-(2**62), 2**62 - 1, -(2**63), 2**63 - 1, -(2**40) - (d // 2), 2**40 + d // 2]
    return np.array([x for x in v if -(2**63) <= x <= 2**63 - 1], dtype=np.int64)


@pytest.mark.parametrize("n", [0, 1, 2, 7, 31, 62])
def test_rshift_generic_form_ties_and_negatives(n):
    a = _tie_values(n)
    y = _run_graph(lambda g, nm: g.rshift(nm[0], n), {"a": a})
    np.testing.assert_array_equal(y, golden.rshift(a, n))
    if n == 1:
        assert golden.rshift(np.int64(-3), 1) == -1 and golden.rshift(np.int64(-5), 1) == -2


@pytest.mark.parametrize("n", [1, 3, 20])
def test_rshift_offset_form_ties_and_negatives(n):
    amax = 2**45
    a = _tie_values(n)
    a = a[np.abs(a.astype(np.float64)) <= amax]
    y = _run_graph(lambda g, nm: g.rshift(nm[0], n, amax=amax), {"a": a})
    np.testing.assert_array_equal(y, golden.rshift(a, n))
    pos = a[a >= 0]
    y = _run_graph(lambda g, nm: g.rshift(nm[0], n, amax=amax, nonneg=True), {"a": pos})
    np.testing.assert_array_equal(y, golden.rshift(pos, n))
    # per-channel shifts and multipliers (rq), last axis
    a = a[np.abs(a.astype(np.float64)) <= 2**40]
    x = np.stack([a, -a, a + 1], axis=-1)
    m, s = np.array([3, 1, 2**20], np.int64), np.array([n, 0, n + 20], np.int64)
    y = _run_graph(lambda g, nm: g.rq(nm[0], m, s, amax=int(np.abs(x).max()) + 1), {"x": x})
    np.testing.assert_array_equal(y, golden.rq(x, m, s))


def test_offset_form_refused_when_it_could_overflow():
    g = OnnxGraph()
    g.rshift("a", 3, amax=2**63 - 1)
    assert any(n.op_type == "Mod" for n in g.nodes)           # fell back to the exact Mod form


def test_rdiv_and_isqrt_exact():
    b = np.array([1, 2, 3, 4, 5, 7, 8, 2**20 + 1, 2**40 - 1, 2**59], np.int64)
    for a in (0, 1, 5, 2**30, 2**48, 2**60):
        y = _run_graph(lambda g, nm: g.rdiv_pos(a, nm[0]), {"b": b})
        np.testing.assert_array_equal(y, golden.rdiv(a, b))
    ks = [0, 1, 2, 3, 1000, 2**20, 2**26 + 3, 3037000499]               # 3037000499^2 < 2^63
    v = sorted({x for k in ks for x in (k * k - 1, k * k, k * k + 1, k * k + 2 * k) if 0 <= x <= 2**63 - 1}
               | {2**63 - 1, 2**62, 2**53 + 1, 2**53 - 1})
    v = np.array(v, np.int64)
    y = _run_graph(lambda g, nm: g.isqrt(nm[0]), {"v": v})
    np.testing.assert_array_equal(y, np.array([math.isqrt(int(x)) for x in v], np.int64))


@pytest.mark.parametrize("mag,expect", [(2**7, "FLOAT"), (2**20, "DOUBLE"), (2**28, None)])
def test_matmul_float_only_where_proven_exact(mag, expect):
    rng = np.random.default_rng(mag)
    x = rng.integers(-mag, mag + 1, (2, 3, 5), dtype=np.int64)
    w = rng.integers(-mag, mag + 1, (5, 4), dtype=np.int64)
    bound = 5 * mag * mag
    g = OnnxGraph()
    g.matmul("x", w, bound)
    casts = [a.i for n in g.nodes if n.op_type == "Cast" for a in n.attribute]
    assert (getattr(onnx.TensorProto, expect) in casts) if expect else not casts
    y = _run_graph(lambda g, nm: g.matmul(nm[0], w, bound), {"x": x})
    np.testing.assert_array_equal(y, x @ w)


def test_threshold_encoding_binary_search():
    thr = np.array([1, 1, 5, 9, 9, 9, 200], np.int64)                   # repeats: equal thresholds
    dec = np.arange(8, dtype=np.int64) * 10 - 3
    p = np.arange(0, 260, dtype=np.int64)
    y = _run_graph(lambda g, nm: g.encode_decode(nm[0], thr, dec), {"p": p})
    np.testing.assert_array_equal(y, dec[golden.encode(p, thr)])
    with pytest.raises(ProgramError, match="not sorted"):
        OnnxGraph().encode_decode("p", thr[::-1], dec)


# ---- whole random programs: every ViT op type ---------------------------------------------------------

@pytest.mark.parametrize("seed,kw", [
    (0, {}),
    (1, {"settings": {"acc_bits": 12}}),                                  # accumulators saturate
    (2, {"abits": 3, "wbits": 5, "heads": 3, "depth": 1}),
    (3, {"img": 6, "patch": 2, "embed_dim": 8, "heads": 4, "classes": 3,
         "settings": {"mult_bits": 20, "exp_frac_bits": 4, "exp_bits": 12, "gelu_bits": 8, "residual_bits": 12}}),
    (4, {"wbits": 8, "abits": 8, "depth": 1}),
    (5, {"abits": 2, "wbits": 2, "depth": 1, "settings": {"residual_bits": 8, "logit_bits": 8}}),
])
def test_random_programs_bit_exact(seed, kw):
    prog = make_program(seed, **kw)
    g = assert_three_agree(prog, random_images(seed + 100, 6, prog.model["img_size"]))
    if kw.get("settings", {}).get("acc_bits") == 12:
        assert sum(c["acc"] for c in g.counts.values()) > 0


def with_quantizer(sq: dict) -> Program:
    """A one-block random program whose attention uses the post-softmax quantizer ``sq``."""
    prog = make_program(11, depth=1)
    s = prog.settings
    tensors = dict(prog.tensors)
    for op in prog.ops:
        if op["type"] == "attention":
            q = Q.make(sq["type"], s["abits"], **{k: v for k, v in sq.items() if k != "type"})
            thr, dec, lv = Q.thresholds(q, s["prob_bits"]), Q.decode_table(q, s["decode_bits"]), q.levels()
            tensors.update({f"{op['name']}.thresholds": thr, f"{op['name']}.decode": dec,
                            f"{op['name']}.levels": lv.astype(np.float64)})
            op["attrs"]["softmax_quant"] = dict(sq)
    return Program(prog.header, tensors)


@pytest.mark.parametrize("sq", [
    {"type": "uniform", "scale": 1 / 15},
    {"type": "log2", "delta": 0.9},
    {"type": "log2sqrt", "delta": 1.0},
    {"type": "tanq", "t0": -1.4, "t1": 1.3},
    {"type": "adalog", "delta": 1.0, "q": 23.0, "r": 37.0},
    {"type": "sulq", "eta": 0.01, "top": 0.5},
    {"type": "twin", "m": 3.0},
    {"type": "twin", "m": 9.0},
])
def test_every_post_softmax_quantizer(sq):
    prog = with_quantizer(sq)
    assert_three_agree(prog, random_images(5, 6, prog.model["img_size"]))


def test_graph_names_and_docs(tmp_path):
    prog = make_program(0)
    info = export_onnx(prog, tmp_path / "m.onnx")
    m = onnx.load(str(tmp_path / "m.onnx"))
    inits = {t.name for t in m.graph.initializer}
    assert "blocks.1.attn.core.thresholds" in inits and "blocks.0.mlp.gelu.table" in inits
    assert all("docs/integer-spec.md section" in n.doc_string for n in m.graph.node if n.name != "output.reshape")
    assert not any(n.domain for n in m.graph.node)                          # standard operators only
    assert info["nodes"]["MatMul"] >= 1 and info["initializer_bytes"] > 0
    assert m.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8


# ---- Swin --------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_tiny_swin_bit_exact():
    from test_swin import images, program
    prog = program("A", 4, "tanq")
    types = {op["type"] for op in prog.ops}
    assert {"patchify", "patch_merge", "window_attention", "token_pool"} <= types
    assert_three_agree(prog, images(4, seed=7))


# ---- the command line --------------------------------------------------------------------------------

def test_cli_export_and_bad_input(capsys, tmp_path):
    p = tmp_path / "p.intprog"
    prog = make_program(0)
    save(prog, p)
    out = tmp_path / "m.onnx"
    assert main(["export", str(p), "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "MatMul" in text and "initializers" in text and "bytes" in text
    o = run_onnx(session(out), random_images(1, 3, 8))
    np.testing.assert_array_equal(o, golden.run(prog, random_images(1, 3, 8)).logits)

    # corrupted program: exit 2, one message, no file
    bad = tmp_path / "bad.intprog"
    bad.write_bytes(p.read_bytes()[:100])
    out2 = tmp_path / "m2.onnx"
    assert main(["export", str(bad), "-o", str(out2)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("intsim: error:") and err.count("\n") == 1
    assert not out2.exists()
    # missing program file, unwritable output folder
    assert main(["export", str(tmp_path / "none.intprog"), "-o", str(out2)]) == 2
    assert main(["export", str(p), "-o", str(tmp_path / "no" / "m.onnx")]) == 2
    capsys.readouterr()
    assert not out2.exists()
    assert sorted(x.name for x in tmp_path.iterdir()) == ["bad.intprog", "m.onnx", "p.intprog"]


def test_unknown_op_and_inexpressible_setting_refused(tmp_path):
    prog = make_program(0, depth=1)
    h = dict(prog.header)
    h["ops"] = [dict(o) for o in prog.ops]
    h["ops"][3] = dict(h["ops"][3], type="conv7")
    with pytest.raises(ProgramError, match="unknown op type 'conv7'"):
        export_onnx(Program(h, prog.tensors), tmp_path / "x.onnx")
    # a non-monotone threshold table cannot be encoded by the binary search: refused, no file
    tensors = dict(prog.tensors)
    name = next(o["name"] for o in prog.ops if o["type"] == "attention")
    tensors[f"{name}.thresholds"] = tensors[f"{name}.thresholds"][::-1].copy()
    with pytest.raises(ProgramError, match="not sorted"):
        export_onnx(Program(prog.header, tensors), tmp_path / "y.onnx")
    assert list(tmp_path.iterdir()) == []


# ---- the QONNX flavour (MultiThreshold), executed by qonnx's own executor -------------------------------

def _qonnx_logits(prog, images):
    pytest.importorskip("qonnx")
    from intsim.onnx_run import run_qonnx
    return run_qonnx(build_onnx(prog, "qonnx"), images)


def test_qonnx_flavour_graph():
    prog = make_program(0)
    m = build_onnx(prog, "qonnx")
    mt = [n for n in m.graph.node if n.op_type == "MultiThreshold"]
    n_attn = sum(op["type"] == "attention" for op in prog.ops)
    assert len(mt) == n_attn and all(n.domain == "qonnx.custom_op.general" for n in mt)
    assert {n.domain for n in m.graph.node} == {"", "qonnx.custom_op.general"}
    assert {o.domain: o.version for o in m.opset_import} == {"": 18, "qonnx.custom_op.general": 1}
    inits = {t.name: t for t in m.graph.initializer}
    thr = onnx.numpy_helper.to_array(inits["blocks.0.attn.core.thresholds"])
    assert thr.dtype == np.float32 and thr.ndim == 2 and thr.shape[0] == 1          # (channels = 1, steps)
    assert np.all(np.diff(thr[0]) >= 0) and thr.max() <= 2 ** prog.settings["prob_bits"]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in mt[0].attribute}
    assert attrs["out_scale"] == 1.0 and attrs["out_bias"] == 0.0 and attrs["data_layout"] == b"NCHW"
    assert {p.key: p.value for p in m.metadata_props}["intsim.flavor"] == "qonnx"
    std = build_onnx(prog)
    assert {p.key: p.value for p in std.metadata_props}["intsim.flavor"] == "onnx"
    assert not any(n.op_type == "MultiThreshold" for n in std.graph.node)


@pytest.mark.parametrize("seed,kw", [
    (0, {}),
    (1, {"settings": {"acc_bits": 12}}),                                  # accumulators saturate
    (5, {"abits": 2, "wbits": 2, "depth": 1, "settings": {"residual_bits": 8, "logit_bits": 8}}),
])
def test_qonnx_executor_bit_exact(seed, kw):
    prog = make_program(seed, **kw)
    images = random_images(seed + 200, 3, prog.model["img_size"])
    np.testing.assert_array_equal(_qonnx_logits(prog, images), golden.run(prog, images).logits)


@pytest.mark.parametrize("sq", [{"type": "log2", "delta": 0.9}, {"type": "tanq", "t0": -1.4, "t1": 1.3}])
def test_qonnx_every_threshold_shape(sq):
    """log2 tables put many thresholds at or past 2^P (clamped) and tanq ones near 0."""
    prog = with_quantizer(sq)
    images = random_images(6, 3, prog.model["img_size"])
    np.testing.assert_array_equal(_qonnx_logits(prog, images), golden.run(prog, images).logits)


def test_multithreshold_encoder_clamps_exactly():
    """Thresholds below 0, equal, at 2^P - 1, at and far past 2^P, in any order: the count of the
    spec for every p in 0..2^P - 1 (the standard flavour needs them sorted; MultiThreshold does not)."""
    pytest.importorskip("qonnx")
    from qonnx.custom_op.general.multithreshold import multithreshold
    P = 10
    thr = np.array([700, -5, 0, 1, 1, 2**P - 1, 2**P, 2**40, 3, 2**62], np.int64)
    g = OnnxGraph("qonnx")
    g.encode_multithreshold("p", thr, P, "NCHW")
    tab = onnx.numpy_helper.to_array(g.inits[next(k for k in g.inits if k.endswith("thresholds"))])
    p = np.arange(2**P, dtype=np.int64).reshape(1, 1, 1, -1)
    code = multithreshold(p.astype(np.float32), tab)                # qonnx's own function, float32
    np.testing.assert_array_equal(code.astype(np.int64), golden.encode(p, thr))
    with pytest.raises(ProgramError, match="prob_bits 25 > 24"):
        OnnxGraph("qonnx").encode_multithreshold("p", thr, 25, "NCHW")


def test_unknown_flavour_refused(capsys, tmp_path):
    prog = make_program(0, depth=1)
    with pytest.raises(ProgramError, match="unknown flavour 'tflite'"):
        export_onnx(prog, tmp_path / "x.onnx", flavor="tflite")
    p = tmp_path / "p.intprog"
    save(prog, p)
    with pytest.raises(SystemExit) as e:
        main(["export", str(p), "-o", str(tmp_path / "y.onnx"), "--flavor", "tflite"])
    assert e.value.code == 2 and "invalid choice: 'tflite'" in capsys.readouterr().err
    assert sorted(x.name for x in tmp_path.iterdir()) == ["p.intprog"]


@pytest.mark.heavy
def test_tiny_swin_qonnx_bit_exact():
    """The qonnx executor (one onnxruntime session per node) on a tiny Swin: several minutes."""
    from test_swin import images, program
    prog = program("A", 4, "tanq")
    x = images(2, seed=7)
    m = build_onnx(prog, "qonnx")
    assert sum(n.op_type == "MultiThreshold" for n in m.graph.node) == sum(
        op["type"] == "window_attention" for op in prog.ops)
    np.testing.assert_array_equal(_qonnx_logits(prog, x), golden.run(prog, x).logits)


# ---- intsim inspect model.onnx ---------------------------------------------------------------------

def test_inspect_onnx_file(capsys, tmp_path):
    import json
    prog = make_program(0)
    p = tmp_path / "p.intprog"
    save(prog, p)
    for flavor in ("onnx", "qonnx"):
        out = tmp_path / f"m_{flavor}.onnx"
        assert main(["export", str(p), "-o", str(out), "--flavor", flavor]) == 0
        capsys.readouterr()
        assert main(["inspect", str(out), "--json", str(tmp_path / f"{flavor}.json")]) == 0
        text = capsys.readouterr().out
        assert f"flavour {flavor}" in text and "ai.onnx 18" in text and "initializers" in text and "bytes" in text
        assert ("MultiThreshold" in text) == (flavor == "qonnx")
        info = json.loads((tmp_path / f"{flavor}.json").read_text())
        m = onnx.load(str(out))
        assert info["node_count"] == len(m.graph.node) == sum(info["nodes"].values())
        assert info["initializers"] == len(m.graph.initializer) and info["flavor"] == flavor
        assert info["inputs"][0]["type"] == "uint8" and info["outputs"][0]["type"] == "int64"


@pytest.mark.parametrize("content", [b"", b"\x08\x08garbage that is not protobuf \xff\xff\xff", None])
def test_inspect_corrupt_onnx_file(capsys, tmp_path, content):
    bad = tmp_path / "bad.onnx"
    if content is None:                                     # a truncated real graph
        export_onnx(make_program(0, depth=1), tmp_path / "good.onnx")
        content = (tmp_path / "good.onnx").read_bytes()[:3000]
    bad.write_bytes(content)
    assert main(["inspect", str(bad)]) == 2
    cap = capsys.readouterr()
    assert cap.err.startswith("intsim: error:") and cap.err.count("\n") == 1 and "Traceback" not in cap.err
    assert main(["inspect", str(tmp_path / "none.onnx")]) == 2
    assert "no such file" in capsys.readouterr().err


# ---- intsim run --onnx ---------------------------------------------------------------------------------

def test_run_onnx_level(capsys, tmp_path):
    import json
    opts = ["--no-progress", "run", "--weights", "random", "--seed", "5", "--calib-images", "8", "--images", "6",
            "--golden-images", "2", "--onnx", "--onnx-images", "4", "--json", str(tmp_path / "r.json"),
            "--logits", str(tmp_path / "l.npz")]
    assert main(opts) == 0
    out = capsys.readouterr().out
    assert "engine vs onnxruntime: 0 of 40 logits differ (exported graph on the first 4 images)" in out
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["engine_vs_onnx"]["logits_differing"] == 0 and rep["levels"]["onnx"]["images"] == 4
    assert rep["config"]["onnx_images"] == 4
    gr = rep["engine_vs_onnx"]["graph"]
    assert gr["node_count"] == sum(gr["nodes"].values()) > 0 and gr["initializer_bytes"] > 0
    lg = np.load(tmp_path / "l.npz")
    np.testing.assert_array_equal(lg["onnx_int"], lg["engine_int"][:4])
    assert not list(tmp_path.glob("*.onnx"))


def test_run_onnx_without_onnxruntime_exits_2_before_work(capsys, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "onnxruntime", None)               # import onnxruntime -> ImportError
    assert main(["--no-progress", "run", "--weights", "random", "--onnx"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("intsim: error: intsim run --onnx needs onnx and onnxruntime") and err.count("\n") == 1
    assert main(["--no-progress", "run", "--weights", "random", "--onnx-images", "3"]) == 2
    assert capsys.readouterr().err == "intsim: error: --onnx-images needs --onnx\n"
