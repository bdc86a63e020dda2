"""The command line: every bad input gives one clear message and exit code 2, before long work."""
import json
import socket

import numpy as np
import pytest
import torch

from intsim.cli import main
from intsim.program.format import load, save


def run_cli(capsys, *args):
    try:
        rc = main(list(args))
    except SystemExit as e:       # argparse errors
        rc = e.code
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_help_lists_commands(capsys):
    rc, out, _ = run_cli(capsys, "--help")
    assert rc == 0
    for cmd in ("run", "calibrate", "inspect"):
        assert cmd in out


def test_unknown_model(capsys):
    rc, _, err = run_cli(capsys, "run", "--model", "resnet50", "--weights", "random")
    assert rc == 2
    assert "unknown model 'resnet50'" in err and "deit_t" in err and "cifar10_vit_d6" in err


@pytest.mark.parametrize("bits", ["1", "9", "x"])
def test_bits_out_of_range(capsys, bits):
    rc, _, err = run_cli(capsys, "run", "--bits", bits)
    assert rc == 2 and "bits" in err


def test_missing_checkpoint(capsys, tmp_path):
    rc, _, err = run_cli(capsys, "run", "--checkpoint", str(tmp_path / "none.pth"))
    assert rc == 2 and "checkpoint not found" in err


def test_unreadable_checkpoint(capsys, tmp_path):
    p = tmp_path / "bad.safetensors"
    p.write_bytes(b"garbage" * 10)
    rc, _, err = run_cli(capsys, "calibrate", "--checkpoint", str(p), "-o", str(tmp_path / "x.prog"))
    assert rc == 2 and "could not be read" in err
    assert not (tmp_path / "x.prog").exists()


def test_mismatched_checkpoint(capsys, tmp_path):
    import timm
    m = timm.create_model("deit_tiny_patch16_224", pretrained=False)
    p = tmp_path / "deit.pth"
    torch.save(m.state_dict(), p)
    rc, _, err = run_cli(capsys, "run", "--checkpoint", str(p))      # default model is the CIFAR ViT
    assert rc == 2 and "does not match model" in err


def test_unwritable_output_checked_first(capsys, tmp_path):
    rc, _, err = run_cli(capsys, "run", "--json", str(tmp_path / "no" / "such" / "dir" / "out.json"))
    assert rc == 2 and "does not exist" in err
    rc, _, err = run_cli(capsys, "calibrate", "-o", str(tmp_path))
    assert rc == 2 and "is a folder" in err


def test_unknown_setting(capsys, tmp_path):
    rc, _, err = run_cli(capsys, "calibrate", "--set", "warp_bits=3", "-o", str(tmp_path / "p"))
    assert rc == 2 and "unknown setting 'warp_bits'" in err


def test_bad_data_folder_fails_before_calibration(capsys, tmp_path):
    (tmp_path / "cls").mkdir()
    (tmp_path / "cls" / "readme.md").write_text("x")
    rc, _, err = run_cli(capsys, "run", "--weights", "random", "--data", str(tmp_path))
    assert rc == 2 and "readme.md" in err and "not an image" in err


def _network() -> bool:
    try:
        socket.create_connection(("huggingface.co", 443), timeout=2).close()
        return True
    except OSError:
        return False


@pytest.mark.skipif(_network(), reason="the hub is reachable, so weights could be downloaded")
def test_no_weights_explains(capsys):
    rc, _, err = run_cli(capsys, "run", "--model", "deit_t", "--bits", "4")
    assert rc == 2
    assert "--checkpoint" in err and "--weights random" in err and "cache" in err


@pytest.fixture
def program_file(tmp_path):
    from intsim.studies.random_program import make_program
    p = tmp_path / "p.intprog"
    save(make_program(np.random.default_rng(0)), p)
    return p


def test_inspect_ok(capsys, program_file):
    rc, out, _ = run_cli(capsys, "inspect", str(program_file))
    assert rc == 0 and "attention" in out and "layernorm" in out


