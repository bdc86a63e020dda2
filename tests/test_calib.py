"""Calibration, reparameterization, the float / fake-quant reference models and the exporter."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from calib import CalibConfig, ExportError, calibrate
from calib import reparam as rp
from intsim.program.builder import check_settings
from intsim.program.fixedpoint import requant, requant_array, rshift
from calib.uniform import params_from_range, qdq, quantize_weight, search_activation
from intsim.program import format as pf
from intsim.program.quantizers import from_dict
from reference.fakequant import FakeQuantModel
from reference.vit import forward, params_from_timm, point_names

MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)


def _mini(seed: int = 0, **kw) -> VisionTransformer:
    torch.manual_seed(seed)
    cfg = dict(img_size=32, patch_size=8, embed_dim=24, depth=2, num_heads=2, num_classes=5)
    cfg.update(kw)
    m = VisionTransformer(**cfg).eval()
    # timm initializes the head / LN affine near trivial values; make the model less degenerate
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif "norm" in name and name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            elif name.startswith("head."):
                p.copy_(0.3 * torch.randn_like(p))
    return m


def _cifar(seed: int = 0) -> VisionTransformer:
    torch.manual_seed(seed)
    return VisionTransformer(img_size=32, patch_size=4, embed_dim=192, depth=6, num_heads=3, mlp_ratio=4,
                             num_classes=10).eval()


def _images(n: int, seed: int = 0, size: int = 32) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 3, size, size), dtype=np.uint8)


def _timm_logits(model, images: np.ndarray, mean, std) -> torch.Tensor:
    x = torch.from_numpy(images).float() / 255.0
    x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        return model(x)


def _add_outliers(model, seed: int = 0) -> None:
    """Scale a few LayerNorm gamma/beta channels by 10..100 (the post-LN outlier pathology)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, torch.nn.LayerNorm):
                D = mod.weight.shape[0]
                idx = torch.randperm(D, generator=g)[:3]
                f = torch.tensor([10.0, 40.0, 100.0])
                mod.weight[idx] *= f
                mod.bias[idx] = mod.bias[idx] * f + f * 0.05


def _cos(a, b) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.fixture(scope="module")
def mini_program():
    m = _mini()
    return m, calibrate(m, _images(16), MEAN, STD, CalibConfig(wbits=8, abits=8), progress=False)


# ---- reference/vit.py ---------------------------------------------------------------------

@pytest.mark.parametrize("make", [_mini, _cifar, lambda: _mini(init_values=0.3), lambda: _mini(qkv_bias=False)],
                         ids=["mini", "cifar", "layerscale", "no-qkv-bias"])
def test_identity_forward_equals_timm(make):
    m = make()
    imgs = _images(4, seed=3)
    ref = _timm_logits(m, imgs, MEAN, STD)
    out = forward(params_from_timm(m, MEAN, STD), imgs)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


def test_hook_points_in_forward_order():
    m = _mini()
    seen = []
    forward(params_from_timm(m, MEAN, STD), _images(2), hook=lambda n, x: (seen.append((n, tuple(x.shape))), x)[1])
    assert [n for n, _ in seen] == point_names(2)
    shapes = dict(seen)
    assert shapes["blocks.0.attn.probs"] == (2, 2, 17, 17)
    assert shapes["blocks.1.mlp.gelu"] == (2, 17, 96)
    assert shapes["norm"] == (2, 1, 24)


def test_unsupported_model_is_rejected():
    with pytest.raises(ValueError, match="global_pool"):
        params_from_timm(_mini(global_pool="avg"), MEAN, STD)


# ---- reparameterization ---------------------------------------------------------------------

@pytest.mark.parametrize("rule", ["mosf", "mean"])
@pytest.mark.parametrize("outliers", [False, True])
def test_reparameterization_keeps_float_output(rule, outliers):
    m = _mini(seed=1)
    if outliers:
        _add_outliers(m)
    params = params_from_timm(m, MEAN, STD)
    imgs = _images(8, seed=2)
    ref = forward(params, imgs)
    new, reps = rp.reparameterize(params, imgs, bits=4, rule=rule)
    out = forward(new, imgs)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
    assert set(reps) == {"blocks.0.norm1", "blocks.0.norm2", "blocks.1.norm1", "blocks.1.norm2", "norm"}
    for r in reps.values():
        assert isinstance(r.z, int) and 0 <= r.z <= 15
        if outliers:   # the ratios really moved something
            assert r.r1.max() / r.r1.min() > 5
    # the transformed LN outputs quantize per-tensor exactly as the originals did per channel
    r = reps["blocks.0.norm1"]
    y = np.random.default_rng(0).normal(size=(500, r.s_c.shape[0])) * r.s_c * 3
    per_channel = np.clip(np.floor(y / r.s_c + 0.5) + r.z_c, 0, 15)
    per_tensor = np.clip(np.floor(rp.transform(y, r) / r.s + 0.5) + r.z, 0, 15)
    assert np.mean(per_channel == per_tensor) > 0.999


