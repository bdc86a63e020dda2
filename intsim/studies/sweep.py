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

A sweep folder records its configuration in ``OUT/sweep.json``: a resume with other data, image
count or non-grid options exits 2 and says what differs, and ``-o`` refuses a non-empty folder
that is not a sweep folder. Beyond one machine, ``--plan`` / ``--unit KEY`` / ``--unit-index I`` /
``--collect DIR`` / ``--status DIR`` cut the sweep into work units (points, or point x image shard
with ``--shards K``) that any scheduler can run, and ``--executor slurm|local`` submits them
through submitit (``intsim.studies.units``, ``intsim.studies.cluster``, docs/cluster.md).
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import io
import itertools
import json
import time
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..options import write_json_atomic
from ..program.program import write_atomic
from . import cluster, units

GRID_AXES = ("wbits", "abits", "softmax_quant", "ln_rule")


#: Evaluation images up to this many decoded bytes stay in memory for all of a worker's points
#: (CIFAR-10's 10,000 test images: 31 MB); a larger set is decoded again, chunk by chunk, per point,
#: so memory stays flat (50,000 ImageNet images at 224 px would take 7.5 GB).
IN_MEMORY_BYTES = 1 << 30


def _golden_count(v: str) -> int | None:
    """``--golden-images``: 0, a positive count, or 'all' (None)."""
    from ..options import count_or_all
    return 0 if v.strip() == "0" else count_or_all(v)


def _csv_list(kind):
    def parse(v: str):
        items = [x.strip() for x in v.split(",") if x.strip()]
        if not items:
            raise argparse.ArgumentTypeError("empty list")
        return [kind(x) for x in items]
    return parse


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..options import count_or_all, int_type, learning_rate, positive, seed
    from .hw import hw_spec
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
    p.add_argument("--images", type=count_or_all, default=None,
                   help="evaluation images, or 'all' (default: all of --data / bundle)")
    p.add_argument("--calib-data", metavar="PATH")
    p.add_argument("--calib-images", type=positive, default=32)
    from calib.config import RECON_DEFAULTS as RD
    p.add_argument("--reconstruct", action="store_true",
                   help="block reconstruction after calibration at every point (calib.reconstruct); such points "
                        "are keyed with '|recon', so one folder can hold both")
    p.add_argument("--recon-images", type=positive, default=RD["recon_images"],
                   help=f"reconstruction images ({RD['recon_images']})")
    p.add_argument("--recon-iters", type=positive, default=RD["recon_iters"],
                   help=f"reconstruction steps per block ({RD['recon_iters']})")
    p.add_argument("--recon-lr", type=learning_rate, default=RD["recon_lr"],
                   help=f"reconstruction learning rate ({RD['recon_lr']:g})")
    p.add_argument("--golden-images", type=_golden_count, default=0,
                   help="golden model on the first N images per point, or 'all' (default 0)")
    p.add_argument("--batch-size", type=positive, default=64)
    p.add_argument("--seed", type=seed, default=0)
    p.add_argument("--hw", type=hw_spec, default=None, metavar="RxC[:DATAFLOW]",
                   help="also simulate every point's program on a systolic array (intsim hw: SCALE-Sim, default "
                        "SRAM sizes and energy table; e.g. 32x32 or 16x16:os) and add the hw.cycles, "
                        "hw.energy_uj, hw.dram_words and hw.array_util_pct columns and two plots")
    p.add_argument("--jobs", type=positive, default=1,
                   help="worker processes (default 1); with --executor local, the units run at once")
    p.add_argument("-o", "--out", metavar="DIR",
                   help="output folder (created; reused to resume: it records its configuration in sweep.json, "
                        "and a resume with other data, image count or non-grid options is refused)")
    u = p.add_argument_group("work units (docs/cluster.md)")
    u.add_argument("--plan", action="store_true",
                   help="write DIR/plan.json, the list of units (points, or point x image shard), and stop")
    u.add_argument("--shards", type=positive, default=None, metavar="K",
                   help="split each point's images into K shards, one unit each (with --plan or --executor)")
    u.add_argument("--unit", metavar="KEY", help="run the unit KEY of DIR's plan and write its result file")
    u.add_argument("--unit-index", type=int_type(0, None, "a unit index (0, 1, ...)"), metavar="I",
                   help="run the I-th unit (0-based) of DIR's plan, e.g. $SLURM_ARRAY_TASK_ID")
    u.add_argument("--collect", metavar="DIR", help="merge DIR's unit results into results.csv / .json and plots")
    u.add_argument("--status", metavar="DIR", help="print DIR's done / running / failed / missing units")
    from .cluster import add_executor_arguments
    add_executor_arguments(p)


