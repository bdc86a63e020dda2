"""Block-wise output reconstruction (BRECQ-style), an optional stage after calibration.

After :func:`calib.vit.calibrate_params`, every unit of the model is tuned in turn so that
its fake-quant output matches the float model's output on the reconstruction images:

* the **patch embedding**, layer-wise: its weight rounding, against the float embedding output;
* each **transformer block**, in order, from the fake-quant output of the already reconstructed
  units (so later blocks correct the accumulated error), against the float model's output of
  that block (the float path from the float input: BRECQ's "asymmetric" reconstruction);
* the final **LayerNorm + head**, layer-wise, against the float logits.

Each unit is tuned in three stages, each with its own Adam optimizer (the lineage's order):

1. **activations**, with float weights: the scale of every uniform activation quantizer of the
   unit (post-LN shared scales, q, k, v, attention output, GELU output), LSQ-style: the scale is
   ``s0 * exp(theta)`` and the gradient goes through a straight-through round-half-up. Zero
   points stay the calibrated integers. The post-softmax quantizer (TanQ angles...) is kept, with a
   straight-through gradient for the layers before it;
2. **post-LayerNorm reparameterization** (MOSF), with float weights: the per-channel scales
   ``s_c`` of each post-LN point (``s_c0 * exp(theta_c)``); the shared scale, the integer zero
   points and the rule stay, and the ratios ``r1 = s_c / s`` are refolded into the LN affine and
   the consumer linear layers exactly as :mod:`calib.reparam` does (float output unchanged);
3. **weights**: the reparameterized weights are quantized again (:func:`calib.uniform.quantize_weight`,
   the same per-channel clipping search as calibration) and each weight then chooses its rounding
   (AdaRound): ``w = clamp(floor(W / s) + h(V) + z, 0, 2^b - 1) - z`` with the rectified sigmoid
   ``h(V) = clamp(1.2 sigmoid(V) - 0.1, 0, 1)`` initialized to the fractional part, and the
   regularizer ``lambda * mean(1 - |2h - 1|^beta)`` switched on after 20% of the iterations with
   beta annealed from 20 to 2. At the end ``h`` is hardened to ``V >= 0``.

Why AdaRound rather than a straight-through estimator on the weights: every exported code is the
floor or the ceiling of the calibrated code, so the bound ``|w| <= 2^b - 1`` holds by construction,
the per-channel scales (and with them every multiplier of the program) are the calibrated ones, and
the regularizer drives each weight to a hard decision before export, so what was optimized is what
is exported (an STE's latent weights keep moving across rounding boundaries up to the last step).

**Guard.** After every stage the unit's error is measured with the exact fake-quant semantics
(:func:`calib.common.quantized_block_forward`) on all reconstruction images; a stage that did
not lower it is undone. So reconstruction never makes a unit worse on the data it was given.

The loss is the relative squared error ``mean((out - target)^2) / mean(target^2)`` of the unit's
output (the residual stream after the block, the embedding, the logits). After a block is done,
its integer-valued scales (residuals, GELU input) are widened if the reconstruction images need it
(``max`` of the calibrated and the new ``absmax`` scale, never narrower).

The result is an ordinary :class:`calib.state.ModelCalib`: only numbers change (weight codes,
activation scales, the LN affine and the consumer weights of the reparameterization), and the
exporter asserts every bound as always.

**Defaults and cost** (``calib.config.RECON_DEFAULTS``): 256 images, 500 steps per unit
(125 activations, 125 MOSF, 250 rounding), batch 16, learning rate 0.3 for the rounding variables
(0.03 for the log-scales), regularizer weight 1. The BRECQ lineage uses 1,024 images and 20,000
steps per block at batch 32; these defaults were chosen so that the bundled 6-block ViT (65 tokens)
reconstructs in about 5 minutes of one CPU core (about 43 s per block); a step costs about 0.08 s
there and 0.33 s for a DeiT-T block (197 tokens), so DeiT-T at 224 pixels with the defaults
takes about 36 minutes. With a fixed cost, more steps at batch 16 beat fewer steps at batch 32.

**Determinism**: batches are drawn from ``torch.Generator`` seeded by ``config.seed`` and the unit's
name, and the stage runs single-threaded (CPU GEMM results can depend on the thread count), so
the same inputs and config give the same program bytes on the same machine.
"""
from __future__ import annotations

