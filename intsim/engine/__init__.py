"""The Numba integer engine: bit-exact execution of an intsim program (``docs/integer-spec.md``)."""
from .runner import COUNT_KEYS, Engine, EngineResult, run_op

__all__ = ["COUNT_KEYS", "Engine", "EngineResult", "run_op"]
