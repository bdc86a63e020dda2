"""The calibration driver: a timm ViT and calibration images in, an integer program out.

Order of work (only the residual entering the current block, (N, T, D) float32, is kept whole):

1. fold the input normalization and the class token (``reference.vit.params_from_timm``);
2. patch embedding on all images (with ``config.sequential``, using the quantized patch weights);
3. per block, one float forward from its input over the images in chunks with a
   :class:`calib.observers.BlockObserver` (memory-bounded samples), then:
   post-LN per-channel calibration + MOSF / mean reparameterization of norm1 -> q/k/v and
   norm2 -> fc1 (re-searching the shared per-tensor range afterwards), percentile searches of
   q, k, v, attention output and GELU output, the post-softmax quantizer search, weight
   quantization of q, k, v, proj, fc1, fc2, and the residual / GELU-input scales. The next
   block's input is this block's fake-quant output (``config.sequential``, the default: later
   statistics see the quantization error of earlier blocks, as in RepQ-ViT's one-pass
   initialization) or its float output;
4. final LayerNorm (class token) reparameterized into the head; head weights; logit scale;
5. optionally (``config.reconstruct``) block-wise reconstruction of the calibrated numbers on the
   reconstruction images (:mod:`calib.reconstruct`);
6. export (``calib.export.build_program``).
"""
from __future__ import annotations

import hashlib
from dataclasses import replace

import numpy as np
import torch
from tqdm.auto import tqdm

from intsim.program.format import Program
from reference.vit import (BlockParams, ViTParams, block_forward, embed, fake_quant_uniform, layer_norm,
                           params_from_timm)

from . import reparam as rp
from . import softmax_search
from .config import FAKEQUANT_ONLY_LN_RULES, CalibConfig
from .export import build_program
from .observers import BlockObserver, Budget, point_rng
from .state import BlockCalib, LinearCalib, LNCalib, ModelCalib
from .uniform import PERCENTILES, SHRINK, ActQuant, absmax_scale, quantize_weight, search_activation, search_channels

CHUNK = 32  # images per forward chunk


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float64).numpy()


