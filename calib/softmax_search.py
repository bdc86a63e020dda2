"""Per-layer choice of the post-softmax quantizer's parameters.

Each candidate quantizer ``Q`` is judged by the squared error of the attention output it produces,
``|| levels[enc(P)] @ V - P @ V ||^2``, on a sample of float probabilities ``P`` (n, H, r, T) (r
sampled query rows of n sampled images) and the float values ``V`` (n, H, T, d) (AdaLog's lesson:
the product matters, not the probabilities). The probabilities are encoded as the integer
datapath does it: fixed point with P fractional bits, compared with the quantizer's integer
thresholds. Candidates per family:

* ``tanq``: a 6 x 6 grid of angle pairs ``t0 < t1`` in (-pi/2, pi/2) (dense toward +-pi/2), then
  two rounds of local refinement (the 8 neighbours of the best pair, at steps of 1/4 and then
  1/8 of its distance to +-pi/2, at least 0.01 / 0.005);
* ``log2`` / ``log2sqrt``: ``delta = 2^(-i/4)``, i = 0..8 (top level from 1 down to 1/4);
* ``uniform``: ``scale = max(P) * 2^(-i/4) / N``, i = 0..12;
* ``adalog``: AdaLog's own search for post-softmax: ``delta = 1`` and ``r = 37`` fixed, the base
  ``2^(q/37)`` for every integer ``q = 10..109`` (100 candidates, bases 1.21 to 7.7; ``q = 37`` is
  ``log2``; ``log2sqrt`` would need ``q = 18.5``), judged, like every family here, by the error
  of the attention output (AdaLog also judges its base by the product with V, by similarity);
* ``sulq``: I&S-ViT's shift candidates ``eta`` in {0.001, 0.005, 0.01, 0.02, 0.03, 0.04, 0.05,
  0.1, 0.2, 0.5, 1.0} (11), the log-domain range ending at ``log2(max(P) + eta)`` as I&S-ViT takes
  it from the data's maximum (``max(P)`` = the sample's largest fixed-point probability);
* ``twin``: PTQ4ViT's split ``d1 = d2 / 2^m`` with ``d2 = 1 / 2^(bits-1)`` fixed, for every
  ``m = 0..17 - bits`` (``d1`` down to ``2^-16``, the finest step the 16-bit probabilities resolve;
  PTQ4ViT tries splits ``2^-i``, i = 0..19, the same family).

The first of equal errors wins, so the result is deterministic.
"""
from __future__ import annotations

import math
from contextlib import contextmanager

import torch

from intsim.program.quantizers import SoftmaxQuantizer, make, rnd_torch, thresholds

_HALF_PI = math.pi / 2
_T_LIMIT = 1.5685  # largest |angle| tried (tan ~ 450)
TANQ_T0 = (-1.565, -1.53, -1.47, -1.3, -0.9, 0.0)
TANQ_T1 = (0.0, 0.9, 1.3, 1.47, 1.53, 1.565)
ADALOG_R = 37
ADALOG_Q = tuple(range(10, 110))
SULQ_ETA = (0.001, 0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.1, 0.2, 0.5, 1.0)


class _Sample:
    """The search data: fixed-point probabilities ``p`` (int64, ``rnd(P * 2^bits)`` clamped to
    ``2^bits - 1``), values ``v`` and the float target ``P @ v`` (float32)."""

    def __init__(self, probs: torch.Tensor, v: torch.Tensor, prob_bits: int):
        self.bits = int(prob_bits)
        top = (1 << self.bits) - 1
        p64 = probs.to(torch.float64)
        self.p = torch.clamp(rnd_torch(p64 * float(1 << self.bits)), 0, top).to(torch.int64)
        self.v = v.to(torch.float32)
        self.target = (p64 @ v.to(torch.float64)).to(torch.float32)


