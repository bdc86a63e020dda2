"""The integer program file: one safetensors file with a JSON header.

A program is what calibration exports and what the golden model and the engine execute. The
header (stored in the safetensors metadata under ``intsim_program``) holds the model
description, the precision settings, provenance, the value table and the op list; the tensors
hold every integer the engine uses (named ``<op name>.<tensor>``) plus the float tensors the
fake-quant reference needs (also ``<op name>.<tensor>``, listed as ``float`` in ``OP_SCHEMA``).
The semantics of every op are in ``docs/integer-spec.md``.

Saving is deterministic (sorted keys, no timestamps) and atomic (temporary name, then rename).
Loading validates the format name, the version, every op's attributes, tensor names, dtypes and
shapes, and raises ``ProgramError`` with a message naming what is wrong.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from .fixedpoint import ExportError
from .program import DEFAULT_SETTINGS, FORMAT, META_KEY, VALUE_KINDS, VERSION, Program, ProgramError, json_default, write_atomic
from intsim.ops import OP_SCHEMA
from intsim.ops import get as op_module


def header_json(header: dict[str, Any]) -> str:
    """Canonical JSON of a header (sorted keys, no whitespace): the same header gives the same bytes."""
    return json.dumps(header, sort_keys=True, separators=(",", ":"), default=json_default, allow_nan=False)


def save(program: Program, path: str | os.PathLike) -> None:
    """Validate and write ``program`` to ``path`` atomically (temporary file in the same folder, then rename)."""
    from safetensors.numpy import save as st_save

    validate(program)
    data = st_save({k: np.ascontiguousarray(v) for k, v in sorted(program.tensors.items())},
                   metadata={META_KEY: header_json(program.header)})
    write_atomic(path, data)


def load(path: str | os.PathLike) -> Program:
    """Read and validate a program file; ``ProgramError`` says what is wrong.

    A program file is untrusted input: the header's size and nesting are bounded before it is
    parsed, every JSON field's type is checked before it is used, and every op's bounds
    (docs/integer-spec.md section 8) are checked by its module, so that a program that loads is
    safe to execute (no kernel reads outside an array, no int64 overflow the spec does not define).
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ProgramError(f"program file not found: {path}")
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except ProgramError:
        raise
    except Exception as e:  # safetensors raises several types for damaged files
        raise ProgramError(f"{path} is not a readable program file (truncated or damaged?): {e}") from None
    if META_KEY not in meta:
        raise ProgramError(f"{path} is a safetensors file but not an intsim program (no '{META_KEY}' header)")
    header = parse_header(meta[META_KEY], str(path))
    prog = Program(header, tensors)
    validate(prog, where=str(path))
    return prog


# ---- the header as untrusted JSON -------------------------------------------------------------

#: Largest header (characters of JSON) and deepest nesting of objects and lists a program may have.
MAX_HEADER_CHARS = 64 << 20
MAX_DEPTH = 16
#: Largest number of elements of one value (checked before any shape arithmetic).
MAX_ELEMENTS = 1 << 31


def _no_constant(name: str) -> Any:
    raise ProgramError(f"the program header holds the non-JSON number {name}")


def _depth(text: str) -> int:
    """Deepest nesting of ``[`` / ``{`` in JSON text, outside strings (a linear scan; no recursion)."""
    depth = best = 0
    in_str = esc = False
    for ch in text:
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch in "[{":
            depth += 1
            if depth > best:
                best = depth
                if best > MAX_DEPTH:
                    return best
        elif ch in "]}":
            depth -= 1
    return best


def parse_header(text: Any, where: str = "program") -> dict[str, Any]:
    """The header JSON as a dict: ``ProgramError`` when it is too large, too deeply nested, not
    JSON, holds NaN / Infinity or integers of more than 4300 digits, or is not an object."""
    if not isinstance(text, str):
        raise ProgramError(f"{where}: the program header is not text")
    if len(text) > MAX_HEADER_CHARS:
        raise ProgramError(f"{where}: the program header has {len(text)} characters, more than {MAX_HEADER_CHARS}")
    if text.count("[") + text.count("{") > 0 and _depth(text) > MAX_DEPTH:
        raise ProgramError(f"{where}: the program header is nested more than {MAX_DEPTH} deep")
    try:
        header = json.loads(text, parse_constant=_no_constant)
    except ProgramError as e:
        raise ProgramError(f"{where}: {e}") from None
    except (ValueError, RecursionError) as e:      # JSONDecodeError, integers beyond the digit limit
        raise ProgramError(f"{where}: the program header is not valid JSON: {e}") from None
    if not isinstance(header, dict):
        raise ProgramError(f"{where}: the program header is not a JSON object")
    return header


