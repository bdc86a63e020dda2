"""The ViT / DeiT driver: a timm ``VisionTransformer`` and calibration images in, an integer program out.

Order of work (only the residual entering the current block, (N, T, D) float32, is kept whole):

1. fold the input normalization and the class token (``reference.vit.params_from_timm``);
2. patch embedding on all images (with ``config.sequential``, using the quantized patch weights);
3. per block, one float forward from its input over the images in chunks with a
   :class:`calib.observers.BlockObserver` (memory-bounded samples), then
   (:func:`calib.common.block_calib`): post-LN per-channel calibration + MOSF / mean
   reparameterization of norm1 -> q/k/v and norm2 -> fc1 (re-searching the shared per-tensor
   range afterwards), percentile searches of q, k, v, attention output and GELU output, the
   post-softmax quantizer search, weight quantization of q, k, v, proj, fc1, fc2, and the
   residual / GELU-input scales. The next block's input is this block's fake-quant output
   (``config.sequential``, the default: later statistics see the quantization error of earlier
   blocks, as in RepQ-ViT's one-pass initialization) or its float output;
4. final LayerNorm (class token) reparameterized into the head; head weights; logit scale;
5. optionally (``config.reconstruct``) block-wise reconstruction of the calibrated numbers on the
   reconstruction images (:mod:`calib.reconstruct`);
6. export (:func:`build_program`).

Graph (spec section 6) and names: ``image`` -> ``patch_embed`` -> per block ``blocks.{i}.norm1``
-> ``.attn.q`` / ``.attn.k`` / ``.attn.v`` -> ``.attn.core`` (attention) -> ``.attn.proj`` ->
``.add1`` -> ``.norm2`` -> ``.mlp.fc1`` -> ``.mlp.gelu`` -> ``.mlp.fc2`` -> ``.add2``; then
``norm`` (class token) -> ``head``. Each op's output value carries the op's name; each op's
constants are computed by its module (``intsim.ops.<type>.export``).
"""
from __future__ import annotations

import hashlib
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from intsim.ops import attention, layernorm, linear, patch_embed
from intsim.program.builder import ProgramBuilder
from intsim.program.program import Program
from reference.vit import ViTParams, block_forward, embed, layer_norm, params_from_timm

from .common import (CHUNK, block_calib, calibrate_ln, calibration_record, check_images, emit_block, export_program,
                     fake_quant, np64, quantize_linear, quantized_block_forward, t32)
from .config import CalibConfig
from .observers import BlockObserver, Budget
from .reconstruct import reconstruct
from .state import BlockCalib, ModelCalib
from .uniform import absmax_scale

#: The program header's ``model.arch`` (the name of this architecture in :mod:`calib.archs`).
ARCH = "vit"


# ---- calibration ------------------------------------------------------------------------------

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


def calibrate_params(params: ViTParams, images: np.ndarray, config: CalibConfig, settings: dict[str, int],
                     progress: bool = True, budget: Budget | None = None) -> ModelCalib:
    """Calibrate folded float parameters on uint8 images (N, 3, H, W); see the module docstring."""
    budget = budget or Budget()
    N = images.shape[0]
    wb, ab = settings["wbits"], settings["abits"]
    D = params.embed_dim
    patch = quantize_linear(params.patch_w.reshape(D, -1), params.patch_b, wb)
    ep = params
    if config.sequential:   # the quantized path starts with the quantized patch embedding
        ep = replace(params, patch_w=t32(patch.weight.dequant()).reshape(params.patch_w.shape))
    r = torch.cat([embed(ep, images[s:s + CHUNK]) for s in range(0, N, CHUNK)])
    res0 = absmax_scale(float(r.abs().max()), settings["residual_bits"])
    blocks = []
    for i in tqdm(range(params.depth), desc="calibrating", unit="block", disable=not progress, leave=False):
        bc, out = calibrate_block(params.blocks[i], r, i, params, config, settings, budget)
        r = quantized_block_forward(bc, r, i, params.num_heads, params.eps) if config.sequential else out
        blocks.append(bc)
    y = layer_norm(r[:, :1], params.norm_w, params.norm_b, params.eps)[:, 0]      # (N, D) class tokens
    logits = torch.nn.functional.linear(y, params.head_w, params.head_b)
    norm, ((hw, hb),) = calibrate_ln("norm", np64(y), params.norm_w, params.norm_b,
                                     [(params.head_w, params.head_b)], ab, config.ln_rule, config.seed, budget)
    return ModelCalib(
        img_size=params.img_size, patch_size=params.patch_size, num_heads=params.num_heads, eps=params.eps,
        patch=patch, pos=np64(params.pos), res0=res0, blocks=blocks, norm=norm,
        head=quantize_linear(hw, hb, wb),
        logit_scale=absmax_scale(float(logits.abs().max()), settings["logit_bits"]),
    )


