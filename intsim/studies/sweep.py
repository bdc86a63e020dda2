"""``intsim sweep``: a grid of calibrate-and-evaluate points, written as CSV and JSON.

Each point is one full calibration of the model with one configuration, followed by the
fake-quant and engine levels on the same evaluation images (the float level runs once per sweep,
the golden model on the first ``--golden-images``). Results are appended to ``OUT/results.jsonl``
as each point finishes, so an interrupted sweep resumes where it stopped: points whose key is
already there are skipped. ``OUT/results.csv`` and ``OUT/results.json`` are rewritten from it at
the end, followed by the plots ``OUT/accuracy_vs_bops.png`` and
``OUT/accuracy_vs_weight_storage.png`` (``intsim plot sweep``; a plotting failure leaves the
results intact). ``--jobs N`` runs points in N worker processes, each with its share of the
cores the process may use (its CPU affinity). Evaluation images are decoded once per worker
when they fit in ``IN_MEMORY_BYTES`` (1 GiB), otherwise chunk by chunk at every point, so memory
stays flat on large sets.
"""
from __future__ import annotations

import argparse
import csv
import itertools
import json
import os
import time
from pathlib import Path

from ..errors import UserError

GRID_AXES = ("wbits", "abits", "softmax_quant", "ln_rule")


#: Evaluation images up to this many decoded bytes stay in memory for all of a worker's points
#: (CIFAR-10's 10,000 test images: 31 MB); a larger set is decoded again, chunk by chunk, per point,
#: so memory stays flat (50,000 ImageNet images at 224 px would take 7.5 GB).
IN_MEMORY_BYTES = 1 << 30


def _golden_count(v: str) -> int | None:
    """``--golden-images``: 0, a positive count, or 'all' (None)."""
    from ..options import count_or_all
    return 0 if v.strip() == "0" else count_or_all(v)


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity, e.g. under ``taskset``), not all the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:                              # no sched_getaffinity (macOS, Windows)
        return os.cpu_count() or 1