def test_mosf_is_median_and_robust_to_outliers():
    s_c = np.array([1.0, 1.1, 0.9, 1.05, 50.0])
    z_c = np.array([7, 8, 7, 8, 3])
    mosf, mean = rp.shared(s_c, z_c, "mosf"), rp.shared(s_c, z_c, "mean")
    assert mosf.s == pytest.approx(1.05) and mosf.z == 7
    assert mean.s == pytest.approx(np.mean(s_c)) and mean.z == int(np.floor(np.mean(z_c) + 0.5))
    # MOSF minimizes the sum of absolute deviations
    cands = np.linspace(0.5, 60, 2000)
    assert np.sum(np.abs(s_c - mosf.s)) <= np.min(np.abs(s_c[None] - cands[:, None]).sum(1)) + 1e-9
    with pytest.raises(ValueError):
        rp.shared(s_c, z_c, "max")


# ---- uniform quantizers -----------------------------------------------------------------------

def test_activation_and_weight_quantizers():
    s, z = params_from_range(-1.0, 3.0, 4)
    assert s == pytest.approx(4.0 / 15) and int(z) == 4
    s, z = params_from_range(0.5, 3.0, 4)        # the range always holds 0
    assert int(z) == 0 and s == pytest.approx(0.2)
    x = np.random.default_rng(0).standard_t(3, size=20000)
    q = search_activation(x, 4)
    assert isinstance(q.zero_point, int) and 0 <= q.zero_point <= 15
    full_s, full_z = params_from_range(x.min(), x.max(), 4)
    assert np.sum((q.qdq(x) - x) ** 2) <= np.sum((qdq(x, full_s, full_z, 4) - x) ** 2)
    W = np.random.default_rng(1).normal(size=(16, 40))
    W[3] = 0.0
    wq = quantize_weight(W, 4)
    assert wq.w.shape == W.shape and np.abs(wq.w).max() <= 15 and np.all(wq.scale > 0)
    assert np.all(wq.w[3] == 0)
    assert np.abs(wq.dequant() - W).max() < np.abs(W).max() / 4


# ---- fixed point --------------------------------------------------------------------------

def test_requant_multiplier_and_shift():
    assert requant(1.0 - 2.0 ** -40, 32) == (1 << 30, 30)        # rounds up to 2^31: halve, bump exponent
    assert requant(0.5, 32) == (1 << 30, 31)
    m, n = requant(2.0 ** -100, 32)
    assert n == 62 and m == 0
    with pytest.raises(ExportError):
        requant(2.0 ** 31, 32)
    with pytest.raises(ExportError):
        requant(0.0, 32)
    M = np.exp(np.random.default_rng(0).uniform(-20, 20, 5000))   # shifts 10..60
    m, n = requant_array(M, 32)
    assert np.all((m >= 1 << 30) & (m < 1 << 31)) and np.all((n >= 0) & (n <= 62))
    approx = m.astype(np.float64) * 2.0 ** (-n.astype(np.float64))
    assert np.all(np.abs(approx / M - 1) <= 2.0 ** -30)
    small = M[M < 2.0 ** 14][:50]
    assert [requant(float(x), 16) for x in small] == list(zip(*[a.tolist() for a in requant_array(small, 16)]))
    with pytest.raises(ExportError):
        requant_array(np.array([1.0, 2.0 ** 15]), 16)
    assert rshift(-3, 1) == -1 and rshift(-5, 1) == -2 and rshift(5, 1) == 3 and rshift(7, 0) == 7