def grid(a) -> list[dict]:
    from intsim.program.format import DEFAULT_SETTINGS
    for b in (a.bits or []) + (a.wbits or []) + (a.abits or []):
        if not 2 <= b <= 8:
            raise UserError(f"bits must be from 2 to 8, not {b}")
    from ..options import SOFTMAX_QUANTS
    for q in a.softmax_quant:
        if q not in SOFTMAX_QUANTS:
            raise UserError(f"unknown post-softmax quantizer '{q}' (known: {', '.join(SOFTMAX_QUANTS)})")
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


# ---- configuration of a sweep folder ------------------------------------------------------

#: Options that every point of a folder shares: a resume, a unit or a re-plan must match them.
NON_GRID = ("model", "weights", "checkpoint", "data", "images", "calib_data", "calib_images", "recon_images",
            "recon_iters", "recon_lr", "golden_images", "batch_size", "seed", "hw")
GRID_OPTIONS = ("bits", "wbits", "abits", "softmax_quant", "ln_rule", "pair", "set", "reconstruct")


def folder_config(a, points: list[dict]) -> dict:
    """What ``sweep.json`` records: the non-grid options (paths made absolute) and the grid."""
    conf = {}
    for k in NON_GRID:
        v = getattr(a, k, None)
        if k in ("data", "calib_data", "checkpoint") and v is not None:
            v = str(Path(v).resolve())
        if k in ("images", "golden_images") and v is None:
            v = "all"
        conf[k] = v
    return {"intsim_sweep": 1, "config": conf,
            "grid": {**{k: getattr(a, k, None) for k in GRID_OPTIONS}, "points": [point_key(p) for p in points]}}


def _flag(k: str) -> str:
    return "--" + k.replace("_", "-")


def config_differences(recorded: dict, current: dict) -> list[str]:
    rc, cc = recorded.get("config", {}), current["config"]
    return [f"{_flag(k)} {rc.get(k)!r} there, {cc.get(k)!r} now" for k in NON_GRID if rc.get(k) != cc.get(k)]


