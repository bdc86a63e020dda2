"""``intsim vectors``: test vectors of one op of a program, for hardware testbenches.

For one op (``linear``, ``attention``, ``layernorm``, ``gelu``, ``add`` or ``patch_embed``) and K
images, the golden model (``reference/golden.py``) is run up to that op with its tracing hook
(``run(..., trace=fn)``), which hands over the op's inputs, its output, its saturation counts and
the intermediates of ``docs/integer-spec.md`` section 4 as the golden model itself computed them
(``reference.golden.STEPS``): for a linear op the accumulator ``bias + x @ w^T`` before and after
``accsat`` and the requantized value; for attention the scores, the integer softmax (row maxima,
exponents, exp values, row sums, reciprocals, probabilities), the post-softmax codes, the decoded
product and the output accumulator; and so on. This module adds the op's constants (weights,
bias, requantization constants, exp / threshold / decode tables) read from the program, and
declares each array's width; it evaluates nothing itself.

The folder written (``-o DIR``):

* ``vectors.npz``: every array as int64 (scalars as 0-d arrays), keyed by the names below;
* ``<name>.hex``: one value per line, row-major (C order) over the array's shape, lowercase
  hexadecimal, two's complement at the array's declared bit width, ``ceil(bits / 4)`` digits
  with leading zeros (so -3 at 12 bits is ``ffd``; an unsigned array holds its value as is);
* ``manifest.json``: the op, its attributes, the golden saturation counts, the images used and,
  per array, shape, bits, signedness, group and meaning (what :func:`check_vectors` reads);
* ``FORMAT.md``: the same description for people.

:func:`check_vectors` re-runs the op with the engine (``intsim.engine.run_op``) on the stored
inputs and compares output and saturation counts with the stored ones; it also checks that the
stored constants are the program's and that every hex file parses back to its npz array.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from intsim import ops as registry
from intsim.ops.base import SHIFT_BITS, value_range, value_width
from intsim.program.format import is_int
from intsim.program.program import json_default
from reference.golden import run as golden_run

from ..errors import UserError
from ..options import positive, seed

#: op types with test vectors: those whose op module has ``vector_arrays``
SUPPORTED = tuple(t for t, m in registry.MODULES.items() if hasattr(m, "vector_arrays"))
NPZ = "vectors.npz"
MANIFEST = "manifest.json"
FORMAT_MD = "FORMAT.md"
CONFIG_BITS = 8         # small configuration integers (heads, patch, fraction bits...)

@dataclass
class Array:
    """One stored array: int64 values, declared width and signedness, group and meaning."""

    name: str
    value: np.ndarray
    bits: int
    signed: bool
    group: str             # input | param | table | attr | intermediate | output
    desc: str
    note: str = ""

    def meta(self) -> dict[str, Any]:
        d = {"shape": list(self.value.shape), "dtype": "int64", "bits": self.bits, "signed": self.signed,
             "group": self.group, "desc": self.desc, "file": f"{self.name}.hex", "digits": hex_digits(self.bits)}
        if self.note:
            d["note"] = self.note
        return d


@dataclass
class Vectors:
    op: dict[str, Any]
    arrays: list[Array] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)

    def add(self, name: str, value: Any, bits: int, signed: bool, group: str, desc: str) -> None:
        v = np.array(value, dtype=np.int64, order="C")    # (0-d stays 0-d)
        bits, note = _fit(v, int(bits), signed)
        if name in {a.name for a in self.arrays}:
            raise ValueError(f"test vector array {name!r} added twice")
        self.arrays.append(Array(name, v, bits, signed, group, desc, note))

    def get(self, name: str) -> np.ndarray:
        for a in self.arrays:
            if a.name == name:
                return a.value
        raise KeyError(name)


# ---- hex ------------------------------------------------------------------------------------

def hex_digits(bits: int) -> int:
    return (int(bits) + 3) // 4


def _range(bits: int, signed: bool) -> tuple[int, int]:
    return (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)


def _fit(v: np.ndarray, bits: int, signed: bool) -> tuple[int, str]:
    """The declared width, widened (with a note) when a value does not fit it."""
    if v.size == 0:
        return bits, ""
    lo, hi = int(v.min()), int(v.max())
    if not signed and lo < 0:
        raise AssertionError(f"negative value {lo} in an unsigned array")
    b = bits
    while not (_range(b, signed)[0] <= lo and hi <= _range(b, signed)[1]):
        b += 1
    return b, ("" if b == bits else f"widened from the specified {bits} bits (values {lo}..{hi})")


def to_hex_lines(v: np.ndarray, bits: int, signed: bool) -> list[str]:
    """Row-major values as fixed-width two's complement hex at ``bits`` bits."""
    mask = (1 << bits) - 1
    nd = hex_digits(bits)
    flat = np.asarray(v, dtype=np.int64).ravel()
    if bits <= 63:
        u = (flat & np.int64(mask)).tolist()
    else:
        u = [int(x) & mask for x in flat.tolist()]
    return [format(x, f"0{nd}x") for x in u]


