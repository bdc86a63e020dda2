"""Swin Transformers (issue 6): float reference, window geometry, MOSF, engine == golden, the mask.

Tiny timm ``SwinTransformer`` models (32 px) with the pathologies of trained models injected
(outlier post-LayerNorm channels, sharpened q/k, a relative position bias table that matters).
"""
from pathlib import Path

import numpy as np
import pytest
import torch
from timm.models.swin_transformer import SwinTransformer, window_partition

from calib import CalibConfig, calibrate
from calib.swin import reparameterize
from intsim.engine import Engine
from intsim.ops.window_attention import window_probabilities
from intsim.program.format import ProgramError, Program, validate
from reference import golden
from reference import swin as S
from reference.fakequant import FakeQuantModel

MEAN, STD = (0.5, 0.45, 0.4), (0.25, 0.3, 0.2)
# A: 16x16 then 8x8 token grids, window 4 (shifted blocks have masks in both stages)
CFG_A = dict(img_size=32, patch_size=2, embed_dim=24, depths=(2, 2), num_heads=(2, 4), window_size=4, num_classes=5)
# B: 8x8 then 4x4 = the window (timm then turns the shift off: one window, no mask)
CFG_B = dict(img_size=32, patch_size=4, embed_dim=24, depths=(2, 2), num_heads=(2, 4), window_size=4, num_classes=5)


def inject_pathologies(model: SwinTransformer, seed: int = 0) -> SwinTransformer:
    g = torch.Generator().manual_seed(seed)

    def outliers(norm):
        d = norm.weight.numel()
        idx = torch.randperm(d, generator=g)[: max(1, d // 16)]
        factor = 10 + 90 * torch.rand(len(idx), generator=g)
        norm.weight[idx] *= factor
        norm.bias[idx] += factor * 0.1

    with torch.no_grad():
        for st in model.layers:
            if not isinstance(st.downsample, torch.nn.Identity):
                outliers(st.downsample.norm)
            for blk in st.blocks:
                outliers(blk.norm1)
                outliers(blk.norm2)
                dim = blk.attn.qkv.weight.shape[0] // 3
                blk.attn.qkv.weight[: 2 * dim] *= 3.0
                blk.attn.relative_position_bias_table.normal_(0.0, 1.5, generator=g)
        outliers(model.norm)
    return model


def tiny_swin(cfg=CFG_A, seed=0):
    torch.manual_seed(seed)
    return inject_pathologies(SwinTransformer(**cfg).eval(), seed)


def images(n, size=32, seed=0):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (n, 3, 1, 1))
    return np.clip(base + rng.normal(0, 40, (n, 3, size, size)), 0, 255).astype(np.uint8)


def timm_logits(model, x):
    t = torch.from_numpy(x).float() / 255.0
    m, s = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    with torch.no_grad():
        return model((t - m) / s)


def assert_bit_exact(prog, x):
    g = golden.run(prog, x)
    e = Engine(prog).run(x, batch_size=3)
    np.testing.assert_array_equal(e.logits, g.logits)
    assert e.counts == g.counts
    return e, g


_PROGS: dict = {}


def program(cfg_name="A", bits=4, softmax_quant="tanq", settings=None):
    """Calibrated tiny Swin programs, cached per configuration (calibration is the slow part)."""
    settings = dict(settings or {})
    key = (cfg_name, bits, softmax_quant, tuple(sorted(settings.items())))
    if key not in _PROGS:
        cfg = {"A": CFG_A, "B": CFG_B}[cfg_name]
        _PROGS[key] = calibrate(tiny_swin(cfg), images(12, seed=1), MEAN, STD,
                                CalibConfig(wbits=bits, abits=bits, softmax_quant=softmax_quant, settings=settings),
                                progress=False)
    return _PROGS[key]


# ---- float reference ------------------------------------------------------------------------------

@pytest.mark.parametrize("cfg", [CFG_A, CFG_B])
def test_identity_hook_forward_equals_timm(cfg):
    model = tiny_swin(cfg)
    x = images(3, seed=4)
    ref = timm_logits(model, x)
    out = S.forward(S.params_from_timm(model, MEAN, STD), x)
    assert torch.allclose(out, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max())), (out - ref).abs().max()