def _csv_list(kind):
    def parse(v: str):
        items = [x.strip() for x in v.split(",") if x.strip()]
        if not items:
            raise argparse.ArgumentTypeError("empty list")
        return [kind(x) for x in items]
    return parse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="model short name (default: the bundled CIFAR-10 ViT)")
    p.add_argument("--weights", choices=("pretrained", "random"), default="pretrained")
    p.add_argument("--checkpoint", metavar="PATH")
    p.add_argument("--bits", type=_csv_list(int), default=[8, 6, 4, 3],
                   help="comma-separated W=A bit widths (default 8,6,4,3)")
    p.add_argument("--wbits", type=_csv_list(int), help="weight bits grid (with --abits, instead of --bits)")
    p.add_argument("--abits", type=_csv_list(int), help="activation bits grid")
    p.add_argument("--softmax-quant", type=_csv_list(str), default=["tanq", "log2sqrt"],
                   help="post-softmax quantizers (default tanq,log2sqrt)")
    p.add_argument("--ln-rule", type=_csv_list(str), default=["mosf", "mean"],
                   help="post-LN rules (default mosf,mean); 'channel' adds the per-channel upper bound without "
                        "reparameterization, fake-quant only (no integer program can express it)")
    p.add_argument("--pair", action="store_true",
                   help="pair softmax quantizers with LN rules (tanq+mosf, log2sqrt+mean: DopQ-ViT vs the "
                        "RepQ-ViT-style baseline) instead of taking their product")
    p.add_argument("--set", action="append", default=[], metavar="KEY=V1,V2",
                   help="sweep a precision setting too, e.g. --set acc_bits=32,20")
    p.add_argument("--data", metavar="PATH", help="evaluation images (default: the bundled test images)")
    p.add_argument("--images", default=None, help="evaluation images, or 'all' (default: all of --data / bundle)")
    p.add_argument("--calib-data", metavar="PATH")
    p.add_argument("--calib-images", type=int, default=32)
    from calib.config import RECON_DEFAULTS as RD
    p.add_argument("--reconstruct", action="store_true",
                   help="block reconstruction after calibration at every point (calib.reconstruct); such points "
                        "are keyed with '|recon', so one folder can hold both")
    p.add_argument("--recon-images", type=int, default=RD["recon_images"],
                   help=f"reconstruction images ({RD['recon_images']})")
    p.add_argument("--recon-iters", type=int, default=RD["recon_iters"],
                   help=f"reconstruction steps per block ({RD['recon_iters']})")
    p.add_argument("--recon-lr", type=float, default=RD["recon_lr"],
                   help=f"reconstruction learning rate ({RD['recon_lr']:g})")
    p.add_argument("--golden-images", type=_golden_count, default=0,
                   help="golden model on the first N images per point, or 'all' (default 0)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=1, help="worker processes (default 1)")
    p.add_argument("-o", "--out", required=True, metavar="DIR", help="output folder (created; reused to resume)")


def grid(a) -> list[dict]:
    from intsim.program.format import DEFAULT_SETTINGS
    for b in (a.bits or []) + (a.wbits or []) + (a.abits or []):
        if not 2 <= b <= 8:
            raise UserError(f"bits must be from 2 to 8, not {b}")
    for q in a.softmax_quant:
        if q not in ("tanq", "uniform", "log2", "log2sqrt"):
            raise UserError(f"unknown post-softmax quantizer '{q}'")
    for r in a.ln_rule:
        if r not in ("mosf", "mean", "channel"):
            raise UserError(f"unknown LN rule '{r}' (known: mosf, mean, channel)")
    if a.wbits or a.abits:
        wa = list(itertools.product(a.wbits or a.bits, a.abits or a.bits))
    else:
        wa = [(b, b) for b in a.bits]
    if a.pair:
        if len(a.softmax_quant) != len(a.ln_rule):
            raise UserError("--pair needs as many --softmax-quant as --ln-rule entries")
        methods = list(zip(a.softmax_quant, a.ln_rule))
    else:
        methods = list(itertools.product(a.softmax_quant, a.ln_rule))
    extra_axes: list[tuple[str, list[int]]] = []
    for item in a.set:
        if "=" not in item:
            raise UserError(f"--set expects KEY=V1,V2, got '{item}'")
        k, v = item.split("=", 1)
        if k not in DEFAULT_SETTINGS or k in ("wbits", "abits"):
            raise UserError(f"unknown setting '{k}'")
        try:
            extra_axes.append((k, [int(x) for x in v.split(",")]))
        except ValueError:
            raise UserError(f"--set {k}: values must be integers") from None
    recon = bool(getattr(a, "reconstruct", False))
    if recon and "channel" in a.ln_rule:
        raise UserError("the 'channel' LN rule (fake-quant only) cannot be combined with --reconstruct")
    if recon:
        from calib import CalibConfig
        try:
            CalibConfig(reconstruct=True, recon_images=a.recon_images, recon_iters=a.recon_iters,
                        recon_lr=a.recon_lr).validate()
        except ValueError as e:
            raise UserError(str(e)) from None
    points = []
    for (w, ab), (sq, ln) in itertools.product(wa, methods):
        for combo in itertools.product(*[vals for _, vals in extra_axes]):
            settings = {k: v for (k, _), v in zip(extra_axes, combo)}
            p = {"wbits": w, "abits": ab, "softmax_quant": sq, "ln_rule": ln, "settings": settings}
            if recon:
                p["reconstruct"] = True
            points.append(p)
    return points


def point_key(p: dict) -> str:
    s = ",".join(f"{k}={v}" for k, v in sorted(p["settings"].items()))
    recon = "|recon" if p.get("reconstruct") else ""
    return f"W{p['wbits']}A{p['abits']}|{p['softmax_quant']}|{p['ln_rule']}|{s}{recon}"


# ---- worker -------------------------------------------------------------------------------

_STATE: dict = {}


def _init_worker(a_dict: dict) -> None:
    """Load the model and images once per process."""
    import torch
    from intsim.models.zoo import DEFAULT_MODEL, data_config, load_model

    from ..data import Transform, load_images, open_images
    a = argparse.Namespace(**a_dict)
    torch.set_num_threads(max(1, usable_cores() // max(1, a.jobs)))
    model, spec, info = load_model(a.model or DEFAULT_MODEL, weights=a.weights, checkpoint=a.checkpoint, seed=a.seed)
    dc = data_config(spec)
    tf = Transform(dc["input_size"][-1], dc["crop_pct"], dc["interpolation"])
    n = None if a.images in (None, "all") else int(a.images)
    data = open_images(a.data, tf, n, split="eval", seed=a.seed)
    if len(data) * 3 * tf.size * tf.size <= IN_MEMORY_BYTES:
        data = data.read()              # decoded once for all points; else decoded chunk by chunk per point
    cal = load_images(a.calib_data, tf, a.calib_images, split="calib", seed=a.seed)
    recon = None
    if getattr(a, "reconstruct", False):
        recon = load_images(a.calib_data, tf, a.recon_images, split="calib", seed=a.seed)
    _STATE.clear()                      # nothing (e.g. the float level) carries over from an earlier sweep
    _STATE.update(a=a, model=model, spec=spec, info=info, dc=dc, data=data, cal=cal, recon=recon)


def _chunk() -> int:
    """Images per evaluation chunk: a multiple of the batch size (the batches are those of one pass)."""
    bs = _STATE["a"].batch_size
    return bs * max(1, -(-256 // bs))


def _float_level():
    from .. import evaluate as ev
    s = _STATE
    mean, std, bs = s["dc"]["mean"], s["dc"]["std"], s["a"].batch_size
    levels = {"float": lambda x: ev.run_float(s["model"], x, mean, std, bs, False)}
    return ev.evaluate_stream(s["data"], levels, _chunk()).levels["float"]


def _run_point(p: dict) -> dict:
    from calib import CalibConfig, calibrate
    from reference.golden import run as golden_run
    from reference.fakequant import FakeQuantModel

    from .. import evaluate as ev
    from ..engine import Engine
    s = _STATE
    a, data = s["a"], s["data"]
    recon = {}
    if p.get("reconstruct"):
        recon = dict(reconstruct=True, recon_images=a.recon_images, recon_iters=a.recon_iters, recon_lr=a.recon_lr)
    cfg = CalibConfig(wbits=p["wbits"], abits=p["abits"], softmax_quant=p["softmax_quant"], ln_rule=p["ln_rule"],
                      seed=a.seed, settings=p["settings"], **recon)
    if "float" not in s:
        s["float"] = _float_level()
    if p["ln_rule"] == "channel":
        return _run_channel_point(p, cfg)
    t0 = time.perf_counter()
    prog = calibrate(s["model"], s["cal"].images, s["dc"]["mean"], s["dc"]["std"], cfg,
                     provenance=dict(s["info"], calib_images=s["cal"].ids), progress=False,
                     recon_images=None if s.get("recon") is None else s["recon"].images)
    calib_s = time.perf_counter() - t0
    scale = float(prog.values[prog.output]["scale"])
    fq = FakeQuantModel(prog)
    eng = Engine(prog)
    bs = a.batch_size
    levels = {
        "fakequant": lambda x: ev.run_fakequant(fq, x, bs, False),
        "engine": lambda x: ev.run_integer(lambda y: eng.run(y, batch_size=bs), x, scale, bs, "engine", False),
        "golden": lambda x: ev.run_integer(lambda y: golden_run(prog, y), x, scale, bs, "golden", False),
    }
    n_golden = len(data) if a.golden_images is None else a.golden_images
    evaluation = ev.evaluate_stream(data, levels, _chunk(), limits={"golden": n_golden})
    evaluation.levels = {"float": s["float"], **evaluation.levels}
    labels = data.labels if len(data.classes) == prog.model.get("num_classes") else None
    rep = ev.compare(evaluation, labels)
    row = {"key": point_key(p), **{k: p[k] for k in GRID_AXES}, "settings": p["settings"],
           **({"reconstruct": True} if p.get("reconstruct") else {}),
           "calibration_s": round(calib_s, 2), "images": len(data)}
    for lvl, r in rep["levels"].items():
        for k, v in r.items():
            if k not in ("images",):
                row[f"{lvl}.{k}"] = v
    if "engine_vs_golden" in rep:
        row["engine_vs_golden.logits_differing"] = rep["engine_vs_golden"]["logits_differing"]
        row["engine_vs_golden.images"] = rep["engine_vs_golden"]["images"]
    for k, v in rep["saturation"]["total"].items():
        row[f"saturation.{k}"] = v
    try:
        from .cost import program_cost
        c = program_cost(prog)["total"]
        row.update({f"cost.{k}": v for k, v in c.items() if not isinstance(v, dict)})
    except ImportError:
        pass
    return row


def _run_channel_point(p: dict, cfg) -> dict:
    """The fake-quant-only upper bound: per-channel post-LN quantizers, no reparameterization
    (calib.vit.channelwise_fakequant); no program, so no engine, golden or cost figures."""
    from calib.vit import channelwise_fakequant

    from .. import evaluate as ev
    s = _STATE
    data = s["data"]
    t0 = time.perf_counter()
    logits = channelwise_fakequant(s["model"], s["cal"].images, s["dc"]["mean"], s["dc"]["std"], cfg,
                                   (part.images for _, part in data.chunks(_chunk())))
    secs = time.perf_counter() - t0
    evaluation = ev.Evaluation()
    evaluation.levels["float"] = s["float"]
    evaluation.levels["fakequant"] = ev.LevelResult(logits, secs, len(data))
    labels = data.labels if len(data.classes) == logits.shape[1] else None
    rep = ev.compare(evaluation, labels)
    row = {"key": point_key(p), **{k: p[k] for k in GRID_AXES}, "settings": p["settings"], "fakequant_only": True,
           "calibration_s": round(secs, 2), "images": len(data)}
    for lvl, r in rep["levels"].items():
        for k, v in r.items():
            if k != "images":
                row[f"{lvl}.{k}"] = v
    return row


def _flatten_rows(rows: list[dict]) -> tuple[list[str], list[dict]]:
    flat = []
    for r in rows:
        f = {k: v for k, v in r.items() if k != "settings"}
        for k, v in r.get("settings", {}).items():
            f[f"setting.{k}"] = v
        flat.append(f)
    cols: list[str] = []
    for f in flat:
        for k in f:
            if k not in cols:
                cols.append(k)
    return cols, flat


def run(a) -> int:
    from tqdm import tqdm
    out = Path(a.out)
    points = grid(a)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    log = out / "results.jsonl"
    done: dict[str, dict] = {}
    if log.exists():
        cut = False
        for line in log.read_text().splitlines():
            if line.strip():
                try:
                    r = json.loads(line)
                except json.JSONDecodeError:
                    cut = True        # a line cut by an interruption: that point runs again
                    continue
                done[r["key"]] = r
        if cut:                       # drop the cut line, so that new rows do not continue it
            tmp = out / ".results.jsonl.tmp"
            tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in done.values()))
            os.replace(tmp, log)
    todo = [p for p in points if point_key(p) not in done]
    print(f"sweep: {len(points)} points, {len(points) - len(todo)} already done in {log}, {len(todo)} to run")
    a_dict = {k: v for k, v in vars(a).items() if k != "func"}
    bar = tqdm(total=len(todo), desc="sweep", unit="point", disable=getattr(a, "no_progress", False))
    with open(log, "a") as f:
        def record(row):
            f.write(json.dumps(row, sort_keys=True) + "\n")
            f.flush()
            done[row["key"]] = row
            bar.update(1)
            bar.set_postfix_str(f"{row['key']} engine top-1 {row.get('engine.top1', float('nan')):.4f}")
        if a.jobs <= 1 or len(todo) <= 1:
            if todo:
                _init_worker(a_dict)
            for p in todo:
                record(_run_point(p))
        else:
            import multiprocessing as mp
            ctx = mp.get_context("spawn")
            # Each worker gets its share of the cores for every thread pool it loads (torch, numba,
            # BLAS); spawned children read these at start-up, before they import numpy.
            share = str(max(1, usable_cores() // a.jobs))
            pools = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")
            saved = {k: os.environ.get(k) for k in pools}
            os.environ.update({k: share for k in pools})
            try:
                with ctx.Pool(a.jobs, initializer=_init_worker, initargs=(a_dict,)) as pool:
                    for row in pool.imap_unordered(_run_point, todo):
                        record(row)
            finally:
                for k, v in saved.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v
    bar.close()
    rows = [done[point_key(p)] for p in points if point_key(p) in done]
    cols, flat = _flatten_rows(rows)
    tmp = out / ".results.csv.tmp"
    with open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols)
        w.writeheader()
        w.writerows(flat)
    os.replace(tmp, out / "results.csv")
    tmp = out / ".results.json.tmp"
    tmp.write_text(json.dumps({"points": rows}, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, out / "results.json")
    print(format_rows(rows))
    print(f"\nwrote {out / 'results.csv'} and {out / 'results.json'}")
    _write_plots(rows, out)
    return 0


def _write_plots(rows: list[dict], out: Path) -> None:
    """Accuracy against BOPs / weight storage (intsim/plots.py); a plotting failure only warns,
    the results are already written."""
    if not rows:
        return
    try:
        from .plots import plot_sweep
        res = plot_sweep(rows, out)
        if res["files"]:
            print("wrote " + " and ".join(res["files"]))
    except Exception as e:  # noqa: BLE001 - never lose a finished sweep to a plot
        print(f"sweep: plots not written ({type(e).__name__}: {e}); the results are complete. "
              f"Retry with: intsim plot sweep {out / 'results.json'}")


def format_rows(rows: list[dict]) -> str:
    cols = ("point", "float %", "fake-quant %", "engine %", "engine~fq %", "calib s")
    lines = []
    data = []
    for r in rows:
        def pct(k):
            v = r.get(k)
            return "" if v is None else f"{100 * v:.2f}"
        data.append((r["key"], pct("float.top1"), pct("fakequant.top1"), pct("engine.top1"),
                     pct("engine.agree_fakequant"), f"{r.get('calibration_s', 0):.1f}"))
    w = [max(len(c), *(len(d[i]) for d in data)) if data else len(c) for i, c in enumerate(cols)]
    lines.append("  ".join(c.ljust(x) for c, x in zip(cols, w)))
    lines += ["  ".join(v.ljust(x) for v, x in zip(d, w)) for d in data]
    return "\n".join(lines)
