"""DopQ-ViT calibration of timm Swin Transformers and their export to an integer program.

The driver mirrors :mod:`calib.vit` (same quantizers, searches, budgets and sequential
fake-quant propagation); the Swin graph (``docs/integer-spec.md`` section 9) differs in

* the stem: ``patchify`` (layout) -> ``linear`` (patch convolution, ``int`` out) -> ``layernorm``
  (``patch_embed.norm``, ``int`` out = the first residual; it feeds no linear layer, so it has no
  post-LN quantizer and no reparameterization);
* the patch merging of every stage but the first: ``patch_merge`` (layout) -> ``layernorm``
  (MOSF / mean reparameterized into the reduction) -> ``linear`` (reduction, ``int`` out);
* ``window_attention`` instead of ``attention``: the post-softmax quantizer (TanQ by default) is
  searched on sampled windows; the relative position bias table is quantized into the integer
  score domain, ``bias = rnd(table * sqrt(d) * 2^F / (s_q s_k))`` with the largest ``F`` in
  0..``MAX_SCORE_FRAC`` whose worst-case score fits the accumulator (:func:`quantize_bias`), and
  the sequential fake-quant forward uses that quantized bias and exact-zero masked probabilities;
* the head: final ``layernorm`` (all tokens, ``int`` out) -> ``token_pool`` (mean over tokens,
  ``codes`` out = head input) -> ``linear`` (head). The MOSF reparameterization of the final
  LayerNorm is calibrated on the pooled features (pooling is per channel, so the reparameterized
  pool equals the pool of the reparameterized LayerNorm).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from intsim.ops import layernorm, linear, patch_merge, patchify, token_pool, window_attention
from intsim.program import quantizers as Q
from intsim.program.builder import ProgramBuilder
from intsim.program.fixedpoint import ExportError
from intsim.program.program import Program
from intsim.program.quantizers import SoftmaxQuantizer
from reference import swin as S
from reference.vit import layer_norm

from . import reparam as rp
from .common import (CHUNK, block_acts, block_calib, calibrate_ln, calibration_record, check_images, emit_block,
                     export_program, fake_quant, np64, quantize_linear, quantized_block_params, t32)
from .config import CalibConfig
from .observers import BlockObserver, Budget, point_rng
from .state import BlockCalib, LinearCalib, LNCalib
from .uniform import ActQuant, absmax_scale, search_channels

#: The program header's ``model.arch`` (the name of this architecture in :mod:`calib.archs`).
ARCH = "swin"
#: Largest number of fractional bits of the integer window-attention scores (bias resolution).
MAX_SCORE_FRAC = 8
#: Windows kept per sampled image for the post-softmax search.
SOFTMAX_WINDOWS = 8


# ---- calibration results ---------------------------------------------------------------------

@dataclass
class SwinBlockCalib:
    base: BlockCalib
    heads: int
    window: int
    shift: int
    grid: tuple[int, int]
    score_frac: int
    bias: np.ndarray          # (H, (2ws-1)^2) int64, the integer score bias table


@dataclass
class MergeCalib:
    norm: LNCalib
    reduction: LinearCalib
    res: float                # scale of the reduction output (the stage's first residual)
    grid: tuple[int, int]     # grid before merging


@dataclass
class SwinCalib:
    img_size: int
    patch_size: int
    eps: float
    patch: LinearCalib
    patch_scale: float        # scale of the patch convolution output (int)
    pnorm: LNCalib            # patch_embed.norm (act / reparam unused)
    res0: float
    merges: list[MergeCalib | None]
    stages: list[list[SwinBlockCalib]]
    dims: list[int]
    grids: list[tuple[int, int]]
    norm: LNCalib             # final LayerNorm, reparameterized on the pooled features; act = pooled quantizer
    norm_scale: float         # scale of the final LayerNorm output (int)
    head: LinearCalib
    logit_scale: float
    mlp_hidden: list[int]


# ---- the relative position bias in the integer score domain ------------------------------------

def quantize_bias(table: np.ndarray, s_q: float, s_k: float, zp_q: int, zp_k: int, abits: int, d: int,
                  acc_bits: int) -> tuple[int, np.ndarray]:
    """(F, bias (H, R) int64) for a float table (R, H) (timm's layout).

    The integer score is ``2^F * sum (q - zq)(k - zk) + bias`` in units of ``s_q s_k 2^-F / sqrt(d)``.
    F is the largest value in 0..MAX_SCORE_FRAC with ``2^F d qmax kmax + max|bias| <= 2^(A-1) - 1``
    (qmax, kmax the largest centered codes), so the scores cannot saturate; at F = 0 it is only
    required that ``|bias| < 2^(A-1)``.
    """
    n = (1 << abits) - 1
    qmax, kmax = max(zp_q, n - zp_q), max(zp_k, n - zp_k)
    lim = (1 << (acc_bits - 1)) - 1
    t = np.asarray(table, np.float64).T
    for F in range(MAX_SCORE_FRAC, -1, -1):
        bias = Q.rnd(t * math.sqrt(d) * 2.0 ** F / (s_q * s_k))
        if not np.all(np.isfinite(bias)):
            continue
        big = int(np.abs(bias).max(initial=0))
        if (1 << F) * d * qmax * kmax + big <= lim:
            return F, bias.astype(np.int64)
    if big > lim:
        raise ExportError(f"relative position bias {big} does not fit the {acc_bits}-bit accumulator")
    return 0, bias.astype(np.int64)


def dequant_bias(sb: S.SwinBlockParams, bias: np.ndarray, F: int, s_q: float, s_k: float, d: int) -> torch.Tensor:
    """(H, n, n) float32 bias of the integer table, for the fake-quant forward."""
    unit = s_q * s_k * 2.0 ** -F / math.sqrt(d)
    n = sb.window * sb.window
    t = torch.from_numpy(bias.astype(np.float64) * unit)
    return t[:, sb.rel_index.reshape(-1)].reshape(-1, n, n).to(torch.float32)


# ---- observers ------------------------------------------------------------------------------

class WindowObserver(BlockObserver):
    """:class:`calib.observers.BlockObserver` for a Swin block: the post-softmax sample is taken from
    ``SOFTMAX_WINDOWS`` windows (seeded) of the sampled images, ``softmax_rows`` query rows each;
    the probabilities arrive as (B, nW, H, n, n) and v is windowed through the block's token table."""

    def __init__(self, prefix: str, n_images: int, sb: S.SwinBlockParams, seed: int, budget: Budget | None = None):
        nW, n = sb.tokens.shape
        super().__init__(0, n_images, n, sb.heads, seed, budget)
        self.prefix = prefix
        self.tokens = sb.tokens
        self._rngs = {}
        r = point_rng(seed, f"{prefix}.attn.probs")
        k = min(n_images, self.budget.softmax_images)
        self.sm_images = np.sort(r.choice(n_images, size=k, replace=False))
        self.sm_windows = np.sort(r.choice(nW, size=min(nW, SOFTMAX_WINDOWS), replace=False))
        self.sm_rows = np.sort(r.choice(n, size=min(n, self.budget.softmax_rows), replace=False))

    def hook(self, name: str, x: torch.Tensor) -> torch.Tensor:
        if name != f"{self.prefix}.attn.probs":
            return super().hook(name, x)
        off, size = self._chunk
        local = [i - off for i in self.sm_images if off <= i < off + size]
        if local:
            li = torch.tensor(local)
            wi = torch.from_numpy(self.sm_windows)
            B, nW, H, n, _ = x.shape
            self.probs.append(x[li][:, wi][:, :, :, torch.from_numpy(self.sm_rows)].reshape(-1, H, len(self.sm_rows), n)
                              .clone())
            v = self._v_chunk
            D = v.shape[-1]
            vw = v[:, self.tokens.reshape(-1)].reshape(v.shape[0], nW, n, H, D // H).permute(0, 1, 3, 2, 4)
            self.v.append(vw[li][:, wi].reshape(-1, H, n, D // H).clone())
        return x


# ---- calibration ------------------------------------------------------------------------------

def _acts_hook(acts: dict[str, ActQuant], probs_name: str, sq: SoftmaxQuantizer | None):
    def hook(name: str, x: torch.Tensor) -> torch.Tensor:
        if name == probs_name:
            return sq.quantize_torch(x)
        a = acts.get(name)
        return x if a is None else fake_quant(x, a)
    return hook


def calibrate_block(sb: S.SwinBlockParams, r: torch.Tensor, pre: str, grid: tuple[int, int], eps: float,
                    config: CalibConfig, settings: dict[str, int], budget: Budget) -> tuple[SwinBlockCalib, torch.Tensor]:
    """Calibrate one Swin block from its input ``r`` (N, T, C); returns it and its float output."""
    N = r.shape[0]
    bp = sb.p
    obs = WindowObserver(pre, N, sb, config.seed, budget)
    outs = []
    for s in range(0, N, CHUNK):
        obs.start_chunk(s, min(CHUNK, N - s))
        outs.append(S.block_forward(sb, r[s:s + CHUNK], pre, eps, obs.hook, obs.tap))
    out = torch.cat(outs)
    bc = block_calib(obs, bp, pre, config, settings, budget)
    q_act, k_act = bc.q_act, bc.k_act
    d = bp.q_w.shape[0] // sb.heads
    F, bias = quantize_bias(sb.rpb_table.double().numpy(), q_act.scale, k_act.scale, q_act.zero_point,
                            k_act.zero_point, settings["abits"], d, settings["acc_bits"])
    return SwinBlockCalib(base=bc, heads=sb.heads, window=sb.window, shift=sb.shift, grid=grid, score_frac=F,
                          bias=bias), out


def quantized_block_forward(sc: SwinBlockCalib, sb: S.SwinBlockParams, r: torch.Tensor, pre: str,
                            eps: float) -> torch.Tensor:
    """Fake-quant forward of a calibrated Swin block (the semantics of ``reference.fakequant.FakeQuantModel``)."""
    bc = sc.base
    p = quantized_block_params(bc)
    qsb = replace(sb, p=p)
    d = p.q_w.shape[0] // sb.heads
    bias = dequant_bias(sb, sc.bias, sc.score_frac, bc.q_act.scale, bc.k_act.scale, d)
    hook = _acts_hook(block_acts(bc, pre), f"{pre}.attn.probs", bc.softmax)
    return torch.cat([S.block_forward(qsb, r[s:s + CHUNK], pre, eps, hook, bias=bias, mask_value=float("-inf"))
                      for s in range(0, r.shape[0], CHUNK)])


def _sample_rows(chunks: list[torch.Tensor], total: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """About ``k`` random rows (M, D) float64 from row chunks holding ``total`` rows in all."""
    out = []
    for c in chunks:
        flat = c.reshape(-1, c.shape[-1])
        m = min(flat.shape[0], int(math.ceil(k * flat.shape[0] / total)))
        idx = np.sort(rng.choice(flat.shape[0], size=m, replace=False))
        out.append(flat[torch.from_numpy(idx)].double().numpy())
    return np.concatenate(out)


def calibrate_merge(mp: S.MergeParams, r: torch.Tensor, pre: str, grid: tuple[int, int], eps: float,
                    config: CalibConfig, settings: dict[str, int], budget: Budget,
                    sequential: bool) -> tuple[MergeCalib, torch.Tensor]:
    """Patch merging: MOSF / mean on the merge LayerNorm output into the reduction; returns the next residual."""
    wb, ab = settings["wbits"], settings["abits"]
    N = r.shape[0]
    ys, absmax = [], 0.0
    for s in range(0, N, CHUNK):
        y = layer_norm(S.merge_tokens(r[s:s + CHUNK], mp.src), mp.norm_w, mp.norm_b, eps)
        ys.append(y)
        o = torch.nn.functional.linear(y, mp.red_w, mp.red_b)
        absmax = max(absmax, float(o.abs().max()))
    total = sum(y.shape[0] * y.shape[1] for y in ys)
    rows = _sample_rows(ys, total, budget.rows, point_rng(config.seed, f"{pre}.norm"))
    norm, ((W, b),) = calibrate_ln(f"{pre}.norm", rows, mp.norm_w, mp.norm_b, [(mp.red_w, mp.red_b)], ab,
                                   config.ln_rule, config.seed, budget)
    red = quantize_linear(W, b, wb)
    mc = MergeCalib(norm=norm, reduction=red, res=absmax_scale(absmax, settings["residual_bits"]), grid=grid)
    if not sequential:
        return mc, torch.cat([torch.nn.functional.linear(y, mp.red_w, mp.red_b) for y in ys])
    g, be, a = t32(norm.gamma), t32(norm.beta), norm.act
    Wq, bq = t32(red.weight.dequant()), t32(red.bias)
    outs = []
    for s in range(0, N, CHUNK):
        y = layer_norm(S.merge_tokens(r[s:s + CHUNK], mp.src), g, be, eps)
        outs.append(torch.nn.functional.linear(fake_quant(y, a), Wq, bq))
    return mc, torch.cat(outs)


def calibrate_params(params: S.SwinParams, images: np.ndarray, config: CalibConfig, settings: dict[str, int],
                     progress: bool = True, budget: Budget | None = None) -> SwinCalib:
    budget = budget or Budget()
    N = images.shape[0]
    wb, ab, R = settings["wbits"], settings["abits"], settings["residual_bits"]
    D0 = params.embed_dim
    patch = quantize_linear(params.patch_w.reshape(D0, -1), params.patch_b, wb)
    ep = params
    if config.sequential:
        ep = replace(params, patch_w=t32(patch.weight.dequant()).reshape(params.patch_w.shape))
    absmax = {"patch_embed.proj": 0.0}

    def tap(name, x):
        if name == "patch_embed.proj":
            absmax[name] = max(absmax[name], float(x.abs().max()))

    r = torch.cat([S.embed(ep, images[s:s + CHUNK], tap) for s in range(0, N, CHUNK)])
    pnorm = LNCalib(gamma=np64(params.pnorm_w), beta=np64(params.pnorm_b), act=None, reparam=None)
    patch_scale = absmax_scale(absmax["patch_embed.proj"], R)
    res0 = absmax_scale(float(r.abs().max()), R)
    merges, stages = [], []
    nblocks = sum(len(st.blocks) for st in params.stages) + sum(st.merge is not None for st in params.stages)
    bar = tqdm(total=nblocks, desc="calibrating", unit="block", disable=not progress, leave=False)
    grid = params.grid0
    for s, st in enumerate(params.stages):
        mc = None
        if st.merge is not None:
            mc, r = calibrate_merge(st.merge, r, f"layers.{s}.downsample", grid, params.eps, config, settings, budget,
                                    config.sequential)
            bar.update(1)
        merges.append(mc)
        grid = st.grid
        blocks = []
        for j, sb in enumerate(st.blocks):
            pre = f"layers.{s}.blocks.{j}"
            sc, out = calibrate_block(sb, r, pre, grid, params.eps, config, settings, budget)
            r = quantized_block_forward(sc, sb, r, pre, params.eps) if config.sequential else out
            blocks.append(sc)
            bar.update(1)
        stages.append(blocks)
    bar.close()
    # head: final LayerNorm (all tokens), average pool, classifier
    pooled, logits, lnmax = [], [], 0.0
    for s in range(0, N, CHUNK):
        y = layer_norm(r[s:s + CHUNK], params.norm_w, params.norm_b, params.eps)
        pooled.append(y.mean(dim=1))
    pooled = torch.cat(pooled)
    logits = torch.nn.functional.linear(pooled, params.head_w, params.head_b)
    norm, ((hw, hb),) = calibrate_ln("head.pool", np64(pooled), params.norm_w, params.norm_b,
                                     [(params.head_w, params.head_b)], ab, config.ln_rule, config.seed, budget)
    g2, b2 = t32(norm.gamma), t32(norm.beta)
    for s in range(0, N, CHUNK):
        lnmax = max(lnmax, float(layer_norm(r[s:s + CHUNK], g2, b2, params.eps).abs().max()))
    return SwinCalib(
        img_size=params.img_size, patch_size=params.patch_size, eps=params.eps, patch=patch, patch_scale=patch_scale,
        pnorm=pnorm, res0=res0, merges=merges, stages=stages, dims=[st.dim for st in params.stages],
        grids=[st.grid for st in params.stages], norm=norm, norm_scale=absmax_scale(lnmax, R),
        head=quantize_linear(hw, hb, wb), logit_scale=absmax_scale(float(logits.abs().max()), settings["logit_bits"]),
        mlp_hidden=[int(st.blocks[0].p.fc1_w.shape[0]) if st.blocks else 4 * st.dim for st in params.stages])


def calibrate(model, images, mean, std, config: CalibConfig | None = None, provenance: dict | None = None,
              progress: bool = True, recon_images=None) -> Program:
    """Post-training quantization (DopQ-ViT) of a timm ``SwinTransformer`` into an integer program
    (called through :func:`calib.calibrate`, which documents the arguments). Swin has no
    reconstruction stage (``calib.calibrate`` refuses ``config.reconstruct``), so ``recon_images``
    is unused."""
    config = config or CalibConfig()
    settings = config.resolved_settings()
    model.eval()
    with torch.no_grad():
        params = S.params_from_timm(model, mean, std)
        imgs = check_images(images, params.img_size)
        budget = Budget()
        sc = calibrate_params(params, imgs, config, settings, progress, budget)
    prov = dict(provenance or {})
    rec = calibration_record(config, imgs, mean, std, budget)
    rec["sample_budget"]["softmax_windows"] = SOFTMAX_WINDOWS
    rec["max_score_frac"] = MAX_SCORE_FRAC
    prov["calibration"] = rec
    return build_program(sc, settings, prov)


# ---- export ---------------------------------------------------------------------------------------

def emit_window_attention(b: ProgramBuilder, name: str, q: str, k: str, v: str, sc: SwinBlockCalib) -> None:
    """The ``window_attention`` op of a calibrated block (spec 9.3), with the window geometry of
    ``reference.swin`` (the same table functions drive the float model)."""
    Hg, Wg = sc.grid
    ws, sh = sc.window, sc.shift
    window_attention.export(b, name, q, k, v, heads=sc.heads, sq=sc.base.softmax, score_frac=sc.score_frac,
                            bias_table=sc.bias, window=ws, cyclic_shift=sh, grid=sc.grid,
                            tokens=S.window_tokens(Hg, Wg, ws, sh), rel_index=S.relative_index(ws),
                            mask=S.shift_mask(Hg, Wg, ws, sh))


def build_program(mc: SwinCalib, settings: dict[str, int], provenance: dict[str, Any]) -> Program:
    """The integer program of a calibrated Swin model (spec section 9; validated, bounds asserted)."""
    R = settings["residual_bits"]
    b = ProgramBuilder(settings)
    Hi = mc.img_size
    p = mc.patch_size
    Hg, Wg = Hi // p, Hi // p
    P = Hg * Wg
    D0 = mc.patch.weight.w.shape[0]
    C = mc.head.weight.w.shape[0]

    b.value("image", "image", 8, [3, Hi, Hi], 1.0, 0)
    patchify.export(b, "patch_embed.patchify", "image", p)
    b.value("patch_embed.proj", "int", R, [P, D0], mc.patch_scale)
    linear.export(b, "patch_embed.proj", "patch_embed.patchify", mc.patch)
    b.value("patch_embed.norm", "int", R, [P, D0], mc.res0)
    layernorm.export(b, "patch_embed.norm", "patch_embed.proj", mc.pnorm, "all")
    r = "patch_embed.norm"
    grid = (Hg, Wg)
    for si, blocks in enumerate(mc.stages):
        mg = mc.merges[si]
        D = mc.dims[si]
        if mg is not None:
            pre = f"layers.{si}.downsample"
            merged, norm, red = f"{pre}.merge", f"{pre}.norm", f"{pre}.reduction"
            patch_merge.export(b, merged, r, grid, S.merge_sources(*grid))
            T2, C4 = b.values[merged]["shape"]
            b.codes(norm, [T2, C4], mg.norm.act)
            layernorm.export(b, norm, merged, mg.norm, "all")
            b.value(red, "int", R, [T2, D], mg.res)
            linear.export(b, red, norm, mg.reduction)
            r = red
        grid = mc.grids[si]
        T = grid[0] * grid[1]
        hidden = mc.mlp_hidden[si]
        for j, sc in enumerate(blocks):
            bc = sc.base
            r = emit_block(b, f"layers.{si}.blocks.{j}", r, bc, T, D, bc.q.weight.w.shape[0], hidden,
                           lambda core, q, k, v, sc=sc: emit_window_attention(b, core, q, k, v, sc))

    T = grid[0] * grid[1]
    D = b.values[r]["shape"][-1]
    b.value("norm", "int", R, [T, D], mc.norm_scale)
    layernorm.export(b, "norm", r, mc.norm, "all")
    b.codes("head.pool", [1, D], mc.norm.act)
    token_pool.export(b, "head.pool", "norm")
    b.value("head", "int", settings["logit_bits"], [1, C], mc.logit_scale)
    linear.export(b, "head", "head.pool", mc.head)

    depths = [len(bl) for bl in mc.stages]
    heads = [bl[0].heads if bl else 0 for bl in mc.stages]
    model = {"arch": ARCH, "img_size": int(Hi), "patch_size": int(p), "embed_dim": int(D0),
             "depths": depths, "depth": int(sum(depths)), "num_heads": heads,
             "window_size": [bl[0].window if bl else 0 for bl in mc.stages],
             "dims": [int(x) for x in mc.dims], "grids": [[int(a), int(c)] for a, c in mc.grids],
             "num_classes": int(C), "num_tokens": int(T), "mlp_hidden": [int(h) for h in mc.mlp_hidden],
             "ln_eps": float(mc.eps)}
    return export_program(b, model, provenance, "head")


def reparameterize(params: S.SwinParams, images, bits: int, rule: str) -> tuple[S.SwinParams, dict]:
    """Reparameterize every post-LayerNorm quantizer of a float Swin model (as
    :func:`calib.reparam.reparameterize` for ViTs): ``norm1`` -> q/k/v, ``norm2`` -> fc1, every
    ``downsample.norm`` -> reduction, and the final LayerNorm -> head through the pool (calibrated
    on the pooled features). Returns new float32 parameters whose float output equals the
    original's, and the per-point :class:`calib.reparam.Reparam`."""
    rows: dict[str, np.ndarray] = {}

    def record(name, x):
        if name.endswith((".norm1", ".norm2", "downsample.norm")) or name == "head.pool":
            rows[name] = x.reshape(-1, x.shape[-1]).double().numpy()
        return x

    S.forward(params, images, hook=record)
    out = copy.deepcopy(params)
    reps = {}

    def fold(name, ln_w, ln_b, consumers):
        r = rp.shared(*search_channels(rows[name], bits), rule)
        reps[name] = r
        g, b = rp.apply_ln(ln_w.double().numpy(), ln_b.double().numpy(), r)
        lins = [rp.apply_linear(W.double().numpy(), bb.double().numpy(), r) for W, bb in consumers]
        return (t32(g), t32(b)), [(t32(W), t32(bb)) for W, bb in lins]

    for s, st in enumerate(out.stages):
        if st.merge is not None:
            mp = st.merge
            (mp.norm_w, mp.norm_b), [(mp.red_w, mp.red_b)] = fold(f"layers.{s}.downsample.norm", mp.norm_w, mp.norm_b,
                                                                  [(mp.red_w, mp.red_b)])
        for j, sb in enumerate(st.blocks):
            bp, pre = sb.p, f"layers.{s}.blocks.{j}"
            (bp.norm1_w, bp.norm1_b), [(bp.q_w, bp.q_b), (bp.k_w, bp.k_b), (bp.v_w, bp.v_b)] = fold(
                f"{pre}.norm1", bp.norm1_w, bp.norm1_b, [(bp.q_w, bp.q_b), (bp.k_w, bp.k_b), (bp.v_w, bp.v_b)])
            (bp.norm2_w, bp.norm2_b), [(bp.fc1_w, bp.fc1_b)] = fold(f"{pre}.norm2", bp.norm2_w, bp.norm2_b,
                                                                    [(bp.fc1_w, bp.fc1_b)])
    (out.norm_w, out.norm_b), [(out.head_w, out.head_b)] = fold("head.pool", out.norm_w, out.norm_b,
                                                                [(out.head_w, out.head_b)])
    return out, reps