def parse_hex(text: str, bits: int, signed: bool, shape: list[int] | tuple[int, ...]) -> np.ndarray:
    """Inverse of the hex writer: lines -> int64 array of ``shape``."""
    vals = []
    half = 1 << (bits - 1)
    for line in text.split():
        x = int(line, 16)
        if signed and x >= half:
            x -= 1 << bits
        vals.append(x)
    return np.array(vals, dtype=np.int64).reshape(shape)


# ---- the op's arrays, from the golden model's trace -------------------------------------------

@dataclass
class Traced:
    """One op as the golden model evaluated it (the arguments of its ``trace`` hook)."""

    inputs: tuple[np.ndarray, ...]      # the op's input values, int64, batch first
    output: np.ndarray                  # its output value
    counts: dict[str, int]              # its saturation counts {"acc", "out", "prob"}
    steps: dict[str, np.ndarray]        # its intermediates, named as in reference.golden.STEPS


class _Reached(Exception):
    """Raised by the trace to end the golden run once the op of interest has been traced."""


def trace_op(program, op_name: str, images: np.ndarray) -> Traced:
    """The golden model run on ``images`` up to op ``op_name`` (the later ops are not evaluated),
    with that op's inputs, output, counts and intermediates from the golden tracing hook."""
    found: list[Traced] = []

    def trace(op, inputs, output, counts, steps):
        if op["name"] == op_name:
            found.append(Traced(inputs, output, counts, steps))
            raise _Reached

    try:
        golden_run(program, images, trace=trace)
    except _Reached:
        return found[0]
    raise KeyError(op_name)


def _attr_width(program, op, name: str) -> tuple[int, bool]:
    s = program.settings
    out_bits, out_signed = value_width(program, op["output"])
    if name in ("lo", "hi"):
        return out_bits, out_signed
    if name == "zp":
        return out_bits, False
    if name in ("zp_q", "zp_k", "zp_v"):
        return value_width(program, op["inputs"][("zp_q", "zp_k", "zp_v").index(name)])[0], False
    if name in ("mult", "score_mult"):
        return int(s["mult_bits"]), True
    if name in ("shift", "score_shift"):
        return SHIFT_BITS, False
    return CONFIG_BITS, False


def _add_attrs(vec: Vectors, program, op) -> None:
    for k, val in sorted(op["attrs"].items()):
        if isinstance(val, bool) or not isinstance(val, (int, np.integer)):
            continue           # strings / dicts (tokens, softmax_quant) live in the manifest
        bits, signed = _attr_width(program, op, k)
        vec.add(k, val, bits, signed, "attr", f"attribute '{k}' of the op (docs/integer-spec.md section 4)")


def _tensor(program, op, name: str) -> np.ndarray:
    """A tensor of the op, as int64."""
    return np.asarray(program.t(op, name), dtype=np.int64)


