"""Shared command-line pieces: argument types and groups, model / program loading, calibration
from parsed options, report printing. Used by ``intsim.cli`` and the study commands in
``intsim.studies``; everything here is public so that no command imports another's privates.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Callable

from .errors import UserError
from .program.program import json_default, write_atomic

SOFTMAX_QUANTS = ("tanq", "uniform", "log2", "log2sqrt", "adalog", "sulq", "twin")
LN_RULES = ("mosf", "mean")


# ---- helpers --------------------------------------------------------------------------

def bits(v: str) -> int:
    try:
        b = int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bits must be an integer from 2 to 8, not '{v}'") from None
    if not 2 <= b <= 8:
        raise argparse.ArgumentTypeError(f"bits must be from 2 to 8, not {b}")
    return b


def int_type(lo: int, hi: int | None, expected: str) -> Callable[[str], int]:
    """An argparse type: an integer in ``lo..hi`` (no upper bound when ``hi`` is None), else
    ``expected <expected>, not <value>`` (exit 2 before any work)."""
    def parse(v: str) -> int:
        try:
            n = int(v)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, not '{v}'") from None
        if n < lo or (hi is not None and n > hi):
            raise argparse.ArgumentTypeError(f"expected {expected}, not {n}")
        return n
    parse.__name__ = expected
    return parse


def open_interval_type(lo: float, hi: float, expected: str) -> Callable[[str], float]:
    """An argparse type: a number strictly between ``lo`` and ``hi``."""
    def parse(v: str) -> float:
        try:
            x = float(v)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, not '{v}'") from None
        if not lo < x < hi:
            raise argparse.ArgumentTypeError(f"expected {expected}, not {x:g}")
        return x
    parse.__name__ = expected
    return parse


positive = int_type(1, None, "a positive integer")
non_negative = int_type(0, None, "an integer >= 0")
#: seeds of torch and numpy's generators
seed = int_type(0, (1 << 32) - 1, "a seed from 0 to 2^32-1")
fraction = open_interval_type(0.0, 1.0, "a number in (0, 1)")
learning_rate = open_interval_type(0.0, 1.0, "a learning rate in (0, 1)")


def count_or_all(v: str) -> int | None:
    return None if v == "all" else positive(v)


def check_writable(path: str | None, what: str) -> None:
    """Fail now (exit 2) if ``path`` cannot be written, rather than after the long work."""
    if path is None:
        return
    p = Path(path)
    parent = p.parent if str(p.parent) else Path(".")
    if p.is_dir():
        raise UserError(f"{what} {p} is a folder, not a file path")
    if not parent.is_dir():
        raise UserError(f"cannot write {what} {p}: folder {parent} does not exist")
    try:
        fd, tmp = tempfile.mkstemp(dir=parent, prefix=".intsim-write-test-")
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise UserError(f"cannot write {what} {p}: {e.strerror}") from None


def write_json_atomic(path: str, data: dict) -> None:
    """``data`` as indented, key-sorted JSON at ``path``, written atomically."""
    write_atomic(path, (json.dumps(data, indent=1, sort_keys=True, default=json_default) + "\n").encode())


def print_report(title: str, table: str, report: dict, json_path: str | None) -> int:
    """Print a command's title line and table, write its report as JSON when asked; returns 0."""
    print(title)
    print()
    print(table)
    if json_path:
        write_json_atomic(json_path, report)
        print(f"\nwrote {json_path}")
    return 0


def text_table(rows) -> str:
    """Rows of strings (the first one the header) as aligned text: first column left-justified,
    the others right-justified, a dashed line under the header."""
    w = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = ["  ".join(v.rjust(x) if i else v.ljust(x) for i, (v, x) in enumerate(zip(r, w))) for r in rows]
    out.insert(1, "  ".join("-" * x for x in w))
    return "\n".join(out)


