"""The engine: prepares every op of a program once, proves which arithmetic is exact, runs it.

Python only dispatches: per op it calls one BLAS product (or none) and one Numba kernel. Every
integer the kernels use comes from the program (tensors and attributes); the engine reads no
float scale for computation. The only settings it reads are ``acc_bits`` (the accumulator range
of ``accsat``) and ``gelu_bits`` (the offset of the GELU table).

Each op of the program is built by its op module's engine builder (``intsim.ops.<type>.ENGINE``),
which converts the op's constants once and proves its arithmetic: the exact GEMM routes are
described in ``intsim.kernels.gemm``, the attention routes in ``intsim.ops.attention``.

Requantization
--------------
``rq(a, m, n) = rshift(a * m, n)`` runs in the kernels either literally or, where the runner
proved ``|a| <= 2^31``, ``|m| <= 2^31`` and ``0 <= n <= 62`` (``intsim.kernels.numeric.narrow_ok``), in an offset form
with one int32 x int32 product and one logical shift (``intsim.kernels.epilogues._requant_row``); LayerNorm uses
the same form where ``LayerNormEngine.ln_params`` proves its products below ``2^MAX_SHIFT``.

Fusion (``Engine.run`` and ``forward(keep=False)``)
----------------------------------------------------
The ViT graph (spec section 6) is executed with fewer passes: q, k, v share one GEMM whose
epilogue writes the centered head-major operands of the attention products; ``linear -> add``
(proj, fc2) runs as one epilogue, followed in the same pass by the next ``layernorm`` when it
reads the sum; ``linear -> gelu`` (fc1) runs as one epilogue. Codes that feed only GEMMs are
stored as uint8 when every consuming GEMM takes the ``i8`` route (the route's proof puts them in
0..255), else as float32 (exact, their range is within +-2^24). Every op keeps its own
saturation counts.
Work buffers come from a pool kept between runs of the same batch shape (fresh large
allocations page-fault). ``forward(keep=True)`` and :func:`run_op` run op by op with int64
values (the same kernels). Other op types (e.g. the Swin ops of ``intsim.ops.window_attention``) run op by op.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from intsim import ops as registry
from intsim.kernels.epilogues import linear_add_epilogue, linear_add_ln_epilogue, linear_gelu_epilogue, qkv_epilogue
from intsim.kernels.gemm import F32_EXACT, GEMM_MODES, Gemm, f32_storable
from intsim.ops.base import EPI_ROWS_PER_TASK, EngineOp, zero_counts
from intsim.program.format import Program, ProgramError, validate


@dataclass
class EngineResult:
    """Output of :meth:`Engine.run`."""

    logits: np.ndarray            # int64 (B, num_classes)
    scale: float                  # float scale of the logits (program.values[output]["scale"])
    counts: dict[str, dict[str, int]] = field(default_factory=dict)  # op name -> {"acc","out","prob"}


def build_op(program: Program, op: dict[str, Any], gemm: str = "auto",
             ranges: list[tuple[int, int] | None] | None = None, f32_max_k: int | None = None) -> EngineOp:
    """The engine builder of ``op``'s type (``intsim.ops.<type>.ENGINE``) applied to ``op``:
    constants converted, routes proven; ``ProgramError`` for an unknown type."""
    return registry.get(op.get("type")).ENGINE(program, op, gemm, ranges, f32_max_k)


# ---- the fused plan -----------------------------------------------------------------------------


class _Pool:
    """Reusable work buffers keyed by (shape, dtype): fresh large allocations page-fault on first
    touch, which costs as much as the arithmetic of a cheap kernel. Not thread-safe (one run at a
    time per Engine)."""

    def __init__(self) -> None:
        self.free: dict[tuple, list[np.ndarray]] = {}

    def get(self, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        key = (tuple(int(v) for v in shape), np.dtype(dtype).str)
        lst = self.free.get(key)
        if lst:
            return lst.pop()
        return np.empty(key[0], dtype)

    def put(self, *arrays: np.ndarray) -> None:
        for a in arrays:
            base = a if a.base is None else a.base
            while isinstance(base, np.ndarray) and base.base is not None:
                base = base.base
            if isinstance(base, np.ndarray) and base.flags.owndata:
                self.free.setdefault((base.shape, base.dtype.str), []).append(base)


class _Fused:
    """Fused steps of the ViT graph (module docstring). Built once per Engine.

    Each step reads values from and writes values to ``vals``; values whose last consumer has
    run go back to the buffer pool, and so do each step's temporaries.
    """

    def __init__(self, engine: "Engine"):
        self.engine = engine
        ops = engine.ops
        prog = engine.program
        consumers: dict[str, list[tuple[int, int]]] = {}
        for i, op in enumerate(ops):
            for pos, v in enumerate(op.inputs):
                consumers.setdefault(v, []).append((i, pos))
        self.consumers = consumers
        self.steps: list[tuple[list[str], Callable[[dict[str, np.ndarray], dict[str, dict[str, int]]], None]]] = []
        self.describe: list[str] = []
        self.gemms: list[Gemm] = []          # the GEMMs the steps use (prepared at construction)
        self.pool = _Pool()
        out_name = prog.output

        def only_consumer(v: str, idx: int, pos: int | None = None) -> bool:
            c = consumers.get(v, [])
            return v != out_name and len(c) == 1 and c[0][0] == idx and (pos is None or c[0][1] == pos)

        def gemm_only(v: str) -> bool:
            """v feeds only linear ops, through their GEMM (so float32 storage suffices)."""
            c = consumers.get(v, [])
            return v != out_name and bool(c) and all(ops[i].type == "linear" for i, _ in c)

        i = 0
        n = len(ops)
        while i < n:
            op = ops[i]
            if (op.type == "linear" and i + 3 < n and ops[i + 1].type == "linear" and ops[i + 2].type == "linear"
                    and ops[i + 3].type == "attention" and self._qkv_fusable(ops[i:i + 4], i + 3, only_consumer)):
                self._add_qkv_attention(ops[i:i + 4], gemm_only)
                i += 4
                continue
            if (op.type == "linear" and i + 1 < n and ops[i + 1].type == "add"
                    and only_consumer(op.output, i + 1, 0) and ops[i + 1].inputs[1] != op.output):
                ln = ops[i + 2] if i + 2 < n else None
                if (ln is not None and ln.type == "layernorm" and ln.tokens == "all"
                        and ln.inputs[0] == ops[i + 1].output and ops[i + 1].output != out_name
                        and ln.channels == op.bias.shape[0]):
                    self._add_linear_add(op, ops[i + 1], ln, gemm_only)
                    i += 3
                else:
                    self._add_linear_add(op, ops[i + 1])
                    i += 2
                continue
            if op.type == "linear" and i + 1 < n and ops[i + 1].type == "gelu" and only_consumer(op.output, i + 1, 0):
                self._add_linear_gelu(op, ops[i + 1], gemm_only)
                i += 2
                continue
            if op.type == "layernorm":
                self._add_layernorm(op, gemm_only)
            elif op.type == "patch_embed":
                self._add_patch_embed(op)
            else:
                self._add_generic(op, gemm_only)
            i += 1
        # after each step: the values whose last consumer it is go back to the pool
        last: dict[str, int] = {}
        for si, (reads, _) in enumerate(self.steps):
            for v in reads:
                last[v] = si
        self.release_after: list[list[str]] = [[] for _ in self.steps]
        for v, si in last.items():
            if v not in (engine.input, out_name):
                self.release_after[si].append(v)

    # ---- helpers ----------------------------------------------------------------------------
    def _code_dtype(self, op: EngineOp, gemm_only: Callable[[str], bool]) -> Any:
        """How ``op``'s output is stored when only GEMMs read it: uint8 when every consuming GEMM
        takes the proven ``i8`` route (which reads uint8, and whose proof puts the codes in 0..255),
        float32 when every value of the range is exactly a float32, else None (int64)."""
        if not gemm_only(op.output):
            return None
        r = op.out_range()
        gemms = [self.engine.ops[i].gemm for i, _ in self.consumers[op.output]]
        if 0 <= r[0] and r[1] <= 255 and all(g.xrange is not None and g.route == "i8" for g in gemms):
            return np.uint8
        return np.float32 if f32_storable(r) else None

    @staticmethod
    def _as_i64(x: np.ndarray) -> np.ndarray:
        return x if x.dtype == np.int64 else x.astype(np.int64)

    # ---- step builders ----------------------------------------------------------------------
    def _add_generic(self, op: EngineOp, gemm_only: Callable[[str], bool]) -> None:
        dt = self._code_dtype(op, gemm_only) if op.type == "linear" else None
        if hasattr(op, "gemm"):
            self.gemms.append(op.gemm)

        def step(vals: dict[str, np.ndarray], counts: dict[str, dict[str, int]]) -> None:
            ins = [vals[v] for v in op.inputs]
            if op.type != "linear":
                ins = [self._as_i64(x) for x in ins]
            y, c = op(*ins)
            vals[op.output] = y.astype(dt) if dt is not None else y
            counts[op.name] = c
        self.steps.append((list(op.inputs), step))
        self.describe.append(f"{op.name}: {op.type}" + (f" [{op.gemm.route}]" if hasattr(op, "gemm") else ""))

    def _add_patch_embed(self, op: EngineOp) -> None:
        self.gemms.append(op.gemm)
        pool = self.pool

        def step(vals: dict[str, np.ndarray], counts: dict[str, dict[str, int]]) -> None:
            img = vals[op.inputs[0]]
            x, P = op.patchify(img, op.gemm.input_dtype())
            B = img.shape[0]
            y = pool.get((B, P + 1, op.bias.shape[0]), np.int64)
            counts[op.name] = op.patch_embed_into(x, B, P, y)
            vals[op.output] = y
        self.steps.append((list(op.inputs), step))
        self.describe.append(f"{op.name}: patch_embed [{op.gemm.route}]")

    def _add_layernorm(self, op: EngineOp, gemm_only: Callable[[str], bool]) -> None:
        dt = self._code_dtype(op, gemm_only) or np.int64
        pool = self.pool

        def step(vals: dict[str, np.ndarray], counts: dict[str, dict[str, int]]) -> None:
            x = self._as_i64(vals[op.inputs[0]])
            B, T, D = x.shape
            rows = np.ascontiguousarray(x[:, 0, :]) if op.tokens == "first" else x.reshape(B * T, D)
            y = pool.get(rows.shape, dt)
            no = op.layernorm_into(rows, y, op.ranges[0])
            vals[op.output] = y.reshape(B, -1, D)
            counts[op.name] = {"acc": 0, "out": int(no), "prob": 0}
        self.steps.append((list(op.inputs), step))
        self.describe.append(f"{op.name}: layernorm -> {np.dtype(dt).name}")

    def _add_linear_add(self, lin: EngineOp, add: EngineOp, ln: EngineOp | None = None,
                        gemm_only: Callable[[str], bool] | None = None) -> None:
        self.gemms.append(lin.gemm)
        pool = self.pool
        ln_dt = (self._code_dtype(ln, gemm_only) or np.int64) if ln is not None else np.int64
        ln_args = ln.fused_args(ln.ranges[0]) if ln is not None else None

        def step(vals: dict[str, np.ndarray], counts: dict[str, dict[str, int]]) -> None:
            x = vals[lin.inputs[0]]
            skip = self._as_i64(vals[add.inputs[1]])
            S = lin.gemm(x.reshape(-1, lin.gemm.K))
            M = S.shape[1]
            if skip.shape[:-1] != x.shape[:-1] or skip.shape[-1] != S.shape[2]:
                raise ValueError(f"op '{add.name}': a and skip differ in shape")
            y = pool.get(skip.shape, np.int64)
            if ln is None:
                na, no, nd = linear_add_epilogue(S, lin.cols, lin.add, lin.acc_lo, lin.acc_hi, lin.narrow,
                                                   skip.reshape(M, -1), add.mult, add.shift_, add.add_off,
                                                   add.add_corr, add.lo, add.hi, add.add_narrow, y.reshape(M, -1),
                                                   EPI_ROWS_PER_TASK)
            else:
                z = pool.get((M, skip.shape[-1]), ln_dt)
                na, no, nd, nl = linear_add_ln_epilogue(
                    S, lin.cols, lin.add, lin.acc_lo, lin.acc_hi, lin.narrow, skip.reshape(M, -1), add.mult,
                    add.shift_, add.add_off, add.add_corr, add.lo, add.hi, add.add_narrow, y.reshape(M, -1),
                    *ln_args, z, EPI_ROWS_PER_TASK)
                counts[ln.name] = {"acc": 0, "out": int(nl), "prob": 0}
                vals[ln.output] = z.reshape(skip.shape)
            counts[lin.name] = {"acc": int(na), "out": int(no), "prob": 0}
            counts[add.name] = {"acc": 0, "out": int(nd), "prob": 0}
            vals[add.output] = y
        self.steps.append(([lin.inputs[0], add.inputs[1]], step))
        self.describe.append(f"{lin.name}+{add.name}" + (f"+{ln.name}" if ln is not None else "")
                             + f": linear+add{'+layernorm' if ln is not None else ''} [{lin.gemm.route}]")

    def _add_linear_gelu(self, lin: EngineOp, gelu: EngineOp, gemm_only: Callable[[str], bool]) -> None:
        self.gemms.append(lin.gemm)
        dt = self._code_dtype(gelu, gemm_only) or np.int64
        table = gelu.table.astype(dt)          # exact: the table's range decided dt
        pool = self.pool

        def step(vals: dict[str, np.ndarray], counts: dict[str, dict[str, int]]) -> None:
            x = vals[lin.inputs[0]]
            S = lin.gemm(x.reshape(-1, lin.gemm.K))
            M, N = S.shape[1], S.shape[2]
            y = pool.get((M, N), dt)
            na, no, nb = linear_gelu_epilogue(S, lin.cols, lin.add, lin.acc_lo, lin.acc_hi, lin.narrow,
                                                table, gelu.offset, y, EPI_ROWS_PER_TASK)
            if nb:
                raise ValueError(f"op '{gelu.name}': {int(nb)} GELU inputs outside the table range "
                                 f"[{-gelu.offset}, {gelu.offset - 1}]")
            counts[lin.name] = {"acc": int(na), "out": int(no), "prob": 0}
            counts[gelu.name] = zero_counts()
            vals[gelu.output] = y.reshape(*x.shape[:-1], N)
        self.steps.append(([lin.inputs[0]], step))
        self.describe.append(f"{lin.name}+{gelu.name}: linear+gelu [{lin.gemm.route}]")

    def _qkv_fusable(self, four: list[EngineOp], at_index: int, only_consumer: Callable[..., bool]) -> bool:
        lq, lk, lv, at = four
        if not (lq.inputs[0] == lk.inputs[0] == lv.inputs[0]):
            return False
        if at.inputs != [lq.output, lk.output, lv.output] or len(set(at.inputs)) != 3:
            return False
        if not all(only_consumer(l_.output, at_index, pos) for pos, l_ in enumerate((lq, lk, lv))):
            return False
        D = lq.bias.shape[0]
        if lk.bias.shape[0] != D or lv.bias.shape[0] != D or D % at.heads or lq.gemm.K != lk.gemm.K or lq.gemm.K != lv.gemm.K:
            return False
        # centered operands must be exact in float32
        for l_, zp in ((lq, at.zp_q), (lk, at.zp_k), (lv, at.zp_v)):
            r = l_.out_range()
            if max(abs(r[0] - zp), abs(r[1] - zp)) > F32_EXACT:
                return False
        return True

    def _add_qkv_attention(self, four: list[EngineOp], gemm_only: Callable[[str], bool]) -> None:
        lq, lk, lv, at = four
        eng = self.engine
        pool = self.pool
        D = lq.bias.shape[0]
        H = at.heads
        d = D // H
        w = np.concatenate([eng.program.t(lq.name, "w"), eng.program.t(lk.name, "w"), eng.program.t(lv.name, "w")])
        gemm = Gemm(w, eng.gemm_mode, lq.ranges[0], eng.f32_max_k, name=f"ops '{lq.name}', '{lk.name}', '{lv.name}'")
        self.gemms.append(gemm)
        cols = np.ascontiguousarray(np.concatenate([lq.cols, lk.cols, lv.cols], axis=1))
        zp = np.ascontiguousarray(np.concatenate([lq.add, lk.add, lv.add], axis=1))
        center = np.concatenate([np.full(D, at.zp_q), np.full(D, at.zp_k), np.full(D, at.zp_v)]).astype(np.int64)
        acc_lo, acc_hi = lq.acc_lo, lq.acc_hi
        narrow = int(lq.narrow and lk.narrow and lv.narrow)
        out_dt = self._code_dtype(at, gemm_only) or np.int64
        qr, kr, vr = lq.out_range(), lk.out_range(), lv.out_range()
        T_decl = eng.program.values.get(lq.output, {}).get("shape", [None])[0]
        if T_decl:
            at.attn_route(int(T_decl), qr, kr, vr, d)      # prove (and fail early for forced routes)

        def step(vals: dict[str, np.ndarray], counts: dict[str, dict[str, int]]) -> None:
            x = vals[lq.inputs[0]]
            B, T = x.shape[0], x.shape[1]
            route = at.attn_route(T, qr, kr, vr, d)
            S = gemm(x.reshape(-1, gemm.K))
            qh = pool.get((B, H, T, d), np.float32)
            kh = pool.get((B, H, T, d), np.float32)
            vh = pool.get((B, H, T, d), np.float32)
            c = qkv_epilogue(S, cols, zp, acc_lo, acc_hi, narrow, center, T, H, qh, kh, vh, EPI_ROWS_PER_TASK)
            del S
            for j, l_ in enumerate((lq, lk, lv)):
                counts[l_.name] = {"acc": int(c[2 * j]), "out": int(c[2 * j + 1]), "prob": 0}
            y = pool.get((B, T, D), out_dt)
            if route.route == "int":
                # the int64 kernel on the (uncentered) codes
                qi = (qh.transpose(0, 2, 1, 3).reshape(B, T, D).astype(np.int64) + at.zp_q)
                ki = (kh.transpose(0, 2, 1, 3).reshape(B, T, D).astype(np.int64) + at.zp_k)
                vi = (vh.transpose(0, 2, 1, 3).reshape(B, T, D).astype(np.int64) + at.zp_v)
                yi, cc = at.attention_int(qi, ki, vi)
                y[...] = yi
            else:
                cc = at.attention_core(qh, kh, vh, route, y, pool)
            pool.put(qh, kh, vh)
            counts[at.name] = cc
            vals[at.output] = y
        self.steps.append(([lq.inputs[0]], step))
        self.describe.append(f"{lq.name}+{lk.name}+{lv.name}+{at.name}: qkv [{gemm.route}] + attention")

    # ---- run --------------------------------------------------------------------------------
    def run(self, images: np.ndarray) -> tuple[np.ndarray, dict[str, dict[str, int]]]:
        eng = self.engine
        if images.shape != getattr(self, "_last_shape", None):
            self.pool.free.clear()            # keep only the buffers of the current batch shape
            self._last_shape = images.shape
        vals: dict[str, np.ndarray] = {eng.input: images}
        counts: dict[str, dict[str, int]] = {}
        pool = self.pool
        for (reads, step), rel in zip(self.steps, self.release_after):
            step(vals, counts)
            for v in rel:
                pool.put(vals.pop(v))
        out = np.array(vals.pop(eng.output), dtype=np.int64)      # a copy: never a pooled buffer
        for v in list(vals):
            if v != eng.input:
                pool.put(vals.pop(v))
        return out, counts


class _F32MatmulPrecision:
    """Float32 products must be IEEE float32 (no TF32/bf16 shortcuts): 'highest' during a run."""

    def __enter__(self) -> None:
        torch = sys.modules.get("torch")
        self.old = None
        if torch is not None:
            self.old = torch.get_float32_matmul_precision()
            if self.old != "highest":
                torch.set_float32_matmul_precision("highest")

    def __exit__(self, *exc: Any) -> None:
        if self.old is not None and self.old != "highest":
            sys.modules["torch"].set_float32_matmul_precision(self.old)


class Engine:
    """Runs an integer program on uint8 images, bit-exactly as ``docs/integer-spec.md``.

    ``gemm`` selects the arithmetic of the matrix products (module docstring): ``"auto"`` (the
    fastest provably exact route per layer), ``"float"``, ``"int"``, or one forced route
    ``"i8"``/``"f32"``/``"f64"``. ``fuse=False`` runs op by op (int64 values) also in :meth:`run`.
    ``f32_max_k`` caps the float32 K-chunk width (to test chunking).

    Threads: the Numba kernels use ``numba.get_num_threads()`` and the BLAS products torch's
    ``torch.get_num_threads()`` of the calling thread/process; results do not depend on either.
    On a machine shared with other busy processes set ``OMP_WAIT_POLICY=PASSIVE`` before torch
    and Numba load OpenMP (spinning workers slow every parallel region). One run at a time per
    Engine (its work buffers are reused between runs).
    """

    def __init__(self, program: Program, *, gemm: str = "auto", fuse: bool = True, f32_max_k: int | None = None):
        if gemm not in GEMM_MODES:
            raise ValueError(f"gemm mode must be one of {GEMM_MODES}, got {gemm!r}")
        validate(program)
        self.program = program
        self.gemm_mode = gemm
        self.f32_max_k = f32_max_k
        inputs = program.header["inputs"]
        if len(inputs) != 1 or program.values[inputs[0]]["kind"] != "image":
            raise ProgramError(f"the engine runs programs with one image input, got inputs {inputs}")
        self.input = inputs[0]
        self.output = program.output
        self.scale = float(program.values[self.output]["scale"])
        # proven value ranges: the image is 0..255 (checked in run), every op clamps its output
        ranges: dict[str, tuple[int, int]] = {self.input: (0, 255)}
        self.ops: list[EngineOp] = []
        for op in program.ops:
            o = build_op(program, op, gemm, [ranges.get(v) for v in op["inputs"]], f32_max_k)
            ranges[o.output] = o.out_range()
            self.ops.append(o)
        self.ranges = ranges
        self.fuse = fuse
        self._fused = _Fused(self) if fuse else None
        used = self._fused.gemms if self._fused is not None else [o.gemm for o in self.ops if hasattr(o, "gemm")]
        for g in used:
            g.prepare()

    def routes(self) -> list[str]:
        """One line per (fused) step: which ops, and the GEMM route each uses."""
        if self._fused is not None:
            return list(self._fused.describe)
        return [f"{o.name}: {o.type}" + (f" [{o.gemm.route}]" if hasattr(o, "gemm") else "") for o in self.ops]

    def forward(self, images: np.ndarray, keep: bool = False
                ) -> tuple[np.ndarray, dict[str, dict[str, int]], dict[str, np.ndarray]]:
        """One batch: returns (output value, counts per op, all values if ``keep`` else {})."""
        images = np.asarray(images)
        if images.dtype != np.uint8 and images.size and (images.dtype.kind not in "iu" or images.min() < 0
                                                           or images.max() > 255):
            raise TypeError("images must be integer pixels 0..255 (the proven input range of the engine)")
        with _F32MatmulPrecision():
            if not keep and self._fused is not None:
                out, counts = self._fused.run(images)
                return out, counts, {}
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
        counts = {op.name: zero_counts() for op in self.ops}
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
    return build_op(program, op, gemm)(*inputs)
