"""``patch_embed``: patchify, GEMM, position embedding, class token (docs/integer-spec.md section 4.2).

Everything about this op type except its golden function (``reference.golden``) lives here:
its schema, its export from calibration state, its fake-quant forward, its engine builder and
its cost figures.
"""
from __future__ import annotations

NAME = "patch_embed"
SPEC = "4.2"
INPUTS = 1
ATTRS = ('patch', 'lo', 'hi')
# tensor name -> (dtype, shape symbols); the symbols are listed in intsim.ops.base.SHAPE_SYMBOLS
TENSORS = {
    "w": ('int16', ('N', 'K')),
    "bias": ('int64', ('N',)),
    "mult": ('int32', ('N',)),
    "shift": ('int32', ('N',)),
    "pos": ('int32', ('T', 'N')),
}
# tensors read only by the fake-quant reference
FLOAT = {
    "w_scale": ('float64', ('N',)),
    "bias_float": ('float32', ('N',)),
    "pos_float": ('float32', ('T', 'N')),
}


# ---- export: calibration state -> program attrs and tensors (called by calib) ----------------
# (export)


# ---- fake-quant forward: the paper's semantics in float (called by reference.fakequant) -------
# (fake-quant)


# ---- engine: route choice, exactness proof, kernel call (called by intsim.engine) -------------
# (engine)


# ---- cost figures: MACs, bit operations, storage (called by intsim.studies.cost) -------------
# (cost)
