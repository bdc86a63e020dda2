"""The float pieces shared by the float models (reference.vit, reference.swin) and the fake-quant
forwards of the op modules (intsim/ops/<type>.py, through reference.fakequant).

Everything here is plain torch on float tensors of any float dtype; nothing knows a program or an
architecture. Shapes are token-major, (B, T, C).

* images and parameters: :func:`as_float_images`, :func:`f32` / :func:`f64` (detached CPU copies),
  :func:`ln_weight` / :func:`bias_or_zeros` (a torch module's affine, defaulted);
* per-token ops: :func:`layer_norm`, :func:`gelu`, :func:`linear`, :func:`add`;
* quantize-dequantize: :func:`fake_quant_uniform`;
* token layout: :func:`conv_patches`, :func:`patch_embed` (ViT: convolution, class token, position),
  :func:`patchify` (Swin: p x p patches as channels), :func:`merge_tokens` (patch merging gather),
  :func:`token_pool` (mean over tokens);
* attention: :func:`attention` (global) and :func:`window_attention` (shifted windows through a
  token table), each with a ``probs_fn`` that sees (and may replace) the post-softmax values.

Hook and tap types of the float models: ``Hook(name, tensor) -> tensor`` is called at a quantized
point and its result used downstream; ``Tap(name, tensor)`` only observes.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

Hook = Callable[[str, torch.Tensor], torch.Tensor]
Tap = Callable[[str, torch.Tensor], None]
ProbsFn = Callable[[torch.Tensor], torch.Tensor]

MASK_FILL = -100.0     # timm's additive mask value of the shifted windows


def identity_hook(name: str, x: torch.Tensor) -> torch.Tensor:
    """The hook that changes nothing."""
    return x


def no_tap(name: str, x: torch.Tensor) -> None:
    """The tap that observes nothing."""
    return None


# ---- images and parameters ------------------------------------------------------------------------

def as_float_images(images) -> torch.Tensor:
    """(B, 3, H, W) images (numpy or torch, uint8 or float 0..255) as a float32 tensor."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.ascontiguousarray(images))
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
    return images.to(torch.float32)


def f32(t: torch.Tensor) -> torch.Tensor:
    """A detached float32 CPU copy."""
    return t.detach().cpu().to(torch.float32).clone()


def f64(t: torch.Tensor) -> torch.Tensor:
    """A detached float64 CPU tensor (a copy unless ``t`` already is one)."""
    return t.detach().cpu().to(torch.float64)


def ln_weight(mod, n: int) -> torch.Tensor:
    """Weight of a LayerNorm as float32 (ones when it has no affine)."""
    return f32(mod.weight) if getattr(mod, "weight", None) is not None else torch.ones(n)


def bias_or_zeros(mod, n: int) -> torch.Tensor:
    """Bias of a Linear / LayerNorm as float32 (zeros when it has none)."""
    return f32(mod.bias) if getattr(mod, "bias", None) is not None else torch.zeros(n)


# ---- per-token ops --------------------------------------------------------------------------------

def layer_norm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm over the last axis."""
    return F.layer_norm(x, (x.shape[-1],), w, b, eps)


def gelu(x: torch.Tensor) -> torch.Tensor:
    """Exact (erf) GELU."""
    return F.gelu(x)


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """``x @ w^T + b`` with ``w`` (out, in) as in ``nn.Linear``."""
    return F.linear(x, w, b)


def add(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The residual add."""
    return a + b


def fake_quant_uniform(x: torch.Tensor, scale: float, zero_point: int, bits: int) -> torch.Tensor:
    """Quantize-dequantize: ``scale * (clamp(floor(x/scale + 1/2) + zp, 0, 2^b - 1) - zp)`` (x's dtype)."""
    q = x / scale
    return q.add_(0.5).floor_().add_(zero_point).clamp_(0, (1 << int(bits)) - 1).sub_(zero_point).mul_(scale)


# ---- token layout ---------------------------------------------------------------------------------

