"""End to end: calibrate real timm ViTs, then the engine must equal the golden model bit for bit.

The random-weight models get the pathologies of trained ViTs injected (brief section 5): a few
post-LayerNorm channels with 10-100x gamma/beta (outlier channels) and q/k weights scaled up
(sharpened, power-law-like attention).
"""
import numpy as np
import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from calib import CalibConfig, calibrate
from intsim.engine import Engine
from reference.golden import run as golden_run
from reference.fakequant import FakeQuantModel

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def inject_pathologies(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for blk in model.blocks:
            for norm in (blk.norm1, blk.norm2):
                d = norm.weight.numel()
                idx = torch.randperm(d, generator=g)[: max(1, d // 16)]
                factor = 10 + 90 * torch.rand(len(idx), generator=g)
                norm.weight[idx] *= factor
                norm.bias[idx] += factor * 0.1
            dim = blk.attn.qkv.weight.shape[1]
            blk.attn.qkv.weight[: 2 * dim] *= 3.0      # q and k rows: sharper attention
    return model


def tiny_vit(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(img_size=32, patch_size=8, embed_dim=24, depth=2, num_heads=2, num_classes=5)
    cfg.update(kw)
    return inject_pathologies(VisionTransformer(**cfg).eval(), seed)


def images(n, size=32, seed=0):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (n, 3, 1, 1))
    return np.clip(base + rng.normal(0, 40, (n, 3, size, size)), 0, 255).astype(np.uint8)


def assert_bit_exact(prog, x):
    g = golden_run(prog, x)
    e = Engine(prog).run(x, batch_size=3)
    np.testing.assert_array_equal(e.logits, g.logits)
    assert e.counts == g.counts
    return e, g


@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("softmax_quant", ["tanq", "log2", "log2sqrt", "uniform"])
def test_tiny_vit_engine_equals_golden(bits, softmax_quant):
    model = tiny_vit()
    prog = calibrate(model, images(16, seed=1), MEAN, STD,
                     CalibConfig(wbits=bits, abits=bits, softmax_quant=softmax_quant), progress=False)
    assert_bit_exact(prog, images(5, seed=2))


@pytest.mark.parametrize("settings", [{"acc_bits": 16}, {"residual_bits": 10, "gelu_bits": 8},
                                      {"mult_bits": 16, "decode_bits": 8, "exp_frac_bits": 4}])
def test_narrow_precisions_stay_bit_exact_and_count_saturation(settings):
    model = tiny_vit(seed=3)
    prog = calibrate(model, images(16, seed=1), MEAN, STD, CalibConfig(wbits=8, abits=8, settings=settings),
                     progress=False)
    e, _ = assert_bit_exact(prog, images(4, seed=5))
    if settings.get("acc_bits") == 16:
        assert sum(c["acc"] for c in e.counts.values()) > 0


def test_mean_rule_engine_equals_golden():
    prog = calibrate(tiny_vit(seed=4), images(16, seed=1), MEAN, STD, CalibConfig(ln_rule="mean"), progress=False)
    assert_bit_exact(prog, images(4, seed=6))


def test_fakequant_tracks_engine_at_8_bits():
    model = tiny_vit(seed=5)
    prog = calibrate(model, images(16, seed=1), MEAN, STD, CalibConfig(wbits=8, abits=8), progress=False)
    x = images(8, seed=7)
    e = Engine(prog).run(x)
    fq = FakeQuantModel(prog)(x)
    fq = np.asarray(fq.detach() if isinstance(fq, torch.Tensor) else fq, dtype=np.float64)
    el = e.logits * e.scale
    cos = (el * fq).sum(1) / (np.linalg.norm(el, axis=1) * np.linalg.norm(fq, axis=1))
    assert cos.min() > 0.98


@pytest.mark.slow
def test_deit_tiny_random_with_outliers_bit_exact():
    import timm
    torch.manual_seed(0)
    model = inject_pathologies(timm.create_model("deit_tiny_patch16_224", pretrained=False).eval())
    prog = calibrate(model, images(4, 224, seed=1), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225),
                     CalibConfig(wbits=4, abits=4), progress=False)
    assert_bit_exact(prog, images(2, 224, seed=2))
