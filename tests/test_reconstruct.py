"""Block-wise reconstruction (calib/reconstruct.py): lower error, same integer guarantees, determinism."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from calib import CalibConfig, calibrate
from calib import reconstruct as R
from calib.common import quantized_block_forward, t32
from calib.vit import calibrate_params
from calib.uniform import quantize_weight
from intsim.engine import Engine
from intsim.program import format as pf
from reference.golden import run as golden_run
from reference.vit import block_forward, embed, params_from_timm
from test_e2e import MEAN, STD, images, tiny_vit

ITERS = 40


def _cfg(bits: int, **kw) -> CalibConfig:
    return CalibConfig(wbits=bits, abits=bits, reconstruct=True, recon_iters=ITERS, recon_images=32, **kw)


def _chain_error(params, mc, imgs) -> list[float]:
    """Relative error of every block's fake-quant output (quantized prefix) against the float model."""
    from dataclasses import replace
    ep = replace(params, patch_w=t32(mc.patch.weight.dequant()).reshape(params.patch_w.shape))
    with torch.no_grad():
        rq, rf = embed(ep, imgs), embed(params, imgs)
        errs = []
        for i, bc in enumerate(mc.blocks):
            rq = quantized_block_forward(bc, rq, i, params.num_heads, params.eps)
            rf = block_forward(params.blocks[i], rf, i, params.num_heads, params.eps)
            errs.append(float(((rq - rf) ** 2).mean() / (rf ** 2).mean()))
    return errs


@pytest.mark.parametrize("bits", [3, 4])
def test_reconstruction_lowers_block_output_error(bits):
    model = tiny_vit(seed=1)
    params = params_from_timm(model, MEAN, STD)
    cfg = _cfg(bits)
    st = cfg.resolved_settings()
    cal, rec = images(16, seed=1), images(32, seed=3)
    with torch.no_grad():
        mc = calibrate_params(params, cal, cfg, st, progress=False)
    mc2, logs = R.reconstruct(params, mc, rec, cfg, st, progress=False)
    assert [lg.name for lg in logs] == ["patch_embed", "blocks.0", "blocks.1", "head"]
    for lg in logs:
        assert lg.final <= lg.calibrated           # the guard: never worse on its data
    assert all(lg.final < 0.95 * lg.calibrated for lg in logs if lg.name.startswith("blocks."))
    # independently: the chained block outputs are closer to the float model's, on the
    # reconstruction images and on images reconstruction never saw
    for imgs in (rec, images(32, seed=11)):
        before, after = _chain_error(params, mc, imgs), _chain_error(params, mc2, imgs)
        assert after[-1] < before[-1], (before, after)
    # weights: every code is the floor or the ceiling of the calibrated code, within the bound
    for i, (b0, b1) in enumerate(zip(mc.blocks, mc2.blocks)):
        for name in ("proj", "fc2"):       # not touched by the reparameterization: same scales
            w0, w1 = getattr(b0, name).weight, getattr(b1, name).weight
            np.testing.assert_array_equal(w0.scale, w1.scale)
            assert np.abs(w1.w - w0.w).max() <= 1
            assert np.abs(w1.w).max() <= (1 << bits) - 1
        for act in ("q_act", "k_act", "v_act", "core", "gelu"):
            a0, a1 = getattr(b0, act), getattr(b1, act)
            assert a1.zero_point == a0.zero_point and a1.bits == a0.bits and a1.scale > 0
        assert b1.res1 >= b0.res1 and b1.res2 >= b0.res2 and b1.fc1_scale >= b0.fc1_scale


@pytest.fixture(scope="module")
def recon_program():
    model = tiny_vit(seed=2)
    return calibrate(model, images(16, seed=1), MEAN, STD, _cfg(4), provenance={"run": "r"}, progress=False,
                     recon_images=images(32, seed=4))


def test_engine_equals_golden_on_reconstructed_program(recon_program):
    x = images(5, seed=6)
    g = golden_run(recon_program, x)
    e = Engine(recon_program).run(x, batch_size=2)
    np.testing.assert_array_equal(e.logits, g.logits)
    assert e.counts == g.counts


