"""``intsim bench``: option errors, and one small end-to-end run on the bundled CIFAR model's shape."""
from __future__ import annotations

import json

import pytest

from intsim.cli import main


@pytest.mark.parametrize("args,message", [
    (["--models", "no_such_model"], "unknown model 'no_such_model'"),
    (["--batch-sizes", "0"], "--batch-sizes must be positive integers, got '0'"),
    (["--batch-sizes", "8,x"], "--batch-sizes must be positive integers, got 'x'"),
    (["--repeats", "0"], "argument --repeats: expected a positive integer, not 0"),
    (["--threads", "0"], "argument --threads: expected a positive integer, not 0"),
    (["--golden-images", "-1"], "argument --golden-images: expected a positive integer, not -1"),
    (["--skip", "int8,gpu"], "--skip: unknown part(s) gpu"),
])
def test_bad_options_exit_2_before_any_work(args, message, capsys):
    try:
        rc = main(["bench", "--models", "cifar10_vit_d6", *args])       # a later --models wins
    except SystemExit as e:                                              # argparse's range types
        rc = e.code
    assert rc == 2
    err = capsys.readouterr().err
    assert message in err
    assert "benchmarking" not in err


def test_small_run_reports_ratios_and_exactness(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = main(["bench", "--models", "cifar10_vit_d6", "--batch-sizes", "1,4", "--repeats", "2",
               "--calib-images", "2", "--threads", "1", "--skip", "rss", "--json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "engine vs torch int8 (median of paired rounds" in text
    res = json.loads(out.read_text())
    m = res["models"]["cifar10_vit_d6"]
    assert set(m["rows"]) == {"torch f32", "torch int8", "fake-quant", "engine"}
    for row in m["rows"].values():
        for B in ("1", "4"):
            cell = row[B]
            assert len(cell["times_s"]) == 2 and cell["images_per_s"] > 0 and cell["speed_vs_torch_f32"] > 0
    assert m["rows"]["torch f32"]["4"]["speed_vs_torch_f32"] == 1.0
    assert m["rows"]["engine"]["4"]["speed_vs_torch_int8"] > 0
    assert "speed_vs_torch_int8" not in m["rows"]["torch f32"]["4"]
    assert m["engine_equals_golden"] is True
    assert m["routes"] and m["calibration_s"] > 0
    # a fresh process with the cache this process warmed compiles nothing
    fresh = m["fresh_process"]
    assert "error" not in fresh, fresh
    assert fresh["compiled"] == 0
