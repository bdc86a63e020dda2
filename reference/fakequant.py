"""The fake-quant model of a program: the paper's semantics in float, for every architecture.

:class:`FakeQuantModel` is built only from a program (``intsim.program.format.Program``). It walks
the program's op list and runs each op's fake-quant forward, which lives with everything else about
that op type in its module of the operator registry (``intsim/ops/<type>.py``, section
``# ---- fake-quant``):

* ``fq_prepare(ctx, op) -> dict`` (optional): the op's float parameters, made once from the
  program's tensors (float weights ``w * w_scale``, ``bias_float``, ``pos_float``, LayerNorm
  ``gamma`` / ``beta``, the dequantized window bias, index tables, the post-softmax quantizer);
  the model keeps the dict as ``ctx.params[op name]``;
* ``fq_forward(ctx, op, *inputs) -> tensor``: the op's float output from its float inputs.

``ctx`` is a :class:`FakeQuantContext`: the program, the dtype, the LayerNorm epsilon, the float
function library ``ctx.F`` (``reference.functional``, so that the registry imports neither torch nor
the reference package), and converters from program tensors to torch tensors.

After every op the model quantize-dequantizes the output value when the program stores it as
``codes`` (uniform, with the value table's scale / zero point / bits); ``int`` values (residual
stream, GELU input, logits) stay float unless ``int_grid`` is set. The post-softmax probabilities
are quantized inside the attention ops by the op's ``softmax_quant`` quantizer (encode, then
``levels``).
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from intsim import ops
from intsim.program.quantizers import from_dict

from . import functional
from .functional import ProbsFn, Tap, as_float_images, fake_quant_uniform

ProbsTransform = Callable[[str, torch.Tensor], torch.Tensor]
OpForward = Callable[..., torch.Tensor]
DTYPES = (torch.float32, torch.float64)


class FakeQuantContext:
    """What the fake-quant functions of an op module receive (see the module docstring).

    ``program``, ``dtype`` (float32 or float64), ``eps`` (the model's LayerNorm epsilon,
    ``model.ln_eps``), ``params`` (op name -> the dict its ``fq_prepare`` returned), ``F`` (the
    float functions, ``reference.functional``) and ``probs_transform`` (the experiment hook of
    :class:`FakeQuantModel`, or None).
    """

    F = functional

    def __init__(self, program, dtype: torch.dtype, probs_transform: ProbsTransform | None = None):
        self.program = program
        self.dtype = dtype
        self.eps = float(program.model.get("ln_eps", 1e-6))
        self.probs_transform = probs_transform
        self.params: dict[str, dict] = {}

    def tensor(self, array) -> torch.Tensor:
        """A float parameter: rounded to float32 (the precision every fake-quant parameter has),
        then held in the context's dtype."""
        return torch.from_numpy(np.asarray(array).astype(np.float32)).to(self.dtype)

    @staticmethod
    def index(array) -> torch.Tensor:
        """An index table as int64."""
        return torch.from_numpy(np.asarray(array).astype(np.int64))

    @staticmethod
    def mask(array) -> torch.Tensor:
        """A 0/1 table as bool."""
        return torch.from_numpy(np.asarray(array).astype(bool))

    def post_softmax(self, op) -> ProbsFn:
        """The function an attention op applies to its float post-softmax values: the experiment's
        ``probs_transform`` (if any), then the op's ``softmax_quant`` quantizer (encode, levels)."""
        # a softmax_quant without "bits" has the program's abits (as the loader's check_bounds reads it)
        sq = from_dict({"bits": int(self.program.settings["abits"]), **op["attrs"]["softmax_quant"]})
        edit, name = self.probs_transform, op["name"]
        if edit is None:
            return sq.quantize_torch
        return lambda probs: sq.quantize_torch(edit(name, probs))