def conv_patches(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, patch: int) -> torch.Tensor:
    """Images (B, 3, H, W), stride-``patch`` convolution ``w`` (D, 3, p, p) + ``b`` -> tokens (B, P, D)."""
    return F.conv2d(x, w, b, stride=patch).flatten(2).transpose(1, 2)


def patch_embed(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, patch: int, pos: torch.Tensor) -> torch.Tensor:
    """ViT patch embedding: :func:`conv_patches`, a zero class-token row in front, plus ``pos`` (T, D)
    -> (B, T, D)."""
    y = conv_patches(x, w, b, patch)  # (B, P, D)
    return torch.cat([torch.zeros_like(y[:, :1]), y], dim=1) + pos


def patchify(x: torch.Tensor, patch: int) -> torch.Tensor:
    """Images (B, C, H, W) -> (B, (H/p)(W/p), C p p): patch (i, j) row-major, features (c, a, b) as in
    the weights of a stride-p convolution flattened to (D, C p p)."""
    B, C, H, W = x.shape
    p = patch
    return x.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5).reshape(B, -1, C * p * p)


def merge_tokens(x: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """Patch merging gather: (B, T, C) -> (B, T/4, 4C), ``y[t, k*C + c] = x[src[t, k], c]``."""
    B, _, C = x.shape
    return x[:, src.reshape(-1)].reshape(B, src.shape[0], 4 * C)


def token_pool(x: torch.Tensor) -> torch.Tensor:
    """Mean over the tokens: (B, T, C) -> (B, 1, C)."""
    return x.mean(dim=1, keepdim=True)


# ---- attention ------------------------------------------------------------------------------------

def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
              probs_fn: ProbsFn | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v per head: (B, T, D) x3 -> (B, T, D). ``probs_fn`` (optional) maps
    the post-softmax values (B, H, T, T) to the ones used."""
    B, T, D = q.shape
    d = D // heads

    def split(t):
        return t.reshape(B, T, heads, d).transpose(1, 2)  # (B, H, T, d)

    qh, kh, vh = split(q), split(k), split(v)
    scores = (qh @ kh.transpose(-2, -1)) * (d ** -0.5)
    probs = scores.softmax(dim=-1)
    if probs_fn is not None:
        probs = probs_fn(probs)
    return (probs @ vh).transpose(1, 2).reshape(B, T, D)


def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, tokens: torch.Tensor,
                     bias: torch.Tensor, mask: torch.Tensor | None, probs_fn: ProbsFn | None = None,
                     mask_value: float = MASK_FILL) -> torch.Tensor:
    """Window attention on natural-order q, k, v (B, T, D): gather windows through ``tokens`` (nW, n),
    softmax(q k^T / sqrt(d) + bias (H, n, n) + mask) v per window and head, scatter back.

    ``mask`` (nW, n, n) bool: masked scores get ``mask_value`` added (timm: -100), or are removed
    (probability exactly 0) when ``mask_value`` is ``-inf``. ``probs_fn`` (optional) maps the
    post-softmax values (B, nW, H, n, n) to the ones used."""
    B, T, D = q.shape
    nW, n = tokens.shape
    d = D // heads
    idx = tokens.reshape(-1)

    def win(t):
        return t[:, idx].reshape(B, nW, n, heads, d).permute(0, 1, 3, 2, 4)   # (B, nW, H, n, d)

    qw, kw, vw = win(q), win(k), win(v)
    s = (qw @ kw.transpose(-2, -1)) * (d ** -0.5) + bias
    if mask is not None and bool(mask.any()):
        m = mask[None, :, None]
        s = s.masked_fill(m, float("-inf")) if math.isinf(mask_value) else s + m.to(s.dtype) * mask_value
    probs = s.softmax(dim=-1)
    if probs_fn is not None:
        probs = probs_fn(probs)
    o = (probs @ vw).permute(0, 1, 3, 2, 4).reshape(B, nW * n, D)
    out = torch.empty_like(o)
    out[:, idx] = o
    return out