def open_folder(out: Path, a, points: list[dict]) -> dict | None:
    """Check ``out`` before any work: not a file, not a foreign non-empty folder, and (when it is a
    sweep folder) made with the same data, image count and non-grid options. Returns the recorded
    configuration (None for a new folder)."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder")
    conf = out / units.CONFIG
    if not conf.exists():
        if out.is_dir() and any(out.iterdir()):
            raise UserError(f"--out {out} is not empty and is not a sweep folder (no {units.CONFIG}); "
                            f"choose a new or empty folder")
        return None
    try:
        recorded = json.loads(conf.read_text())
        if not isinstance(recorded, dict) or recorded.get("intsim_sweep") != 1:
            raise ValueError("not a sweep record")
    except (OSError, ValueError) as e:
        raise UserError(f"{conf} is not a readable sweep record ({e})") from None
    diff = config_differences(recorded, folder_config(a, points))
    if diff:
        raise UserError(f"{out} was made with other options ({'; '.join(diff)}); use the same options to "
                        f"resume, or a new folder")
    return recorded


def _check_data(a) -> None:
    for opt, v in (("--data", a.data), ("--calib-data", a.calib_data), ("--checkpoint", a.checkpoint)):
        if v is not None and not Path(v).exists():
            raise UserError(f"{opt} {v} not found")


# ---- worker -------------------------------------------------------------------------------

_STATE: dict = {}


def _init_worker(a_dict: dict, shard: tuple[int, int] | None = None) -> None:
    """Load the model and images once per process; ``shard`` (i, K) keeps the i-th of K image shards."""
    import torch
    from intsim.models.zoo import DEFAULT_MODEL, data_config, load_model

    from ..data import Transform, load_images, open_images
    a = argparse.Namespace(**a_dict)
    torch.set_num_threads(max(1, units.usable_cores() // max(1, a.jobs)))
    model, spec, info = load_model(a.model or DEFAULT_MODEL, weights=a.weights, checkpoint=a.checkpoint, seed=a.seed)
    dc = data_config(spec)
    tf = Transform(dc["input_size"][-1], dc["crop_pct"], dc["interpolation"])
    data = open_images(a.data, tf, a.images, split="eval", seed=a.seed)
    total, start, stop = len(data), 0, len(data)
    if shard is not None:
        start, stop = units.shard_range(total, a.batch_size, *shard)
        data = units.sub_stream(data, start, stop)
    if len(data) * 3 * tf.size * tf.size <= IN_MEMORY_BYTES:
        data = data.read()              # decoded once for all points; else decoded chunk by chunk per point
    cal = load_images(a.calib_data, tf, a.calib_images, split="calib", seed=a.seed)
    recon = None
    if getattr(a, "reconstruct", False):
        recon = load_images(a.calib_data, tf, a.recon_images, split="calib", seed=a.seed)
    _STATE.clear()                      # nothing (e.g. the float level) carries over from an earlier sweep
    _STATE.update(a=a, model=model, spec=spec, info=info, dc=dc, data=data, cal=cal, recon=recon,
                  span=(start, stop, total))


def _chunk_of(bs: int) -> int:
    """Images per evaluation chunk: a multiple of the batch size (the batches are those of one pass)."""
    return bs * max(1, -(-256 // bs))


def _chunk() -> int:
    return _chunk_of(_STATE["a"].batch_size)


def _float_level():
    from .. import evaluate as ev
    s = _STATE
    mean, std, bs = s["dc"]["mean"], s["dc"]["std"], s["a"].batch_size
    levels = {"float": lambda x: ev.run_float(s["model"], x, mean, std, bs, False)}
    return ev.evaluate_stream(s["data"], levels, _chunk()).levels["float"]


def _evaluate_point(p: dict):
    """Calibrate point ``p`` and run its levels on this worker's images: ``(Evaluation, extra)``,
    ``extra`` holding what the row needs besides the logits (calibration time, cost, logit scale)."""
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
        s["float"] = _float_level() if len(data) else None
    if p["ln_rule"] == "channel":
        return _evaluate_channel_point(p, cfg)
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
    start, _, total = s["span"]
    n_golden = total if a.golden_images is None else a.golden_images
    evaluation = ev.evaluate_stream(data, levels, _chunk(), limits={"golden": max(0, n_golden - start)})
    evaluation.levels = {**({"float": s["float"]} if s["float"] is not None else {}), **evaluation.levels}
    cost = None
    try:
        from .cost import program_cost
        cost = {k: v for k, v in program_cost(prog)["total"].items() if not isinstance(v, dict)}
    except ImportError:
        pass
    extra = {"calibration_s": round(calib_s, 2), "logit_scale": scale, "cost": cost,
             "labels_ok": len(data.classes) == prog.model.get("num_classes")}
    if getattr(a, "hw", None):
        from .hw import sweep_columns
        extra["hw"] = sweep_columns(prog, a.hw)
    return evaluation, extra


def _evaluate_channel_point(p: dict, cfg):
    """The fake-quant-only upper bound: per-channel post-LN quantizers, no reparameterization
    (calib.vit.channelwise_fakequant); no program, so no engine, golden or cost figures."""
    from calib.vit import channelwise_fakequant

    from .. import evaluate as ev
    s = _STATE
    data = s["data"]
    t0 = time.perf_counter()
    if not len(data):               # an empty shard (more shards than batches)
        return ev.Evaluation(), {"calibration_s": 0.0, "logit_scale": 1.0, "cost": None, "fakequant_only": True,
                                 "labels_ok": True}
    logits = channelwise_fakequant(s["model"], s["cal"].images, s["dc"]["mean"], s["dc"]["std"], cfg,
                                   (part.images for _, part in data.chunks(_chunk())))
    secs = time.perf_counter() - t0
    evaluation = ev.Evaluation()
    if s["float"] is not None:
        evaluation.levels["float"] = s["float"]
    evaluation.levels["fakequant"] = ev.LevelResult(logits, secs, len(data))
    extra = {"calibration_s": round(secs, 2), "logit_scale": 1.0, "cost": None, "fakequant_only": True,
             "labels_ok": len(data.classes) == logits.shape[1]}
    return evaluation, extra


def point_row(p: dict, evaluation, labels, extra: dict, images: int) -> dict:
    """A point's row of results.csv from its levels (whole, or merged from its shards)."""
    from .. import evaluate as ev
    rep = ev.compare(evaluation, labels if extra["labels_ok"] else None)
    row = {"key": point_key(p), **{k: p[k] for k in GRID_AXES}, "settings": p["settings"]}
    if extra.get("fakequant_only"):
        row["fakequant_only"] = True
    elif p.get("reconstruct"):
        row["reconstruct"] = True
    row.update({"calibration_s": extra["calibration_s"], "images": images})
    for lvl, r in rep["levels"].items():
        for k, v in r.items():
            if k != "images":
                row[f"{lvl}.{k}"] = v
    if extra.get("fakequant_only"):
        return row
    if "engine_vs_golden" in rep:
        row["engine_vs_golden.logits_differing"] = rep["engine_vs_golden"]["logits_differing"]
        row["engine_vs_golden.images"] = rep["engine_vs_golden"]["images"]
    for k, v in rep.get("saturation", {}).get("total", {}).items():
        row[f"saturation.{k}"] = v
    if extra.get("cost") is not None:
        row.update({f"cost.{k}": v for k, v in extra["cost"].items()})
    if extra.get("hw") is not None:
        row.update({f"hw.{k}": v for k, v in extra["hw"].items()})
    return row