def test_settings_are_checked():
    with pytest.raises(ValueError):
        CalibConfig(settings={"acc_bitz": 32}).resolved_settings()
    with pytest.raises(ValueError):
        CalibConfig(wbits=4, settings={"wbits": 8}).resolved_settings()
    with pytest.raises(ValueError):
        CalibConfig(softmax_quant="log3").validate()
    # the spec's bounds on the settings (section 8) hold already in the configuration, before any
    # calibration work, with the loader's own check
    with pytest.raises(ExportError, match="acc_bits \\+ mult_bits = 72 > 64"):
        CalibConfig(settings={"acc_bits": 40}).resolved_settings()
    with pytest.raises(ExportError, match="prob_bits \\+ recip_frac must be <= 48"):
        CalibConfig(abits=6, settings={"prob_bits": 20, "recip_frac": 30}).validate()
    s = CalibConfig(abits=6, settings={"prob_bits": 18, "recip_frac": 30}).resolved_settings()
    assert s["abits"] == 6
    check_settings(s)


# ---- calibration + export -----------------------------------------------------------------

@pytest.mark.parametrize("sq", ["uniform", "log2", "log2sqrt", "tanq", "adalog", "sulq", "twin"])
@pytest.mark.parametrize("rule", ["mosf", "mean"])
def test_exported_programs_validate(sq, rule, tmp_path):
    m = _mini(seed=2)
    _add_outliers(m, seed=2)
    cfg = CalibConfig(wbits=4, abits=4, softmax_quant=sq, ln_rule=rule, settings={"gelu_bits": 10})
    prog = calibrate(m, _images(8, seed=4), MEAN, STD, cfg, provenance={"model": "mini"}, progress=False)
    pf.validate(prog)
    pf.save(prog, tmp_path / "p.intsim")
    back = pf.load(tmp_path / "p.intsim")
    assert pf.header_json(back.header) == pf.header_json(prog.header)
    assert back.settings["gelu_bits"] == 10 and back.settings["wbits"] == 4
    assert back.header["provenance"]["model"] == "mini"
    assert back.header["provenance"]["calibration"]["softmax_quant"] == sq
    att = back.op("blocks.0.attn.core")
    q = from_dict(att["attrs"]["softmax_quant"])
    assert q.type == sq and q.bits == 4
    np.testing.assert_array_equal(back.t(att, "levels"), q.levels())


def test_program_structure(mini_program):
    m, prog = mini_program
    names = [op["name"] for op in prog.ops]
    expect = ["patch_embed"]
    for i in range(2):
        p = f"blocks.{i}"
        expect += [f"{p}.norm1", f"{p}.attn.q", f"{p}.attn.k", f"{p}.attn.v", f"{p}.attn.core", f"{p}.attn.proj",
                   f"{p}.add1", f"{p}.norm2", f"{p}.mlp.fc1", f"{p}.mlp.gelu", f"{p}.mlp.fc2", f"{p}.add2"]
    assert names == expect + ["norm", "head"]
    assert all(op["output"] == op["name"] for op in prog.ops)
    assert prog.header["inputs"] == ["image"] and prog.output == "head"
    md = prog.model
    assert (md["arch"], md["img_size"], md["patch_size"], md["embed_dim"], md["depth"], md["num_heads"],
            md["num_classes"], md["num_tokens"]) == ("vit", 32, 8, 24, 2, 2, 5, 17)
    v = prog.values
    assert v["image"]["kind"] == "image" and v["image"]["shape"] == [3, 32, 32]
    assert v["head"]["kind"] == "int" and v["head"]["shape"] == [1, 5] and v["head"]["bits"] == 16
    assert v["blocks.0.mlp.fc1"]["kind"] == "int" and v["blocks.0.mlp.fc1"]["bits"] == 12
    assert v["blocks.0.attn.proj"]["scale"] == v["blocks.0.add1"]["scale"]
    for name, info in v.items():
        assert isinstance(info["zero_point"], int)
        if info["kind"] == "codes":
            assert info["bits"] == 8 and 0 <= info["zero_point"] <= 255
    # the shared post-LN zero point is an integer, in the LN op and in the value table
    for op in prog.ops:
        if op["type"] == "layernorm":
            zp = op["attrs"]["zp"]
            assert isinstance(zp, int) and zp == v[op["name"]]["zero_point"]
            assert isinstance(op["attrs"]["shift"], int) and 0 <= op["attrs"]["shift"] <= 62