class FakeQuantModel:
    """The fake-quant model of a program (ViT, Swin, any program of registered op types).

    ``model(images)`` / ``model.forward(images, tap=None, batch_size=64)``: float logits (B, C) of
    uint8 images (B, 3, H, W); ``tap(value name, tensor)`` observes every value after its op (and
    after the output's quantize-dequantize).

    Options (each applies to every program, or is refused with a ``ValueError`` that says why):

    * ``dtype``: ``torch.float32`` (default) or ``torch.float64`` -- the same arithmetic, with the
      same float32 parameters, in double precision;
    * ``int_grid``: also round every ``int`` value (residual stream, GELU input, logits) to the
      grid the integer program stores it on (its ``scale``, signed ``bits``), as the engine does;
    * ``probs_transform(op name, probs) -> probs``: edits the float post-softmax values before the
      post-softmax quantizer (``intsim clipping``); ``probs`` is (B, H, T, T) for ``attention``
      and (B, windows, H, n, n) for ``window_attention`` (masked positions exactly 0). Refused
      for a program without post-softmax quantizers;
    * ``forwards``: op type -> ``fn(ctx, op, *inputs) -> tensor`` replacing that type's fake-quant
      forward (``intsim sensitivity`` runs the engine's integer ops this way). Refused for a type
      the program does not have.

    With all options at their defaults the model is the one ``intsim run`` reports as
    ``fakequant``.
    """

    def __init__(self, program, *, dtype: torch.dtype = torch.float32, int_grid: bool = False,
                 probs_transform: ProbsTransform | None = None, forwards: dict[str, OpForward] | None = None):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be torch.float32 or torch.float64, not {dtype}")
        types = list(dict.fromkeys(op["type"] for op in program.ops))
        forwards = dict(forwards or {})
        absent = [t for t in forwards if t not in types]
        if absent:
            raise ValueError(f"forwards given for op types this program does not have: {', '.join(map(str, absent))} "
                             f"(its op types: {', '.join(types)})")
        if probs_transform is not None and not any("softmax_quant" in op["attrs"] for op in program.ops):
            raise ValueError("probs_transform: this program has no op with a post-softmax quantizer "
                             f"(its op types: {', '.join(types)})")
        self.program = program
        self.dtype = dtype
        self.int_grid = bool(int_grid)
        self.probs_transform = probs_transform
        self.ctx = FakeQuantContext(program, dtype, probs_transform)
        self._steps: list[tuple[dict, OpForward]] = []
        for op in program.ops:
            module = ops.get(op["type"])
            fn = forwards.get(op["type"]) or getattr(module, "fq_forward", None)
            if fn is None:
                raise ValueError(f"op type {op['type']!r} has no fake-quant forward (fq_forward in {module.__name__})")
            prepare = getattr(module, "fq_prepare", None)
            self.ctx.params[op["name"]] = {} if prepare is None else prepare(self.ctx, op)
            self._steps.append((op, fn))

    def quantize_value(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """The value ``name`` as the fake-quant model holds it: quantize-dequantized when the program
        stores it as ``codes`` (and, with ``int_grid``, as ``int``); else unchanged."""
        v = self.program.values[name]
        if v["kind"] == "codes":
            return fake_quant_uniform(x, float(v["scale"]), int(v["zero_point"]), int(v["bits"]))
        if self.int_grid and v["kind"] == "int":
            b = int(v["bits"])     # signed: codes -2^(b-1) .. 2^(b-1) - 1, i.e. unsigned with zero point 2^(b-1)
            return fake_quant_uniform(x, float(v["scale"]), 1 << (b - 1), b)
        return x

    @torch.no_grad()
    def forward(self, images, tap: Tap | None = None, batch_size: int = 64) -> torch.Tensor:
        """Float logits (B, C) of uint8 images (B, 3, H, W); ``tap(value name, tensor)`` sees every value."""
        x = as_float_images(images).to(self.dtype)
        ctx = self.ctx
        outs = []
        for s in range(0, x.shape[0], batch_size):
            env = {self.program.header["inputs"][0]: x[s:s + batch_size]}
            for op, fn in self._steps:
                y = self.quantize_value(op["output"], fn(ctx, op, *(env[i] for i in op["inputs"])))
                env[op["output"]] = y
                if tap is not None:
                    tap(op["output"], y)
            out = env[self.program.output]
            outs.append(out.reshape(out.shape[0], -1))
        return torch.cat(outs, dim=0)

    __call__ = forward