def _run_point(p: dict) -> dict:
    evaluation, extra = _evaluate_point(p)
    data = _STATE["data"]
    return point_row(p, evaluation, data.labels, extra, len(data))


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


def write_results(rows: list[dict], out: Path) -> None:
    """results.csv, results.json (atomically), the table and the plots."""
    cols, flat = _flatten_rows(rows)
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\r\n")
    w.writeheader()
    w.writerows(flat)
    write_atomic(out / "results.csv", buf.getvalue().encode())
    write_json_atomic(str(out / "results.json"), {"points": rows})
    print(format_rows(rows))
    print(f"\nwrote {out / 'results.csv'} and {out / 'results.json'}")
    _write_plots(rows, out)


def _modes(a) -> str:
    """Which of the exclusive modes the command line asks for (checked before any work)."""
    modes = [m for m, on in (("--plan", a.plan), ("--unit", a.unit is not None),
                             ("--unit-index", a.unit_index is not None), ("--collect", a.collect is not None),
                             ("--status", a.status is not None), ("--executor", a.executor is not None)) if on]
    if len(modes) > 1:
        raise UserError(f"{' and '.join(modes)} cannot be combined")
    mode = modes[0] if modes else "pool"
    if mode in ("--collect", "--status"):
        return mode
    if not a.out:
        raise UserError("-o/--out DIR is required" + ("" if mode == "pool" else f" with {mode}"))
    if mode == "pool" and a.shards not in (None, 1):
        raise UserError("--shards needs --plan or --executor (a --jobs sweep runs every point whole)")
    return mode


