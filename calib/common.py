"""What the architecture drivers (:mod:`calib.vit`, :mod:`calib.swin`) and the reconstruction
stage (:mod:`calib.reconstruct`) share.

* conversions: :func:`np64` (torch -> float64 numpy), :func:`t32` (array -> float32 torch);
* input checks and the calibration record of the header: :func:`check_images`,
  :func:`method_name`, :func:`calibration_record`;
* the quantizers of a pre-norm transformer block (both architectures have the same block, only
  the attention differs): :func:`calibrate_ln` (post-LN calibration and MOSF / mean
  reparameterization), :func:`quantize_linear`, :func:`block_calib` (a block from what its
  observer saw);
* the fake-quant semantics of a calibrated block (``reference.fakequant.FakeQuantModel`` on the state
  itself): :func:`fake_quant`, :func:`quantized_block_params`, :func:`quantized_block_forward`;
* export: :func:`emit_block` (the values and ops of one block, spec sections 4.1, 4.3-4.6, each
  op's constants computed by its module ``intsim.ops.<type>.export``), :func:`check_bounds`
  (section 8 on every op, through the op registry) and :func:`export_program`.
"""
from __future__ import annotations

import hashlib
from typing import Any, Callable

import numpy as np
import torch

from intsim import ops
from intsim.ops import add, gelu, layernorm, linear
from intsim.program.builder import ProgramBuilder, check_settings
from intsim.program.program import Program
from reference.vit import BlockParams, block_forward, fake_quant_uniform

from . import reparam as rp
from . import softmax_search
from .config import CalibConfig
from .observers import Budget, point_rng
from .state import BlockCalib, LinearCalib, LNCalib
from .uniform import PERCENTILES, SHRINK, ActQuant, absmax_scale, quantize_weight, search_activation, search_channels

CHUNK = 32  # images per forward chunk


# ---- conversions and checks -------------------------------------------------------------------

def np64(t: torch.Tensor) -> np.ndarray:
    """A torch tensor as a float64 numpy array (detached)."""
    return t.detach().to(torch.float64).numpy()


def t32(a) -> torch.Tensor:
    """An array (or array-like) as a contiguous float32 torch tensor."""
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))