def attention_error(quant: SoftmaxQuantizer, data: _Sample) -> float:
    """``sum((levels[code] @ v - P @ v)^2)`` where ``code`` is the integer threshold encoding of the
    fixed-point probabilities (equal to the float encoder on them, see ``program.quantizers``)."""
    thr = torch.from_numpy(thresholds(quant, data.bits))
    codes = torch.searchsorted(thr, data.p, right=True)
    levels = torch.from_numpy(quant.levels()).to(torch.float32)
    out = levels[codes] @ data.v
    return float(((out - data.target).to(torch.float64) ** 2).sum())


def _best(cands: list[SoftmaxQuantizer], data: _Sample) -> tuple[SoftmaxQuantizer, float]:
    errs = [attention_error(q, data) for q in cands]
    i = min(range(len(errs)), key=lambda j: (errs[j], j))
    return cands[i], errs[i]


def _tanq(bits: int, t0: float, t1: float) -> SoftmaxQuantizer | None:
    t0 = max(-_T_LIMIT, min(_T_LIMIT, t0))
    t1 = max(-_T_LIMIT, min(_T_LIMIT, t1))
    if not t0 < t1 - 1e-3:
        return None
    return make("tanq", bits, t0=round(t0, 6), t1=round(t1, 6))


@contextmanager
def _single_thread():
    """Small tensor ops run faster on one thread (no spin-wait), and the result cannot depend on
    the machine's thread count."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def search(kind: str, bits: int, probs: torch.Tensor, v: torch.Tensor, prob_bits: int = 16) -> SoftmaxQuantizer:
    """Best quantizer of family ``kind`` at ``bits`` for this layer's probs (n, H, r, T) and v (n, H, T, d).

    The probabilities are judged as the integer datapath sees them, in fixed point with
    ``min(prob_bits, 16)`` fractional bits.
    """
    with _single_thread():
        return _search(kind, bits, _Sample(probs, v, min(int(prob_bits), 16)))


def _search(kind: str, bits: int, data: _Sample) -> SoftmaxQuantizer:
    n = (1 << bits) - 1
    if kind == "uniform":
        top = max(float(data.p.max()), 1.0) / float(1 << data.bits)
        cands = [make("uniform", bits, scale=top * 2.0 ** (-i / 4) / n) for i in range(13)]
        return _best(cands, data)[0]
    if kind in ("log2", "log2sqrt"):
        cands = [make(kind, bits, delta=2.0 ** (-i / 4)) for i in range(9)]
        return _best(cands, data)[0]
    if kind == "adalog":
        cands = [make("adalog", bits, delta=1.0, q=q, r=ADALOG_R) for q in ADALOG_Q]
        return _best(cands, data)[0]
    if kind == "sulq":
        top = max(float(data.p.max()), 1.0) / float(1 << data.bits)
        cands = [make("sulq", bits, eta=eta, top=top) for eta in SULQ_ETA]
        return _best(cands, data)[0]
    if kind == "twin":
        cands = [make("twin", bits, m=m) for m in range(0, 18 - bits)]
        return _best(cands, data)[0]
    if kind != "tanq":
        raise ValueError(f"unknown post-softmax quantizer {kind!r}")
    grid = [q for t0 in TANQ_T0 for t1 in TANQ_T1 if (q := _tanq(bits, t0, t1)) is not None]
    best, err = _best(grid, data)
    for step in (0.5, 0.25):
        t0, t1 = best.t0, best.t1
        # angle steps shrink toward pi/2, where the curve is most sensitive
        d0 = step * max(0.02, 0.5 * (_HALF_PI - abs(t0)))
        d1 = step * max(0.02, 0.5 * (_HALF_PI - abs(t1)))
        local = [q for a in (-d0, 0.0, d0) for b in (-d1, 0.0, d1)
                 if (a, b) != (0.0, 0.0) and (q := _tanq(bits, t0 + a, t1 + b)) is not None]
        if local:
            cand, cerr = _best(local, data)
            if cerr < err:
                best, err = cand, cerr
    return best