def test_linear_constants_follow_the_spec(mini_program):
    _, prog = mini_program
    op = prog.op("blocks.1.attn.q")
    x, y = prog.values["blocks.1.norm1"], prog.values["blocks.1.attn.q"]
    w, s_w = prog.t(op, "w").astype(np.int64), prog.t(op, "w_scale")
    b = prog.t(op, "bias_float").astype(np.float64)
    bias = np.floor(b / (x["scale"] * s_w) + 0.5).astype(np.int64) - x["zero_point"] * w.sum(1)
    np.testing.assert_array_equal(prog.t(op, "bias"), bias)
    M = x["scale"] * s_w / y["scale"]
    approx = prog.t(op, "mult") * 2.0 ** -prog.t(op, "shift").astype(np.float64)
    np.testing.assert_allclose(approx, M, rtol=2.0 ** -30)
    assert np.all(prog.t(op, "zp") == y["zero_point"]) and (op["attrs"]["lo"], op["attrs"]["hi"]) == (0, 255)
    head = prog.op("head")
    assert np.all(prog.t(head, "zp") == 0) and (head["attrs"]["lo"], head["attrs"]["hi"]) == (-32768, 32767)
    att = prog.op("blocks.0.attn.core")
    a = att["attrs"]
    assert prog.t(att, "exp_table")[0] == 2 ** 16 and prog.t(att, "exp_table").shape == (256,)
    d = 12
    M = (prog.values["blocks.0.attn.q"]["scale"] * prog.values["blocks.0.attn.k"]["scale"] / math.sqrt(d)
         * 256 / math.log(2))
    assert a["score_mult"] * 2.0 ** -a["score_shift"] == pytest.approx(M, rel=2.0 ** -30)
    assert prog.t(prog.op("blocks.0.mlp.gelu"), "table").shape == (4096,)


def test_fake_quant_8bit_close_to_float(mini_program):
    m, prog = mini_program
    imgs = _images(16, seed=7)
    ref = forward(params_from_timm(m, MEAN, STD), imgs)
    out = FakeQuantModel(prog)(imgs)
    assert out.shape == (16, 5)
    assert _cos(out, ref) > 0.99


@pytest.mark.slow
def test_fake_quant_8bit_close_to_float_cifar_size():
    m = _cifar()
    imgs = _images(16, seed=5)
    prog = calibrate(m, imgs, MEAN, STD, CalibConfig(wbits=8, abits=8), progress=False)
    test = _images(8, seed=6)
    assert _cos(FakeQuantModel(prog)(test), forward(params_from_timm(m, MEAN, STD), test)) > 0.99


def test_calibration_is_deterministic(tmp_path):
    m = _mini(seed=3)
    _add_outliers(m, seed=3)
    imgs = _images(12, seed=8)
    for i in range(2):
        prog = calibrate(m, imgs, MEAN, STD, CalibConfig(seed=5), provenance={"run": "x"}, progress=False)
        pf.save(prog, tmp_path / f"p{i}.intsim")
    assert (tmp_path / "p0.intsim").read_bytes() == (tmp_path / "p1.intsim").read_bytes()


def test_calibration_path_matches_fake_quant_model():
    """The fake-quant path calibration feeds forward (sequential mode) is FakeQuantModel's semantics."""
    from calib.common import quantized_block_forward
    from calib.vit import build_program, calibrate_params

    m = _mini(seed=4)
    imgs = _images(6, seed=10)
    cfg = CalibConfig(wbits=4, abits=4)
    params = params_from_timm(m, MEAN, STD)
    mc = calibrate_params(params, imgs, cfg, cfg.resolved_settings(), progress=False)
    prog = build_program(mc, cfg.resolved_settings(), {})
    seen = {}
    FakeQuantModel(prog)(imgs, tap=lambda n, x: seen.__setitem__(n, x))
    r = seen["patch_embed"]
    for i, bc in enumerate(mc.blocks):
        r = quantized_block_forward(bc, r, i, params.num_heads, params.eps)
        torch.testing.assert_close(r, seen[f"blocks.{i}.add2"], rtol=1e-5, atol=1e-5)


def test_float_path_calibration(tmp_path):
    m = _mini(seed=5)
    prog = calibrate(m, _images(8, seed=11), MEAN, STD, CalibConfig(wbits=8, abits=8, sequential=False), progress=False)
    pf.save(prog, tmp_path / "f.intsim")
    imgs = _images(8, seed=12)
    assert _cos(FakeQuantModel(pf.load(tmp_path / "f.intsim"))(imgs), forward(params_from_timm(m, MEAN, STD), imgs)) > 0.99


