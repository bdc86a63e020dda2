"""What every op module provides, and the shape symbols its schema uses.

An op module (``intsim/ops/<type>.py``) is the one place that knows an op type. Its public names:

- ``NAME`` (the ``type`` string in a program), ``SPEC`` (its section of docs/integer-spec.md),
  ``INPUTS`` (number of input values), ``ATTRS`` (integer attributes of the op's header entry),
  ``TENSORS`` / ``FLOAT`` (tensor name -> (dtype, shape symbols); ``FLOAT`` ones are read only by
  the fake-quant reference).
- the pieces the rest of the pipeline calls through the registry (``intsim.ops.get``): the
  export from calibration state, the fake-quant forward, the engine builder and the cost figures
  (see docs/architecture.md for the names and signatures).

The golden model (``reference.golden``) is deliberately not here: it is a separate transcription
of the spec that imports nothing from these modules, so that it stays an independent check.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from intsim.kernels.gemm import GEMM_MODES
from intsim.kernels.numeric import MAX_SHIFT
from intsim.program.fixedpoint import ExportError
from intsim.program.program import Program, ProgramError

# Shape symbols, resolved per op by ``intsim.program.format`` from the op's attributes and values.
SHAPE_SYMBOLS = {
    "N": "output channels",
    "K": "input channels (patch size^2 * 3 for patch_embed)",
    "T": "tokens",
    "D": "channels",
    "E": "exp table entries",
    "Q": "nonzero post-softmax codes (Q+1 with the zero code)",
    "G": "GELU table entries (2^abits)",
    "Wn": "tokens per window (window^2)",
    "Wr": "relative positions ((2 window - 1)^2)",
    "Wc": "windows per image (T / Wn)",
    "Hh": "heads",
    "4": "the four 2x2 neighbours of patch merging",
}

SCHEMA_NAMES = ("NAME", "SPEC", "INPUTS", "ATTRS", "TENSORS", "FLOAT")


def schema_of(module) -> dict:
    """The schema of one op module as the dict ``intsim.program.format`` validates against."""
    return {"inputs": module.INPUTS, "attrs": tuple(module.ATTRS), "tensors": dict(module.TENSORS),
            "float": dict(module.FLOAT), "spec": module.SPEC}


# ---- the engine side: what every op's engine builder shares --------------------------------------

#: Saturation counters of every op: accumulator, output clamp, softmax probability clamp.
COUNT_KEYS = ("acc", "out", "prob")
#: Bits of a stored shift in the cost model (docs/cost-model.md).
SHIFT_BITS = 6
#: Width declared for exact int64 intermediates in test vectors.
WIDE = 64
#: Rows of one epilogue task (parallel work item) of the Numba kernels.
EPI_ROWS_PER_TASK = 8


def zero_counts() -> dict[str, int]:
    """``{"acc": 0, "out": 0, "prob": 0}``."""
    return {k: 0 for k in COUNT_KEYS}


def i64(a: np.ndarray) -> np.ndarray:
    """``a`` as a C-contiguous int64 array (the parameter type of every kernel)."""
    return np.ascontiguousarray(a, dtype=np.int64)


def int_attr(v: Any, what: str) -> int:
    """An integer attribute of a program, as a Python int; ``ProgramError`` naming ``what`` otherwise."""
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise ProgramError(f"{what} must be an integer, got {v!r}")
    return int(v)


def check_shifts(name: str, shifts: np.ndarray) -> None:
    """``ProgramError`` unless every shift lies in ``-MAX_SHIFT..MAX_SHIFT``."""
    shifts = np.asarray(shifts)
    if shifts.size and (shifts.max() > MAX_SHIFT or shifts.min() < -MAX_SHIFT):
        raise ProgramError(f"op '{name}': shift outside -{MAX_SHIFT}..{MAX_SHIFT} "
                           f"(min {shifts.min()}, max {shifts.max()})")


def as_int_input(x: np.ndarray, name: str) -> np.ndarray:
    """An op input as int64; ``TypeError`` for a non-integer array."""
    x = np.asarray(x)
    if x.dtype.kind not in "iu":
        raise TypeError(f"op '{name}': integer input expected, got dtype {x.dtype}")
    return i64(x)


def ints(*xs: np.ndarray) -> list[np.ndarray]:
    """The inputs as int64 arrays; ``TypeError`` for a non-integer one."""
    out = []
    for x in xs:
        x = np.asarray(x)
        if x.dtype.kind not in "iu":
            raise TypeError(f"integer input expected, got dtype {x.dtype}")
        out.append(i64(x))
    return out

def value_range(program: Program, name: str) -> tuple[int, int]:
    """The range a value's declared kind and width allow (codes ``0..2^b-1``, ints signed b bits)."""
    v = program.header.get("values", {}).get(name)
    if v is None:
        return -(1 << MAX_SHIFT), (1 << MAX_SHIFT)
    b = int(v["bits"])
    if v["kind"] == "int":
        return -(1 << (b - 1)), (1 << (b - 1)) - 1
    return 0, (1 << b) - 1