def run(a) -> int:
    mode = _modes(a)
    if mode == "--status":
        return cluster.print_status(Path(a.status))
    if mode == "--collect":
        return collect(Path(a.collect))
    if mode == "--executor":
        cluster.require_submitit(a.executor)
        cluster.check_options(a)
    out = Path(a.out)
    points = grid(a)
    _check_data(a)
    if mode in ("--unit", "--unit-index"):
        return run_unit(a, out, points)
    recorded = open_folder(out, a, points)
    if mode in ("--plan", "--executor"):
        plan = make_plan(a, out, points, recorded)
        if mode == "--plan":
            n = len(plan["units"])
            print(f"sweep plan: {len(points)} points x {plan['shards']} shard(s) = {n} units in {out / units.PLAN}\n"
                  f"run them with: intsim sweep <the same options> --unit-index I -o {out}   (I = 0..{n - 1})\n"
                  f"then: intsim sweep --collect {out}")
            return 0
        rc = cluster.run_sweep_units(a, out, plan)
        return rc if rc else collect(out)
    return _run_pool(a, out, points)


def _run_pool(a, out: Path, points: list[dict]) -> int:
    """The single-machine sweep: points in ``--jobs`` worker processes, rows appended to results.jsonl."""
    from tqdm import tqdm
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(str(out / units.CONFIG), folder_config(a, points))
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
            write_atomic(log, "".join(json.dumps(r, sort_keys=True) + "\n" for r in done.values()).encode())
    todo = [p for p in points if point_key(p) not in done]
    print(f"sweep: {len(points)} points, {len(points) - len(todo)} already done in {log}, {len(todo)} to run")
    a_dict = {k: v for k, v in vars(a).items() if k != "func"}
    bar = tqdm(total=len(todo), desc="sweep", unit="point", disable=getattr(a, "no_progress", False))
    with contextlib.ExitStack() as stack:
        files = []

        def record(row):             # results.jsonl is opened at the first finished point, not before
            if not files:
                files.append(stack.enter_context(open(log, "a")))
            files[0].write(json.dumps(row, sort_keys=True) + "\n")
            files[0].flush()
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
            # BLAS), as a unit does; spawned children read these at start-up, before they import numpy.
            with cluster.environ(cluster.unit_env(a, a.jobs)):
                with ctx.Pool(a.jobs, initializer=_init_worker, initargs=(a_dict,)) as pool:
                    for row in pool.imap_unordered(_run_point, todo):
                        record(row)
    bar.close()
    write_results([done[point_key(p)] for p in points if point_key(p) in done], out)
    return 0


# ---- units: plan, one unit, collect ---------------------------------------------------------

def make_plan(a, out: Path, points: list[dict], recorded: dict | None) -> dict:
    """Write (or extend) ``plan.json``: every point x shard as a unit with a stable key. A folder
    planned with K shards keeps K (its finished units would not merge with another K)."""
    old = units.read_plan(out) if (out / units.PLAN).exists() else None
    shards = a.shards or (old["shards"] if old else 1)
    if old and old["shards"] != shards:
        raise UserError(f"{out} was planned with --shards {old['shards']}, not {shards}")
    plan = {"intsim_sweep_plan": 1, "shards": shards, "units": []}
    for p in points:
        for i in range(shards):
            key = units.unit_key(point_key(p), i, shards)
            plan["units"].append({"key": key, "file": units.unit_file(key), "point": p, "shard": i,
                                  "shards": shards})
    out.mkdir(parents=True, exist_ok=True)
    (out / units.UNITS).mkdir(exist_ok=True)
    conf = folder_config(a, points)
    write_json_atomic(str(out / units.CONFIG), conf)
    plan["config"] = conf
    write_json_atomic(str(out / units.PLAN), plan)
    return plan