def parse_settings(items: list[str]) -> dict[str, int]:
    from intsim.program.format import DEFAULT_SETTINGS
    out = {}
    for it in items or []:
        if "=" not in it:
            raise UserError(f"--set expects KEY=VALUE, got '{it}'")
        k, v = it.split("=", 1)
        if k not in DEFAULT_SETTINGS or k in ("wbits", "abits"):
            known = ", ".join(s for s in DEFAULT_SETTINGS if s not in ("wbits", "abits"))
            raise UserError(f"unknown setting '{k}' (settings: {known}; use --bits/--wbits/--abits for widths)")
        try:
            out[k] = int(v)
        except ValueError:
            raise UserError(f"setting {k} must be an integer, not '{v}'") from None
    return out


# ---- argument groups ------------------------------------------------------------------

def add_model_args(p: argparse.ArgumentParser) -> None:
    from intsim.models.zoo import DEFAULT_MODEL, MODELS
    g = p.add_argument_group("model and weights")
    g.add_argument("--model", default=None,
                   help=f"model short name (default {DEFAULT_MODEL}, the bundled CIFAR-10 ViT): {', '.join(MODELS)}")
    g.add_argument("--weights", choices=("pretrained", "random"), default=None,
                   help="pretrained (bundled or timm weights; default) or seeded random weights for structural "
                        "studies (accuracy is then meaningless)")
    g.add_argument("--checkpoint", metavar="PATH", help="state dict to load (.safetensors, .pth, .bin)")
    g.add_argument("--seed", type=seed, default=0, help="seed of random weights, image draws and calibration (0)")


def add_calib_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("quantization")
    g.add_argument("--bits", type=bits, default=4, help="weight and activation bits, 2..8 (default 4)")
    g.add_argument("--wbits", type=bits, help="weight bits (overrides --bits)")
    g.add_argument("--abits", type=bits, help="activation bits (overrides --bits)")
    g.add_argument("--softmax-quant", choices=SOFTMAX_QUANTS, default="tanq",
                   help="post-softmax quantizer (default tanq, DopQ-ViT)")
    g.add_argument("--ln-rule", choices=LN_RULES, default="mosf",
                   help="post-LayerNorm shared scale: mosf (median, DopQ-ViT; default) or mean (RepQ-ViT)")
    g.add_argument("--set", action="append", metavar="KEY=VALUE", default=[],
                   help="precision setting of the program, e.g. --set residual_bits=12 "
                        "(see docs/integer-spec.md section 7)")
    g.add_argument("--calib-data", metavar="PATH",
                   help="calibration images: ImageFolder tree or zip (default: the bundled CIFAR-10 "
                        "calibration set; a CIFAR-style zip/tree with train/ uses train/)")
    g.add_argument("--calib-images", type=positive, default=32, help="number of calibration images (32)")
    from calib.config import RECON_DEFAULTS as RD
    r = p.add_argument_group("block reconstruction (optional stage after calibration)")
    r.add_argument("--reconstruct", action="store_true",
                   help="after calibration, tune each block (then the patch embedding and the head layer-wise) "
                        "so that its fake-quant output matches the float model's: activation scales, then the "
                        "post-LN reparameterization, then the weights' rounding (AdaRound); the program stays an "
                        "ordinary integer program")
    r.add_argument("--recon-images", type=positive, default=RD["recon_images"],
                   help=f"images for reconstruction, drawn like the calibration images (default {RD['recon_images']})")
    r.add_argument("--recon-iters", type=positive, default=RD["recon_iters"],
                   help=f"optimizer steps per block, all stages together (default {RD['recon_iters']})")
    r.add_argument("--recon-lr", type=learning_rate, default=RD["recon_lr"],
                   help=f"learning rate of the rounding variables; scales use a tenth (default {RD['recon_lr']:g})")


def transform_for(spec):
    from intsim.models.zoo import data_config

    from .data import Transform
    dc = data_config(spec)
    return Transform(size=dc["input_size"][-1], crop_pct=dc["crop_pct"], interpolation=dc["interpolation"]), dc


