"""The engine: prepares every op of a program once and dispatches the Numba kernels.

Python only dispatches: per op it reshapes int64 arrays and calls one kernel (or one float64
matrix product for the GEMM when that product is provably exact). Every integer the kernels use
comes from the program (tensors and attributes); the engine reads no float scale for computation
and computes no constant of its own. The only setting it reads is ``acc_bits`` (the accumulator
range of ``accsat``) and ``gelu_bits`` (the offset of the GELU table).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from program.format import Program, ProgramError, validate

from . import kernels as K

#: A float64 sum of integer products is exact when every partial sum stays below this bound.
FLOAT_EXACT_BOUND = 2 ** 53

COUNT_KEYS = ("acc", "out", "prob")

GEMM_MODES = ("auto", "float", "int")


def _zero_counts() -> dict[str, int]:
    return {k: 0 for k in COUNT_KEYS}


def _i64(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.int64)


def _int(v: Any, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise ProgramError(f"{what} must be an integer, got {v!r}")
    return int(v)


def _check_shifts(name: str, shifts: np.ndarray) -> None:
    if shifts.size and (shifts.max() > 62 or shifts.min() < -62):
        raise ProgramError(f"op '{name}': shift outside -62..62 (min {shifts.min()}, max {shifts.max()})")


def _as_int_input(x: np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(x)
    if x.dtype.kind not in "iu":
        raise TypeError(f"op '{name}': integer input expected, got dtype {x.dtype}")
    return _i64(x)


@dataclass
class EngineResult:
    """Output of :meth:`Engine.run`."""

    logits: np.ndarray            # int64 (B, num_classes)
    scale: float                  # float scale of the logits (program.values[output]["scale"])
    counts: dict[str, dict[str, int]] = field(default_factory=dict)  # op name -> {"acc","out","prob"}


class _Gemm:
    """``S = x @ w.T`` exactly: float64 BLAS when every partial sum is below 2^53, else int64 kernel."""

    def __init__(self, w: np.ndarray, mode: str):
        if mode not in GEMM_MODES:
            raise ValueError(f"gemm mode must be one of {GEMM_MODES}, got {mode!r}")
        self.w = _i64(w)                                   # (N, K)
        self.wt_f = np.ascontiguousarray(self.w.T, dtype=np.float64)  # (K, N)
        self.wmax = int(np.abs(self.w).max()) if self.w.size else 0
        self.K = self.w.shape[1]
        self.mode = mode
        self.last_route = ""

    def float_exact(self, xmax: int) -> bool:
        return xmax * self.wmax * self.K < FLOAT_EXACT_BOUND

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """x: int64 (M, K) -> int64 (M, N)."""
        if self.mode == "int":
            use_float = False
        else:
            xmax = int(np.abs(x).max()) if x.size else 0
            use_float = self.float_exact(xmax)
            if self.mode == "float" and not use_float:
                raise ValueError(f"float64 GEMM would not be exact: max|x|={xmax}, max|w|={self.wmax}, K={self.K}")
        if use_float:
            self.last_route = "float"
            S = x.astype(np.float64) @ self.wt_f
            return S.astype(np.int64)
        self.last_route = "int"
        return K.gemm_i64(x, self.w)


class _Op:
    """An op with its integer constants converted once; ``__call__(*inputs) -> (y, counts)``."""

    def __init__(self, program: Program, op: dict[str, Any], gemm: str = "auto"):
        self.name = op["name"]
        self.type = op["type"]
        self.inputs = list(op["inputs"])
        self.output = op["output"]
        attrs = op.get("attrs", {})
        self.attrs = attrs
        settings = program.settings
        acc_bits = _int(settings["acc_bits"], "settings.acc_bits")
        if not 2 <= acc_bits <= 64:
            raise ProgramError(f"settings.acc_bits={acc_bits} outside 2..64")
        self.acc_lo = -(1 << (acc_bits - 1))
        self.acc_hi = (1 << (acc_bits - 1)) - 1
        name = self.name
        t = lambda n: program.t(op, n)  # noqa: E731
        a = lambda n: _int(attrs[n], f"op '{name}' attribute '{n}'")  # noqa: E731
        fn: Callable[..., tuple[np.ndarray, dict[str, int]]]

        if self.type in ("linear", "patch_embed"):
            self.gemm = _Gemm(t("w"), gemm)
            self.bias = _i64(t("bias"))
            self.mult = _i64(t("mult"))
            self.shift = _i64(t("shift"))
            _check_shifts(name, self.shift)
            self.lo, self.hi = a("lo"), a("hi")
            if self.type == "linear":
                self.add = _i64(t("zp")).reshape(1, -1)
                fn = self._linear
            else:
                self.patch = a("patch")
                pos = _i64(t("pos"))
                self.pos_cls = pos[0].copy()
                self.add = np.ascontiguousarray(pos[1:])
                fn = self._patch_embed
        elif self.type == "layernorm":
            self.gmul = _i64(t("gmul"))
            self.gadd = _i64(t("gadd"))
            self.tokens = attrs["tokens"]
            if self.tokens not in ("all", "first"):
                raise ProgramError(f"op '{name}': layernorm tokens must be 'all' or 'first', got {self.tokens!r}")
            self.recip_bits, self.norm_frac = a("recip_bits"), a("norm_frac")
            self.ln_shift, self.zp, self.lo, self.hi = a("shift"), a("zp"), a("lo"), a("hi")
            if not 0 <= self.recip_bits <= 61:
                raise ProgramError(f"op '{name}': recip_bits={self.recip_bits} outside 0..61")
            _check_shifts(name, np.array([self.ln_shift, self.recip_bits - self.norm_frac]))
            fn = self._layernorm
        elif self.type == "attention":
            self.heads = a("heads")
            self.zp_q, self.zp_k, self.zp_v = a("zp_q"), a("zp_k"), a("zp_v")
            self.score_mult, self.score_shift = a("score_mult"), a("score_shift")
            self.exp_frac_bits, self.prob_bits = a("exp_frac_bits"), a("prob_bits")
            self.recip_frac = a("recip_frac")
            self.mult, self.shift_ = a("mult"), a("shift")
            self.zp, self.lo, self.hi = a("zp"), a("lo"), a("hi")
            self.exp_table = _i64(t("exp_table"))
            self.thresholds = _i64(t("thresholds"))
            self.decode = _i64(t("decode"))
            if self.exp_table.shape[0] != 1 << self.exp_frac_bits:
                raise ProgramError(f"op '{name}': exp_table has {self.exp_table.shape[0]} entries, "
                                   f"expected 2^exp_frac_bits = {1 << self.exp_frac_bits}")
            if self.decode.shape[0] != self.thresholds.shape[0] + 1:
                raise ProgramError(f"op '{name}': decode must have one entry more than thresholds")
            if not 0 <= self.prob_bits + self.recip_frac <= 61:
                raise ProgramError(f"op '{name}': prob_bits + recip_frac outside 0..61")
            if self.exp_table.size == 0 or self.exp_table[0] < 1:
                raise ProgramError(f"op '{name}': exp_table[0] must be positive (it is 2^exp_bits)")
            _check_shifts(name, np.array([self.score_shift, self.shift_, self.recip_frac]))
            self.sorted_thresholds = int(bool(np.all(np.diff(self.thresholds) >= 0)))
            fn = self._attention
        elif self.type == "gelu":
            self.table = _i64(t("table"))
            g = _int(settings["gelu_bits"], "settings.gelu_bits")
            if self.table.shape[0] != 1 << g:
                raise ProgramError(f"op '{name}': gelu table has {self.table.shape[0]} entries, expected 2^{g}")
            self.offset = 1 << (g - 1)
            fn = self._gelu
        elif self.type == "add":
            self.mult, self.shift_ = a("mult"), a("shift")
            self.lo, self.hi = a("lo"), a("hi")
            _check_shifts(name, np.array([self.shift_]))
            fn = self._add
        else:
            raise ProgramError(f"op '{name}': unknown op type {self.type!r}")
        self._fn = fn

    # ---- dispatch --------------------------------------------------------------------------
    def __call__(self, *inputs: np.ndarray) -> tuple[np.ndarray, dict[str, int]]:
        if len(inputs) != len(self.inputs):
            raise TypeError(f"op '{self.name}' ({self.type}) takes {len(self.inputs)} inputs, got {len(inputs)}")
        return self._fn(*inputs)

    def _linear(self, x: np.ndarray) -> tuple[np.ndarray, dict[str, int]]:
        x = _as_int_input(x, self.name)
        Kdim = self.gemm.K
        if x.shape[-1] != Kdim:
            raise ValueError(f"op '{self.name}': input has {x.shape[-1]} channels, expected {Kdim}")
        lead = x.shape[:-1]
        S = self.gemm(x.reshape(-1, Kdim))
        y, na, no = K.gemm_epilogue(S, self.bias, self.mult, self.shift, self.add,
                                    self.lo, self.hi, self.acc_lo, self.acc_hi)
        return y.reshape(*lead, -1), {"acc": int(na), "out": int(no), "prob": 0}

    def _patch_embed(self, img: np.ndarray) -> tuple[np.ndarray, dict[str, int]]:
        img = _as_int_input(img, self.name)
        if img.ndim != 4:
            raise ValueError(f"op '{self.name}': image batch (B, C, H, W) expected, got shape {img.shape}")
        B, C, H, W = img.shape
        p = self.patch
        if H % p or W % p:
            raise ValueError(f"op '{self.name}': image {H}x{W} is not a multiple of the patch size {p}")
        gh, gw = H // p, W // p
        P = gh * gw
        if P != self.add.shape[0] or C * p * p != self.gemm.K:
            raise ValueError(f"op '{self.name}': image shape {img.shape} does not match the program")
        # x[b, 1 + i*gw + j, (ch*p + ky)*p + kx] = img[b, ch, i*p + ky, j*p + kx]
        x = np.ascontiguousarray(img.reshape(B, C, gh, p, gw, p).transpose(0, 2, 4, 1, 3, 5)).reshape(B * P, C * p * p)
        S = self.gemm(x)
        yp, na, no = K.gemm_epilogue(S, self.bias, self.mult, self.shift, self.add,
                                     self.lo, self.hi, self.acc_lo, self.acc_hi)
        N = yp.shape[1]
        y = np.empty((B, P + 1, N), np.int64)
        y[:, 1:, :] = yp.reshape(B, P, N)
        cls = np.clip(self.pos_cls, self.lo, self.hi)
        y[:, 0, :] = cls
        ncls = int(np.count_nonzero(cls != self.pos_cls)) * B
        return y, {"acc": int(na), "out": int(no) + ncls, "prob": 0}

    def _layernorm(self, x: np.ndarray) -> tuple[np.ndarray, dict[str, int]]:
        x = _as_int_input(x, self.name)
        if x.ndim != 3 or x.shape[-1] != self.gmul.shape[0]:
            raise ValueError(f"op '{self.name}': input (B, T, {self.gmul.shape[0]}) expected, got {x.shape}")
        B, T, D = x.shape
        rows = np.ascontiguousarray(x[:, 0, :]) if self.tokens == "first" else x.reshape(B * T, D)
        y, no = K.layernorm_rows(rows, self.gmul, self.gadd, self.recip_bits, self.norm_frac,
                                 self.ln_shift, self.zp, self.lo, self.hi)
        return y.reshape(B, -1, D), {"acc": 0, "out": int(no), "prob": 0}

    def _attention(self, q: np.ndarray, k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, dict[str, int]]:
        q, k, v = (_as_int_input(z, self.name) for z in (q, k, v))
        if q.ndim != 3 or q.shape != k.shape or q.shape != v.shape or q.shape[2] % self.heads:
            raise ValueError(f"op '{self.name}': q, k, v must share a shape (B, T, H*d), got {q.shape}, {k.shape}, {v.shape}")
        y, na, no, npr = K.attention(
            q, k, v, self.heads, self.zp_q, self.zp_k, self.zp_v, self.score_mult, self.score_shift,
            self.exp_frac_bits, self.prob_bits, self.recip_frac, self.mult, self.shift_, self.zp,
            self.lo, self.hi, self.acc_lo, self.acc_hi, self.exp_table, self.thresholds, self.decode,
            self.sorted_thresholds)
        return y, {"acc": int(na), "out": int(no), "prob": int(npr)}

    def _gelu(self, x: np.ndarray) -> tuple[np.ndarray, dict[str, int]]:
        x = _as_int_input(x, self.name)
        y, bad = K.gelu_lookup(x.reshape(-1), self.table, self.offset)
        if bad:
            raise ValueError(f"op '{self.name}': {int(bad)} GELU inputs outside the table range "
                             f"[{-self.offset}, {self.offset - 1}]")
        return y.reshape(x.shape), _zero_counts()

    def _add(self, a: np.ndarray, skip: np.ndarray) -> tuple[np.ndarray, dict[str, int]]:
        a = _as_int_input(a, self.name)
        skip = _as_int_input(skip, self.name)
        if a.shape != skip.shape:
            raise ValueError(f"op '{self.name}': a {a.shape} and skip {skip.shape} differ in shape")
        cols = a.shape[-1] if a.ndim and a.shape[-1] else 1
        y, no = K.add_requant(a.reshape(-1), skip.reshape(-1), self.mult, self.shift_, self.lo, self.hi, cols)
        return y.reshape(a.shape), {"acc": 0, "out": int(no), "prob": 0}


class Engine:
    """Runs an integer program on uint8 images, bit-exactly as ``docs/integer-spec.md``.

    ``gemm`` selects the GEMM route of ``linear``/``patch_embed``: ``"auto"`` (float64 BLAS when
    provably exact, else the int64 kernel), ``"float"`` (error when not exact) or ``"int"``.
    """

    def __init__(self, program: Program, *, gemm: str = "auto"):
        validate(program)
        self.program = program
        inputs = program.header["inputs"]
        if len(inputs) != 1 or program.values[inputs[0]]["kind"] != "image":
            raise ProgramError(f"the engine runs programs with one image input, got inputs {inputs}")
        self.input = inputs[0]
        self.output = program.output
        self.scale = float(program.values[self.output]["scale"])
        self.ops = [_Op(program, op, gemm) for op in program.ops]

    def forward(self, images: np.ndarray, keep: bool = False
                ) -> tuple[np.ndarray, dict[str, dict[str, int]], dict[str, np.ndarray]]:
        """One batch: returns (output value, counts per op, all values if ``keep`` else {})."""
        vals: dict[str, np.ndarray] = {self.input: images}
        counts: dict[str, dict[str, int]] = {}
        for op in self.ops:
            y, c = op(*(vals[i] for i in op.inputs))
            vals[op.output] = y
            counts[op.name] = c
        out = vals[self.output]
        return out, counts, (vals if keep else {})

    def run(self, images: np.ndarray, batch_size: int = 32) -> EngineResult:
        images = np.asarray(images)
        shape = tuple(self.program.values[self.input]["shape"])
        if images.ndim != 4 or tuple(images.shape[1:]) != shape:
            raise ValueError(f"images must have shape (B, {', '.join(map(str, shape))}), got {images.shape}")
        if images.dtype != np.uint8:
            if images.dtype.kind not in "iu" or (images.size and (images.min() < 0 or images.max() > 255)):
                raise TypeError(f"images must be uint8 pixels 0..255, got dtype {images.dtype}")
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        counts = {op.name: _zero_counts() for op in self.ops}
        outs = []
        for s in range(0, images.shape[0], batch_size):
            out, c, _ = self.forward(images[s:s + batch_size])
            outs.append(out)
            for name, cc in c.items():
                for key, n in cc.items():
                    counts[name][key] += n
        out_shape = tuple(self.program.values[self.output]["shape"])
        if outs:
            logits = np.concatenate(outs, axis=0)
        else:
            logits = np.zeros((0, *out_shape), np.int64)
        if logits.ndim == 3 and logits.shape[1] == 1:
            logits = logits[:, 0, :]
        return EngineResult(logits=logits, scale=self.scale, counts=counts)


def run_op(program: Program, op: dict[str, Any] | str, *inputs: np.ndarray, gemm: str = "auto"
           ) -> tuple[np.ndarray, dict[str, int]]:
    """Run one op (given as its dict or its name) of ``program`` on int64 inputs: ``(y, counts)``."""
    if isinstance(op, str):
        op = program.op(op)
    return _Op(program, op, gemm)(*inputs)
