"""Post-softmax quantizers (``docs/integer-spec.md`` section 5) and their integer tables.

Each quantizer maps a probability ``x`` in [0, 1] to a code ``0..N`` (``N = 2**bits - 1``) by a
monotone float64 encoder, and decodes code ``k`` to ``levels()[k]`` (``levels()[0] == 0``).

=============  ============  =================================================================
type           parameters    encoder
=============  ============  =================================================================
``uniform``    ``scale``     ``clip(rnd(x / scale), 0, N)``
``log2``       ``delta``     ``j = rnd(-log2(x / delta))``; ``N - j`` if ``0 <= j <= N-1``,
                             ``N`` if ``j < 0``, ``0`` if ``j > N-1`` or ``x == 0``
``log2sqrt``   ``delta``     as ``log2`` with ``j = rnd(-2 log2(x / delta))``
``tanq``       ``t0 < t1``   ``clip(rnd(N * g(x)), 0, N)``,
                             ``g(x) = (tan(t0 + x (t1 - t0)) - tan t0) / (tan t1 - tan t0)``
=============  ============  =================================================================

``rnd`` is round-half-up, ``floor(v + 1/2)``, evaluated exactly (see :func:`rnd`).

Every quantizer has a numpy encoder (:meth:`encode`, float64) and a torch encoder
(:meth:`encode_torch`, computed in float64 whatever the input dtype) that give the same codes.
The integer tables of the ``attention`` op are derived here once:

* :func:`thresholds` -- ``thresholds[k-1] = min {p in 0..2^P-1 : enc(p / 2^P) >= k}`` (``2^P`` if
  none), computed by evaluating the float64 encoder on all ``2^P`` fixed-point inputs, so the
  integer encoder ``count(thresholds <= p)`` equals the float encoder on every P-bit input;
* :func:`decode_table` -- ``decode[k] = rnd(level_k * 2^L)``.

A quantizer is serialized as a plain dict (``to_dict`` / :func:`from_dict`), e.g.
``{"type": "tanq", "bits": 4, "t0": -1.4, "t1": 1.3}``, stored in the attention op's
``softmax_quant`` attribute.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

TYPES = ("uniform", "log2", "log2sqrt", "tanq")


# ---- round half up, exactly -----------------------------------------------------------

if TYPE_CHECKING:
    import torch


def _torch():
    """torch, imported where a torch encoder first runs (calibration, fake-quant): loading and
    validating a program, and the engine, stay free of torch."""
    import torch
    return torch


def rnd(v: np.ndarray | float) -> np.ndarray:
    """Round half up, ``floor(v + 1/2)``, exact for every finite float64 (returns float64).

    ``floor(v + 0.5)`` computed naively is wrong for ``v = 0.5 - 2^-54`` (the sum rounds to 1);
    ``f + (v - f >= 1/2)`` with ``f = floor(v)`` is exact because ``v - f`` is exact (or only
    rounds up onto 1/2 when its true value is above 1/2).
    """
    v = np.asarray(v, dtype=np.float64)
    f = np.floor(v)
    return f + ((v - f) >= 0.5)


def rnd_torch(v: torch.Tensor) -> torch.Tensor:
    """Torch twin of :func:`rnd` (same dtype in and out; exact in float64). ``v`` is not modified."""
    torch = _torch()
    f = torch.floor(v)
    return f.add_((v - f).ge_(0.5))


# ---- the quantizers ---------------------------------------------------------------------

@dataclass(frozen=True)
class SoftmaxQuantizer:
    """Base class: ``bits`` in 2..8; subclasses add their parameters (float64 scalars)."""

    bits: int
    type: ClassVar[str] = ""

    def __post_init__(self) -> None:
        if not isinstance(self.bits, (int, np.integer)) or not 1 <= int(self.bits) <= 16:
            raise ValueError(f"{self.type}: bits must be an integer in 1..16, got {self.bits!r}")

    @property
    def n(self) -> int:
        """N = 2^bits - 1, the largest code."""
        return (1 << int(self.bits)) - 1

    # subclasses implement _encode_np / _encode_torch on float64 arrays and levels()
    def encode(self, x: np.ndarray | float) -> np.ndarray:
        """Codes (int64, same shape) of probabilities ``x`` (any float, evaluated in float64)."""
        x = np.asarray(x, dtype=np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            return self._encode_np(x).astype(np.int64)

    def encode_torch(self, x: torch.Tensor) -> torch.Tensor:
        """Codes (int64 tensor, same shape) of ``x``; computed in float64, equal to :meth:`encode`."""
        torch = _torch()
        return self._encode_torch(x.to(torch.float64)).to(torch.int64)

    def levels(self) -> np.ndarray:
        """Decoded values of codes 0..N: float64 (N + 1,), ``levels()[0] == 0``, increasing."""
        raise NotImplementedError

    def quantize_torch(self, x: torch.Tensor) -> torch.Tensor:
        """Quantize-dequantize ``levels[encode(x)]`` in ``x``'s dtype (the fake-quant probabilities)."""
        torch = _torch()
        lv = torch.from_numpy(self.levels()).to(x.dtype)
        return lv[self.encode_torch(x)]

    def to_dict(self) -> dict[str, Any]:
        d = {k: (int(v) if k == "bits" else float(v)) for k, v in asdict(self).items()}
        d["type"] = self.type
        return d

    def _encode_np(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _encode_torch(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


@dataclass(frozen=True)
class Uniform(SoftmaxQuantizer):
    """Uniform levels ``k * scale``; ``scale > 0`` (``scale = 1/N`` covers [0, 1])."""

    scale: float = 1.0 / 15
    type: ClassVar[str] = "uniform"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"uniform: scale must be > 0, got {self.scale!r}")

    def _encode_np(self, x):
        return np.clip(rnd(x / self.scale), 0, self.n)

    def _encode_torch(self, x):
        torch = _torch()
        return torch.clamp(rnd_torch(x / self.scale), 0, self.n)

    def levels(self):
        return np.arange(self.n + 1, dtype=np.float64) * float(self.scale)


@dataclass(frozen=True)
class Log2(SoftmaxQuantizer):
    """Levels ``delta * 2^-(N-k)`` for k >= 1 (``delta`` = the top level, > 0)."""

    delta: float = 1.0
    type: ClassVar[str] = "log2"
    _mul: ClassVar[float] = 1.0  # j = rnd(-_mul * log2(x / delta))

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (math.isfinite(self.delta) and self.delta > 0):
            raise ValueError(f"{self.type}: delta must be > 0, got {self.delta!r}")

    def _encode_np(self, x):
        # x <= 0 gives log2 -> -inf or nan; those elements are mapped to code 0 by the mask.
        j = rnd(-self._mul * np.log2(x / self.delta))
        j = np.where(x > 0, j, np.inf)
        n = self.n
        return np.where(j < 0, n, np.where(j > n - 1, 0, n - np.where(np.isfinite(j), j, 0)))

    def _encode_torch(self, x):
        torch = _torch()
        j = rnd_torch(-self._mul * torch.log2(x / self.delta))
        j = torch.where(x > 0, j, torch.full_like(j, math.inf))
        n = self.n
        nj = n - torch.where(torch.isfinite(j), j, torch.zeros_like(j))
        return torch.where(j < 0, torch.full_like(j, n), torch.where(j > n - 1, torch.zeros_like(j), nj))

    def levels(self):
        k = np.arange(self.n + 1, dtype=np.float64)
        lv = float(self.delta) * np.exp2(-(self.n - k) / self._mul)
        lv[0] = 0.0
        return lv


@dataclass(frozen=True)
class Log2Sqrt(Log2):
    """Levels ``delta * 2^(-(N-k)/2)`` for k >= 1 (log-sqrt2 quantizer)."""

    type: ClassVar[str] = "log2sqrt"
    _mul: ClassVar[float] = 2.0


@dataclass(frozen=True)
class TanQ(SoftmaxQuantizer):
    """Tangent quantizer with angles ``-pi/2 < t0 < t1 < pi/2`` (the project's TanQ definition).

    ``g(x) = (tan(t0 + x (t1 - t0)) - tan t0) / (tan t1 - tan t0)`` maps [0, 1] onto [0, 1];
    levels are ``g^-1(k/N) = (atan(tan t0 + (k/N)(tan t1 - tan t0)) - t0) / (t1 - t0)``.
    """

    t0: float = -1.0
    t1: float = 1.0
    type: ClassVar[str] = "tanq"

    def __post_init__(self) -> None:
        super().__post_init__()
        h = math.pi / 2
        if not (-h < self.t0 < self.t1 < h):
            raise ValueError(f"tanq: need -pi/2 < t0 < t1 < pi/2, got t0={self.t0!r}, t1={self.t1!r}")

    def _g_consts(self):
        a, b = math.tan(self.t0), math.tan(self.t1)
        return a, b - a

    def _encode_np(self, x):
        a, w = self._g_consts()
        g = (np.tan(self.t0 + x * (self.t1 - self.t0)) - a) / w
        return np.clip(rnd(self.n * g), 0, self.n)

    def _encode_torch(self, x):
        # the same float64 operations in the same order as _encode_np, done in place
        a, w = self._g_consts()
        g = (x * (self.t1 - self.t0)).add_(self.t0).tan_().sub_(a).div_(w).mul_(self.n)
        return rnd_torch(g).clamp_(0, self.n)

    def levels(self):
        a, w = self._g_consts()
        k = np.arange(self.n + 1, dtype=np.float64)
        lv = (np.arctan(a + (k / self.n) * w) - self.t0) / (self.t1 - self.t0)
        lv[0] = 0.0
        lv[-1] = 1.0
        return lv


_CLASSES: dict[str, type[SoftmaxQuantizer]] = {c.type: c for c in (Uniform, Log2, Log2Sqrt, TanQ)}


def make(type: str, bits: int, **params: float) -> SoftmaxQuantizer:
    """Build a quantizer by type name (``uniform``, ``log2``, ``log2sqrt``, ``tanq``)."""
    if type not in _CLASSES:
        raise ValueError(f"unknown post-softmax quantizer {type!r} (known: {', '.join(TYPES)})")
    cls = _CLASSES[type]
    allowed = {f for f in cls.__dataclass_fields__ if f != "bits"}
    extra = sorted(set(params) - allowed)
    if extra:
        raise ValueError(f"{type}: unknown parameters {', '.join(extra)} (expected {', '.join(sorted(allowed))})")
    return cls(bits=int(bits), **{k: float(v) for k, v in params.items()})


def from_dict(d: dict[str, Any]) -> SoftmaxQuantizer:
    """Inverse of ``SoftmaxQuantizer.to_dict`` (the attention op's ``softmax_quant`` attribute)."""
    d = dict(d)
    return make(d.pop("type"), d.pop("bits"), **d)


# ---- integer tables --------------------------------------------------------------------

def thresholds(quant: SoftmaxQuantizer, prob_bits: int) -> np.ndarray:
    """Integer thresholds, int64 (N,): ``thresholds[k-1] = min {p : enc(p/2^P) >= k}`` or ``2^P``.

    The float64 encoder is evaluated on all ``2^P`` fixed-point probabilities ``p / 2^P``,
    ``p = 0..2^P-1``; the integer encoder is then ``code(p) = #{k : thresholds[k-1] <= p}``.
    Raises ``ValueError`` if the encoder is not monotone on that grid.
    """
    P = int(prob_bits)
    if not 1 <= P <= 30:
        raise ValueError(f"prob_bits must be in 1..30, got {P}")
    p = np.arange(1 << P, dtype=np.int64)
    codes = quant.encode(p.astype(np.float64) / float(1 << P))
    if np.any(np.diff(codes) < 0):
        raise ValueError(f"post-softmax encoder {quant.to_dict()} is not monotone on the {P}-bit grid")
    k = np.arange(1, quant.n + 1, dtype=np.int64)
    return np.searchsorted(codes, k, side="left").astype(np.int64)


def encode_int(thr: np.ndarray, p: np.ndarray) -> np.ndarray:
    """The integer encoder: number of thresholds ``<= p`` for each fixed-point probability ``p``."""
    return np.searchsorted(np.asarray(thr, dtype=np.int64), np.asarray(p, dtype=np.int64), side="right")


def decode_table(quant: SoftmaxQuantizer, decode_bits: int) -> np.ndarray:
    """Fixed-point decode table, int64 (N + 1,): ``decode[k] = rnd(level_k * 2^L)``."""
    return rnd(quant.levels() * float(2 ** int(decode_bits))).astype(np.int64)
