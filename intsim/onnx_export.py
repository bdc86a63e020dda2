"""Export an integer program as a standard ONNX graph that onnxruntime executes bit for bit.

    from intsim.onnx_export import export_onnx
    info = export_onnx(prog, "model.onnx")        # uint8 image (B, 3, H, W) in, int64 logits (B, classes) out

Each op module lowers itself (``intsim.ops.<type>.lower_onnx(g, op, prog, inputs) -> output name``,
the section ``# ---- onnx lowering`` at the end of the module); this module holds the graph
builder ``g`` they write into and the integer building blocks of docs/integer-spec.md section 1
expressed with standard ONNX operators only (no custom domain):

* every value is an ``int64`` tensor; an integer GEMM is a float32 / float64 ``MatMul`` where its
  bound proves every partial sum below 2^24 / 2^53 (``OnnxGraph.matmul``), else an int64 ``MatMul``
  (exact: the spec's bounds keep every sum below 2^63, int64 arithmetic in onnxruntime is exact
  two's complement);
* ``rshift(a, n)`` (round half up, floor of negatives): ONNX ``Div`` on integers truncates toward
  zero and ``BitShift`` takes unsigned types only, so neither is used on a signed value. With
  ``d = 2^n``, ``r = Mod(a, d)`` (``fmod = 0``: the sign of the divisor, so ``0 <= r < d``, i.e.
  ``r = a - d * floor(a / d)``), the quotient ``(a - r) / d`` is exact (``Div`` of an exact
  multiple, no truncation), ``= floor(a / d)``, and the dropped half bit is ``2r >= d``. So
  ``rshift(a, n) = Div(a - r, d) + (2r >= d)``; for ``n = 0`` (``d = 1``) ``r = 0`` and the bit
  is 0. No intermediate exceeds ``|a|`` (and ``2r < 2^63``), so nothing can overflow;
* ``rdiv(a, b) = floor((2a + b) / (2b))`` for ``b > 0``: the same ``Mod``/exact-``Div`` floor;
* ``sat``/``accsat``: ``Max`` then ``Min`` on int64;
* ``isqrt``: ``Floor(Sqrt(Cast(V, double)))`` then one correction step each way (see ``isqrt``);
* tables (exp, GELU, post-softmax decode) are ``Gather``; the threshold encoding is a binary search
  over the sorted thresholds (``a`` rounds of ``Gather`` + ``GreaterOrEqual`` + ``Where``), equal
  to the spec's count of thresholds ``<= p``.

Initializers are named after the program tensors (``blocks.3.attn.core.thresholds``) and each node's
doc string names the spec section it implements.

``flavor="qonnx"`` (``intsim export --flavor qonnx``) emits the threshold encoders as QONNX
``MultiThreshold`` nodes instead of the binary search (``OnnxGraph.encode_multithreshold``, exact in
qonnx's float32 containers for ``prob_bits <= 24``); everything else is the same graph. The model's
metadata props record the flavour (``intsim.flavor``).
"""
from __future__ import annotations

import os
from collections import Counter
from typing import Any

import numpy as np

from intsim import ops
from intsim.program.program import Program, ProgramError, write_atomic

#: the ONNX opset the graphs declare (onnxruntime 1.17+ executes it)
OPSET = 18
#: the graph's input and output names
INPUT, OUTPUT = "image", "logits"
#: export flavours: ``onnx`` (standard operators only) and ``qonnx`` (the threshold encoders as QONNX
#: ``MultiThreshold`` nodes, everything else as in ``onnx``)
FLAVORS = ("onnx", "qonnx")
#: the domain of QONNX's custom operators (``MultiThreshold``) and the version the graphs import
QONNX_DOMAIN, QONNX_OPSET = "qonnx.custom_op.general", 1
#: MultiThreshold compares in float32 containers: every value fed to it must be below this bound
FLOAT32_EXACT = 2**24