def op_vectors(program, op: dict[str, Any], traced: Traced) -> Vectors:
    """Every array of one op, from its golden trace (:func:`trace_op`): inputs, constants, the
    intermediates the golden model computed, attributes and the output."""
    typ = op["type"]
    if typ not in SUPPORTED:
        raise UserError(f"op '{op['name']}' has type {typ!r}; vectors support {', '.join(SUPPORTED)}")
    vec = Vectors(op=op)
    for role, vname, x in zip(registry.get(typ).VECTOR_ROLES, op["inputs"], traced.inputs):
        bits, signed = value_width(program, vname)
        what = {"image": "raw pixels (B, 3, H, W)", "codes": "unsigned activation codes",
                "int": "signed integers"}[program.values[vname]["kind"]]
        vec.add(role, x, bits, signed, "input", f"input '{vname}': {what}")
    for name, value, bits, signed, group, desc in registry.get(typ).vector_arrays(program, op, traced.steps):
        vec.add(name, value, bits, signed, group, desc)
    _add_attrs(vec, program, op)
    ob, osg = value_width(program, op["output"])
    vec.add("y", traced.output, ob, osg, "output", f"output '{op['output']}' of the op (the golden model's)")
    vec.counts = dict(traced.counts)
    return vec


# ---- writing ---------------------------------------------------------------------------------

def find_op(program, layer: str) -> dict[str, Any]:
    """The op named ``layer``; an unknown name lists the available ones."""
    for op in program.ops:
        if op["name"] == layer and op["type"] in SUPPORTED:
            return op
    names = [op["name"] for op in program.ops if op["type"] in SUPPORTED]
    raise UserError(f"no op named '{layer}' in the program; available ops: {', '.join(names)}")


def program_digest(program) -> str:
    from intsim.program.format import header_json
    return hashlib.sha256(header_json(program.header).encode()).hexdigest()


def _manifest(program, vec: Vectors, image_info: dict) -> dict[str, Any]:
    op = vec.op
    return {
        "format": "intsim-vectors", "version": 1,
        "op": {"name": op["name"], "type": op["type"], "inputs": list(op["inputs"]), "output": op["output"],
               "attrs": op["attrs"]},
        "roles": list(registry.get(op["type"]).VECTOR_ROLES),
        "settings": dict(program.settings),
        "program_header_sha256": program_digest(program),
        "images": image_info,
        "golden_counts": vec.counts,
        "arrays": {a.name: a.meta() for a in vec.arrays},
        "order": [a.name for a in vec.arrays],
    }


GROUP_TITLES = {"input": "Inputs", "param": "Constants (tensors of the program)", "table": "Tables",
                "attr": "Scalar attributes", "intermediate": "Intermediates (golden style)", "output": "Output"}


