"""The Numba integer engine: bit-exact execution of an intsim program (``docs/integer-spec.md``).

``Engine(program).run(images)`` runs a whole program (fused steps); ``run_op`` one op; ``build_op``
prepares one op through the operator registry (``intsim.ops``). The kernels are in
``intsim.kernels``; ``compile_stats`` counts their compilations in this process.
"""
from intsim.kernels import compile_stats
from intsim.kernels.gemm import GEMM_MODES
from intsim.ops.base import COUNT_KEYS

from .runner import Engine, EngineResult, build_op, run_op

__all__ = ["COUNT_KEYS", "GEMM_MODES", "Engine", "EngineResult", "build_op", "compile_stats", "run_op"]
