"""Building an integer program: the value table, the op list, the tensors and the header.

Every architecture's exporter (``calib.vit``, ``calib.swin``) fills one :class:`ProgramBuilder`:
it declares each value (``value`` / ``codes``) and then lets the op's module
(``intsim.ops.<type>.export``) compute the op's constants from the calibration state and append
the op (``op``). :meth:`ProgramBuilder.build` makes the header, the same for every architecture
(spec section 8: every program records ``export.bias_saturated``), and validates the result.

Value table entries: ``kind`` (image | codes | int), ``bits``, ``shape`` per image ([T, C], or
[3, H, W] for the image), ``scale`` (float64, real units per step) and ``zero_point`` (int).
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from .fixedpoint import ExportError, requant
from .format import check_settings, validate
from .program import FORMAT, VERSION, Program


class ProgramBuilder:
    """Accumulates the values, ops and tensors of one program (settings checked on creation).

    ``s``: the settings; ``values`` / ``ops`` / ``tensors``: what :meth:`build` puts in the
    program; ``bias_saturated``: op name -> number of biases an op's export clamped to the
    accumulator (recorded in the header, spec section 8).
    """

    def __init__(self, settings: dict[str, int]):
        check_settings(settings)
        self.s = settings
        self.values: dict[str, dict[str, Any]] = {}
        self.ops: list[dict[str, Any]] = []
        self.tensors: dict[str, np.ndarray] = {}
        self.bias_saturated: dict[str, int] = {}

    # ---- values --------------------------------------------------------------------------
    def value(self, name: str, kind: str, bits: int, shape: list[int], scale: float, zero_point: int = 0) -> None:
        """Declare the value ``name`` (an op's output carries the op's name)."""
        if not (math.isfinite(scale) and scale > 0):
            raise ExportError(f"value '{name}': scale must be positive and finite, got {scale!r}")
        self.values[name] = {"kind": kind, "bits": int(bits), "shape": [int(d) for d in shape],
                             "scale": float(scale), "zero_point": int(zero_point)}

    def codes(self, name: str, shape: list[int], act) -> None:
        """Declare a ``codes`` value quantized by ``act`` (``bits``, ``scale``, ``zero_point``)."""
        n = (1 << act.bits) - 1
        if not 0 <= act.zero_point <= n:
            raise ExportError(f"value '{name}': zero point {act.zero_point} outside 0..{n}")
        self.value(name, "codes", act.bits, shape, act.scale, act.zero_point)

    def sc(self, name: str) -> float:
        """Scale of the value ``name``."""
        return self.values[name]["scale"]

    def zp(self, name: str) -> int:
        """Zero point of the value ``name``."""
        return self.values[name]["zero_point"]

    def out_range(self, name: str) -> tuple[int, int]:
        """Saturation range of the value ``name``: ``0..2^b-1`` for codes, signed ``b`` bits else."""
        v = self.values[name]
        if v["kind"] == "codes":
            return 0, (1 << v["bits"]) - 1
        return -(1 << (v["bits"] - 1)), (1 << (v["bits"] - 1)) - 1

    # ---- ops -----------------------------------------------------------------------------
    def op(self, name: str, typ: str, inputs: list[str], attrs: dict[str, Any], tensors: dict[str, np.ndarray]) -> None:
        """Append the op ``name`` of type ``typ`` (its output value is ``name``); its tensors are
        stored as ``{name}.{tensor}``."""
        self.ops.append({"name": name, "type": typ, "inputs": list(inputs), "output": name, "attrs": attrs})
        for k, t in tensors.items():
            self.tensors[f"{name}.{k}"] = np.ascontiguousarray(t)

    def mult_shift(self, what: str, M: float) -> tuple[int, int]:
        """The multiplier and shift of the rescale ``M`` at the settings' ``mult_bits`` (section 2)."""
        try:
            return requant(M, self.s["mult_bits"])
        except ExportError as e:
            raise ExportError(f"{what}: {e}") from None

    # ---- the program ---------------------------------------------------------------------
    def build(self, model: dict[str, Any], provenance: dict[str, Any], output: str,
              inputs: tuple[str, ...] = ("image",)) -> Program:
        """The program: ``model`` (the header's model description, ``arch`` first), the settings,
        ``provenance``, the graph and the export record; validated against the format."""
        header = {
            "format": FORMAT,
            "version": VERSION,
            "model": model,
            "settings": dict(sorted(self.s.items())),
            "provenance": provenance,
            "inputs": list(inputs),
            "output": output,
            "values": self.values,
            "ops": self.ops,
            "export": {"bias_saturated": dict(sorted(self.bias_saturated.items()))},
        }
        prog = Program(header, self.tensors)
        validate(prog, where="exported program", bounds=False)   # bounds: calib.common.check_bounds
        return prog