import math
import time
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from intsim.program.quantizers import SoftmaxQuantizer
from reference.vit import BlockParams, ViTParams, block_forward, embed, fake_quant_uniform, layer_norm

from . import reparam as rp
from .common import CHUNK, np64, quantized_block_forward, t32
from .state import BlockCalib, LinearCalib, LNCalib, ModelCalib
from .uniform import SHRINK, ActQuant, WeightQuant, absmax_scale, params_from_range, quantize_weight

ZETA, GAMMA = 1.1, -0.1          # rectified sigmoid stretch (AdaRound)
REG_WEIGHT = 1.0                 # lambda of the rounding regularizer (the loss is a relative error)
REG_WARMUP = 0.2                 # fraction of the weight stage without regularizer
BETA = (20.0, 2.0)               # annealing of the regularizer's exponent
STAGE_SPLIT = (0.25, 0.25, 0.5)  # fractions of recon_iters: activations, MOSF, weights
SCALE_LR_RATIO = 0.1             # learning rate of log-scales = recon_lr * this
EVAL_CHUNK = 64


# ---- small pieces ---------------------------------------------------------------------

@contextmanager
def single_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _rng(seed: int, name: str) -> torch.Generator:
    return torch.Generator().manual_seed(((int(seed) & 0xFFFFFFFF) << 32) | zlib.crc32(name.encode()))


class _LSQ(torch.autograd.Function):
    """``y = s (clamp(floor(x/s + 1/2) + z, 0, n) - z)`` with the straight-through round:
    ``dy/dx = 1`` inside the range (0 outside), ``dy/ds = (q - z) - x/s`` inside, ``q - z`` outside
    (LSQ). One fused pass each way instead of a chain of autograd element-wise ops."""

    @staticmethod
    def forward(ctx, x, scale, zero_point: int, n: int):
        v = x / scale
        r = torch.floor(v + 0.5).add_(zero_point)
        inside = (r >= 0) & (r <= n)
        qz = r.clamp_(0, n).sub_(zero_point)          # q - z
        ctx.save_for_backward(inside, qz, v)
        return qz * scale

    @staticmethod
    def backward(ctx, g):
        inside, qz, v = ctx.saved_tensors
        gx = g * inside if ctx.needs_input_grad[0] else None
        gs = None
        if ctx.needs_input_grad[1]:
            gs = (g * torch.where(inside, qz - v, qz)).sum()
        return gx, gs, None, None


def fq_lsq(x: torch.Tensor, scale: torch.Tensor, zero_point: int, bits: int) -> torch.Tensor:
    """Differentiable fake quantization (LSQ): gradients to ``x`` inside the range and to ``scale``
    (a 0-dim tensor). Forward values equal ``reference.vit.fake_quant_uniform`` up to the float32
    rounding of ``scale``."""
    return _LSQ.apply(x, scale, int(zero_point), (1 << int(bits)) - 1)


def rel_err(out: torch.Tensor, target: torch.Tensor, norm: float) -> torch.Tensor:
    return ((out - target) ** 2).mean() / norm


class _Act:
    """A learnable per-tensor activation quantizer: scale ``s0 * exp(theta)``, fixed integer zero point."""

    def __init__(self, aq: ActQuant):
        self.aq = aq
        self.theta = torch.zeros((), dtype=torch.float32, requires_grad=True)

    def scale(self) -> torch.Tensor:
        return float(self.aq.scale) * torch.exp(self.theta)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return fq_lsq(x, self.scale(), self.aq.zero_point, self.aq.bits)

    def result(self) -> ActQuant:
        return ActQuant(scale=float(self.aq.scale * math.exp(float(self.theta.detach()))),
                        zero_point=self.aq.zero_point, bits=self.aq.bits)


