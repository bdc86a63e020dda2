"""``intsim sensitivity``: how far apart are equally valid versions of one quantized model?

The engine and the fake-quant model quantize at the same points with the same quantizers; they
differ only far below one quantization step (the engine keeps the residual stream, the GELU input
and the logits as integers, computes LayerNorm, softmax and GELU in integer arithmetic). At low
bit widths a model can be so sensitive that perturbations of that size alone move a visible share
of its top-1 decisions. This command measures that sensitivity on one calibrated program,
evaluating on the same images:

* ``fakequant``          the fake-quant model (float32), the reference of the comparison;
* ``fakequant float64``  the same arithmetic in double precision;
* ``fakequant int-grid`` float32, and every ``int`` value of the program (residual stream,
  GELU input, logits) rounded to the grid the integer program stores it on (its scale and bits):
  a float model that shares only the engine's storage of those values;
* ``fakequant + integer layernorm`` / ``attention`` / ``gelu``: the fake-quant model with the ops
  of one type executed by the engine's integer implementation (``intsim.engine.run_op``), their
  inputs rounded to the program's grid and their outputs dequantized: which integer operator
  moves the decisions;
* ``engine``             the integer engine.

For each: top-1, top-1 agreement with ``fakequant``, and the top-1 difference to ``fakequant``
with its 95% interval (``intsim.metrics.paired_top1_difference``: only the images that exactly
one of the two gets right move the difference). When the int-grid sibling disagrees with the
fake-quant model about as often as the engine does, the engine's gap is the model's sensitivity to
sub-step perturbations, not an error of the integer operators.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from ..errors import UserError

INTEGER_OP_TYPES = ("layernorm", "attention", "gelu")
LEVELS = ("fakequant", "fakequant float64", "fakequant int-grid",
          *(f"fakequant + integer {t}" for t in INTEGER_OP_TYPES), "engine")


def hybrid_fakequant(program, integer_types):
    """The fake-quant model of ``program`` with the ops whose type is in ``integer_types`` run by
    the engine's integer implementation. A value enters such an op as its integer code
    (``round(x / scale) + zero_point`` for codes, ``round(x / scale)`` clamped to the signed
    ``bits`` for int values) and leaves it dequantized."""
    from reference.fakequant import FakeQuantModel

    from ..engine import run_op

    def to_int(name, x):
        v = program.values[name]
        q = torch.round(x.double() / float(v["scale"]))
        if v["kind"] == "codes":
            q = q + int(v["zero_point"])
        elif v["kind"] == "int":
            b = int(v["bits"])
            q = q.clamp(-(1 << (b - 1)), (1 << (b - 1)) - 1)
        return q.to(torch.int64).numpy()

    def integer_forward(ctx, op, *inputs):
        y, _ = run_op(program, op, *(to_int(n, x) for n, x in zip(op["inputs"], inputs)))
        v = program.values[op["output"]]
        zp = int(v["zero_point"]) if v["kind"] == "codes" else 0
        return torch.from_numpy((y - zp).astype(np.float64) * float(v["scale"])).to(ctx.dtype)

    return FakeQuantModel(program, forwards={t: integer_forward for t in integer_types})


def add_arguments(p) -> None:
    from ..options import add_calib_args, add_model_args, count_or_all, positive
    add_model_args(p)
    add_calib_args(p)
    g = p.add_argument_group("evaluation")
    g.add_argument("--program", metavar="FILE", help="evaluate this program file instead of calibrating")
    g.add_argument("--data", metavar="PATH", help="evaluation images (default: the bundled 2,000 test images)")
    g.add_argument("--images", type=count_or_all, default=None, help="number of evaluation images, or 'all'")
    g.add_argument("--batch-size", type=positive, default=100)
    g.add_argument("--json", metavar="FILE", help="also write the results as JSON")


def run(a) -> int:
    from reference.fakequant import FakeQuantModel

    from .. import metrics
    from ..options import calibrate_from_args, load_calib_images, transform_for, check_writable, print_report, program_and_model
    from ..data import load_images
    from ..engine import Engine

    if a.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, not {a.batch_size}")
    check_writable(a.json, "JSON report")
    progress = not a.no_progress
    calib_s = None
    prog, model, spec, info = program_and_model(a)
    from calib import archs
    arch = archs.for_model(model)
    if not arch.supports("sensitivity"):
        raise UserError(f"the sensitivity study is implemented for {archs.supporting('sensitivity')} programs, "
                        f"not {arch.title} ({spec.name})")
    tf, _ = transform_for(spec)
    data = load_images(a.data, tf, a.images if a.images is not None or a.data is not None else 2000,
                       split="eval", seed=a.seed, progress=progress)
    if not a.program:
        cal = load_calib_images(a, spec, progress)
        prog, calib_s = calibrate_from_args(a, model, spec, info, cal, progress)
    if len(data.classes) != prog.model.get("num_classes"):
        raise UserError("the evaluation data's classes do not match the model's classifier; the sensitivity "
                        "study needs labelled images of the model's classes")
    labels = data.labels

    def fq_level(integer_type=None, **kw):
        fq = FakeQuantModel(prog, **kw) if integer_type is None else hybrid_fakequant(prog, {integer_type})
        with torch.inference_mode():
            return np.concatenate([fq(data.images[s:s + a.batch_size]).double().numpy()
                                   for s in range(0, len(data.images), a.batch_size)])

    runners = {
        "fakequant": lambda: fq_level(),
        "fakequant float64": lambda: fq_level(dtype=torch.float64),
        "fakequant int-grid": lambda: fq_level(int_grid=True),
        **{f"fakequant + integer {t}": (lambda t=t: fq_level(integer_type=t)) for t in INTEGER_OP_TYPES},
        "engine": lambda: Engine(prog).run(data.images, a.batch_size).logits.astype(np.float64),
    }
    from tqdm import tqdm
    logits, secs = {}, {}
    for name in tqdm(LEVELS, desc="sensitivity", unit="level", disable=not progress, leave=False):
        t0 = time.perf_counter()
        logits[name] = runners[name]()
        secs[name] = round(time.perf_counter() - t0, 2)
    ref = logits["fakequant"]
    rows = []
    for name in LEVELS:
        pd = metrics.paired_top1_difference(logits[name], ref, labels)
        rows.append({"level": name, "top1": metrics.top1(logits[name], labels),
                     "agree_fakequant": metrics.agreement(logits[name], ref),
                     "minus_fakequant": pd["diff"], "ci95": pd["ci95"], "only_right": pd["only_a"],
                     "only_fakequant_right": pd["only_b"], "seconds": secs[name]})
    s = prog.settings
    cinfo = prog.header.get("provenance", {}).get("calibration", {})
    report = {"model": spec.name, "wbits": s["wbits"], "abits": s["abits"],
              "softmax_quant": cinfo.get("softmax_quant"), "ln_rule": cinfo.get("ln_rule"),
              "program": a.program, "images": len(data.images), "eval_source": data.source,
              "calibration_s": None if calib_s is None else round(calib_s, 2), "results": rows}
    title = (f"model {spec.name}, W{s['wbits']}A{s['abits']} {cinfo.get('softmax_quant')} + {cinfo.get('ln_rule')}, "
             f"{len(data.images)} images from {data.source}")
    return print_report(title, format_table(report), report, a.json)


def format_table(report: dict) -> str:
    cols = ("level", "top-1 %", "agree fq %", "minus fq (points)", "95% interval", "only it right",
            "only fq right")
    lines = [cols]
    for r in report["results"]:
        lines.append((r["level"], f"{100 * r['top1']:.2f}", f"{100 * r['agree_fakequant']:.2f}",
                      f"{100 * r['minus_fakequant']:+.2f}", f"+-{100 * r['ci95']:.2f}", str(r["only_right"]),
                      str(r["only_fakequant_right"])))
    from ..options import text_table
    return text_table(lines)