# ---- validation ---------------------------------------------------------------------

#: Attributes that are not integers, with their JSON type (every other attribute is an integer).
TEXT_ATTRS = {"tokens": str, "softmax_quant": dict, "grid": list}
#: Widths a value may declare, by kind (codes are unsigned, ints signed, images 8-bit codes).
VALUE_BITS = {"image": (1, 16), "codes": (1, 16), "int": (2, 64)}
#: The dtypes of the op schemas, parsed once.
_DTYPES = {d: np.dtype(d) for sch in OP_SCHEMA.values() for g in ("tensors", "float") for d, _ in sch[g].values()}
#: Most dimensions of a value's shape.
MAX_RANK = 4


def check_settings(s: dict[str, int]) -> None:
    """Bounds of section 8 that depend on the settings alone (plus storage limits of the format);
    ``ExportError`` naming the setting. Every setting must be an integer (checked first, so that
    no bound is computed from a value of another type)."""
    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise ExportError(f"settings: {msg}")

    for k in DEFAULT_SETTINGS:
        need(k in s, f"no '{k}'")
        need(is_int(s[k]), f"{k} = {show(s[k])} is not an int64 integer")
    need(2 <= s["wbits"] <= 8 and 2 <= s["abits"] <= 8, "wbits and abits must be in 2..8")
    need(2 <= s["acc_bits"] <= 63 and 2 <= s["mult_bits"] <= 32, "acc_bits in 2..63, mult_bits in 2..32 (int32 multipliers)")
    need(s["acc_bits"] + s["mult_bits"] <= 64, f"acc_bits + mult_bits = {s['acc_bits'] + s['mult_bits']} > 64")
    need(2 <= s["residual_bits"] <= 32, "residual_bits must be in 2..32")
    need(2 <= s["logit_bits"] <= 32, "logit_bits must be in 2..32")
    need(2 <= s["gelu_bits"] <= 16, "gelu_bits must be in 2..16")
    need(0 <= s["exp_frac_bits"] <= 12, "exp_frac_bits (E) must be in 0..12")
    need(1 <= s["exp_bits"] <= 30, "exp_bits (X) must be in 1..30")
    need(1 <= s["prob_bits"] <= 24, "prob_bits (P) must be in 1..24")
    need(0 <= s["recip_frac"] and s["prob_bits"] + s["recip_frac"] <= 48, "prob_bits + recip_frac must be <= 48")
    need(1 <= s["decode_bits"] <= 30, "decode_bits (L) must be in 1..30")
    need(1 <= s["ln_recip_bits"] <= 48, "ln_recip_bits (K) must be in 1..48")
    need(0 <= s["ln_norm_frac"] <= 20, "ln_norm_frac (F) must be in 0..20")
    need(s["ln_norm_frac"] <= s["ln_recip_bits"], "ln_norm_frac must not exceed ln_recip_bits (shift K - F >= 0)")


#: Largest float tensor magnitude: float32's (the fake-quant model may run in float32).
FLOAT32_MAX = float(np.finfo(np.float32).max)


def max_abs_float(a: np.ndarray) -> float:
    """``max |a|`` of a float array (0.0 when empty; NaN when ``a`` holds a NaN, inf for an inf)."""
    return float(np.abs(a).max()) if a.size else 0.0


def is_int(v: Any) -> bool:
    """A JSON integer (not a boolean) that fits an int64."""
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_)) and -(1 << 63) <= v < (1 << 63)


def show(v: Any) -> str:
    """A short text of a header value for a message (huge integers and long texts abbreviated)."""
    if isinstance(v, int) and not isinstance(v, bool) and abs(v).bit_length() > 64:
        return f"an integer of {abs(v).bit_length()} bits"
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."


def _dims(prog: Program, op: dict[str, Any]) -> dict[str, int]:
    vals = prog.values
    out_shape = vals[op["output"]]["shape"]
    in_shape = vals[op["inputs"][0]]["shape"]
    s = prog.settings
    d: dict[str, int] = {"N": out_shape[-1], "K": in_shape[-1], "D": in_shape[-1],
                         "T": out_shape[0], "E": 2 ** s["exp_frac_bits"],
                         "Q": 2 ** s["abits"] - 1, "G": 2 ** s["gelu_bits"]}
    d["Q+1"] = d["Q"] + 1
    extra = getattr(op_module(op["type"]), "shape_dims", None)      # op-specific symbols (intsim.ops)
    if extra is not None:
        d.update(extra(op, in_shape))
    return d


