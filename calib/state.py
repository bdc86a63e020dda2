"""Calibration results: everything the exporter needs, in float64 and real units.

Produced by the calibration drivers (:mod:`calib.vit`; :mod:`calib.swin` wraps blocks in its own), consumed by
their ``build_program`` (each op's constants computed by ``intsim.ops.<type>.export``). Linear weights
are already reparameterized (MOSF / mean) and quantized; LayerNorm affines are the reparameterized ones.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from intsim.program.quantizers import SoftmaxQuantizer

from .reparam import Reparam
from .uniform import ActQuant, WeightQuant


@dataclass
class LinearCalib:
    """A quantized linear layer: centered weight codes + scales, and its float bias (N,)."""

    weight: WeightQuant
    bias: np.ndarray


@dataclass
class LNCalib:
    """A LayerNorm after reparameterization: affine (D,) float64 and its shared output quantizer
    (per channel, scale and zero point (D,), for the fake-quant-only rule "channel")."""

    gamma: np.ndarray
    beta: np.ndarray
    act: ActQuant
    reparam: Reparam | None     # None for the fake-quant-only per-channel rule ("channel")


@dataclass
class BlockCalib:
    norm1: LNCalib
    q: LinearCalib
    k: LinearCalib
    v: LinearCalib
    q_act: ActQuant
    k_act: ActQuant
    v_act: ActQuant
    softmax: SoftmaxQuantizer
    core: ActQuant
    proj: LinearCalib
    res1: float          # scale of the residual after the attention branch (add1, and proj's output)
    norm2: LNCalib
    fc1: LinearCalib
    fc1_scale: float     # scale of the signed GELU input (fc1 output)
    gelu: ActQuant
    fc2: LinearCalib
    res2: float          # scale of the residual after the MLP branch (add2, and fc2's output)


@dataclass
class ModelCalib:
    """The whole calibrated model. ``patch.weight.w`` is (D, 3*p*p) in (ch, ky, kx) order."""

    img_size: int
    patch_size: int
    num_heads: int
    eps: float
    patch: LinearCalib
    pos: np.ndarray      # (T, D) float64, class token folded into row 0
    res0: float          # scale of the patch-embedding output (first residual)
    blocks: list[BlockCalib]
    norm: LNCalib
    head: LinearCalib
    logit_scale: float