def test_reconstructed_program_records_the_stage(recon_program):
    pf.validate(recon_program)
    cal = recon_program.header["provenance"]["calibration"]
    assert cal["reconstruct"] is True and cal["recon_iters"] == ITERS and cal["recon_images"] == 32
    assert "reconstruction" in cal["method"]
    rec = cal["reconstruction"]
    assert rec["num_images"] == 32 and len(rec["images_sha256"]) == 64
    assert [u["unit"] for u in rec["units"]] == ["patch_embed", "blocks.0", "blocks.1", "head"]


def test_calibration_only_program_has_no_reconstruction_fields():
    d = CalibConfig().to_dict()
    assert not any(k.startswith("recon") for k in d)
    assert set(CalibConfig(reconstruct=True).to_dict()) >= {"reconstruct", "recon_images", "recon_iters", "recon_lr"}


def test_reconstruction_is_deterministic(tmp_path):
    model = tiny_vit(seed=3)
    cal, rec = images(12, seed=1), images(24, seed=2)
    cfg = CalibConfig(wbits=3, abits=3, reconstruct=True, recon_iters=24, seed=7)
    for i in range(2):
        prog = calibrate(model, cal, MEAN, STD, cfg, progress=False, recon_images=rec)
        pf.save(prog, tmp_path / f"p{i}.intsim")
    assert (tmp_path / "p0.intsim").read_bytes() == (tmp_path / "p1.intsim").read_bytes()
    other = calibrate(model, cal, MEAN, STD, CalibConfig(wbits=3, abits=3, reconstruct=True, recon_iters=24, seed=8),
                      progress=False, recon_images=rec)
    pf.save(other, tmp_path / "p2.intsim")
    assert (tmp_path / "p2.intsim").read_bytes() != (tmp_path / "p0.intsim").read_bytes()


def test_reconstruction_does_not_change_the_thread_count():
    n = torch.get_num_threads()
    model = tiny_vit(seed=4)
    calibrate(model, images(8, seed=1), MEAN, STD, CalibConfig(reconstruct=True, recon_iters=4, recon_images=8),
              progress=False)
    assert torch.get_num_threads() == n


@pytest.mark.parametrize("kw, match", [
    ({"recon_iters": 0}, "recon_iters"), ({"recon_images": -3}, "recon_images"), ({"recon_batch": 1.5}, "recon_batch"),
    ({"recon_lr": 0.0}, "recon_lr"), ({"recon_lr": 1.5}, "recon_lr"), ({"recon_lr": "big"}, "recon_lr"),
    ({"reconstruct": "yes"}, "reconstruct"), ({"recon_iters": True}, "recon_iters")])
def test_options_are_validated(kw, match):
    with pytest.raises(ValueError, match=match):
        CalibConfig(**kw).validate()


@pytest.mark.parametrize("args, match", [
    (["--recon-iters", "0"], "positive"), (["--recon-lr", "0"], "learning rate"),
    (["--recon-lr", "x"], "learning rate"),
    (["--recon-images", "-1"], "positive")])
def test_cli_rejects_bad_options(capsys, tmp_path, args, match):
    from intsim.cli import main
    with pytest.raises(SystemExit) as e:
        main(["calibrate", "--weights", "random", "--reconstruct", *args, "-o", str(tmp_path / "p.intsim")])
    assert e.value.code == 2 and match in capsys.readouterr().err
    assert not (tmp_path / "p.intsim").exists()


def test_cli_passes_options_into_the_config():
    from intsim.cli import build_parser
    from intsim.options import calib_config
    a = build_parser().parse_args(["calibrate", "--reconstruct", "--recon-iters", "12", "--recon-lr", "0.05",
                                   "--recon-images", "64", "--seed", "3", "-o", "x"])
    c = calib_config(a)
    assert (c.reconstruct, c.recon_iters, c.recon_lr, c.recon_images, c.seed) == (True, 12, 0.05, 64, 3)
    assert calib_config(build_parser().parse_args(["calibrate", "-o", "x"])).reconstruct is False