def format_md(man: dict[str, Any]) -> str:
    op = man["op"]
    lines = [
        f"# Test vectors of `{op['name']}` ({op['type']})", "",
        f"Op `{op['name']}` of type `{op['type']}`: inputs {', '.join(f'`{i}`' for i in op['inputs'])} "
        f"(stored as {', '.join(f'`{r}`' for r in man['roles'])}), output `{op['output']}` (stored as `y`). "
        f"Semantics: `docs/integer-spec.md`, section 4 ({op['type']}). Computed by the golden model "
        "(`reference/golden.py`) and checked with `intsim vectors --check DIR --program FILE`, which re-runs "
        "the op on the engine.", "",
        f"Images: {man['images'].get('count')} from {man['images'].get('source')}"
        + (f" ({', '.join(man['images']['ids'][:8])}{', ...' if len(man['images']['ids']) > 8 else ''})"
           if man["images"].get("ids") else "") + ". B below is that count.", "",
        f"Program header SHA-256: `{man['program_header_sha256']}`.", "",
        "Golden saturation counts of the op on these images: "
        + ", ".join(f"{k} = {v}" for k, v in man["golden_counts"].items()) + ".", "",
        "## Files", "",
        "* `vectors.npz`: every array below under its name, dtype int64 (scalars as 0-d arrays).",
        "* `<name>.hex`: one value per line, row-major (C order, last index fastest) over the shape below, "
        "lowercase hexadecimal with leading zeros, exactly `ceil(bits / 4)` digits, two's complement at "
        "the declared bit width for signed arrays (e.g. -3 at 12 bits is `ffd`), the plain value for "
        "unsigned ones. A scalar is one line.",
        "* `manifest.json`: this table in machine-readable form, plus the op's attributes and settings.", "",
        "Dimensions: B images, T tokens (class token first), P = T - 1 patches, T' = T (or 1 for a "
        "`tokens = first` LayerNorm), H heads, d = D / H head width, D / K input channels, N output "
        "channels, E exp-table size 2^exp_frac_bits. Inputs and output have the program value's shape "
        "with B in front.", "",
        "Declared widths are those of the specification (e.g. weights `wbits + 1` signed, accumulators "
        "`acc_bits` signed, exact int64 intermediates 64 signed); a width is only widened when a value "
        "needs it, and the `note` column says so.", "",
    ]
    arrays = man["arrays"]
    for grp, title in GROUP_TITLES.items():
        names = [n for n in man["order"] if arrays[n]["group"] == grp]
        if not names:
            continue
        lines += [f"### {title}", "",
                  "| name | file | shape | dtype | bits | signed | order | meaning | note |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for n in names:
            a = arrays[n]
            shape = str(tuple(a["shape"])) if a["shape"] else "scalar"
            lines.append(f"| `{n}` | `{a['file']}` | {shape} | int64 | {a['bits']} | "
                         f"{'yes' if a['signed'] else 'no'} | row-major | {a['desc'].replace('|', '/')} | "
                         f"{a.get('note', '')} |")
        lines.append("")
    other = {k: v for k, v in op["attrs"].items() if isinstance(v, (str, dict, list))}
    if other:
        lines += ["### Other attributes", ""]
        lines += [f"* `{k}`: `{json.dumps(v, sort_keys=True)}`" for k, v in other.items()]
        lines.append("")
    lines += ["## Settings", "", ", ".join(f"`{k}` = {v}" for k, v in man["settings"].items()), ""]
    return "\n".join(lines)


def _check_dest(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"-o {out} exists and is not a folder")
    if out.is_dir():
        extra = [p.name for p in out.iterdir() if p.name not in (NPZ, MANIFEST, FORMAT_MD) and p.suffix != ".hex"]
        if extra:
            raise UserError(f"-o {out} already holds other files ({', '.join(sorted(extra)[:3])}); "
                            "choose a new or empty folder")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise UserError(f"cannot write {out}: folder {parent} does not exist")
    try:
        d = tempfile.mkdtemp(dir=parent, prefix=".intsim-write-test-")
        os.rmdir(d)
    except OSError as e:
        raise UserError(f"cannot write {out}: {e.strerror}") from None


def write_vectors(program, layer: str, images: np.ndarray, out: str | os.PathLike,
                  image_info: dict | None = None) -> dict[str, Any]:
    """Compute and write the vectors of op ``layer`` on ``images`` (uint8 (K, 3, H, W)) to folder ``out``.

    The folder is built under a temporary name and renamed into place (a previous vectors folder
    at ``out`` is replaced; one holding other files is refused). Returns the manifest.
    """
    out = Path(out)
    op = find_op(program, layer)
    _check_dest(out)
    images = np.asarray(images)
    vec = op_vectors(program, op, trace_op(program, op["name"], images))
    info = dict(image_info or {})
    info.setdefault("count", int(images.shape[0]))
    info.setdefault("source", "given images")
    man = _manifest(program, vec, info)
    parent = out.parent if str(out.parent) else Path(".")
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".{out.name}.", suffix=".tmp"))
    um = os.umask(0)
    os.umask(um)
    try:
        os.chmod(tmp, 0o777 & ~um)          # mkdtemp makes 0700
        np.savez(tmp / NPZ, **{a.name: a.value for a in vec.arrays})
        for a in vec.arrays:
            (tmp / f"{a.name}.hex").write_text("\n".join(to_hex_lines(a.value, a.bits, a.signed)) + "\n")
        (tmp / MANIFEST).write_text(json.dumps(man, indent=1, sort_keys=True, default=json_default) + "\n")
        (tmp / FORMAT_MD).write_text(format_md(man))
        old = None
        if out.exists():
            old = parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return man


