"""The engine's Numba kernels: ``numeric`` (the integer rules, written once), ``epilogues`` (GEMM
epilogues, LayerNorm, GELU, add), ``attention`` (integer softmax between BLAS products, and the
int64 attention), ``window`` (Swin window attention, token pool) and ``gemm`` (exact GEMM routes).

``KERNEL_MODULES`` lists every module that holds compiled kernels; ``compile_stats`` counts them.
"""
from __future__ import annotations

from typing import Any

from numba.core.dispatcher import Dispatcher

from . import attention, epilogues, numeric, window

KERNEL_MODULES = (numeric, epilogues, attention, window)


def compile_stats() -> dict[str, Any]:
    """Numba compilations in this process over every kernel module:
    ``{"misses": n, "hits": n, "compiled": [kernel names], "loaded": [kernels used]}``.

    Every kernel is ``cache=True``; a miss is a signature compiled in this process (a fresh process
    with a warm cache has none), a hit one loaded from the on-disk cache.
    """
    hits = misses = 0
    compiled: list[str] = []
    loaded: list[str] = []
    for m in KERNEL_MODULES:
        for name, obj in sorted(vars(m).items()):
            if isinstance(obj, Dispatcher) and obj.__module__ == m.__name__:
                st = obj.stats
                h, n = sum(st.cache_hits.values()), sum(st.cache_misses.values())
                hits += h
                misses += n
                if n:
                    compiled.append(name)
                if h or n:
                    loaded.append(name)
    return {"hits": hits, "misses": misses, "compiled": compiled, "loaded": loaded}
