"""``patch_merge``: 2x2 neighbour concatenation (layout only) (docs/integer-spec.md section 9.2).

Everything about this op type except its golden function (``reference.golden``) lives here:
its schema, its export from calibration state, its fake-quant forward, its engine builder and
its cost figures.
"""
from __future__ import annotations

NAME = "patch_merge"
SPEC = "9.2"
INPUTS = 1
ATTRS = ('grid',)
# tensor name -> (dtype, shape symbols); the symbols are listed in intsim.ops.base.SHAPE_SYMBOLS
TENSORS = {
    "src": ('int32', ('T', '4')),
}
# tensors read only by the fake-quant reference
FLOAT = {}


# ---- export: calibration state -> program attrs and tensors (called by calib) ----------------
# (export)


# ---- fake-quant forward: the paper's semantics in float (called by reference.fakequant) -------
# (fake-quant)


# ---- engine: route choice, exactness proof, kernel call (called by intsim.engine) -------------
# (engine)


# ---- cost figures: MACs, bit operations, storage (called by intsim.studies.cost) -------------
# (cost)