class EngineOp:
    """One op of a program prepared for the engine: its integer constants converted once, its routes
    proven. ``op(*inputs) -> (y, counts)`` runs it op by op on int64 values (``intsim.engine.run_op``
    and ``Engine.forward(keep=True)``); the fused steps of ``intsim.engine`` call the public methods
    of the subclasses directly.

    ``ranges``: the proven ranges of the op's inputs (None entries: taken from the data).
    ``lo`` / ``hi``: the proven range of every output element (the op's final clamp), set by each
    subclass; the engine passes it on as the next op's input range.
    """

    def __init__(self, program: Program, op: dict[str, Any], gemm: str = "auto",
                 ranges: list[tuple[int, int] | None] | None = None, f32_max_k: int | None = None):
        if gemm not in GEMM_MODES:
            raise ValueError(f"gemm mode must be one of {GEMM_MODES}, got {gemm!r}")
        self.program = program
        self.name = op["name"]
        self.type = op["type"]
        self.inputs = list(op["inputs"])
        self.output = op["output"]
        self.mode = gemm
        self.f32_max_k = f32_max_k
        self.ranges = list(ranges) if ranges is not None else [None] * len(self.inputs)
        self.attrs = op.get("attrs", {})
        self.op = op
        acc_bits = int_attr(program.settings["acc_bits"], "settings.acc_bits")
        if not 2 <= acc_bits <= 64:
            raise ProgramError(f"settings.acc_bits={acc_bits} outside 2..64")
        self.acc_lo = -(1 << (acc_bits - 1))
        self.acc_hi = (1 << (acc_bits - 1)) - 1
        self.lo, self.hi = self.acc_lo, self.acc_hi

    def a(self, name: str) -> int:
        """Integer attribute ``name`` of the op."""
        return int_attr(self.attrs[name], f"op '{self.name}' attribute '{name}'")

    def t(self, name: str) -> np.ndarray:
        """Tensor ``name`` of the op, as stored."""
        return self.program.t(self.op, name)

    def out_range(self) -> tuple[int, int]:
        """The range every output element lies in (the op's final clamp)."""
        return self.lo, self.hi

    def __call__(self, *inputs: np.ndarray) -> tuple[np.ndarray, dict[str, int]]:
        if len(inputs) != len(self.inputs):
            raise TypeError(f"op '{self.name}' ({self.type}) takes {len(self.inputs)} inputs, got {len(inputs)}")
        return self.forward(*inputs)

    def forward(self, *inputs: np.ndarray) -> tuple[np.ndarray, dict[str, int]]:
        """The op on int64 inputs: ``(y, {"acc", "out", "prob"} saturation counts)``."""
        raise NotImplementedError


def value_width(program: Program, name: str) -> tuple[int, bool]:
    """(bits, signed) of a program value: codes are unsigned, ints signed."""
    v = program.values[name]
    return int(v["bits"]), v["kind"] == "int"


def tensor64(program: Program, op: dict[str, Any], name: str) -> np.ndarray:
    """A tensor of the op, as int64."""
    return np.asarray(program.t(op, name), dtype=np.int64)


# ---- section 8 helpers of the ops' ``check_bounds`` (export and load; they raise ExportError) ----

def check_in(name: str, field: str, v: Any, lo: int, hi: int) -> None:
    """``ExportError`` unless every element of ``v`` (an int or an array) lies in ``lo..hi``; the
    message names the op, the field, the offending value and the bound."""
    a = np.asarray(v)
    if a.size == 0:
        return
    mn, mx = int(a.min()), int(a.max())
    if mn < lo or mx > hi:
        bad = mn if mn < lo else mx
        what = field if a.ndim == 0 else f"{field} (an element)"
        raise ExportError(f"{name}: {what} = {bad} breaks {lo} <= {field} <= {hi}")


def check_out_range(prog: Program, op: dict[str, Any], zp: bool = False) -> None:
    """The op's output clamp ``lo <= hi`` within the range of its output value's width (and, with
    ``zp``, the attribute ``zp`` within it too)."""
    name, a = op["name"], op["attrs"]
    vlo, vhi = value_range(prog, op["output"])
    check_in(name, "lo", a["lo"], vlo, vhi)
    check_in(name, "hi", a["hi"], a["lo"], vhi)
    if zp:
        check_in(name, "zp", a["zp"], vlo, vhi)


def check_shape(prog: Program, op: dict[str, Any], value: str, want: list[int], why: str) -> None:
    """``ExportError`` unless the declared shape of ``value`` is ``want``."""
    got = list(prog.values[value]["shape"])
    if got != list(want):
        raise ExportError(f"{op['name']}: shape of '{value}' = {got} breaks {why} ({list(want)})")


def max_abs(a: np.ndarray) -> int:
    """``max |a|`` of an integer array as a Python int (0 when empty), without forming ``abs`` in the
    array's dtype (where ``abs(INT64_MIN)`` overflows to a negative number) or a widened copy."""
    a = np.asarray(a)
    if a.size == 0:
        return 0
    return max(abs(int(a.min())), abs(int(a.max())))