def _subsample(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    x = x.ravel()
    return x if x.size <= k else x[rng.integers(0, x.size, size=k)]


def calibrate_ln(name: str, rows: np.ndarray, gamma, beta, consumers: list[tuple], bits: int, rule: str,
                 seed: int, budget: Budget) -> tuple[LNCalib, list[tuple[np.ndarray, np.ndarray]]]:
    """Per-channel calibration of a post-LN activation (rows (M, D)), shared quantizer by ``rule``,
    reparameterization of the LN affine and of the consumers ``[(W, b), ...]``, and a re-search of
    the per-tensor range of the reparameterized activation (the rule's own (s, z) is a candidate)."""
    s_c, z_c = search_channels(rows, bits)
    if rule == "channel":      # the fake-quant-only upper bound: no reparameterization, per-channel quantizer
        lins = [(_np(W), _np(b)) for W, b in consumers]
        return LNCalib(gamma=_np(gamma), beta=_np(beta), act=ActQuant(s_c, z_c, bits), reparam=None), lins
    r = rp.shared(s_c, z_c, rule)
    g2, b2 = rp.apply_ln(_np(gamma), _np(beta), r)
    lins = [rp.apply_linear(_np(W), _np(b), r) for W, b in consumers]
    sample = _subsample(rp.transform(rows, r), budget.elements, point_rng(seed, name + "/reparam"))
    act = search_activation(sample, bits, extra=[(r.s, r.z)])
    return LNCalib(gamma=g2, beta=b2, act=act, reparam=r), lins


def _linear(W, b, wbits: int) -> LinearCalib:
    W = _np(W) if isinstance(W, torch.Tensor) else W
    b = _np(b) if isinstance(b, torch.Tensor) else b
    return LinearCalib(weight=quantize_weight(W, wbits), bias=np.asarray(b, np.float64))


def calibrate_block(bp, r: torch.Tensor, index: int, params: ViTParams, config: CalibConfig,
                    settings: dict[str, int], budget: Budget) -> tuple[BlockCalib, torch.Tensor]:
    """Calibrate block ``index`` from its float input ``r`` (N, T, D); returns it and the block output."""
    N, T, _ = r.shape
    obs = BlockObserver(index, N, T, params.num_heads, config.seed, budget)
    outs = []
    for s in range(0, N, CHUNK):
        obs.start_chunk(s, min(CHUNK, N - s))
        outs.append(block_forward(bp, r[s:s + CHUNK], index, params.num_heads, params.eps, obs.hook, obs.tap))
    out = torch.cat(outs)
    return block_calib(obs, bp, f"blocks.{index}", config, settings, budget), out


def block_calib(obs, bp: BlockParams, pre: str, config: CalibConfig, settings: dict[str, int],
                budget: Budget) -> BlockCalib:
    """A block's quantizers from what its observer saw (``rows_of``, ``sample_of``, ``absmax``,
    ``attention``): post-LN points with their reparameterization, q/k/v, the post-softmax
    quantizer, attention output, GELU output, the integer-valued scales and the weights."""
    wb, ab, seed, rule = settings["wbits"], settings["abits"], config.seed, config.ln_rule
    norm1, (q, k, v) = calibrate_ln(f"{pre}.norm1", obs.rows_of(f"{pre}.norm1"), bp.norm1_w, bp.norm1_b,
                                    [(bp.q_w, bp.q_b), (bp.k_w, bp.k_b), (bp.v_w, bp.v_b)], ab, rule, seed, budget)
    probs, vh = obs.attention()
    norm2, (fc1,) = calibrate_ln(f"{pre}.norm2", obs.rows_of(f"{pre}.norm2"), bp.norm2_w, bp.norm2_b,
                                 [(bp.fc1_w, bp.fc1_b)], ab, rule, seed, budget)
    return BlockCalib(
        norm1=norm1,
        q=_linear(*q, wb), k=_linear(*k, wb), v=_linear(*v, wb),
        q_act=search_activation(obs.sample_of(f"{pre}.attn.q"), ab),
        k_act=search_activation(obs.sample_of(f"{pre}.attn.k"), ab),
        v_act=search_activation(obs.sample_of(f"{pre}.attn.v"), ab),
        softmax=softmax_search.search(config.softmax_quant, ab, probs, vh, settings["prob_bits"]),
        core=search_activation(obs.sample_of(f"{pre}.attn.core"), ab),
        proj=_linear(bp.proj_w, bp.proj_b, wb),
        res1=absmax_scale(obs.absmax[f"{pre}.add1"], settings["residual_bits"]),
        norm2=norm2,
        fc1=_linear(*fc1, wb),
        fc1_scale=absmax_scale(obs.absmax[f"{pre}.mlp.fc1"], settings["gelu_bits"]),
        gelu=search_activation(obs.sample_of(f"{pre}.mlp.gelu"), ab),
        fc2=_linear(bp.fc2_w, bp.fc2_b, wb),
        res2=absmax_scale(obs.absmax[f"{pre}.add2"], settings["residual_bits"]),
    )


def _t32(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))


def _fake_quant(x: torch.Tensor, a: ActQuant) -> torch.Tensor:
    """Quantize-dequantize by ``a``: per tensor, or per channel (last axis) when its scale is an array."""
    if isinstance(a.scale, np.ndarray):
        return fake_quant_uniform(x, _t32(a.scale), _t32(a.zero_point), a.bits)
    return fake_quant_uniform(x, a.scale, a.zero_point, a.bits)


def quantized_block_forward(bc: BlockCalib, r: torch.Tensor, index: int, heads: int, eps: float,
                            tap=None) -> torch.Tensor:
    """Fake-quant forward of a calibrated block (the semantics of ``reference.vit.FakeQuantViT``):
    dequantized weights, reparameterized LN affines, quantize-dequantize at every quantized point.
    ``tap(name, tensor)`` (optional) observes the integer-valued points as in ``block_forward``."""
    bp = BlockParams(
        norm1_w=_t32(bc.norm1.gamma), norm1_b=_t32(bc.norm1.beta),
        q_w=_t32(bc.q.weight.dequant()), q_b=_t32(bc.q.bias), k_w=_t32(bc.k.weight.dequant()), k_b=_t32(bc.k.bias),
        v_w=_t32(bc.v.weight.dequant()), v_b=_t32(bc.v.bias),
        proj_w=_t32(bc.proj.weight.dequant()), proj_b=_t32(bc.proj.bias),
        norm2_w=_t32(bc.norm2.gamma), norm2_b=_t32(bc.norm2.beta),
        fc1_w=_t32(bc.fc1.weight.dequant()), fc1_b=_t32(bc.fc1.bias),
        fc2_w=_t32(bc.fc2.weight.dequant()), fc2_b=_t32(bc.fc2.bias))
    pre = f"blocks.{index}"
    acts = {f"{pre}.norm1": bc.norm1.act, f"{pre}.attn.q": bc.q_act, f"{pre}.attn.k": bc.k_act,
            f"{pre}.attn.v": bc.v_act, f"{pre}.attn.core": bc.core, f"{pre}.norm2": bc.norm2.act,
            f"{pre}.mlp.gelu": bc.gelu}

    def hook(name: str, x: torch.Tensor) -> torch.Tensor:
        if name == f"{pre}.attn.probs":
            return bc.softmax.quantize_torch(x)
        return _fake_quant(x, acts[name])

    extra = () if tap is None else (tap,)
    return torch.cat([block_forward(bp, r[s:s + CHUNK], index, heads, eps, hook, *extra)
                      for s in range(0, r.shape[0], CHUNK)])