def calib_config(a):
    """The ``CalibConfig`` of parsed calibration options, validated against the spec's bounds
    (section 8) before any work: a bad ``--set`` value is a ``UserError`` (exit 2) here, not a
    traceback after calibration."""
    from calib import CalibConfig
    recon = {}
    if getattr(a, "reconstruct", False):
        recon = dict(reconstruct=True, recon_images=a.recon_images, recon_iters=a.recon_iters, recon_lr=a.recon_lr)
    cfg = CalibConfig(wbits=a.wbits or a.bits, abits=a.abits or a.bits, softmax_quant=a.softmax_quant,
                      ln_rule=a.ln_rule, seed=a.seed, settings=parse_settings(a.set), **recon)
    try:
        cfg.validate()
    except ValueError as e:
        raise UserError(f"bad quantization options: {e}") from None
    return cfg


def versions() -> dict:
    import numba
    import numpy
    import timm
    import torch

    from . import __version__
    return {"intsim": __version__, "torch": torch.__version__, "timm": timm.__version__,
            "numpy": numpy.__version__, "numba": numba.__version__}


def load_calib_images(a, spec, progress):
    from .data import load_images
    tf, _ = transform_for(spec)
    return load_images(a.calib_data, tf, a.calib_images, split="calib", seed=a.seed, progress=progress)


def calibrate_from_args(a, model, spec, info, cal, progress):
    """Calibrate ``model`` on the calibration ImageSet ``cal``; returns (program, seconds)."""
    from calib import calibrate
    _, dc = transform_for(spec)
    cfg = calib_config(a)
    prov = dict(info)
    prov.update(seed=a.seed, calib_source=cal.source, calib_images=cal.ids, versions=versions())
    recon = None
    if cfg.reconstruct:     # drawn from the same source and split as the calibration images
        from calib import archs
        arch = archs.for_model(model)
        if not arch.supports("reconstruction"):
            raise UserError(f"--reconstruct is implemented for {archs.supporting('reconstruction')} models only, "
                            f"not for {arch.title}")
        from .data import load_images
        tf, _ = transform_for(spec)
        rs = load_images(a.calib_data, tf, cfg.recon_images, split="calib", seed=a.seed, progress=progress)
        recon = rs.images
        prov["recon_images"] = rs.ids
    t0 = time.perf_counter()
    prog = calibrate(model, cal.images, dc["mean"], dc["std"], cfg, provenance=prov, progress=progress,
                     recon_images=recon)
    secs = time.perf_counter() - t0
    print_reconstruction(prog)
    return prog, secs


def print_reconstruction(prog) -> None:
    rec = calibration_info(prog).get("reconstruction")
    if not rec:
        return
    units = ", ".join(f"{u['unit'].replace('blocks.', 'b')} {u['calibrated']:.3g}->{u['final']:.3g}"
                      for u in rec["units"])
    print(f"reconstruction on {rec['num_images']} images, relative output error per unit "
          f"(calibrated -> reconstructed): {units}")


def program_and_model(a):
    """``(program or None, model, spec, info)``: the program of ``--program`` with its matching float
    model, or (no ``--program``) the model of ``--model`` / ``--weights`` / ``--checkpoint``."""
    from intsim.program.format import load
    from intsim.models.zoo import DEFAULT_MODEL, load_model
    if a.program:
        prog = load(a.program)
        return (prog, *model_for_program(a, prog))
    return (None, *load_model(a.model or DEFAULT_MODEL, weights=a.weights or "pretrained",
                              checkpoint=a.checkpoint, seed=a.seed))


def model_for_program(a, prog):
    """The float model matching a loaded program: explicit options win, else the provenance."""
    from intsim.models.zoo import load_model
    prov = prog.header.get("provenance", {})
    name = prog.model.get("name") or prov.get("model")
    if a.model and a.model != name:
        raise UserError(f"--model {a.model} does not match the program's model '{name}'")
    if a.checkpoint or a.weights:
        return load_model(name, weights=a.weights or "pretrained", checkpoint=a.checkpoint, seed=a.seed)
    src = prov.get("weights")
    if src == "random":
        return load_model(name, weights="random", seed=int(prov.get("seed", 0)))
    if src == "checkpoint" and prov.get("checkpoint") and Path(prov["checkpoint"]).is_file():
        return load_model(name, checkpoint=prov["checkpoint"])
    return load_model(name, weights="pretrained")


def calibration_info(prog) -> dict:
    """The calibration record of a program (method, quantizer, rule, image count...)."""
    return prog.header.get("provenance", {}).get("calibration", {})