class _LN:
    """A learnable post-LN reparameterization: per-channel ``s_c = s_c0 * exp(theta)``, the rest fixed."""

    def __init__(self, gamma, beta, ln: LNCalib, consumers: list[tuple[torch.Tensor, torch.Tensor]]):
        self.gamma = np.asarray(np64(gamma) if isinstance(gamma, torch.Tensor) else gamma, np.float64)
        self.beta = np.asarray(np64(beta) if isinstance(beta, torch.Tensor) else beta, np.float64)
        self.ln = ln
        self.consumers = [(np64(W), np64(b)) for W, b in consumers]
        self.theta = torch.zeros(self.gamma.shape[0], dtype=torch.float32, requires_grad=True)
        self.act = _Act(ln.act)

    def reparam(self) -> rp.Reparam:
        r = self.ln.reparam
        return replace(r, s_c=r.s_c * np.exp(self.theta.detach().to(torch.float64).numpy()))

    def torch_fold(self) -> tuple[torch.Tensor, torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """Differentiable (in theta) LN affine and consumers (float32)."""
        r = self.ln.reparam
        s_c = t32(r.s_c) * torch.exp(self.theta)
        r1 = s_c / float(r.s)
        shift = s_c * t32(r.r2)
        g = t32(self.gamma) / r1
        b = (t32(self.beta) + shift) / r1
        lins = [(t32(W) * r1[None, :], t32(bb) - t32(W) @ shift) for W, bb in self.consumers]
        return g, b, lins

    def fold(self) -> tuple[np.ndarray, np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
        """The float64 fold of the current reparameterization (as :mod:`calib.reparam` computes it)."""
        r = self.reparam()
        g, b = rp.apply_ln(self.gamma, self.beta, r)
        return g, b, [rp.apply_linear(W, bb, r) for W, bb in self.consumers]

    def result(self, act: ActQuant | None = None) -> LNCalib:
        g, b, _ = self.fold()
        return LNCalib(gamma=g, beta=b, act=act or self.act.result(), reparam=self.reparam())


def weight_zero_points(W: np.ndarray, wq: WeightQuant, bits: int) -> np.ndarray:
    """The integer zero points (N,) of :func:`calib.uniform.quantize_weight`'s result for ``W``.

    ``quantize_weight`` keeps only the scales and centered codes; the zero point of each channel
    is recovered by finding the shrink candidate whose scale it chose (same float operations).
    """
    W = np.asarray(W, np.float64)
    wmin = np.minimum(W.min(axis=1), 0.0)
    wmax = np.maximum(W.max(axis=1), 0.0)
    zero_row = ~((wmax - wmin) > 1e-30)
    z = np.zeros(W.shape[0], np.int64)
    found = zero_row.copy()
    for a in SHRINK:
        s, zz = params_from_range(a * wmin, a * wmax, bits)
        m = (s == wq.scale) & ~found
        z[m] = zz[m]
        found |= m
    if not found.all():
        raise AssertionError("weight zero point not recoverable (quantize_weight changed?)")
    return z


class _Round:
    """AdaRound rounding variables of one per-channel quantized weight (N, K)."""

    def __init__(self, W: np.ndarray, bits: int):
        W = np.asarray(W, np.float64)
        self.bits = bits
        self.wq = quantize_weight(W, bits)
        self.z = weight_zero_points(W, self.wq, bits)
        self.zero_row = ~((np.maximum(W.max(axis=1), 0.0) - np.minimum(W.min(axis=1), 0.0)) > 1e-30)
        v = W / self.wq.scale[:, None]
        self.base = np.floor(v)
        rest = np.clip(v - self.base, 0.0, 1.0)
        n = (1 << bits) - 1
        check = (np.clip(self.base + (rest >= 0.5) + self.z[:, None], 0, n) - self.z[:, None]).astype(np.int64)
        check[self.zero_row] = 0
        # nearest rounding here is calibration's rounding (rest >= 1/2 <=> V >= 0, up to float ties)
        self.nearest = self.wq
        V = -np.log((ZETA - GAMMA) / np.clip(rest - GAMMA, 1e-6, None) - 1.0)
        self.V = torch.tensor(np.clip(V, -8.0, 8.0), dtype=torch.float32, requires_grad=True)
        self._base = t32(self.base)
        self._z = torch.from_numpy(self.z.astype(np.float32))[:, None]
        self._s = t32(self.wq.scale)[:, None]
        self._live = torch.from_numpy((~self.zero_row).astype(np.float32))[:, None]   # all-zero rows stay 0
        self.n = n
        self.agree_nearest = float(np.mean(check == self.wq.w))

    def h(self) -> torch.Tensor:
        return torch.clamp(torch.sigmoid(self.V) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0) * self._live

    def soft(self) -> torch.Tensor:
        return self._s * (torch.clamp(self._base + self.h() + self._z, 0, self.n) - self._z)

    def reg(self, beta: float) -> torch.Tensor:
        return (1.0 - (2.0 * self.h() - 1.0).abs().pow(beta)).mean()

    def undecided(self) -> float:
        h = self.h().detach()
        return float(((h > 0.01) & (h < 0.99)).float().mean())

    def result(self) -> WeightQuant:
        up = (self.V.detach().numpy() >= 0).astype(np.float64)
        w = (np.clip(self.base + up + self.z[:, None], 0, self.n) - self.z[:, None]).astype(np.int64)
        w[self.zero_row] = 0
        return WeightQuant(w=w, scale=self.wq.scale.copy())


# ---- the optimization loop --------------------------------------------------------------

@dataclass
class UnitLog:
    """Losses of one unit: ``calibrated`` (before), then after each stage (None = stage undone)."""

    name: str
    calibrated: float = float("nan")
    stages: dict[str, float | None] = field(default_factory=dict)
    final: float = float("nan")
    seconds: float = 0.0
    undecided: float = 0.0

    def to_dict(self) -> dict:
        """Losses only (no timings: the program must not depend on the clock)."""
        return {"unit": self.name, "calibrated": self.calibrated, "final": self.final, "stages": dict(self.stages)}


def _optimize(loss_fn: Callable[[torch.Tensor, int], torch.Tensor], groups: list[dict], iters: int, n: int,
              batch: int, gen: torch.Generator, cosine: bool, postfix: Callable[[str], None] | None,
              label: str) -> None:
    """Adam over ``groups`` for ``iters`` steps; ``loss_fn(batch indices, step)`` returns the loss to
    minimize and the reconstruction error shown in the progress readout."""
    if iters <= 0 or not any(p.requires_grad for g in groups for p in g["params"]):
        return
    opt = torch.optim.Adam(groups)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=iters, eta_min=0.0) if cosine else None
    run = None
    for step in range(iters):
        idx = torch.randint(0, n, (min(batch, n),), generator=gen)
        opt.zero_grad(set_to_none=True)
        loss, rec = loss_fn(idx, step)
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        lv = float(rec.detach())
        run = lv if run is None else 0.9 * run + 0.1 * lv
        if postfix is not None and (step % 20 == 0 or step == iters - 1):
            postfix(f"{label} {step + 1}/{iters} loss {run:.4g}")


def _beta(step: int, iters: int) -> float | None:
    """The regularizer exponent at ``step`` (None during warm-up)."""
    start = int(REG_WARMUP * iters)
    if step < start:
        return None
    t = (step - start) / max(1, iters - start)
    return BETA[1] + (BETA[0] - BETA[1]) * (1.0 - t)


def _stage_iters(total: int) -> tuple[int, int, int]:
    a = int(round(total * STAGE_SPLIT[0]))
    m = int(round(total * STAGE_SPLIT[1]))
    return a, m, max(0, total - a - m)


# ---- one block ----------------------------------------------------------------------------

class _Block:
    """The learnable state of one transformer block, built from its float params and calibration."""

    def __init__(self, bp: BlockParams, bc: BlockCalib, index: int, heads: int, eps: float, wbits: int):
        self.bp, self.bc, self.index, self.heads, self.eps, self.wbits = bp, bc, index, heads, eps, wbits
        self.pre = f"blocks.{index}"
        self.ln1 = _LN(bp.norm1_w, bp.norm1_b, bc.norm1, [(bp.q_w, bp.q_b), (bp.k_w, bp.k_b), (bp.v_w, bp.v_b)])
        self.ln2 = _LN(bp.norm2_w, bp.norm2_b, bc.norm2, [(bp.fc1_w, bp.fc1_b)])
        self.acts = {"attn.q": _Act(bc.q_act), "attn.k": _Act(bc.k_act), "attn.v": _Act(bc.v_act),
                     "attn.core": _Act(bc.core), "mlp.gelu": _Act(bc.gelu)}
        self.sq: SoftmaxQuantizer = bc.softmax
        self.rounds: dict[str, _Round] | None = None

    def act_params(self) -> list[torch.Tensor]:
        return [self.ln1.act.theta, self.ln2.act.theta] + [a.theta for a in self.acts.values()]

    def hook(self, name: str, x: torch.Tensor) -> torch.Tensor:
        short = name[len(self.pre) + 1:]
        if short == "norm1":
            return self.ln1.act(x)
        if short == "norm2":
            return self.ln2.act(x)
        if short == "attn.probs":
            return x + (self.sq.quantize_torch(x.detach()) - x).detach()
        return self.acts[short](x)

    def params(self) -> BlockParams:
        """Differentiable block parameters: folded LN (theta), float or soft-rounded weights."""
        g1, b1, ((qw, qb), (kw, kb), (vw, vb)) = self.ln1.torch_fold()
        g2, b2, ((f1w, f1b),) = self.ln2.torch_fold()
        pw, pb, f2w, f2b = self.bp.proj_w, self.bp.proj_b, self.bp.fc2_w, self.bp.fc2_b
        if self.rounds is not None:
            r = self.rounds
            g1, b1, g2, b2 = self._fixed["g1"], self._fixed["b1"], self._fixed["g2"], self._fixed["b2"]
            qb, kb, vb, f1b = self._fixed["qb"], self._fixed["kb"], self._fixed["vb"], self._fixed["f1b"]
            qw, kw, vw, pw = r["q"].soft(), r["k"].soft(), r["v"].soft(), r["proj"].soft()
            f1w, f2w = r["fc1"].soft(), r["fc2"].soft()
        return BlockParams(norm1_w=g1, norm1_b=b1, q_w=qw, q_b=qb, k_w=kw, k_b=kb, v_w=vw, v_b=vb,
                           proj_w=pw, proj_b=pb, norm2_w=g2, norm2_b=b2, fc1_w=f1w, fc1_b=f1b,
                           fc2_w=f2w, fc2_b=f2b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return block_forward(self.params(), x, self.index, self.heads, self.eps, self.hook)

    def start_weights(self) -> None:
        """Freeze the reparameterization, quantize the folded weights and create the rounding variables."""
        g1, b1, ((qw, qb), (kw, kb), (vw, vb)) = self.ln1.fold()
        g2, b2, ((f1w, f1b),) = self.ln2.fold()
        self._fixed = {"g1": t32(g1), "b1": t32(b1), "g2": t32(g2), "b2": t32(b2),
                       "qb": t32(qb), "kb": t32(kb), "vb": t32(vb), "f1b": t32(f1b)}
        self._folded = {"q": (qw, qb), "k": (kw, kb), "v": (vw, vb), "fc1": (f1w, f1b),
                        "proj": (np64(self.bp.proj_w), np64(self.bp.proj_b)),
                        "fc2": (np64(self.bp.fc2_w), np64(self.bp.fc2_b))}
        self.rounds = {k: _Round(W, self.wbits) for k, (W, _) in self._folded.items()}

    def calib(self, weights: str) -> BlockCalib:
        """The BlockCalib of the current state; ``weights``: "calibrated" (the input's), "nearest"
        (re-quantized folded weights) or "learned" (hardened rounding)."""
        bc = self.bc
        ln1, ln2 = self.ln1.result(), self.ln2.result()
        acts = {k: a.result() for k, a in self.acts.items()}
        if weights == "calibrated":
            lin = {"q": bc.q, "k": bc.k, "v": bc.v, "proj": bc.proj, "fc1": bc.fc1, "fc2": bc.fc2}
        else:
            if self.rounds is None:
                self.start_weights()
            lin = {k: LinearCalib(weight=(r.nearest if weights == "nearest" else r.result()),
                                  bias=np.asarray(self._folded[k][1], np.float64))
                   for k, r in self.rounds.items()}
        return replace(bc, norm1=ln1, norm2=ln2, q=lin["q"], k=lin["k"], v=lin["v"],
                       q_act=acts["attn.q"], k_act=acts["attn.k"], v_act=acts["attn.v"], core=acts["attn.core"],
                       proj=lin["proj"], fc1=lin["fc1"], gelu=acts["mlp.gelu"], fc2=lin["fc2"])


def _eval(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, target: torch.Tensor, norm: float) -> float:
    with torch.no_grad():
        err = 0.0
        for s in range(0, x.shape[0], EVAL_CHUNK):
            out = fn(x[s:s + EVAL_CHUNK])
            err += float(((out.to(torch.float64) - target[s:s + EVAL_CHUNK].to(torch.float64)) ** 2).sum())
        return err / target.numel() / norm


def _reset(params: list[torch.Tensor], values: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for p, v in zip(params, values):
            p.copy_(v)


def reconstruct_block(bp: BlockParams, bc: BlockCalib, index: int, heads: int, eps: float, x_q: torch.Tensor,
                      target: torch.Tensor, wbits: int, iters: int, lr: float, batch: int, seed: int,
                      postfix: Callable[[str], None] | None = None) -> tuple[BlockCalib, UnitLog]:
    """Reconstruct one block: input ``x_q`` (N, T, D) from the quantized prefix, float ``target``."""
    t0 = time.perf_counter()
    log = UnitLog(f"blocks.{index}")
    norm = float((target.to(torch.float64) ** 2).mean()) or 1.0
    N = x_q.shape[0]
    blk = _Block(bp, bc, index, heads, eps, wbits)
    gen = _rng(seed, f"recon/blocks.{index}")
    n_act, n_mosf, n_w = _stage_iters(iters)

    def exact(c: BlockCalib) -> float:
        return _eval(lambda xb: quantized_block_forward(c, xb, index, heads, eps), x_q, target, norm)

    best = bc
    log.calibrated = best_err = exact(bc)

    def batch_loss(idx, step):
        rec = rel_err(blk.forward(x_q[idx]), target[idx], norm)
        return rec, rec

    # stage 1: activation scales with float weights
    acts = blk.act_params()
    _optimize(batch_loss, [{"params": acts, "lr": lr * SCALE_LR_RATIO}], n_act, N, batch, gen, True, postfix,
              f"b{index} act")
    # stage 2: per-channel post-LN scales (MOSF) with float weights
    mosf = [blk.ln1.theta, blk.ln2.theta]
    _optimize(batch_loss, [{"params": mosf, "lr": lr * SCALE_LR_RATIO}], n_mosf, N, batch, gen, True, postfix,
              f"b{index} mosf")
    # the activation / MOSF result with calibration's nearest rounding of the re-folded weights
    cand = blk.calib("nearest")
    err = exact(cand)
    log.stages["act+mosf"] = err
    if err < best_err:
        best, best_err = cand, err
    else:                                  # undo: back to the calibrated scales and reparameterization
        _reset(acts + mosf, [torch.zeros_like(p) for p in acts + mosf])
        blk.rounds = None
        log.stages["act+mosf"] = None
    # stage 3: weight rounding (AdaRound) with the (kept) activation quantizers
    if n_w > 0:
        if blk.rounds is None:
            blk.start_weights()
        rounds = list(blk.rounds.values())
        for p in acts + mosf:
            p.requires_grad_(False)

        def w_loss(idx, step):
            loss, rec = batch_loss(idx, step)
            beta = _beta(step, n_w)
            if beta is not None:
                loss = loss + REG_WEIGHT * sum(r.reg(beta) for r in rounds) / len(rounds)
            return loss, rec

        _optimize(w_loss, [{"params": [r.V for r in rounds], "lr": lr}], n_w, N, batch, gen, False, postfix,
                  f"b{index} w")
        log.undecided = float(np.mean([r.undecided() for r in rounds]))
        cand = blk.calib("learned")
        err = exact(cand)
        log.stages["weights"] = err if err < best_err else None
        if err < best_err:
            best, best_err = cand, err
    log.final = best_err
    log.seconds = time.perf_counter() - t0
    return best, log


# ---- patch embedding and head (layer-wise) ---------------------------------------------------

def _patches(params: ViTParams, images: np.ndarray) -> torch.Tensor:
    """Patch vectors (N * P, 3 p p) float32 in the (ch, ky, kx) order of the patch weight."""
    x = torch.from_numpy(np.ascontiguousarray(images)).to(torch.float32)
    p = params.patch_size
    cols = F.unfold(x, kernel_size=p, stride=p)          # (N, 3 p p, P), channel-major (ch, ky, kx)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1]).contiguous()


def reconstruct_patch(params: ViTParams, patch: LinearCalib, images: np.ndarray, wbits: int, iters: int, lr: float,
                      batch: int, seed: int, postfix=None) -> tuple[LinearCalib, UnitLog]:
    """Layer-wise rounding of the patch-embedding weights against the float embedding (bias excluded)."""
    t0 = time.perf_counter()
    log = UnitLog("patch_embed")
    D = params.embed_dim
    W = np64(params.patch_w.reshape(D, -1))
    X = _patches(params, images)
    target = X @ t32(W).T
    norm = float((target.to(torch.float64) ** 2).mean()) or 1.0

    def exact(wq: WeightQuant) -> float:
        Wq = t32(wq.dequant())
        return _eval(lambda xb: xb @ Wq.T, X, target, norm)

    log.calibrated = best_err = exact(patch.weight)
    best = patch
    r = _Round(W, wbits)
    n_w = _stage_iters(iters)[2]
    gen = _rng(seed, "recon/patch_embed")
    rows = max(batch, 1) * (X.shape[0] // max(1, images.shape[0]))   # a batch of images' worth of patches

    def loss(idx, step):
        rec = rel_err(X[idx] @ r.soft().T, target[idx], norm)
        beta = _beta(step, n_w)
        return (rec if beta is None else rec + REG_WEIGHT * r.reg(beta)), rec

    _optimize(loss, [{"params": [r.V], "lr": lr}], n_w, X.shape[0], rows, gen, False, postfix, "patch w")
    wq = r.result()
    err = exact(wq)
    log.stages["weights"] = err if err < best_err else None
    if err < best_err:
        best, best_err = replace(patch, weight=wq), err
    log.final = best_err
    log.undecided = r.undecided()
    log.seconds = time.perf_counter() - t0
    return best, log


def reconstruct_head(params: ViTParams, mc: ModelCalib, x_q: torch.Tensor, target: torch.Tensor, wbits: int,
                     iters: int, lr: float, batch: int, seed: int,
                     postfix=None) -> tuple[LNCalib, LinearCalib, UnitLog]:
    """Layer-wise reconstruction of the final LayerNorm's quantizer / reparameterization and the head
    from the class tokens ``x_q`` (N, 1, D) of the quantized path against the float logits (N, C)."""
    t0 = time.perf_counter()
    log = UnitLog("head")
    norm = float((target.to(torch.float64) ** 2).mean()) or 1.0
    N = x_q.shape[0]
    ln = _LN(params.norm_w, params.norm_b, mc.norm, [(params.head_w, params.head_b)])
    eps = params.eps

    def exact_fn(lc: LNCalib, lin: LinearCalib):
        g, b, W, bb = t32(lc.gamma), t32(lc.beta), t32(lin.weight.dequant()), t32(lin.bias)
        a = lc.act

        def fn(xb):
            y = fake_quant_uniform(layer_norm(xb, g, b, eps), a.scale, a.zero_point, a.bits)
            return F.linear(y, W, bb)[:, 0]
        return fn

    def exact(lc, lin) -> float:
        return _eval(exact_fn(lc, lin), x_q, target, norm)

    best = (mc.norm, mc.head)
    log.calibrated = best_err = exact(*best)
    rnd_state: dict[str, _Round] = {}

    def forward(xb):
        if "head" in rnd_state:
            g, b = fixed["g"], fixed["b"]
            W, bb = rnd_state["head"].soft(), fixed["bias"]
        else:
            g, b, ((W, bb),) = ln.torch_fold()
        return F.linear(ln.act(layer_norm(xb, g, b, eps)), W, bb)[:, 0]

    def loss(idx, step):
        rec = rel_err(forward(x_q[idx]), target[idx], norm)
        return rec, rec

    gen = _rng(seed, "recon/head")
    n_act, n_mosf, n_w = _stage_iters(iters)
    params_s = [ln.act.theta, ln.theta]
    _optimize(loss, [{"params": [ln.act.theta], "lr": lr * SCALE_LR_RATIO}], n_act, N, batch, gen, True, postfix,
              "head act")
    _optimize(loss, [{"params": [ln.theta], "lr": lr * SCALE_LR_RATIO}], n_mosf, N, batch, gen, True, postfix,
              "head mosf")
    g, b, ((W, bb),) = ln.fold()
    r = _Round(W, wbits)
    cand = (ln.result(), LinearCalib(weight=r.nearest, bias=np.asarray(bb, np.float64)))
    err = exact(*cand)
    log.stages["act+mosf"] = err if err < best_err else None
    if err < best_err:
        best, best_err = cand, err
    else:
        _reset(params_s, [torch.zeros_like(p) for p in params_s])
        g, b, ((W, bb),) = ln.fold()
        r = _Round(W, wbits)
    if n_w > 0:
        fixed = {"g": t32(g), "b": t32(b), "bias": t32(bb)}
        rnd_state["head"] = r
        for p in params_s:
            p.requires_grad_(False)

        def w_loss(idx, step):
            rec = loss(idx, step)[1]
            beta = _beta(step, n_w)
            return (rec if beta is None else rec + REG_WEIGHT * r.reg(beta)), rec

        _optimize(w_loss, [{"params": [r.V], "lr": lr}], n_w, N, batch, gen, False, postfix, "head w")
        cand = (ln.result(), LinearCalib(weight=r.result(), bias=np.asarray(bb, np.float64)))
        err = exact(*cand)
        log.stages["weights"] = err if err < best_err else None
        if err < best_err:
            best, best_err = cand, err
        log.undecided = r.undecided()
    log.final = best_err
    log.seconds = time.perf_counter() - t0
    return best[0], best[1], log


# ---- the whole model ----------------------------------------------------------------------

def _widen(old: float, absmax: float, bits: int) -> float:
    return max(float(old), absmax_scale(absmax, bits))


def reconstruct(params: ViTParams, mc: ModelCalib, images: np.ndarray, config, settings: dict[str, int],
                progress: bool = True) -> tuple[ModelCalib, list[UnitLog]]:
    """Reconstruct a calibrated model unit by unit (module docstring) on uint8 ``images``.

    Returns the new :class:`ModelCalib` and one :class:`UnitLog` per unit (patch, blocks, head).
    """
    wb = settings["wbits"]
    iters, lr, batch, seed = config.recon_iters, config.recon_lr, config.recon_batch, config.seed
    N = images.shape[0]
    logs: list[UnitLog] = []
    bar = tqdm(total=params.depth + 2, desc="reconstructing", unit="unit", disable=not progress, leave=False)
    done_txt: list[str] = []

    def postfix(now: str) -> None:
        bar.set_postfix_str(" ".join(done_txt[-3:] + [now]))

    def finish(log: UnitLog) -> None:
        logs.append(log)
        done_txt.append(f"{log.name.replace('blocks.', 'b')} {log.calibrated:.3g}->{log.final:.3g}")
        bar.update(1)
        postfix("")

    with single_thread(), torch.enable_grad():
        # 1. patch embedding (layer-wise)
        patch, log = reconstruct_patch(params, mc.patch, images, wb, iters, lr, batch, seed, postfix)
        finish(log)
        ep = replace(params, patch_w=t32(patch.weight.dequant()).reshape(params.patch_w.shape))
        with torch.no_grad():
            r_q = torch.cat([embed(ep, images[s:s + CHUNK]) for s in range(0, N, CHUNK)])
            r_f = torch.cat([embed(params, images[s:s + CHUNK]) for s in range(0, N, CHUNK)])
        res0 = _widen(mc.res0, float(r_q.abs().max()), settings["residual_bits"])
        blocks = []
        for i, bp in enumerate(params.blocks):
            with torch.no_grad():
                t_f = torch.cat([block_forward(bp, r_f[s:s + CHUNK], i, params.num_heads, params.eps)
                                 for s in range(0, N, CHUNK)])
            bc, log = reconstruct_block(bp, mc.blocks[i], i, params.num_heads, params.eps, r_q, t_f, wb, iters, lr,
                                        batch, seed, postfix)
            absmax: dict[str, float] = {}

            def tap(name, x):
                absmax[name] = max(absmax.get(name, 0.0), float(x.abs().max()))

            with torch.no_grad():
                r_q = quantized_block_forward(bc, r_q, i, params.num_heads, params.eps, tap=tap)
            pre = f"blocks.{i}"
            bc = replace(bc, res1=_widen(bc.res1, max(absmax[f"{pre}.add1"], absmax[f"{pre}.attn.proj"]),
                                         settings["residual_bits"]),
                         fc1_scale=_widen(bc.fc1_scale, absmax[f"{pre}.mlp.fc1"], settings["gelu_bits"]),
                         res2=_widen(bc.res2, max(absmax[f"{pre}.add2"], absmax[f"{pre}.mlp.fc2"]),
                                     settings["residual_bits"]))
            blocks.append(bc)
            r_f = t_f
            finish(log)
        # 3. final LayerNorm + head (layer-wise)
        with torch.no_grad():
            t_logits = F.linear(layer_norm(r_f[:, :1], params.norm_w, params.norm_b, params.eps),
                                params.head_w, params.head_b)[:, 0]
        norm, head, log = reconstruct_head(params, mc, r_q[:, :1].contiguous(), t_logits, wb, iters, lr, batch,
                                           seed, postfix)
        with torch.no_grad():
            a = norm.act
            y = fake_quant_uniform(layer_norm(r_q[:, :1], t32(norm.gamma), t32(norm.beta), params.eps),
                                   a.scale, a.zero_point, a.bits)
            logits = F.linear(y, t32(head.weight.dequant()), t32(head.bias))
        finish(log)
    bar.close()
    out = replace(mc, patch=patch, res0=res0, blocks=blocks, norm=norm, head=head,
                  logit_scale=_widen(mc.logit_scale, float(logits.abs().max()), settings["logit_bits"]))
    return out, logs
