"""Evaluate the four levels of one model on the same images and compare them.

Levels: ``float`` (the timm model), ``fakequant`` (the program's quantize-dequantize semantics,
``reference.fakequant.FakeQuantModel``), ``engine`` (the Numba integer engine) and ``golden`` (the plain
integer golden model, possibly on a prefix of the images). Integer logits are turned into real
numbers with the program's logit scale before float comparisons.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from . import metrics


@dataclass
class LevelResult:
    logits: np.ndarray            # float64 (B, C) real-valued logits
    seconds: float
    images: int
    int_logits: np.ndarray | None = None   # int64 (B, C) for integer levels
    counts: dict | None = None

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else float("inf")


@dataclass
class Evaluation:
    levels: dict[str, LevelResult] = field(default_factory=dict)


def _batches(n: int, bs: int):
    for i in range(0, n, bs):
        yield slice(i, min(n, i + bs))


def run_float(model: torch.nn.Module, images: np.ndarray, mean, std, batch_size: int, progress: bool) -> LevelResult:
    """The timm model on normalized images."""
    from tqdm import tqdm
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    out = []
    t0 = time.perf_counter()
    with torch.inference_mode():
        for sl in tqdm(list(_batches(len(images), batch_size)), desc="float", unit="batch", disable=not progress,
                       leave=False):
            x = torch.from_numpy(images[sl]).float().div_(255.0)
            out.append(model((x - m) / s).double().numpy())
    return LevelResult(np.concatenate(out), time.perf_counter() - t0, len(images))


def run_fakequant(fq, images: np.ndarray, batch_size: int, progress: bool) -> LevelResult:
    from tqdm import tqdm
    out = []
    t0 = time.perf_counter()
    with torch.inference_mode():
        for sl in tqdm(list(_batches(len(images), batch_size)), desc="fake-quant", unit="batch",
                       disable=not progress, leave=False):
            y = fq(images[sl])
            out.append(np.asarray(y.double() if isinstance(y, torch.Tensor) else y, dtype=np.float64))
    return LevelResult(np.concatenate(out), time.perf_counter() - t0, len(images))


def _add_counts(into: dict, counts: dict | None) -> None:
    """Add the saturation counts ``{op: {key: n}}`` of one batch into ``into`` (in place)."""
    for op, c in (counts or {}).items():
        acc = into.setdefault(op, {})
        for k, v in c.items():
            acc[k] = acc.get(k, 0) + int(v)


def run_integer(fn, images: np.ndarray, scale: float, batch_size: int, desc: str, progress: bool) -> LevelResult:
    """An integer level (engine or golden): ``fn(batch) -> result with .logits (int64) and .counts``."""
    from tqdm import tqdm
    outs, counts = [], {}
    t0 = time.perf_counter()
    for sl in tqdm(list(_batches(len(images), batch_size)), desc=desc, unit="batch", disable=not progress,
                   leave=False):
        r = fn(images[sl])
        outs.append(np.asarray(r.logits, dtype=np.int64))
        _add_counts(counts, r.counts)
    secs = time.perf_counter() - t0
    il = np.concatenate(outs) if outs else np.zeros((0, 0), np.int64)
    return LevelResult(il.astype(np.float64) * scale, secs, len(images), int_logits=il, counts=counts)


def _merge(a: LevelResult | None, b: LevelResult) -> LevelResult:
    """Two consecutive chunks of one level as one result."""
    if a is None:
        return b
    counts = None
    if a.counts is not None:
        counts = {op: dict(c) for op, c in a.counts.items()}
        _add_counts(counts, b.counts)
    il = None if a.int_logits is None else np.concatenate([a.int_logits, b.int_logits])
    return LevelResult(np.concatenate([a.logits, b.logits]), a.seconds + b.seconds, a.images + b.images,
                       int_logits=il, counts=counts)


def evaluate_stream(stream, levels: dict, chunk: int, limits: dict[str, int] | None = None,
                    progress: bool = False) -> Evaluation:
    """Every level on every image of ``stream`` (:class:`intsim.data.ImageStream`), one chunk of
    decoded images at a time, so memory does not grow with the number of images (only the logits
    are kept). ``levels`` maps a level name to ``fn(images uint8 (b, 3, H, W)) -> LevelResult``
    (``run_float``-like, already bound to its model); ``limits[name]`` runs that level on the
    first N images only (the golden model)."""
    from tqdm import tqdm
    limits = limits or {}
    ev = Evaluation()
    with tqdm(total=len(stream), desc="evaluating", unit="img", disable=not progress, leave=False) as bar:
        for off, part in stream.chunks(chunk):
            for name, fn in levels.items():
                n = min(len(part), max(0, limits.get(name, len(stream)) - off))
                if n > 0:
                    ev.levels[name] = _merge(ev.levels.get(name), fn(part.images[:n]))
            bar.update(len(part))
    return ev


def compare(ev: Evaluation, labels: np.ndarray | None) -> dict:
    """All figures of the report as a JSON-ready dict."""
    L = ev.levels
    out: dict = {"levels": {}}
    for name, r in L.items():
        n = r.images
        row = {"images": n, "seconds": round(r.seconds, 4), "images_per_s": round(r.images_per_s, 2)}
        if labels is not None:
            row["top1"] = metrics.top1(r.logits, labels[:n])
        if name != "float" and "float" in L:
            f = L["float"].logits[:n]
            row["agree_float"] = metrics.agreement(r.logits, f)
            row["cosine_float"] = metrics.cosine(r.logits, f)
            row["sqnr_float_db"] = metrics.sqnr_db(f, r.logits)
        if name in ("engine", "golden") and "fakequant" in L:
            fq = L["fakequant"].logits[:n]
            row["agree_fakequant"] = metrics.agreement(r.logits, fq)
            row["cosine_fakequant"] = metrics.cosine(r.logits, fq)
            row["sqnr_fakequant_db"] = metrics.sqnr_db(fq, r.logits)
            if labels is not None:
                pd = metrics.paired_top1_difference(r.logits, fq, labels[:n])
                row["top1_minus_fakequant"] = pd["diff"]
                row["top1_minus_fakequant_ci95"] = pd["ci95"]
                row["only_right"] = pd["only_a"]
                row["only_fakequant_right"] = pd["only_b"]
        out["levels"][name] = row
    if "engine" in L and "golden" in L:
        n = L["golden"].images
        e, g = L["engine"].int_logits[:n], L["golden"].int_logits
        out["engine_vs_golden"] = {
            "images": n,
            "logits_compared": int(g.size),
            "logits_differing": int((e != g).sum()),
            "max_abs_diff": int(np.abs(e - g).max()) if g.size else 0,
            # Counts are compared only when the golden model ran on every image the engine ran on.
            "counts_equal": (L["golden"].counts == L["engine"].counts) if n == L["engine"].images else None,
        }
    if "engine" in L:
        counts = L["engine"].counts or {}
        tot = {k: sum(c.get(k, 0) for c in counts.values()) for k in ("acc", "out", "prob")}
        out["saturation"] = {"total": tot, "per_op": counts}
    return out


def format_table(report: dict) -> str:
    """The readable table printed by ``intsim run``."""
    def pct(v):
        return "" if v is None else f"{100 * v:.2f}"

    def num(v, fmt):
        if v is None:
            return ""
        if isinstance(v, float) and np.isinf(v):
            return "inf"
        return format(v, fmt)

    cols = ("level", "images", "top-1 %", "agree float %", "agree fq %", "cos float", "SQNR float dB",
            "SQNR fq dB", "img/s")
    rows = []
    for name, r in report["levels"].items():
        rows.append((name, str(r["images"]), pct(r.get("top1")), pct(r.get("agree_float")),
                     pct(r.get("agree_fakequant")), num(r.get("cosine_float"), ".5f"),
                     num(r.get("sqnr_float_db"), ".1f"), num(r.get("sqnr_fakequant_db"), ".1f"),
                     num(r.get("images_per_s"), ".1f")))
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(cols)]
    line = "  ".join(c.rjust(w) for c, w in zip(cols, widths))
    lines = [line, "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in rows]
    e = report["levels"].get("engine", {})
    if "top1_minus_fakequant" in e:
        lines.append("")
        lines.append(f"engine - fake-quant top-1: {100 * e['top1_minus_fakequant']:+.2f} points, 95% interval "
                     f"+-{100 * e['top1_minus_fakequant_ci95']:.2f} (images only the engine gets right: "
                     f"{e['only_right']}, only fake-quant: {e['only_fakequant_right']}; "
                     f"docs/results.md, 'engine and fake-quant')")
    eg = report.get("engine_vs_golden")
    if eg:
        lines.append("")
        lines.append(f"engine vs golden: {eg['logits_differing']} of {eg['logits_compared']} logits differ "
                     f"(golden model on the first {eg['images']} images)")
    sat = report.get("saturation")
    if sat:
        t = sat["total"]
        lines.append(f"saturation (engine, all ops): accumulator {t['acc']}, output clamp {t['out']}, "
                     f"softmax prob {t['prob']}")
    tm = report.get("timing")
    if tm and "setup_s" in tm:
        cal = tm.get("calibration_s")
        lines.append(f"start-up: {tm['setup_s']:.1f} s from imports to the start of the evaluation"
                     + (f" (calibration {cal:.1f} s)" if cal is not None else "")
                     + f"; Numba compilations in this run: {tm['numba_compiled']}"
                     + (f" ({', '.join(tm['numba_compiled_kernels'])})" if tm["numba_compiled"] else
                        f" ({tm['numba_cache_hits']} kernel signatures loaded from the cache)"))
    return "\n".join(lines)
