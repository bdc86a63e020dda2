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
import torch

from intsim.program.quantizers import rnd
from reference.vit import forward

from .uniform import search_channels

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


def reparameterize(params, images, bits: int, rule: str) -> tuple[object, dict[str, Reparam]]:
    """Reparameterize every LayerNorm -> linear pair of a float model (``reference.vit.ViTParams``).

    Runs the float forward on ``images`` (uint8 (N, 3, H, W)), calibrates each post-LN point
    (``blocks.i.norm1`` -> q/k/v, ``blocks.i.norm2`` -> fc1, ``norm`` -> head) per channel at
    ``bits``, and returns a new ``ViTParams`` (float32) whose float output equals the original's,
    with the per-point :class:`Reparam`. Calibration proper does the same block by block.
    """
    rows: dict[str, np.ndarray] = {}

    def record(name, x):
        if name.endswith("norm1") or name.endswith("norm2") or name == "norm":
            rows[name] = x.reshape(-1, x.shape[-1]).double().numpy()
        return x

    forward(params, images, hook=record)
    out = params.clone()
    f32 = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))  # noqa: E731
    reps: dict[str, Reparam] = {}

    def fold(name, ln_w, ln_b, consumers):
        rp = shared(*search_channels(rows[name], bits), rule)
        reps[name] = rp
        g, b = apply_ln(ln_w.double().numpy(), ln_b.double().numpy(), rp)
        lins = [apply_linear(W.double().numpy(), bb.double().numpy(), rp) for W, bb in consumers]
        return (f32(g), f32(b)), [(f32(W), f32(bb)) for W, bb in lins]

    for i, bp in enumerate(out.blocks):
        (bp.norm1_w, bp.norm1_b), [(bp.q_w, bp.q_b), (bp.k_w, bp.k_b), (bp.v_w, bp.v_b)] = fold(
            f"blocks.{i}.norm1", bp.norm1_w, bp.norm1_b, [(bp.q_w, bp.q_b), (bp.k_w, bp.k_b), (bp.v_w, bp.v_b)])
        (bp.norm2_w, bp.norm2_b), [(bp.fc1_w, bp.fc1_b)] = fold(
            f"blocks.{i}.norm2", bp.norm2_w, bp.norm2_b, [(bp.fc1_w, bp.fc1_b)])
    (out.norm_w, out.norm_b), [(out.head_w, out.head_b)] = fold("norm", out.norm_w, out.norm_b,
                                                                [(out.head_w, out.head_b)])
    return out, reps
