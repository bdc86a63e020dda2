"""Structured fuzzing of program files: a program file is untrusted input (issue 21).

A small valid random program (``intsim.studies.random_program.make_program``) is saved, then
mutated in structured ways -- header fields given wrong JSON types, extremes, NaN / infinity,
negative values; op attributes and value-table entries likewise; integer tables with bit flips,
extremes, reversed order; float tensors with NaN / infinity; the file truncated -- and each mutant
goes through ``intsim inspect`` (in process), ``intsim.program.format.load``, the golden model,
the engine and the fake-quant model (``reference.fakequant``) on one image: the pieces of
``intsim run --program``. Every mutant must end in one of the accepted outcomes:

* ``rejected``: ``intsim inspect`` exits 2 with one line and ``load`` raises ``ProgramError``;
* ``ran``: the program loads, engine and golden run and agree bit for bit, and fake-quant runs;
* ``spec``: the program loads and the golden model raises ``SpecViolation`` on the data (a bound
  that depends on the data; ``intsim run`` exits 2 with one line).

Anything else is a failure: ``traceback`` (another exception, or inspect not exiting 0/2 with at
most one line on stderr), ``mismatch`` (engine != golden). A crash (segmentation fault) ends the
process, so a completed run proves there was none; ``slowest_s`` shows there was no hang.

    python -m intsim.studies.fuzz --mutations 600 [--seed 0] [--memory]
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import tempfile
import time
import tracemalloc
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from intsim.program.format import load
from intsim.program.program import META_KEY, ProgramError
from intsim.options import positive, seed
from intsim.studies.random_program import make_program

#: Replacement values of a header field: wrong JSON types, extremes, non-finite, negative.
BAD_VALUES: list[Any] = [None, "8", 1.5, True, [], {}, -1, 0, 1, 63, 64, 2 ** 31, 2 ** 62, 2 ** 63,
                         -(2 ** 63) - 1, 10 ** 30, float("nan"), float("inf"), -float("inf"), -0.5]

#: Fields of the model and provenance records that commands read.
RECORD = [("model", "name"), ("model", "num_classes"), ("provenance", "model"), ("provenance", "weights"),
          ("provenance", "checkpoint"), ("provenance", "seed"), ("provenance", "calibration"),
          ("provenance", "versions")]

OUTCOMES_OK = ("rejected", "ran", "spec")


@dataclass
class Mutant:
    kind: str                           # header / attr / value / table / float / truncate / json
    what: str                           # a short description
    data: bytes                         # the file's bytes


@dataclass
class Report:
    counts: Counter = field(default_factory=Counter)
    by_kind: dict[str, Counter] = field(default_factory=dict)
    failures: list[tuple[str, str, str]] = field(default_factory=list)
    spec_examples: list[tuple[str, str]] = field(default_factory=list)
    slowest_s: float = 0.0
    slowest: str = ""
    peak_bytes: int = 0
    peak_what: str = ""

    def add(self, m: Mutant, outcome: str, detail: str, seconds: float, peak: int) -> None:
        self.counts[outcome] += 1
        self.by_kind.setdefault(m.kind, Counter())[outcome] += 1
        if outcome not in OUTCOMES_OK:
            self.failures.append((m.what, outcome, detail))
        elif outcome == "spec" and len(self.spec_examples) < 5:
            self.spec_examples.append((m.what, detail))
        if seconds > self.slowest_s:
            self.slowest_s, self.slowest = seconds, m.what
        if peak > self.peak_bytes:
            self.peak_bytes, self.peak_what = peak, m.what


def file_bytes(header: dict[str, Any], tensors: dict[str, np.ndarray]) -> bytes:
    """A program file's bytes from any header (NaN / infinity written as JSON's non-standard tokens)."""
    from safetensors.numpy import save as st_save
    return st_save({k: np.ascontiguousarray(v) for k, v in sorted(tensors.items())},
                   metadata={META_KEY: json.dumps(header, sort_keys=True, allow_nan=True)})


def set_path(path: list, v: Any) -> Callable[[dict[str, Any]], None]:
    """A header mutation: set the field at ``path`` (keys and list indices) to ``v``, in place."""
    def fn(h: dict[str, Any]) -> None:
        d = h
        for p in path[:-1]:
            d = d[p]
        d[path[-1]] = v
    return fn


def base_program(seed: int = 0):
    """The program every mutant starts from: a valid 2-block tiny ViT (8x8 images, 5 tokens)."""
    return make_program(seed)


def mutants(n: int, seed: int = 0) -> list[Mutant]:
    """``n`` structured mutants of :func:`base_program` (deterministic for a seed)."""
    rng = np.random.default_rng(seed)
    prog = base_program(seed)
    h0, t0 = prog.header, prog.tensors
    good = file_bytes(h0, t0)
    out: list[Mutant] = []

    def header_mut(kind: str, what: str, fn: Callable[[dict[str, Any]], None]) -> None:
        h = json.loads(json.dumps(h0))
        fn(h)
        out.append(Mutant(kind, what, file_bytes(h, t0)))

    # fixed reproducers of the issue first
    header_mut("header", "settings a number", set_path(["settings"], 3))
    header_mut("header", "values a list", set_path(["values"], []))
    header_mut("header", "ops null", set_path(["ops"], None))
    header_mut("header", "version true", set_path(["version"], True))
    header_mut("header", "exp_frac_bits 10^30", set_path(["settings", "exp_frac_bits"], 10 ** 30))
    out.append(Mutant("json", "header nested 100000 deep", _with_header_text(good, "[" * 100000 + "]" * 100000)))
    out.append(Mutant("json", "abits of 10^6 digits",
                      _with_header_text(good, json.dumps(h0).replace('"abits": 4', '"abits": 1' + "0" * 1000000))))
    ops = h0["ops"]
    names = [o["name"] for o in ops]
    int_tensors = sorted(k for k, v in t0.items() if v.dtype.kind in "iu")
    float_tensors = sorted(k for k, v in t0.items() if v.dtype.kind == "f")
    top = ["format", "version", "model", "settings", "values", "ops", "output", "inputs", "provenance"]
    while len(out) < n:
        r = rng.integers(0, 100)
        v = BAD_VALUES[rng.integers(len(BAD_VALUES))]
        if r < 8:
            k = top[rng.integers(len(top))]
            header_mut("header", f"{k} = {v!r}", set_path([k], v))
        elif r < 12:
            part, k = RECORD[rng.integers(len(RECORD))]
            header_mut("header", f"{part}.{k} = {v!r}", set_path([part, k], v))
        elif r < 30:
            k = sorted(h0["settings"])[rng.integers(len(h0["settings"]))]
            header_mut("header", f"settings.{k} = {v!r}", set_path(["settings", k], v))
        elif r < 52:
            i = int(rng.integers(len(ops)))
            attrs = sorted(ops[i]["attrs"])
            if not attrs or rng.random() < 0.15:
                key = ["name", "type", "inputs", "output", "attrs"][rng.integers(5)]
                header_mut("attr", f"{names[i]}.{key} = {v!r}", set_path(["ops", i, key], v))
            else:
                a = attrs[rng.integers(len(attrs))]
                header_mut("attr", f"{names[i]}.{a} = {v!r}", set_path(["ops", i, "attrs", a], v))
        elif r < 62:
            vn = sorted(h0["values"])[rng.integers(len(h0["values"]))]
            key = ["kind", "bits", "shape", "scale", "zero_point"][rng.integers(5)]
            if key == "shape" and rng.random() < 0.5:
                v = [int(x) for x in rng.integers(-2, 20, size=rng.integers(1, 4))]
            header_mut("value", f"values.{vn}.{key} = {v!r}", set_path(["values", vn, key], v))
        elif r < 66:
            i = int(rng.integers(len(ops)))
            op = dict(ops[i])
            if op["type"] == "attention":
                v = [3, "log2", {}, {"type": "log2", "delta": -1.0}, {"type": "log2", "delta": float("nan")},
                     {"type": "nope"}, {"type": "uniform", "scale": 1e300}][rng.integers(7)]
                header_mut("attr", f"{names[i]}.softmax_quant = {v!r}", set_path(["ops", i, "attrs", "softmax_quant"], v))
            else:
                header_mut("attr", f"ops[{i}] = {v!r}", set_path(["ops", i], v))
        elif r < 90:
            k = int_tensors[rng.integers(len(int_tensors))]
            a = t0[k].copy()
            how = rng.integers(6)
            flat = a.reshape(-1)
            if how == 0 and flat.size:
                j, bit = int(rng.integers(flat.size)), int(rng.integers(a.dtype.itemsize * 8))
                flat.view(np.dtype(f"u{a.dtype.itemsize}"))[j] ^= np.array(1 << bit).astype(f"u{a.dtype.itemsize}")
                what = f"{k}[{j}] bit {bit} flipped"
            elif how == 1:
                info = np.iinfo(a.dtype)
                x = [info.max, info.min, -1, 2 ** 58 if a.dtype.itemsize == 8 else info.max // 2][rng.integers(4)]
                flat[:] = x
                what = f"{k} all {x}"
            elif how == 2 and flat.size:
                j = int(rng.integers(flat.size))
                info = np.iinfo(a.dtype)
                x = [info.max, info.min, -1, 0][rng.integers(4)]
                flat[j] = x
                what = f"{k}[{j}] = {x}"
            elif how == 3:
                a = np.ascontiguousarray(a[::-1])
                what = f"{k} reversed"
            elif how == 4:
                flat[:] = 0
                what = f"{k} all 0"
            else:
                rng.shuffle(flat)
                what = f"{k} shuffled"
            t = dict(t0)
            t[k] = a
            out.append(Mutant("table", what, file_bytes(h0, t)))
        elif r < 95:
            k = float_tensors[rng.integers(len(float_tensors))]
            a = t0[k].copy()
            x = [np.nan, np.inf, -np.inf, 0.0, -1.0, 1e300][rng.integers(6)]
            with np.errstate(over="ignore", invalid="ignore"):
                a.reshape(-1)[int(rng.integers(a.size))] = x          # 1e300 -> inf in float32
            t = dict(t0)
            t[k] = a
            out.append(Mutant("float", f"{k} element {x}", file_bytes(h0, t)))
        else:
            cut = int(rng.integers(1, len(good)))
            out.append(Mutant("truncate", f"truncated to {cut} of {len(good)} bytes", good[:cut]))
    return out[:n]


def _with_header_text(good: bytes, text: str) -> bytes:
    """The file ``good`` with its header text replaced (safetensors layout: 8-byte length, JSON)."""
    n = int.from_bytes(good[:8], "little")
    meta = json.loads(good[8:8 + n])
    meta["__metadata__"][META_KEY] = text
    hb = json.dumps(meta).encode()
    hb += b" " * (-len(hb) % 8)
    return len(hb).to_bytes(8, "little") + hb + good[8 + n:]


def run_one(path: str, image_seed: int = 0) -> tuple[str, str]:
    """``(outcome, detail)`` of one program file (see the module docstring)."""
    from intsim.cli import main as cli_main
    from intsim.engine import Engine
    from reference.golden import SpecViolation
    from reference.golden import run as golden_run

    err = io.StringIO()
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            rc = cli_main(["inspect", path])
    except SystemExit as e:                        # argparse
        rc = e.code
    except Exception as e:                         # noqa: BLE001 - the point is to find these
        return "traceback", f"inspect: {type(e).__name__}: {e}"[:300]
    lines = [x for x in err.getvalue().splitlines() if x.strip()]
    if rc not in (0, 2) or len(lines) > 1:
        return "traceback", f"inspect exit {rc}: {err.getvalue()[-300:]}"
    try:
        prog = load(path)
    except ProgramError as e:
        if rc != 2:
            return "traceback", f"inspect exit {rc} but load: {e}"[:300]
        return "rejected", str(e)[:200]
    except Exception as e:                         # noqa: BLE001
        return "traceback", f"load: {type(e).__name__}: {e}"[:300]
    if rc != 0:
        return "traceback", f"load passed but inspect exit {rc}: {lines}"[:300]
    try:
        shape = tuple(prog.values[prog.header["inputs"][0]]["shape"])
        img = np.random.default_rng(image_seed).integers(0, 256, size=(1, *shape), dtype=np.uint8)
        g = golden_run(prog, img)
    except SpecViolation as e:
        return "spec", str(e)[:200]
    except Exception as e:                         # noqa: BLE001
        return "traceback", f"golden: {type(e).__name__}: {e}"[:300]
    try:
        r = Engine(prog).run(img)
    except Exception as e:                         # noqa: BLE001
        return "traceback", f"engine: {type(e).__name__}: {e}"[:300]
    if not np.array_equal(r.logits, g.logits):
        return "mismatch", f"engine {r.logits.tolist()} golden {g.logits.tolist()}"
    try:                                           # the fake-quant level of `intsim run` (float semantics)
        import torch

        from reference.fakequant import FakeQuantModel
        with torch.inference_mode():
            y = FakeQuantModel(prog)(img)
        if tuple(y.shape) != tuple(g.logits.shape):
            return "traceback", f"fake-quant: logits of shape {tuple(y.shape)}, golden {g.logits.shape}"
    except Exception as e:                         # noqa: BLE001
        return "traceback", f"fake-quant: {type(e).__name__}: {e}"[:300]
    return "ran", ""


def fuzz(n: int, seed: int = 0, memory: bool = False, progress: Callable[[int], None] | None = None) -> Report:
    """Run ``n`` mutants through :func:`run_one`; the :class:`Report` of their outcomes."""
    rep = Report()
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "mutant.intsim")
        # warm-up (not counted): imports and kernel compilation, so that times and peaks are the mutants'
        with open(path, "wb") as f:
            f.write(file_bytes(base_program(seed).header, base_program(seed).tensors))
        outcome, detail = run_one(path)
        if outcome != "ran":
            raise RuntimeError(f"the unmutated program does not run cleanly: {outcome}: {detail}")
        for i, m in enumerate(mutants(n, seed)):
            with open(path, "wb") as f:
                f.write(m.data)
            if memory:
                tracemalloc.start()
            t = time.perf_counter()
            outcome, detail = run_one(path, i)
            dt = time.perf_counter() - t
            peak = 0
            if memory:
                peak = tracemalloc.get_traced_memory()[1]
                tracemalloc.stop()
            rep.add(m, outcome, detail, dt, peak)
            if progress is not None:
                progress(i)
    return rep


def format_report(rep: Report, n: int, seconds: float) -> str:
    lines = [f"{n} mutated programs in {seconds:.1f} s: " + ", ".join(f"{k} {rep.counts.get(k, 0)}"
             for k in (*OUTCOMES_OK, "traceback", "mismatch")) + ", crash 0 (the run completed)"]
    for kind, c in sorted(rep.by_kind.items()):
        lines.append(f"  {kind:9s} " + ", ".join(f"{k} {v}" for k, v in sorted(c.items())))
    lines.append(f"slowest mutant {rep.slowest_s:.2f} s ({rep.slowest})")
    if rep.peak_bytes:
        lines.append(f"worst traced peak memory {rep.peak_bytes / 2 ** 20:.1f} MiB ({rep.peak_what})")
    for what, detail in rep.spec_examples:
        lines.append(f"spec example: {what}: {detail}")
    for what, outcome, detail in rep.failures[:20]:
        lines.append(f"FAIL {outcome}: {what}: {detail}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m intsim.studies.fuzz", description=__doc__.split("\n")[0])
    ap.add_argument("--mutations", type=positive, default=600)
    ap.add_argument("--seed", type=seed, default=0)
    ap.add_argument("--memory", action="store_true", help="trace each mutant's peak memory (slower)")
    a = ap.parse_args(argv)
    if a.mutations < 1:
        ap.error("--mutations must be >= 1")
    t = time.perf_counter()
    rep = fuzz(a.mutations, a.seed, a.memory)
    print(format_report(rep, a.mutations, time.perf_counter() - t))
    try:
        import resource
        print(f"process peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    except ImportError:                            # not on every platform
        pass
    return 1 if rep.failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
