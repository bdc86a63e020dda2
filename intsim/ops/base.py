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
