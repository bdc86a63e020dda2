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
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from .program import DEFAULT_SETTINGS, FORMAT, META_KEY, VALUE_KINDS, VERSION, Program, ProgramError
from intsim.ops import OP_SCHEMA
from intsim.ops import get as op_module


def _json_default(o: Any) -> Any:
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serializable: {type(o)}")


def header_json(header: dict[str, Any]) -> str:
    """Canonical JSON of a header (sorted keys, no whitespace): the same header gives the same bytes."""
    return json.dumps(header, sort_keys=True, separators=(",", ":"), default=_json_default, allow_nan=False)


def save(program: Program, path: str | os.PathLike) -> None:
    """Validate and write ``program`` to ``path`` atomically (temporary file in the same folder, then rename)."""
    from safetensors.numpy import save as st_save

    validate(program)
    data = st_save({k: np.ascontiguousarray(v) for k, v in sorted(program.tensors.items())},
                   metadata={META_KEY: header_json(program.header)})
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent if str(path.parent) else ".")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load(path: str | os.PathLike) -> Program:
    """Read and validate a program file; ``ProgramError`` says what is wrong."""
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
    try:
        header = json.loads(meta[META_KEY])
    except json.JSONDecodeError as e:
        raise ProgramError(f"{path}: the program header is not valid JSON: {e}") from None
    prog = Program(header, tensors)
    validate(prog, where=str(path))
    return prog


# ---- validation ---------------------------------------------------------------------

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


def validate(prog: Program, where: str = "program") -> None:
    """Check the header and every op's tensors; raise ``ProgramError`` naming the first problem."""
    h = prog.header
    if not isinstance(h, dict):
        raise ProgramError(f"{where}: header is not an object")
    if h.get("format") != FORMAT:
        raise ProgramError(f"{where}: not an intsim program (format {h.get('format')!r}, expected {FORMAT!r})")
    if h.get("version") != VERSION:
        raise ProgramError(f"{where}: program format version {h.get('version')!r} is not supported "
                           f"(this intsim reads version {VERSION}); re-export it with `intsim calibrate`")
    for key in ("model", "settings", "values", "ops", "output", "inputs", "provenance"):
        if key not in h:
            raise ProgramError(f"{where}: header has no '{key}'")
    missing = [k for k in DEFAULT_SETTINGS if k not in h["settings"]]
    if missing:
        raise ProgramError(f"{where}: settings lack {', '.join(missing)}")
    values = h["values"]
    for name, v in values.items():
        if v.get("kind") not in VALUE_KINDS:
            raise ProgramError(f"{where}: value '{name}' has unknown kind {v.get('kind')!r}")
        for k in ("bits", "shape"):
            if k not in v:
                raise ProgramError(f"{where}: value '{name}' has no '{k}'")
    produced = set(h["inputs"])
    for i in h["inputs"]:
        if i not in values:
            raise ProgramError(f"{where}: input '{i}' is not in the value table")
    used: set[str] = set()
    for op in h["ops"]:
        name, typ = op.get("name"), op.get("type")
        if typ not in OP_SCHEMA:
            raise ProgramError(f"{where}: op '{name}' has unknown type {typ!r} (known: {', '.join(OP_SCHEMA)})")
        sch = OP_SCHEMA[typ]
        if len(op.get("inputs", ())) != sch["inputs"]:
            raise ProgramError(f"{where}: op '{name}' ({typ}) needs {sch['inputs']} inputs, has {op.get('inputs')}")
        for i in op["inputs"]:
            if i not in produced:
                raise ProgramError(f"{where}: op '{name}' reads '{i}' before anything produces it")
        if op.get("output") not in values:
            raise ProgramError(f"{where}: op '{name}' writes '{op.get('output')}', which is not in the value table")
        attrs = op.get("attrs", {})
        for a in sch["attrs"]:
            if a not in attrs:
                raise ProgramError(f"{where}: op '{name}' ({typ}) lacks attribute '{a}'")
        dims = _dims(prog, op)
        for group in ("tensors", "float"):
            for tname, (dtype, shape) in sch[group].items():
                key = f"{name}.{tname}"
                used.add(key)
                if key not in prog.tensors:
                    raise ProgramError(f"{where}: tensor '{key}' is missing")
                arr = prog.tensors[key]
                if str(arr.dtype) != dtype:
                    raise ProgramError(f"{where}: tensor '{key}' has dtype {arr.dtype}, expected {dtype}")
                want = tuple(dims[s] for s in shape)
                if tuple(arr.shape) != want:
                    raise ProgramError(f"{where}: tensor '{key}' has shape {tuple(arr.shape)}, expected {want}")
        produced.add(op["output"])
    if h["output"] not in produced:
        raise ProgramError(f"{where}: output '{h['output']}' is never produced")
    extra = sorted(set(prog.tensors) - used)
    if extra:
        raise ProgramError(f"{where}: unexpected tensors {', '.join(extra[:5])}")
