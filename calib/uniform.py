"""Uniform asymmetric quantizers: per-tensor activations and per-output-channel weights.

Activation quantizer (a ``codes`` value): ``q = clamp(rnd(x / s) + z, 0, 2^b - 1)``,
dequantized ``s * (q - z)``; ``s`` float (units of the activation), ``z`` integer in 0..2^b-1.
Its range is searched over the percentiles ``PERCENTILES`` (clipping both tails), keeping the one
with the smallest L2 (sum of squares) quantization error on a sample of the tensor.

Weight quantizer: per output channel c, ``wq = clamp(rnd(W[c] / s_w[c]) + zw[c], 0, 2^b - 1)``;
the program stores the centered codes ``w = wq - zw[c]`` (so ``|w| <= 2^b - 1``) and ``s_w``.
The range ``[a * min(W[c], 0), a * max(W[c], 0)]`` is searched over the shrink factors
``SHRINK`` per channel, by the L2 error of the channel's dequantized weights.

All statistics are float64 numpy.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np

from intsim.program.quantizers import rnd

PERCENTILES = (0.999, 0.9999, 0.99999, 1.0)
SHRINK = tuple(np.round(np.arange(1.0, 0.499, -0.05), 2).tolist())  # 1.0, 0.95, ..., 0.5


@dataclass(frozen=True)
class ActQuant:
    """Per-tensor asymmetric uniform quantizer of a ``codes`` value."""

    scale: float
    zero_point: int
    bits: int

    def qdq(self, x: np.ndarray) -> np.ndarray:
        """Quantize-dequantize (float64)."""
        return qdq(x, self.scale, self.zero_point, self.bits)


def qdq(x: np.ndarray, scale, zero_point, bits: int) -> np.ndarray:
    """``scale * (clamp(rnd(x / scale) + zp, 0, 2^b - 1) - zp)`` with broadcasting (float64)."""
    q = np.clip(rnd(np.asarray(x, dtype=np.float64) / scale) + zero_point, 0, (1 << bits) - 1)
    return (q - zero_point) * scale


def params_from_range(lo, hi, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Scale and integer zero point of the range ``[min(lo, 0), max(hi, 0)]`` (arrays broadcast).

    The range always contains 0 (so the zero point is in 0..2^b-1). A degenerate (empty) range
    gets the scale of [0, 1].
    """
    n = (1 << bits) - 1
    lo = np.minimum(np.asarray(lo, dtype=np.float64), 0.0)
    hi = np.maximum(np.asarray(hi, dtype=np.float64), 0.0)
    width = hi - lo
    degenerate = ~(width > 1e-30)
    scale = np.where(degenerate, 1.0 / n, width / n)
    zp = np.clip(rnd(-lo / scale), 0, n).astype(np.int64)
    return scale, zp


def _percentile_ranges(sorted_x: np.ndarray, percentiles: Iterable[float]) -> list[tuple[float, float]]:
    """(lo, hi) for each percentile p: the (1-p) and p order statistics of a sorted 1-D sample."""
    m = sorted_x.shape[0] - 1
    out = []
    for p in percentiles:
        out.append((float(sorted_x[int(np.floor((1.0 - p) * m + 0.5))]), float(sorted_x[int(np.floor(p * m + 0.5))])))
    return out


def search_activation(sample: np.ndarray, bits: int, extra: Iterable[tuple[float, int]] = (),
                      percentiles: Iterable[float] = PERCENTILES) -> ActQuant:
    """Best per-tensor quantizer of a 1-D sample by L2 error.

    Candidates: every percentile clipping of ``percentiles`` and every ``(scale, zero_point)`` of
    ``extra``, in that order; the first of equal errors wins.
    """
    x = np.sort(np.asarray(sample, dtype=np.float64).ravel())
    if x.size == 0:
        raise ValueError("empty calibration sample")
    cands: list[tuple[float, int]] = []
    for lo, hi in _percentile_ranges(x, percentiles):
        s, z = params_from_range(lo, hi, bits)
        cands.append((float(s), int(z)))
    cands += [(float(s), int(z)) for s, z in extra]
    errs = [float(np.sum((qdq(x, s, z, bits) - x) ** 2)) for s, z in cands]
    best = int(np.argmin(errs))
    return ActQuant(scale=cands[best][0], zero_point=cands[best][1], bits=int(bits))


def search_channels(y: np.ndarray, bits: int, percentiles: Iterable[float] = PERCENTILES) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel percentile search on ``y`` (M rows, D channels): scales (D,) float64, zero points (D,) int64."""
    y = np.asarray(y, dtype=np.float64)
    ys = np.sort(y, axis=0)
    m = ys.shape[0] - 1
    best_err = np.full(y.shape[1], np.inf)
    best_s = np.ones(y.shape[1])
    best_z = np.zeros(y.shape[1], dtype=np.int64)
    for p in percentiles:
        lo = ys[int(np.floor((1.0 - p) * m + 0.5))]
        hi = ys[int(np.floor(p * m + 0.5))]
        s, z = params_from_range(lo, hi, bits)
        err = np.sum((qdq(y, s, z, bits) - y) ** 2, axis=0)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_s = np.where(better, s, best_s)
        best_z = np.where(better, z, best_z)
    return best_s, best_z


@dataclass(frozen=True)
class WeightQuant:
    """Per-output-channel quantized weight: centered codes ``w`` int64 (N, K), scales (N,) float64."""

    w: np.ndarray
    scale: np.ndarray

    def dequant(self) -> np.ndarray:
        return self.w.astype(np.float64) * self.scale[:, None]


def quantize_weight(W: np.ndarray, bits: int, shrink: Iterable[float] = SHRINK) -> WeightQuant:
    """Asymmetric per-output-channel quantization of ``W`` (N, K) with a per-channel clipping search.

    A channel that is all zeros gets the median scale of the other channels (its codes are 0).
    """
    W = np.asarray(W, dtype=np.float64)
    n = (1 << bits) - 1
    wmin = np.minimum(W.min(axis=1), 0.0)
    wmax = np.maximum(W.max(axis=1), 0.0)
    zero_row = ~((wmax - wmin) > 1e-30)
    best_err = np.full(W.shape[0], np.inf)
    best_q = np.zeros(W.shape, dtype=np.int64)
    best_s = np.ones(W.shape[0])
    for a in shrink:
        s, z = params_from_range(a * wmin, a * wmax, bits)
        q = (np.clip(rnd(W / s[:, None]) + z[:, None], 0, n) - z[:, None]).astype(np.int64)
        err = np.sum((q * s[:, None] - W) ** 2, axis=1)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_q = np.where(better[:, None], q, best_q)
        best_s = np.where(better, s, best_s)
    if zero_row.any():
        fill = float(np.median(best_s[~zero_row])) if (~zero_row).any() else 1.0
        best_s = np.where(zero_row, fill, best_s)
        best_q[zero_row] = 0
    return WeightQuant(w=best_q, scale=best_s)


def absmax_scale(absmax: float, bits: int, margin: float = 1.25) -> float:
    """Scale of a signed ``int`` value: ``margin * max|x| / (2^(bits-1) - 1)`` (1.0 when max|x| is 0)."""
    if not absmax > 0:
        return 1.0
    return float(margin * absmax / ((1 << (bits - 1)) - 1))
