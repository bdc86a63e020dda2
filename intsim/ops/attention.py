"""``attention``: scores, integer softmax, post-softmax encoding, table decode, times V (docs/integer-spec.md section 4.4).

Everything about this op type except its golden function (``reference.golden``) lives here:
its schema, its export from calibration state, its fake-quant forward, its engine builder and
its cost figures.
"""
from __future__ import annotations

NAME = "attention"
SPEC = "4.4"
INPUTS = 3
ATTRS = ('heads', 'zp_q', 'zp_k', 'zp_v', 'score_mult', 'score_shift', 'exp_frac_bits', 'exp_bits', 'prob_bits', 'recip_frac', 'decode_bits', 'mult', 'shift', 'zp', 'lo', 'hi', 'softmax_quant')
# tensor name -> (dtype, shape symbols); the symbols are listed in intsim.ops.base.SHAPE_SYMBOLS
TENSORS = {
    "exp_table": ('int64', ('E',)),
    "thresholds": ('int64', ('Q',)),
    "decode": ('int64', ('Q+1',)),
}
# tensors read only by the fake-quant reference
FLOAT = {
    "levels": ('float64', ('Q+1',)),
}


# ---- export: calibration state -> program attrs and tensors (called by calib) ----------------
# (export)


# ---- fake-quant forward: the paper's semantics in float (called by reference.fakequant) -------
# (fake-quant)


# ---- engine: route choice, exactness proof, kernel call (called by intsim.engine) -------------
# (engine)


# ---- cost figures: MACs, bit operations, storage (called by intsim.studies.cost) -------------
# (cost)