def calibrate_params(params: ViTParams, images: np.ndarray, config: CalibConfig, settings: dict[str, int],
                     progress: bool = True, budget: Budget | None = None) -> ModelCalib:
    """Calibrate folded float parameters on uint8 images (N, 3, H, W); see the module docstring."""
    budget = budget or Budget()
    N = images.shape[0]
    wb, ab = settings["wbits"], settings["abits"]
    D = params.embed_dim
    patch = _linear(params.patch_w.reshape(D, -1), params.patch_b, wb)
    ep = params
    if config.sequential:   # the quantized path starts with the quantized patch embedding
        ep = replace(params, patch_w=_t32(patch.weight.dequant()).reshape(params.patch_w.shape))
    r = torch.cat([embed(ep, images[s:s + CHUNK]) for s in range(0, N, CHUNK)])
    res0 = absmax_scale(float(r.abs().max()), settings["residual_bits"])
    blocks = []
    for i in tqdm(range(params.depth), desc="calibrating", unit="block", disable=not progress, leave=False):
        bc, out = calibrate_block(params.blocks[i], r, i, params, config, settings, budget)
        r = quantized_block_forward(bc, r, i, params.num_heads, params.eps) if config.sequential else out
        blocks.append(bc)
    y = layer_norm(r[:, :1], params.norm_w, params.norm_b, params.eps)[:, 0]      # (N, D) class tokens
    logits = torch.nn.functional.linear(y, params.head_w, params.head_b)
    norm, ((hw, hb),) = calibrate_ln("norm", _np(y), params.norm_w, params.norm_b,
                                     [(params.head_w, params.head_b)], ab, config.ln_rule, config.seed, budget)
    return ModelCalib(
        img_size=params.img_size, patch_size=params.patch_size, num_heads=params.num_heads, eps=params.eps,
        patch=patch, pos=_np(params.pos), res0=res0, blocks=blocks, norm=norm,
        head=_linear(hw, hb, wb),
        logit_scale=absmax_scale(float(logits.abs().max()), settings["logit_bits"]),
    )


def fakequant_logits(mc: ModelCalib, params: ViTParams, images: np.ndarray) -> torch.Tensor:
    """Float logits (N, C) of the fake-quant model held by the calibration state ``mc`` (the
    semantics of ``reference.vit.FakeQuantViT``, whose program is built from ``mc``): quantized
    patch embedding, :func:`quantized_block_forward` per block, quantized final LN and head."""
    ep = replace(params, patch_w=_t32(mc.patch.weight.dequant()).reshape(params.patch_w.shape),
                 patch_b=_t32(mc.patch.bias), pos=_t32(mc.pos))
    out = []
    for s in range(0, images.shape[0], CHUNK):
        r = embed(ep, images[s:s + CHUNK])
        for i, bc in enumerate(mc.blocks):
            r = quantized_block_forward(bc, r, i, params.num_heads, params.eps)
        y = _fake_quant(layer_norm(r[:, :1], _t32(mc.norm.gamma), _t32(mc.norm.beta), params.eps), mc.norm.act)
        out.append(torch.nn.functional.linear(y, _t32(mc.head.weight.dequant()), _t32(mc.head.bias))[:, 0])
    return torch.cat(out)


def channelwise_fakequant(model, images, mean, std, config: CalibConfig, eval_images) -> np.ndarray:
    """Fake-quant logits (N, C) float64 on ``eval_images`` of the model calibrated with per-channel
    post-LayerNorm quantizers and no reparameterization (``config.ln_rule == "channel"``): the upper
    bound of the MOSF / mean rules, which no integer program can express (see calib.config).
    ``eval_images``: uint8 (N, 3, H, W), or an iterable of such chunks (evaluated one at a time)."""
    if config.ln_rule != "channel":
        raise ValueError("channelwise_fakequant is for ln_rule='channel'")
    settings = config.resolved_settings()
    model.eval()
    with torch.no_grad():
        params = params_from_timm(model, mean, std)
        mc = calibrate_params(params, _check_images(images, params.img_size), config, settings, False)
        chunks = [eval_images] if isinstance(eval_images, (np.ndarray, torch.Tensor)) else eval_images
        return np.concatenate([fakequant_logits(mc, params, _check_images(c, params.img_size)).double().numpy()
                               for c in chunks])