# ---- checking --------------------------------------------------------------------------------

#: Largest vectors.npz accepted by ``--check``, decompressed (the folder is untrusted input).
MAX_VECTOR_BYTES = 1 << 30


def load_vectors(folder: str | os.PathLike) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The manifest and arrays of a vectors folder, structurally checked (``UserError`` naming the
    field): a folder from elsewhere is untrusted input, like a program file."""
    import zipfile
    folder = Path(folder)
    if not (folder / MANIFEST).is_file() or not (folder / NPZ).is_file():
        raise UserError(f"{folder} is not a test-vector folder (no {MANIFEST} / {NPZ}); write one with "
                        "`intsim vectors --program FILE --layer NAME -o DIR`")
    try:
        man = json.loads((folder / MANIFEST).read_text())
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise UserError(f"{folder / MANIFEST} is not readable JSON: {e}") from None
    check_manifest(man, f"{folder / MANIFEST}")
    try:
        with zipfile.ZipFile(folder / NPZ) as zf:
            size = sum(i.file_size for i in zf.infolist())
        if size > MAX_VECTOR_BYTES:
            raise UserError(f"{folder / NPZ} holds {size:,} bytes, more than the limit of {MAX_VECTOR_BYTES:,}")
        with np.load(folder / NPZ, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise UserError(f"{folder / NPZ} is not a readable npz file: {e}") from None
    for k, v in arrays.items():
        if v.dtype.kind not in "iu":
            raise UserError(f"{folder / NPZ}: array '{k}' has dtype {v.dtype}, integers expected")
    return man, arrays


def check_manifest(man: Any, where: str) -> None:
    """The manifest's structure: every field this module reads, with its type (``UserError``)."""
    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise UserError(f"{where}: {msg}")

    need(isinstance(man, dict), "not a JSON object")
    need(man.get("format") == "intsim-vectors" and man.get("version") == 1,
         "not an intsim-vectors manifest of version 1")
    op = man.get("op")
    need(isinstance(op, dict) and all(isinstance(op.get(k), str) for k in ("name", "type")),
         "'op' must be an object with string 'name' and 'type'")
    roles = man.get("roles")
    need(isinstance(roles, list) and all(isinstance(r, str) for r in roles), "'roles' must be a list of names")
    counts = man.get("golden_counts")
    need(isinstance(counts, dict) and all(is_int(v) for v in counts.values()),
         "'golden_counts' must map names to integers")
    need(isinstance(man.get("images"), dict), "'images' must be an object")
    arrays = man.get("arrays")
    need(isinstance(arrays, dict), "'arrays' must be an object")
    for n, meta in arrays.items():
        need(isinstance(meta, dict), f"arrays.{n} must be an object")
        shape = meta.get("shape")
        need(isinstance(shape, list) and len(shape) <= 8 and all(is_int(d) and 0 <= d < 1 << 31 for d in shape),
             f"arrays.{n}.shape must be a list of at most 8 sizes")
        need(is_int(meta.get("bits")) and 1 <= meta["bits"] <= 64, f"arrays.{n}.bits must be an integer in 1..64")
        need(isinstance(meta.get("signed"), bool), f"arrays.{n}.signed must be true or false")
        need(meta.get("group") in GROUP_TITLES, f"arrays.{n}.group must be one of {', '.join(GROUP_TITLES)}")
        f = meta.get("file")
        need(isinstance(f, str) and f == Path(f).name and f not in ("", ".", "..") and f.endswith(".hex"),
             f"arrays.{n}.file must be a plain .hex file name in the folder")


