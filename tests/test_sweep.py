"""intsim sweep end to end on the bundled model (few images): rows, resume, the fake-quant-only rule."""
import json

import pytest

from intsim.cli import main

ARGS = ["--no-progress", "sweep", "--bits", "4", "--softmax-quant", "tanq", "--ln-rule", "mosf,channel",
        "--images", "16", "--calib-images", "8", "--golden-images", "4"]


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    assert main(ARGS + ["-o", str(out)]) == 0
    return out


def test_rows_and_files(swept):
    rows = {r["key"]: r for r in json.loads((swept / "results.json").read_text())["points"]}
    assert set(rows) == {"W4A4|tanq|mosf|", "W4A4|tanq|channel|"}
    full = rows["W4A4|tanq|mosf|"]
    assert full["engine_vs_golden.logits_differing"] == 0 and full["engine_vs_golden.images"] == 4
    assert full["cost.bops"] > 0 and 0 <= full["engine.top1"] <= 1 and 0 <= full["fakequant.top1"] <= 1
    ch = rows["W4A4|tanq|channel|"]
    assert ch["fakequant_only"] is True and "engine.top1" not in ch and 0 <= ch["fakequant.top1"] <= 1
    assert ch["float.top1"] == full["float.top1"]
    header = (swept / "results.csv").read_text().splitlines()[0].split(",")
    assert "fakequant.top1" in header and "cost.bops" in header
    assert (swept / "accuracy_vs_bops.png").stat().st_size > 0


def test_rerun_resumes(swept, capsys):
    log = swept / "results.jsonl"
    lines = log.read_text().splitlines()
    log.write_text(lines[0] + "\n" + lines[1][: len(lines[1]) // 2])      # the second point was cut off
    capsys.readouterr()
    assert main(ARGS + ["-o", str(swept)]) == 0
    out = capsys.readouterr().out
    assert "2 points, 1 already done" in out and "1 to run" in out
    assert len(json.loads((swept / "results.json").read_text())["points"]) == 2
    assert main(ARGS + ["-o", str(swept)]) == 0
    assert "2 already done" in capsys.readouterr().out


def test_bad_grid(tmp_path, capsys):
    assert main(["sweep", "--ln-rule", "median", "-o", str(tmp_path)]) == 2
    assert "unknown LN rule" in capsys.readouterr().err
    assert main(["sweep", "--ln-rule", "channel", "--reconstruct", "-o", str(tmp_path)]) == 2
    assert "channel" in capsys.readouterr().err


def test_streamed_evaluation_matches_in_memory(swept, tmp_path, monkeypatch):
    """Above the in-memory limit the images are decoded chunk by chunk per point; the rows are the
    same, and ``--golden-images all`` runs the golden model on every image."""
    from intsim.studies import sweep
    monkeypatch.setattr(sweep, "IN_MEMORY_BYTES", 0)
    args = [a if a != "4" or i != ARGS.index("--golden-images") + 1 else "all" for i, a in enumerate(ARGS)]
    assert main(args + ["-o", str(tmp_path)]) == 0
    got = {r["key"]: r for r in json.loads((tmp_path / "results.json").read_text())["points"]}
    ref = {r["key"]: r for r in json.loads((swept / "results.json").read_text())["points"]}
    assert set(got) == set(ref)
    for key, r in got.items():
        for k in ("float.top1", "fakequant.top1", "engine.top1", "fakequant.agree_float", "images"):
            if k in ref[key]:
                assert r[k] == ref[key][k], (key, k)
    assert got["W4A4|tanq|mosf|"]["engine_vs_golden.images"] == 16
    assert got["W4A4|tanq|mosf|"]["engine_vs_golden.logits_differing"] == 0


def test_golden_images_argument(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["sweep", "--golden-images", "-3", "-o", str(tmp_path)])
    assert e.value.code == 2 and "--golden-images" in capsys.readouterr().err


@pytest.mark.parametrize("bad", [["--images", "-1"], ["--images", "0"], ["--batch-size", "0"],
                                 ["--calib-images", "0"], ["--jobs", "0"], ["--recon-iters", "-1"],
                                 ["--recon-images", "0"], ["--recon-lr", "0"], ["--shards", "0"],
                                 ["--unit-index", "-1"]])
def test_bad_numbers_rejected_before_any_work(tmp_path, capsys, bad):
    out = tmp_path / "s"
    with pytest.raises(SystemExit) as e:
        main(["sweep", *bad, "-o", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and f"argument {bad[0]}" in err[-1]
    assert not out.exists()


def test_foreign_folder_refused(tmp_path, capsys):
    (tmp_path / "cat.png").write_bytes(b"not really")
    assert main(ARGS[1:] + ["-o", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "not a sweep folder" in err and len(err.splitlines()) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["cat.png"]


def test_folder_records_config_and_refuses_other_options(swept, capsys):
    rec = json.loads((swept / "sweep.json").read_text())
    assert rec["config"]["images"] == 16 and rec["config"]["calib_images"] == 8 and rec["config"]["data"] is None
    assert rec["config"]["golden_images"] == 4 and rec["grid"]["ln_rule"] == ["mosf", "channel"]
    assert rec["grid"]["points"] == ["W4A4|tanq|mosf|", "W4A4|tanq|channel|"]
    before = (swept / "results.jsonl").read_text()
    for change, flag in ((["--images", "8"], "--images"), (["--calib-images", "4"], "--calib-images"),
                         (["--seed", "1"], "--seed"), (["--batch-size", "32"], "--batch-size")):
        assert main(ARGS + change + ["-o", str(swept)]) == 2
        err = capsys.readouterr().err.strip()
        assert flag in err and "there" in err and len(err.splitlines()) == 1, err
    assert main(ARGS + ["--data", str(swept), "-o", str(swept)]) == 2
    assert "--data None there" in capsys.readouterr().err
    assert (swept / "results.jsonl").read_text() == before


def test_hw_columns_and_plots(tmp_path, capsys):
    """--hw adds intsim hw's cycles and energy per point (the same figures as intsim hw on the same
    program) and the accuracy-vs-energy / -cycles plots; a bad array spec is refused by argparse."""
    from intsim.program.format import load
    from intsim.studies.hw import hw_cost
    from intsim.studies.plots import SWEEP_HW_PNGS
    args = ["--no-progress", "sweep", "--bits", "4", "--softmax-quant", "tanq", "--ln-rule", "mosf", "--images", "8",
            "--calib-images", "4", "--hw", "64x64:os"]
    out = tmp_path / "hw"
    assert main(args + ["-o", str(out)]) == 0
    row = json.loads((out / "results.json").read_text())["points"][0]
    assert row["hw.array"] == "64x64:os" and row["hw.cycles"] > 0 and row["hw.energy_uj"] > 0
    assert main(["--no-progress", "calibrate", "--bits", "4", "--calib-images", "4", "-o", str(tmp_path / "p")]) == 0
    total = hw_cost(load(tmp_path / "p"), {"array": "64x64", "dataflow": "os"})["total"]
    assert row["hw.cycles"] == total["cycles"] and row["hw.energy_uj"] == pytest.approx(total["energy_uj"], rel=1e-12)
    assert all((out / f).stat().st_size > 0 for f in SWEEP_HW_PNGS)
    capsys.readouterr()
    for bad, message in (("0x4", "positive rows and columns"), ("32x32:xs", "dataflow must be one of")):
        with pytest.raises(SystemExit) as e:
            main(args[:-1] + [bad, "-o", str(tmp_path / "bad")])
        assert e.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