def subsample(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """At most ``k`` elements of ``x`` (flattened), drawn with replacement when there are more."""
    x = x.ravel()
    return x if x.size <= k else x[rng.integers(0, x.size, size=k)]


def check_images(images, img_size: int) -> np.ndarray:
    """Calibration images as a contiguous uint8 array (N, 3, img_size, img_size), or ``ValueError``."""
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


def method_name(config: CalibConfig) -> str:
    """The ``method`` line of the calibration record."""
    if config.reconstruct:
        return ("DopQ-ViT (TanQ + MOSF) + block reconstruction" if (config.softmax_quant, config.ln_rule)
                == ("tanq", "mosf") else "DopQ-ViT pipeline + block reconstruction, ablation")
    return ("DopQ-ViT (TanQ + MOSF), calibration only" if (config.softmax_quant, config.ln_rule) == ("tanq", "mosf")
            else "DopQ-ViT pipeline, ablation")


def calibration_record(config: CalibConfig, images: np.ndarray, mean, std, budget: Budget) -> dict[str, Any]:
    """The header's ``provenance.calibration``: the config, the method, the images (count and
    sha256), the input normalization, the searched percentiles / shrinks and the sample budget."""
    return {
        **config.to_dict(),
        "method": method_name(config),
        "num_images": int(images.shape[0]),
        "images_sha256": hashlib.sha256(images.tobytes()).hexdigest(),
        "mean": [float(m) for m in mean],
        "std": [float(s) for s in std],
        "activation_percentiles": list(PERCENTILES),
        "weight_shrink": list(SHRINK),
        "sample_budget": {"rows": budget.rows, "elements": budget.elements,
                          "softmax_images": budget.softmax_images, "softmax_rows": budget.softmax_rows},
    }


# ---- calibration of a block -------------------------------------------------------------------

def calibrate_ln(name: str, rows: np.ndarray, gamma, beta, consumers: list[tuple], bits: int, rule: str,
                 seed: int, budget: Budget) -> tuple[LNCalib, list[tuple[np.ndarray, np.ndarray]]]:
    """Per-channel calibration of a post-LN activation (rows (M, D)), shared quantizer by ``rule``,
    reparameterization of the LN affine and of the consumers ``[(W, b), ...]``, and a re-search of
    the per-tensor range of the reparameterized activation (the rule's own (s, z) is a candidate)."""
    s_c, z_c = search_channels(rows, bits)
    if rule == "channel":      # the fake-quant-only upper bound: no reparameterization, per-channel quantizer
        lins = [(np64(W), np64(b)) for W, b in consumers]
        return LNCalib(gamma=np64(gamma), beta=np64(beta), act=ActQuant(s_c, z_c, bits), reparam=None), lins
    r = rp.shared(s_c, z_c, rule)
    g2, b2 = rp.apply_ln(np64(gamma), np64(beta), r)
    lins = [rp.apply_linear(np64(W), np64(b), r) for W, b in consumers]
    sample = subsample(rp.transform(rows, r), budget.elements, point_rng(seed, name + "/reparam"))
    act = search_activation(sample, bits, extra=[(r.s, r.z)])
    return LNCalib(gamma=g2, beta=b2, act=act, reparam=r), lins


def quantize_linear(W, b, wbits: int) -> LinearCalib:
    """A linear layer (torch or numpy weight (N, K) and bias (N,)) with its weights quantized."""
    W = np64(W) if isinstance(W, torch.Tensor) else W
    b = np64(b) if isinstance(b, torch.Tensor) else b
    return LinearCalib(weight=quantize_weight(W, wbits), bias=np.asarray(b, np.float64))


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
        q=quantize_linear(*q, wb), k=quantize_linear(*k, wb), v=quantize_linear(*v, wb),
        q_act=search_activation(obs.sample_of(f"{pre}.attn.q"), ab),
        k_act=search_activation(obs.sample_of(f"{pre}.attn.k"), ab),
        v_act=search_activation(obs.sample_of(f"{pre}.attn.v"), ab),
        softmax=softmax_search.search(config.softmax_quant, ab, probs, vh, settings["prob_bits"]),
        core=search_activation(obs.sample_of(f"{pre}.attn.core"), ab),
        proj=quantize_linear(bp.proj_w, bp.proj_b, wb),
        res1=absmax_scale(obs.absmax[f"{pre}.add1"], settings["residual_bits"]),
        norm2=norm2,
        fc1=quantize_linear(*fc1, wb),
        fc1_scale=absmax_scale(obs.absmax[f"{pre}.mlp.fc1"], settings["gelu_bits"]),
        gelu=search_activation(obs.sample_of(f"{pre}.mlp.gelu"), ab),
        fc2=quantize_linear(bp.fc2_w, bp.fc2_b, wb),
        res2=absmax_scale(obs.absmax[f"{pre}.add2"], settings["residual_bits"]),
    )


# ---- fake-quant semantics of the calibration state --------------------------------------------

def fake_quant(x: torch.Tensor, a: ActQuant) -> torch.Tensor:
    """Quantize-dequantize by ``a``: per tensor, or per channel (last axis) when its scale is an array."""
    if isinstance(a.scale, np.ndarray):
        return fake_quant_uniform(x, t32(a.scale), t32(a.zero_point), a.bits)
    return fake_quant_uniform(x, a.scale, a.zero_point, a.bits)


def quantized_block_params(bc: BlockCalib) -> BlockParams:
    """Float32 block parameters of a calibrated block: dequantized weights, reparameterized LN affines."""
    return BlockParams(
        norm1_w=t32(bc.norm1.gamma), norm1_b=t32(bc.norm1.beta),
        q_w=t32(bc.q.weight.dequant()), q_b=t32(bc.q.bias), k_w=t32(bc.k.weight.dequant()), k_b=t32(bc.k.bias),
        v_w=t32(bc.v.weight.dequant()), v_b=t32(bc.v.bias),
        proj_w=t32(bc.proj.weight.dequant()), proj_b=t32(bc.proj.bias),
        norm2_w=t32(bc.norm2.gamma), norm2_b=t32(bc.norm2.beta),
        fc1_w=t32(bc.fc1.weight.dequant()), fc1_b=t32(bc.fc1.bias),
        fc2_w=t32(bc.fc2.weight.dequant()), fc2_b=t32(bc.fc2.bias))


