"""Integerization: calibration results -> an integer program (``docs/integer-spec.md``).

Every integer constant of the program is computed here, once, from the float64 calibration
results (:mod:`calib.state`); the golden model and the engine only read them. Section numbers
below refer to the specification.

Graph (section 6) and names: ``image`` -> ``patch_embed`` -> per block ``blocks.{i}.norm1`` ->
``.attn.q`` / ``.attn.k`` / ``.attn.v`` -> ``.attn.core`` (attention) -> ``.attn.proj`` ->
``.add1`` -> ``.norm2`` -> ``.mlp.fc1`` -> ``.mlp.gelu`` -> ``.mlp.fc2`` -> ``.add2``; then
``norm`` (class token) -> ``head``. Each op's output value carries the op's name.

Value table entries: ``kind`` (image | codes | int), ``bits``, ``shape`` per image ([T, C], or
[3, H, W] for the image), ``scale`` (float64, real units per step) and ``zero_point`` (int).
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from intsim.program import quantizers as Q
from intsim.program.format import FORMAT, VERSION, Program, validate

from intsim.program.fixedpoint import ExportError, requant, requant_array
from .state import LinearCalib, LNCalib, ModelCalib
from .uniform import ActQuant

_LN_GADD_LIMIT = 1 << 55


def check_settings(s: dict[str, int]) -> None:
    """Bounds of section 8 that depend on the settings alone (plus storage limits of the format)."""
    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise ExportError(f"settings: {msg}")

    need(2 <= s["wbits"] <= 8 and 2 <= s["abits"] <= 8, "wbits and abits must be in 2..8")
    need(2 <= s["acc_bits"] <= 63 and 2 <= s["mult_bits"] <= 32, "acc_bits in 2..63, mult_bits in 2..32 (int32 multipliers)")
    need(s["acc_bits"] + s["mult_bits"] <= 64, f"acc_bits + mult_bits = {s['acc_bits'] + s['mult_bits']} > 64")
    need(2 <= s["residual_bits"] <= 32, "residual_bits must be in 2..32")
    need(2 <= s["logit_bits"] <= 32, "logit_bits must be in 2..32")
    need(2 <= s["gelu_bits"] <= 16, "gelu_bits must be in 2..16")
    need(0 <= s["exp_frac_bits"] <= 12, "exp_frac_bits (E) must be in 0..12")
    need(1 <= s["exp_bits"] <= 30, "exp_bits (X) must be in 1..30")
    need(1 <= s["prob_bits"] <= 24, "prob_bits (P) must be in 1..24")
    need(0 <= s["recip_frac"] and s["prob_bits"] + s["recip_frac"] <= 48, "prob_bits + recip_frac must be <= 48")
    need(1 <= s["decode_bits"] <= 30, "decode_bits (L) must be in 1..30")
    need(1 <= s["ln_recip_bits"] <= 48, "ln_recip_bits (K) must be in 1..48")
    need(0 <= s["ln_norm_frac"] <= 20, "ln_norm_frac (F) must be in 0..20")
    need(s["ln_norm_frac"] <= s["ln_recip_bits"], "ln_norm_frac must not exceed ln_recip_bits (shift K - F >= 0)")


class _Builder:
    """Accumulates values, ops and tensors of one program."""

    def __init__(self, settings: dict[str, int]):
        self.s = settings
        self.values: dict[str, dict[str, Any]] = {}
        self.ops: list[dict[str, Any]] = []
        self.tensors: dict[str, np.ndarray] = {}
        self.bias_saturated: dict[str, int] = {}   # op name -> biases clamped to the accumulator

    # ---- values --------------------------------------------------------------------------
    def value(self, name: str, kind: str, bits: int, shape: list[int], scale: float, zero_point: int = 0) -> None:
        if not (math.isfinite(scale) and scale > 0):
            raise ExportError(f"value '{name}': scale must be positive and finite, got {scale!r}")
        self.values[name] = {"kind": kind, "bits": int(bits), "shape": [int(d) for d in shape],
                             "scale": float(scale), "zero_point": int(zero_point)}

    def codes(self, name: str, shape: list[int], act: ActQuant) -> None:
        n = (1 << act.bits) - 1
        if not 0 <= act.zero_point <= n:
            raise ExportError(f"value '{name}': zero point {act.zero_point} outside 0..{n}")
        self.value(name, "codes", act.bits, shape, act.scale, act.zero_point)

    def sc(self, name: str) -> float:
        return self.values[name]["scale"]

    def zp(self, name: str) -> int:
        return self.values[name]["zero_point"]

    def out_range(self, name: str) -> tuple[int, int]:
        v = self.values[name]
        if v["kind"] == "codes":
            return 0, (1 << v["bits"]) - 1
        return -(1 << (v["bits"] - 1)), (1 << (v["bits"] - 1)) - 1

    def op(self, name: str, typ: str, inputs: list[str], attrs: dict[str, Any], tensors: dict[str, np.ndarray]) -> None:
        self.ops.append({"name": name, "type": typ, "inputs": list(inputs), "output": name, "attrs": attrs})
        for k, t in tensors.items():
            self.tensors[f"{name}.{k}"] = np.ascontiguousarray(t)

    # ---- constants -----------------------------------------------------------------------
    def mult_shift(self, what: str, M: float) -> tuple[int, int]:
        try:
            return requant(M, self.s["mult_bits"])
        except ExportError as e:
            raise ExportError(f"{what}: {e}") from None

    def gemm(self, name: str, lin: LinearCalib, s_x: float, z_x: int, s_y: float) -> dict[str, np.ndarray]:
        """Tensors shared by ``linear`` and ``patch_embed`` (section 4.1): w, bias, mult, shift + floats."""
        wb, A = self.s["wbits"], self.s["acc_bits"]
        w = lin.weight.w
        if np.abs(w).max(initial=0) > (1 << wb) - 1:
            raise ExportError(f"{name}: weight code outside +-(2^{wb} - 1)")
        s_w = lin.weight.scale.astype(np.float64)
        bias = Q.rnd(lin.bias / (s_x * s_w)).astype(np.int64) - int(z_x) * w.sum(axis=1)
        # A bias that does not fit the accumulator is saturated here, once, and the count recorded
        # in the header (spec section 8): narrow-accumulator studies must still export.
        lim = (1 << (A - 1)) - 1
        n_sat = int((np.abs(bias) > lim).sum())
        if n_sat:
            self.bias_saturated[name] = n_sat
            bias = np.clip(bias, -lim, lim)
        try:
            mult, shift = requant_array(s_x * s_w / s_y, self.s["mult_bits"])
        except ExportError as e:
            raise ExportError(f"{name}: {e}") from None
        return {"w": w.astype(np.int16), "bias": bias.astype(np.int64), "mult": mult.astype(np.int32),
                "shift": shift.astype(np.int32), "w_scale": s_w.astype(np.float64),
                "bias_float": lin.bias.astype(np.float32)}

    # ---- ops ----------------------------------------------------------------------------
    def linear(self, name: str, x: str, lin: LinearCalib) -> None:
        """Section 4.1; the output value ``name`` must already be in the table."""
        t = self.gemm(name, lin, self.sc(x), self.zp(x), self.sc(name))
        lo, hi = self.out_range(name)
        zp = self.zp(name) if self.values[name]["kind"] == "codes" else 0
        t["zp"] = np.full(t["bias"].shape, zp, dtype=np.int32)
        self.op(name, "linear", [x], {"lo": lo, "hi": hi}, t)

    def layernorm(self, name: str, x: str, ln: LNCalib, tokens: str) -> None:
        """Section 4.3: gmul = rnd(gamma'/s_y 2^(S-F)), gadd = rnd(beta'/s_y 2^S), S the largest shift that fits."""
        B, K, F = self.s["mult_bits"], self.s["ln_recip_bits"], self.s["ln_norm_frac"]
        D = ln.gamma.shape[0]
        if D > 4096:
            raise ExportError(f"{name}: LayerNorm width {D} > 4096")
        s_y = self.sc(name)
        gm, ga = ln.gamma / s_y, ln.beta / s_y
        # start just above the analytic bound and walk down to the first shift that fits
        top = float(np.abs(gm).max())
        start = 62 if top == 0 else min(62, F + int(math.floor(math.log2(((1 << (B - 1)) - 1) / top))) + 1)
        for S in range(max(start, 0), -1, -1):
            gmul = Q.rnd(gm * 2.0 ** (S - F))
            gadd = Q.rnd(ga * 2.0 ** S)
            if np.abs(gmul).max() <= (1 << (B - 1)) - 1 and np.abs(gadd).max() < _LN_GADD_LIMIT:
                break
        else:
            raise ExportError(f"{name}: no LayerNorm shift keeps gmul below 2^{B - 1} and gadd below 2^55")
        lo, hi = self.out_range(name)
        attrs = {"tokens": tokens, "recip_bits": K, "norm_frac": F, "shift": S, "zp": self.zp(name), "lo": lo, "hi": hi}
        self.op(name, "layernorm", [x], attrs,
                {"gmul": gmul.astype(np.int64), "gadd": gadd.astype(np.int64),
                 "gamma": ln.gamma.astype(np.float32), "beta": ln.beta.astype(np.float32)})

    def attention(self, name: str, q: str, k: str, v: str, heads: int, sq: Q.SoftmaxQuantizer) -> None:
        """Section 4.4: score rescale, exp table, thresholds, decode table, output rescale."""
        s = self.s
        E, X, P, G, L = s["exp_frac_bits"], s["exp_bits"], s["prob_bits"], s["recip_frac"], s["decode_bits"]
        if sq.bits != s["abits"]:
            raise ExportError(f"{name}: post-softmax quantizer has {sq.bits} bits, abits is {s['abits']}")
        D = self.values[q]["shape"][-1]
        d = D // heads
        m_s, n_s = self.mult_shift(f"{name} score rescale",
                                   self.sc(q) * self.sc(k) / math.sqrt(d) * 2.0 ** E / math.log(2.0))
        m_o, n_o = self.mult_shift(f"{name} output rescale", self.sc(v) * 2.0 ** -L / self.sc(name))
        j = np.arange(1 << E, dtype=np.float64)
        exp_table = Q.rnd(np.exp2(X - j / 2.0 ** E)).astype(np.int64)
        thr = Q.thresholds(sq, P)
        dec = Q.decode_table(sq, L)
        lo, hi = self.out_range(name)
        attrs = {"heads": int(heads), "zp_q": self.zp(q), "zp_k": self.zp(k), "zp_v": self.zp(v),
                 "score_mult": m_s, "score_shift": n_s, "exp_frac_bits": E, "exp_bits": X, "prob_bits": P,
                 "recip_frac": G, "decode_bits": L, "mult": m_o, "shift": n_o, "zp": self.zp(name),
                 "lo": lo, "hi": hi, "softmax_quant": sq.to_dict()}
        self.op(name, "attention", [q, k, v], attrs,
                {"exp_table": exp_table, "thresholds": thr, "decode": dec, "levels": sq.levels()})

    def gelu(self, name: str, x: str) -> None:
        """Section 4.5: table[i] = sat(rnd(gelu((i - 2^(g-1)) s_x) / s_y) + zp)."""
        g = self.values[x]["bits"]
        z = (np.arange(1 << g, dtype=np.float64) - (1 << (g - 1))) * self.sc(x)
        phi = 0.5 * (1.0 + np.array([math.erf(t / math.sqrt(2.0)) for t in z]))
        lo, hi = self.out_range(name)
        table = np.clip(Q.rnd(z * phi / self.sc(name)) + self.zp(name), lo, hi).astype(np.int32)
        self.op(name, "gelu", [x], {}, {"table": table})

    def add(self, name: str, a: str, skip: str) -> None:
        """Section 4.6: y = sat(a + rq(skip, s_skip / s_y))."""
        m, n = self.mult_shift(name, self.sc(skip) / self.sc(name))
        lo, hi = self.out_range(name)
        self.op(name, "add", [a, skip], {"mult": m, "shift": n, "lo": lo, "hi": hi}, {})


def emit_block(b: "_Builder", pre: str, r: str, bc, T: int, D: int, A: int, hidden: int, attention) -> str:
    """Values and ops of one transformer block (spec 4.1, 4.3-4.6) reading the residual value ``r``
    (T tokens, D channels; q/k/v and the attention output have A channels, the MLP ``hidden``);
    ``attention(core, q, k, v)`` emits the attention op. Returns the block's output value name."""
    R, g = b.s["residual_bits"], b.s["gelu_bits"]
    n1, q, k, v = f"{pre}.norm1", f"{pre}.attn.q", f"{pre}.attn.k", f"{pre}.attn.v"
    core, proj, add1 = f"{pre}.attn.core", f"{pre}.attn.proj", f"{pre}.add1"
    n2, fc1, ge, fc2, add2 = f"{pre}.norm2", f"{pre}.mlp.fc1", f"{pre}.mlp.gelu", f"{pre}.mlp.fc2", f"{pre}.add2"
    b.codes(n1, [T, D], bc.norm1.act)
    b.layernorm(n1, r, bc.norm1, "all")
    for name, lin, act in ((q, bc.q, bc.q_act), (k, bc.k, bc.k_act), (v, bc.v, bc.v_act)):
        b.codes(name, [T, A], act)
        b.linear(name, n1, lin)
    b.codes(core, [T, A], bc.core)
    attention(core, q, k, v)
    b.value(proj, "int", R, [T, D], bc.res1)
    b.linear(proj, core, bc.proj)
    b.value(add1, "int", R, [T, D], bc.res1)
    b.add(add1, proj, r)
    b.codes(n2, [T, D], bc.norm2.act)
    b.layernorm(n2, add1, bc.norm2, "all")
    b.value(fc1, "int", g, [T, hidden], bc.fc1_scale)
    b.linear(fc1, n2, bc.fc1)
    b.codes(ge, [T, hidden], bc.gelu)
    b.gelu(ge, fc1)
    b.value(fc2, "int", R, [T, D], bc.res2)
    b.linear(fc2, ge, bc.fc2)
    b.value(add2, "int", R, [T, D], bc.res2)
    b.add(add2, fc2, add1)
    return add2


