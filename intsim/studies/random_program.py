"""Random but valid tiny-ViT integer programs for engine tests.

``make_program(rng, ...)`` builds a program that follows the graph of spec section 6 with integer
constants in the ranges of spec sections 2-5: multipliers in [2^(B-2), 2^(B-1)) from the frexp
procedure, shifts chosen from rough magnitude estimates (with a random factor so that outputs
mostly fit and sometimes saturate), exp table / thresholds / decode built per the spec from a
uniform or log2 post-softmax quantizer, a GELU table of monotone-ish codes. Float tensors (read only
by the fake-quant reference) hold arbitrary values of the right dtype and shape.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from intsim.ops.attention import exp_table
from intsim.ops.layernorm import fused_constants
from intsim.program import quantizers as Q
from intsim.program.fixedpoint import requant
from intsim.program.format import DEFAULT_SETTINGS, FORMAT, VERSION, Program, validate

__all__ = ["exp_table", "make_program", "quant_mult", "random_images", "softmax_quant_tables"]


def rnd(v: float) -> int:
    """Round half up (spec section 1)."""
    return math.floor(v + 0.5)


def quant_mult(M: float, B: int) -> tuple[int, int]:
    """Spec section 2: real multiplier M > 0 -> (m, n) with M ~ m * 2^-n (the exporter's own rule)."""
    return requant(M, B)


def softmax_quant_tables(sq: dict[str, Any], abits: int, P: int, L: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(thresholds (N,), decode (N+1,), levels (N+1,)) of a post-softmax quantizer given as
    ``{"type": ..., <its parameters>}`` (spec 4.4, 5), by the exporter's own tables."""
    q = Q.make(sq["type"], abits, **{k: v for k, v in sq.items() if k != "type"})
    return Q.thresholds(q, P), Q.decode_table(q, L), q.levels()


def _gelu(z: np.ndarray) -> np.ndarray:
    return z * 0.5 * (1.0 + np.vectorize(math.erf)(z / math.sqrt(2.0)))


def make_program(rng: np.random.Generator | int | None = None, *, embed_dim: int = 12, heads: int = 2,
                 depth: int = 2, img: int = 8, patch: int = 4, classes: int = 5, wbits: int = 4,
                 abits: int = 4, settings: dict[str, int] | None = None, mlp_ratio: int = 4) -> Program:
    """A valid random tiny-ViT program (passes ``intsim.program.format.validate``)."""
    rng = np.random.default_rng(rng)
    s = dict(DEFAULT_SETTINGS)
    s.update(wbits=wbits, abits=abits)
    s.update(settings or {})
    wb, ab = s["wbits"], s["abits"]
    R, A, Bm = s["residual_bits"], s["acc_bits"], s["mult_bits"]
    g_bits, lb = s["gelu_bits"], s["logit_bits"]
    if not (A + Bm <= 64 and embed_dim % heads == 0 and img % patch == 0):
        raise ValueError("need acc_bits + mult_bits <= 64, heads dividing embed_dim, patch dividing img")
    D, hidden = embed_dim, embed_dim * mlp_ratio
    P = (img // patch) ** 2
    T = P + 1
    acc_lim = 2 ** (A - 1) - 1
    amax = 2 ** ab - 1

    values: dict[str, dict[str, Any]] = {}
    ops: list[dict[str, Any]] = []
    tensors: dict[str, np.ndarray] = {}

    def value(name: str, kind: str, bits: int, shape: list[int], scale: float, zp: int = 0) -> str:
        values[name] = {"kind": kind, "bits": int(bits), "shape": [int(v) for v in shape],
                        "scale": float(scale), "zero_point": int(zp)}
        return name

    def codes_value(name: str, shape: list[int]) -> str:
        zp = int(rng.integers(amax // 4, amax - amax // 4 + 1)) if amax >= 3 else 1
        return value(name, "codes", ab, shape, float(rng.uniform(0.02, 0.2)), zp)

    def out_range(vname: str) -> tuple[int, int]:
        v = values[vname]
        if v["kind"] == "codes":
            return 0, 2 ** v["bits"] - 1
        return -(2 ** (v["bits"] - 1)), 2 ** (v["bits"] - 1) - 1

    def mult_for(target_gain: float) -> tuple[int, int]:
        """A multiplier near target_gain times a random factor in [2^-1, 2^0.7]."""
        return quant_mult(target_gain * 2.0 ** rng.uniform(-1.0, 0.7), Bm)

    def weights(N: int, Kd: int) -> np.ndarray:
        wq = rng.integers(0, 2 ** wb, size=(N, Kd))
        zw = rng.integers(0, 2 ** wb, size=(N, 1))
        return (wq - zw).astype(np.int16)

    def linear(name: str, x: str, out: str, N: int) -> str:
        xin = values[x]
        Kd = xin["shape"][-1]
        w = weights(N, Kd)
        x_spread = 2 ** (ab - 2) if xin["kind"] == "codes" else 2 ** (xin["bits"] - 3)
        sig = math.sqrt(Kd) * x_spread * max(1.0, float(np.abs(w).mean()))
        bias = np.rint(rng.normal(0, sig / 2, size=N)).astype(np.int64) - xin["zero_point"] * w.astype(np.int64).sum(1)
        bias = np.clip(bias, -acc_lim, acc_lim)
        lo, hi = out_range(out)
        o = values[out]
        target = (hi - lo) / 8 / sig
        mults, shifts = zip(*(mult_for(target) for _ in range(N)))
        zp = np.full(N, o["zero_point"] if o["kind"] == "codes" else 0, np.int32)
        ops.append({"name": name, "type": "linear", "inputs": [x], "output": out, "attrs": {"lo": lo, "hi": hi}})
        tensors.update({f"{name}.w": w, f"{name}.bias": bias, f"{name}.mult": np.array(mults, np.int32),
                        f"{name}.shift": np.array(shifts, np.int32), f"{name}.zp": zp,
                        f"{name}.w_scale": rng.uniform(0.01, 0.1, N).astype(np.float64),
                        f"{name}.bias_float": rng.normal(0, 0.1, N).astype(np.float32)})
        return out

    def layernorm(name: str, x: str, out: str, tokens: str = "all") -> str:
        Kr, F = s["ln_recip_bits"], s["ln_norm_frac"]
        o = values[out]
        g_real = rng.uniform(0.5, 1.5, D) * (2 ** (ab - 1)) / 2.5 * np.where(rng.random(D) < 0.1, -1, 1)
        beta = rng.normal(0, 0.7, D)
        Sh, gmul, gadd = fused_constants(g_real, beta, Bm, F, name)
        lo, hi = out_range(out)
        ops.append({"name": name, "type": "layernorm", "inputs": [x], "output": out,
                    "attrs": {"tokens": tokens, "recip_bits": Kr, "norm_frac": F, "shift": Sh,
                              "zp": o["zero_point"], "lo": lo, "hi": hi}})
        tensors.update({f"{name}.gmul": gmul, f"{name}.gadd": gadd,
                        f"{name}.gamma": rng.uniform(0.5, 1.5, D).astype(np.float32),
                        f"{name}.beta": rng.normal(0, 0.1, D).astype(np.float32)})
        return out

    def attention(name: str, q: str, k: str, v: str, out: str) -> str:
        E, X, Pb, G, L = s["exp_frac_bits"], s["exp_bits"], s["prob_bits"], s["recip_frac"], s["decode_bits"]
        d = D // heads
        sq_, sk_ = (float(rng.uniform(0.5, 3.0)) / 2 ** (ab - 1) for _ in range(2))
        score_mult, score_shift = quant_mult(sq_ * sk_ / math.sqrt(d) * 2 ** E / math.log(2), Bm)
        N = 2 ** ab - 1
        if rng.random() < 0.5:
            sqz = {"type": "uniform", "scale": float(rng.uniform(0.6, 1.5) / N)}
        else:
            sqz = {"type": "log2", "delta": float(rng.uniform(0.5, 1.0))}
        thresholds, decode, levels = softmax_quant_tables(sqz, ab, Pb, L)
        mult, shift = mult_for(2.0 ** -L * 2.0)
        lo, hi = out_range(out)
        ops.append({"name": name, "type": "attention", "inputs": [q, k, v], "output": out,
                    "attrs": {"heads": heads, "zp_q": values[q]["zero_point"], "zp_k": values[k]["zero_point"],
                              "zp_v": values[v]["zero_point"], "score_mult": score_mult,
                              "score_shift": score_shift, "exp_frac_bits": E, "exp_bits": X, "prob_bits": Pb,
                              "recip_frac": G, "decode_bits": L, "mult": mult, "shift": shift,
                              "zp": values[out]["zero_point"], "lo": lo, "hi": hi, "softmax_quant": sqz}})
        tensors.update({f"{name}.exp_table": exp_table(E, X), f"{name}.thresholds": thresholds,
                        f"{name}.decode": decode, f"{name}.levels": levels.astype(np.float64)})
        return out

    def gelu(name: str, x: str, out: str) -> str:
        s_x = 4.0 / 2 ** (g_bits - 1) * float(rng.uniform(0.5, 2.0))
        s_y = 4.0 / amax * float(rng.uniform(0.7, 1.3))
        o = values[out]
        z = (np.arange(2 ** g_bits) - 2 ** (g_bits - 1)) * s_x
        tab = np.floor(_gelu(z) / s_y + 0.5) + o["zero_point"]
        tab += rng.choice([-1, 0, 0, 0, 0, 0, 0, 1], size=tab.shape)      # monotone-ish
        tab = np.clip(tab, 0, amax).astype(np.int32)
        ops.append({"name": name, "type": "gelu", "inputs": [x], "output": out, "attrs": {}})
        tensors[f"{name}.table"] = tab
        return out

    def add(name: str, a: str, skip: str, out: str) -> str:
        mult, shift = quant_mult(float(rng.uniform(0.5, 1.0)), Bm)
        lo, hi = out_range(out)
        ops.append({"name": name, "type": "add", "inputs": [a, skip], "output": out,
                    "attrs": {"mult": mult, "shift": shift, "lo": lo, "hi": hi}})
        return out

    def residual(name: str) -> str:
        return value(name, "int", R, [T, D], float(rng.uniform(0.001, 0.01)))

    # ---- graph of spec section 6 ------------------------------------------------------------
    value("image", "image", 8, [3, img, img], 1 / 255)
    r = residual("patch_embed")
    Kp = 3 * patch * patch
    w = weights(D, Kp)
    sig = math.sqrt(Kp) * 74.0 * max(1.0, float(np.abs(w).mean()))
    bias = np.rint(rng.normal(0, sig / 2, D)).astype(np.int64) - int(rng.integers(100, 131)) * w.astype(np.int64).sum(1)
    bias = np.clip(bias, -acc_lim, acc_lim)
    lo, hi = out_range(r)
    mults, shifts = zip(*(mult_for((hi - lo) / 8 / sig) for _ in range(D)))
    pos = np.clip(np.rint(rng.normal(0, 2 ** (R - 1) / 8, (T, D))), -(2 ** 31), 2 ** 31 - 1).astype(np.int32)
    if rng.random() < 0.5:
        pos[0, 0] = hi + 3                       # a clamped class token
    ops.append({"name": "patch_embed", "type": "patch_embed", "inputs": ["image"], "output": r,
                "attrs": {"patch": patch, "lo": lo, "hi": hi}})
    tensors.update({"patch_embed.w": w, "patch_embed.bias": bias, "patch_embed.mult": np.array(mults, np.int32),
                    "patch_embed.shift": np.array(shifts, np.int32), "patch_embed.pos": pos,
                    "patch_embed.w_scale": rng.uniform(0.01, 0.1, D).astype(np.float64),
                    "patch_embed.bias_float": rng.normal(0, 0.1, D).astype(np.float32),
                    "patch_embed.pos_float": rng.normal(0, 0.1, (T, D)).astype(np.float32)})

    for i in range(depth):
        p = f"blocks.{i}."
        n1 = layernorm(p + "norm1", r, codes_value(p + "norm1", [T, D]))
        q = linear(p + "attn.q", n1, codes_value(p + "attn.q", [T, D]), D)
        k = linear(p + "attn.k", n1, codes_value(p + "attn.k", [T, D]), D)
        v = linear(p + "attn.v", n1, codes_value(p + "attn.v", [T, D]), D)
        a = attention(p + "attn.core", q, k, v, codes_value(p + "attn.core", [T, D]))
        pr = linear(p + "attn.proj", a, residual(p + "attn.proj"), D)
        r1 = add(p + "add1", pr, r, residual(p + "add1"))
        n2 = layernorm(p + "norm2", r1, codes_value(p + "norm2", [T, D]))
        f = linear(p + "mlp.fc1", n2, value(p + "mlp.fc1", "int", g_bits, [T, hidden], 0.01), hidden)
        g = gelu(p + "mlp.gelu", f, value(p + "mlp.gelu", "codes", ab, [T, hidden], 0.1,
                                          int(rng.integers(1, max(2, amax // 4) + 1))))
        o = linear(p + "mlp.fc2", g, residual(p + "mlp.fc2"), D)
        r = add(p + "add2", o, r1, residual(p + "add2"))
    h = layernorm("norm", r, codes_value("norm", [1, D]), tokens="first")
    linear("head", h, value("head", "int", lb, [1, classes], 0.05), classes)

    header = {
        "format": FORMAT, "version": VERSION,
        "model": {"arch": "random-tiny-vit", "embed_dim": D, "depth": depth, "heads": heads,
                  "mlp_hidden": hidden, "img_size": img, "patch_size": patch, "num_classes": classes},
        "settings": s,
        "provenance": {"generator": "intsim/studies/random_program.py"},
        "values": values, "ops": ops, "output": "head", "inputs": ["image"],
    }
    prog = Program(header, tensors)
    validate(prog)
    return prog


def random_images(rng: np.random.Generator | int | None, n: int, img: int = 8) -> np.ndarray:
    """n random uint8 images (n, 3, img, img)."""
    rng = np.random.default_rng(rng)
    return rng.integers(0, 256, size=(n, 3, img, img), dtype=np.uint8)
