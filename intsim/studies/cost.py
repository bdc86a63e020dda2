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

from intsim import ops as registry
from intsim.ops.base import SHIFT_BITS  # noqa: F401  (part of this module's documented figures)



def _numel(shape) -> int:
    return int(np.prod(shape))


def op_cost(prog, op) -> dict:
    """Cost figures of one op (per image), from its op module's ``cost`` (``intsim.ops``)."""
    c: dict = {"op": op["name"], "type": op["type"], "macs": {}, "bops": 0, "weight_bits": 0, "table_bits": 0,
               "datapath_bits": 0}
    registry.get(op["type"]).cost(prog, op, c)
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
        scratch = registry.get(op["type"]).scratch_bits(prog, op)
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