def test_calibration_rejects_bad_images():
    m = _mini()
    with pytest.raises(ValueError, match="uint8"):
        calibrate(m, _images(2).astype(np.float32), MEAN, STD, progress=False)
    with pytest.raises(ValueError, match="32"):
        calibrate(m, _images(2, size=64), MEAN, STD, progress=False)


def test_golden_model_agrees_with_fake_quant(mini_program):
    golden = pytest.importorskip("reference.golden")
    m, prog = mini_program
    imgs = _images(6, seed=9)
    res = golden.run(prog, imgs)
    fq = FakeQuantModel(prog)(imgs).numpy()
    assert _cos(res.logits * res.scale, fq) > 0.99


# ---- the fake-quant-only per-channel post-LN rule ("channel") ----------------------------------

@pytest.mark.parametrize("rule", ["mosf", "mean"])
def test_state_fake_quant_logits_equal_program_fake_quant(rule):
    """calib.vit.fakequant_logits (the state's fake-quant model, which the 'channel' rule is
    evaluated with) equals FakeQuantModel of the program exported from the same state."""
    from calib.vit import build_program, calibrate_params, fakequant_logits

    m = _mini(seed=5)
    _add_outliers(m)
    imgs = _images(8, seed=11)
    cfg = CalibConfig(wbits=4, abits=4, ln_rule=rule)
    params = params_from_timm(m, MEAN, STD)
    mc = calibrate_params(params, imgs, cfg, cfg.resolved_settings(), progress=False)
    prog = build_program(mc, cfg.resolved_settings(), {})
    with torch.no_grad():
        got = fakequant_logits(mc, params, imgs)
    torch.testing.assert_close(got, FakeQuantModel(prog)(imgs), rtol=1e-5, atol=1e-5)


def test_channel_rule_quantizes_each_post_ln_channel_on_its_own():
    from calib.vit import calibrate_params, channelwise_fakequant

    m = _mini(seed=6)
    _add_outliers(m)
    imgs = _images(8, seed=12)
    cfg = CalibConfig(wbits=8, abits=8, ln_rule="channel")
    params = params_from_timm(m, MEAN, STD)
    mc = calibrate_params(params, imgs, cfg, cfg.resolved_settings(), progress=False)
    for ln in [b.norm1 for b in mc.blocks] + [b.norm2 for b in mc.blocks] + [mc.norm]:
        assert ln.reparam is None and ln.act.scale.shape == (24,) and ln.act.zero_point.shape == (24,)
    # the LN affine and the consumers are the float model's (no reparameterization)
    np.testing.assert_array_equal(mc.blocks[0].norm1.gamma, params.blocks[0].norm1_w.double().numpy())
    # at 8 bits the per-channel model tracks the float model closely, outliers and all
    lg = channelwise_fakequant(m, imgs, MEAN, STD, cfg, imgs)
    assert _cos(lg, _timm_logits(m, imgs, MEAN, STD).numpy()) > 0.995


def test_channel_rule_has_no_program():
    m = _mini()
    with pytest.raises(ValueError, match="no integer program"):
        calibrate(m, _images(4), MEAN, STD, CalibConfig(ln_rule="channel"), progress=False)
    with pytest.raises(ValueError, match="reconstruction"):
        CalibConfig(ln_rule="channel", reconstruct=True).validate()
    from calib.vit import channelwise_fakequant
    with pytest.raises(ValueError, match="channel"):
        channelwise_fakequant(m, _images(4), MEAN, STD, CalibConfig(ln_rule="mosf"), _images(2))


def test_architecture_registry_dispatches_vit():
    from calib import archs
    model = _mini(depth=1)
    arch = archs.for_model(model)
    assert arch is archs.VIT and arch.supports("reconstruction") and arch.title == "ViT / DeiT"
    prog = calibrate(model, _images(4), MEAN, STD, CalibConfig(), progress=False)
    assert archs.for_program(prog) is archs.VIT and prog.header["export"] == {"bias_saturated": {}}
    assert isinstance(arch.fakequant_model(prog), FakeQuantModel)
    with pytest.raises(ValueError, match="unsupported model Linear"):
        archs.for_model(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="unknown architecture 'convnet'"):
        archs.for_program(pf.Program({"model": {"arch": "convnet"}}))
    with pytest.raises(ValueError, match="unknown feature"):
        arch.supports("distillation")