def build_program(mc: ModelCalib, settings: dict[str, int], provenance: dict[str, Any]) -> Program:
    """The integer program of a calibrated model (validated; section 8 bounds asserted)."""
    check_settings(settings)
    s = settings
    R = s["residual_bits"]
    b = _Builder(s)
    H = W = mc.img_size
    p = mc.patch_size
    T, D = mc.pos.shape
    hidden = mc.blocks[0].fc1.weight.w.shape[0] if mc.blocks else 4 * D
    C = mc.head.weight.w.shape[0]

    # image and patch embedding (4.2)
    b.value("image", "image", 8, [3, H, W], 1.0, 0)
    b.value("patch_embed", "int", R, [T, D], mc.res0)
    t = b.gemm("patch_embed", mc.patch, 1.0, 0, mc.res0)
    pos = Q.rnd(mc.pos / mc.res0)
    if np.abs(pos).max() >= 2 ** 31:
        raise ExportError("patch_embed: position table does not fit int32")
    t["pos"] = pos.astype(np.int32)
    t["pos_float"] = mc.pos.astype(np.float32)
    lo, hi = b.out_range("patch_embed")
    b.op("patch_embed", "patch_embed", ["image"], {"patch": p, "lo": lo, "hi": hi}, t)

    r = "patch_embed"
    for i, bc in enumerate(mc.blocks):
        r = emit_block(b, f"blocks.{i}", r, bc, T, D, D, hidden,
                       lambda core, q, k, v, bc=bc: b.attention(core, q, k, v, mc.num_heads, bc.softmax))

    b.codes("norm", [1, D], mc.norm.act)
    b.layernorm("norm", r, mc.norm, "first")
    b.value("head", "int", s["logit_bits"], [1, C], mc.logit_scale)
    b.linear("head", "norm", mc.head)

    header = {
        "format": FORMAT,
        "version": VERSION,
        "model": {"arch": "vit", "img_size": int(H), "patch_size": int(p), "embed_dim": int(D),
                  "depth": len(mc.blocks), "num_heads": int(mc.num_heads), "num_classes": int(C),
                  "num_tokens": int(T), "mlp_hidden": int(hidden), "ln_eps": float(mc.eps)},
        "settings": dict(sorted(s.items())),
        "provenance": provenance,
        "inputs": ["image"],
        "output": "head",
        "values": b.values,
        "ops": b.ops,
        "export": {"bias_saturated": dict(sorted(b.bias_saturated.items()))},
    }
    prog = Program(header, b.tensors)
    validate(prog, where="exported program")
    check_bounds(prog)
    return prog


