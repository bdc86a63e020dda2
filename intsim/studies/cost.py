"""Hardware cost model of an integer program (formulas in docs/cost-model.md).

All figures are per image and are read off the program alone (its graph, value shapes, bit
widths and settings), so they describe exactly what the engine executes:

* ``macs``: multiply-accumulates of every GEMM, grouped by operand widths "AxB" (unsigned
  activation-code width x weight width, or the two code widths of the attention products);
* ``bops``: bit-operations, sum of MACs x (width A x width B);
* ``weight_bits``: packed weight storage (codes at ``wbits``) plus per-output-channel constants
  (weight zero point at ``wbits``, multiplier at ``mult_bits``, shift at 6 bits, bias at
  ``acc_bits``);
* ``table_bits``: exp, threshold, decode and GELU tables and the LayerNorm constants;
* ``peak_activation_bits``: the largest sum of live values over the op sequence (a value is
  live from the op that produces it to its last reader) plus, inside attention, one head's
  T x T probability matrix at ``prob_bits``;
* ``acc_bits`` / ``datapath``: the accumulator width and the widest intermediate of each op.
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np

SHIFT_BITS = 6


def _numel(shape) -> int:
    return int(np.prod(shape))


def op_cost(prog, op) -> dict:
    """Cost figures of one op (per image)."""
    s = prog.settings
    vals = prog.values
    out = vals[op["output"]]
    typ = op["type"]
    c: dict = {"op": op["name"], "type": op["type"], "macs": {}, "bops": 0, "weight_bits": 0, "table_bits": 0,
               "datapath_bits": 0}
    A, B = s["acc_bits"], s["mult_bits"]
    if typ in ("linear", "patch_embed"):
        w = prog.t(op, "w")
        n, k = w.shape
        tokens = out["shape"][0] - (1 if typ == "patch_embed" else 0)
        xbits = vals[op["inputs"][0]]["bits"]
        wb = s["wbits"]
        macs = tokens * n * k
        c["macs"][f"{xbits}x{wb}"] = macs
        c["bops"] = macs * xbits * wb
        c["weight_bits"] = n * k * wb + n * (wb + B + SHIFT_BITS + A)
        if typ == "patch_embed":
            c["table_bits"] = _numel(prog.t(op, "pos").shape) * out["bits"]
        c["datapath_bits"] = A + B
    elif typ in ("attention", "window_attention"):
        q = vals[op["inputs"][0]]
        t, d_model = q["shape"]
        heads = op["attrs"]["heads"]
        d = d_model // heads
        # plain attention: one T x T score matrix per head; windowed: nW windows of n x n
        pairs = t * t
        if typ == "window_attention":
            n_win, n_tok = prog.t(op, "tokens").shape
            pairs = n_win * n_tok * n_tok
        ab = s["abits"]
        L, E, X, P = op["attrs"]["decode_bits"], op["attrs"]["exp_frac_bits"], op["attrs"]["exp_bits"], op["attrs"]["prob_bits"]
        n_codes = len(prog.t(op, "thresholds"))
        score_macs = heads * pairs * d
        pv_macs = heads * pairs * d
        c["macs"][f"{ab}x{ab}"] = score_macs
        c["macs"][f"{L + 1}x{ab}"] = pv_macs
        c["bops"] = score_macs * ab * ab + pv_macs * (L + 1) * ab
        c["table_bits"] = (2 ** E) * (X + 1) + n_codes * P + (n_codes + 1) * (L + 1)
        if typ == "window_attention":   # relative position bias table at accumulator width, 1-bit mask
            c["table_bits"] += prog.t(op, "bias_table").size * A + prog.t(op, "mask").size
        c["datapath_bits"] = 64 if P + op["attrs"]["recip_frac"] > 31 else 32
    elif typ == "layernorm":
        d = vals[op["inputs"][0]]["shape"][1]
        c["table_bits"] = d * (B + 56)
        c["datapath_bits"] = 64
    elif typ == "gelu":
        c["table_bits"] = len(prog.t(op, "table")) * out["bits"]
        c["datapath_bits"] = vals[op["inputs"][0]]["bits"]
    elif typ == "add":
        c["datapath_bits"] = s["residual_bits"] + B
    return c


def _peak_activation_bits(prog) -> tuple[int, str]:
    vals = prog.values
    last_use: dict[str, int] = {}
    for i, op in enumerate(prog.ops):
        for v in op["inputs"]:
            last_use[v] = i
    last_use[prog.output] = len(prog.ops)
    live: dict[str, int] = {}
    for v in prog.header["inputs"]:
        live[v] = _numel(vals[v]["shape"]) * vals[v]["bits"]
    peak, where = 0, ""
    for i, op in enumerate(prog.ops):
        ov = vals[op["output"]]
        live[op["output"]] = _numel(ov["shape"]) * ov["bits"]
        scratch = 0
        if op["type"] == "attention":
            t = vals[op["inputs"][0]]["shape"][0]
            scratch = t * t * op["attrs"]["prob_bits"]
        elif op["type"] == "window_attention":
            n_tok = prog.t(op, "tokens").shape[1]
            scratch = n_tok * n_tok * op["attrs"]["prob_bits"]
        total = sum(live.values()) + scratch
        if total > peak:
            peak, where = total, op["name"]
        for v in list(live):
            if last_use.get(v, -1) <= i and v != prog.output:
                del live[v]
    return peak, where


def program_cost(prog) -> dict:
    """Per-op figures and totals (per image)."""
    ops = [op_cost(prog, op) for op in prog.ops]
    macs: dict[str, int] = defaultdict(int)
    for c in ops:
        for k, v in c["macs"].items():
            macs[k] += v
    peak, where = _peak_activation_bits(prog)
    total = {
        "macs": int(sum(macs.values())),
        "macs_by_width": dict(sorted(macs.items())),
        "bops": int(sum(c["bops"] for c in ops)),
        "gbops": sum(c["bops"] for c in ops) / 1e9,
        "weight_bits": int(sum(c["weight_bits"] for c in ops)),
        "weight_kib": sum(c["weight_bits"] for c in ops) / 8 / 1024,
        "table_bits": int(sum(c["table_bits"] for c in ops)),
        "peak_activation_bits": int(peak),
        "peak_activation_kib": peak / 8 / 1024,
        "peak_at": where,
        "acc_bits": prog.settings["acc_bits"],
        "max_datapath_bits": max(c["datapath_bits"] for c in ops),
    }
    return {"ops": ops, "total": total}


def format_cost(cost: dict) -> str:
    t = cost["total"]
    lines = ["op                              type         MACs        GBOPs   weight KiB  table KiB"]
    for c in cost["ops"]:
        m = sum(c["macs"].values())
        if m == 0 and c["weight_bits"] == 0 and c["table_bits"] == 0:
            continue
        lines.append(f"{c['op']:<31} {c['type']:<11} {m:>11,d} {c['bops'] / 1e9:>9.4f} "
                     f"{c['weight_bits'] / 8192:>11.2f} {c['table_bits'] / 8192:>10.2f}")
    lines.append("")
    lines.append(f"total: {t['macs']:,} MACs ({', '.join(f'{k}: {v:,}' for k, v in t['macs_by_width'].items())}), "
                 f"{t['gbops']:.3f} GBOPs, weights {t['weight_kib']:.1f} KiB, tables {t['table_bits'] / 8192:.1f} KiB, "
                 f"peak activations {t['peak_activation_kib']:.1f} KiB (at {t['peak_at']}), "
                 f"accumulator {t['acc_bits']} bits, widest datapath {t['max_datapath_bits']} bits")
    return "\n".join(lines)