def test_identity_hook_forward_equals_timm_swin_t():
    import timm
    torch.manual_seed(0)
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False).eval()
    with torch.no_grad():
        for st in model.layers:
            for blk in st.blocks:
                blk.attn.relative_position_bias_table.normal_(0.0, 1.0)
    x = images(1, 224, seed=3)
    ref = timm_logits(model, x)
    out = S.forward(S.params_from_timm(model, MEAN, STD), x)
    assert torch.allclose(out, ref, rtol=1e-3, atol=1e-3 * float(ref.abs().max())), (out - ref).abs().max()


def test_geometry_tables_match_timm():
    model = tiny_swin(CFG_A)
    for st in model.layers:
        if not isinstance(st.downsample, torch.nn.Identity):
            H, W = st.input_resolution
            grid = torch.arange(H * W).reshape(1, H, W, 1)
            merged = grid.reshape(1, H // 2, 2, W // 2, 2, 1).permute(0, 1, 3, 4, 2, 5).flatten(3)
            np.testing.assert_array_equal(S.merge_sources(H, W), merged.reshape(-1, 4).numpy())
        for blk in st.blocks:
            H, W = blk.input_resolution
            ws, sh = blk.window_size[0], blk.shift_size[0]
            grid = torch.arange(H * W).reshape(1, H, W, 1)
            rolled = torch.roll(grid, shifts=(-sh, -sh), dims=(1, 2)) if sh else grid
            win = window_partition(rolled, (ws, ws)).reshape(-1, ws * ws)
            np.testing.assert_array_equal(S.window_tokens(H, W, ws, sh), win.numpy())
            np.testing.assert_array_equal(S.relative_index(ws), blk.attn.relative_position_index.numpy())
            m = S.shift_mask(H, W, ws, sh)
            if blk.attn_mask is None:
                assert sh == 0 and not m.any()
            else:
                np.testing.assert_array_equal(m, (blk.attn_mask != 0).numpy())
                assert m.any()


def test_mosf_reparameterization_preserves_float_output():
    model = tiny_swin(CFG_A)
    params = S.params_from_timm(model, MEAN, STD)
    x = images(8, seed=5)
    new, reps = reparameterize(params, x, 4, "mosf")
    names = set(reps)
    assert {"layers.1.downsample.norm", "head.pool", "layers.0.blocks.1.norm1", "layers.1.blocks.0.norm2"} <= names
    assert max(float(r.r1.max()) for r in reps.values()) > 5     # outlier channels got their own scales
    ref, out = S.forward(params, x), S.forward(new, x)
    assert torch.allclose(out, ref, rtol=1e-3, atol=1e-4 * float(ref.abs().max())), (out - ref).abs().max()


# ---- engine == golden ---------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [4, 8])
def test_tiny_swin_engine_equals_golden(bits):
    prog = program("A", bits)
    assert prog.model["arch"] == "swin"
    types = {op["type"] for op in prog.ops}
    assert {"patchify", "patch_merge", "window_attention", "token_pool"} <= types
    shifted = [op for op in prog.ops if op["type"] == "window_attention" and op["attrs"]["cyclic_shift"]]
    assert shifted and all(prog.t(op, "mask").any() for op in shifted)
    assert_bit_exact(prog, images(5, seed=2))


def test_swin_program_header_and_architecture_entry():
    """The Swin header is the common one (spec section 8: export.bias_saturated recorded), and the
    registry maps both the model and the program to the Swin entry."""
    from calib import archs
    prog = program("A", 4)
    assert prog.header["export"] == {"bias_saturated": {}}
    assert archs.for_program(prog) is archs.SWIN is archs.for_model(tiny_swin(CFG_A))
    assert not archs.SWIN.supports("reconstruction")
    assert isinstance(archs.SWIN.fakequant_model(prog), FakeQuantModel)
    # a narrow accumulator saturates some biases at export: the header says which (it used not to)
    narrow = program("A", 8, settings={"acc_bits": 18})
    sat = narrow.header["export"]["bias_saturated"]
    assert sat and all(n > 0 and narrow.op(name)["type"] == "linear" for name, n in sat.items())


@pytest.mark.parametrize("kw", [dict(gemm="int", fuse=False), dict(gemm="float")])
def test_engine_modes_equal_golden(kw):
    prog = program("A", 4)
    x = images(2, seed=12)
    g = golden.run(prog, x)
    e = Engine(prog, **kw).run(x, batch_size=1)
    np.testing.assert_array_equal(e.logits, g.logits)
    assert e.counts == g.counts


def test_grid_equal_to_window_and_log2_engine_equals_golden():
    prog = program("B", 4, softmax_quant="log2")
    last = [op for op in prog.ops if op["type"] == "window_attention"][-1]
    assert last["attrs"]["cyclic_shift"] == 0 and prog.t(last, "tokens").shape[0] == 1
    assert_bit_exact(prog, images(4, seed=3))


def test_narrow_accumulator_counts_saturation_bit_exact():
    prog = program("A", 8, settings={"acc_bits": 18})
    e, _ = assert_bit_exact(prog, images(3, seed=6))
    assert sum(c["acc"] for c in e.counts.values()) > 0


def test_fakequant_swin_tracks_engine_at_8_bits():
    prog = program("A", 8)
    fq = FakeQuantModel(prog)
    x = images(6, seed=7)
    e = Engine(prog).run(x)
    f = fq(x).double().numpy()
    el = e.logits * e.scale
    cos = (el * f).sum(1) / (np.linalg.norm(el, axis=1) * np.linalg.norm(f, axis=1))
    assert cos.min() > 0.98


# ---- the shifted-window mask ------------------------------------------------------------------------

def test_masked_position_gets_probability_exactly_zero_in_engine():
    prog = program("A", 4)
    op = next(o for o in prog.ops if o["type"] == "window_attention" and o["attrs"]["cyclic_shift"])
    at = op["attrs"]
    mask = prog.t(op, "mask").astype(bool)
    tokens = prog.t(op, "tokens")
    P = at["prob_bits"]
    # real activations
    g = golden.run(prog, images(2, seed=8), keep_values=True)
    q, k, v = (g.values[i] for i in op["inputs"])
    p = window_probabilities(prog, op, q, k, v)
    B, nW, H, n, _ = p.shape
    m = np.broadcast_to(mask[None, :, None], p.shape)
    assert m.any() and (p[m] == 0).all()
    assert (p[~m] > 0).any()
    np.testing.assert_array_equal(p, golden.window_probs(prog, op, q, k)[0])
    # adversarial: the masked keys of a query carry the row's largest scores
    w = int(np.nonzero(mask.any(axis=(1, 2)))[0][-1])
    jstar = int(np.nonzero(mask[w, 0])[0][0])
    group = np.nonzero(~mask[w, jstar])[0]                       # positions sharing j*'s region
    assert 0 not in group
    top = (1 << prog.values[op["inputs"][0]]["bits"]) - 1
    q2 = np.full_like(q, top)
    k2 = np.zeros_like(k)
    k2[:, tokens[w, group]] = top
    assert at["zp_q"] < top and at["zp_k"] > 0                    # so the group's scores are the largest
    p2 = window_probabilities(prog, op, q2, k2, v)
    assert (p2[:, w, :, 0, group] == 0).all()
    sums = p2[:, w, :, 0, :].sum(axis=-1)
    assert (np.abs(sums - 2**P) <= n).all()
    # and the masked tokens' values do not reach the query's output
    from intsim.engine import run_op
    v2 = v.copy()
    v2[:, tokens[w, group]] = np.where(v[:, tokens[w, group]] > 0, 0, top)
    y1, _ = run_op(prog, op, q2, k2, v)
    y2, _ = run_op(prog, op, q2, k2, v2)
    np.testing.assert_array_equal(y1[:, tokens[w, 0]], y2[:, tokens[w, 0]])
    assert not np.array_equal(y1[:, tokens[w, group]], y2[:, tokens[w, group]])


# ---- checkpoints and the program format ---------------------------------------------------------------

def test_calibration_from_saved_swin_checkpoint(tmp_path):
    from safetensors.torch import save_file

    from intsim.models.zoo import load_checkpoint, resolve
    model = tiny_swin(CFG_B, seed=11)
    path = tmp_path / "swin.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    torch.manual_seed(99)
    fresh = SwinTransformer(**CFG_B).eval()
    load_checkpoint(fresh, path, resolve("swin_t"))
    cal = images(6, seed=1)
    a = calibrate(model, cal, MEAN, STD, CalibConfig(), progress=False)
    b = calibrate(fresh, cal, MEAN, STD, CalibConfig(), progress=False)
    assert a.header == b.header and a.tensors.keys() == b.tensors.keys()
    for key in a.tensors:
        np.testing.assert_array_equal(a.tensors[key], b.tensors[key])
    assert_bit_exact(b, images(2, seed=9))


def test_window_attention_validation():
    prog = program("B", 4, softmax_quant="log2")
    op = next(o for o in prog.ops if o["type"] == "window_attention")
    bad = Program(prog.header, dict(prog.tensors))
    bad.tensors[f"{op['name']}.mask"] = prog.t(op, "mask")[:, :-1]
    with pytest.raises(ProgramError, match="mask"):
        validate(bad)
    for typ in ("patchify", "patch_merge", "window_attention", "token_pool"):
        assert typ in golden.OPS


@pytest.mark.slow
def test_cli_calibrate_swin_t_from_checkpoint(tmp_path, capsys):
    import timm
    from safetensors.torch import save_file

    from intsim.cli import main
    from intsim.program.format import load
    torch.manual_seed(0)
    m = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False)
    ck = tmp_path / "swin_t.safetensors"
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(ck))
    out = tmp_path / "swin_t.intsim"
    rc = main(["--no-progress", "calibrate", "--model", "swin_t", "--checkpoint", str(ck), "--calib-images", "2",
               "-o", str(out)])
    assert rc == 0
    prog = load(out)
    assert prog.model["arch"] == "swin" and prog.header["provenance"]["weights"] == "checkpoint"
    assert_bit_exact(prog, images(1, 224, seed=1))