def _check_value(where: str, name: Any, v: Any) -> None:
    if not isinstance(name, str):
        raise ProgramError(f"{where}: value name {show(name)} is not a string")
    if not isinstance(v, dict):
        raise ProgramError(f"{where}: value '{name}' is not an object")
    kind = v.get("kind")
    if not isinstance(kind, str) or kind not in VALUE_KINDS:
        raise ProgramError(f"{where}: value '{name}' has unknown kind {show(kind)}")
    for k in ("bits", "shape"):
        if k not in v:
            raise ProgramError(f"{where}: value '{name}' has no '{k}'")
    lo, hi = VALUE_BITS[kind]
    if not is_int(v["bits"]) or not lo <= v["bits"] <= hi:
        raise ProgramError(f"{where}: value '{name}': bits = {show(v['bits'])} breaks {lo} <= bits <= {hi} ({kind})")
    shape = v["shape"]
    if not isinstance(shape, list) or not 1 <= len(shape) <= MAX_RANK \
            or not all(is_int(n) and 1 <= n <= MAX_ELEMENTS for n in shape):
        raise ProgramError(f"{where}: value '{name}': shape = {show(shape)} is not a list of 1..{MAX_RANK} "
                           f"positive integers")
    if int(np.prod([int(n) for n in shape], dtype=object)) > MAX_ELEMENTS:
        raise ProgramError(f"{where}: value '{name}': shape = {shape} has more than {MAX_ELEMENTS} elements")
    if "scale" in v:
        sc = v["scale"]
        try:
            fsc = float(sc) if isinstance(sc, (int, float)) and not isinstance(sc, bool) else math.nan
        except OverflowError:                       # an integer beyond float64
            fsc = math.nan
        if not (math.isfinite(fsc) and fsc > 0):
            raise ProgramError(f"{where}: value '{name}': scale = {show(sc)} breaks 0 < scale < inf")
    if "zero_point" in v:
        zp = v["zero_point"]
        if not is_int(zp) or abs(zp) >= 1 << 62:
            raise ProgramError(f"{where}: value '{name}': zero_point = {show(zp)} is not an integer below 2^62")


def _check_op_structure(where: str, op: Any, values: dict[str, Any], produced: set[str], names: set[str]) -> None:
    if not isinstance(op, dict):
        raise ProgramError(f"{where}: an op is {show(op)}, not an object")
    name, typ = op.get("name"), op.get("type")
    if not isinstance(name, str):
        raise ProgramError(f"{where}: op name {show(name)} is not a string")
    if name in names:
        raise ProgramError(f"{where}: two ops are named '{name}'")
    names.add(name)
    if not isinstance(typ, str) or typ not in OP_SCHEMA:
        raise ProgramError(f"{where}: op '{name}' has unknown type {show(typ)} (known: {', '.join(OP_SCHEMA)})")
    sch = OP_SCHEMA[typ]
    inputs = op.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != sch["inputs"]:
        raise ProgramError(f"{where}: op '{name}' ({typ}) needs {sch['inputs']} inputs, has {show(inputs)}")
    for i in inputs:
        if not isinstance(i, str) or i not in produced:
            raise ProgramError(f"{where}: op '{name}' reads {show(i)} before anything produces it")
    out = op.get("output")
    if not isinstance(out, str) or out not in values:
        raise ProgramError(f"{where}: op '{name}' writes {show(out)}, which is not in the value table")
    attrs = op.get("attrs", {})
    if not isinstance(attrs, dict):
        raise ProgramError(f"{where}: op '{name}' ({typ}): attrs = {show(attrs)} is not an object")
    for a in sch["attrs"]:
        if a not in attrs:
            raise ProgramError(f"{where}: op '{name}' ({typ}) lacks attribute '{a}'")
        want = TEXT_ATTRS.get(a)
        ok = isinstance(attrs[a], want) if want is not None else is_int(attrs[a])
        if not ok:
            kind = want.__name__ if want is not None else "an int64 integer"
            raise ProgramError(f"{where}: op '{name}' ({typ}): {a} = {show(attrs[a])} is not {kind}")


#: Fields of the model and provenance records that commands read, with their JSON types.
RECORD_FIELDS = {("model", "name"): str, ("model", "num_classes"): int, ("provenance", "model"): str,
                 ("provenance", "weights"): str, ("provenance", "checkpoint"): str, ("provenance", "seed"): int,
                 ("provenance", "calibration"): dict, ("provenance", "versions"): dict}


