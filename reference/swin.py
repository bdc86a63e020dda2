"""Swin Transformer: functional float forward (with quantization hooks) and window geometry.

Follows timm's ``timm.models.swin_transformer`` (1.0.x): NHWC tokens, ``PatchEmbed`` with a
LayerNorm, stages of ``SwinTransformerBlock`` (``WindowAttention`` with a relative position bias
table, cyclic shift by ``shift_size`` with the -100 attention mask on odd blocks), a
``PatchMerging`` at the start of every stage but the first (2x2 neighbours concatenated in the
order (0,0), (1,0), (0,1), (1,1) of (row, column) offsets, LayerNorm over the 4C channels, linear
reduction without bias), the final LayerNorm, global average pooling and the classifier.

Tokens are kept token-major, (B, T, C) with ``T = Hg * Wg`` and token ``t = i * Wg + j`` (the
row-major flattening of timm's (B, H, W, C)). Every per-token op (LayerNorm, linear, GELU, adds)
commutes with the window partition and the cyclic shift, so the only non-local steps are:

* window attention, computed from a **token table** ``tokens[w, a * ws + b]`` (the original
  token at position (a, b) of window w of the cyclically shifted grid) -- partition, shift,
  reverse partition and reverse shift are a gather and a scatter through it (:func:`window_tokens`);
* the shifted-window mask (:func:`shift_mask`, 1 = masked) and the relative position index
  (:func:`relative_index`, timm's ``get_relative_position_index``);
* patch merging, a gather through ``src[t', k]`` (:func:`merge_sources`);
* the average pool before the head.

The same table functions build the program's constants (``calib/swin.py``), so the identity-hook
forward equal to timm's forward is also a check of the tables. The fake-quant model of a Swin
program is ``reference.fakequant.FakeQuantModel``, as for every program.

Quantized points (hook names; ``L = layers.s``): ``L.downsample.norm`` (merge LayerNorm output =
reduction input), ``L.blocks.j.norm1``, ``.attn.q`` / ``.k`` / ``.v``, ``.attn.probs`` (post-softmax,
shape (B, nW, H, n, n)), ``.attn.core``, ``.norm2``, ``.mlp.gelu``, and ``head.pool`` (pooled
features = head input). Integer-valued points (``tap``): ``patch_embed.proj``, ``patch_embed.norm``,
``L.downsample.reduction``, ``L.blocks.j.attn.proj``, ``.add1``, ``.mlp.fc1``, ``.mlp.fc2``,
``.add2``, ``norm``, ``head``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from .functional import (MASK_FILL, Hook, Tap, as_float_images, bias_or_zeros, conv_patches, f32, f64, identity_hook,
                         layer_norm, linear, ln_weight, merge_tokens, no_tap, token_pool, window_attention)
from .vit import BlockParams, transformer_block


# ---- window geometry (numpy, int64) --------------------------------------------------------------

def window_tokens(Hg: int, Wg: int, ws: int, shift: int) -> np.ndarray:
    """(nW, ws*ws): the original token of position (a, b) of window w of the grid rolled by -shift.

    ``tokens[wi * (Wg/ws) + wj, a * ws + b] = ((wi ws + a + shift) mod Hg) * Wg + ((wj ws + b + shift) mod Wg)``
    (timm: ``torch.roll(x, (-shift, -shift))`` then ``window_partition``).
    """
    if Hg % ws or Wg % ws:
        raise ValueError(f"grid {Hg}x{Wg} is not a multiple of the window {ws}")
    nh, nw = Hg // ws, Wg // ws
    wi, wj, a, b = np.meshgrid(np.arange(nh), np.arange(nw), np.arange(ws), np.arange(ws), indexing="ij")
    tok = ((wi * ws + a + shift) % Hg) * Wg + ((wj * ws + b + shift) % Wg)
    return tok.reshape(nh * nw, ws * ws).astype(np.int64)


def relative_index(ws: int) -> np.ndarray:
    """(n, n): ``(a_i - a_j + ws - 1) * (2 ws - 1) + (b_i - b_j + ws - 1)`` for i = a_i ws + b_i (timm's index)."""
    a, b = np.divmod(np.arange(ws * ws), ws)
    return ((a[:, None] - a[None, :] + ws - 1) * (2 * ws - 1) + (b[:, None] - b[None, :] + ws - 1)).astype(np.int64)


def shift_mask(Hg: int, Wg: int, ws: int, shift: int) -> np.ndarray:
    """(nW, n, n) int8: 1 where query i and key j of window w lie in different regions of the shifted grid.

    Regions (timm's ``img_mask``) of a shifted-grid coordinate y: 0 if y < H - ws, 1 if y < H - shift,
    else 2; the label of (y, x) is 3 * region(y) + region(x). All zeros when ``shift == 0``.
    """
    nh, nw = Hg // ws, Wg // ws
    if shift == 0:
        return np.zeros((nh * nw, ws * ws, ws * ws), np.int8)

    def region(y, size):
        return np.where(y < size - ws, 0, np.where(y < size - shift, 1, 2))

    wi, wj, a, b = np.meshgrid(np.arange(nh), np.arange(nw), np.arange(ws), np.arange(ws), indexing="ij")
    lab = (3 * region(wi * ws + a, Hg) + region(wj * ws + b, Wg)).reshape(nh * nw, ws * ws)
    return (lab[:, :, None] != lab[:, None, :]).astype(np.int8)


def merge_sources(Hg: int, Wg: int) -> np.ndarray:
    """(Hg/2 * Wg/2, 4): ``src[i * (Wg/2) + j, k] = (2i + (k & 1)) * Wg + (2j + (k >> 1))`` (timm's 2x2 order)."""
    if Hg % 2 or Wg % 2:
        raise ValueError(f"patch merging needs an even grid, got {Hg}x{Wg}")
    i, j, k = np.meshgrid(np.arange(Hg // 2), np.arange(Wg // 2), np.arange(4), indexing="ij")
    return ((2 * i + (k & 1)) * Wg + (2 * j + (k >> 1))).reshape(-1, 4).astype(np.int64)


# ---- parameters ---------------------------------------------------------------------------------

@dataclass
class SwinBlockParams:
    """One Swin block: the ViT block weights plus the window geometry and the bias table."""

    p: BlockParams
    heads: int
    window: int
    shift: int
    rpb_table: torch.Tensor          # ((2ws-1)^2, H) float32, timm's relative_position_bias_table
    tokens: torch.Tensor             # (nW, n) long
    rel_index: torch.Tensor          # (n, n) long
    mask: torch.Tensor               # (nW, n, n) bool (True = masked)

    @property
    def rpb(self) -> torch.Tensor:
        """(H, n, n) float32 bias added to the scaled scores."""
        n = self.window * self.window
        return self.rpb_table[self.rel_index.reshape(-1)].reshape(n, n, -1).permute(2, 0, 1).contiguous()


@dataclass
class MergeParams:
    norm_w: torch.Tensor             # (4C,)
    norm_b: torch.Tensor
    red_w: torch.Tensor              # (2C, 4C)
    red_b: torch.Tensor              # (2C,) zeros in timm
    src: torch.Tensor                # (T/4, 4) long


@dataclass
class StageParams:
    merge: MergeParams | None
    blocks: list[SwinBlockParams]
    grid: tuple[int, int]            # token grid of the stage's blocks (after the merge)
    dim: int


@dataclass
class SwinParams:
    """A whole Swin Transformer, float32, taking raw pixels (normalization folded into the patch conv)."""

    patch_w: torch.Tensor            # (C0, 3, p, p)
    patch_b: torch.Tensor
    pnorm_w: torch.Tensor
    pnorm_b: torch.Tensor
    stages: list[StageParams]
    norm_w: torch.Tensor
    norm_b: torch.Tensor
    head_w: torch.Tensor
    head_b: torch.Tensor
    patch_size: int
    img_size: int
    eps: float = 1e-5
    extra: dict = field(default_factory=dict)

    @property
    def embed_dim(self) -> int:
        return int(self.patch_w.shape[0])

    @property
    def num_classes(self) -> int:
        return int(self.head_w.shape[0])

    @property
    def grid0(self) -> tuple[int, int]:
        g = self.img_size // self.patch_size
        return g, g

    def blocks(self):
        """(stage index, block index, prefix, block params, grid) over all blocks."""
        for s, st in enumerate(self.stages):
            for j, bp in enumerate(st.blocks):
                yield s, j, f"layers.{s}.blocks.{j}", bp, st.grid


def _check_supported(model) -> None:
    from timm.layers import Mlp
    from timm.models.swin_transformer import PatchMerging, SwinTransformer, WindowAttention

    if not isinstance(model, SwinTransformer):
        raise ValueError(f"expected a timm SwinTransformer, got {type(model).__name__}")
    problems = []
    if getattr(model, "dynamic_img_size", False):
        problems.append("dynamic_img_size / strict_img_size=False")
    if getattr(model, "global_pool", "avg") != "avg":
        problems.append(f"global_pool={model.global_pool!r} (only 'avg')")
    if not isinstance(getattr(model.patch_embed, "norm", None), torch.nn.LayerNorm):
        problems.append("patch_embed.norm is not a LayerNorm")
    if not isinstance(getattr(model.head, "fc", None), torch.nn.Linear):
        problems.append("no linear classifier head (num_classes=0?)")
    for s, st in enumerate(model.layers):
        if not isinstance(st.downsample, (torch.nn.Identity, PatchMerging)):
            problems.append(f"layers.{s}.downsample is {type(st.downsample).__name__}")
        for j, blk in enumerate(st.blocks):
            pre = f"layers.{s}.blocks.{j}"
            if not isinstance(blk.attn, WindowAttention):
                problems.append(f"{pre}.attn is not a WindowAttention")
            H, W = blk.input_resolution
            ws = tuple(blk.window_size)
            if ws[0] != ws[1] or tuple(blk.shift_size)[0] != tuple(blk.shift_size)[1]:
                problems.append(f"{pre}: non-square window or shift")
            elif H % ws[0] or W % ws[1]:
                problems.append(f"{pre}: resolution {H}x{W} not a multiple of the window {ws} (padding)")
            if getattr(blk, "dynamic_mask", False):
                problems.append(f"{pre}: dynamic mask")
            if not isinstance(blk.mlp, Mlp) or not isinstance(getattr(blk.mlp, "norm", torch.nn.Identity()),
                                                              torch.nn.Identity):
                problems.append(f"{pre}.mlp is not a plain Mlp")
            act = getattr(blk.mlp, "act", None)
            if not (isinstance(act, torch.nn.GELU) and act.approximate == "none"):
                problems.append(f"{pre}.mlp.act is {act!r} (only erf GELU)")
            for n in ("norm1", "norm2"):
                if not isinstance(getattr(blk, n), torch.nn.LayerNorm):
                    problems.append(f"{pre}.{n} is not a LayerNorm")
    if not isinstance(getattr(model, "norm", None), torch.nn.LayerNorm):
        problems.append("final norm is not a LayerNorm")
    if problems:
        raise ValueError("unsupported SwinTransformer features: " + "; ".join(dict.fromkeys(problems)))


def params_from_timm(model, mean: Sequence[float], std: Sequence[float]) -> SwinParams:
    """Float32 parameters of a timm ``SwinTransformer`` for :func:`forward` on raw pixels.

    Folds ``(x/255 - mean)/std`` into the patch convolution (as ``reference.vit.params_from_timm``).
    Raises ``ValueError`` for unsupported variants.
    """
    _check_supported(model)
    mean64 = torch.tensor([float(m) for m in mean], dtype=torch.float64).view(1, 3, 1, 1)
    std64 = torch.tensor([float(s) for s in std], dtype=torch.float64).view(1, 3, 1, 1)
    conv = model.patch_embed.proj
    W = f64(conv.weight)
    b = f64(conv.bias) if conv.bias is not None else torch.zeros(W.shape[0], dtype=torch.float64)
    p = int(conv.kernel_size[0])
    if tuple(conv.kernel_size) != (p, p) or tuple(conv.stride) != (p, p) or W.shape[1] != 3:
        raise ValueError("patch embedding must be a square stride-p convolution over 3 channels")
    img = model.patch_embed.img_size
    img = tuple(img) if isinstance(img, (tuple, list)) else (img, img)
    if img[0] != img[1]:
        raise ValueError(f"only square images are supported, got img_size={img}")
    eps = float(model.patch_embed.norm.eps)
    stages = []
    D = W.shape[0]
    grid = (img[0] // p, img[1] // p)
    for s, st in enumerate(model.layers):
        merge = None
        if not isinstance(st.downsample, torch.nn.Identity):
            ds = st.downsample
            merge = MergeParams(norm_w=ln_weight(ds.norm, 4 * D), norm_b=bias_or_zeros(ds.norm, 4 * D),
                                red_w=f32(ds.reduction.weight),
                                red_b=bias_or_zeros(ds.reduction, ds.reduction.weight.shape[0]),
                                src=torch.from_numpy(merge_sources(*grid)))
            grid = (grid[0] // 2, grid[1] // 2)
            D = int(ds.reduction.weight.shape[0])
            _same_eps(eps, ds.norm)
        blocks = []
        for blk in st.blocks:
            if tuple(blk.input_resolution) != grid:
                raise ValueError(f"layers.{s}: block resolution {blk.input_resolution} != {grid}")
            a = blk.attn
            A = a.qkv.weight.shape[0] // 3
            qkv_w = f64(a.qkv.weight)
            qkv_b = f64(a.qkv.bias) if a.qkv.bias is not None else torch.zeros(3 * A, dtype=torch.float64)
            ws, sh = int(blk.window_size[0]), int(blk.shift_size[0])
            for ln in (blk.norm1, blk.norm2):
                _same_eps(eps, ln)
            bp = BlockParams(
                norm1_w=ln_weight(blk.norm1, D), norm1_b=bias_or_zeros(blk.norm1, D),
                q_w=f32(qkv_w[:A]), q_b=f32(qkv_b[:A]), k_w=f32(qkv_w[A:2 * A]), k_b=f32(qkv_b[A:2 * A]),
                v_w=f32(qkv_w[2 * A:]), v_b=f32(qkv_b[2 * A:]),
                proj_w=f32(a.proj.weight), proj_b=bias_or_zeros(a.proj, a.proj.weight.shape[0]),
                norm2_w=ln_weight(blk.norm2, D), norm2_b=bias_or_zeros(blk.norm2, D),
                fc1_w=f32(blk.mlp.fc1.weight), fc1_b=bias_or_zeros(blk.mlp.fc1, blk.mlp.fc1.weight.shape[0]),
                fc2_w=f32(blk.mlp.fc2.weight), fc2_b=bias_or_zeros(blk.mlp.fc2, blk.mlp.fc2.weight.shape[0]))
            rel = relative_index(ws)
            if not torch.equal(a.relative_position_index.cpu().long(), torch.from_numpy(rel)):
                raise ValueError(f"layers.{s}: relative_position_index differs from the expected layout")
            blocks.append(SwinBlockParams(
                p=bp, heads=int(a.num_heads), window=ws, shift=sh, rpb_table=f32(a.relative_position_bias_table),
                tokens=torch.from_numpy(window_tokens(*grid, ws, sh)), rel_index=torch.from_numpy(rel),
                mask=torch.from_numpy(shift_mask(*grid, ws, sh).astype(bool))))
        stages.append(StageParams(merge=merge, blocks=blocks, grid=grid, dim=D))
    _same_eps(eps, model.norm)
    return SwinParams(
        patch_w=f32(W / (255.0 * std64)), patch_b=f32(b - (W * (mean64 / std64)).sum(dim=(1, 2, 3))),
        pnorm_w=ln_weight(model.patch_embed.norm, W.shape[0]),
        pnorm_b=bias_or_zeros(model.patch_embed.norm, W.shape[0]),
        stages=stages, norm_w=ln_weight(model.norm, D), norm_b=bias_or_zeros(model.norm, D),
        head_w=f32(model.head.fc.weight), head_b=bias_or_zeros(model.head.fc, model.head.fc.weight.shape[0]),
        patch_size=p, img_size=int(img[0]), eps=eps)


def _same_eps(eps: float, ln) -> None:
    if float(ln.eps) != eps:
        raise ValueError("all LayerNorms must share one epsilon")


# ---- the float forward --------------------------------------------------------------------------

def embed(params: SwinParams, images, tap: Tap = no_tap) -> torch.Tensor:
    """Patch convolution + LayerNorm: raw pixels (B, 3, H, W) -> residual (B, T, C0)."""
    x = as_float_images(images)
    y = conv_patches(x, params.patch_w, params.patch_b, params.patch_size)
    tap("patch_embed.proj", y)
    y = layer_norm(y, params.pnorm_w, params.pnorm_b, params.eps)
    tap("patch_embed.norm", y)
    return y


def window_attention_core(q, k, v, heads: int, tokens: torch.Tensor, bias: torch.Tensor,
                          mask: torch.Tensor | None, prefix: str, hook: Hook = identity_hook,
                          mask_value: float = MASK_FILL) -> torch.Tensor:
    """``reference.functional.window_attention`` with the probabilities hooked as ``{prefix}.probs``."""
    return window_attention(q, k, v, heads, tokens, bias, mask, lambda probs: hook(f"{prefix}.probs", probs),
                            mask_value)


def block_forward(sb: SwinBlockParams, x: torch.Tensor, pre: str, eps: float,
                  hook: Hook = identity_hook, tap: Tap = no_tap, bias: torch.Tensor | None = None,
                  mask_value: float = MASK_FILL) -> torch.Tensor:
    """One Swin block on the residual (B, T, C); ``bias`` (H, n, n) overrides the float bias."""
    rpb = sb.rpb if bias is None else bias
    return transformer_block(sb.p, x, pre, eps, lambda q, k, v: window_attention_core(
        q, k, v, sb.heads, sb.tokens, rpb, sb.mask, f"{pre}.attn", hook, mask_value), hook, tap)


def merge_forward(mp: MergeParams, x: torch.Tensor, pre: str, eps: float, hook: Hook = identity_hook,
                  tap: Tap = no_tap) -> torch.Tensor:
    """Patch merging: gather, LayerNorm over 4C (hooked), reduction (tapped)."""
    y = hook(f"{pre}.norm", layer_norm(merge_tokens(x, mp.src), mp.norm_w, mp.norm_b, eps))
    r = linear(y, mp.red_w, mp.red_b)
    tap(f"{pre}.reduction", r)
    return r


def head_forward(params: SwinParams, x: torch.Tensor, hook: Hook = identity_hook, tap: Tap = no_tap) -> torch.Tensor:
    """Final LayerNorm (all tokens), average pool (hooked head input), classifier: -> logits (B, C)."""
    y = layer_norm(x, params.norm_w, params.norm_b, params.eps)
    tap("norm", y)
    pooled = hook("head.pool", token_pool(y))
    logits = linear(pooled, params.head_w, params.head_b)
    tap("head", logits)
    return logits[:, 0]


@torch.no_grad()
def forward(params: SwinParams, images, hook: Hook | None = None, tap: Tap | None = None) -> torch.Tensor:
    """Logits (B, classes) float32 of raw-pixel images (B, 3, H, W); hooks as in the module docstring."""
    hook = hook or identity_hook
    tap = tap or no_tap
    x = embed(params, images, tap)
    for s, st in enumerate(params.stages):
        if st.merge is not None:
            x = merge_forward(st.merge, x, f"layers.{s}.downsample", params.eps, hook, tap)
        for j, sb in enumerate(st.blocks):
            x = block_forward(sb, x, f"layers.{s}.blocks.{j}", params.eps, hook, tap)
    return head_forward(params, x, hook, tap)


def point_names(params: SwinParams) -> list[str]:
    """Every quantized point of the model, in forward order."""
    names = []
    for s, st in enumerate(params.stages):
        if st.merge is not None:
            names.append(f"layers.{s}.downsample.norm")
        for j in range(len(st.blocks)):
            p = f"layers.{s}.blocks.{j}"
            names += [f"{p}.norm1", f"{p}.attn.q", f"{p}.attn.k", f"{p}.attn.v", f"{p}.attn.probs",
                      f"{p}.attn.core", f"{p}.norm2", f"{p}.mlp.gelu"]
    return names + ["head.pool"]
