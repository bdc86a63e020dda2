"""Exact integer GEMM ``S = x @ w.T`` by the fastest route whose exactness is proven from the program.

A product ``S = x @ w.T`` of integer operands is computed by the first route (in this order)
whose exactness is *proven at construction* from the program alone: the weights' actual values,
and the range ``[xlo, xhi]`` of the input, which is the clamp range of the op that produces it
(``lo``/``hi`` attributes, the GELU table's extremes, or 0..255 for the uint8 image; a standalone
op run through :func:`run_op` has no producer and takes the range from its input data instead).
With ``xmax = max(|xlo|, |xhi|)`` and ``L1 = max_n sum_k |w[n, k]|`` every partial sum of any
subset of the products of one output element is bounded by ``xmax * L1``:

``i8`` (oneDNN's u8 x s8 linear, ``torch.ops.onednn.qlinear_pointwise``: int32 accumulation,
    float32 output, read straight from uint8 codes)
    needs ``0 <= xlo``, ``xhi <= 255``, ``max|w| <= 127`` (operands are exactly uint8 / int8),
    ``2 * xhi * max|w| <= 2^15 - 1`` (without VNNI, AVX2 kernels add two u8*s8 products into a
    saturating int16 (``vpmaddubsw``): no pair can saturate), and ``xhi * L1 <= 2^24`` (the int32
    accumulator cannot overflow and its conversion to the float32 output, times the scales
    1.0 * 1.0, is exact). A construction-time self-check against int64 at the largest input the
    proof admits confirms the library behaves so; where it does not, ``auto`` takes the next
    route and a forced ``i8`` raises ``RuntimeError``.
``f32`` (float32 BLAS, K split into C chunks)
    every chunk needs ``xmax * L1_chunk <= 2^24``: all partial sums of a chunk are integers of
    magnitude <= 2^24, which float32 represents exactly, whatever the summation order (FMA
    included), so the chunk result is exact; the C chunk results are added in int64 inside the
    epilogue kernel. ``auto`` takes this route when C <= 4 (else float64 is cheaper).
``f64`` (float64 BLAS)
    ``xmax * L1 <= 2^53``.
``int`` (the int64 Numba kernel)
    always exact (the exporter bounds ``|acc| < 2^63``).

``gemm=`` selects: ``"auto"`` (the first provable route above), ``"float"`` (f32, else f64; a
``ValueError`` when neither is exact), ``"int"`` (int64 everywhere, attention included), or one
route forced: ``"i8"``, ``"f32"``, ``"f64"`` (a ``ValueError`` when the route is not exact).

"""
from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from .epilogues import gemm_i64

#: float32 holds every integer of magnitude <= 2^24; float64 every integer <= 2^53.
F32_EXACT = 2 ** 24
F64_EXACT = 2 ** 53
#: AVX2 int8 kernels (no VNNI) add two u8 * s8 products into a saturating int16.
I16_MAX = 2 ** 15 - 1
#: ``auto`` splits K into at most this many float32 chunks before it prefers float64.
MAX_AUTO_CHUNKS = 4

GEMM_MODES = ("auto", "float", "int", "i8", "f32", "f64")

_TORCH: Any = None


def torch_module() -> Any:
    """torch, imported on first use (the BLAS provider of the float and int8 routes)."""
    global _TORCH
    if _TORCH is None:
        import torch
        _TORCH = torch
    return _TORCH


def data_range(x: np.ndarray) -> tuple[int, int]:
    """(min, max) of an integer-valued array as Python ints; (0, 0) when empty."""
    if x.size == 0:
        return 0, 0
    return int(x.min()), int(x.max())


def absmax(r: tuple[int, int]) -> int:
    """The largest magnitude of a range ``(lo, hi)``."""
    return max(abs(r[0]), abs(r[1]))


def f32_storable(r: tuple[int, int] | None) -> bool:
    """Whether every value of the proven range ``r`` is exactly a float32."""
    return r is not None and absmax(r) <= F32_EXACT


def int8_gemm_available() -> bool:
    """Whether torch exposes oneDNN's u8 x s8 -> float32 linear (x86 CPU builds do)."""
    torch = torch_module()
    try:
        return bool(torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qlinear_pointwise")
                    and hasattr(torch.ops.onednn, "qlinear_prepack"))
    except Exception:  # pragma: no cover - exotic torch builds
        return False


