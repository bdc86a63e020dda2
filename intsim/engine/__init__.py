"""The Numba integer engine: bit-exact execution of an intsim program (``docs/integer-spec.md``)."""
from typing import Any

from .runner import COUNT_KEYS, GEMM_MODES, Engine, EngineResult, run_op


def compile_stats() -> dict[str, Any]:
    """Numba compilations in this process: ``{"misses": n, "hits": n, "compiled": [kernel names]}``.

    Every kernel is ``cache=True``; a miss is a signature compiled in this process (a fresh
    process with a warm cache has none), a hit one loaded from the on-disk cache.
    """
    from numba.core.dispatcher import Dispatcher

    from . import kernels

    hits = misses = 0
    compiled = []
    for name, obj in sorted(vars(kernels).items()):
        if isinstance(obj, Dispatcher):
            st = obj.stats
            h, m = sum(st.cache_hits.values()), sum(st.cache_misses.values())
            hits += h
            misses += m
            if m:
                compiled.append(name)
    return {"hits": hits, "misses": misses, "compiled": compiled}


__all__ = ["COUNT_KEYS", "GEMM_MODES", "Engine", "EngineResult", "compile_stats", "run_op"]