def test_sweep_keys_reconstructed_points_apart():
    from intsim.cli import build_parser
    from intsim.studies.sweep import grid, point_key
    a = build_parser().parse_args(["sweep", "--bits", "4", "--softmax-quant", "tanq", "--ln-rule", "mosf",
                                   "--reconstruct", "-o", "x"])
    (p,) = grid(a)
    assert p["reconstruct"] is True and point_key(p).endswith("|recon")
    b = build_parser().parse_args(["sweep", "--bits", "4", "--softmax-quant", "tanq", "--ln-rule", "mosf", "-o", "x"])
    (q,) = grid(b)
    assert "reconstruct" not in q and not point_key(q).endswith("|recon")


# ---- the pieces ------------------------------------------------------------------------------

def test_lsq_fake_quant_values_and_gradients():
    from reference.functional import fake_quant_uniform
    torch.manual_seed(0)
    x = (torch.randn(4000) * 3).requires_grad_()
    s = torch.tensor(0.37, requires_grad=True)
    y = R.fq_lsq(x, s, 7, 4)
    torch.testing.assert_close(y.detach(), fake_quant_uniform(x.detach().clone(), float(s.detach()), 7, 4))
    g = torch.randn(4000)
    gx, gs = torch.autograd.grad((y * g).sum(), (x, s))
    v = x.detach() / s.detach()
    code = torch.floor(v + 0.5) + 7
    inside = (code >= 0) & (code <= 15)
    np.testing.assert_array_equal(gx.numpy(), (g * inside).numpy())
    qz = code.clamp(0, 15) - 7
    ref = float((g * torch.where(inside, qz - v, qz)).sum())
    assert float(gs) == pytest.approx(ref, rel=1e-5)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_rounding_variables_start_at_calibration_and_harden_to_floor_or_ceil(bits):
    rng = np.random.default_rng(bits)
    W = rng.normal(size=(12, 40)) * rng.uniform(0.1, 3, size=(12, 1))
    W[5] = 0.0
    W[6] = np.abs(W[6])          # one-sided channel
    r = R._Round(W, bits)
    wq = quantize_weight(W, bits)
    np.testing.assert_array_equal(r.wq.w, wq.w)
    np.testing.assert_array_equal(r.wq.scale, wq.scale)
    assert r.agree_nearest > 0.999
    # at initialization the hardened rounding is calibration's rounding (up to exact float ties)
    assert np.mean(r.result().w == wq.w) > 0.999
    with torch.no_grad():
        r.V.copy_(torch.randn(r.V.shape) * 5)
    out = r.result()
    n = (1 << bits) - 1
    assert np.abs(out.w).max() <= n and np.all(out.w[5] == 0)
    base = np.floor(W / wq.scale[:, None])
    centered_floor = np.clip(base + r.z[:, None], 0, n) - r.z[:, None]
    centered_ceil = np.clip(base + 1 + r.z[:, None], 0, n) - r.z[:, None]
    ok = (out.w == centered_floor) | (out.w == centered_ceil)
    ok[5] = True
    assert ok.all()
    # soft weights lie on the same grid when h is hard
    with torch.no_grad():
        r.V.copy_(torch.where(r.V >= 0, 50.0, -50.0))
    soft = r.soft().detach().double().numpy()
    hard = out.dequant()
    np.testing.assert_allclose(soft, hard, rtol=1e-6, atol=1e-6 * np.abs(hard).max())


def test_swin_is_refused_with_a_clear_message():
    from timm.models.swin_transformer import SwinTransformer
    swin = SwinTransformer(img_size=32, patch_size=4, window_size=4, embed_dim=24, depths=(1,), num_heads=(2,),
                           num_classes=5).eval()
    with pytest.raises(ValueError, match="Swin"):
        calibrate(swin, images(4), MEAN, STD, CalibConfig(reconstruct=True), progress=False)