class OnnxGraph:
    """The graph builder the op modules' ``lower_onnx`` write into.

    ``g.const(name, array)`` adds an initializer (int64 unless a dtype is given) and returns its
    name; ``g.node(op_type, inputs, doc=..., **attrs)`` adds one node with one output and returns
    the output name; ``g.scope`` (set per program op) prefixes node and initializer names; ``g.doc``
    is the default doc string (the op's spec section). The integer helpers below (``rshift``,
    ``rq``, ``rdiv``, ``sat``, ``isqrt``, ...) emit the node sequences described in the module doc.
    """

    def __init__(self, flavor: str = "onnx") -> None:
        import onnx                                        # optional dependency, imported on use
        from onnx import helper, numpy_helper
        if flavor not in FLAVORS:
            raise ProgramError(f"onnx export: unknown flavour {flavor!r} (expected one of {', '.join(FLAVORS)})")
        self.onnx, self.helper, self.numpy_helper = onnx, helper, numpy_helper
        self.flavor = flavor
        self.nodes: list = []
        self.inits: dict[str, Any] = {}
        self._consts: dict[tuple, str] = {}
        self._n = Counter()
        self.scope = ""
        self.doc = ""

    # ---- naming and primitives ---------------------------------------------------------------
    def _fresh(self, base: str) -> str:
        base = f"{self.scope}.{base}" if self.scope else base
        self._n[base] += 1
        return base if self._n[base] == 1 else f"{base}_{self._n[base] - 1}"

    def const(self, name: str, value: Any, dtype: Any = np.int64, scoped: bool = True) -> str:
        """An initializer ``name`` (scoped by the op name unless ``scoped=False``); identical small
        unnamed scalars are shared."""
        arr = np.asarray(value, dtype=dtype)
        if arr.ndim == 0 or arr.size <= 1:
            key = (arr.dtype.str, arr.shape, arr.tobytes())
            if key in self._consts:
                return self._consts[key]
            full = f"const.{arr.dtype.name}.{'x'.join(map(str, arr.shape)) or 's'}.{arr.ravel()[0] if arr.size else 'e'}"
            full = full.replace("-", "m")
            self._consts[key] = full
        else:
            full = self._fresh(name) if scoped else name
            if full in self.inits:
                raise ProgramError(f"onnx export: initializer {full!r} defined twice")
        self.inits[full] = self.numpy_helper.from_array(np.ascontiguousarray(arr), full)
        return full

    def i64(self, v: int | list | np.ndarray) -> str:
        """An unnamed int64 constant (scalars and short vectors are shared)."""
        arr = np.asarray(v, dtype=np.int64)
        if arr.size <= 1:
            return self.const("", arr)
        return self.const("const", arr)

    def node(self, op_type: str, inputs: list[str], name: str | None = None, doc: str | None = None,
             **attrs: Any) -> str:
        out = self._fresh(name or op_type.lower())
        n = self.helper.make_node(op_type, inputs, [out], name=out, **attrs)
        n.doc_string = doc if doc is not None else self.doc
        self.nodes.append(n)
        return out

    # ---- section 1: integer building blocks -------------------------------------------------
    def add(self, a: str, b: str) -> str:
        return self.node("Add", [a, b])

    def sub(self, a: str, b: str) -> str:
        return self.node("Sub", [a, b])

    def mul(self, a: str, b: str) -> str:
        return self.node("Mul", [a, b])

    def matmul(self, a: str, b: Any, bound: int, name: str = "gemm", bname: str = "w_T") -> str:
        """The exact integer product ``a @ b`` as int64, where ``bound`` >= k * max|a| * max|b| (k the
        summed length). Every product and every partial sum of such a GEMM is an integer of magnitude
        <= bound, so when bound <= 2^24 (2^53) float32 (float64) represents all of them exactly and
        the float ``MatMul`` (any summation order, with or without FMA) returns the exact sum, which
        ``Cast`` brings back to int64; otherwise an int64 ``MatMul``. ``b`` is a value name or a
        numpy array (made an initializer ``bname`` in the chosen type)."""
        T = self.onnx.TensorProto
        if bound <= 2**24:
            ft, nt = np.float32, T.FLOAT
        elif bound <= 2**53:
            ft, nt = np.float64, T.DOUBLE
        else:
            ft, nt = None, None
        if isinstance(b, np.ndarray):
            b = self.const(bname, b, dtype=ft or np.int64)
        elif ft is not None:
            b = self.node("Cast", [b], to=nt)
        if ft is None:
            return self.node("MatMul", [a, b], name=name)
        y = self.node("MatMul", [self.node("Cast", [a], to=nt), b], name=name)
        return self.node("Cast", [y], name=f"{name}_int", to=T.INT64)

    def floordiv_pos(self, a: str, d: str) -> tuple[str, str]:
        """(floor(a / d), r = a - d floor(a / d)) for d > 0, both int64, exact (module doc)."""
        r = self.node("Mod", [a, d], name="mod", fmod=0)
        q = self.node("Div", [self.sub(a, r), d], name="floordiv")
        return q, r

    def rshift_by(self, a: str, d: str) -> str:
        """rshift(a, n) given ``d = 2^n`` (a tensor or constant broadcastable to ``a``, n in 0..62)."""
        q, r = self.floordiv_pos(a, d)
        bit = self.node("Cast", [self.node("GreaterOrEqual", [self.mul(r, self.i64(2)), d], name="halfbit")],
                        to=self.onnx.TensorProto.INT64)
        return self.node("Add", [q, bit], name="rshift")

    def rshift(self, a: str, n: int | np.ndarray, amax: Any = None, nonneg: bool = False) -> str:
        """rshift(a, n) for a constant shift (scalar or per-channel vector over the last axis).

        With a proven bound ``|a| <= amax`` (scalar or per channel; ``nonneg`` when also a >= 0) the
        short *offset form*: with d = 2^n and an offset O = ceil(amax / d) * d (0 when nonneg),
        ``a + d/2 + O >= 0``, so the truncating ``Div`` is the floor and
        ``rshift(a, n) = Div(a + (d/2 + O), d) - O/d`` (for n = 0: d/2 = 0 and the result is a),
        used when ``amax + d/2 + O <= 2^63 - 1`` for every channel (nothing can overflow).
        Otherwise (or without a bound) the ``Mod`` form of ``rshift_by``, exact for every int64."""
        n = np.asarray(n, dtype=np.int64)
        if n.size and (n.min() < 0 or n.max() > 62):
            raise ProgramError(f"onnx export ({self.scope}): shift outside 0..62 cannot be lowered")
        if n.size and int(n.max()) == 0:
            return a
        vec = n.size > 1
        if amax is not None:
            am = np.broadcast_to(np.asarray(amax, dtype=object), n.shape).ravel().tolist()
            ds = [1 << int(k) for k in n.ravel().tolist()]
            offs = [0 if nonneg else -(-int(x) // d) * d for x, d in zip(am, ds)]
            if all(int(x) + d // 2 + o <= 2**63 - 1 for x, d, o in zip(am, ds, offs)):
                c1 = np.array([d // 2 + o for d, o in zip(ds, offs)], np.int64).reshape(n.shape)
                dd = np.array(ds, np.int64).reshape(n.shape)
                y = self.node("Div", [self.add(a, self.const("round_offset", c1) if vec else self.i64(c1)),
                                      self.const("pow2_shift", dd) if vec else self.i64(dd)], name="rshift_div")
                if nonneg:
                    return y
                k = np.array([o // d for d, o in zip(ds, offs)], np.int64).reshape(n.shape)
                return self.node("Sub", [y, self.const("offset_quot", k) if vec else self.i64(k)], name="rshift")
        return self.rshift_by(a, self.const("pow2_shift", np.int64(1) << n) if vec else self.i64(np.int64(1) << n))

    def rq(self, a: str, m: Any, n: Any, amax: Any = None, nonneg: bool = False, mname: str = "mult") -> str:
        """rq(a, m, n) = rshift(a * m, n) (section 2); ``amax`` bounds |a| (m >= 0 by section 8)."""
        m = np.asarray(m, dtype=np.int64)
        if m.size and m.min() < 0:
            raise ProgramError(f"onnx export ({self.scope}): negative multiplier")
        mc = self.i64(m) if m.size <= 1 else self.const(mname, m)
        pm = None if amax is None else [int(amax) * int(v) for v in m.ravel().tolist()]
        if pm is not None and m.size <= 1:
            pm = pm[0]
        elif pm is not None:
            pm = np.array(pm, dtype=object).reshape(m.shape)
        return self.rshift(self.mul(a, mc), n, amax=pm, nonneg=nonneg)

    def rdiv_pos(self, a: int, b: str) -> str:
        """rdiv(a, b) = floor((2a + b) / (2b)) for a constant a >= 0 and b > 0: 2a + b > 0, so the
        truncating ``Div`` is the floor (2a + b < 2^63 for a < 2^61 and b < 2^61)."""
        if not 0 <= a < 2**61:
            raise ProgramError(f"onnx export ({self.scope}): rdiv dividend {a} outside 0..2^61")
        two = self.i64(2)
        return self.node("Div", [self.add(b, self.i64(2 * a)), self.mul(b, two)], name="rdiv")

    def sat(self, v: str, lo: int | None, hi: int | None) -> str:
        if lo is not None:
            v = self.node("Max", [v, self.i64(int(lo))], name="sat_lo")
        if hi is not None:
            v = self.node("Min", [v, self.i64(int(hi))], name="sat_hi")
        return v

    def accsat(self, v: str, acc_bits: int) -> str:
        if not 1 <= acc_bits <= 64:
            raise ProgramError(f"onnx export: acc_bits {acc_bits} outside 1..64")
        return self.sat(v, -(2 ** (acc_bits - 1)), 2 ** (acc_bits - 1) - 1)

    def isqrt(self, v: str) -> str:
        """floor(sqrt(V)) for 0 <= V < 2^63, exact.

        s0 = Floor(Sqrt(double(V))): double(V) = V (1 + d), |d| <= 2^-53, and the correctly rounded
        square root adds a relative error <= 2^-53, so the unfloored estimate is within
        2^31.5 * 2^-51 < 2^-19 of sqrt(V); with r = isqrt(V) <= sqrt(V) < r + 1 this leaves s0 in
        {r - 1, r, r + 1}. s0 is clamped to 3037000499 = isqrt(2^63 - 1) >= r (so s0^2 < 2^63), then
        one step down (s^2 > V) gives s in {r - 1, r} with s^2 <= V, and one step up when
        (s + 1)^2 <= V, tested as V - s^2 >= 2s + 1 (0 <= V - s^2 < 2^63: nothing overflows)."""
        T = self.onnx.TensorProto
        s = self.node("Sqrt", [self.node("Cast", [v], to=T.DOUBLE)], name="sqrt_f64")
        s = self.node("Cast", [self.node("Floor", [s])], name="isqrt_est", to=T.INT64)
        s = self.node("Min", [s, self.i64(3037000499)], name="isqrt_clamp")
        too_big = self.node("Greater", [self.mul(s, s), v], name="isqrt_down")
        s = self.sub(s, self.node("Cast", [too_big], to=T.INT64))
        rest = self.sub(v, self.mul(s, s))
        fits = self.node("GreaterOrEqual", [rest, self.add(self.mul(s, self.i64(2)), self.i64(1))], name="isqrt_up")
        return self.node("Add", [s, self.node("Cast", [fits], to=T.INT64)], name="isqrt")

    def bool_to_i64(self, b: str) -> str:
        return self.node("Cast", [b], to=self.onnx.TensorProto.INT64)

    def reshape(self, x: str, shape: list[int]) -> str:
        return self.node("Reshape", [x, self.i64(list(shape))])

    def transpose(self, x: str, perm: list[int]) -> str:
        return self.node("Transpose", [x], perm=list(perm))

    def reduce(self, kind: str, x: str, axis: int, keepdims: int = 1) -> str:
        return self.node(kind, [x, self.const("axes", [axis])], keepdims=keepdims)

    # ---- shared pieces of the softmax ops (4.4, 9.3) ------------------------------------------
    def exp_of(self, u: str, exp_table: np.ndarray, E: int) -> str:
        """e = rshift(exp_table[u & (2^E - 1)], u >> E) if (u >> E) <= 62 else 0, for u >= 0.

        u >= 0, so the truncating ``Div`` by 2^E is the floor and ``Mod`` the low bits. The shift is
        data dependent: d = 2^min(u >> E, 62) comes from a ``Gather`` on the table 2^0..2^62."""
        exp_table = np.asarray(exp_table, np.int64)
        if exp_table.size and not (exp_table.min() >= 0 and exp_table.max() < 2**61):
            raise ProgramError(f"onnx export ({self.scope}): exp table entries outside 0..2^61")
        tab = self.const("exp_table", exp_table)
        pe = self.i64(2**E)
        hi = self.node("Div", [u, pe], name="u_hi")
        lo = self.node("Mod", [u, pe], name="u_lo", fmod=0)
        base = self.node("Gather", [tab, lo], name="exp_lookup", axis=0)
        hic = self.node("Min", [hi, self.i64(62)])
        p2 = np.int64(1) << np.arange(63, dtype=np.int64)
        d = self.node("Gather", [self.const("pow2_0_62", p2), hic], name="pow2_lookup", axis=0)
        half = self.node("Gather", [self.const("pow2_half_0_62", p2 // 2), hic], name="half_lookup", axis=0)
        # exp_table >= 0 and < 2^61: rshift of a nonnegative value is Div(a + d/2, d) (d/2 = 0 for d = 1)
        e = self.node("Div", [self.add(base, half), d], name="exp_shift")
        keep = self.node("LessOrEqual", [hi, self.i64(62)])
        return self.node("Where", [keep, e, self.i64(0)], name="exp")

    def probs(self, e: str, P: int, G: int, e_max: int) -> str:
        """Z = sum_j e; inv = rdiv(2^(P+G), Z); p = min(rshift(e * inv, G), 2^P - 1)."""
        Z = self.reduce("ReduceSum", e, -1)
        inv = self.rdiv_pos(2 ** (P + G), Z)
        # 0 <= e inv <= e (2^(P+G) / Z + 1/2) <= 2^(P+G) + e_max, e <= Z
        p = self.rshift(self.mul(e, inv), G, amax=2 ** (P + G) + e_max, nonneg=True)
        return self.node("Min", [p, self.i64(2**P - 1)], name="prob")

    def encode_decode(self, p: str, thresholds: np.ndarray, decode: np.ndarray, prob_bits: int | None = None,
                      layout: str = "NCHW") -> str:
        """decode[code], code = the number of k with p >= thresholds[k] (spec 4.4), then ``Gather`` on
        the decode table. ``onnx`` flavour: ``encode_binary_search``; ``qonnx`` flavour:
        ``encode_multithreshold`` (needs ``prob_bits``, the bound ``0 <= p < 2^prob_bits``, and the
        ``data_layout`` of ``p``)."""
        if self.flavor == "qonnx":
            if prob_bits is None:
                raise ProgramError(f"onnx export ({self.scope}): the qonnx encoder needs the probability width")
            code = self.encode_multithreshold(p, thresholds, prob_bits, layout)
        else:
            code = self.encode_binary_search(p, thresholds)
        return self.node("Gather", [self.const("decode", np.asarray(decode, np.int64)), code], name="decode", axis=0)

    def encode_binary_search(self, p: str, thresholds: np.ndarray) -> str:
        """The number of thresholds <= p with standard operators, by binary search.

        The thresholds are nondecreasing (every encoder is monotone, asserted here), so the count
        of thresholds <= p is found by a binary search: with the table padded to 2^a - 1 entries
        by 2^63 - 1 (never <= p), code starts at 0 and for s = 2^(a-1), ..., 1 becomes code + s
        when p >= thr[code + s - 1]."""
        thr = np.asarray(thresholds, np.int64)
        if np.any(np.diff(thr) < 0):
            raise ProgramError(f"onnx export ({self.scope}): thresholds are not sorted; the binary-search "
                               "encoding needs a monotone post-softmax encoder")
        a = max(1, int(len(thr)).bit_length())
        pad = np.full(2**a - 1, np.iinfo(np.int64).max, np.int64)
        pad[: len(thr)] = thr
        tab = self.const("thresholds", pad)
        code = None
        for s in reversed([1 << i for i in range(a)]):
            cand = self.i64(s) if code is None else self.add(code, self.i64(s))
            t = self.node("Gather", [tab, self.add(cand, self.i64(-1)) if code is not None else self.i64(s - 1)],
                          name="thr_lookup", axis=0)
            ge = self.node("GreaterOrEqual", [p, t], name="thr_cmp")
            code = self.node("Where", [ge, cand, code if code is not None else self.i64(0)], name="code")
        return code

    def encode_multithreshold(self, p: str, thresholds: np.ndarray, prob_bits: int, layout: str) -> str:
        """The number of thresholds <= p as one QONNX ``MultiThreshold`` node (qonnx flavour).

        MultiThreshold(x, T) with T of shape (1, steps) (one row shared by every channel),
        out_scale 1 and out_bias 0 gives ``count_k(x >= T[0, k])``: the spec's code. qonnx computes
        it on float containers, so exactness is proven here: ``0 <= p <= 2^P - 1`` (``probs`` clamps
        it; P = ``prob_bits``), and each threshold is clamped into ``[0, 2^P]``, which changes no
        comparison for such p (``t <= 0``: always true, as before; ``t >= 2^P``: always false, as
        before). With ``2^P <= 2^24`` every input, threshold and count (at most ``steps < 2^24``) is
        an integer that float32 represents exactly, so the float comparison and count are the
        integer ones. The count does not depend on the order of the thresholds; the table is stored
        sorted (the MultiThreshold convention). ``p`` goes in through ``Cast`` to float32 and the
        code comes back through ``Cast`` to int64. Wider probabilities are refused."""
        T = self.onnx.TensorProto
        P = int(prob_bits)
        if not 0 <= P or 2**P > FLOAT32_EXACT:
            raise ProgramError(f"onnx export ({self.scope}): qonnx flavour: prob_bits {P} > 24, probabilities up to "
                               f"2^{P} - 1 are not exact in MultiThreshold's float32 containers")
        thr = np.sort(np.clip(np.asarray(thresholds, np.int64), 0, 2**P)).astype(np.float32)
        steps = len(thr)
        if steps == 0 or steps >= FLOAT32_EXACT:
            raise ProgramError(f"onnx export ({self.scope}): qonnx flavour: {steps} thresholds cannot be a MultiThreshold")
        tab = self.const("thresholds", thr.reshape(1, steps), dtype=np.float32)
        x = self.node("Cast", [p], name="prob_f32", to=T.FLOAT)
        code = self.node("MultiThreshold", [x, tab], name="multithreshold", domain=QONNX_DOMAIN,
                         out_dtype=f"UINT{max(1, steps.bit_length())}", out_scale=1.0, out_bias=0.0,
                         data_layout=layout)
        return self.node("Cast", [code], name="code", to=T.INT64)

    # ---- the model ---------------------------------------------------------------------------
    def model(self, inputs: list, outputs: list, name: str, metadata: dict[str, str] | None = None):
        graph = self.helper.make_graph(self.nodes, name, inputs, outputs, initializer=list(self.inits.values()))
        opsets = [self.helper.make_opsetid("", OPSET)]
        if any(n.domain == QONNX_DOMAIN for n in self.nodes):
            opsets.append(self.helper.make_opsetid(QONNX_DOMAIN, QONNX_OPSET))
        m = self.helper.make_model(graph, opset_imports=opsets, producer_name="intsim")
        m.ir_version = 8
        if metadata:
            self.helper.set_model_props(m, {k: str(v) for k, v in metadata.items()})
        return m


def build_onnx(prog: Program, flavor: str = "onnx"):
    """The ONNX ``ModelProto`` of ``prog`` (checked by ``onnx.checker``) in ``flavor`` (``FLAVORS``).

    The model's metadata props record ``intsim.flavor`` (``onnx`` or ``qonnx``), ``intsim.model``,
    ``intsim.wbits``/``intsim.abits`` and ``intsim.program_version``; ``intsim inspect`` reads them."""
    g = OnnxGraph(flavor)
    T = g.onnx.TensorProto
    (inp,) = prog.header["inputs"]
    info = prog.values[inp]
    if info["kind"] != "image":
        raise ProgramError(f"onnx export: input value {inp!r} is {info['kind']}, not an image")
    names: dict[str, str] = {}
    g.scope, g.doc = "input", "docs/integer-spec.md section 3: uint8 image -> int64"
    names[inp] = g.node("Cast", [INPUT], name="cast", to=T.INT64)
    for op in prog.ops:
        mod = ops.get(op["type"])
        lower = getattr(mod, "lower_onnx", None)
        if lower is None:
            raise ProgramError(f"onnx export: op type {op['type']!r} (op {op['name']!r}) has no ONNX lowering")
        missing = [i for i in op["inputs"] if i not in names]
        if missing:
            raise ProgramError(f"onnx export: op {op['name']!r} reads {missing[0]!r} before it is computed")
        g.scope, g.doc = op["name"], f"docs/integer-spec.md section {mod.SPEC} ({op['type']}): {op['name']}"
        names[op["output"]] = lower(g, op, prog, [names[i] for i in op["inputs"]])
    out = names.get(prog.output)
    if out is None:
        raise ProgramError(f"onnx export: output value {prog.output!r} is never computed")
    g.scope, g.doc = "output", "logits (B, 1, classes) -> (B, classes)"
    classes = int(prog.values[prog.output]["shape"][-1])
    g.nodes.append(g.helper.make_node("Reshape", [out, g.i64([-1, classes])], [OUTPUT], name="output.reshape",
                                      doc_string=g.doc))
    C, H, W = info["shape"]
    x = g.helper.make_tensor_value_info(INPUT, T.UINT8, ["batch", C, H, W])
    y = g.helper.make_tensor_value_info(OUTPUT, T.INT64, ["batch", classes])
    name = prog.model.get("name") or prog.model.get("arch", "program")
    meta = {"intsim.flavor": flavor, "intsim.model": name, "intsim.wbits": prog.settings.get("wbits"),
            "intsim.abits": prog.settings.get("abits"), "intsim.program_version": prog.header.get("version"),
            "intsim.spec": "docs/integer-spec.md"}
    m = g.model([x], [y], f"intsim:{name}", metadata=meta)
    g.onnx.checker.check_model(m)
    return m


def flavor_of(model) -> str:
    """The export flavour of an ONNX model: its ``intsim.flavor`` metadata prop, else ``qonnx`` when a
    node is in the QONNX domain, else ``onnx`` (a graph from elsewhere: ``onnx`` means standard only)."""
    props = {p.key: p.value for p in model.metadata_props}
    if "intsim.flavor" in props:
        return props["intsim.flavor"]
    return "qonnx" if any(n.domain == QONNX_DOMAIN for n in model.graph.node) else "onnx"


def summary(model) -> dict[str, Any]:
    """Node counts per op type, initializer count and bytes, opsets and flavour of an ONNX model."""
    from onnx import numpy_helper
    nb = sum(numpy_helper.to_array(t).nbytes for t in model.graph.initializer)
    return {"nodes": dict(sorted(Counter(n.op_type for n in model.graph.node).items())),
            "initializers": len(model.graph.initializer), "initializer_bytes": int(nb),
            "opset": {o.domain or "ai.onnx": int(o.version) for o in model.opset_import},
            "flavor": flavor_of(model),
            "metadata": {p.key: p.value for p in model.metadata_props}}


def export_onnx(prog: Program, path: str | os.PathLike, flavor: str = "onnx") -> dict[str, Any]:
    """Write ``prog`` as an ONNX model at ``path`` (atomically: a temporary file renamed into place,
    nothing left behind on failure) in ``flavor`` (``onnx`` or ``qonnx``). Returns ``summary`` of
    the model. ``ProgramError`` names what cannot be expressed."""
    m = build_onnx(prog, flavor)
    data = m.SerializeToString()
    write_atomic(path, data)
    return summary(m)


def session(path_or_model: Any, threads: int | None = None, spinning: bool = False):
    """An onnxruntime ``InferenceSession`` on the CPU (``threads`` intra-op threads if given; worker
    threads sleep instead of spinning unless ``spinning``: spinning workers starve each other on a
    busy machine, measured 5.5 against about 30 images/s on 2 shared cores)."""
    import onnxruntime as ort
    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    src = path_or_model.SerializeToString() if hasattr(path_or_model, "SerializeToString") else str(path_or_model)
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


def run_onnx(sess: Any, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """int64 logits (B, classes) of an exported program on uint8 images, in batches."""
    images = np.ascontiguousarray(images, dtype=np.uint8)
    outs = [sess.run([OUTPUT], {INPUT: images[i:i + batch_size]})[0] for i in range(0, len(images), batch_size)]
    return np.concatenate(outs) if outs else np.zeros((0, sess.get_outputs()[0].shape[-1]), np.int64)


__all__ = ["OPSET", "INPUT", "OUTPUT", "FLAVORS", "QONNX_DOMAIN", "OnnxGraph", "build_onnx", "export_onnx", "flavor_of",
           "run_onnx", "session", "summary"]
