"""``patch_embed``: patchify, GEMM, position embedding, class token (docs/integer-spec.md section 4.2).

Everything about this op type except its golden function (``reference.golden``) lives here:
its schema, its export from calibration state, its fake-quant forward, its engine builder and
its cost figures.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from intsim.kernels.epilogues import linear_epilogue
from intsim.program.fixedpoint import ExportError
from intsim.program.program import Program, ProgramError
from intsim.program.quantizers import rnd

from . import linear
from .base import EPI_ROWS_PER_TASK, check_in, check_shape, i64, tensor64
from .linear import LinearEngine

NAME = "patch_embed"
SPEC = "4.2"
INPUTS = 1
ATTRS = ('patch', 'lo', 'hi')
# tensor name -> (dtype, shape symbols); the symbols are listed in intsim.ops.base.SHAPE_SYMBOLS
TENSORS = {
    "w": ('int16', ('N', 'K')),
    "bias": ('int64', ('N',)),
    "mult": ('int32', ('N',)),
    "shift": ('int32', ('N',)),
    "pos": ('int32', ('T', 'N')),
}
# tensors read only by the fake-quant reference
FLOAT = {
    "w_scale": ('float64', ('N',)),
    "bias_float": ('float32', ('N',)),
    "pos_float": ('float32', ('T', 'N')),
}


def shape_dims(op: dict[str, Any], in_shape: list[int]) -> dict[str, int]:
    """Shape symbols of this op's schema beyond the generic ones: K = C * patch^2."""
    p = op["attrs"]["patch"]
    return {"K": in_shape[0] * p * p}


# ---- export: calibration state -> program attrs and tensors (called by calib) ----------------
def export(b, name: str, x: str, lin, pos: np.ndarray, patch: int) -> None:
    """Append the ``patch_embed`` op ``name`` reading the image value ``x`` (scale 1, zero point 0);
    the output value ``name`` (``int``, the first residual) must already be declared.
    ``lin``: the calibrated ``patch`` x ``patch`` convolution as a (D, 3 patch^2) layer (see
    :func:`intsim.ops.linear.gemm_tensors`); ``pos``: the folded position table (T, D) float64,
    stored as ``rnd(pos / s_y)``."""
    s_y = b.sc(name)
    t = linear.gemm_tensors(b, name, lin, 1.0, 0, s_y)
    q = rnd(pos / s_y)
    if np.abs(q).max() >= 2 ** 31:
        raise ExportError(f"{name}: position table does not fit int32")
    t["pos"] = q.astype(np.int32)
    t["pos_float"] = pos.astype(np.float32)
    lo, hi = b.out_range(name)
    b.op(name, NAME, [x], {"patch": int(patch), "lo": lo, "hi": hi}, t)


