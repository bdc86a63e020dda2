"""Plots (intsim/plots.py): sweep accuracy vs cost, post-softmax distribution, per-layer SQNR."""
import json
import math

import numpy as np
import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from calib import CalibConfig, calibrate
from intsim.studies import plots
from intsim.cli import main
from reference.vit import params_from_timm

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _images(n, seed):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (n, 3, 1, 1))
    return np.clip(base + rng.normal(0, 40, (n, 3, 32, 32)), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=24, depth=2, num_heads=2, num_classes=5).eval()
    prog = calibrate(model, _images(8, 1), MEAN, STD, CalibConfig(wbits=8, abits=8), progress=False)
    return prog, params_from_timm(model, MEAN, STD)


def _is_png(path):
    data = open(path, "rb").read()
    return len(data) > 1000 and data[:8] == PNG_MAGIC


def _rows():
    rows = []
    for i, (w, sq) in enumerate([(8, "tanq"), (8, "log2sqrt"), (4, "tanq"), (4, "log2sqrt"), (3, "tanq")]):
        rows.append({"key": f"W{w}A{w}|{sq}|mosf|", "wbits": w, "abits": w, "softmax_quant": sq, "ln_rule": "mosf",
                     "settings": {"acc_bits": 32} if i == 4 else {},
                     "engine.top1": [0.90, 0.89, 0.86, 0.80, 0.70][i],
                     "fakequant.top1": [0.90, 0.895, 0.865, 0.81, 0.71][i],
                     "cost.bops": w * w * 1e8, "cost.weight_bits": w * 1e6})
    return rows


def test_pareto_front():
    pts = [(1, 0.5), (2, 0.7), (2, 0.6), (3, 0.65), (4, 0.9), (0.5, 0.1)]
    assert plots.pareto_front(pts) == [5, 0, 1, 4]


def test_sweep_plots(tmp_path, capsys):
    (tmp_path / "results.json").write_text(json.dumps({"points": _rows()}))
    res = plots.plot_sweep(tmp_path / "results.json", tmp_path)
    assert sorted(res["files"]) == sorted(str(tmp_path / f) for f in plots.SWEEP_PNGS)
    assert all(_is_png(f) for f in res["files"])
    # the 4-bit log2sqrt point is dominated by the 4-bit tanq point (same cost, lower accuracy)
    assert res["pareto"]["cost.bops"] == ["W3A3|tanq|mosf|", "W4A4|tanq|mosf|", "W8A8|tanq|mosf|"]
    out = tmp_path / "cli"
    out.mkdir()
    assert main(["plot", "sweep", str(tmp_path), "-o", str(out)]) == 0
    assert all(_is_png(out / f) for f in plots.SWEEP_PNGS)
    assert main(["plot"]) == 2
    assert main(["plot", "sweep", str(tmp_path / "missing.json")]) == 2


def test_sweep_writes_plots_and_survives_plot_failure(tmp_path, capsys):
    from intsim.studies.sweep import _write_plots
    _write_plots(_rows(), tmp_path)
    assert all(_is_png(tmp_path / f) for f in plots.SWEEP_PNGS)
    bare = tmp_path / "bare"
    bare.mkdir()
    _write_plots([{"key": "x", "engine.top1": 0.5}], bare)      # no cost columns: a warning, no exception
    assert "plots not written" in capsys.readouterr().out
    assert not any(bare.iterdir())


def test_softmax_distribution_plot(tiny, tmp_path):
    prog, params = tiny
    probs, v = plots.capture_attention(params, _images(4, 2), block=1)
    assert probs.shape == (4, 2, 17, 17) and v.shape == (4, 2, 17, 12)
    torch.testing.assert_close(probs.sum(-1), torch.ones(4, 2, 17))
    q = plots.softmax_quantizers(prog, 1, 3, probs, v, search=True, rows=8, prob_bits=10)
    assert set(q) == {"uniform", "log2", "log2sqrt", "tanq", "adalog", "sulq", "twin"}
    assert all(int(x["quant"].bits) == 3 and x["source"] == "searched" for x in q.values())
    assert all(math.isfinite(x["error"]) for x in q.values())
    own = plots.softmax_quantizers(prog, 1, 8, probs, v, search=False)
    assert own["tanq"]["source"] == "program" and own["uniform"]["source"] == "default"
    assert own["twin"]["source"] == "default" and own["twin"]["quant"].used() < 256
    f = plots.plot_softmax(probs, q, tmp_path / "softmax.png", title="block 1")
    assert _is_png(f)


def test_layer_sqnr(tiny, tmp_path):
    prog, params = tiny
    s = plots.layer_sqnr(prog, params, _images(3, 4), batch_size=2)
    ints = [n for n, v in prog.values.items() if v["kind"] != "image"]
    assert [p["value"] for p in s["points"]] == ints
    for p in s["points"]:
        for k in ("fakequant_vs_float_db", "engine_vs_fakequant_db"):
            assert isinstance(p[k], float) and math.isfinite(p[k]), (p["value"], k)
    by = {p["value"]: p for p in s["points"]}
    # at W8A8 fake-quant follows float closely, also at the reparameterized LayerNorm outputs
    for name in ("blocks.0.norm1", "blocks.0.attn.q", "blocks.0.norm2", "patch_embed"):
        assert by[name]["fakequant_vs_float_db"] > 20, by[name]
    json.dumps(s, allow_nan=False)
    f = plots.plot_sqnr(s, tmp_path / "sqnr.png")
    assert _is_png(f)


def test_sqnr_definition():
    ref = np.array([1.0, -1.0, 2.0, 0.0])
    assert plots.sqnr_db(ref, ref) == (plots.SQNR_CAP_DB, True)
    db, exact = plots.sqnr_db(ref, ref + np.array([0.1, 0, 0, 0]))
    assert not exact and db == pytest.approx(10 * math.log10(6 / 0.01))
