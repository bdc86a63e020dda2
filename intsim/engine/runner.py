"""The engine: prepares every op of a program once, proves which arithmetic is exact, runs it.

Python only dispatches: per op it calls one BLAS product (or none) and one Numba kernel. Every
integer the kernels use comes from the program (tensors and attributes); the engine reads no
float scale for computation. The only settings it reads are ``acc_bits`` (the accumulator range
of ``accsat``) and ``gelu_bits`` (the offset of the GELU table).

Exact GEMM routes
-----------------
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

Attention
---------
The scores ``A = (q - zp_q)(k - zp_k)^T`` per head (d products) and the decode product
``O = decode[code] (v - zp_v)`` (T products) are batched BLAS products (torch.matmul); the
integer softmax and threshold encoding between them run per row in a parallel Numba kernel, with
exact lookup tables built at construction (``_softmax_tables``: e by score gap, code by
probability). Bounds, with ``qmax = max |q - zp_q|`` over the proven range of q (likewise k, v):

* scores in float32 when ``d * qmax * kmax <= 2^24``, else float64 when ``<= 2^53``;
* decode product: ``R`` = a proven bound of ``sum_j |decode[code[i, j]]|`` over any row, the
  smaller of ``T * max|decode|`` and the softmax-normalization bound of ``_decode_row_bound``
  (the probabilities of a row sum to about 2^P, and ``|decode[code(p)]|`` is bounded by an
  affine function of p). One float32 GEMM when ``R * vmax <= 2^24``; else ``decode`` is split
  into ``np <= 3`` base-``2^s`` digits (``decode = sum_i digit_i 2^(s i)``, low digits in
  ``[0, 2^s)``, the top digit signed) with ``T * max|digit_i| * vmax <= 2^24`` per digit, the np
  products one batched GEMM (digit matrices stacked along rows) recombined in int64; else float64
  when ``R * vmax <= 2^53``; else the whole op runs in the int64 kernel.

Requantization
--------------
``rq(a, m, n) = rshift(a * m, n)`` runs in the kernels either literally or, where the runner
proved ``|a| <= 2^31``, ``|m| <= 2^31`` and ``0 <= n <= 62`` (``_narrow``), in an offset form
with one int32 x int32 product and one logical shift (``kernels._requant_row``); LayerNorm uses
the same form where ``ln_params`` proves its products below 2^62.

Fusion (``Engine.run`` and ``forward(keep=False)``)
----------------------------------------------------
The ViT graph (spec section 6) is executed with fewer passes: q, k, v share one GEMM whose
epilogue writes the centered head-major operands of the attention products; ``linear -> add``
(proj, fc2) runs as one epilogue, followed in the same pass by the next ``layernorm`` when it
reads the sum; ``linear -> gelu`` (fc1) runs as one epilogue. Codes that feed only GEMMs are
stored as uint8 when every consuming GEMM takes the ``i8`` route (the route's proof puts them in
0..255), else as float32 (exact, their range is within +-2^24). Every op keeps its own
saturation counts.
Work buffers come from a pool kept between runs of the same batch shape (fresh large
allocations page-fault). ``forward(keep=True)`` and :func:`run_op` run op by op with int64
values (the same kernels). Other op types (e.g. the Swin ops of ``swin_ops.py``) run op by op.
"""
from __future__ import annotations

import math
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from intsim.program.format import Program, ProgramError, validate

from . import kernels as K
from . import swin_ops

#: float32 holds every integer of magnitude <= 2^24; float64 every integer <= 2^53.
F32_EXACT = 2 ** 24
F64_EXACT = 2 ** 53
#: AVX2 int8 kernels (no VNNI) add two u8 * s8 products into a saturating int16.
I16_MAX = 2 ** 15 - 1
#: ``auto`` splits K into at most this many float32 chunks before it prefers float64.
MAX_AUTO_CHUNKS = 4
#: ``auto`` splits the decode table into at most this many float32 digits before float64.
MAX_AUTO_PARTS = 3
#: Rows of one softmax task (parallel work item): B * H * ceil(T / rows) tasks.
SOFTMAX_ROWS_PER_TASK = 8
#: Use the softmax-normalization bound of the decode product (``_decode_row_bound``); tests turn it
#: off to exercise the digit split.
USE_ROW_BOUND = True
#: Rows of one epilogue task.
EPI_ROWS_PER_TASK = 8
#: Largest exp table by score gap (int32 entries) and code table by probability (2^P int16 entries).
MAX_ETAB = 1 << 16
MAX_CTAB_BITS = 18

#: A float64 sum of integer products is exact when every partial sum stays below this bound.
FLOAT_EXACT_BOUND = F64_EXACT

COUNT_KEYS = ("acc", "out", "prob")

GEMM_MODES = ("auto", "float", "int", "i8", "f32", "f64")

_TORCH: Any = None


def _torch() -> Any:
    """torch, imported on first use (the BLAS provider of the float and int8 routes)."""
    global _TORCH
    if _TORCH is None:
        import torch
        _TORCH = torch
    return _TORCH


def _zero_counts() -> dict[str, int]:
    return {k: 0 for k in COUNT_KEYS}


def _i64(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.int64)