def _check_record(where: str, h: dict[str, Any]) -> None:
    """The model and provenance records are informational, but the fields commands read (the float
    model's name, weights, seed, the calibration record) must have their JSON types."""
    for (part, key), typ in RECORD_FIELDS.items():
        if key not in h[part]:
            continue
        v = h[part][key]
        if not isinstance(v, typ) or (typ is int and not is_int(v)):
            raise ProgramError(f"{where}: {part}.{key} = {show(v)} is not a JSON {typ.__name__}")
    rec = h["provenance"].get("calibration", {}).get("reconstruction")
    if rec is None:
        return
    ok = isinstance(rec, dict) and "num_images" in rec and isinstance(rec.get("units"), list) and all(
        isinstance(u, dict) and isinstance(u.get("unit"), str)
        and all(isinstance(u.get(k), (int, float)) and not isinstance(u.get(k), bool) for k in ("calibrated", "final"))
        for u in rec["units"])
    if not ok:
        raise ProgramError(f"{where}: provenance.calibration.reconstruction is not a reconstruction record")


def validate(prog: Program, where: str = "program", bounds: bool = True) -> None:
    """Prove a program safe to execute; raise ``ProgramError`` naming the first problem.

    First the structure, every JSON field's type checked before it is used: the format and
    version, the settings (integers within their section 8 ranges, checked before any ``2^x`` is
    computed from them), the value table (kind, width, shape, scale), every op (type, inputs
    produced before, output declared, attributes present and of their type), every tensor (name,
    dtype, shape; float tensors finite). Then each op's module checks the bounds its kernels and
    the spec rely on (``intsim.ops.<type>.check_bounds``, the same function export asserts).
    """
    h = prog.header
    if not isinstance(h, dict):
        raise ProgramError(f"{where}: header is not an object")
    if h.get("format") != FORMAT:
        raise ProgramError(f"{where}: not an intsim program (format {show(h.get('format'))}, expected {FORMAT!r})")
    if not is_int(h.get("version")) or h.get("version") != VERSION:
        raise ProgramError(f"{where}: program format version {show(h.get('version'))} is not supported "
                           f"(this intsim reads version {VERSION}); re-export it with `intsim calibrate`")
    for key, typ in (("model", dict), ("settings", dict), ("values", dict), ("ops", list), ("output", str),
                     ("inputs", list), ("provenance", dict)):
        if key not in h:
            raise ProgramError(f"{where}: header has no '{key}'")
        if not isinstance(h[key], typ):
            raise ProgramError(f"{where}: header field '{key}' = {show(h[key])} is not a JSON {typ.__name__}")
    _check_record(where, h)
    missing = [k for k in DEFAULT_SETTINGS if k not in h["settings"]]
    if missing:
        raise ProgramError(f"{where}: settings lack {', '.join(missing)}")
    try:
        check_settings(h["settings"])
    except ExportError as e:
        raise ProgramError(f"{where}: {e}") from None
    values = h["values"]
    for name, v in values.items():
        _check_value(where, name, v)
    produced = set()
    for i in h["inputs"]:
        if not isinstance(i, str) or i not in values:
            raise ProgramError(f"{where}: input {show(i)} is not in the value table")
        produced.add(i)
    used: set[str] = set()
    names: set[str] = set()
    for op in h["ops"]:
        _check_op_structure(where, op, values, produced, names)
        name, typ = op["name"], op["type"]
        sch = OP_SCHEMA[typ]
        dims = _dims(prog, op)
        for group in ("tensors", "float"):
            for tname, (dtype, shape) in sch[group].items():
                key = f"{name}.{tname}"
                used.add(key)
                if key not in prog.tensors:
                    raise ProgramError(f"{where}: tensor '{key}' is missing")
                arr = prog.tensors[key]
                if not isinstance(arr, np.ndarray) or arr.dtype != _DTYPES[dtype]:
                    raise ProgramError(f"{where}: tensor '{key}' has dtype {getattr(arr, 'dtype', type(arr))}, "
                                       f"expected {dtype}")
                want = tuple(dims[s] for s in shape)
                if tuple(arr.shape) != want:
                    raise ProgramError(f"{where}: tensor '{key}' has shape {tuple(arr.shape)}, expected {want}")
                if arr.dtype.kind == "f" and not max_abs_float(arr) <= FLOAT32_MAX:     # NaN compares False
                    raise ProgramError(f"{where}: op '{name}' ({typ}): {tname} holds NaN, infinity or a "
                                       f"magnitude above float32's, breaks finite float tensors")
        produced.add(op["output"])
    if h["output"] not in produced:
        raise ProgramError(f"{where}: output '{h['output']}' is never produced")
    extra = sorted(set(prog.tensors) - used)
    if extra:
        raise ProgramError(f"{where}: unexpected tensors {', '.join(extra[:5])}")
    if not bounds:
        return
    for op in h["ops"]:
        try:
            op_module(op["type"]).check_bounds(prog, op)
        except ExportError as e:
            msg = str(e)
            if msg.startswith(f"{op['name']}: "):
                msg = msg[len(op["name"]) + 2:]
            raise ProgramError(f"{where}: op '{op['name']}' ({op['type']}): {msg}") from None
