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
``adalog``     ``delta``,    as ``log2`` with ``j = rnd(-(r / q) log2(x / delta))``: base
               ``q``, ``r``  ``2^(q/r)`` (AdaLog; integers ``q``, ``r``)
``sulq``       ``eta``,      ``clip(rnd((log2(x + eta) - log2 eta) / d), 0, N)``,
               ``top``       ``d = (log2(top + eta) - log2 eta) / N`` (I&S-ViT's SULQ)
``twin``       ``m``         PTQ4ViT's twin-uniform, two ranges of ``H = 2^(bits-1)`` steps,
                             ``d2 = 1/H``, ``d1 = d2 / 2^m``, as one monotone code (see
                             :class:`Twin`)
=============  ============  =================================================================

``rnd`` is round-half-up, ``floor(v + 1/2)``, evaluated exactly (see :func:`rnd`).

Every quantizer has a numpy encoder (:meth:`encode`, float64) and a torch encoder
(:meth:`encode_torch`, computed in float64 whatever the input dtype) that give the same codes.
The integer tables of the ``attention`` op are derived here once:

* :func:`thresholds` -- ``thresholds[k-1] = min {p in 0..2^P-1 : enc(p / 2^P) >= k}`` (``2^P`` if
  none), computed by evaluating the float64 encoder on all ``2^P`` fixed-point inputs, so the
  integer encoder ``count(thresholds <= p)`` equals the float encoder on every P-bit input;
* :func:`decode_table` -- ``decode[k] = rnd(level_k * 2^L)``.

A quantizer may leave its top codes unused (``twin``: the published code has fewer than
``2^bits`` distinct values): :meth:`SoftmaxQuantizer.used` codes ``0..used-1`` are produced,
their levels strictly increase, and every unused code above them repeats the top level; no
input reaches an unused code (its threshold is ``2^P``).

A quantizer is serialized as a plain dict (``to_dict`` / :func:`from_dict`), e.g.
``{"type": "tanq", "bits": 4, "t0": -1.4, "t1": 1.3}``, stored in the attention op's
``softmax_quant`` attribute.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

TYPES = ("uniform", "log2", "log2sqrt", "tanq", "adalog", "sulq", "twin")


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
        """Decoded values of codes 0..N: float64 (N + 1,), ``levels()[0] == 0``, strictly increasing
        over the used codes ``0..used()-1``, the top level repeated on unused codes above them."""
        raise NotImplementedError

    def used(self) -> int:
        """Number of codes the encoder can produce (``N + 1`` except where a subclass says)."""
        return self.n + 1

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


def _check_int(typ: str, name: str, v: float, lo: int, hi: int) -> None:
    if not (isinstance(v, (int, float, np.integer, np.floating)) and math.isfinite(v) and float(v) == int(v)
            and lo <= int(v) <= hi):
        raise ValueError(f"{typ}: {name} must be an integer in {lo}..{hi}, got {v!r}")


@dataclass(frozen=True)
class AdaLog(Log2):
    """AdaLog's adaptive-base logarithmic quantizer (Wu et al., ECCV 2024) for post-softmax values.

    The base is ``2^(q/r)`` with integers ``q`` (searched) and ``r`` (AdaLog fixes ``r = 37``):
    ``j = rnd(-(r/q) log2(x / delta))``, code ``N - j`` as in :class:`Log2`, levels
    ``delta * 2^(-(N-k) q / r)`` for k >= 1. ``q = r`` is :class:`Log2`, ``2q = r`` is
    :class:`Log2Sqrt`; the rational exponent is what makes it hardware-friendly: level k is
    ``2^-floor((N-k) q / r)`` (a shift) times one of ``r`` constants ``2^-(((N-k) q) mod r) / r)``.
    Here the decode is a table over codes (``decode[k] = rnd(level_k 2^L)``), which holds those
    products directly, at ``L`` fractional bits instead of AdaLog's table of
    ``log2(2^(bits+1) - 2)``-bit constants.

    Differences from the published quantizer, on purpose: (1) a true ``bits``-bit code, like
    this project's ``log2``: ``N`` nonzero levels plus zero (AdaLog keeps ``2^bits`` nonzero
    levels and maps the rest to zero, ``2^bits + 1`` values); (2) the exact levels rather than
    AdaLog's table rounded to multiples of ``1 / (2^(bits+1) - 2)``. AdaLog's bias
    reparameterization (a shift ``eta`` added before the logarithm and subtracted again through
    the next layer's bias) exists for post-GELU activations, whose minimum is negative; for
    post-softmax values (``x >= 0``) it is the identity and there is nothing to reparameterize.
    """

    q: float = 37.0
    r: float = 37.0
    type: ClassVar[str] = "adalog"

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_int(self.type, "r", self.r, 1, 1024)
        _check_int(self.type, "q", self.q, 1, 64 * int(self.r))
        if math.log2(self.delta) - (self.n - 1) * float(self.q) / float(self.r) < -1000.0:
            raise ValueError(f"adalog: the smallest level delta * 2^(-(N-1) q/r) underflows float64 "
                             f"(delta={self.delta!r}, q={self.q!r}, r={self.r!r}, bits={self.bits!r})")

    @property
    def _mul(self) -> float:  # type: ignore[override]
        return float(self.r) / float(self.q)


@dataclass(frozen=True)
class Sulq(SoftmaxQuantizer):
    """I&S-ViT's shift-uniform-log2 quantizer (SULQ; Zhong et al., 2023).

    The input is shifted by ``eta > 0``, taken to the log2 domain and quantized uniformly there,
    over ``[log2 eta, log2(top + eta)]`` (the shifted images of 0 and of the top probability
    ``top``): ``code = clip(rnd((log2(x + eta) - log2 eta) / d), 0, N)``,
    ``d = (log2(top + eta) - log2 eta) / N``; decode ``2^(log2 eta + k d) - eta``, i.e. levels
    ``eta (2^(k d) - 1)``, so level 0 is exactly 0 and level N is ``top``. Small ``eta`` gives
    log-like levels, large ``eta`` nearly uniform ones; the shift makes the whole domain
    reachable (a plain log2 code clips its low tail).

    Differences from the published code: I&S-ViT takes the log-domain range from the
    calibration data's min and max (the min is ``log2(min P + eta)``; softmax minima are ~1e-8,
    far below every ``eta`` tried, so ``log2 eta`` is that range's low end up to that); and its
    dequantizer rounds the exponent to an integer (levels ``2^e - eta``, several codes sharing a
    level, code 0 not decoding to 0). This class keeps the levels exact: the integer decode here
    is a table over codes, so a power-of-two exponent buys nothing in hardware.
    """

    eta: float = 0.01
    top: float = 1.0
    type: ClassVar[str] = "sulq"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (math.isfinite(self.eta) and 0 < self.eta <= 1e6):
            raise ValueError(f"sulq: eta must be in (0, 1e6], got {self.eta!r}")
        if not (math.isfinite(self.top) and 0 < self.top <= 1e6):
            raise ValueError(f"sulq: top must be in (0, 1e6], got {self.top!r}")

    def _consts(self) -> tuple[float, float]:
        lo = math.log2(self.eta)
        return lo, (math.log2(self.top + self.eta) - lo) / self.n

    def _encode_np(self, x):
        lo, d = self._consts()
        u = (np.log2(x + self.eta) - lo) / d
        return np.clip(rnd(np.where(x > 0, u, 0.0)), 0, self.n)

    def _encode_torch(self, x):
        torch = _torch()
        lo, d = self._consts()
        u = (torch.log2(x + self.eta) - lo) / d
        return rnd_torch(torch.where(x > 0, u, torch.zeros_like(u))).clamp_(0, self.n)

    def levels(self):
        _, d = self._consts()
        k = np.arange(self.n + 1, dtype=np.float64)
        lv = float(self.eta) * np.expm1(k * d * math.log(2.0))
        lv[0] = 0.0
        return lv


@dataclass(frozen=True)
class Twin(SoftmaxQuantizer):
    """PTQ4ViT's twin-uniform quantizer for post-softmax values (Yuan et al., ECCV 2022).

    Published: two uniform ranges of ``H = 2^(bits-1)`` codes each, one code bit choosing the
    range: R1 (fine) ``[0, H d1)`` with step ``d1``, R2 (coarse) with step ``d2 = 1/H`` (fixed for
    softmax) and ``d2 = 2^m d1`` (a power of two, so that the two ranges align by a shift). An
    input ``x < H d1`` takes the R1 value ``clip(rnd(x / d1), 0, H-1) d1``, any other the R2 value
    ``clip(rnd(x / d2), 0, H-1) d2``.

    The same values as one monotone code. The R1 codes ``i = 0..H-1`` come first (levels
    ``i d1``), then the R2 values above R1's top: ``j d2`` for ``j = j0..H-1``,
    ``j0 = floor((H-1) / 2^m) + 1``; an R2 value ``j < j0`` is never produced when ``m < bits``
    (R1 covers it: ``x >= H d1 = j0 d2``). When ``m >= bits`` (``H d1 <= d2 / 2``) the published
    rule maps ``x`` in ``[H d1, d2/2)`` to 0, below the R1 values of smaller inputs (not
    monotone); there this code takes R1's top ``(H-1) d1`` instead (the running maximum of the
    published value, the smallest monotone change). The published design wastes the R2 codes
    ``j < j0`` (``j0 >= 1``): the code uses ``2H - j0 < 2^bits`` values (:meth:`used`), and the
    top ``j0`` codes are unused (they repeat the top level, ``(H-1) d2 = 1 - 1/H``). ``m = 0`` is
    plain uniform with ``H`` levels.
    """

    m: float = 4.0
    type: ClassVar[str] = "twin"

    def __post_init__(self) -> None:
        super().__post_init__()
        if int(self.bits) < 2:
            raise ValueError(f"twin: bits must be >= 2 (one bit selects the range), got {self.bits!r}")
        _check_int(self.type, "m", self.m, 0, 40)

    def _consts(self) -> tuple[int, float, float, int]:
        h = 1 << (int(self.bits) - 1)
        m = int(self.m)
        d2 = 1.0 / h
        d1 = math.ldexp(d2, -m)
        j0 = (h - 1) // (1 << m) + 1
        return h, d1, d2, j0

    def used(self) -> int:
        h, _, _, j0 = self._consts()
        return 2 * h - j0

    def _encode_np(self, x):
        h, d1, d2, j0 = self._consts()
        i = np.clip(rnd(x / d1), 0, h - 1)
        j = np.clip(rnd(x / d2), 0, h - 1)
        hi = np.where(j < j0, h - 1, h + j - j0)
        return np.where(x < h * d1, i, hi)

    def _encode_torch(self, x):
        torch = _torch()
        h, d1, d2, j0 = self._consts()
        i = rnd_torch(x / d1).clamp_(0, h - 1)
        j = rnd_torch(x / d2).clamp_(0, h - 1)
        hi = torch.where(j < j0, torch.full_like(j, h - 1), j + (h - j0))
        return torch.where(x < h * d1, i, hi)

    def levels(self):
        h, d1, d2, j0 = self._consts()
        used = np.concatenate([np.arange(h, dtype=np.float64) * d1, np.arange(j0, h, dtype=np.float64) * d2])
        return np.concatenate([used, np.full(self.n + 1 - used.size, used[-1])])


_CLASSES: dict[str, type[SoftmaxQuantizer]] = {c.type: c for c in (Uniform, Log2, Log2Sqrt, TanQ, AdaLog, Sulq, Twin)}


def make(type: str, bits: int, **params: float) -> SoftmaxQuantizer:
    """Build a quantizer by type name (one of :data:`TYPES`)."""
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
