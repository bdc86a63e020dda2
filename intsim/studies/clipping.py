"""``intsim clipping``: which post-softmax values matter? (DopQ-ViT's clipping experiment)

The model is calibrated once (default W4A4, TanQ + MOSF) and its fake-quant model is evaluated
three times on the same images:

* ``none``: as calibrated;
* ``near0``: in every attention layer, the fraction ``--fraction`` (default 1%) of the
  post-softmax values nearest 0 is set to 0;
* ``near1``: the same fraction of the values nearest 1 (the largest ones) is set to 0.

The fraction is taken per image and per layer over all heads and rows together (``k =
ceil(fraction * H * T * T)`` values of the (H, T, T) attention map), on the float probabilities
before the post-softmax quantizer. The float model is edited the same way, as a reference
without quantization. The engine is not involved: it executes the program, which has no place
for such an edit. This is a fake-quant study of the paper's claim that the few values near 1
carry the accuracy (its W4A4 ViT-B figures: 70.73% top-1 with the 1% nearest 0 clipped, 2.20%
with the 1% nearest 1 clipped).
"""
from __future__ import annotations

import math
import time

import numpy as np
import torch

from ..errors import UserError

MODES = ("none", "near0", "near1")


def zero_fraction(p: torch.Tensor, fraction: float, mode: str) -> torch.Tensor:
    """``p`` (B, ...) with, per leading index b, the ``ceil(fraction * n)`` values (n = p[b].numel())
    nearest 0 (``mode="near0"``: the smallest) or nearest 1 (``"near1"``: the largest) set to 0.
    Post-softmax values lie in [0, 1], so nearness to 0 and 1 is the order of the values.
    ``mode="none"`` returns ``p`` unchanged."""
    if mode == "none" or fraction <= 0:
        return p
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    flat = p.reshape(p.shape[0], -1)
    k = min(flat.shape[1], math.ceil(fraction * flat.shape[1]))
    idx = torch.topk(flat, k, dim=1, largest=(mode == "near1"), sorted=False).indices
    out = flat.clone()
    out.scatter_(1, idx, 0.0)
    return out.reshape(p.shape)


def add_arguments(p) -> None:
    from ..options import add_calib_args, add_model_args, count_or_all, fraction, positive
    add_model_args(p)
    add_calib_args(p)
    g = p.add_argument_group("experiment")
    g.add_argument("--fraction", type=fraction, default=0.01,
                   help="fraction of each attention map's values to zero (default 0.01 = 1%%)")
    g.add_argument("--data", metavar="PATH", help="evaluation images (default: the bundled 2,000 test images)")
    g.add_argument("--images", type=count_or_all, default=None, help="number of evaluation images, or 'all'")
    g.add_argument("--batch-size", type=positive, default=100)
    g.add_argument("--json", metavar="FILE", help="also write the results as JSON")


def run(a) -> int:
    from reference.fakequant import FakeQuantModel
    from reference.vit import forward, params_from_timm
    from intsim.models.zoo import DEFAULT_MODEL, load_model

    from .. import metrics
    from ..options import calibrate_from_args, load_calib_images, transform_for, check_writable, print_report
    from ..data import load_images

    if not 0 < a.fraction < 1:
        raise UserError(f"--fraction must be between 0 and 1, not {a.fraction}")
    check_writable(a.json, "JSON report")
    progress = not a.no_progress
    model, spec, info = load_model(a.model or DEFAULT_MODEL, weights=a.weights or "pretrained",
                                   checkpoint=a.checkpoint, seed=a.seed)
    from calib import archs
    arch = archs.for_model(model)
    if not arch.supports("clipping"):
        raise UserError(f"the clipping experiment is implemented for {archs.supporting('clipping')} models, "
                        f"not {arch.title} ({spec.name})")
    tf, dc = transform_for(spec)
    data = load_images(a.data, tf, a.images if a.images is not None or a.data is not None else 2000,
                       split="eval", seed=a.seed, progress=progress)
    cal = load_calib_images(a, spec, progress)
    prog, calib_s = calibrate_from_args(a, model, spec, info, cal, progress)
    params = params_from_timm(model, dc["mean"], dc["std"])
    labels = data.labels if len(data.classes) == prog.model.get("num_classes") else None
    if labels is None:
        raise UserError("the evaluation data's classes do not match the model's classifier; the clipping "
                        "experiment needs labelled images of the model's classes")

    def edit(mode):
        return lambda _name, pr: zero_fraction(pr, a.fraction, mode)

    from tqdm import tqdm
    rows = []
    bar = tqdm(total=2 * len(MODES), desc="clipping", unit="eval", disable=not progress, leave=False)
    for mode in MODES:
        hook = None if mode == "none" else \
            (lambda n, t, _m=mode: zero_fraction(t, a.fraction, _m) if n.endswith(".probs") else t)
        levels = (("float", lambda x, _h=hook: forward(params, x, hook=_h)),
                  ("fakequant", FakeQuantModel(prog, probs_transform=None if mode == "none" else edit(mode))))
        for level, model_fn in levels:
            t0 = time.perf_counter()
            with torch.inference_mode():
                logits = np.concatenate([model_fn(data.images[s:s + a.batch_size]).double().numpy()
                                         for s in range(0, len(data.images), a.batch_size)])
            rows.append({"level": level, "mode": mode, "top1": metrics.top1(logits, labels),
                         "seconds": round(time.perf_counter() - t0, 2)})
            bar.update(1)
    bar.close()
    s = prog.settings
    cinfo = prog.header["provenance"]["calibration"]
    report = {"model": spec.name, "wbits": s["wbits"], "abits": s["abits"],
              "softmax_quant": cinfo["softmax_quant"], "ln_rule": cinfo["ln_rule"], "fraction": a.fraction,
              "images": len(data.images), "eval_source": data.source, "calibration_s": round(calib_s, 2),
              "results": rows}
    title = (f"model {spec.name}, W{s['wbits']}A{s['abits']} {cinfo['softmax_quant']} + {cinfo['ln_rule']}, "
             f"{len(data.images)} images from {data.source}; zeroing {100 * a.fraction:g}% of each attention map")
    return print_report(title, format_table(report), report, a.json)


def format_table(report: dict) -> str:
    by = {(r["level"], r["mode"]): r["top1"] for r in report["results"]}
    head = {"none": "as calibrated", "near0": "zero 1% nearest 0", "near1": "zero 1% nearest 1"}
    if report["fraction"] != 0.01:
        pct = f"{100 * report['fraction']:g}%"
        head = {"none": "as calibrated", "near0": f"zero {pct} nearest 0", "near1": f"zero {pct} nearest 1"}
    cols = ["level"] + [head[m] + " %" for m in MODES]
    lines = [cols]
    for level, label in (("float", "float"), ("fakequant", f"fake-quant W{report['wbits']}A{report['abits']}")):
        lines.append([label] + [f"{100 * by[(level, m)]:.2f}" for m in MODES])
    from ..options import text_table
    return text_table(lines)
