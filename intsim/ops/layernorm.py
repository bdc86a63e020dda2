"""``layernorm``: integer LayerNorm with the affine and the output quantizer fused (docs/integer-spec.md section 4.3).

Everything about this op type except its golden function (``reference.golden``) lives here:
its schema, its export from calibration state, its fake-quant forward, its engine builder and
its cost figures.
"""
from __future__ import annotations

NAME = "layernorm"
SPEC = "4.3"
INPUTS = 1
ATTRS = ('tokens', 'recip_bits', 'norm_frac', 'shift', 'zp', 'lo', 'hi')
# tensor name -> (dtype, shape symbols); the symbols are listed in intsim.ops.base.SHAPE_SYMBOLS
TENSORS = {
    "gmul": ('int64', ('D',)),
    "gadd": ('int64', ('D',)),
}
# tensors read only by the fake-quant reference
FLOAT = {
    "gamma": ('float32', ('D',)),
    "beta": ('float32', ('D',)),
}


# ---- export: calibration state -> program attrs and tensors (called by calib) ----------------
# (export)


# ---- fake-quant forward: the paper's semantics in float (called by reference.fakequant) -------
# (fake-quant)


# ---- engine: route choice, exactness proof, kernel call (called by intsim.engine) -------------
# (engine)


# ---- cost figures: MACs, bit operations, storage (called by intsim.studies.cost) -------------
# (cost)