def test_truncated_program(capsys, program_file):
    data = program_file.read_bytes()
    program_file.write_bytes(data[: len(data) // 2])
    rc, _, err = run_cli(capsys, "inspect", str(program_file))
    assert rc == 2 and "truncated or damaged" in err


def test_program_of_other_version(capsys, program_file):
    prog = load(program_file)
    prog.header["version"] = 99
    from safetensors.numpy import save_file
    from intsim.program.format import META_KEY, header_json
    save_file(prog.tensors, str(program_file), metadata={META_KEY: header_json(prog.header)})
    rc, _, err = run_cli(capsys, "inspect", str(program_file))
    assert rc == 2 and "version 99" in err


def test_program_missing_tensor(capsys, program_file):
    prog = load(program_file)
    name = next(k for k in prog.tensors if k.endswith(".thresholds"))
    del prog.tensors[name]
    from safetensors.numpy import save_file
    from intsim.program.format import META_KEY, header_json
    save_file(prog.tensors, str(program_file), metadata={META_KEY: header_json(prog.header)})
    rc, _, err = run_cli(capsys, "inspect", str(program_file))
    assert rc == 2 and name in err and "missing" in err


def test_not_a_program(capsys, tmp_path):
    p = tmp_path / "x.prog"
    p.write_text("hello")
    rc, _, err = run_cli(capsys, "run", "--program", str(p))
    assert rc == 2 and "not a readable program" in err


def test_calibrate_then_run_program_reproduces_direct_run(capsys, tmp_path):
    common = ["--no-progress"]
    opts = ["--weights", "random", "--seed", "5", "--calib-images", "8"]
    p1 = tmp_path / "a.intprog"
    rc, _, err = run_cli(capsys, *common, "calibrate", *opts, "-o", str(p1))
    assert rc == 0, err
    rc, _, err = run_cli(capsys, *common, "run", *opts, "--images", "6", "--golden-images", "2",
                         "--save-program", str(tmp_path / "b.intprog"), "--logits", str(tmp_path / "direct.npz"),
                         "--json", str(tmp_path / "direct.json"))
    assert rc == 0, err
    assert p1.read_bytes() == (tmp_path / "b.intprog").read_bytes()      # same seed -> same bytes
    rc, out, err = run_cli(capsys, *common, "run", "--program", str(p1), "--images", "6", "--golden-images", "2",
                           "--logits", str(tmp_path / "loaded.npz"))
    assert rc == 0, err
    d, l = np.load(tmp_path / "direct.npz"), np.load(tmp_path / "loaded.npz")
    np.testing.assert_array_equal(d["engine_int"], l["engine_int"])
    np.testing.assert_array_equal(d["float"], l["float"])
    rep = json.loads((tmp_path / "direct.json").read_text())
    assert rep["engine_vs_golden"]["logits_differing"] == 0
    assert rep["config"]["random_weights"] is True
    for key in ("agree_float", "cosine_float", "sqnr_float_db"):
        assert key in rep["levels"]["engine"]


def test_every_subcommand_is_dispatched():
    from intsim.cli import COMMANDS, build_parser
    ap = build_parser()
    sub = next(a for a in ap._actions if a.dest == "cmd")
    assert set(sub.choices) == set(COMMANDS)


@pytest.mark.parametrize("setting, message", [
    ("residual_bits=64", "residual_bits must be in 2..32"), ("gelu_bits=30", "gelu_bits must be in 2..16"),
    ("exp_frac_bits=40", "exp_frac_bits (E) must be in 0..12"), ("acc_bits=-5", "acc_bits in 2..63"),
    ("mult_bits=1", "mult_bits in 2..32"), ("prob_bits=0", "prob_bits (P) must be in 1..24"),
    ("acc_bits=" + "9" * 40, "is not an int64 integer")])
def test_bad_setting_value_exits_2_before_calibration(capsys, tmp_path, monkeypatch, setting, message):
    import calib

    def never(*a, **k):
        raise AssertionError("calibration started")
    monkeypatch.setattr(calib, "calibrate", never)
    for cmd in (["calibrate", "-o", str(tmp_path / "p.intsim")], ["run", "--images", "2"]):
        rc, _, err = run_cli(capsys, *cmd, "--set", setting)
        assert rc == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "p.intsim").exists()


@pytest.mark.parametrize("argv, message", [
    (["run", "--seed", "-1"], "expected a seed from 0 to 2^32-1, not -1"),
    (["run", "--images", "0"], "expected a positive integer, not 0"),
    (["run", "--batch-size", "0"], "expected a positive integer, not 0"),
    (["run", "--calib-images", "-3"], "expected a positive integer, not -3"),
    (["run", "--golden-images", "x"], "expected a positive integer, not 'x'"),
    (["run", "--recon-lr", "2"], "expected a learning rate in (0, 1)"),
    (["clipping", "--fraction", "1.5"], "expected a number in (0, 1)"),
    (["bench", "--threads", "0"], "expected a positive integer"),
    (["bench", "--wbits", "9"], "bits must be from 2 to 8"),
    (["vectors", "--program", "p", "--images", "0"], "expected a positive integer"),
    (["plot", "softmax", "--program", "p", "--block", "-1"], "expected an integer >= 0"),
])
def test_numeric_options_are_range_checked_by_argparse(capsys, argv, message):
    rc, _, err = run_cli(capsys, *argv)
    assert rc == 2 and message in err and "Traceback" not in err


def test_image_pixel_limit(capsys, tmp_path, monkeypatch):
    """An image larger than intsim.data.MAX_PIXELS (a decompression bomb) is refused from its header."""
    from PIL import Image

    from intsim import data
    from intsim.options import transform_for
    from intsim.models.zoo import DEFAULT_MODEL, resolve
    (tmp_path / "cat").mkdir()
    Image.new("1", (9000, 8000)).save(tmp_path / "cat" / "bomb.png")      # 72 Mpx, 10 kB on disk
    tf, _ = transform_for(resolve(DEFAULT_MODEL))
    with pytest.raises(data.UserError, match=r"9000x8000 pixels is more than the limit of 64,000,000"):
        data.open_images(tmp_path, tf, None)
    monkeypatch.setattr(data, "MAX_PIXELS", 10 ** 12)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)                   # PIL's own check, at open
    with pytest.raises(data.UserError, match="refusing to decode it"):
        data.open_images(tmp_path, tf, None)


