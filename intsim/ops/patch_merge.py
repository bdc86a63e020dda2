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
