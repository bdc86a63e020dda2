"""The stress variant is function-preserving and does create outlier channels."""
import copy

import numpy as np
import torch

from intsim.models import cifar_model
from intsim.models.stress import StressProfile, apply_stress, channel_range_profile


def test_stress_preserves_function_and_widens_channels():
    torch.manual_seed(0)
    model = cifar_model.build().eval()
    stressed = copy.deepcopy(model)
    factors = apply_stress(stressed, StressProfile(seed=1))
    assert len(factors) == 2 * len(model.blocks) + 1
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        a, b = model(x), stressed(x)
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    assert (a.argmax(1) == b.argmax(1)).all()
    before = channel_range_profile(model, x)
    after = channel_range_profile(stressed, x)
    assert max(v["max_over_median"] for v in after.values()) > 8
    assert max(v["max_over_median"] for v in after.values()) > 2 * max(v["max_over_median"] for v in before.values())


def test_profile_is_seeded():
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    p = StressProfile(seed=3)
    assert torch.equal(p.draw(64, g1), p.draw(64, g2))
    k = p.draw(200, torch.Generator().manual_seed(0))
    assert (k >= 10).sum() == 6 and k.min() > 0.2


def test_bundled_stress_variant_matches_bundled_model_on_bundled_images():
    """The registered stress variant, with the bundled weights, on bundled test images: logits equal
    to float tolerance, top-1 agreement 100% (issue 8)."""
    from intsim.data import Transform, load_images
    from intsim.evaluate import run_float
    from intsim.models import zoo

    model, spec, _ = zoo.load_model("cifar10_vit_d6")
    stressed, _, info = zoo.load_model("cifar10_vit_d6_stress")
    assert "stress_profile" in info
    cfg = zoo.data_config(spec)
    images = load_images(None, Transform(cfg["input_size"][-1]), 128).images
    a = run_float(model, images, cfg["mean"], cfg["std"], 64, False).logits
    b = run_float(stressed, images, cfg["mean"], cfg["std"], 64, False).logits
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4)
    assert (a.argmax(1) == b.argmax(1)).all()