def test_interrupt_exits_130_and_leaves_no_file(capsys, tmp_path, monkeypatch):
    from intsim import cli
    from intsim.program.program import write_atomic
    target = tmp_path / "out.bin"

    def interrupted_write(a):
        def half(tmp):
            with open(tmp, "wb") as f:
                f.write(b"partial")
            raise KeyboardInterrupt
        write_atomic(target, half)
    monkeypatch.setitem(cli.COMMANDS, "inspect", interrupted_write)
    rc, _, err = run_cli(capsys, "inspect", "x")
    assert rc == 130 and "interrupted" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_written_files_get_the_umask_mode(tmp_path):
    import os

    from intsim.program.program import write_atomic
    old = os.umask(0o027)
    try:
        write_atomic(tmp_path / "a", b"x")
        write_atomic(tmp_path / "b", lambda tmp: open(tmp, "wb").close())
    finally:
        os.umask(old)
    assert {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()} == {"a": 0o640, "b": 0o640}


def test_light_commands_start_without_torch(tmp_path):
    """`intsim --help`, `inspect` and the help of other commands build only the parser they need:
    no torch or timm import (`intsim --help` took 13 s and 0.9 GB before, a quarter second now)."""
    import subprocess
    import sys
    f = tmp_path / "p.intsim"
    from intsim.studies.random_program import make_program
    save(make_program(0), f)
    code = ("import sys, contextlib, io\nfrom intsim.cli import main\n"
            "for argv in (['--help'], ['export', '--help'], ['hw', '--help'], ['sweep', '--help'], ['inspect', sys.argv[1]]):\n"
            "    with contextlib.redirect_stdout(io.StringIO()):\n"
            "        try:\n            rc = main(argv)\n        except SystemExit as e:\n            rc = e.code\n"
            "    assert rc == 0, (argv, rc)\n"
            "heavy = sorted(m for m in ('torch', 'timm') if m in sys.modules)\n"
            "print(','.join(heavy) or 'none')\n")
    out = subprocess.run([sys.executable, "-c", code, str(f)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "none"
