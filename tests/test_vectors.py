"""Test vectors (intsim/studies/vectors.py): written from the golden model, reproduced by the engine."""
import json

import numpy as np
import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from calib import CalibConfig, calibrate
from intsim.cli import main
from intsim.errors import UserError
from intsim.studies.vectors import NPZ, check_vectors, parse_hex, verify_vectors, write_vectors
from intsim.program.format import save
from reference.golden import run as golden_run

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def _images(n, seed):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (n, 3, 1, 1))
    return np.clip(base + rng.normal(0, 40, (n, 3, 32, 32)), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def prog():
    torch.manual_seed(0)
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=24, depth=2, num_heads=2, num_classes=5).eval()
    with torch.no_grad():                              # sharper attention, as in trained ViTs
        for blk in model.blocks:
            blk.attn.qkv.weight[:48] *= 3.0
    return calibrate(model, _images(8, 1), MEAN, STD, CalibConfig(wbits=4, abits=4), progress=False)


def _read_hex(path, bits, signed):
    """An independent reader: fixed digits, two's complement."""
    lines = path.read_text().splitlines()
    assert all(len(s) == (bits + 3) // 4 for s in lines)
    vals = [int(s, 16) for s in lines]
    if signed:
        vals = [v - (1 << bits) if v >= 1 << (bits - 1) else v for v in vals]
    return np.array(vals, dtype=np.int64)


def _all_hex_match(d):
    man = json.loads((d / "manifest.json").read_text())
    with np.load(d / NPZ) as z:
        for name, meta in man["arrays"].items():
            got = _read_hex(d / meta["file"], meta["bits"], meta["signed"]).reshape(meta["shape"])
            np.testing.assert_array_equal(got, z[name], err_msg=name)
            np.testing.assert_array_equal(parse_hex((d / meta["file"]).read_text(), meta["bits"], meta["signed"],
                                                    meta["shape"]), z[name])
    return man


def test_attention_vectors(prog, tmp_path):
    x = _images(2, 5)
    d = tmp_path / "attn"
    man = write_vectors(prog, "blocks.0.attn.core", x, d)
    assert check_vectors(prog, d)
    _all_hex_match(d)
    fmt = (d / "FORMAT.md").read_text()
    for name in man["arrays"]:
        assert f"`{name}.hex`" in fmt
    with np.load(d / NPZ) as z:
        g = golden_run(prog, x, keep_values=True).values
        for role, v in zip(("q", "k", "v"), ("blocks.0.attn.q", "blocks.0.attn.k", "blocks.0.attn.v")):
            np.testing.assert_array_equal(z[role], g[v])
        np.testing.assert_array_equal(z["y"], g["blocks.0.attn.core"])
        for t in ("exp_table", "thresholds", "decode"):
            np.testing.assert_array_equal(z[t], prog.t("blocks.0.attn.core", t))
        B, T, D = z["q"].shape
        assert z["p"].shape == z["code"].shape == (B, 2, T, T)
        assert (z["code"] <= 15).all() and (z["p"] < 2 ** 16).all()
        np.testing.assert_array_equal(z["dec"], z["decode"][z["code"]])
        assert man["arrays"]["A"]["bits"] == prog.settings["acc_bits"]


def test_mlp_vectors_accumulators(prog, tmp_path):
    x = _images(3, 6)
    d = tmp_path / "fc1"
    man = write_vectors(prog, "blocks.1.mlp.fc1", x, d)
    assert check_vectors(prog, d)
    _all_hex_match(d)
    g = golden_run(prog, x, keep_values=True).values
    with np.load(d / NPZ) as z:
        np.testing.assert_array_equal(z["x"], g["blocks.1.norm2"])
        np.testing.assert_array_equal(z["y"], g["blocks.1.mlp.fc1"])
        w, b = prog.t("blocks.1.mlp.fc1", "w").astype(np.int64), prog.t("blocks.1.mlp.fc1", "bias")
        np.testing.assert_array_equal(z["w"], w)
        np.testing.assert_array_equal(z["acc_raw"], b + z["x"] @ w.T)
        A = prog.settings["acc_bits"]
        np.testing.assert_array_equal(z["acc"], np.clip(z["acc_raw"], -2 ** (A - 1), 2 ** (A - 1) - 1))
        for k in ("mult", "shift", "zp"):
            np.testing.assert_array_equal(z[k], prog.t("blocks.1.mlp.fc1", k))
    assert man["arrays"]["w"] == {**man["arrays"]["w"], "bits": prog.settings["wbits"] + 1, "signed": True}
    assert man["arrays"]["y"]["bits"] == prog.values["blocks.1.mlp.fc1"]["bits"]


def test_every_op_type(prog, tmp_path):
    x = _images(2, 7)
    for layer in ("patch_embed", "blocks.0.norm1", "blocks.0.add1", "blocks.0.mlp.gelu", "blocks.0.mlp.fc2",
                  "norm", "head"):
        d = tmp_path / layer
        write_vectors(prog, layer, x, d)
        assert verify_vectors(prog, d) == [], layer


def test_corruption_is_detected(prog, tmp_path):
    d = tmp_path / "fc2"
    write_vectors(prog, "blocks.0.mlp.fc2", _images(2, 8), d)
    assert check_vectors(prog, d)
    man = json.loads((d / "manifest.json").read_text())
    with np.load(d / NPZ) as z:
        arrays = {k: z[k].copy() for k in z.files}
    good = arrays["y"].copy()
    # one output value changed consistently in the npz and the hex file: only the engine can tell
    arrays["y"][1, 3, 2] += 1
    np.savez(d / NPZ, **arrays)
    meta = man["arrays"]["y"]
    lines = (d / "y.hex").read_text().splitlines()
    i = np.ravel_multi_index((1, 3, 2), arrays["y"].shape)
    v = int(arrays["y"][1, 3, 2]) & ((1 << meta["bits"]) - 1)
    lines[i] = format(v, f"0{meta['digits']}x")
    (d / "y.hex").write_text("\n".join(lines) + "\n")
    problems = verify_vectors(prog, d)
    assert not check_vectors(prog, d)
    assert len(problems) == 1 and "engine's output differs" in problems[0] and "(1, 3, 2)" in problems[0]
    # restored npz, hex still corrupted: the hex check tells
    arrays["y"] = good
    np.savez(d / NPZ, **arrays)
    assert not check_vectors(prog, d)
    assert any("y.hex differs" in p for p in verify_vectors(prog, d))


def test_unknown_layer_lists_ops(prog, tmp_path):
    with pytest.raises(UserError, match="available ops: patch_embed, blocks.0.norm1"):
        write_vectors(prog, "blocks.9.attn", _images(1, 0), tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_cli_write_and_check(prog, tmp_path, capsys):
    f = tmp_path / "p.safetensors"
    save(prog, f)
    d = tmp_path / "vec"
    assert main(["vectors", "--program", str(f), "--layer", "blocks.1.attn.core", "--images", "2", "-o", str(d)]) == 0
    man = json.loads((d / "manifest.json").read_text())
    assert man["images"]["count"] == 2 and "bundled" in man["images"]["source"]
    assert main(["vectors", "--check", str(d), "--program", str(f)]) == 0
    assert "reproduces" in capsys.readouterr().out
    assert main(["vectors", "--program", str(f), "--layer", "nope", "-o", str(tmp_path / "v2")]) == 2
    err = capsys.readouterr().err
    assert "no op named 'nope'" in err and "blocks.1.mlp.fc1" in err
    lines = (d / "y.hex").read_text().splitlines()
    lines[0] = "1" if lines[0] != "1" else "2"            # 4-bit codes: one digit a line
    (d / "y.hex").write_text("\n".join(lines) + "\n")
    assert main(["vectors", "--check", str(d), "--program", str(f)]) == 1
    other = tmp_path / "busy"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert main(["vectors", "--program", str(f), "--layer", "head", "-o", str(other)]) == 2
    assert (other / "notes.txt").read_text() == "mine"


def _rewrite_hex(d, man, name, arrays):
    """Write ``arrays[name]`` into its hex file too, so that only the later checks can tell."""
    meta = man["arrays"][name]
    mask = (1 << meta["bits"]) - 1
    (d / meta["file"]).write_text("".join(format(int(v) & mask, f"0{meta['digits']}x") + "\n"
                                          for v in arrays[name].reshape(-1)))


MALFORMED = {
    # name: (edit of (manifest, arrays), expected message)
    "op a number": (lambda m, a: m.update(op=3), "'op' must be an object"),
    "wrong format": (lambda m, a: m.update(format="other"), "not an intsim-vectors manifest"),
    "roles not list": (lambda m, a: m.update(roles="q"), "'roles' must be a list"),
    "shape not list": (lambda m, a: m["arrays"]["q"].update(shape="x"), "arrays.q.shape"),
    "bits huge": (lambda m, a: m["arrays"]["q"].update(bits=10 ** 30), "arrays.q.bits"),
    "file escapes": (lambda m, a: m["arrays"]["q"].update(file="../../etc/passwd"), "plain .hex file name"),
    "group unknown": (lambda m, a: m["arrays"]["q"].update(group="evil"), "arrays.q.group"),
    "counts not ints": (lambda m, a: m.update(golden_counts={"acc": "x"}), "golden_counts"),
    "too few roles": (lambda m, a: m.update(roles=["q", "k"]), "names 2 inputs"),
    "float input": (lambda m, a: a.update(q=a["q"].astype(float)), "dtype float64, integers expected"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_check_refuses_malformed_folder(prog, tmp_path, capsys, case):
    """vectors --check on a folder from elsewhere: a malformed manifest or npz exits 2 with one line."""
    f = tmp_path / "p.intsim"
    save(prog, f)
    d = tmp_path / "vec"
    write_vectors(prog, "blocks.0.attn.core", _images(2, 3), d)
    man = json.loads((d / "manifest.json").read_text())
    with np.load(d / NPZ) as z:
        arrays = {k: z[k].copy() for k in z.files}
    edit, message = MALFORMED[case]
    edit(man, arrays)
    (d / "manifest.json").write_text(json.dumps(man))
    np.savez(d / NPZ, **arrays)
    capsys.readouterr()
    assert main(["vectors", "--check", str(d), "--program", str(f)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


@pytest.mark.parametrize("edit", ["out_of_range", "shape", "batch"])
def test_check_refuses_inputs_the_kernels_cannot_take(prog, tmp_path, edit):
    """Stored inputs consistent between npz and hex but outside the op's input value (a code of 2^40,
    a wrong token count, two batch sizes) are refused before the engine (no bounds checks) sees them."""
    d = tmp_path / "vec"
    write_vectors(prog, "blocks.0.attn.core", _images(2, 3), d)
    man = json.loads((d / "manifest.json").read_text())
    with np.load(d / NPZ) as z:
        arrays = {k: z[k].copy() for k in z.files}
    if edit == "out_of_range":
        arrays["q"][0, 0, 0] = 1 << 40
        man["arrays"]["q"]["bits"] = 64
        man["arrays"]["q"]["digits"] = 16
        message = "outside the range"
    elif edit == "shape":
        arrays["q"] = arrays["q"][:, :3]
        man["arrays"]["q"]["shape"] = list(arrays["q"].shape)
        message = "has shape"
    else:
        arrays["q"] = arrays["q"][:1]
        man["arrays"]["q"]["shape"] = list(arrays["q"].shape)
        message = "holds 2 images, the others 1"
    _rewrite_hex(d, man, "q", arrays)
    (d / "manifest.json").write_text(json.dumps(man))
    np.savez(d / NPZ, **arrays)
    with pytest.raises(UserError, match=message):
        verify_vectors(prog, d)


@pytest.mark.parametrize("layer", ["blocks.3.attn.core", "blocks.3.mlp.fc1", "blocks.3.mlp.fc2"])
def test_bundled_model_vectors(layer, tmp_path, capsys):
    """Vectors of one attention layer and the MLP layers of the bundled trained model (W4A4, DopQ-ViT),
    written from the golden model by the command line and reproduced by the engine (--check)."""
    f = tmp_path / "bundled_w4a4.intsim"
    if not f.exists():
        assert main(["--no-progress", "calibrate", "--calib-images", "8", "-o", str(f)]) == 0
    d = tmp_path / layer
    assert main(["--no-progress", "vectors", "--program", str(f), "--layer", layer, "--images", "2",
                 "-o", str(d)]) == 0
    assert main(["--no-progress", "vectors", "--check", str(d), "--program", str(f)]) == 0
    assert "engine reproduces" in capsys.readouterr().out.lower()
    _all_hex_match(d)