_FRESH_SWIN = """
import json, sys
from pathlib import Path

import numpy as np
from intsim.program.format import load
from intsim.engine import Engine, compile_stats
prog = load(sys.argv[1])
shape = tuple(prog.values[prog.header["inputs"][0]]["shape"])
imgs = np.random.default_rng(0).integers(0, 256, (2, *shape), dtype=np.uint8)
Engine(prog).run(imgs)
print(json.dumps(compile_stats()))
"""


@pytest.mark.slow
def test_fresh_process_compiles_no_swin_kernel(tmp_path):
    """compile_stats counts the Swin kernels too: a second fresh process running a Swin program
    compiles nothing and loads the window kernels from the cache."""
    import json
    import os
    import subprocess
    import sys

    from intsim.program.format import save
    path = tmp_path / "swin.intsim"
    save(program("A"), path)
    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")]))

    def fresh():
        r = subprocess.run([sys.executable, "-c", _FRESH_SWIN, str(path)], capture_output=True, text=True,
                           env=env, cwd=str(repo), timeout=1200)
        assert r.returncode == 0, r.stderr[-2000:]
        return json.loads(r.stdout.strip().splitlines()[-1])

    fresh()                                   # fills the cache if needed
    st = fresh()
    assert st["misses"] == 0, st
    assert "window_attention_kernel" in st["loaded"] and "token_pool_kernel" in st["loaded"], st
