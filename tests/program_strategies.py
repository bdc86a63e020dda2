"""Hypothesis strategies for program files (issue 21): valid random programs of drawn shape and
settings, and program files with one drawn corruption (a header field set to a drawn JSON value, an
integer tensor element set to a drawn value or a bit flipped, a float element set to NaN / inf).

The valid ones come from ``intsim.studies.random_program.make_program``; the corruptions are
written with ``intsim.studies.fuzz.file_bytes`` so that any JSON value (NaN, 10^30, nesting) can
reach the loader."""
from __future__ import annotations

import json

import numpy as np
from hypothesis import strategies as st

from intsim.studies import fuzz
from intsim.studies.random_program import make_program

#: JSON values a corrupted header field may take: every JSON type, extremes, NaN / infinity.
json_values = st.recursive(
    st.none() | st.booleans()
    | st.integers(min_value=-(1 << 70), max_value=1 << 70)
    | st.sampled_from([0, -1, 1, 62, 63, 64, 2 ** 31, 2 ** 63, -(2 ** 63), 10 ** 30])
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6)


@st.composite
def programs(draw):
    """A valid random tiny-ViT program: drawn widths, heads, depth, bit widths, seed and datapath
    settings inside the bounds of docs/integer-spec.md section 8."""
    heads = draw(st.sampled_from([1, 2, 3]))
    embed_dim = heads * draw(st.sampled_from([2, 4, 6]))
    patch = draw(st.sampled_from([2, 4]))
    img = patch * draw(st.integers(1, 3))
    settings = {"acc_bits": draw(st.integers(24, 32)), "residual_bits": draw(st.integers(10, 16)),
                "gelu_bits": draw(st.integers(6, 12)), "exp_frac_bits": draw(st.integers(4, 10))}
    return make_program(draw(st.integers(0, 2 ** 32 - 1)), embed_dim=embed_dim, heads=heads,
                        depth=draw(st.integers(1, 2)), img=img, patch=patch, classes=draw(st.integers(2, 6)),
                        wbits=draw(st.integers(2, 8)), abits=draw(st.integers(2, 8)), settings=settings,
                        mlp_ratio=draw(st.sampled_from([1, 2, 4])))


def _header_paths(h, prefix=()):
    """Every path to a scalar or container in the header (dict keys and list indices)."""
    out = [prefix] if prefix else []
    if isinstance(h, dict):
        for k in sorted(h):
            out += _header_paths(h[k], prefix + (k,))
    elif isinstance(h, list):
        for i in range(min(len(h), 4)):
            out += _header_paths(h[i], prefix + (i,))
    return out


@st.composite
def corrupted_files(draw):
    """``(description, file bytes)``: the base fuzz program with one drawn corruption."""
    prog = fuzz.base_program(draw(st.integers(0, 3)))
    header = json.loads(json.dumps(prog.header))
    tensors = {k: v.copy() for k, v in prog.tensors.items()}
    kind = draw(st.sampled_from(["header", "int", "bit", "float"]))
    if kind == "header":
        path = draw(st.sampled_from(_header_paths(header)))
        value = draw(json_values)
        fuzz.set_path(list(path), value)(header)
        what = f"header {'.'.join(map(str, path))} = {str(value)[:40]}"
    else:
        kinds = "iu" if kind in ("int", "bit") else "f"
        names = sorted(k for k, v in tensors.items() if v.dtype.kind in kinds and v.size)
        name = draw(st.sampled_from(names))
        a = tensors[name]
        flat = a.reshape(-1)
        j = draw(st.integers(0, flat.size - 1))
        if kind == "int":
            info = np.iinfo(a.dtype)
            flat[j] = draw(st.integers(int(info.min), int(info.max)))
        elif kind == "bit":
            bits = flat.view(np.dtype(f"u{a.dtype.itemsize}"))
            bits[j] ^= np.array(1, dtype=bits.dtype) << draw(st.integers(0, 8 * a.dtype.itemsize - 1))
        else:
            with np.errstate(over="ignore", invalid="ignore"):
                flat[j] = draw(st.sampled_from([np.nan, np.inf, -np.inf, 0.0, -1.0, 1e30, 1e-30]))
        what = f"{name}[{j}] ({kind})"
    return what, fuzz.file_bytes(header, tensors)