def run_unit(a, out: Path, points: list[dict]) -> int:
    """``--unit KEY`` / ``--unit-index I``: check the command line against DIR's plan (same grid,
    same options), then run that unit and write its result file atomically."""
    plan = units.read_plan(out)
    current = folder_config(a, points)
    diff = config_differences(plan["config"], current)
    if diff:
        raise UserError(f"{out} was planned with other options ({'; '.join(diff)})")
    mine, theirs = set(current["grid"]["points"]), set(plan["config"]["grid"]["points"])
    if mine != theirs:
        only_plan, only_here = sorted(theirs - mine), sorted(mine - theirs)
        raise UserError(f"{out} was planned for a different grid ({len(theirs)} points there, {len(mine)} here; "
                        f"only there: {', '.join(only_plan[:3]) or '-'}; only here: {', '.join(only_here[:3]) or '-'})")
    if a.shards is not None and a.shards != plan["shards"]:
        raise UserError(f"{out} was planned with --shards {plan['shards']}, not {a.shards}")
    if a.unit is not None:
        found = [u for u in plan["units"] if u["key"] == a.unit]
        if not found:
            raise UserError(f"unknown unit key '{a.unit}' (the plan {out / units.PLAN} has {len(plan['units'])} "
                            f"units, e.g. '{plan['units'][0]['key']}')")
        unit = found[0]
    else:
        if a.unit_index >= len(plan["units"]):
            raise UserError(f"--unit-index {a.unit_index} is out of range: the plan has {len(plan['units'])} units "
                            f"(0..{len(plan['units']) - 1})")
        unit = plan["units"][a.unit_index]
    result = out / units.UNITS / unit["file"]
    if result.exists():
        print(f"unit {unit['key']}: already done ({result})")
        return 0
    a_dict = {k: v for k, v in vars(a).items() if k != "func"}
    t0 = time.perf_counter()
    units.run_marked(result, lambda: _unit_body(a_dict, unit, result))
    print(f"unit {unit['key']}: wrote {result} in {time.perf_counter() - t0:.1f} s")
    return 0


def job_unit(args: dict, index: int) -> None:
    """A unit as a scheduler runs it (:class:`intsim.studies.cluster.UnitJob`): ``--unit-index``
    with the options of the command that submitted it."""
    a = argparse.Namespace(**dict(args, unit=None, unit_index=index, executor=None, plan=False))
    run_unit(a, Path(a.out), grid(a))


def _unit_body(a_dict: dict, unit: dict, result: Path) -> None:
    _init_worker(a_dict, (unit["shard"], unit["shards"]))
    evaluation, extra = _evaluate_point(unit["point"])
    start, stop, total = _STATE["span"]
    data = _STATE["data"]
    units.save_result(result, {"key": unit["key"], "point_key": point_key(unit["point"]), "shard": unit["shard"],
                               "shards": unit["shards"], "start": start, "stop": stop, "total": total, **extra},
                      evaluation, data.labels)


def collect(out: Path) -> int:
    """Merge the unit results of ``out`` (in plan order) into results.csv / .json and the plots."""
    plan = units.read_plan(out)
    missing = [u["key"] for u in plan["units"] if not (out / units.UNITS / u["file"]).exists()]
    if missing:
        raise UserError(f"{out}: {len(missing)} of {len(plan['units'])} units have no result yet (e.g. "
                        f"{', '.join(missing[:3])}); run them, or see intsim sweep --status {out}")
    by_point: dict[str, list[dict]] = {}
    for u in plan["units"]:
        by_point.setdefault(point_key(u["point"]), []).append(u)
    rows = []
    for key, us in by_point.items():
        metas, parts, labels = [], [], []
        for u in sorted(us, key=lambda u: u["shard"]):
            meta, levels, lab = units.load_result(out / units.UNITS / u["file"])
            metas.append(meta)
            parts.append(levels)
            if lab is not None:
                labels.append(lab)
        pos = 0
        for m in metas:
            if m["start"] != pos or m["total"] != metas[0]["total"]:
                raise UserError(f"{out}: the shards of {key} do not cover the images in order (shard {m['shard']} "
                                f"starts at image {m['start']}, expected {pos}); delete its unit files and rerun them")
            pos = m["stop"]
        if pos != metas[0]["total"]:
            raise UserError(f"{out}: the shards of {key} cover {pos} of {metas[0]['total']} images")
        evaluation = units.merge_levels(parts)
        lab = np.concatenate(labels) if labels else None
        extra = next(m for m in metas if m["stop"] > m["start"]) if pos else metas[0]
        rows.append(point_row(us[0]["point"], evaluation, lab, extra, pos))
    write_results(rows, out)
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
