"""Post-LayerNorm reparameterization: per-channel calibration folded into one per-tensor quantizer.

A post-LN activation ``y`` (M rows, D channels) is first calibrated per channel
(``s_c``, integer ``z_c``; :func:`calib.uniform.search_channels`). A shared scale ``s`` and an
**integer** shared zero point ``z`` are then chosen by the rule:

* ``mosf`` (DopQ-ViT): ``s = argmin_s sum_c |s_c - s|`` = the median of the channel scales,
  ``z = rnd(median(z_c))``;
* ``mean`` (RepQ-ViT): ``s = mean(s_c)``, ``z = rnd(mean(z_c))``.

With ``r1 = s_c / s`` and ``r2 = z_c - z`` (an integer), the LayerNorm affine becomes
``gamma' = gamma / r1``, ``beta' = (beta + s_c * r2) / r1`` and every linear layer reading ``y``
becomes ``W' = W * r1`` (scaling input column c) and ``b' = b - W @ (s_c * r2)``. The new
activation ``y' = (y + s_c r2) / r1`` satisfies ``rnd(y'/s) + z = rnd(y/s_c) + z_c``, and the float
model output is unchanged (``W' y' + b' = W y + b``).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from program.quantizers import rnd

RULES = ("mosf", "mean")


@dataclass(frozen=True)
class Reparam:
    """Per-channel (``s_c`` (D,) float64, ``z_c`` (D,) int64) and shared (``s``, integer ``z``) quantizers."""

    s_c: np.ndarray
    z_c: np.ndarray
    s: float
    z: int

    @property
    def r1(self) -> np.ndarray:
        return self.s_c / self.s

    @property
    def r2(self) -> np.ndarray:
        return (self.z_c - self.z).astype(np.float64)


def shared(s_c: np.ndarray, z_c: np.ndarray, rule: str) -> Reparam:
    """Shared scale and integer zero point from channel scales / zero points by ``rule``."""
    s_c = np.asarray(s_c, dtype=np.float64)
    z_c = np.asarray(z_c, dtype=np.int64)
    if rule == "mosf":
        s, zf = float(np.median(s_c)), float(np.median(z_c))
    elif rule == "mean":
        s, zf = float(np.mean(s_c)), float(np.mean(z_c))
    else:
        raise ValueError(f"unknown LayerNorm rule {rule!r} (known: {', '.join(RULES)})")
    if not s > 0:
        raise ValueError("all post-LayerNorm channel scales are zero")
    return Reparam(s_c=s_c, z_c=z_c, s=s, z=int(rnd(zf)))


def apply_ln(gamma: np.ndarray, beta: np.ndarray, rp: Reparam) -> tuple[np.ndarray, np.ndarray]:
    """The reparameterized LayerNorm affine ``(gamma / r1, (beta + s_c r2) / r1)`` (float64)."""
    r1 = rp.r1
    return (np.asarray(gamma, np.float64) / r1,
            (np.asarray(beta, np.float64) + rp.s_c * rp.r2) / r1)


def apply_linear(W: np.ndarray, b: np.ndarray, rp: Reparam) -> tuple[np.ndarray, np.ndarray]:
    """The reparameterized consumer ``(W * r1 (per input column), b - W @ (s_c r2))`` (float64)."""
    W = np.asarray(W, np.float64)
    return W * rp.r1[None, :], np.asarray(b, np.float64) - W @ (rp.s_c * rp.r2)


def transform(y: np.ndarray, rp: Reparam) -> np.ndarray:
    """The activation after reparameterization, ``(y + s_c r2) / r1`` (rows of ``y`` are tokens)."""
    return (np.asarray(y, np.float64) + rp.s_c * rp.r2) / rp.r1
