"""``intsim plot``: the co-design plots (matplotlib, Agg, PNG).

* **sweep** (:func:`plot_sweep`): from a sweep's ``results.json``, top-1 accuracy against
  bit-operations (``cost.bops``) and against packed weight storage (``cost.weight_bits``), engine
  (filled) and fake-quant (hollow) per point, each point labelled by its configuration and the
  Pareto front of the engine accuracy (fewest BOPs / bits for a given accuracy) drawn as a
  step line. ``intsim sweep`` writes these two at its end; with ``--hw`` also accuracy against
  energy per image (``hw.energy_uj``) and against cycles per image (``hw.cycles``).
* **softmax** (:func:`plot_softmax`): the post-softmax probabilities of one block on
  calibration images (the float model, ``reference.vit.forward`` hooked at
  ``blocks.{i}.attn.probs``) as a histogram over log-spaced bins (log-log axes), with the levels
  of each post-softmax quantizer at the given bits drawn over it, one panel per quantizer:
  the program's own quantizer where its type matches, else the best of that family searched
  on the same probabilities with ``calib.softmax_search.search`` (or the family's default
  parameters with ``search=False``). Level 0 (= probability 0) cannot appear on a log axis.
* **sqnr** (:func:`layer_sqnr`, :func:`plot_sqnr`): per value of the program (every
  integer-valued point of the engine: codes and int values) the SQNR in dB of fake-quant against
  float and of the engine against fake-quant, ``10 log10(sum ref^2 / sum (x - ref)^2)`` over all
  elements of the images. Float values come from ``reference.vit.forward`` (identity hook; the
  hook points and taps carry the program's value names); LayerNorm outputs of the float model
  are mapped into the program's reparameterized space (``y' = gamma' (y - beta) / gamma + beta'``,
  gamma / beta of the float model, gamma' / beta' of the program), since the fake-quant model
  and the engine compute those. Fake-quant values from ``FakeQuantModel`` (tap), engine values
  from ``Engine.forward(keep=True)`` as ``scale * (v - zero_point)``. A noise of exactly zero gives
  ``SQNR_CAP_DB`` with ``exact: true`` (JSON has no infinity).
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from ..errors import UserError
from ..program.program import write_atomic
from ..options import bits, non_negative

if TYPE_CHECKING:
    import torch

SQNR_CAP_DB = 200.0
QUANT_TYPES = ("uniform", "log2", "log2sqrt", "tanq", "adalog", "sulq", "twin")
SWEEP_PNGS = ("accuracy_vs_bops.png", "accuracy_vs_weight_storage.png")
#: written too when the sweep ran with ``--hw`` (its ``hw.*`` columns, from ``intsim hw``)
SWEEP_HW_PNGS = ("accuracy_vs_energy.png", "accuracy_vs_cycles.png")


# ---- figure helpers -----------------------------------------------------------------------------

def _figure(w: float, h: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(w, h), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str | os.PathLike) -> str:
    """Write ``fig`` as PNG atomically (temporary name in the same folder, then rename)."""
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", bbox_inches="tight"))
    return str(Path(path))


def _write_json(path: str | os.PathLike, data: Any) -> None:
    write_atomic(path, (json.dumps(data, indent=1, sort_keys=True, allow_nan=False) + "\n").encode())


# ---- (a) sweep: accuracy against cost ------------------------------------------------------------

def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points (cost, accuracy) not dominated by another: no point has cost <= and
    accuracy >= with one strict. Sorted by cost."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], -math.inf
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def point_label(row: dict) -> str:
    """Short configuration label of a sweep row: W4A4 tanq/mosf acc_bits=20."""
    lab = f"W{row.get('wbits')}A{row.get('abits')} {row.get('softmax_quant')}/{row.get('ln_rule')}"
    s = row.get("settings") or {}
    if s:
        lab += " " + " ".join(f"{k}={v}" for k, v in sorted(s.items()))
    return lab


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v) if math.isfinite(float(v)) else None


def plot_sweep(results: str | os.PathLike | list[dict], out_dir: str | os.PathLike) -> dict[str, Any]:
    """Accuracy against BOPs and against weight storage from a sweep's ``results.json`` (or its
    rows); writes ``accuracy_vs_bops.png`` and ``accuracy_vs_weight_storage.png`` in ``out_dir``.
    Returns ``{"files": [...], "pareto": {x column: [point keys]}}``."""
    if isinstance(results, (str, os.PathLike)):
        p = Path(results)
        if not p.is_file():
            raise UserError(f"sweep results not found: {p}")
        try:
            data = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise UserError(f"{p} is not valid JSON: {e}") from None
        rows = data.get("points", data) if isinstance(data, dict) else data
    else:
        rows = list(results)
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise UserError("sweep results must be {\"points\": [rows]} as written by intsim sweep")
    out = Path(out_dir)
    axes = [("cost.bops", 1e-9, "GBOPs per image (bit-operations)", SWEEP_PNGS[0]),
            ("cost.weight_bits", 1.0 / 8192, "packed weight storage (KiB)", SWEEP_PNGS[1]),
            ("hw.energy_uj", 1.0, "energy per image (µJ, intsim hw)", SWEEP_HW_PNGS[0]),
            ("hw.cycles", 1e-6, "Mcycles per image (intsim hw)", SWEEP_HW_PNGS[1])]
    titles = {"cost.bops": "bit-operations", "cost.weight_bits": "weight storage", "hw.energy_uj": "energy",
              "hw.cycles": "cycles"}
    levels = [("engine.top1", "engine (integer)", "o", True), ("fakequant.top1", "fake-quant", "s", False)]
    result: dict[str, Any] = {"files": [], "pareto": {}}
    usable = [r for r in rows if any(_num(r.get(a[0])) is not None for a in axes)]
    if not usable:
        raise UserError("the sweep results have no cost columns (cost.bops, cost.weight_bits): was intsim/studies/cost.py "
                        "importable when the sweep ran?")
    for col, mul, xlabel, fname in axes:
        fig = _figure(9, 6)
        ax = fig.add_subplot(1, 1, 1)
        front_level = next((lv for lv in levels if any(_num(r.get(lv[0])) is not None and _num(r.get(col)) is not None
                                                      for r in rows)), None)
        plotted = 0
        for key, name, marker, filled in levels:
            pts = [(_num(r.get(col)) * mul, _num(r.get(key)) * 100, r) for r in rows
                   if _num(r.get(col)) is not None and _num(r.get(key)) is not None]
            if not pts:
                continue
            xs, ys = [p[0] for p in pts], [p[1] for p in pts]
            style = {"color": "C0"} if filled else {"facecolors": "none", "edgecolors": "C1"}
            ax.scatter(xs, ys, marker=marker, s=40, label=name, zorder=3, **style)
            plotted += len(pts)
            if front_level is not None and key == front_level[0]:
                front = pareto_front([(x, y) for x, y, _ in pts])
                fx, fy = [pts[i][0] for i in front], [pts[i][1] for i in front]
                ax.step(fx, fy, where="post", color="C3", lw=1.5, zorder=2, label=f"Pareto front ({name})")
                ax.scatter(fx, fy, s=120, facecolors="none", edgecolors="C3", lw=1.5, zorder=4)
                result["pareto"][col] = [pts[i][2].get("key", point_label(pts[i][2])) for i in front]
                labels: dict[tuple[float, float], list[str]] = {}
                for x, y, r in pts:          # points at the same place share one label
                    labels.setdefault((round(x, 12), round(y, 9)), []).append(point_label(r))
                for (x, y), labs in labels.items():
                    ax.annotate("\n".join(labs), (x, y), textcoords="offset points", xytext=(4, 3), fontsize=6.5,
                                color="0.25")
        if not plotted:
            continue
        xs_all = [_num(r.get(col)) for r in rows if _num(r.get(col))]
        if xs_all and max(xs_all) / max(min(xs_all), 1e-30) > 20:
            ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("top-1 accuracy (%)")
        arrays = sorted({str(r.get("hw.array")) for r in rows if r.get("hw.array")}) if col.startswith("hw.") else []
        ax.set_title(f"accuracy against {titles[col]}{' on ' + ', '.join(arrays) if arrays else ''} "
                     f"({len(rows)} sweep points)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
        result["files"].append(_save(fig, out / fname))
    return result


# ---- (b) post-softmax distribution with quantizer levels ------------------------------------------

def capture_attention(params, images: np.ndarray, block: int, batch_size: int = 32
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Float probabilities (n, H, T, T) and values v (n, H, T, d) of block ``block``."""
    import torch

    from reference.vit import forward
    if not 0 <= block < len(params.blocks):
        raise UserError(f"block {block} out of range: the model has blocks 0..{len(params.blocks) - 1}")
    probs, vs = [], []
    name_p, name_v = f"blocks.{block}.attn.probs", f"blocks.{block}.attn.v"
    H = params.num_heads

    def hook(name: str, x: torch.Tensor) -> torch.Tensor:
        if name == name_p:
            probs.append(x.detach().clone())
        elif name == name_v:
            B, T, D = x.shape
            vs.append(x.detach().reshape(B, T, H, D // H).transpose(1, 2).contiguous())
        return x

    for s in range(0, len(images), batch_size):
        forward(params, images[s:s + batch_size], hook=hook)
    return torch.cat(probs), torch.cat(vs)


def softmax_quantizers(program, block: int | None, bits: int, probs=None, v=None, search: bool = True,
                       prob_bits: int = 16, rows: int = 32, seed: int = 0) -> dict[str, dict[str, Any]]:
    """One quantizer per type at ``bits``: the program's own (same type and bits, in block
    ``block``), else searched on ``probs`` / ``v`` (``rows`` sampled query rows), else the family's
    default parameters. Returns ``{type: {"quant": q, "source": str, "error": float | None}}``."""
    import torch

    from calib import softmax_search
    from intsim.program.quantizers import from_dict, make
    own = None
    if program is not None and block is not None:
        op = next((o for o in program.ops if o["type"] == "attention" and o["name"].startswith(f"blocks.{block}.")),
                  None)
        if op is not None:
            own = from_dict(op["attrs"]["softmax_quant"])
    sample = None
    if probs is not None and v is not None:
        n, H, T, _ = probs.shape
        g = torch.Generator().manual_seed(seed)
        idx = torch.randperm(T, generator=g)[:min(rows, T)].sort().values
        sample = (probs[:, :, idx, :], v)
    out: dict[str, dict[str, Any]] = {}
    defaults = {"uniform": {"scale": 1.0 / ((1 << bits) - 1)}, "log2": {"delta": 1.0}, "log2sqrt": {"delta": 1.0},
                "tanq": {"t0": -1.0, "t1": 1.0}, "adalog": {"delta": 1.0, "q": 37.0, "r": 37.0},
                "sulq": {"eta": 0.01, "top": 1.0}, "twin": {"m": 4.0}}
    for t in QUANT_TYPES:
        if own is not None and own.type == t and int(own.bits) == int(bits):
            q, src = own, "program"
        elif search and sample is not None:
            q, src = softmax_search.search(t, bits, sample[0], sample[1], prob_bits), "searched"
        else:
            q, src = make(t, bits, **defaults[t]), "default"
        err = None
        if sample is not None:
            data = softmax_search._Sample(sample[0], sample[1], min(int(prob_bits), 16))
            ref = float((data.target.to(torch.float64) ** 2).sum())
            err = softmax_search.attention_error(q, data) / max(ref, 1e-30)
        out[t] = {"quant": q, "source": src, "error": err}
    return out


def plot_softmax(probs, quants: dict[str, dict[str, Any]], out_png: str | os.PathLike, title: str = "") -> str:
    """Histogram of ``probs`` on log-spaced bins (log-log) with each quantizer's levels drawn over it."""
    p = np.asarray(probs.detach().cpu().numpy() if hasattr(probs, "detach") else probs, dtype=np.float64).ravel()
    pos = p[p > 0]
    lo = max(float(pos.min()) if pos.size else 1e-8, 1e-12)
    bins = np.logspace(math.floor(math.log10(lo)), 0, 81)
    counts, edges = np.histogram(np.clip(pos, bins[0], 1.0), bins=bins)
    n_zero = int(p.size - pos.size)
    types = [t for t in QUANT_TYPES if t in quants]
    lv_min = min([float(lv) for t in types for lv in quants[t]["quant"].levels() if lv > 0] + [float(edges[0])])
    xmin = max(min(float(edges[0]), lv_min) / 1.5, 1e-12)
    fig = _figure(10, 2.3 * max(1, len(types)) + 0.6)
    axs = [fig.add_subplot(len(types), 1, i + 1) for i in range(len(types))] or [fig.add_subplot(1, 1, 1)]
    for i, (ax, t) in enumerate(zip(axs, types)):
        ax.stairs(np.maximum(counts, 0.5), edges, fill=True, color="0.75", baseline=0.5,
                  label=f"probabilities ({p.size:,}; {n_zero:,} exactly 0)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        info = quants[t]
        q = info["quant"]
        lv = q.levels()[1:q.used()]  # level 0 cannot show on a log axis; unused codes repeat the top
        for j, level in enumerate(lv):
            if level > 0:
                ax.axvline(level, color=f"C{i}", lw=0.9, alpha=0.9,
                           label=(f"{t} levels ({info['source']}" + (f", rel. attn. error {info['error']:.2e}"
                                                                    if info.get("error") is not None else "")
                                  + ")") if j == 0 else None)
        params = ", ".join(f"{k}={v:.4g}" for k, v in q.to_dict().items() if k not in ("type", "bits"))
        ax.set_ylabel("count")
        ax.text(0.01, 0.95, f"{t}, {q.bits} bits: {params}", transform=ax.transAxes, fontsize=8, va="top")
        ax.legend(fontsize=7, loc="upper right")
        ax.set_xlim(xmin, 1.05)
    axs[-1].set_xlabel("post-softmax probability (log scale; level 0 not shown)")
    if title:
        axs[0].set_title(title)
    return _save(fig, out_png)


# ---- (c) per-layer SQNR ------------------------------------------------------------------------

def sqnr_db(ref: np.ndarray, x: np.ndarray) -> tuple[float, bool]:
    """``10 log10(sum ref^2 / sum (x - ref)^2)`` in float64; (SQNR_CAP_DB, True) when the noise is 0."""
    ref = np.asarray(ref, dtype=np.float64)
    x = np.asarray(x, dtype=np.float64)
    sig = float(np.sum(ref * ref))
    noise = float(np.sum((x - ref) ** 2))
    if noise == 0.0:
        return SQNR_CAP_DB, True
    if sig == 0.0:
        return -SQNR_CAP_DB, False
    return float(min(SQNR_CAP_DB, max(-SQNR_CAP_DB, 10.0 * math.log10(sig / noise)))), False


def _collect(fn: Callable[[Callable[[str, Any], None]], None], keep: set[str]) -> dict[str, np.ndarray]:
    """Run ``fn(tap)`` and concatenate, per name in ``keep``, the batches the tap saw (float64 numpy)."""
    import torch
    got: dict[str, list[np.ndarray]] = {}

    def tap(name: str, x) -> None:
        if name in keep:
            got.setdefault(name, []).append(x.detach().to(dtype=torch.float64).cpu().numpy())

    fn(tap)
    return {k: np.concatenate(v, axis=0) for k, v in got.items()}


def layer_sqnr(program, params, images: np.ndarray, batch_size: int = 16) -> dict[str, Any]:
    """Per-value SQNR of fake-quant against float and of the engine against fake-quant.

    ``params``: the float model's ``reference.vit.ViTParams`` (``params_from_timm``) with the
    same input normalization as the program. Returns ``{"points": [...], "images": n}``; each
    point has the value name, op type, kind, bits, both SQNRs (dB) and ``exact`` flags.
    """
    from reference.fakequant import FakeQuantModel
    from reference.vit import forward

    from ..engine import Engine
    images = np.asarray(images)
    vals = program.values
    (inp,) = program.header["inputs"]

    def run_float(tap):
        def hook(name, x):
            tap(name, x)
            return x
        for s in range(0, len(images), batch_size):
            forward(params, images[s:s + batch_size], hook=hook, tap=tap)

    keep = {n for n, v in vals.items() if v["kind"] != "image"}
    flt = _collect(run_float, keep)
    fq = _collect(lambda tap: FakeQuantModel(program).forward(images, tap=tap, batch_size=batch_size), keep)
    eng = Engine(program)
    eng_vals: dict[str, list[np.ndarray]] = {}
    for s in range(0, len(images), batch_size):
        _, _, kept = eng.forward(images[s:s + batch_size], keep=True)
        for name, v in kept.items():
            if name != inp:
                eng_vals.setdefault(name, []).append(np.asarray(v))
    # LayerNorm outputs: float model -> the program's reparameterized affine
    ln_float = {"norm": (params.norm_w, params.norm_b)}
    for i, bp in enumerate(params.blocks):
        ln_float[f"blocks.{i}.norm1"] = (bp.norm1_w, bp.norm1_b)
        ln_float[f"blocks.{i}.norm2"] = (bp.norm2_w, bp.norm2_b)
    points = []
    for op in program.ops:
        name = op["output"]
        info = vals[name]
        if info["kind"] == "image":
            continue
        e = np.concatenate(eng_vals[name], axis=0).astype(np.float64)
        e = float(info["scale"]) * (e - float(info.get("zero_point", 0)))
        f = fq.get(name)
        fl = flt.get(name)
        if op["type"] == "layernorm" and fl is not None and name in ln_float:
            g = ln_float[name][0].double().numpy()
            b = ln_float[name][1].double().numpy()
            g2 = program.t(op, "gamma").astype(np.float64)
            b2 = program.t(op, "beta").astype(np.float64)
            with np.errstate(divide="ignore", invalid="ignore"):
                fl = np.where(g != 0, g2 * (fl - b) / np.where(g != 0, g, 1.0) + b2, b2)
        row: dict[str, Any] = {"value": name, "op": op["name"], "type": op["type"], "kind": info["kind"],
                               "bits": int(info["bits"]), "elements": int(e.size)}
        if f is not None and fl is not None and f.shape == fl.shape:
            row["fakequant_vs_float_db"], row["fakequant_vs_float_exact"] = sqnr_db(fl, f)
        else:
            row["fakequant_vs_float_db"], row["fakequant_vs_float_exact"] = None, False
        if f is not None and f.shape == e.shape:
            row["engine_vs_fakequant_db"], row["engine_vs_fakequant_exact"] = sqnr_db(f, e)
        else:
            row["engine_vs_fakequant_db"], row["engine_vs_fakequant_exact"] = None, False
        points.append(row)
    return {"images": int(len(images)), "cap_db": SQNR_CAP_DB,
            "definition": "10 log10(sum ref^2 / sum (x - ref)^2) over all elements; ref = float for "
                          "fake-quant, fake-quant for the engine", "points": points}


def plot_sqnr(sqnr: dict[str, Any], out_png: str | os.PathLike, title: str = "") -> str:
    """Grouped bars per value: fake-quant vs float and engine vs fake-quant (dB)."""
    pts = sqnr["points"]
    names = [p["value"] for p in pts]
    x = np.arange(len(pts))
    w = 0.4
    fig = _figure(max(8.0, 0.32 * len(pts) + 2), 5.5)
    ax = fig.add_subplot(1, 1, 1)
    for k, (key, lab, col) in enumerate((("fakequant_vs_float_db", "fake-quant vs float", "C0"),
                                         ("engine_vs_fakequant_db", "engine vs fake-quant", "C1"))):
        ys = np.array([np.nan if p.get(key) is None else p[key] for p in pts], dtype=np.float64)
        exact = [bool(p.get(key.replace("_db", "_exact"))) for p in pts]
        ax.bar(x + (k - 0.5) * w, np.where(np.isnan(ys), 0, ys), w, color=col, label=lab)
        for i, ex in enumerate(exact):
            if ex:
                ax.text(x[i] + (k - 0.5) * w, ys[i], "=", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=75, ha="right", fontsize=7)
    ax.set_ylabel("SQNR (dB)")
    ax.axhline(0, color="0.3", lw=0.8)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title or f"per-layer SQNR over {sqnr.get('images')} images ('=' marks an exact match, "
                          f"capped at {SQNR_CAP_DB:g} dB)")
    return _save(fig, out_png)


# ---- command line -------------------------------------------------------------------------------

def add_arguments(p) -> None:
    """``intsim plot {sweep,softmax,sqnr}``."""
    from ..options import add_model_args, positive
    sub = p.add_subparsers(dest="plot", metavar="PLOT")
    s = sub.add_parser("sweep", help="accuracy against BOPs and weight storage from a sweep's results.json",
                       description="Accuracy against bit-operations and against weight storage, Pareto front "
                                   "marked, from OUT/results.json of intsim sweep.")
    s.add_argument("results", metavar="RESULTS_JSON", help="the sweep's results.json (or its folder)")
    s.add_argument("-o", "--out", metavar="DIR", help="folder for the PNGs (default: the results' folder)")

    m = sub.add_parser("softmax", help="post-softmax distribution of a block with the quantizers' levels",
                       description="Histogram (log-log) of the float post-softmax probabilities of one block on "
                                   "calibration images, with the levels of the uniform, log2, log2sqrt, TanQ, AdaLog, "
                                   "SULQ and twin-uniform quantizers drawn over it (the program's own where it matches, else searched).")
    m.add_argument("--program", required=True, metavar="FILE")
    m.add_argument("--block", type=non_negative, default=0, help="block index (default 0)")
    m.add_argument("--bits", type=bits, default=None, help="quantizer bits (default: the program's abits)")
    m.add_argument("--calib-data", metavar="PATH", help="images (default: the bundled calibration set)")
    m.add_argument("--images", type=positive, default=32, help="number of images (32)")
    m.add_argument("--no-search", action="store_true", help="default quantizer parameters instead of a search")
    m.add_argument("-o", "--out", required=True, metavar="PNG")
    add_model_args(m)

    q = sub.add_parser("sqnr", help="per-layer SQNR: fake-quant vs float and engine vs fake-quant",
                       description="SQNR (dB) at every integer-valued point of the program: fake-quant against "
                                   "float and engine against fake-quant, as a bar plot and JSON.")
    q.add_argument("--program", required=True, metavar="FILE")
    q.add_argument("--data", metavar="PATH", help="images (default: the bundled evaluation set)")
    q.add_argument("--images", type=positive, default=32, help="number of images (32)")
    q.add_argument("-o", "--out", required=True, metavar="PNG")
    q.add_argument("--json", metavar="FILE", help="also write the figures as JSON (default: PNG path with .json)")
    add_model_args(q)


def _float_params(a, prog):
    """The float model's parameters for a program, with the program's input normalization."""
    from reference.vit import params_from_timm
    from intsim.models.zoo import data_config

    from ..options import model_for_program
    model, spec, _ = model_for_program(a, prog)
    cal = prog.header.get("provenance", {}).get("calibration", {})
    dc = data_config(spec)
    mean, std = cal.get("mean", dc["mean"]), cal.get("std", dc["std"])
    return params_from_timm(model, mean, std), spec


def transform_for(spec):
    from intsim.models.zoo import data_config

    from ..data import Transform
    dc = data_config(spec)
    return Transform(size=dc["input_size"][-1], crop_pct=dc["crop_pct"], interpolation=dc["interpolation"])


def run(a) -> int:
    from ..options import check_writable
    if a.plot == "sweep":
        res = Path(a.results)
        if res.is_dir():
            res = res / "results.json"
        out = Path(a.out) if a.out else res.parent
        if not out.is_dir():
            raise UserError(f"output folder {out} does not exist")
        for f in SWEEP_PNGS:
            check_writable(str(out / f), "plot")
        r = plot_sweep(res, out)
        for f in r["files"]:
            print(f"wrote {f}")
        for col, keys in r["pareto"].items():
            print(f"Pareto front ({col}): {', '.join(keys)}")
        return 0
    from intsim.program.format import load
    if a.plot == "softmax":
        check_writable(a.out, "plot")
        prog = load(a.program)
        params, spec = _float_params(a, prog)
        if not 0 <= a.block < len(params.blocks):
            raise UserError(f"--block {a.block} out of range: the model has blocks 0..{len(params.blocks) - 1}")
        bits = a.bits or int(prog.settings["abits"])
        if not 2 <= bits <= 8:
            raise UserError(f"--bits must be from 2 to 8, not {bits}")
        from ..data import load_images
        cal = load_images(a.calib_data, transform_for(spec), a.images, split="calib", seed=a.seed)
        probs, v = capture_attention(params, cal.images, a.block)
        quants = softmax_quantizers(prog, a.block, bits, probs, v, search=not a.no_search,
                                    prob_bits=int(prog.settings["prob_bits"]), seed=a.seed)
        f = plot_softmax(probs, quants, a.out, title=f"{spec.name} block {a.block}: post-softmax probabilities, "
                                                      f"{len(cal)} images from {cal.source}")
        print(f"wrote {f}")
        for t, info in quants.items():
            err = "" if info["error"] is None else f", relative attention-output error {info['error']:.3e}"
            print(f"  {t}: {info['quant'].to_dict()} ({info['source']}{err})")
        return 0
    if a.plot == "sqnr":
        js = a.json or str(Path(a.out).with_suffix(".json"))
        check_writable(a.out, "plot")
        check_writable(js, "JSON")
        prog = load(a.program)
        params, spec = _float_params(a, prog)
        from ..data import load_images
        data = load_images(a.data, transform_for(spec), a.images, split="eval", seed=a.seed)
        s = layer_sqnr(prog, params, data.images)
        s["source"] = data.source
        s["program"] = str(a.program)
        _write_json(js, s)
        f = plot_sqnr(s, a.out)
        print(f"wrote {f} and {js}")
        for p in s["points"]:
            fv, ev = p["fakequant_vs_float_db"], p["engine_vs_fakequant_db"]
            print(f"  {p['value']:<24} {p['kind']:<5}{p['bits']:>3}  fq/float "
                  f"{'n/a' if fv is None else f'{fv:7.2f}'} dB  engine/fq {'n/a' if ev is None else f'{ev:7.2f}'} dB")
        return 0
    raise UserError("intsim plot needs one of: sweep, softmax, sqnr (see intsim plot --help)")