def check_inputs(program, op: dict[str, Any], man: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
    """The stored op inputs are what the engine may be fed: one per input of the program's op, each of
    shape (B, *value shape) with one B, every element within the value's declared range
    (``UserError`` otherwise; the kernels do no bounds checking)."""
    roles = man["roles"]
    if len(roles) != len(op["inputs"]):
        raise UserError(f"the manifest names {len(roles)} inputs, op '{op['name']}' has {len(op['inputs'])}")
    batch = None
    for role, name in zip(roles, op["inputs"]):
        if role not in arrays:
            raise UserError(f"{NPZ} lacks the input '{role}'")
        x = arrays[role]
        want = list(program.values[name]["shape"])
        if x.ndim != len(want) + 1 or list(x.shape[1:]) != want or x.shape[0] < 1:
            raise UserError(f"input '{role}' has shape {list(x.shape)}; op '{op['name']}' takes (B, "
                            f"{', '.join(map(str, want))})")
        if batch is not None and x.shape[0] != batch:
            raise UserError(f"input '{role}' holds {x.shape[0]} images, the others {batch}")
        batch = x.shape[0]
        lo, hi = value_range(program, name)
        if x.size and (int(x.min()) < lo or int(x.max()) > hi):
            raise UserError(f"input '{role}' has values in {int(x.min())}..{int(x.max())}, outside the range "
                            f"{lo}..{hi} of the program's value {name}")


def verify_vectors(program, folder: str | os.PathLike, gemm: str = "auto") -> list[str]:
    """Problems found (empty: the engine reproduces the vectors): the op re-run with the engine on
    the stored inputs against the stored output and counts, the stored constants against the
    program, and every hex file against its npz array."""
    from ..engine import run_op
    folder = Path(folder)
    man, arrays = load_vectors(folder)
    problems: list[str] = []
    name, typ = man["op"]["name"], man["op"]["type"]
    try:
        op = program.op(name)
    except KeyError:
        return [f"the program has no op '{name}'"]
    if op["type"] != typ:
        return [f"op '{name}' is a {op['type']} in the program, the vectors are of a {typ}"]
    for n, meta in man["arrays"].items():
        if n not in arrays:
            problems.append(f"{NPZ} lacks '{n}'")
            continue
        if list(arrays[n].shape) != meta["shape"]:
            problems.append(f"'{n}' has shape {list(arrays[n].shape)}, the manifest says {meta['shape']}")
            continue
        f = folder / meta["file"]
        if not f.is_file():
            problems.append(f"{meta['file']} is missing")
            continue
        if f.stat().st_size > 4 * MAX_VECTOR_BYTES:
            problems.append(f"{meta['file']} is larger than {4 * MAX_VECTOR_BYTES:,} bytes")
            continue
        try:
            h = parse_hex(f.read_text(), meta["bits"], meta["signed"], meta["shape"])
        except (ValueError, UnicodeDecodeError) as e:
            problems.append(f"{meta['file']} does not parse: {e}")
            continue
        if not np.array_equal(h, arrays[n]):
            problems.append(f"{meta['file']} differs from '{n}' in {NPZ} at {int(np.count_nonzero(h != arrays[n]))} "
                            "values")
        if meta["group"] in ("param", "table"):
            key = f"{name}.{n}"
            if key not in program.tensors or not np.array_equal(np.asarray(program.tensors[key], np.int64), arrays[n]):
                problems.append(f"stored '{n}' is not the program's tensor {key}")
        elif meta["group"] == "attr":
            if arrays[n].size != 1 or op["attrs"].get(n) != int(arrays[n].reshape(-1)[0]):
                problems.append(f"stored attribute '{n}' = {arrays[n].tolist()} is not the program's "
                                f"{op['attrs'].get(n)!r}")
    roles = man["roles"]
    if problems or any(r not in arrays for r in roles) or "y" not in arrays:
        return problems or ["the stored inputs or output are missing"]
    check_inputs(program, op, man, arrays)
    y, counts = run_op(program, op, *(arrays[r] for r in roles), gemm=gemm)
    y = np.asarray(y, dtype=np.int64)
    want = arrays["y"]
    if y.shape != want.shape:
        problems.append(f"the engine's output has shape {y.shape}, the stored one {want.shape}")
    elif not np.array_equal(y, want):
        bad = np.argwhere(y != want)
        i = tuple(int(t) for t in bad[0])
        problems.append(f"the engine's output differs from the stored one at {len(bad)} of {want.size} values "
                        f"(first at {i}: engine {int(y[i])}, stored {int(want[i])})")
    if {k: int(v) for k, v in counts.items()} != {k: int(v) for k, v in man["golden_counts"].items()}:
        problems.append(f"saturation counts differ: engine {dict(counts)}, stored {man['golden_counts']}")
    return problems


def check_vectors(program, folder: str | os.PathLike) -> bool:
    """True when the engine reproduces the stored vectors (see :func:`verify_vectors`)."""
    return not verify_vectors(program, folder)


# ---- command line ----------------------------------------------------------------------------

def add_arguments(p) -> None:
    p.add_argument("--program", required=True, metavar="FILE", help="the program file")
    p.add_argument("--layer", metavar="NAME", help="op name, e.g. blocks.0.attn.core or blocks.0.mlp.fc1 "
                                                   "(an unknown name lists the available ones)")
    p.add_argument("--images", type=positive, default=2, metavar="K", help="number of images (default 2)")
    p.add_argument("--data", metavar="PATH", help="images: ImageFolder tree or zip (default: the bundled "
                                                   "CIFAR-10 evaluation images)")
    p.add_argument("--seed", type=seed, default=0, help="seed of the image draw from --data (0)")
    p.add_argument("-o", "--out", metavar="DIR", help="folder to write (created; a previous vectors folder "
                                                      "is replaced)")
    p.add_argument("--check", metavar="DIR", help="instead: re-run the op of the vectors in DIR with the engine "
                                                  "and compare (exit 0 when they match, 1 when not)")


def _transform_for(program):
    """The evaluation transform of the program's model (provenance), else a plain resize to its size."""
    from ..data import Transform
    name = program.model.get("name") or program.header.get("provenance", {}).get("model")
    if name:
        from intsim.models.zoo import data_config, resolve
        dc = data_config(resolve(name))
        return Transform(size=dc["input_size"][-1], crop_pct=dc["crop_pct"], interpolation=dc["interpolation"])
    return Transform(size=int(program.model["img_size"]), crop_pct=1.0)


def run(a) -> int:
    from intsim.program.format import load
    if a.check:
        if a.layer or a.out:
            raise UserError("--check DIR takes only --program (not --layer / -o)")
        prog = load(a.program)
        problems = verify_vectors(prog, a.check)
        if problems:
            print(f"vectors in {a.check} do NOT match the engine:")
            for p in problems:
                print(f"  {p}")
            return 1
        man, _ = load_vectors(a.check)
        print(f"vectors in {a.check} ({man['op']['name']}, {man['images'].get('count')} images): "
              "the engine reproduces them")
        return 0
    if not a.layer or not a.out:
        raise UserError("intsim vectors needs --layer NAME and -o DIR (or --check DIR)")
    if a.images < 1:
        raise UserError(f"--images must be at least 1, not {a.images}")
    prog = load(a.program)
    find_op(prog, a.layer)
    _check_dest(Path(a.out))
    from ..data import load_images
    data = load_images(a.data, _transform_for(prog), a.images, split="eval", seed=a.seed)
    shape = tuple(prog.values[prog.header["inputs"][0]]["shape"])
    if tuple(data.images.shape[1:]) != shape:
        raise UserError(f"images have shape {data.images.shape[1:]}, the program expects {shape}")
    man = write_vectors(prog, a.layer, data.images, a.out,
                        {"count": len(data), "source": data.source, "ids": list(data.ids)})
    print(f"wrote {len(man['arrays'])} arrays of {man['op']['name']} ({man['op']['type']}, "
          f"{len(data)} images) to {a.out}: {NPZ}, one .hex per array, {MANIFEST}, {FORMAT_MD}")
    return 0