def check_bounds(prog: Program) -> None:
    """Assert every bound of section 8 on the constants of a program (raises ``ExportError``)."""
    s = prog.settings
    check_settings(s)
    B, A = s["mult_bits"], s["acc_bits"]

    def ms(where: str, m, n) -> None:
        m, n = np.asarray(m, np.int64), np.asarray(n, np.int64)
        if m.min(initial=0) < 0 or m.max(initial=0) > (1 << (B - 1)) - 1:
            raise ExportError(f"{where}: multiplier outside 0..2^{B - 1}-1")
        if n.min(initial=0) < 0 or n.max(initial=0) > 62:
            raise ExportError(f"{where}: shift outside 0..62")

    for op in prog.ops:
        name, typ, a = op["name"], op["type"], op["attrs"]
        if typ in ("linear", "patch_embed"):
            ms(name, prog.t(op, "mult"), prog.t(op, "shift"))
            if np.abs(prog.t(op, "bias")).max(initial=0) >= 1 << (A - 1):
                raise ExportError(f"{name}: |bias| >= 2^{A - 1}")
            if np.abs(prog.t(op, "w").astype(np.int64)).max(initial=0) > (1 << s["wbits"]) - 1:
                raise ExportError(f"{name}: weights outside +-(2^wbits - 1)")
        elif typ == "layernorm":
            ms(name, 0, a["shift"])
            if prog.t(op, "gmul").shape[0] > 4096:
                raise ExportError(f"{name}: D > 4096")
            if np.abs(prog.t(op, "gmul")).max(initial=0) >= 1 << (B - 1):
                raise ExportError(f"{name}: |gmul| >= 2^{B - 1}")
            if np.abs(prog.t(op, "gadd")).max(initial=0) >= _LN_GADD_LIMIT:
                raise ExportError(f"{name}: |gadd| >= 2^55")
            if a["recip_bits"] > 48 or a["norm_frac"] > 20:
                raise ExportError(f"{name}: recip_bits > 48 or norm_frac > 20")
        elif typ == "attention":
            ms(name, [a["score_mult"], a["mult"]], [a["score_shift"], a["shift"]])
            if a["exp_bits"] > 30 or a["prob_bits"] + a["recip_frac"] > 48 or a["exp_frac_bits"] > 12:
                raise ExportError(f"{name}: softmax widths out of bounds")
            n = (1 << s["abits"]) - 1
            if prog.t(op, "thresholds").shape != (n,) or prog.t(op, "decode").shape != (n + 1,):
                raise ExportError(f"{name}: threshold / decode tables of the wrong size")
            if prog.t(op, "exp_table").shape != (1 << a["exp_frac_bits"],):
                raise ExportError(f"{name}: exp table of the wrong size")
        elif typ == "gelu":
            if prog.t(op, "table").shape != (1 << s["gelu_bits"],):
                raise ExportError(f"{name}: GELU table of the wrong size")
        elif typ == "add":
            ms(name, a["mult"], a["shift"])
