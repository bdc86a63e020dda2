"""Functional ViT forward in torch float32: the float model of a timm ``VisionTransformer``.

* :func:`forward` -- the float model of a timm ``VisionTransformer`` (deit_* / vit_* with a class
  token, token pooling, absolute position embedding) written out op by op, with a ``hook``
  called at every quantized point. Its parameters (:class:`ViTParams`, from
  :func:`params_from_timm`) take **raw pixels** 0..255: the input normalization is folded into
  the patch-embedding weights and the class token into row 0 of the position table. With the
  identity hook it equals ``model((images/255 - mean)/std)`` to float tolerance.

The fake-quant model of a program (ViT or Swin) is ``reference.fakequant.FakeQuantModel``; the
float pieces shared with it and with ``reference.swin`` are in ``reference.functional``.

Quantized points (hook names, ``i`` = block index): ``blocks.i.norm1`` (LN1 output = q/k/v
input), ``blocks.i.attn.q`` / ``.k`` / ``.v`` (linear outputs, before the 1/sqrt(d) scale),
``blocks.i.attn.probs`` (post-softmax), ``blocks.i.attn.core`` (probs @ v = proj input),
``blocks.i.norm2`` (fc1 input), ``blocks.i.mlp.gelu`` (fc2 input), ``norm`` (final LN output of
the class token = head input). Shapes are token-major: (B, T, C).

The integer-valued points of the program (residual stream, fc1 output = GELU input, logits) are
not quantized here; an optional ``tap(name, tensor)`` observes them under the program's value
names: ``patch_embed``, ``blocks.i.attn.proj``, ``blocks.i.add1``, ``blocks.i.mlp.fc1``,
``blocks.i.mlp.fc2``, ``blocks.i.add2``, ``head``.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

import torch

from .functional import (Hook, Tap, as_float_images, attention, bias_or_zeros, f32, f64, gelu, identity_hook,
                         layer_norm, linear, ln_weight, no_tap, patch_embed)
from .functional import fake_quant_uniform  # noqa: F401  (re-exported: calib imports it from here)


# ---- parameters ------------------------------------------------------------------------

@dataclass
class BlockParams:
    """One transformer block, float32. Linear weights are (out, in) as in ``nn.Linear``."""

    norm1_w: torch.Tensor
    norm1_b: torch.Tensor
    q_w: torch.Tensor
    q_b: torch.Tensor
    k_w: torch.Tensor
    k_b: torch.Tensor
    v_w: torch.Tensor
    v_b: torch.Tensor
    proj_w: torch.Tensor
    proj_b: torch.Tensor
    norm2_w: torch.Tensor
    norm2_b: torch.Tensor
    fc1_w: torch.Tensor
    fc1_b: torch.Tensor
    fc2_w: torch.Tensor
    fc2_b: torch.Tensor


@dataclass
class ViTParams:
    """A whole ViT, float32, taking raw pixels.

    ``patch_w`` (D, 3, p, p) / ``patch_b`` (D,) include the input normalization;
    ``pos`` (T, D) has the class token folded into row 0 (``cls + pos_embed[0]``).
    """

    patch_w: torch.Tensor
    patch_b: torch.Tensor
    pos: torch.Tensor
    blocks: list[BlockParams]
    norm_w: torch.Tensor
    norm_b: torch.Tensor
    head_w: torch.Tensor
    head_b: torch.Tensor
    num_heads: int
    patch_size: int
    img_size: int
    eps: float = 1e-6
    extra: dict = field(default_factory=dict)

    @property
    def embed_dim(self) -> int:
        return int(self.patch_w.shape[0])

    @property
    def depth(self) -> int:
        return len(self.blocks)

    @property
    def num_tokens(self) -> int:
        return int(self.pos.shape[0])

    @property
    def num_classes(self) -> int:
        return int(self.head_w.shape[0])

    def clone(self) -> "ViTParams":
        """Deep copy of every tensor (so reparameterization can work on a copy)."""
        return replace(self, patch_w=self.patch_w.clone(), patch_b=self.patch_b.clone(), pos=self.pos.clone(),
                       blocks=[BlockParams(**{k: v.clone() for k, v in vars(b).items()}) for b in self.blocks],
                       norm_w=self.norm_w.clone(), norm_b=self.norm_b.clone(),
                       head_w=self.head_w.clone(), head_b=self.head_b.clone(), extra=dict(self.extra))


def _check_supported(model) -> None:
    from timm.models.vision_transformer import VisionTransformer

    if not isinstance(model, VisionTransformer):
        raise ValueError(f"expected a timm VisionTransformer, got {type(model).__name__}")
    problems = []
    if getattr(model, "cls_token", None) is None:
        problems.append("no class token")
    if getattr(model, "reg_token", None) is not None:
        problems.append("register tokens")
    if getattr(model, "no_embed_class", False):
        problems.append("no_embed_class position embedding")
    if getattr(model, "pos_embed", None) is None:
        problems.append("no absolute position embedding")
    if getattr(model, "global_pool", "token") != "token":
        problems.append(f"global_pool={model.global_pool!r} (only 'token')")
    if getattr(model, "dynamic_img_size", False):
        problems.append("dynamic_img_size")
    for n in ("norm_pre", "fc_norm"):
        if not isinstance(getattr(model, n, torch.nn.Identity()), torch.nn.Identity):
            problems.append(n)
    if not isinstance(getattr(model.patch_embed, "norm", torch.nn.Identity()), torch.nn.Identity):
        problems.append("patch_embed.norm")
    for i, b in enumerate(model.blocks):
        a = b.attn
        if not (hasattr(a, "qkv") and hasattr(a, "proj")):
            problems.append(f"blocks.{i}.attn is not a plain Attention")
            break
        for n in ("q_norm", "k_norm", "norm"):
            if not isinstance(getattr(a, n, torch.nn.Identity()), torch.nn.Identity):
                problems.append(f"blocks.{i}.attn.{n}")
        if getattr(a, "gate", None) is not None:
            problems.append(f"blocks.{i}.attn.gate")
        m = b.mlp
        if not (hasattr(m, "fc1") and hasattr(m, "fc2")) or not isinstance(getattr(m, "norm", torch.nn.Identity()),
                                                                         torch.nn.Identity):
            problems.append(f"blocks.{i}.mlp is not a plain Mlp")
        act = getattr(m, "act", None)
        if not (isinstance(act, torch.nn.GELU) and act.approximate == "none"):
            problems.append(f"blocks.{i}.mlp.act is {act!r} (only erf GELU)")
        for n in ("norm1", "norm2"):
            if not isinstance(getattr(b, n), torch.nn.LayerNorm):
                problems.append(f"blocks.{i}.{n} is not a LayerNorm")
    if not isinstance(getattr(model, "norm", None), torch.nn.LayerNorm):
        problems.append("final norm is not a LayerNorm")
    if problems:
        raise ValueError("unsupported VisionTransformer features: " + "; ".join(dict.fromkeys(problems)))


def _layerscale(mod) -> torch.Tensor | None:
    g = getattr(mod, "gamma", None)
    return None if g is None else f64(g)


def params_from_timm(model, mean: Sequence[float], std: Sequence[float]) -> ViTParams:
    """Float32 parameters of a timm ``VisionTransformer`` for :func:`forward` on raw pixels.

    Folds ``(x/255 - mean)/std`` into the patch embedding (``W' = W / (255 std[ch])``,
    ``b' = b - sum W mean[ch] / std[ch]``), the class token into ``pos[0]``, and LayerScale
    (if any) into ``proj`` / ``fc2``. Raises ``ValueError`` for unsupported variants.
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
    patch_w = W / (255.0 * std64)
    patch_b = b - (W * (mean64 / std64)).sum(dim=(1, 2, 3))
    pos = f64(model.pos_embed)[0].clone()
    pos[0] = pos[0] + f64(model.cls_token)[0, 0]
    img = model.patch_embed.img_size
    img = tuple(img) if isinstance(img, (tuple, list)) else (img, img)
    if img[0] != img[1]:
        raise ValueError(f"only square images are supported, got img_size={img}")

    blocks = []
    eps = None
    for blk in model.blocks:
        D = W.shape[0]
        qkv_w = f64(blk.attn.qkv.weight)
        qkv_b = f64(blk.attn.qkv.bias) if blk.attn.qkv.bias is not None else torch.zeros(3 * D, dtype=torch.float64)
        pw = f64(blk.attn.proj.weight)
        pb = f64(blk.attn.proj.bias) if blk.attn.proj.bias is not None else torch.zeros(pw.shape[0], dtype=torch.float64)
        f2w = f64(blk.mlp.fc2.weight)
        f2b = f64(blk.mlp.fc2.bias) if blk.mlp.fc2.bias is not None else torch.zeros(f2w.shape[0], dtype=torch.float64)
        g1, g2 = _layerscale(blk.ls1), _layerscale(blk.ls2)
        if g1 is not None:
            pw, pb = pw * g1[:, None], pb * g1
        if g2 is not None:
            f2w, f2b = f2w * g2[:, None], f2b * g2
        for ln in (blk.norm1, blk.norm2):
            if eps is not None and ln.eps != eps:
                raise ValueError("all LayerNorms must share one epsilon")
            eps = ln.eps
        blocks.append(BlockParams(
            norm1_w=ln_weight(blk.norm1, D), norm1_b=bias_or_zeros(blk.norm1, D),
            q_w=f32(qkv_w[:D]), q_b=f32(qkv_b[:D]),
            k_w=f32(qkv_w[D:2 * D]), k_b=f32(qkv_b[D:2 * D]),
            v_w=f32(qkv_w[2 * D:]), v_b=f32(qkv_b[2 * D:]),
            proj_w=f32(pw), proj_b=f32(pb),
            norm2_w=ln_weight(blk.norm2, D), norm2_b=bias_or_zeros(blk.norm2, D),
            fc1_w=f32(blk.mlp.fc1.weight), fc1_b=bias_or_zeros(blk.mlp.fc1, blk.mlp.fc1.weight.shape[0]),
            fc2_w=f32(f2w), fc2_b=f32(f2b)))
    head = model.head
    if isinstance(head, torch.nn.Identity):
        raise ValueError("model has no classifier head (num_classes=0)")
    return ViTParams(
        patch_w=f32(patch_w), patch_b=f32(patch_b), pos=f32(pos), blocks=blocks,
        norm_w=ln_weight(model.norm, W.shape[0]), norm_b=bias_or_zeros(model.norm, W.shape[0]),
        head_w=f32(head.weight), head_b=bias_or_zeros(head, head.weight.shape[0]),
        num_heads=int(model.blocks[0].attn.num_heads), patch_size=p, img_size=int(img[0]),
        eps=float(model.norm.eps if eps is None else eps))


# ---- the float forward -----------------------------------------------------------------

def embed(params: ViTParams, images, tap: Tap = no_tap) -> torch.Tensor:
    """Patch embedding + class token + position: raw pixels (B, 3, H, W) -> residual (B, T, D)."""
    y = patch_embed(as_float_images(images), params.patch_w, params.patch_b, params.patch_size, params.pos)
    tap("patch_embed", y)
    return y


def attention_core(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, prefix: str,
                   hook: Hook = identity_hook) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v with the probabilities hooked as ``{prefix}.probs``: (B, T, D) x3 -> (B, T, D)."""
    return attention(q, k, v, heads, lambda probs: hook(f"{prefix}.probs", probs))


def transformer_block(bp: BlockParams, x: torch.Tensor, pre: str, eps: float,
                      core: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
                      hook: Hook = identity_hook, tap: Tap = no_tap) -> torch.Tensor:
    """A pre-norm transformer block on the residual ``x`` (B, T, D) -> (B, T, D), with its attention
    ``core(q, k, v)`` given (global attention here, window attention in reference/swin.py);
    quantized points are hooked and integer-valued points tapped under the prefix ``pre``."""
    n1 = hook(f"{pre}.norm1", layer_norm(x, bp.norm1_w, bp.norm1_b, eps))
    q = hook(f"{pre}.attn.q", linear(n1, bp.q_w, bp.q_b))
    k = hook(f"{pre}.attn.k", linear(n1, bp.k_w, bp.k_b))
    v = hook(f"{pre}.attn.v", linear(n1, bp.v_w, bp.v_b))
    a = hook(f"{pre}.attn.core", core(q, k, v))
    p = linear(a, bp.proj_w, bp.proj_b)
    tap(f"{pre}.attn.proj", p)
    x = x + p
    tap(f"{pre}.add1", x)
    n2 = hook(f"{pre}.norm2", layer_norm(x, bp.norm2_w, bp.norm2_b, eps))
    f = linear(n2, bp.fc1_w, bp.fc1_b)
    tap(f"{pre}.mlp.fc1", f)
    g = hook(f"{pre}.mlp.gelu", gelu(f))
    o = linear(g, bp.fc2_w, bp.fc2_b)
    tap(f"{pre}.mlp.fc2", o)
    x = x + o
    tap(f"{pre}.add2", x)
    return x


def block_forward(bp: BlockParams, x: torch.Tensor, index: int, heads: int, eps: float,
                  hook: Hook = identity_hook, tap: Tap = no_tap) -> torch.Tensor:
    """ViT block ``index`` on the residual ``x`` (B, T, D) -> (B, T, D)."""
    pre = f"blocks.{index}"
    return transformer_block(bp, x, pre, eps, lambda q, k, v: attention_core(q, k, v, heads, f"{pre}.attn", hook),
                             hook, tap)


def head_forward(params: ViTParams, x: torch.Tensor, hook: Hook = identity_hook, tap: Tap = no_tap) -> torch.Tensor:
    """Final LayerNorm of the class token and the classifier: (B, T, D) -> logits (B, C)."""
    h = hook("norm", layer_norm(x[:, :1], params.norm_w, params.norm_b, params.eps))  # (B, 1, D)
    logits = linear(h, params.head_w, params.head_b)
    tap("head", logits)
    return logits[:, 0]


@torch.no_grad()
def forward(params: ViTParams, images, hook: Hook | None = None, tap: Tap | None = None) -> torch.Tensor:
    """Logits (B, C) float32 of raw-pixel images (B, 3, H, W) (uint8 or float 0..255).

    ``hook(name, tensor) -> tensor`` is called at every quantized point (module docstring) and
    its return value is used downstream; ``tap(name, tensor)`` observes the integer-valued points.
    """
    hook = hook or identity_hook
    tap = tap or no_tap
    x = embed(params, images, tap)
    for i, bp in enumerate(params.blocks):
        x = block_forward(bp, x, i, params.num_heads, params.eps, hook, tap)
    return head_forward(params, x, hook, tap)


def point_names(depth: int) -> list[str]:
    """Every quantized point of a ``depth``-block ViT, in forward order."""
    names = []
    for i in range(depth):
        p = f"blocks.{i}"
        names += [f"{p}.norm1", f"{p}.attn.q", f"{p}.attn.k", f"{p}.attn.v", f"{p}.attn.probs",
                  f"{p}.attn.core", f"{p}.norm2", f"{p}.mlp.gelu"]
    return names + ["norm"]
