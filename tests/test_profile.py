"""intsim profile: the post-LayerNorm channel range profile (max / median per point)."""
import json

from intsim.cli import main


def test_profile_bundled_and_stress(tmp_path, capsys):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    assert main(["--no-progress", "profile", "--images", "16", "--json", str(a)]) == 0
    assert main(["--no-progress", "profile", "--model", "cifar10_vit_d6_stress", "--images", "16",
                 "--json", str(b)]) == 0
    out = capsys.readouterr().out
    assert "blocks.5.norm2" in out and "widest / median" in out
    pa, pb = json.loads(a.read_text()), json.loads(b.read_text())
    names = [f"blocks.{i}.norm{j}" for i in range(6) for j in (1, 2)] + ["norm"]
    assert list(pa["points"]) == list(pb["points"]) == names
    for v in pa["points"].values():
        assert v["max"] >= v["median"] > 0 and abs(v["max_over_median"] - v["max"] / v["median"]) < 1e-9
    # the stress variant's outlier channels (10x-50x) widen every point's widest channel
    assert pb["max_over_median"]["min"] > 2 * pa["max_over_median"]["max"]


def test_profile_rejects_swin(capsys):
    assert main(["--no-progress", "profile", "--model", "swin_t", "--weights", "random", "--images", "1"]) == 2
    assert "Swin" in capsys.readouterr().err