def _check_images(images, img_size: int) -> np.ndarray:
    if isinstance(images, torch.Tensor):
        images = images.numpy()
    images = np.ascontiguousarray(images)
    if images.dtype != np.uint8:
        raise ValueError(f"calibration images must be uint8, got {images.dtype}")
    if images.ndim != 4 or images.shape[1] != 3 or images.shape[2:] != (img_size, img_size):
        raise ValueError(f"calibration images must be (N, 3, {img_size}, {img_size}), got {images.shape}")
    if images.shape[0] < 1:
        raise ValueError("no calibration images")
    return images


def _method(config: CalibConfig) -> str:
    if config.reconstruct:
        return ("DopQ-ViT (TanQ + MOSF) + block reconstruction" if (config.softmax_quant, config.ln_rule)
                == ("tanq", "mosf") else "DopQ-ViT pipeline + block reconstruction, ablation")
    return ("DopQ-ViT (TanQ + MOSF), calibration only" if (config.softmax_quant, config.ln_rule) == ("tanq", "mosf")
            else "DopQ-ViT pipeline, ablation")


def calibrate(model, images, mean, std, config: CalibConfig | None = None, provenance: dict | None = None,
              progress: bool = True, recon_images=None) -> Program:
    """Post-training quantization (DopQ-ViT) of a timm ``VisionTransformer`` (or ``SwinTransformer``,
    dispatched to :func:`calib.swin.calibrate`) into an integer program.

    ``model``: timm VisionTransformer (put in eval mode); ``images``: uint8 (N, 3, H, W), already
    resized / cropped, raw pixels; ``mean`` / ``std``: the model's input normalization (3 each);
    ``config``: :class:`CalibConfig`; ``provenance``: caller's record (model name, checkpoint...),
    stored in the header with the calibration settings added under ``"calibration"``;
    ``recon_images``: uint8 images for the optional reconstruction stage (``config.reconstruct``,
    :mod:`calib.reconstruct`; the first ``config.recon_images`` are used; default: ``images``).
    Deterministic: the same inputs and config give a byte-identical saved program.
    """
    from reference.swin import is_swin
    if config is not None and config.ln_rule in FAKEQUANT_ONLY_LN_RULES:
        raise ValueError(f"ln_rule {config.ln_rule!r} has no integer program (an integer GEMM cannot mix "
                         f"input-channel scales); evaluate it with calib.pipeline.channelwise_fakequant")
    if is_swin(model):                     # timm SwinTransformer: calib/swin.py (same arguments, same result type)
        if config is not None and config.reconstruct:
            raise ValueError("block reconstruction (reconstruct=True) is implemented for ViT / DeiT models only, "
                             "not for Swin")
        from .swin import calibrate as calibrate_swin
        return calibrate_swin(model, images, mean, std, config, provenance, progress)
    config = config or CalibConfig()
    settings = config.resolved_settings()
    model.eval()
    with torch.no_grad():
        params = params_from_timm(model, mean, std)
        imgs = _check_images(images, params.img_size)
        budget = Budget()
        mc = calibrate_params(params, imgs, config, settings, progress, budget)
    recon = None
    if config.reconstruct:
        from .reconstruct import reconstruct
        rimgs = imgs if recon_images is None else _check_images(recon_images, params.img_size)
        rimgs = rimgs[:config.recon_images]
        mc, logs = reconstruct(params, mc, rimgs, config, settings, progress)
        recon = {"num_images": int(rimgs.shape[0]),
                 "images_sha256": hashlib.sha256(rimgs.tobytes()).hexdigest(),
                 "units": [lg.to_dict() for lg in logs]}
    prov = dict(provenance or {})
    prov["calibration"] = {
        **config.to_dict(),
        "method": _method(config),
        "num_images": int(imgs.shape[0]),
        "images_sha256": hashlib.sha256(imgs.tobytes()).hexdigest(),
        "mean": [float(m) for m in mean],
        "std": [float(s) for s in std],
        "activation_percentiles": list(PERCENTILES),
        "weight_shrink": list(SHRINK),
        "sample_budget": {"rows": budget.rows, "elements": budget.elements,
                          "softmax_images": budget.softmax_images, "softmax_rows": budget.softmax_rows},
    }
    if recon is not None:
        prov["calibration"]["reconstruction"] = recon
    return build_program(mc, settings, prov)