def block_acts(bc: BlockCalib, pre: str) -> dict[str, ActQuant]:
    """The uniform activation quantizers of a calibrated block by point name."""
    return {f"{pre}.norm1": bc.norm1.act, f"{pre}.attn.q": bc.q_act, f"{pre}.attn.k": bc.k_act,
            f"{pre}.attn.v": bc.v_act, f"{pre}.attn.core": bc.core, f"{pre}.norm2": bc.norm2.act,
            f"{pre}.mlp.gelu": bc.gelu}


def quantized_block_forward(bc: BlockCalib, r: torch.Tensor, index: int, heads: int, eps: float,
                            tap=None) -> torch.Tensor:
    """Fake-quant forward of a calibrated ViT block (the semantics of ``reference.fakequant.FakeQuantModel``):
    dequantized weights, reparameterized LN affines, quantize-dequantize at every quantized point.
    ``tap(name, tensor)`` (optional) observes the integer-valued points as in ``block_forward``."""
    bp = quantized_block_params(bc)
    pre = f"blocks.{index}"
    acts = block_acts(bc, pre)

    def hook(name: str, x: torch.Tensor) -> torch.Tensor:
        if name == f"{pre}.attn.probs":
            return bc.softmax.quantize_torch(x)
        return fake_quant(x, acts[name])

    extra = () if tap is None else (tap,)
    return torch.cat([block_forward(bp, r[s:s + CHUNK], index, heads, eps, hook, *extra)
                      for s in range(0, r.shape[0], CHUNK)])


# ---- export -----------------------------------------------------------------------------------

def emit_block(b: ProgramBuilder, pre: str, r: str, bc: BlockCalib, T: int, D: int, A: int, hidden: int,
               attention: Callable[[str, str, str, str], None]) -> str:
    """Values and ops of one transformer block (spec 4.1, 4.3-4.6) reading the residual value ``r``
    (T tokens, D channels; q/k/v and the attention output have A channels, the MLP ``hidden``);
    ``attention(core, q, k, v)`` emits the attention op. Returns the block's output value name."""
    R, g = b.s["residual_bits"], b.s["gelu_bits"]
    n1, q, k, v = f"{pre}.norm1", f"{pre}.attn.q", f"{pre}.attn.k", f"{pre}.attn.v"
    core, proj, add1 = f"{pre}.attn.core", f"{pre}.attn.proj", f"{pre}.add1"
    n2, fc1, ge, fc2, add2 = f"{pre}.norm2", f"{pre}.mlp.fc1", f"{pre}.mlp.gelu", f"{pre}.mlp.fc2", f"{pre}.add2"
    b.codes(n1, [T, D], bc.norm1.act)
    layernorm.export(b, n1, r, bc.norm1, "all")
    for name, lin, act in ((q, bc.q, bc.q_act), (k, bc.k, bc.k_act), (v, bc.v, bc.v_act)):
        b.codes(name, [T, A], act)
        linear.export(b, name, n1, lin)
    b.codes(core, [T, A], bc.core)
    attention(core, q, k, v)
    b.value(proj, "int", R, [T, D], bc.res1)
    linear.export(b, proj, core, bc.proj)
    b.value(add1, "int", R, [T, D], bc.res1)
    add.export(b, add1, proj, r)
    b.codes(n2, [T, D], bc.norm2.act)
    layernorm.export(b, n2, add1, bc.norm2, "all")
    b.value(fc1, "int", g, [T, hidden], bc.fc1_scale)
    linear.export(b, fc1, n2, bc.fc1)
    b.codes(ge, [T, hidden], bc.gelu)
    gelu.export(b, ge, fc1)
    b.value(fc2, "int", R, [T, D], bc.res2)
    linear.export(b, fc2, ge, bc.fc2)
    b.value(add2, "int", R, [T, D], bc.res2)
    add.export(b, add2, fc2, add1)
    return add2


def check_bounds(prog: Program) -> None:
    """Assert every bound of section 8 on the constants of a program (raises ``ExportError``): the
    settings, then each op by its module's ``check_bounds``."""
    check_settings(prog.settings)
    for op in prog.ops:
        ops.get(op["type"]).check_bounds(prog, op)


def export_program(b: ProgramBuilder, model: dict[str, Any], provenance: dict[str, Any], output: str) -> Program:
    """The program of a filled builder (:meth:`ProgramBuilder.build`), its bounds asserted."""
    prog = b.build(model, provenance, output)
    check_bounds(prog)
    return prog
