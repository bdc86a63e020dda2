"""The energy table of ``intsim hw``: per-operation energies (pJ) and the width scaling rule.

The default table, ``intsim/assets/energy_45nm.json``, holds Horowitz's ISSCC 2014 figures for
45 nm (docs/co-design.md). A table is a JSON object with

* ``mult_pj`` / ``add_pj``: ``{"width": pJ}``, at least one width each (positive integers);
* ``sram_pj_per_32_bits`` / ``dram_pj_per_32_bits``: energy of moving 32 bits;
* ``unit_pj_per_element``: ``softmax``, ``layernorm``, ``gelu``, ``add``: energy per element of
  the analytically modelled units;

every energy a finite number >= 0; other keys (``name``, ``source``, ``notes``) are free text.

Scaling to other widths: an ``a x b``-bit multiply costs ``mult_pj[r] * a * b / r^2`` and a
``w``-bit add ``add_pj[r] * w / r``, where ``r`` is the smallest listed width at least as wide as
the widest operand (the largest listed width if none is). Memory energy is proportional to the
bits moved.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ..errors import UserError

DEFAULT_TABLE = Path(__file__).resolve().parent.parent / "assets" / "energy_45nm.json"
UNITS = ("softmax", "layernorm", "gelu", "add")


def _energy(where: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise UserError(f"{where} must be a number of pJ, not {json.dumps(v)}")
    if v < 0:
        raise UserError(f"{where} must be >= 0 pJ, not {v}")
    return float(v)


def _width_table(path: str, t: dict, key: str) -> dict[int, float]:
    if key not in t:
        raise UserError(f"energy table {path}: missing key '{key}'")
    d = t[key]
    if not isinstance(d, dict) or not d:
        raise UserError(f"energy table {path}: '{key}' must be an object {{\"width\": pJ, ...}} with at least one width")
    out = {}
    for w, v in d.items():
        if not (isinstance(w, str) and w.isdigit() and 1 <= int(w) <= 64):
            raise UserError(f"energy table {path}: '{key}' width '{w}' is not an integer from 1 to 64")
        out[int(w)] = _energy(f"energy table {path}: {key}[{w}]", v)
    return dict(sorted(out.items()))


def load_table(path: str | None = None) -> dict[str, Any]:
    """Read and check an energy table (the default 45 nm table when ``path`` is None); a
    malformed table raises ``UserError`` with one line."""
    p = Path(path) if path else DEFAULT_TABLE
    try:
        text = p.read_text()
    except OSError as e:
        raise UserError(f"cannot read energy table {p}: {e.strerror or e}") from None
    try:
        t = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"energy table {p} is not valid JSON: {e}") from None
    if not isinstance(t, dict):
        raise UserError(f"energy table {p} must be a JSON object")
    out: dict[str, Any] = {"path": str(p), "name": str(t.get("name", p.stem))}
    out["mult_pj"] = _width_table(str(p), t, "mult_pj")
    out["add_pj"] = _width_table(str(p), t, "add_pj")
    for k in ("sram_pj_per_32_bits", "dram_pj_per_32_bits"):
        if k not in t:
            raise UserError(f"energy table {p}: missing key '{k}'")
        out[k] = _energy(f"energy table {p}: {k}", t[k])
    u = t.get("unit_pj_per_element")
    if not isinstance(u, dict):
        raise UserError(f"energy table {p}: missing key 'unit_pj_per_element' (an object with {', '.join(UNITS)})")
    out["unit_pj_per_element"] = {}
    for k in UNITS:
        if k not in u:
            raise UserError(f"energy table {p}: missing key 'unit_pj_per_element.{k}'")
        out["unit_pj_per_element"][k] = _energy(f"energy table {p}: unit_pj_per_element.{k}", u[k])
    return out


def _reference(widths: dict[int, float], w: int) -> int:
    wider = [r for r in widths if r >= w]
    return min(wider) if wider else max(widths)


def mult_pj(table: dict, a: int, b: int) -> float:
    """Energy of one ``a x b``-bit multiply: ``mult_pj[r] a b / r^2``."""
    r = _reference(table["mult_pj"], max(a, b))
    return table["mult_pj"][r] * a * b / (r * r)


def add_pj(table: dict, w: int) -> float:
    """Energy of one ``w``-bit add: ``add_pj[r] w / r``."""
    r = _reference(table["add_pj"], w)
    return table["add_pj"][r] * w / r


def mac_pj(table: dict, a: int, b: int, acc_bits: int) -> float:
    """One MAC: an ``a x b`` multiply and an add at the accumulator width."""
    return mult_pj(table, a, b) + add_pj(table, acc_bits)


def sram_pj(table: dict, bits: int) -> float:
    return table["sram_pj_per_32_bits"] * bits / 32


def dram_pj(table: dict, bits: int) -> float:
    return table["dram_pj_per_32_bits"] * bits / 32