def fakequant_logits(mc: ModelCalib, params: ViTParams, images: np.ndarray) -> torch.Tensor:
    """Float logits (N, C) of the fake-quant model held by the calibration state ``mc`` (the
    semantics of ``reference.fakequant.FakeQuantModel``, whose program is built from ``mc``): quantized
    patch embedding, :func:`calib.common.quantized_block_forward` per block, quantized final LN and head."""
    ep = replace(params, patch_w=t32(mc.patch.weight.dequant()).reshape(params.patch_w.shape),
                 patch_b=t32(mc.patch.bias), pos=t32(mc.pos))
    out = []
    for s in range(0, images.shape[0], CHUNK):
        r = embed(ep, images[s:s + CHUNK])
        for i, bc in enumerate(mc.blocks):
            r = quantized_block_forward(bc, r, i, params.num_heads, params.eps)
        y = fake_quant(layer_norm(r[:, :1], t32(mc.norm.gamma), t32(mc.norm.beta), params.eps), mc.norm.act)
        out.append(torch.nn.functional.linear(y, t32(mc.head.weight.dequant()), t32(mc.head.bias))[:, 0])
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
        mc = calibrate_params(params, check_images(images, params.img_size), config, settings, False)
        chunks = [eval_images] if isinstance(eval_images, (np.ndarray, torch.Tensor)) else eval_images
        return np.concatenate([fakequant_logits(mc, params, check_images(c, params.img_size)).double().numpy()
                               for c in chunks])


def calibrate(model, images, mean, std, config: CalibConfig | None = None, provenance: dict | None = None,
              progress: bool = True, recon_images=None) -> Program:
    """Post-training quantization (DopQ-ViT) of a timm ``VisionTransformer`` into an integer program
    (called through :func:`calib.calibrate`, which documents the arguments); with
    ``config.reconstruct``, block reconstruction on ``recon_images`` (default: ``images``; the first
    ``config.recon_images`` are used) before export."""
    config = config or CalibConfig()
    settings = config.resolved_settings()
    model.eval()
    with torch.no_grad():
        params = params_from_timm(model, mean, std)
        imgs = check_images(images, params.img_size)
        budget = Budget()
        mc = calibrate_params(params, imgs, config, settings, progress, budget)
    recon = None
    if config.reconstruct:
        rimgs = imgs if recon_images is None else check_images(recon_images, params.img_size)
        rimgs = rimgs[:config.recon_images]
        mc, logs = reconstruct(params, mc, rimgs, config, settings, progress)
        recon = {"num_images": int(rimgs.shape[0]),
                 "images_sha256": hashlib.sha256(rimgs.tobytes()).hexdigest(),
                 "units": [lg.to_dict() for lg in logs]}
    prov = dict(provenance or {})
    prov["calibration"] = calibration_record(config, imgs, mean, std, budget)
    if recon is not None:
        prov["calibration"]["reconstruction"] = recon
    return build_program(mc, settings, prov)


# ---- export -----------------------------------------------------------------------------------

def build_program(mc: ModelCalib, settings: dict[str, int], provenance: dict[str, Any]) -> Program:
    """The integer program of a calibrated ViT (the graph of the module docstring; validated,
    section 8 bounds asserted)."""
    b = ProgramBuilder(settings)
    H = W = mc.img_size
    T, D = mc.pos.shape
    hidden = mc.blocks[0].fc1.weight.w.shape[0] if mc.blocks else 4 * D
    C = mc.head.weight.w.shape[0]

    b.value("image", "image", 8, [3, H, W], 1.0, 0)
    b.value("patch_embed", "int", settings["residual_bits"], [T, D], mc.res0)
    patch_embed.export(b, "patch_embed", "image", mc.patch, mc.pos, mc.patch_size)
    r = "patch_embed"
    for i, bc in enumerate(mc.blocks):
        r = emit_block(b, f"blocks.{i}", r, bc, T, D, D, hidden,
                       lambda core, q, k, v, bc=bc: attention.export(b, core, q, k, v, mc.num_heads, bc.softmax))
    b.codes("norm", [1, D], mc.norm.act)
    layernorm.export(b, "norm", r, mc.norm, "first")
    b.value("head", "int", settings["logit_bits"], [1, C], mc.logit_scale)
    linear.export(b, "head", "norm", mc.head)

    model = {"arch": ARCH, "img_size": int(H), "patch_size": int(mc.patch_size), "embed_dim": int(D),
             "depth": len(mc.blocks), "num_heads": int(mc.num_heads), "num_classes": int(C),
             "num_tokens": int(T), "mlp_hidden": int(hidden), "ln_eps": float(mc.eps)}
    return export_program(b, model, provenance, "head")
