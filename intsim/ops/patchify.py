"""``patchify``: image to patch vectors (layout only) (docs/integer-spec.md section 9.1).

Everything about this op type except its golden function (``reference.golden``) lives here:
its schema, its export from calibration state, its fake-quant forward, its engine builder and
its cost figures.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from intsim.program.program import Program, ProgramError

from . import patch_embed
from .base import EngineOp, int_attr, ints, zero_counts
from intsim.program.fixedpoint import ExportError
from .base import check_in, check_shape

NAME = "patchify"
SPEC = "9.1"
INPUTS = 1
ATTRS = ('patch',)
# tensor name -> (dtype, shape symbols); the symbols are listed in intsim.ops.base.SHAPE_SYMBOLS
TENSORS = {}
# tensors read only by the fake-quant reference
FLOAT = {}


# ---- export: calibration state -> program attrs and tensors (called by calib) ----------------
def export(b, name: str, x: str, patch: int) -> None:
    """Declare the value ``name`` and append the ``patchify`` op (section 9.1) that lays the image
    ``x`` (3, H, W) out as (H/p W/p, 3 p p) pixel codes (8 bits, scale 1, zero point 0)."""
    _, H, W = b.values[x]["shape"]
    p = int(patch)
    b.value(name, "codes", 8, [(H // p) * (W // p), 3 * p * p], 1.0, 0)
    b.op(name, NAME, [x], {"patch": p}, {})


def check_bounds(prog, op) -> None:
    """Section 8 puts no bound on a layout op; the image (C, H, W) must divide into patches
    (``patch >= 1``) and the output be ``((H/p)(W/p), C p p)``."""
    name, p = op["name"], op["attrs"]["patch"]
    shape = prog.values[op["inputs"][0]]["shape"]
    check_in(name, "patch", p, 1, min(shape[-2:]) if len(shape) == 3 else 1)
    if len(shape) != 3 or shape[1] % p or shape[2] % p:
        raise ExportError(f"{name}: image shape = {shape} breaks (C, H, W) with H and W multiples of patch = {p}")
    check_shape(prog, op, op["output"], [(shape[1] // p) * (shape[2] // p), shape[0] * p * p], "the patch layout")


# ---- fake-quant forward: the paper's semantics in float (called by reference.fakequant) -------
# ``ctx`` is a reference.fakequant.FakeQuantContext (program, dtype, eps, params, ``ctx.F`` = the float
# functions of reference.functional); the model quantize-dequantizes the output value after the op.

def fq_forward(ctx, op, x):
    """Images (B, 3, H, W) -> patches as channels (B, T, 3 p p) (layout only)."""
    return ctx.F.patchify(x, int(op["attrs"]["patch"]))


# ---- engine: route choice, exactness proof, kernel call (called by intsim.engine) -------------
class PatchifyEngine(EngineOp):
    """Spec 9.1 on the engine: the image as patch vectors (layout only; values 0..255)."""

    def __init__(self, program: Program, op: dict[str, Any], gemm: str = "auto",
                 ranges: list[tuple[int, int] | None] | None = None, f32_max_k: int | None = None):
        super().__init__(program, op, gemm, ranges, f32_max_k)
        self.patch = int_attr(op["attrs"]["patch"], f"op '{self.name}' attribute 'patch'")
        if self.patch < 1:
            raise ProgramError(f"op '{self.name}': patch must be >= 1")
        self.lo, self.hi = 0, 255

    def forward(self, img):
        (img,) = ints(img)
        if img.ndim != 4:
            raise ValueError(f"op '{self.name}': image batch (B, C, H, W) expected, got {img.shape}")
        B, C, H, W = img.shape
        p = self.patch
        if H % p or W % p:
            raise ValueError(f"op '{self.name}': image {H}x{W} is not a multiple of the patch size {p}")
        x = img.reshape(B, C, H // p, p, W // p, p).transpose(0, 2, 4, 1, 3, 5)
        return np.ascontiguousarray(x).reshape(B, (H // p) * (W // p), C * p * p), zero_counts()


ENGINE = PatchifyEngine


# ---- cost figures: MACs, bit operations, storage (called by intsim.studies.cost) -------------
def cost(prog: Program, op: dict[str, Any], c: dict[str, Any]) -> None:
    """No MACs, weights or tables (the cost model counts GEMMs and stored constants)."""


def scratch_bits(prog: Program, op: dict[str, Any]) -> int:
    return 0


# ---- onnx lowering: the op as standard ONNX nodes (called by intsim.onnx_export) -------------
def lower_onnx(g, op: dict[str, Any], prog: Program, inputs: list[str]) -> str:
    """9.1: the patch vectors of 4.2 (Reshape, Transpose, Reshape; no arithmetic)."""
    (image,) = inputs
    return patch_embed.lower_patches(g, image, prog.values[op["inputs"][0]]["shape"], int(op["attrs"]["patch"]))
