"""The clipping experiment (intsim clipping): the zeroing rule and the command."""
import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from intsim.cli import main
from intsim.studies.clipping import zero_fraction


def _softmax_maps(seed: int, b: int, n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 2, n, n, generator=g).mul(3).softmax(-1)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), b=st.integers(1, 3), n=st.integers(2, 9),
       fraction=st.floats(0.001, 0.999), mode=st.sampled_from(["near0", "near1"]))
def test_zero_fraction_zeroes_the_right_values(seed, b, n, fraction, mode):
    p = _softmax_maps(seed, b, n)
    out = zero_fraction(p, fraction, mode)
    size = 2 * n * n
    k = math.ceil(fraction * size)
    for i in range(b):
        src, dst = p[i].flatten(), out[i].flatten()
        changed = dst != src
        assert int(changed.sum()) == k                       # distinct random floats: exactly k zeroed
        assert (dst[changed] == 0).all()
        kept, gone = src[~changed], src[changed]
        if kept.numel():
            # every zeroed value is at the chosen end of the map
            assert (gone.max() <= kept.min()) if mode == "near0" else (gone.min() >= kept.max())
    assert torch.equal(p, _softmax_maps(seed, b, n))            # the input is not modified


def test_zero_fraction_none_is_identity():
    p = _softmax_maps(0, 2, 5)
    assert zero_fraction(p, 0.01, "none") is p
    with pytest.raises(ValueError):
        zero_fraction(p, 0.01, "middle")


@pytest.mark.parametrize("frac", ["0", "1", "-0.5", "1.5"])
def test_bad_fraction(capsys, frac):
    with pytest.raises(SystemExit) as e:              # argparse's range type, before any work
        main(["clipping", "--fraction", frac])
    assert e.value.code == 2
    assert "argument --fraction: expected a number in (0, 1)" in capsys.readouterr().err


def test_clipping_command(capsys, tmp_path):
    out = tmp_path / "clip.json"
    rc = main(["--no-progress", "clipping", "--images", "20", "--calib-images", "8", "--json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "nearest 0" in text and "nearest 1" in text
    rep = json.loads(out.read_text())
    assert rep["wbits"] == rep["abits"] == 4 and rep["images"] == 20
    got = {(r["level"], r["mode"]) for r in rep["results"]}
    assert got == {(lv, m) for lv in ("float", "fakequant") for m in ("none", "near0", "near1")}
    assert all(0 <= r["top1"] <= 1 for r in rep["results"])