def check_bounds(prog, op) -> None:
    """Section 8: as a ``linear`` op (:func:`intsim.ops.linear.check_bounds`); the image (C, H, W)
    divides into patches (``patch >= 1``) and the output has ``(H/p)(W/p) + 1`` tokens."""
    linear.check_bounds(prog, op)
    name, p = op["name"], op["attrs"]["patch"]
    shape = prog.values[op["inputs"][0]]["shape"]
    check_in(name, "patch", p, 1, min(shape[-2:]) if len(shape) == 3 else 1)
    if len(shape) != 3 or shape[1] % p or shape[2] % p:
        raise ExportError(f"{name}: image shape = {shape} breaks (C, H, W) with H and W multiples of patch = {p}")
    n_out = prog.values[op["output"]]["shape"][-1]
    check_shape(prog, op, op["output"], [(shape[1] // p) * (shape[2] // p) + 1, n_out], "one token per patch plus the class token")


# ---- fake-quant forward: the paper's semantics in float (called by reference.fakequant) -------
# ``ctx`` is a reference.fakequant.FakeQuantContext (program, dtype, eps, params, ``ctx.F`` = the float
# functions of reference.functional); the model quantize-dequantizes the output value after the op.

def fq_prepare(ctx, op) -> dict:
    """Float convolution weight ``w * w_scale`` as (N, 3, p, p), ``bias_float`` and ``pos_float``."""
    t, p = ctx.program.t, int(op["attrs"]["patch"])
    w = t(op, "w").astype(np.float64) * t(op, "w_scale")[:, None]
    return {"w": ctx.tensor(w.reshape(w.shape[0], 3, p, p)), "b": ctx.tensor(t(op, "bias_float")),
            "pos": ctx.tensor(t(op, "pos_float"))}


def fq_forward(ctx, op, x):
    """Images (B, 3, H, W) -> convolution, zero class-token row, + position: (B, T, N)."""
    p = ctx.params[op["name"]]
    return ctx.F.patch_embed(x, p["w"], p["b"], int(op["attrs"]["patch"]), p["pos"])


# ---- engine: route choice, exactness proof, kernel call (called by intsim.engine) -------------
class PatchEmbedEngine(LinearEngine):
    """Spec 4.2 on the engine: the patch vectors of the image through the linear GEMM and epilogue,
    the position embedding added after requantization, the class token row clamped."""

    def epilogue_add(self) -> np.ndarray:
        self.patch = self.a("patch")
        pos = i64(self.t("pos"))
        self.pos_cls = pos[0].copy()
        return np.ascontiguousarray(pos[1:])

    def patchify(self, img: np.ndarray, dtype: Any) -> tuple[np.ndarray, int]:
        """Patch vectors (B * P, C * p * p) in ``dtype`` and P (spec 4.2)."""
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
        x = np.ascontiguousarray(img.reshape(B, C, gh, p, gw, p).transpose(0, 2, 4, 1, 3, 5), dtype=dtype)
        return x.reshape(B * P, C * p * p), P

    def patch_embed_into(self, x: np.ndarray, B: int, P: int, y: np.ndarray) -> dict[str, int]:
        """GEMM + epilogue of the patch vectors ``x`` into ``y`` (B, P + 1, N) (int64), class token included."""
        S = self.gemm(x)
        na, no = linear_epilogue(S, self.cols, self.add, self.acc_lo, self.acc_hi, self.narrow, P, 1, y,
                                 EPI_ROWS_PER_TASK)
        cls = np.clip(self.pos_cls, self.lo, self.hi)
        y[:, 0, :] = cls
        ncls = int(np.count_nonzero(cls != self.pos_cls)) * B
        return {"acc": int(na), "out": int(no) + ncls, "prob": 0}

    def forward(self, img: np.ndarray) -> tuple[np.ndarray, dict[str, int]]:
        img = np.asarray(img)
        if img.dtype.kind not in "iu":
            raise TypeError(f"op '{self.name}': integer input expected, got dtype {img.dtype}")
        x, P = self.patchify(img, self.gemm.input_dtype())
        B = img.shape[0]
        y = np.empty((B, P + 1, self.bias.shape[0]), np.int64)
        c = self.patch_embed_into(x, B, P, y)
        return y, c


ENGINE = PatchEmbedEngine


# ---- cost figures: MACs, bit operations, storage (called by intsim.studies.cost) -------------
def cost(prog: Program, op: dict[str, Any], c: dict[str, Any]) -> None:
    """The GEMM's figures (as ``linear``) plus the position-embedding table; fills ``c`` in place."""
    linear.cost(prog, op, c)
    c["table_bits"] = int(np.prod(prog.t(op, "pos").shape)) * prog.values[op["output"]]["bits"]


scratch_bits = linear.scratch_bits


# ---- test vectors: the arrays a hardware testbench checks (called by intsim.studies.vectors) ---

#: the op's inputs by role, in input order
VECTOR_ROLES = ("image",)


def vector_arrays(program: Program, op: dict[str, Any], steps: dict[str, np.ndarray]) -> list[tuple]:
    """The patch vectors, then the arrays of ``linear`` (with the position table instead of ``zp``)."""
    return [("x", steps["x"], 8, False, "intermediate",
             "patch vectors x[t-1, (ch p + ky) p + kx] = image[ch, i p + ky, j p + kx], t = 1 + i (W/p) + j")] \
        + linear.vector_arrays(program, op, steps)


# ---- onnx lowering: the op as standard ONNX nodes (called by intsim.onnx_export) -------------
def lower_patches(g, image: str, shape: list[int], p: int) -> str:
    """x[b, i*(W/p) + j, (ch*p + ky)*p + kx] = image[b, ch, i*p + ky, j*p + kx] (Reshape, Transpose, Reshape)."""
    C, H, W = shape
    if H % p or W % p:
        raise ProgramError(f"onnx export: image {H} x {W} is not a multiple of the patch size {p}")
    x = g.reshape(image, [-1, C, H // p, p, W // p, p])
    x = g.transpose(x, [0, 2, 4, 1, 3, 5])
    return g.reshape(x, [-1, (H // p) * (W // p), C * p * p])


def lower_onnx(g, op: dict[str, Any], prog: Program, inputs: list[str]) -> str:
    """4.2: patch vectors, the GEMM of 4.1, then ``Pad`` one zero token in front (the class token) so
    that y = sat([0; rq(acc)] + pos, lo, hi) gives y[0] = sat(pos[0]) and y[t] = sat(rq(acc[t]) + pos[t])."""
    (image,) = inputs
    at = op["attrs"]
    x = lower_patches(g, image, prog.values[op["inputs"][0]]["shape"], at["patch"])
    acc = linear.lower_gemm(g, op, prog, x)
    r = g.rq(acc, tensor64(prog, op, "mult"), tensor64(prog, op, "shift"), amax=2 ** (prog.settings["acc_bits"] - 1))
    r = g.node("Pad", [r, g.i64([0, 1, 0, 0, 0, 0])], name="class_token", mode="constant")
    return g.sat(g.add(r, g.const("pos", tensor64(prog, op, "pos"))), at["lo"], at["hi"])
