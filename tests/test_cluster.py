"""Work units and the submitit executors (issue 23) on the bundled model with very few images:
a sharded point equals the whole point, plan keys are stable, bad input exits 2 before any work."""
import builtins
import csv
import json

import pytest

from intsim.cli import main

GRID = ["--bits", "4", "--softmax-quant", "tanq", "--ln-rule", "mosf", "--images", "16", "--calib-images", "8",
        "--golden-images", "12", "--batch-size", "8"]
TIMING = ("calibration_s", ".seconds", ".images_per_s")


def _rows(folder):
    with open(folder / "results.csv") as f:
        return list(csv.DictReader(f))


def test_plan_keys_stable_when_grid_grows(tmp_path, capsys):
    assert main(["sweep", *GRID, "--shards", "2", "--plan", "-o", str(tmp_path)]) == 0
    first = json.loads((tmp_path / "plan.json").read_text())["units"]
    grown = [a if a != "4" else "8,4,3" for a in GRID]
    assert main(["sweep", *grown, "--softmax-quant", "tanq,log2", "--shards", "2", "--plan", "-o", str(tmp_path)]) == 0
    second = {u["key"]: u["file"] for u in json.loads((tmp_path / "plan.json").read_text())["units"]}
    assert len(second) == 12
    assert {u["key"]: u["file"] for u in first}.items() <= second.items()
    assert [u["key"] for u in first] == ["W4A4|tanq|mosf|#1/2", "W4A4|tanq|mosf|#2/2"]
    assert main(["sweep", *GRID, "--shards", "3", "--plan", "-o", str(tmp_path)]) == 2
    assert "planned with --shards 2" in capsys.readouterr().err


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    out = tmp_path_factory.mktemp("whole")
    assert main(["--no-progress", "sweep", *GRID, "-o", str(out)]) == 0
    return out


def test_units_by_hand_then_local_executor_equal_whole(whole, tmp_path, capsys):
    """Shard 1 by hand (--unit KEY), shard 2 through submitit's local executor (the resume submits
    only the missing unit), then the collected row equals the whole point's but for timings."""
    pytest.importorskip("submitit")
    d = tmp_path / "units"
    assert main(["--no-progress", "sweep", *GRID, "--shards", "2", "--plan", "-o", str(d)]) == 0
    assert main(["--no-progress", "sweep", *GRID, "--shards", "2", "--unit", "W4A4|tanq|mosf|#1/2", "-o", str(d)]) == 0
    assert main(["--no-progress", "sweep", "--status", str(d)]) == 0
    assert "1 done" in capsys.readouterr().out
    assert main(["--no-progress", "sweep", *GRID, "--shards", "2", "--executor", "local", "--jobs", "1",
                 "-o", str(d)]) == 0
    out = capsys.readouterr().out
    assert "2 units, 1 already done, 1 to run (local executor)" in out
    assert not list((d / "units").glob("*.tmp")) and not list((d / "units").glob("*.running"))
    ref, got = _rows(whole), _rows(d)
    assert list(ref[0]) == list(got[0])
    differing = [k for k in ref[0] if ref[0][k] != got[0][k]]
    assert all(k.endswith(TIMING) for k in differing), differing
    assert got[0]["engine_vs_golden.images"] == "12" and got[0]["engine_vs_golden.logits_differing"] == "0"
    assert main(["sweep", "--status", str(d)]) == 0
    assert "2 done, 0 running, 0 failed, 0 missing" in capsys.readouterr().out


def test_bad_units(tmp_path, capsys):
    d = tmp_path / "p"
    assert main(["sweep", *GRID, "--plan", "-o", str(d)]) == 0
    capsys.readouterr()
    before = sorted(p.name for p in d.rglob("*"))
    cases = [
        (["sweep", *GRID, "--unit", "W9A9|nope|", "-o", str(d)], "unknown unit key"),
        (["sweep", *[a if a != "4" else "3" for a in GRID], "--unit-index", "0", "-o", str(d)], "different grid"),
        (["sweep", *GRID, "--images", "32", "--unit-index", "0", "-o", str(d)], "--images"),
        (["sweep", *GRID, "--unit-index", "5", "-o", str(d)], "out of range"),
        (["sweep", "--collect", str(d)], "no result yet"),
        (["sweep", "--collect", str(tmp_path)], "no unit plan"),
        (["sweep", *GRID, "--plan", "--unit-index", "0", "-o", str(d)], "cannot be combined"),
        (["sweep", *GRID, "--shards", "2", "-o", str(tmp_path / "q")], "--shards needs"),
        (["sweep", *GRID, "--executor", "slurm", "-o", str(tmp_path / "q")], "--slurm-partition"),
        (["run", "--executor", "local"], "--shards"),
    ]
    import shutil
    if shutil.which("srun") is None:
        cases.append((["sweep", *GRID, "--executor", "slurm", "--slurm-partition", "p", "-o", str(tmp_path / "q")],
                      "no SLURM here"))
    for argv, msg in cases:
        if "slurm" in argv:
            pytest.importorskip("submitit")
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert msg in err and len(err.splitlines()) == 1, (argv, err)
    assert sorted(p.name for p in d.rglob("*")) == before
    assert not (tmp_path / "q").exists()


def test_executor_not_installed(tmp_path, monkeypatch, capsys):
    real = builtins.__import__

    def no_submitit(name, *args, **kw):
        if name == "submitit" or name.startswith("submitit."):
            raise ImportError("No module named 'submitit'")
        return real(name, *args, **kw)
    monkeypatch.setattr(builtins, "__import__", no_submitit)
    assert main(["sweep", *GRID, "--executor", "local", "-o", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err.strip()
    assert "needs submitit" in err and "intsim[cluster]" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "s").exists()
    assert main(["run", "--shards", "2", "--executor", "local", "--work-dir", str(tmp_path / "w")]) == 2
    assert "needs submitit" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()


def test_missing_program_file(tmp_path):
    from intsim.errors import UserError
    from intsim.studies import cluster
    args = {"program_file": str(tmp_path / "program.intsim"), "work": str(tmp_path), "program": None}
    with pytest.raises(UserError, match="program file .* is missing"):
        cluster.run_shard(args, 0)
    failed = json.loads((tmp_path / "shard-0.failed").read_text())
    assert "is missing" in failed["error"] and not (tmp_path / "shard-0.running").exists()


def test_run_sharded_equals_unsharded(tmp_path, capsys):
    """intsim run --shards 2 --executor local: the report equals the unsharded one but for timings."""
    pytest.importorskip("submitit")
    base = ["--no-progress", "run", "--images", "24", "--golden-images", "10", "--batch-size", "8",
            "--calib-images", "8"]
    assert main(base + ["--json", str(tmp_path / "a.json")]) == 0
    assert main(base + ["--shards", "2", "--executor", "local", "--work-dir", str(tmp_path / "w"),
                        "--json", str(tmp_path / "b.json")]) == 0
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("a.json", "b.json"))
    for r in (a, b):
        r.pop("timing")
        for lv in r["levels"].values():
            lv.pop("seconds")
            lv.pop("images_per_s")
    assert a == b
    assert (tmp_path / "w" / "program.intsim").is_file()