class Gemm:
    """``S = x @ w.T`` exactly, by the first provable route (module docstring). ``__call__`` returns
    ``S`` as a 3-D stack of partial sums ``(C, M, N)`` (C chunks, added in int64 by the epilogues).

    ``xrange``: the proven range of the input (None: taken from the data at each call).
    ``f32_max_k``: an upper limit on the float32 chunk width (tests use it to force chunking).
    """

    def __init__(self, w: np.ndarray, mode: str, xrange: tuple[int, int] | None = None,
                 f32_max_k: int | None = None, name: str = "gemm"):
        if mode not in GEMM_MODES:
            raise ValueError(f"gemm mode must be one of {GEMM_MODES}, got {mode!r}")
        self.name = name
        self.w16 = np.ascontiguousarray(w)                 # (N, K) as stored (int16)
        self.N, self.K = self.w16.shape
        absw = np.abs(self.w16.astype(np.int64))
        self.wmax = int(absw.max()) if absw.size else 0
        self.l1 = int(absw.sum(axis=1).max()) if absw.size else 0
        # prefix sums of |w| along K (per output row) to bound every chunk's partial sums
        self._cum = np.concatenate([np.zeros((self.N, 1), np.int64), np.cumsum(absw, axis=1)], axis=1) \
            if absw.size else np.zeros((self.N, 1), np.int64)
        self.mode = mode
        self.f32_max_k = f32_max_k
        self.xrange = xrange
        self.last_route = ""          # "float" (any BLAS route) or "int"
        self.last_kind = ""           # "i8", "f32", "f32xC", "f64" or "int"
        self._prepared: dict[str, Any] = {}
        self._plans: dict[tuple[int, int], tuple[str, list[tuple[int, int]]]] = {}
        if xrange is not None:
            self.route, self.chunks = self._plan(xrange)      # proves exactness (ValueError if forced and not)

    def prepare(self) -> None:
        """Convert/pack the weights for the proven route now (else on the first call)."""
        if self.xrange is not None:
            self._prepare(self.route)

    # ---- proofs ---------------------------------------------------------------------------------
    def _chunk_l1(self, k0: int, k1: int) -> int:
        return int((self._cum[:, k1] - self._cum[:, k0]).max()) if self.N else 0

    def _f32_chunks(self, xmax: int) -> list[tuple[int, int]] | None:
        """The fewest equal K-chunks whose float32 partial sums are all exact, or None."""
        if xmax * self.wmax > F32_EXACT:
            return None
        Kd = self.K
        if Kd == 0:
            return [(0, 0)]
        cap = Kd if self.f32_max_k is None else max(1, min(Kd, self.f32_max_k))
        C = max(1, -(-Kd // cap))
        while C <= Kd:
            width = -(-Kd // C)
            ch = [(k0, min(Kd, k0 + width)) for k0 in range(0, Kd, width)]
            if all(xmax * self._chunk_l1(a, b) <= F32_EXACT for a, b in ch):
                return ch
            C += 1
        return None  # pragma: no cover - C = K always works when xmax * wmax <= 2^24

    def input_dtype(self) -> Any:
        """The dtype the proven route reads (int64 when the route is decided per call)."""
        if self.xrange is None:
            return np.int64
        return {"i8": np.uint8, "f32": np.float32, "f64": np.float64}.get(self.route, np.int64)

    def _i8_ok(self, xr: tuple[int, int]) -> bool:
        xlo, xhi = xr
        return (xlo >= 0 and xhi <= 255 and self.wmax <= 127 and 2 * xhi * self.wmax <= I16_MAX
                and xhi * self.l1 <= F32_EXACT and self.K > 0 and self.N > 0 and int8_gemm_available())

    def _i8_works(self) -> bool:
        """Whether the int8 library passes its self-check on these weights (packs them, once). A
        failure (another CPU or library version) keeps ``auto`` on the exact float routes."""
        if "i8" not in self._prepared:
            try:
                self._prepared["i8"] = self._prepare_i8()
            except RuntimeError as e:
                self._i8_failure = str(e)
                self._prepared["i8"] = None
                if self.mode == "auto":
                    warnings.warn(self._i8_failure, RuntimeWarning, stacklevel=2)
        return self._prepared["i8"] is not None

    def _plan(self, xr: tuple[int, int]) -> tuple[str, list[tuple[int, int]]]:
        """(route, K-chunks) for inputs within ``xr``; a ValueError when a forced route is not exact."""
        key = (int(xr[0]), int(xr[1]))
        if key in self._plans:
            return self._plans[key]
        xmax = absmax(key)
        mode = self.mode
        f32 = self._f32_chunks(xmax) if mode != "int" else None
        f64_ok = xmax * self.l1 <= F64_EXACT
        why = f"max|x|={xmax} (x in {list(key)}), max|w|={self.wmax}, max row L1 |w|={self.l1}, K={self.K}"
        if mode == "int":
            plan = ("int", [])
        elif mode == "i8":
            if not self._i8_ok(key):
                raise ValueError(f"{self.name}: the int8 GEMM route is not provably exact (or oneDNN's int8 "
                                 f"linear is unavailable): {why}")
            if not self._i8_works():
                raise RuntimeError(self._i8_failure)
            plan = ("i8", [])
        elif mode == "f32":
            if f32 is None:
                raise ValueError(f"{self.name}: a float32 GEMM would not be exact: {why}")
            plan = ("f32", f32)
        elif mode == "f64":
            if not f64_ok:
                raise ValueError(f"{self.name}: a float64 GEMM would not be exact: {why}")
            plan = ("f64", [])
        else:
            if mode == "auto" and self._i8_ok(key) and self._i8_works():
                plan = ("i8", [])
            elif f32 is not None and len(f32) <= MAX_AUTO_CHUNKS:
                plan = ("f32", f32)
            elif f64_ok:
                plan = ("f64", [])
            elif f32 is not None:
                plan = ("f32", f32)
            elif mode == "float":
                raise ValueError(f"{self.name}: float64 GEMM would not be exact: {why}")
            else:
                plan = ("int", [])
        self._plans[key] = plan
        return plan

    # ---- execution ------------------------------------------------------------------------------
    def _prepare(self, route: str) -> Any:
        if route in self._prepared:
            return self._prepared[route]
        torch = torch_module() if route != "int" else None
        if route == "int":
            p = np.ascontiguousarray(self.w16, dtype=np.int64)
        elif route == "f32":
            p = torch.from_numpy(np.ascontiguousarray(self.w16.T, dtype=np.float32))   # (K, N)
        elif route == "f64":
            p = torch.from_numpy(np.ascontiguousarray(self.w16.T, dtype=np.float64))
        else:
            p = self._prepare_i8()
        self._prepared[route] = p
        return p

    def _prepare_i8(self) -> Any:
        """oneDNN's packed int8 weights, after a self-check of the library against int64."""
        torch = torch_module()
        packed = torch.ops.onednn.qlinear_prepack(torch.from_numpy(self.w16.astype(np.int8)), None)
        ones = torch.ones(self.N, dtype=torch.float32)
        zeros = torch.zeros(self.N, dtype=torch.int64)
        prep = (packed, ones, zeros)
        # self-check: extreme and random inputs against the exact int64 product
        rng = np.random.default_rng(0)
        # the largest input for which the route is ever chosen (``_i8_ok``): the worst case
        xhi = min(255, I16_MAX // (2 * max(self.wmax, 1)), F32_EXACT // max(self.l1, 1))
        probe = np.stack([np.full(self.K, xhi), np.zeros(self.K, np.int64),
                          np.where(np.arange(self.K) % 2 == 0, xhi, 0), rng.integers(0, xhi + 1, self.K)])
        probe = np.ascontiguousarray(probe, dtype=np.uint8)
        got = self._run_i8(prep, probe)
        want = probe.astype(np.int64) @ self.w16.astype(np.int64).T
        if not np.array_equal(got.astype(np.int64), want):
            raise RuntimeError(f"{self.name}: oneDNN's int8 GEMM failed its exactness self-check "
                               f"(gemm='auto' uses the float routes instead)")
        return prep

    @staticmethod
    def _run_i8(prep: tuple[Any, Any, Any], xu8: np.ndarray) -> np.ndarray:
        """oneDNN u8 x s8 linear of the uint8 codes ``xu8`` (M, K): the int32 accumulator times the
        scales 1.0 * 1.0 as float32 (M, N), no bias, no post-op."""
        torch = torch_module()
        packed, ones, zeros = prep
        y = torch.ops.onednn.qlinear_pointwise(torch.from_numpy(xu8), 1.0, 0, packed, ones, zeros, None,
                                               1.0, 0, torch.float32, "none", [], "")
        return y.numpy()

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """x: (M, K) integer-valued (int64, or uint8 / float32 holding codes) -> S (C, M, N)."""
        if self.xrange is not None:
            route, chunks = self.route, self.chunks
        else:
            route, chunks = self._plan(data_range(x))
        M = x.shape[0]
        self.last_route = "int" if route == "int" else "float"
        self.last_kind = route if route != "f32" or len(chunks) <= 1 else f"f32x{len(chunks)}"
        if route == "int":
            return gemm_i64(np.ascontiguousarray(x, dtype=np.int64), self._prepare("int"))
        if M == 0 or self.K == 0:
            return np.zeros((1, M, self.N), np.float64 if route == "f64" else np.float32)
        torch = torch_module()
        w = self._prepare(route)
        if route == "i8":
            # codes in 0..255 (the route's proof): the conversion is exact, and free for uint8 codes
            return self._run_i8(w, np.ascontiguousarray(x, dtype=np.uint8)).reshape(1, M, self.N)
        dt = np.float32 if route == "f32" else np.float64
        xt = torch.from_numpy(np.ascontiguousarray(x, dtype=dt))
        if route == "f64" or len(chunks) == 1:
            return torch.mm(xt, w).numpy().reshape(1, M, self.N)
        out = torch.empty((len(chunks), M, self.N), dtype=torch.float32)
        for c, (k0, k1) in enumerate(chunks):
            torch.mm(xt[:, k0:k1], w[k0:k1], out=out[c])
        return out.numpy()