def _int(v: Any, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise ProgramError(f"{what} must be an integer, got {v!r}")
    return int(v)


def _check_shifts(name: str, shifts: np.ndarray) -> None:
    if shifts.size and (shifts.max() > 62 or shifts.min() < -62):
        raise ProgramError(f"op '{name}': shift outside -62..62 (min {shifts.min()}, max {shifts.max()})")


def _as_int_input(x: np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(x)
    if x.dtype.kind not in "iu":
        raise TypeError(f"op '{name}': integer input expected, got dtype {x.dtype}")
    return _i64(x)


def _data_range(x: np.ndarray) -> tuple[int, int]:
    """(min, max) of an integer-valued array as Python ints; (0, 0) when empty."""
    if x.size == 0:
        return 0, 0
    return int(x.min()), int(x.max())


def _absmax(r: tuple[int, int]) -> int:
    return max(abs(r[0]), abs(r[1]))


def _f32_storable(r: tuple[int, int] | None) -> bool:
    """Whether every value of the proven range ``r`` is exactly a float32."""
    return r is not None and _absmax(r) <= F32_EXACT


@dataclass
class EngineResult:
    """Output of :meth:`Engine.run`."""

    logits: np.ndarray            # int64 (B, num_classes)
    scale: float                  # float scale of the logits (program.values[output]["scale"])
    counts: dict[str, dict[str, int]] = field(default_factory=dict)  # op name -> {"acc","out","prob"}


# ---- GEMM ---------------------------------------------------------------------------------------


def _int8_gemm_available() -> bool:
    """Whether torch exposes oneDNN's u8 x s8 -> float32 linear (x86 CPU builds do)."""
    torch = _torch()
    try:
        return bool(torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qlinear_pointwise")
                    and hasattr(torch.ops.onednn, "qlinear_prepack"))
    except Exception:  # pragma: no cover - exotic torch builds
        return False


class _Gemm:
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
                and xhi * self.l1 <= F32_EXACT and self.K > 0 and self.N > 0 and _int8_gemm_available())

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
        xmax = _absmax(key)
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
        torch = _torch() if route != "int" else None
        if route == "int":
            p = _i64(self.w16)
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
        torch = _torch()
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
        torch = _torch()
        packed, ones, zeros = prep
        y = torch.ops.onednn.qlinear_pointwise(torch.from_numpy(xu8), 1.0, 0, packed, ones, zeros, None,
                                               1.0, 0, torch.float32, "none", [], "")
        return y.numpy()

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """x: (M, K) integer-valued (int64, or uint8 / float32 holding codes) -> S (C, M, N)."""
        if self.xrange is not None:
            route, chunks = self.route, self.chunks
        else:
            route, chunks = self._plan(_data_range(x))
        M = x.shape[0]
        self.last_route = "int" if route == "int" else "float"
        self.last_kind = route if route != "f32" or len(chunks) <= 1 else f"f32x{len(chunks)}"
        if route == "int":
            return K.gemm_i64(_i64(x), self._prepare("int"))
        if M == 0 or self.K == 0:
            return np.zeros((1, M, self.N), np.float64 if route == "f64" else np.float32)
        torch = _torch()
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


# ---- attention plan -----------------------------------------------------------------------------


def _digits(decode: np.ndarray, bits: int, n: int) -> np.ndarray:
    """decode = sum_i digit_i * 2^(bits * i): low digits in [0, 2^bits), the top one signed (floor)."""
    out = np.empty((decode.shape[0], n), np.int64)
    rest = decode.astype(np.int64).copy()
    for i in range(n - 1):
        out[:, i] = rest & ((1 << bits) - 1)
        rest = rest >> bits
    out[:, n - 1] = rest
    return out


@dataclass
class _AttnRoute:
    route: str                  # "fast" or "int"
    score_dtype: Any = None     # np.float32 / np.float64
    pv_dtype: Any = None
    part_bits: int = 0
    parts: np.ndarray | None = None   # (Q+1, np) digits of decode, in pv_dtype
    why: str = ""


def _decode_row_bound(decode: np.ndarray, thresholds: np.ndarray, T: int, P: int, G: int, tabmax: int) -> int:
    """An upper bound of ``sum_j |decode[code[i, j]]|`` over one softmax row of T tokens, from the
    softmax normalization (the probabilities of a row sum to about 2^P), proven from constants:

    * ``p_j = min(rshift(e_j inv, G), 2^P - 1) <= e_j inv / 2^G + 1/2``, ``inv = rdiv(2^(P+G), Z)
      <= 2^(P+G) / Z + 1/2`` and ``Z = sum_j e_j <= T * max(exp_table)`` (``e <= exp_table`` entry
      for nonnegative tables), so ``SP = sum_j p_j <= 2^P + T * max(exp_table) / 2^(G+1) + T / 2``;
    * for any ``a >= 0``: ``|decode[code(p)]| * 2^16 <= a * p + b`` for every p in ``0 .. 2^P - 1``
      with ``b = max_p (|decode[code(p)]| * 2^16 - a * p)``; code(p) is constant between
      consecutive thresholds, so that maximum is attained at p = 0 or at a threshold and is
      computed exactly there. Hence ``sum_j |decode| <= (a * SP + T * b) / 2^16``.

    The best of a few slopes a (and the plain ``T * max|decode|``) is returned.
    """
    dmax = int(np.abs(decode).max()) if decode.size else 0
    plain = T * dmax
    if G < 1 or tabmax < 0 or P < 1:
        return plain
    pmax = (1 << P) - 1
    sp = (1 << P) + -(-(T * tabmax) // (1 << (G + 1))) + -(-T // 2)
    u = np.sort(np.asarray(thresholds, np.int64))
    starts = np.unique(np.concatenate([[0], u[(u >= 0) & (u <= pmax)]]))       # left ends of the code intervals
    codes = np.searchsorted(u, starts, side="right")                              # code(p) = #{thresholds <= p}
    dec16 = np.abs(np.asarray(decode, np.int64))[codes] << 16
    pos = (starts > 0) & (dec16 > 0)
    cand = [0]
    if pos.any():
        r = -(-dec16[pos] // starts[pos])                                         # slopes through each start
        cand += sorted(set(np.quantile(r, np.linspace(0.0, 1.0, 9), method="higher").tolist()))
    best = plain
    for a in cand:
        b = max(int((dec16 - a * starts).max()), 0)
        best = min(best, -(-(a * sp + T * b) // (1 << 16)))
    return best


def _attn_route(mode: str, d: int, T: int, qmax: int, kmax: int, vmax: int, decode: np.ndarray,
                name: str, row_bound: int | None = None) -> _AttnRoute:
    """Choose the attention arithmetic (module docstring); ValueError when a forced route is not exact.

    ``row_bound``: a proven bound of ``sum_j |decode[code]|`` per row (``_decode_row_bound``).
    """
    if mode == "int":
        return _AttnRoute("int", why="gemm='int'")
    sb = d * qmax * kmax
    dmax = int(np.abs(decode).max()) if decode.size else 0
    pb = vmax * min(T * dmax, row_bound if row_bound is not None else T * dmax)
    # scores
    if sb <= F32_EXACT and mode != "f64":
        sdt = np.float32
    elif sb <= F64_EXACT and mode != "f32":
        sdt = np.float64
    else:
        if mode in ("float", "f32", "f64"):
            raise ValueError(f"attention '{name}': the score product is not exact in the requested "
                             f"float type (d={d}, max|q-zq|={qmax}, max|k-zk|={kmax})")
        return _AttnRoute("int", why=f"score bound {sb} > 2^53")
    # decode product: float32 digits
    parts = None
    if mode != "f64" and T * vmax > 0:
        cap = MAX_AUTO_PARTS if mode != "f32" else 8
        for n in range(1, cap + 1):
            if n == 1:
                if pb <= F32_EXACT:
                    parts, bits = decode.reshape(-1, 1).astype(np.int64), 0
                    break
                continue
            bits = int(math.floor(math.log2(F32_EXACT / (T * vmax)))) if F32_EXACT >= T * vmax else 0
            while bits >= 1 and (1 << bits) * T * vmax > F32_EXACT:
                bits -= 1
            if bits < 1:
                break
            dg = _digits(decode, bits, n)
            if all(int(np.abs(dg[:, i]).max()) * T * vmax <= F32_EXACT for i in range(n)):
                parts = dg
                break
    elif T * vmax == 0:
        parts, bits = decode.reshape(-1, 1).astype(np.int64), 0
    if parts is not None:
        return _AttnRoute("fast", sdt, np.float32, bits, np.ascontiguousarray(parts, dtype=np.float32),
                          why=f"scores {np.dtype(sdt).name} (bound {sb}), decode product float32 in "
                              f"{parts.shape[1]} digit(s) of {bits} bits (bound {pb})")
    if pb <= F64_EXACT and mode != "f32":
        return _AttnRoute("fast", sdt, np.float64, 0, np.ascontiguousarray(decode.reshape(-1, 1), dtype=np.float64),
                          why=f"scores {np.dtype(sdt).name} (bound {sb}), decode product float64 (bound {pb})")
    if mode in ("float", "f32", "f64"):
        raise ValueError(f"attention '{name}': the decode product is not exact in the requested float type "
                         f"(T={T}, max|decode|={dmax}, max|v-zv|={vmax})")
    return _AttnRoute("int", why=f"decode product bound {pb} > 2^53")


# ---- softmax lookup tables ----------------------------------------------------------------------


def _np_rshift(a: np.ndarray, n: np.ndarray | int) -> np.ndarray:
    """Spec ``rshift`` on int64 arrays (elementwise shift n in -62..62)."""
    a, n = np.broadcast_arrays(np.asarray(a, np.int64), np.asarray(n, np.int64))
    m = np.maximum(n, 1)
    y = np.where(n >= 1, (a >> m) + ((a >> (m - 1)) & 1), a)
    return np.where(n < 0, a << np.clip(-n, 0, 62), y)


def _py_rq(a: int, m: int, n: int) -> int:
    p = a * m
    if n > 0:
        return (p + (1 << (n - 1))) >> n
    return p << (-n)


def _softmax_tables(exp_table: np.ndarray, score_mult: int, score_shift: int, E: int,
                    thresholds: np.ndarray, P: int, max_diff: int) -> tuple[np.ndarray, int, np.ndarray]:
    """Exact lookup tables of the softmax kernel (``kernels.attn_softmax``).

    ``etab[diff]`` (int32) is ``e`` for the score gap ``diff = m - A`` (spec 4.4: ``u = rq(diff,
    score_mult, score_shift)``, ``e = rshift(exp_table[u & (2^E - 1)], u >> E)`` or 0 beyond shift
    62), computed here with the same integer formulas for the gaps ``0 .. len(etab) - 2``; the last
    entry is 0 (the value of every gap ``>= dz``).
    ``dz``: every gap ``>= dz`` has ``e = 0``. Proof: with ``score_mult >= 0`` u is nondecreasing in
    the gap; with ``0 <= exp_table < 2^b`` every ``u >= (b + 1) * 2^E`` has ``ip = u >> E >= b + 1``
    and ``rshift(t, ip) = (t >> ip) + bit ip-1 of t = 0`` for ``t < 2^(ip-1)`` (and ``ip > 62`` gives
    0 by definition). ``dz`` is the smallest gap reaching that u (binary search), or ``max_diff + 1``
    (never) when the premises fail or it is not reached. Gaps between ``len(etab)`` and ``dz`` are
    computed by the kernel itself.
    ``ctab[p]`` (int16) is the code of a probability p in ``0 .. 2^P - 1``: the number of thresholds
    ``<= p`` (the literal count of spec 4.4, order-independent); empty when ``P > MAX_CTAB_BITS``.
    """
    never = min(max_diff + 1, 2 ** 62)
    tab = np.asarray(exp_table, np.int64)
    dz = never
    if score_mult >= 0 and tab.size and int(tab.min()) >= 0:
        ustop = (int(tab.max()).bit_length() + 1) << E
        top = never - 1
        if _py_rq(top, score_mult, score_shift) >= ustop:
            lo, hi = 0, top                         # invariant: u(hi) >= ustop
            while lo < hi:
                mid = (lo + hi) // 2
                if _py_rq(mid, score_mult, score_shift) >= ustop:
                    hi = mid
                else:
                    lo = mid + 1
            dz = lo
    ntab = int(min(dz, MAX_ETAB, never))
    diff = np.arange(ntab, dtype=np.int64)
    u = _np_rshift(diff * np.int64(score_mult), score_shift)
    ip = u >> E
    e = np.where(ip <= 62, _np_rshift(tab[u & ((1 << E) - 1)], np.minimum(ip, 62)), 0)
    if e.size and (int(e.min()) < -(2 ** 31) or int(e.max()) >= 2 ** 31):
        e = e[:0]                                      # not representable in int32: no table
    etab = np.ascontiguousarray(np.concatenate([e, [0]]), dtype=np.int32)     # + the 0 of gaps >= dz
    if P <= MAX_CTAB_BITS and thresholds.shape[0] < 2 ** 15:
        ctab = np.searchsorted(np.sort(thresholds), np.arange(1 << P, dtype=np.int64), side="right").astype(np.int16)
    else:
        ctab = np.zeros(0, np.int16)
    return etab, int(dz), ctab


# ---- requantization constants of the kernels' offset form ---------------------------------------


def _rq_offsets(shift: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``off = 2^62 + 2^(n-1)`` (``2^62`` for n = 0) and ``corr = 2^(62-n)`` per shift n in 0..62
    (``kernels._requant_row``: ``rshift(p, n) = ((p + off) >>> n) - corr`` for ``|p| <= 2^62``);
    shifts outside 0..62 get zeros (those columns never use the offset form)."""
    n = np.asarray(shift, np.int64)
    ok = (n >= 0) & (n <= 62)
    nn = np.where(ok, n, 0)
    off = np.where(ok, (np.int64(1) << 62) + np.where(nn >= 1, np.int64(1) << np.maximum(nn - 1, 0), 0), 0)
    corr = np.where(ok, np.int64(1) << (62 - nn), 0)
    return off.astype(np.int64), corr.astype(np.int64)


def _narrow(acc_lo: int, acc_hi: int, mult: np.ndarray, shift: np.ndarray) -> int:
    """1 when the offset form of ``rq(a, mult, shift)`` is exact for every accumulator a in
    ``[acc_lo, acc_hi]``: |a| and |mult| <= 2^31 (so |a * mult| <= 2^62) and shifts in 0..62."""
    mult = np.asarray(mult, np.int64)
    shift = np.asarray(shift, np.int64)
    return int(acc_lo >= -(2 ** 31) and acc_hi < 2 ** 31
               and (mult.size == 0 or (int(mult.min()) >= -(2 ** 31) and int(mult.max()) < 2 ** 31))
               and (shift.size == 0 or (int(shift.min()) >= 0 and int(shift.max()) <= 62)))


# ---- ops ----------------------------------------------------------------------------------------


class _Op:
    """An op with its integer constants converted once; ``__call__(*inputs) -> (y, counts)`` with
    int64 values (the op-by-op path of :func:`run_op` and ``forward(keep=True)``).

    ``ranges``: the proven ranges of the op's inputs (None entries: taken from the data).
    """

    def __init__(self, program: Program, op: dict[str, Any], gemm: str = "auto",
                 ranges: list[tuple[int, int] | None] | None = None, f32_max_k: int | None = None):
        if gemm not in GEMM_MODES:
            raise ValueError(f"gemm mode must be one of {GEMM_MODES}, got {gemm!r}")
        self.name = op["name"]
        self.type = op["type"]
        self.inputs = list(op["inputs"])
        self.output = op["output"]
        self.mode = gemm
        self.ranges = list(ranges) if ranges is not None else [None] * len(self.inputs)
        attrs = op.get("attrs", {})
        self.attrs = attrs
        settings = program.settings
        acc_bits = _int(settings["acc_bits"], "settings.acc_bits")
        if not 2 <= acc_bits <= 64:
            raise ProgramError(f"settings.acc_bits={acc_bits} outside 2..64")
        self.acc_lo = -(1 << (acc_bits - 1))
        self.acc_hi = (1 << (acc_bits - 1)) - 1
        name = self.name
        t = lambda n: program.t(op, n)  # noqa: E731
        a = lambda n: _int(attrs[n], f"op '{name}' attribute '{n}'")  # noqa: E731
        fn: Callable[..., tuple[np.ndarray, dict[str, int]]]

        if self.type in ("linear", "patch_embed"):
            self.gemm = _Gemm(t("w"), gemm, self.ranges[0], f32_max_k, name=f"op '{name}'")
            self.bias = _i64(t("bias"))
            self.mult = _i64(t("mult"))
            self.shift = _i64(t("shift"))
            _check_shifts(name, self.shift)
            self.lo, self.hi = a("lo"), a("hi")
            N = self.bias.shape[0]
            self.lo_n = np.full(N, self.lo, np.int64)
            self.hi_n = np.full(N, self.hi, np.int64)
            off, corr = _rq_offsets(self.shift)
            # per-column constants of the epilogue kernels (rows kernels.C_*)
            self.cols = np.ascontiguousarray(np.stack([self.bias, self.mult, self.shift, off, corr, self.lo_n, self.hi_n]))
            self.narrow = _narrow(self.acc_lo, self.acc_hi, self.mult, self.shift)
            if self.type == "linear":
                self.add = _i64(t("zp")).reshape(1, -1)
                fn = self._linear
            else:
                self.patch = a("patch")
                pos = _i64(t("pos"))
                self.pos_cls = pos[0].copy()
                self.add = np.ascontiguousarray(pos[1:])
                fn = self._patch_embed
        elif self.type == "layernorm":
            self.gmul = _i64(t("gmul"))
            self.gadd = _i64(t("gadd"))
            self.tokens = attrs["tokens"]
            if self.tokens not in ("all", "first"):
                raise ProgramError(f"op '{name}': layernorm tokens must be 'all' or 'first', got {self.tokens!r}")
            self.recip_bits, self.norm_frac = a("recip_bits"), a("norm_frac")
            self.ln_shift, self.zp, self.lo, self.hi = a("shift"), a("zp"), a("lo"), a("hi")
            if not 0 <= self.recip_bits <= 61:
                raise ProgramError(f"op '{name}': recip_bits={self.recip_bits} outside 0..61")
            _check_shifts(name, np.array([self.ln_shift, self.recip_bits - self.norm_frac]))
            fn = self._layernorm
        elif self.type == "attention":
            self.heads = a("heads")
            self.zp_q, self.zp_k, self.zp_v = a("zp_q"), a("zp_k"), a("zp_v")
            self.score_mult, self.score_shift = a("score_mult"), a("score_shift")
            self.exp_frac_bits, self.prob_bits = a("exp_frac_bits"), a("prob_bits")
            self.recip_frac = a("recip_frac")
            self.mult, self.shift_ = a("mult"), a("shift")
            self.zp, self.lo, self.hi = a("zp"), a("lo"), a("hi")
            self.exp_table = _i64(t("exp_table"))
            self.thresholds = _i64(t("thresholds"))
            self.decode = _i64(t("decode"))
            if self.exp_table.shape[0] != 1 << self.exp_frac_bits:
                raise ProgramError(f"op '{name}': exp_table has {self.exp_table.shape[0]} entries, "
                                   f"expected 2^exp_frac_bits = {1 << self.exp_frac_bits}")
            if self.decode.shape[0] != self.thresholds.shape[0] + 1:
                raise ProgramError(f"op '{name}': decode must have one entry more than thresholds")
            if not 0 <= self.prob_bits + self.recip_frac <= 61:
                raise ProgramError(f"op '{name}': prob_bits + recip_frac outside 0..61")
            if self.exp_table.size == 0 or self.exp_table[0] < 1:
                raise ProgramError(f"op '{name}': exp_table[0] must be positive (it is 2^exp_bits)")
            _check_shifts(name, np.array([self.score_shift, self.shift_, self.recip_frac]))
            self.sorted_thresholds = int(bool(np.all(np.diff(self.thresholds) >= 0)))
            o_off, o_corr = _rq_offsets(np.array([self.shift_]))
            self.out_off, self.out_corr = int(o_off[0]), int(o_corr[0])
            self.out_narrow = _narrow(self.acc_lo, self.acc_hi, np.array([self.mult]), np.array([self.shift_]))
            self.etab, self.dz, self.ctab = _softmax_tables(
                self.exp_table, self.score_mult, self.score_shift, self.exp_frac_bits, self.thresholds,
                self.prob_bits, self.acc_hi - self.acc_lo)
            self._routes: dict[tuple, _AttnRoute] = {}
            fn = self._attention
        elif self.type == "gelu":
            self.table = _i64(t("table"))
            g = _int(settings["gelu_bits"], "settings.gelu_bits")
            if self.table.shape[0] != 1 << g:
                raise ProgramError(f"op '{name}': gelu table has {self.table.shape[0]} entries, expected 2^{g}")
            self.offset = 1 << (g - 1)
            fn = self._gelu
        elif self.type == "add":
            self.mult, self.shift_ = a("mult"), a("shift")
            self.lo, self.hi = a("lo"), a("hi")
            _check_shifts(name, np.array([self.shift_]))
            a_off, a_corr = _rq_offsets(np.array([self.shift_]))
            self.add_off, self.add_corr = int(a_off[0]), int(a_corr[0])
            sr = self.ranges[1]           # the skip's proven range decides the offset form's exactness
            self.add_narrow = _narrow(sr[0], sr[1], np.array([self.mult]), np.array([self.shift_])) if sr else 0
            fn = self._add
        elif self.type in swin_ops.OP_TYPES:      # Swin op types (spec section 9), kernels in swin_ops.py
            fn = swin_ops.build(self, program, op)
        else:
            raise ProgramError(f"op '{name}': unknown op type {self.type!r}")
        self._fn = fn

    # ---- proven output range ---------------------------------------------------------------------
    def out_range(self) -> tuple[int, int]:
        """The range every output element lies in (the op's final clamp)."""
        if self.type == "gelu":
            return int(self.table.min()), int(self.table.max())
        return self.lo, self.hi

    # ---- attention routes ------------------------------------------------------------------------
    def attn_route(self, T: int, qr: tuple[int, int], kr: tuple[int, int], vr: tuple[int, int], d: int) -> _AttnRoute:
        key = (T, qr, kr, vr, d)
        r = self._routes.get(key)
        if r is None:
            qmax = max(abs(qr[0] - self.zp_q), abs(qr[1] - self.zp_q))
            kmax = max(abs(kr[0] - self.zp_k), abs(kr[1] - self.zp_k))
            vmax = max(abs(vr[0] - self.zp_v), abs(vr[1] - self.zp_v))
            rb = _decode_row_bound(self.decode, self.thresholds, T, self.prob_bits, self.recip_frac,
                                   int(self.exp_table.max()) if int(self.exp_table.min()) >= 0 else -1) \
                if USE_ROW_BOUND else None
            r = _attn_route(self.mode, d, T, qmax, kmax, vmax, self.decode, self.name, rb)
            self._routes[key] = r
        return r

    # ---- dispatch --------------------------------------------------------------------------
    def __call__(self, *inputs: np.ndarray) -> tuple[np.ndarray, dict[str, int]]:
        if len(inputs) != len(self.inputs):
            raise TypeError(f"op '{self.name}' ({self.type}) takes {len(self.inputs)} inputs, got {len(inputs)}")
        return self._fn(*inputs)

    def _linear(self, x: np.ndarray) -> tuple[np.ndarray, dict[str, int]]:
        x = np.asarray(x)
        if x.dtype not in (np.float32, np.uint8):       # codes stored for the GEMM pass as they are
            x = _as_int_input(x, self.name)
        Kdim = self.gemm.K
        if x.shape[-1] != Kdim:
            raise ValueError(f"op '{self.name}': input has {x.shape[-1]} channels, expected {Kdim}")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, Kdim)
        M = x2.shape[0]
        S = self.gemm(x2)
        y = np.empty((1, M, S.shape[2]), np.int64)
        na, no = K.linear_epilogue(S, self.cols, self.add, self.acc_lo, self.acc_hi, self.narrow, max(M, 1), 0, y,
                                   EPI_ROWS_PER_TASK)
        return y.reshape(*lead, -1), {"acc": int(na), "out": int(no), "prob": 0}

    def patchify(self, img: np.ndarray, dtype: Any) -> tuple[np.ndarray, int]:
        """Patch vectors (B * P, C * p * p) in ``dtype`` and P (spec 4.2)."""
        if img.ndim != 4:
            raise ValueError(f"op '{self.name}': image batch (B, C, H, W) expected, got shape {img.shape}")
        B, C, H, W = img.shape
        p = self.patch
        if H % p or W % p:
            raise ValueError(f"op '{self.name}': image {H}x{W} is not a multiple of the patch size {p}")
        gh, gw = H // p, W // p
        P = gh * gw
        if P != self.add.shape[0] or C * p * p != self.gemm.K:
            raise ValueError(f"op '{self.name}': image shape {img.shape} does not match the program")
        # x[b, 1 + i*gw + j, (ch*p + ky)*p + kx] = img[b, ch, i*p + ky, j*p + kx]
        x = np.ascontiguousarray(img.reshape(B, C, gh, p, gw, p).transpose(0, 2, 4, 1, 3, 5), dtype=dtype)
        return x.reshape(B * P, C * p * p), P

    def patch_embed_into(self, x: np.ndarray, B: int, P: int, y: np.ndarray) -> dict[str, int]:
        """GEMM + epilogue of the patch vectors ``x`` into ``y`` (B, P + 1, N) (int64), class token included."""
        S = self.gemm(x)
        na, no = K.linear_epilogue(S, self.cols, self.add, self.acc_lo, self.acc_hi, self.narrow, P, 1, y,
                                   EPI_ROWS_PER_TASK)
        cls = np.clip(self.pos_cls, self.lo, self.hi)
        y[:, 0, :] = cls
        ncls = int(np.count_nonzero(cls != self.pos_cls)) * B
        return {"acc": int(na), "out": int(no) + ncls, "prob": 0}

    def _patch_embed(self, img: np.ndarray) -> tuple[np.ndarray, dict[str, int]]:
        img = np.asarray(img)
        if img.dtype.kind not in "iu":
            raise TypeError(f"op '{self.name}': integer input expected, got dtype {img.dtype}")
        x, P = self.patchify(img, self.gemm.input_dtype())
        B = img.shape[0]
        y = np.empty((B, P + 1, self.bias.shape[0]), np.int64)
        c = self.patch_embed_into(x, B, P, y)
        return y, c

    def _layernorm(self, x: np.ndarray) -> tuple[np.ndarray, dict[str, int]]:
        x = _as_int_input(x, self.name)
        if x.ndim != 3 or x.shape[-1] != self.gmul.shape[0]:
            raise ValueError(f"op '{self.name}': input (B, T, {self.gmul.shape[0]}) expected, got {x.shape}")
        B, T, D = x.shape
        rows = np.ascontiguousarray(x[:, 0, :]) if self.tokens == "first" else x.reshape(B * T, D)
        y = np.empty(rows.shape, np.int64)
        no = self.layernorm_into(rows, y, self.ranges[0])
        return y.reshape(B, -1, D), {"acc": 0, "out": int(no), "prob": 0}

    def ln_params(self, xr: tuple[int, int]) -> np.ndarray:
        """The scalar table ``lnp`` of ``kernels._ln_row`` for inputs within ``xr``.

        The offset form of both rounding shifts (``L_FAST``) needs ``|c * inv| <= 2^62`` and
        ``|n * gmul + gadd| <= 2^62``. With ``c_i = D x_i - S1``: ``sum_i c_i^2 = D * V`` so
        ``|c| <= sqrt(D V)``; ``sd = floor(sqrt(V)) >= sqrt(V) / 2`` (V >= 1) and
        ``inv <= 2^K / sd + 1/2``, hence ``|c * inv| <= 2 sqrt(D) 2^K + |c| / 2`` with
        ``|c| <= 2 D max|x|`` (0 when sd = 0); ``|n| <= |c * inv| / 2^(K-F) + 1``.
        """
        key = (int(xr[0]), int(xr[1]))
        cache = self.__dict__.setdefault("_lnp", {})
        if key in cache:
            return cache[key]
        D = int(self.gmul.shape[0])
        Kb, F, Sh = self.recip_bits, self.norm_frac, self.ln_shift
        fast = narrow = 0
        off1 = corr1 = off2 = corr2 = 0
        if 0 <= Kb - F <= 62 and 0 <= Sh <= 62 and D > 0:
            xmax = _absmax(key)
            b1 = 2 * (math.isqrt(D) + 1) * (1 << Kb) + 2 * D * xmax
            if b1 <= 2 ** 62:
                bnv = (b1 >> (Kb - F)) + 1
                gm = int(np.abs(self.gmul).max())
                b2 = bnv * gm + int(np.abs(self.gadd).max())
                if b2 <= 2 ** 62:
                    fast = 1
                    narrow = int(bnv < 2 ** 31 and gm < 2 ** 31)
                    (off1,), (corr1,) = _rq_offsets(np.array([Kb - F]))
                    (off2,), (corr2,) = _rq_offsets(np.array([Sh]))
        lnp = np.array([Kb, F, Sh, self.zp, self.lo, self.hi, fast, off1, corr1, off2, corr2, narrow], np.int64)
        cache[key] = lnp
        return lnp

    def layernorm_into(self, rows: np.ndarray, out: np.ndarray, xr: tuple[int, int] | None = None) -> int:
        lnp = self.ln_params(xr if xr is not None else _data_range(rows))
        return K.layernorm_rows(rows, self.gmul, self.gadd, lnp, out, EPI_ROWS_PER_TASK)

    def attention_core(self, qh: np.ndarray, kh: np.ndarray, vh: np.ndarray, route: _AttnRoute,
                       out: np.ndarray, pool: "_Pool | None" = None) -> dict[str, int]:
        """The float route of spec 4.4 on centered head-major operands: ``qh`` (B, H, T, d),
        ``kh`` (B, H, T, d), ``vh`` (B, H, T, d), float32 (exact by the route's proof);
        writes ``out`` (B, T, H * d) (uint8 or float32 codes, or int64)."""
        torch = _torch()
        B, H, T, d = qh.shape
        G = B * H
        get = pool.get if pool is not None else (lambda shape, dt: np.empty(shape, dt))
        npart = route.parts.shape[1]
        if route.score_dtype == np.float32:
            S = get((G, T, T), np.float32)
            torch.matmul(torch.from_numpy(qh.reshape(G, T, d)), torch.from_numpy(kh.reshape(G, T, d)).transpose(1, 2),
                         out=torch.from_numpy(S))
        else:
            S = torch.matmul(torch.from_numpy(qh).double(),
                             torch.from_numpy(kh).double().transpose(2, 3)).numpy().reshape(G, T, T)
        P = get((G, npart * T, T), route.pv_dtype)
        na1, npr = K.attn_softmax(S, self.acc_lo, self.acc_hi, self.score_mult, self.score_shift,
                                  self.exp_frac_bits, self.exp_table, self.etab, self.dz, self.prob_bits,
                                  self.recip_frac, self.thresholds, self.sorted_thresholds, self.ctab,
                                  route.parts, P, SOFTMAX_ROWS_PER_TASK)
        if pool is not None and S.dtype == np.float32:
            pool.put(S)
        V = torch.from_numpy(vh.reshape(G, T, d))
        if route.pv_dtype == np.float64:
            V = V.double()
        O = get((G, npart * T, d), route.pv_dtype)
        torch.matmul(torch.from_numpy(P), V, out=torch.from_numpy(O))
        if pool is not None:
            pool.put(P)
        na2, no = K.attn_output(O, route.part_bits, self.mult, self.shift_, self.out_off, self.out_corr,
                                self.out_narrow, self.zp, self.lo, self.hi, self.acc_lo, self.acc_hi, H, out,
                                SOFTMAX_ROWS_PER_TASK)
        if pool is not None:
            pool.put(O)
        return {"acc": int(na1 + na2), "out": int(no), "prob": int(npr)}

    def _attention(self, q: np.ndarray, k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, dict[str, int]]:
        q, k, v = (_as_int_input(z, self.name) for z in (q, k, v))
        if q.ndim != 3 or q.shape != k.shape or q.shape != v.shape or q.shape[2] % self.heads:
            raise ValueError(f"op '{self.name}': q, k, v must share a shape (B, T, H*d), got {q.shape}, {k.shape}, {v.shape}")
        B, T, D = q.shape
        H = self.heads
        d = D // H
        rs = [r if r is not None else _data_range(z) for r, z in zip(self.ranges, (q, k, v))]
        route = self.attn_route(T, rs[0], rs[1], rs[2], d) if B * T * D else _AttnRoute("int")
        self.last_route = route.route
        if route.route == "int":
            return self.attention_int(q, k, v)

        def heads(z: np.ndarray, zp: int) -> np.ndarray:
            return (z - zp).reshape(B, T, H, d).transpose(0, 2, 1, 3)

        qh = np.ascontiguousarray(heads(q, self.zp_q), dtype=np.float32)
        kh = np.ascontiguousarray(heads(k, self.zp_k), dtype=np.float32)
        vh = np.ascontiguousarray(heads(v, self.zp_v), dtype=np.float32)
        y = np.empty((B, T, D), np.int64)
        c = self.attention_core(qh, kh, vh, route, y)
        return y, c

    def attention_int(self, q: np.ndarray, k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, dict[str, int]]:
        """Spec 4.4 entirely in int64 on the codes q, k, v (B, T, D) int64."""
        y, na, no, npr = K.attention_i64(
            q, k, v, self.heads, self.zp_q, self.zp_k, self.zp_v, self.score_mult, self.score_shift,
            self.exp_frac_bits, self.prob_bits, self.recip_frac, self.mult, self.shift_, self.zp,
            self.lo, self.hi, self.acc_lo, self.acc_hi, self.exp_table, self.thresholds, self.decode,
            self.sorted_thresholds)
        return y, {"acc": int(na), "out": int(no), "prob": int(npr)}

    def _gelu(self, x: np.ndarray) -> tuple[np.ndarray, dict[str, int]]:
        x = _as_int_input(x, self.name)
        y, bad = K.gelu_lookup(x.reshape(-1), self.table, self.offset)
        if bad:
            raise ValueError(f"op '{self.name}': {int(bad)} GELU inputs outside the table range "
                             f"[{-self.offset}, {self.offset - 1}]")
        return y.reshape(x.shape), _zero_counts()

    def _add(self, a: np.ndarray, skip: np.ndarray) -> tuple[np.ndarray, dict[str, int]]:
        a = _as_int_input(a, self.name)
        skip = _as_int_input(skip, self.name)
        if a.shape != skip.shape:
            raise ValueError(f"op '{self.name}': a {a.shape} and skip {skip.shape} differ in shape")
        cols = a.shape[-1] if a.ndim and a.shape[-1] else 1
        y, no = K.add_requant(a.reshape(-1), skip.reshape(-1), self.mult, self.shift_, self.lo, self.hi, cols)
        return y.reshape(a.shape), {"acc": 0, "out": int(no), "prob": 0}


# ---- the fused plan -----------------------------------------------------------------------------


class _Pool:
    """Reusable work buffers keyed by (shape, dtype): fresh large allocations page-fault on first
    touch, which costs as much as the arithmetic of a cheap kernel. Not thread-safe (one run at a
    time per Engine)."""

    def __init__(self) -> None:
        self.free: dict[tuple, list[np.ndarray]] = {}

    def get(self, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        key = (tuple(int(v) for v in shape), np.dtype(dtype).str)
        lst = self.free.get(key)
        if lst:
            return lst.pop()
        return np.empty(key[0], dtype)

    def put(self, *arrays: np.ndarray) -> None:
        for a in arrays:
            base = a if a.base is None else a.base
            while isinstance(base, np.ndarray) and base.base is not None:
                base = base.base
            if isinstance(base, np.ndarray) and base.flags.owndata:
                self.free.setdefault((base.shape, base.dtype.str), []).append(base)


class _Fused:
    """Fused steps of the ViT graph (module docstring). Built once per Engine.

    Each step reads values from and writes values to ``vals``; values whose last consumer has
    run go back to the buffer pool, and so do each step's temporaries.
    """

    def __init__(self, engine: "Engine"):
        self.engine = engine
        ops = engine.ops
        prog = engine.program
        consumers: dict[str, list[tuple[int, int]]] = {}
        for i, op in enumerate(ops):
            for pos, v in enumerate(op.inputs):
                consumers.setdefault(v, []).append((i, pos))
        self.consumers = consumers
        self.steps: list[tuple[list[str], Callable[[dict[str, np.ndarray], dict[str, dict[str, int]]], None]]] = []
        self.describe: list[str] = []
        self.gemms: list[_Gemm] = []          # the GEMMs the steps use (prepared at construction)
        self.pool = _Pool()
        out_name = prog.output

        def only_consumer(v: str, idx: int, pos: int | None = None) -> bool:
            c = consumers.get(v, [])
            return v != out_name and len(c) == 1 and c[0][0] == idx and (pos is None or c[0][1] == pos)

        def gemm_only(v: str) -> bool:
            """v feeds only linear ops, through their GEMM (so float32 storage suffices)."""
            c = consumers.get(v, [])
            return v != out_name and bool(c) and all(ops[i].type == "linear" for i, _ in c)

        i = 0
        n = len(ops)
        while i < n:
            op = ops[i]
            if (op.type == "linear" and i + 3 < n and ops[i + 1].type == "linear" and ops[i + 2].type == "linear"
                    and ops[i + 3].type == "attention" and self._qkv_fusable(ops[i:i + 4], i + 3, only_consumer)):
                self._add_qkv_attention(ops[i:i + 4], gemm_only)
                i += 4
                continue
            if (op.type == "linear" and i + 1 < n and ops[i + 1].type == "add"
                    and only_consumer(op.output, i + 1, 0) and ops[i + 1].inputs[1] != op.output):
                ln = ops[i + 2] if i + 2 < n else None
                if (ln is not None and ln.type == "layernorm" and ln.tokens == "all"
                        and ln.inputs[0] == ops[i + 1].output and ops[i + 1].output != out_name
                        and ln.gmul.shape[0] == op.bias.shape[0]):
                    self._add_linear_add(op, ops[i + 1], ln, gemm_only)
                    i += 3
                else:
                    self._add_linear_add(op, ops[i + 1])
                    i += 2
                continue
            if op.type == "linear" and i + 1 < n and ops[i + 1].type == "gelu" and only_consumer(op.output, i + 1, 0):
                self._add_linear_gelu(op, ops[i + 1], gemm_only)
                i += 2
                continue
            if op.type == "layernorm":
                self._add_layernorm(op, gemm_only)
            elif op.type == "patch_embed":
                self._add_patch_embed(op)
            else:
                self._add_generic(op, gemm_only)
            i += 1
        # after each step: the values whose last consumer it is go back to the pool
        last: dict[str, int] = {}
        for si, (reads, _) in enumerate(self.steps):
            for v in reads:
                last[v] = si
        self.release_after: list[list[str]] = [[] for _ in self.steps]
        for v, si in last.items():
            if v not in (engine.input, out_name):
                self.release_after[si].append(v)

    # ---- helpers ----------------------------------------------------------------------------
    def _code_dtype(self, op: _Op, gemm_only: Callable[[str], bool]) -> Any:
        """How ``op``'s output is stored when only GEMMs read it: uint8 when every consuming GEMM
        takes the proven ``i8`` route (which reads uint8, and whose proof puts the codes in 0..255),
        float32 when every value of the range is exactly a float32, else None (int64)."""
        if not gemm_only(op.output):
            return None
        r = op.out_range()
        gemms = [self.engine.ops[i].gemm for i, _ in self.consumers[op.output]]
        if 0 <= r[0] and r[1] <= 255 and all(g.xrange is not None and g.route == "i8" for g in gemms):
            return np.uint8
        return np.float32 if _f32_storable(r) else None

    @staticmethod
    def _as_i64(x: np.ndarray) -> np.ndarray:
        return x if x.dtype == np.int64 else x.astype(np.int64)

    # ---- step builders ----------------------------------------------------------------------
    def _add_generic(self, op: _Op, gemm_only: Callable[[str], bool]) -> None:
        dt = self._code_dtype(op, gemm_only) if op.type == "linear" else None
        if hasattr(op, "gemm"):
            self.gemms.append(op.gemm)

        def step(vals: dict[str, np.ndarray], counts: dict[str, dict[str, int]]) -> None:
            ins = [vals[v] for v in op.inputs]
            if op.type != "linear":
                ins = [self._as_i64(x) for x in ins]
            y, c = op(*ins)
            vals[op.output] = y.astype(dt) if dt is not None else y
            counts[op.name] = c
        self.steps.append((list(op.inputs), step))
        self.describe.append(f"{op.name}: {op.type}" + (f" [{op.gemm.route}]" if hasattr(op, "gemm") else ""))

    def _add_patch_embed(self, op: _Op) -> None:
        self.gemms.append(op.gemm)
        pool = self.pool

        def step(vals: dict[str, np.ndarray], counts: dict[str, dict[str, int]]) -> None:
            img = vals[op.inputs[0]]
            x, P = op.patchify(img, op.gemm.input_dtype())
            B = img.shape[0]
            y = pool.get((B, P + 1, op.bias.shape[0]), np.int64)
            counts[op.name] = op.patch_embed_into(x, B, P, y)
            vals[op.output] = y
        self.steps.append((list(op.inputs), step))
        self.describe.append(f"{op.name}: patch_embed [{op.gemm.route}]")

    def _add_layernorm(self, op: _Op, gemm_only: Callable[[str], bool]) -> None:
        dt = self._code_dtype(op, gemm_only) or np.int64
        pool = self.pool

        def step(vals: dict[str, np.ndarray], counts: dict[str, dict[str, int]]) -> None:
            x = self._as_i64(vals[op.inputs[0]])
            B, T, D = x.shape
            rows = np.ascontiguousarray(x[:, 0, :]) if op.tokens == "first" else x.reshape(B * T, D)
            y = pool.get(rows.shape, dt)
            no = op.layernorm_into(rows, y, op.ranges[0])
            vals[op.output] = y.reshape(B, -1, D)
            counts[op.name] = {"acc": 0, "out": int(no), "prob": 0}
        self.steps.append((list(op.inputs), step))
        self.describe.append(f"{op.name}: layernorm -> {np.dtype(dt).name}")

    def _add_linear_add(self, lin: _Op, add: _Op, ln: _Op | None = None,
                        gemm_only: Callable[[str], bool] | None = None) -> None:
        self.gemms.append(lin.gemm)
        pool = self.pool
        ln_dt = (self._code_dtype(ln, gemm_only) or np.int64) if ln is not None else np.int64
        lnp = ln.ln_params(ln.ranges[0]) if ln is not None else None

        def step(vals: dict[str, np.ndarray], counts: dict[str, dict[str, int]]) -> None:
            x = vals[lin.inputs[0]]
            skip = self._as_i64(vals[add.inputs[1]])
            S = lin.gemm(x.reshape(-1, lin.gemm.K))
            M = S.shape[1]
            if skip.shape[:-1] != x.shape[:-1] or skip.shape[-1] != S.shape[2]:
                raise ValueError(f"op '{add.name}': a and skip differ in shape")
            y = pool.get(skip.shape, np.int64)
            if ln is None:
                na, no, nd = K.linear_add_epilogue(S, lin.cols, lin.add, lin.acc_lo, lin.acc_hi, lin.narrow,
                                                   skip.reshape(M, -1), add.mult, add.shift_, add.add_off,
                                                   add.add_corr, add.lo, add.hi, add.add_narrow, y.reshape(M, -1),
                                                   EPI_ROWS_PER_TASK)
            else:
                z = pool.get((M, skip.shape[-1]), ln_dt)
                na, no, nd, nl = K.linear_add_ln_epilogue(
                    S, lin.cols, lin.add, lin.acc_lo, lin.acc_hi, lin.narrow, skip.reshape(M, -1), add.mult,
                    add.shift_, add.add_off, add.add_corr, add.lo, add.hi, add.add_narrow, y.reshape(M, -1),
                    ln.gmul, ln.gadd, lnp, z, EPI_ROWS_PER_TASK)
                counts[ln.name] = {"acc": 0, "out": int(nl), "prob": 0}
                vals[ln.output] = z.reshape(skip.shape)
            counts[lin.name] = {"acc": int(na), "out": int(no), "prob": 0}
            counts[add.name] = {"acc": 0, "out": int(nd), "prob": 0}
            vals[add.output] = y
        self.steps.append(([lin.inputs[0], add.inputs[1]], step))
        self.describe.append(f"{lin.name}+{add.name}" + (f"+{ln.name}" if ln is not None else "")
                             + f": linear+add{'+layernorm' if ln is not None else ''} [{lin.gemm.route}]")

    def _add_linear_gelu(self, lin: _Op, gelu: _Op, gemm_only: Callable[[str], bool]) -> None:
        self.gemms.append(lin.gemm)
        dt = self._code_dtype(gelu, gemm_only) or np.int64
        table = gelu.table.astype(dt)          # exact: the table's range decided dt
        pool = self.pool

        def step(vals: dict[str, np.ndarray], counts: dict[str, dict[str, int]]) -> None:
            x = vals[lin.inputs[0]]
            S = lin.gemm(x.reshape(-1, lin.gemm.K))
            M, N = S.shape[1], S.shape[2]
            y = pool.get((M, N), dt)
            na, no, nb = K.linear_gelu_epilogue(S, lin.cols, lin.add, lin.acc_lo, lin.acc_hi, lin.narrow,
                                                table, gelu.offset, y, EPI_ROWS_PER_TASK)
            if nb:
                raise ValueError(f"op '{gelu.name}': {int(nb)} GELU inputs outside the table range "
                                 f"[{-gelu.offset}, {gelu.offset - 1}]")
            counts[lin.name] = {"acc": int(na), "out": int(no), "prob": 0}
            counts[gelu.name] = _zero_counts()
            vals[gelu.output] = y.reshape(*x.shape[:-1], N)
        self.steps.append(([lin.inputs[0]], step))
        self.describe.append(f"{lin.name}+{gelu.name}: linear+gelu [{lin.gemm.route}]")

    def _qkv_fusable(self, four: list[_Op], at_index: int, only_consumer: Callable[..., bool]) -> bool:
        lq, lk, lv, at = four
        if not (lq.inputs[0] == lk.inputs[0] == lv.inputs[0]):
            return False
        if at.inputs != [lq.output, lk.output, lv.output] or len(set(at.inputs)) != 3:
            return False
        if not all(only_consumer(l_.output, at_index, pos) for pos, l_ in enumerate((lq, lk, lv))):
            return False
        D = lq.bias.shape[0]
        if lk.bias.shape[0] != D or lv.bias.shape[0] != D or D % at.heads or lq.gemm.K != lk.gemm.K or lq.gemm.K != lv.gemm.K:
            return False
        # centered operands must be exact in float32
        for l_, zp in ((lq, at.zp_q), (lk, at.zp_k), (lv, at.zp_v)):
            r = l_.out_range()
            if max(abs(r[0] - zp), abs(r[1] - zp)) > F32_EXACT:
                return False
        return True

    def _add_qkv_attention(self, four: list[_Op], gemm_only: Callable[[str], bool]) -> None:
        lq, lk, lv, at = four
        eng = self.engine
        pool = self.pool
        D = lq.bias.shape[0]
        H = at.heads
        d = D // H
        w = np.concatenate([eng.program.t(lq.name, "w"), eng.program.t(lk.name, "w"), eng.program.t(lv.name, "w")])
        gemm = _Gemm(w, eng.gemm_mode, lq.ranges[0], eng.f32_max_k, name=f"ops '{lq.name}', '{lk.name}', '{lv.name}'")
        self.gemms.append(gemm)
        cols = np.ascontiguousarray(np.concatenate([lq.cols, lk.cols, lv.cols], axis=1))
        zp = np.ascontiguousarray(np.concatenate([lq.add, lk.add, lv.add], axis=1))
        center = np.concatenate([np.full(D, at.zp_q), np.full(D, at.zp_k), np.full(D, at.zp_v)]).astype(np.int64)
        acc_lo, acc_hi = lq.acc_lo, lq.acc_hi
        narrow = int(lq.narrow and lk.narrow and lv.narrow)
        out_dt = self._code_dtype(at, gemm_only) or np.int64
        qr, kr, vr = lq.out_range(), lk.out_range(), lv.out_range()
        T_decl = eng.program.values.get(lq.output, {}).get("shape", [None])[0]
        if T_decl:
            at.attn_route(int(T_decl), qr, kr, vr, d)      # prove (and fail early for forced routes)

        def step(vals: dict[str, np.ndarray], counts: dict[str, dict[str, int]]) -> None:
            x = vals[lq.inputs[0]]
            B, T = x.shape[0], x.shape[1]
            route = at.attn_route(T, qr, kr, vr, d)
            S = gemm(x.reshape(-1, gemm.K))
            qh = pool.get((B, H, T, d), np.float32)
            kh = pool.get((B, H, T, d), np.float32)
            vh = pool.get((B, H, T, d), np.float32)
            c = K.qkv_epilogue(S, cols, zp, acc_lo, acc_hi, narrow, center, T, H, qh, kh, vh, EPI_ROWS_PER_TASK)
            del S
            for j, l_ in enumerate((lq, lk, lv)):
                counts[l_.name] = {"acc": int(c[2 * j]), "out": int(c[2 * j + 1]), "prob": 0}
            y = pool.get((B, T, D), out_dt)
            if route.route == "int":
                # the int64 kernel on the (uncentered) codes
                qi = (qh.transpose(0, 2, 1, 3).reshape(B, T, D).astype(np.int64) + at.zp_q)
                ki = (kh.transpose(0, 2, 1, 3).reshape(B, T, D).astype(np.int64) + at.zp_k)
                vi = (vh.transpose(0, 2, 1, 3).reshape(B, T, D).astype(np.int64) + at.zp_v)
                yi, cc = at.attention_int(qi, ki, vi)
                y[...] = yi
            else:
                cc = at.attention_core(qh, kh, vh, route, y, pool)
            pool.put(qh, kh, vh)
            counts[at.name] = cc
            vals[at.output] = y
        self.steps.append(([lq.inputs[0]], step))
        self.describe.append(f"{lq.name}+{lk.name}+{lv.name}+{at.name}: qkv [{gemm.route}] + attention")

    # ---- run --------------------------------------------------------------------------------
    def run(self, images: np.ndarray) -> tuple[np.ndarray, dict[str, dict[str, int]]]:
        eng = self.engine
        if images.shape != getattr(self, "_last_shape", None):
            self.pool.free.clear()            # keep only the buffers of the current batch shape
            self._last_shape = images.shape
        vals: dict[str, np.ndarray] = {eng.input: images}
        counts: dict[str, dict[str, int]] = {}
        pool = self.pool
        for (reads, step), rel in zip(self.steps, self.release_after):
            step(vals, counts)
            for v in rel:
                pool.put(vals.pop(v))
        out = np.array(vals.pop(eng.output), dtype=np.int64)      # a copy: never a pooled buffer
        for v in list(vals):
            if v != eng.input:
                pool.put(vals.pop(v))
        return out, counts


class _F32MatmulPrecision:
    """Float32 products must be IEEE float32 (no TF32/bf16 shortcuts): 'highest' during a run."""

    def __enter__(self) -> None:
        torch = sys.modules.get("torch")
        self.old = None
        if torch is not None:
            self.old = torch.get_float32_matmul_precision()
            if self.old != "highest":
                torch.set_float32_matmul_precision("highest")

    def __exit__(self, *exc: Any) -> None:
        if self.old is not None and self.old != "highest":
            sys.modules["torch"].set_float32_matmul_precision(self.old)


class Engine:
    """Runs an integer program on uint8 images, bit-exactly as ``docs/integer-spec.md``.

    ``gemm`` selects the arithmetic of the matrix products (module docstring): ``"auto"`` (the
    fastest provably exact route per layer), ``"float"``, ``"int"``, or one forced route
    ``"i8"``/``"f32"``/``"f64"``. ``fuse=False`` runs op by op (int64 values) also in :meth:`run`.
    ``f32_max_k`` caps the float32 K-chunk width (to test chunking).

    Threads: the Numba kernels use ``numba.get_num_threads()`` and the BLAS products torch's
    ``torch.get_num_threads()`` of the calling thread/process; results do not depend on either.
    On a machine shared with other busy processes set ``OMP_WAIT_POLICY=PASSIVE`` before torch
    and Numba load OpenMP (spinning workers slow every parallel region). One run at a time per
    Engine (its work buffers are reused between runs).
    """

    def __init__(self, program: Program, *, gemm: str = "auto", fuse: bool = True, f32_max_k: int | None = None):
        if gemm not in GEMM_MODES:
            raise ValueError(f"gemm mode must be one of {GEMM_MODES}, got {gemm!r}")
        validate(program)
        self.program = program
        self.gemm_mode = gemm
        self.f32_max_k = f32_max_k
        inputs = program.header["inputs"]
        if len(inputs) != 1 or program.values[inputs[0]]["kind"] != "image":
            raise ProgramError(f"the engine runs programs with one image input, got inputs {inputs}")
        self.input = inputs[0]
        self.output = program.output
        self.scale = float(program.values[self.output]["scale"])
        # proven value ranges: the image is 0..255 (checked in run), every op clamps its output
        ranges: dict[str, tuple[int, int]] = {self.input: (0, 255)}
        self.ops: list[_Op] = []
        for op in program.ops:
            o = _Op(program, op, gemm, [ranges.get(v) for v in op["inputs"]], f32_max_k)
            ranges[o.output] = o.out_range()
            self.ops.append(o)
        self.ranges = ranges
        self.fuse = fuse
        self._fused = _Fused(self) if fuse else None
        used = self._fused.gemms if self._fused is not None else [o.gemm for o in self.ops if hasattr(o, "gemm")]
        for g in used:
            g.prepare()

    def routes(self) -> list[str]:
        """One line per (fused) step: which ops, and the GEMM route each uses."""
        if self._fused is not None:
            return list(self._fused.describe)
        return [f"{o.name}: {o.type}" + (f" [{o.gemm.route}]" if hasattr(o, "gemm") else "") for o in self.ops]

    def forward(self, images: np.ndarray, keep: bool = False
                ) -> tuple[np.ndarray, dict[str, dict[str, int]], dict[str, np.ndarray]]:
        """One batch: returns (output value, counts per op, all values if ``keep`` else {})."""
        images = np.asarray(images)
        if images.dtype != np.uint8 and images.size and (images.dtype.kind not in "iu" or images.min() < 0
                                                           or images.max() > 255):
            raise TypeError("images must be integer pixels 0..255 (the proven input range of the engine)")
        with _F32MatmulPrecision():
            if not keep and self._fused is not None:
                out, counts = self._fused.run(images)
                return out, counts, {}
            vals: dict[str, np.ndarray] = {self.input: images}
            counts: dict[str, dict[str, int]] = {}
            for op in self.ops:
                y, c = op(*(vals[i] for i in op.inputs))
                vals[op.output] = y
                counts[op.name] = c
            out = vals[self.output]
            return out, counts, (vals if keep else {})

    def run(self, images: np.ndarray, batch_size: int = 32) -> EngineResult:
        images = np.asarray(images)
        shape = tuple(self.program.values[self.input]["shape"])
        if images.ndim != 4 or tuple(images.shape[1:]) != shape:
            raise ValueError(f"images must have shape (B, {', '.join(map(str, shape))}), got {images.shape}")
        if images.dtype != np.uint8:
            if images.dtype.kind not in "iu" or (images.size and (images.min() < 0 or images.max() > 255)):
                raise TypeError(f"images must be uint8 pixels 0..255, got dtype {images.dtype}")
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        counts = {op.name: _zero_counts() for op in self.ops}
        outs = []
        for s in range(0, images.shape[0], batch_size):
            out, c, _ = self.forward(images[s:s + batch_size])
            outs.append(out)
            for name, cc in c.items():
                for key, n in cc.items():
                    counts[name][key] += n
        out_shape = tuple(self.program.values[self.output]["shape"])
        if outs:
            logits = np.concatenate(outs, axis=0)
        else:
            logits = np.zeros((0, *out_shape), np.int64)
        if logits.ndim == 3 and logits.shape[1] == 1:
            logits = logits[:, 0, :]
        return EngineResult(logits=logits, scale=self.scale, counts=counts)


def run_op(program: Program, op: dict[str, Any] | str, *inputs: np.ndarray, gemm: str = "auto"
           ) -> tuple[np.ndarray, dict[str, int]]:
    """Run one op (given as its dict or its name) of ``program`` on int64 inputs: ``(y, counts)``."""
    if isinstance(op, str):
        op = program.op(op)
    return _Op(program, op, gemm)(*inputs)
