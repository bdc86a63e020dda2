"""The CIFAR-10 training script: seeded, resumable (same weights as an uninterrupted run), logged,
and its export records what the run did."""
import json

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import load_file

from training import export_checkpoint, train_cifar
from intsim.models.cifar import CLASSES


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    rng = np.random.default_rng(0)
    for split, n in (("train", 13), ("test", 2)):
        for c in CLASSES:
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(d / f"{i:04d}.png")
    return root


def _train(tree, out, cache, *extra, compile_step=False):
    return train_cifar.main(["--data", str(tree), "--out", str(out), "--epochs", "2", "--batch", "64",
                             "--threads", "1", "--cache", str(cache),
                             *(("--compile",) if compile_step else ()), *extra])


def test_resumed_run_equals_uninterrupted_run(tree, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    assert _train(tree, tmp_path / "a", cache) == 0
    log = [json.loads(line) for line in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2] and all(0 <= r["test_top1"] <= 1 for r in log)

    real_eval = train_cifar.evaluate
    calls = []

    def stop_in_epoch_2(*args, **kw):                  # the run is killed before epoch 2 is saved
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_eval(*args, **kw)
    monkeypatch.setattr(train_cifar, "evaluate", stop_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        _train(tree, tmp_path / "b", cache)
    monkeypatch.setattr(train_cifar, "evaluate", real_eval)
    assert not (tmp_path / "b" / "final.safetensors").exists()
    assert _train(tree, tmp_path / "b", cache, "--resume") == 0
    wa, wb = load_file(tmp_path / "a" / "final.safetensors"), load_file(tmp_path / "b" / "final.safetensors")
    assert wa.keys() == wb.keys() and all(np.array_equal(wa[k], wb[k]) for k in wa)
    logb = [json.loads(line) for line in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert [r["test_top1"] for r in logb] == [r["test_top1"] for r in log]
    (tmp_path / "b" / "final.safetensors").unlink()          # stopped after the last epoch's checkpoint
    assert _train(tree, tmp_path / "b", cache, "--resume") == 0
    wb = load_file(tmp_path / "b" / "final.safetensors")
    assert all(np.array_equal(wa[k], wb[k]) for k in wa)
    assert len((tmp_path / "b" / "log.jsonl").read_text().splitlines()) == 2   # no epoch trained again

    exp = tmp_path / "export"
    exp.mkdir()
    assert export_checkpoint.main([str(tmp_path / "a"), "--out", str(exp), "--note", "test run"]) == 0
    rec = json.loads((exp / "cifar10_vit_d6.json").read_text())
    assert rec["complete"] and rec["epochs_done"] == 2 and rec["note"] == "test run"
    assert len(rec["epoch_minutes"]) == 2 and rec["test_top1_full_10k"] == log[-1]["test_top1"]
    assert "--epochs 2 --batch 64 " in rec["command"] and "--beta2 0.999 " in rec["command"]
    assert rec["command"].endswith("--threads 1")
    assert (exp / "cifar10_vit_d6.safetensors").stat().st_size > 0


def test_compiled_step_trains_like_the_eager_step(tree, tmp_path):
    """The ``--compile`` step reaches the eager step's weights (up to float rounding), and with
    ``--eval-images`` the last epoch is measured on the whole test split, earlier ones on the
    balanced subset."""
    cache = tmp_path / "cache"
    assert _train(tree, tmp_path / "eager", cache, "--eval-images", "10") == 0
    assert _train(tree, tmp_path / "compiled", cache, "--eval-images", "10", compile_step=True) == 0
    we = load_file(tmp_path / "eager" / "final.safetensors")
    wc = load_file(tmp_path / "compiled" / "final.safetensors")
    assert we.keys() == wc.keys()
    for k in we:
        np.testing.assert_allclose(wc[k].astype(np.float32), we[k].astype(np.float32), atol=2e-2, err_msg=k)
    log = [json.loads(line) for line in (tmp_path / "compiled" / "log.jsonl").read_text().splitlines()]
    assert [r["test_images"] for r in log] == [10, 20]
    with pytest.raises(SystemExit):                           # fewer images than classes: a usage error
        _train(tree, tmp_path / "bad", cache, "--eval-images", "5")
    assert not (tmp_path / "bad" / "log.jsonl").exists()


def test_balanced_subset():
    y = np.repeat(np.arange(10), 7)[::-1].copy()
    idx = train_cifar.balanced_subset(y, 30)
    assert len(idx) == 30 and np.all(np.diff(idx) > 0)
    assert np.bincount(y[idx], minlength=10).tolist() == [3] * 10
    for c in range(10):                                       # the first 3 of every class
        assert idx[y[idx] == c].tolist() == np.flatnonzero(y == c)[:3].tolist()
    assert train_cifar.balanced_subset(y, 0).tolist() == list(range(70))
    assert train_cifar.balanced_subset(y, 500).tolist() == list(range(70))
    with pytest.raises(ValueError, match="fewer than the 10 classes"):
        train_cifar.balanced_subset(y, 5)


def test_cache_is_tied_to_the_source(tree, tmp_path):
    """Two different sources never share a cached split."""
    cache = tmp_path / "cache"
    x1, _ = train_cifar.cached_split(tree, "test", cache)
    other = tmp_path / "other"
    for c in CLASSES:
        (other / "test" / c).mkdir(parents=True)
        Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(other / "test" / c / "0000.png")
    x2, _ = train_cifar.cached_split(other, "test", cache)
    assert len(x1) == 20 and len(x2) == 10 and not x2.any()


def test_sincos_position_table():
    """Channel blocks hold sin/cos of the patch row and column; the class-token row is zero."""
    grid, dim = 8, 192
    pe = train_cifar.sincos_pos_embed(grid, dim, num_prefix=1)
    assert pe.shape == (1, 1 + grid * grid, dim) and pe.dtype == train_cifar.torch.float32
    assert not pe[0, 0].any()
    q = dim // 4
    for y, x in ((0, 0), (3, 5), (7, 1)):
        row = pe[0, 1 + y * grid + x].double().numpy()
        for i in (0, 1, q - 1):
            w = 10000.0 ** (-i / q)
            np.testing.assert_allclose(row[[i, q + i, 2 * q + i, 3 * q + i]],
                                       [np.sin(y * w), np.cos(y * w), np.sin(x * w), np.cos(x * w)], atol=1e-6)
    assert len({tuple(r) for r in pe[0, 1:].numpy().round(5)}) == grid * grid     # every patch distinct
    with pytest.raises(ValueError, match="multiple of 4"):
        train_cifar.sincos_pos_embed(grid, 190)


def test_position_init_option(tree, tmp_path, monkeypatch):
    """--pos-init sincos starts the learned pos_embed at the table; trunc_normal leaves timm's init."""
    seen = {}
    real_build = train_cifar.cifar_model.build

    def build_and_keep(**kw):
        seen["model"] = real_build(**kw)
        return seen["model"]
    monkeypatch.setattr(train_cifar.cifar_model, "build", build_and_keep)
    start = {}
    real_clip = train_cifar.torch.nn.utils.clip_grad_norm_

    def first_step(params, max_norm):                     # called before the first optimizer step
        start.setdefault("pos", seen["model"].pos_embed.detach().clone())
        start["max_norm"] = max_norm
        return real_clip(params, max_norm)
    monkeypatch.setattr(train_cifar.torch.nn.utils, "clip_grad_norm_", first_step)
    argv = ["--data", str(tree), "--out", str(tmp_path / "s"), "--epochs", "1", "--batch", "64",
            "--threads", "1", "--cache", str(tmp_path / "cache"), "--grad-clip", "0.5"]
    assert train_cifar.main(argv) == 0
    assert start["max_norm"] == 0.5
    assert train_cifar.torch.equal(start["pos"], train_cifar.sincos_pos_embed(8, 192))
    start.clear()
    argv[3] = str(tmp_path / "t")
    assert train_cifar.main(argv + ["--pos-init", "trunc_normal"]) == 0
    assert start["pos"].abs().max() < 0.1                 # timm's trunc_normal(std 0.02) init


def test_recipe_probe(tree, tmp_path):
    """A probe trains the compressed schedule and logs its top-1; too few images is an error."""
    from training import recipe_probe
    log = tmp_path / "probes.jsonl"
    argv = ["p", "--data", str(tree), "--images", "64", "--batch", "32", "--cache", str(tmp_path / "c"),
            "--log", str(log), "--pos-init", "sincos", "--patch-drop", "0.5"]
    assert recipe_probe.main(argv) == 0
    rec = json.loads(log.read_text())
    assert rec["name"] == "p" and rec["steps"] == 2 and rec["test_images"] == 4 and 0 <= rec["top1"] <= 1
    with pytest.raises(ValueError, match="less than one batch"):
        recipe_probe.main(argv[:4] + ["16"] + argv[5:])


def test_optimizer_and_loss_options(tree, tmp_path, monkeypatch, capsys):
    """--beta2 reaches AdamW, --label-smoothing the loss, --warmup-epochs the schedule; values
    out of range, and --resume with another recipe, are usage errors."""
    model = train_cifar.build_model()
    assert all(g["betas"] == (0.9, 0.99) for g in train_cifar.adamw(model, 1e-3, 0.05, 0.99).param_groups)
    assert all(g["betas"] == (0.9, 0.999) for g in train_cifar.adamw(model, 1e-3, 0.05).param_groups)
    seen = []
    real_ce = train_cifar.F.cross_entropy

    def ce(logits, y, label_smoothing):
        seen.append(label_smoothing)
        return real_ce(logits, y, label_smoothing=label_smoothing)
    monkeypatch.setattr(train_cifar.F, "cross_entropy", ce)
    cache = tmp_path / "cache"
    # 130 training images at batch 64: 2 steps an epoch, 4 in all
    assert _train(tree, tmp_path / "w1", cache, "--label-smoothing", "0", "--warmup-epochs", "1") == 0
    assert set(seen) == {0.0}
    assert _train(tree, tmp_path / "w0", cache, "--warmup-epochs", "0", "--beta2", "0.99") == 0
    assert set(seen[4:]) == {0.1}                             # the default
    opt = train_cifar.torch.load(tmp_path / "w0" / "last.pt", weights_only=False)["opt"]
    assert all(g["betas"] == (0.9, 0.99) for g in opt["param_groups"])

    def lr_end(run):
        return json.loads((tmp_path / run / "log.jsonl").read_text().splitlines()[0])["lr_end"]
    assert lr_end("w1") == pytest.approx(1e-3)               # the last warm-up step reaches the peak
    assert lr_end("w0") == pytest.approx(0.5e-3 * (1 + np.cos(np.pi / 4)))   # cosine from step 0
    capsys.readouterr()
    for bad, msg in ((["--beta2", "1"], "--beta2 must be"), (["--label-smoothing", "-0.1"], "--label-smoothing must"),
                     (["--warmup-epochs", "3"], "--warmup-epochs must"), (["--epochs", "0"], "--epochs must")):
        with pytest.raises(SystemExit):
            _train(tree, tmp_path / "bad", cache, *bad)
        assert msg in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    with pytest.raises(SystemExit):                           # a checkpoint of another recipe
        _train(tree, tmp_path / "w0", cache, "--warmup-epochs", "0", "--beta2", "0.9", "--resume")
    assert "beta2 0.99 -> 0.9" in capsys.readouterr().err
    assert _train(tree, tmp_path / "w0", cache, "--warmup-epochs", "0", "--beta2", "0.99", "--resume") == 0
    assert "already complete" in capsys.readouterr().out


def test_recipe_sweep(tree, tmp_path, capsys):
    """The sweep trains every run, ranks the finished ones, reports a failed run, and a second
    sweep over the same folder resumes instead of retraining."""
    from training import recipe_sweep
    runs = tmp_path / "runs.txt"
    runs.write_text("# two recipes and a broken one\nfast --epochs 1 --batch 64\n\n"
                    "ls0 --epochs 1 --batch 64 --label-smoothing 0\nbad --epochs 1 --beta2 2\n")
    argv = ["--data", str(tree), "--runs", str(runs), "--out", str(tmp_path / "sw"), "--device", "cpu",
            "--parallel", "2", "--cache", str(tmp_path / "cache")]
    assert recipe_sweep.main(argv) == 1                       # one run failed
    assert (tmp_path / "cache").is_dir() and len(list((tmp_path / "cache").glob("*.tmp"))) == 0
    rows = json.loads((tmp_path / "sw" / "sweep.json").read_text())
    assert [r["name"] for r in rows][2] == "bad" and rows[2]["state"].startswith("failed")
    good = {r["name"]: r for r in rows[:2]}
    assert set(good) == {"fast", "ls0"} and all(r["state"] == "finished" and r["epochs_done"] == 1 for r in rows[:2])
    assert rows[0]["final_top1"] >= rows[1]["final_top1"]
    assert good["ls0"]["options"][-2:] == ["--label-smoothing", "0"]
    mtime = (tmp_path / "sw" / "fast" / "final.safetensors").stat().st_mtime_ns
    runs.write_text("fast --epochs 1 --batch 64\n")
    assert recipe_sweep.main(argv) == 0
    assert (tmp_path / "sw" / "fast" / "final.safetensors").stat().st_mtime_ns == mtime   # not retrained
    assert "already complete" in (tmp_path / "sw" / "fast" / "stdout.txt").read_text()
    out = capsys.readouterr().out
    assert "fast" in out and "%" in out
    for text, msg in (("", "names no run"), ("a --epochs 1\na --epochs 2\n", "used twice"),
                      ("--epochs 1\n", "starts with the run's name")):
        with pytest.raises(ValueError, match=msg):
            recipe_sweep.parse_runs(text)
    for text, msg in (("a --epochs 1 --out x\n", "set by the sweep"), ("a --lr 'oops\n", "line 1"),
                      (".. --epochs 1\n", "starts with the run's name")):
        with pytest.raises(ValueError, match=msg):
            recipe_sweep.parse_runs(text)
    assert recipe_sweep.parse_runs("# x\na --epochs 1  # one epoch\n") == [("a", ["--epochs", "1"])]
    runs.write_text("")
    with pytest.raises(SystemExit):
        recipe_sweep.main(argv)
    assert "names no run" in capsys.readouterr().err


def test_recipe_sweep_stop_and_resume(tree, tmp_path):
    """--minutes stops the runs (exit 1, state "stopped"); the next sweep finishes them."""
    from training import recipe_sweep
    runs = tmp_path / "runs.txt"
    runs.write_text("a --epochs 1 --batch 64\nb --epochs 1 --batch 64\n")
    argv = ["--data", str(tree), "--runs", str(runs), "--out", str(tmp_path / "sw"), "--device", "cpu",
            "--parallel", "1", "--cache", str(tmp_path / "cache")]
    assert recipe_sweep.main(argv + ["--minutes", "0.001"]) == 1
    rows = json.loads((tmp_path / "sw" / "sweep.json").read_text())
    assert [(r["name"], r["state"], r["final_top1"]) for r in rows] == [("a", "stopped", None), ("b", "not started", None)]
    assert recipe_sweep.main(argv) == 0
    rows = json.loads((tmp_path / "sw" / "sweep.json").read_text())
    assert all(r["state"] == "finished" and r["final_top1"] is not None for r in rows)


def test_recipe_sweep_rank_and_log():
    from training import recipe_sweep
    rows = [{"name": n, "final_top1": t} for n, t in (("x", None), ("y", 0.0), ("z", 0.7), ("w", 0.71), ("v", None))]
    assert [r["name"] for r in recipe_sweep.rank(rows)] == ["w", "z", "y", "x", "v"]


def test_epoch_log_with_a_repeated_epoch_and_a_torn_line(tmp_path):
    from training.train_cifar import read_epoch_log
    (tmp_path / "log.jsonl").write_text('{"epoch": 1, "test_top1": 0.1}\n{"epoch": 2, "test_top1": 0.2}\n'
                                        '{"epoch": 2, "test_top1": 0.3}\n{"epoch": 3, "te')
    assert [r["test_top1"] for r in read_epoch_log(tmp_path)] == [0.1, 0.3]
    assert [r["test_top1"] for r in read_epoch_log(tmp_path, upto=1)] == [0.1]
    assert read_epoch_log(tmp_path / "missing") == []
