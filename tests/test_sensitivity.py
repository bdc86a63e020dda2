"""The paired top-1 difference, the fake-quant siblings and ``intsim sensitivity``."""
import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from intsim import metrics
from intsim.cli import main


def _onehot(pred, c=4):
    out = np.zeros((len(pred), c))
    out[np.arange(len(pred)), pred] = 1.0
    return out


@settings(max_examples=80, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 3), st.integers(0, 3)), min_size=1, max_size=60))
def test_paired_difference_against_a_direct_count(rows):
    pa = [r[0] for r in rows]
    pb = [r[1] for r in rows]
    y = np.array([r[2] for r in rows])
    got = metrics.paired_top1_difference(_onehot(pa), _onehot(pb), y)
    only_a = sum(1 for a, b, t in rows if a == t and b != t)
    only_b = sum(1 for a, b, t in rows if b == t and a != t)
    n = len(rows)
    assert (got["only_a"], got["only_b"]) == (only_a, only_b)
    # the difference of the two top-1 accuracies, computed independently
    acc_a = sum(a == t for a, _, t in rows) / n
    acc_b = sum(b == t for _, b, t in rows) / n
    assert math.isclose(got["diff"], acc_a - acc_b, abs_tol=1e-12)
    # the paired variance: per image d_i in {-1, 0, 1}, var(mean d) = (sum d_i^2 - n mean^2) / n^2
    d = np.array([(a == t) - (b == t) for a, b, t in rows], dtype=float)
    se = math.sqrt(max((d ** 2).sum() - n * d.mean() ** 2, 0.0)) / n
    assert math.isclose(got["se"], se, rel_tol=1e-9, abs_tol=1e-15)
    assert math.isclose(got["ci95"], 1.96 * se, rel_tol=1e-9, abs_tol=1e-15)


def test_paired_difference_of_identical_models_is_exactly_zero():
    y = np.array([0, 1, 2, 3, 0])
    logits = _onehot([0, 2, 2, 1, 3])
    got = metrics.paired_top1_difference(logits, logits, y)
    assert got == {"diff": 0.0, "only_a": 0, "only_b": 0, "se": 0.0, "ci95": 0.0}
    assert metrics.paired_top1_difference(np.zeros((0, 4)), np.zeros((0, 4)), np.zeros(0, int))["ci95"] == 0.0


@pytest.fixture(scope="module")
def small_program():
    from timm.models.vision_transformer import VisionTransformer

    from calib import CalibConfig, calibrate
    torch.manual_seed(0)
    m = VisionTransformer(img_size=32, patch_size=8, embed_dim=24, depth=2, num_heads=2, num_classes=5).eval()
    cal = np.random.default_rng(1).integers(0, 256, (8, 3, 32, 32), dtype=np.uint8)
    return calibrate(m, cal, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), CalibConfig(wbits=4, abits=4), progress=False)


def test_fakequant_siblings(small_program):
    from reference.fakequant import FakeQuantModel
    prog = small_program
    shape = prog.values[prog.header["inputs"][0]]["shape"]
    x = np.random.default_rng(0).integers(0, 256, (4, *shape), dtype=np.uint8)
    base = FakeQuantModel(prog)(x)
    f64 = FakeQuantModel(prog, dtype=torch.float64)(x)
    grid = FakeQuantModel(prog, int_grid=True)(x)
    assert base.dtype == torch.float32 and f64.dtype == torch.float64
    assert torch.allclose(f64.float(), base, rtol=1e-3, atol=1e-3 * float(base.abs().max()))
    # the output ("int" logits) of the int-grid sibling lies on the program's logit grid
    v = prog.values[prog.output]
    q = grid.double() / float(v["scale"])
    assert torch.allclose(q, q.round(), atol=1e-6)
    with pytest.raises(ValueError, match="dtype"):
        FakeQuantModel(prog, dtype=torch.float16)


def test_sensitivity_command(capsys, tmp_path):
    out = tmp_path / "sens.json"
    rc = main(["--no-progress", "sensitivity", "--images", "20", "--calib-images", "8", "--json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "int-grid" in text and "95% interval" in text
    rep = json.loads(out.read_text())
    assert [r["level"] for r in rep["results"]] == [
        "fakequant", "fakequant float64", "fakequant int-grid", "fakequant + integer layernorm",
        "fakequant + integer attention", "fakequant + integer gelu", "engine"]
    ref = rep["results"][0]
    assert ref["agree_fakequant"] == 1.0 and ref["minus_fakequant"] == 0.0 and ref["ci95"] == 0.0
    for r in rep["results"]:
        assert 0 <= r["top1"] <= 1 and r["only_right"] + r["only_fakequant_right"] <= rep["images"]
        assert math.isclose(r["minus_fakequant"], (r["only_right"] - r["only_fakequant_right"]) / rep["images"])


def test_sensitivity_bad_input(capsys, tmp_path):
    with pytest.raises(SystemExit) as e:              # argparse's range type, before any work
        main(["sensitivity", "--batch-size", "0"])
    assert e.value.code == 2
    assert "argument --batch-size: expected a positive integer, not 0" in capsys.readouterr().err
    assert main(["sensitivity", "--program", str(tmp_path / "missing.safetensors")]) == 2


def test_hybrid_with_every_integer_op_equals_the_engine(small_program):
    """With every op type executed by the engine, the hybrid's logits are the engine's, dequantized:
    the conversions between the float and the integer representation are exact."""
    from intsim.engine import Engine
    from intsim.studies.sensitivity import hybrid_fakequant
    prog = small_program
    types = {op["type"] for op in prog.ops}
    x = np.random.default_rng(2).integers(0, 256, (6, 3, 32, 32), dtype=np.uint8)
    got = hybrid_fakequant(prog, types)(x).double().numpy()
    eng = Engine(prog).run(x)
    np.testing.assert_array_equal(np.round(got / eng.scale).astype(np.int64), eng.logits)
