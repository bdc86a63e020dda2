"""A program file is untrusted input (issue 21): every reproducer of the issue that concerns program
files gives exit 2 with one line (``intsim inspect`` / ``intsim run --program``) or a
``ProgramError`` naming the op, the field and the bound; a fast structured fuzz run ends only in
rejection or a clean run whose engine result equals golden."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from intsim.cli import main as cli_main
from intsim.engine import Engine
from intsim.program.format import MAX_DEPTH, load, save, validate
from intsim.program.program import ProgramError
from intsim.studies import fuzz
from reference.golden import run as golden_run

from program_strategies import corrupted_files, programs


@pytest.fixture(scope="module")
def base():
    prog = fuzz.base_program(0)
    return prog.header, prog.tensors


def write(tmp_path, header, tensors, name="p.intsim") -> str:
    path = tmp_path / name
    path.write_bytes(fuzz.file_bytes(header, tensors))
    return str(path)


def mutate(base, fn=None, tensor_fn=None):
    h, t = base
    h = json.loads(json.dumps(h))
    t = {k: v.copy() for k, v in t.items()}
    if fn is not None:
        fn(h)
    if tensor_fn is not None:
        tensor_fn(t)
    return h, t


def op_index(h, name):
    return next(i for i, o in enumerate(h["ops"]) if o["name"] == name)


def set_attr(name, attr, v):
    def fn(h):
        h["ops"][op_index(h, name)]["attrs"][attr] = v
    return fn


def flip_bit(key, index, bit):
    def fn(t):
        a = t[key]
        a.reshape(-1).view(np.uint64)[index] ^= np.uint64(1 << bit)
    return fn


def fill(key, v):
    def fn(t):
        t[key][...] = v
    return fn


CORE = "blocks.0.attn.core"

# (id, header mutation, tensor mutation, text the one-line message must contain)
REPRODUCERS = [
    ("exp_table bit 62", None, flip_bit(f"{CORE}.exp_table", 0, 62), "exp_table[0] = 4611686018427453440 breaks"),
    ("exp_table all 2^58", None, fill(f"{CORE}.exp_table", 2 ** 58), "exp_table[0] = 288230376151711744 breaks"),
    ("exp_table increasing", None, lambda t: t[f"{CORE}.exp_table"].__setitem__(5, 60000), "non-increasing"),
    ("thresholds reversed", None, lambda t: t.__setitem__(f"{CORE}.thresholds", t[f"{CORE}.thresholds"][::-1].copy()),
     "thresholds sorted"),
    ("gelu table out of range", None, fill("blocks.0.mlp.gelu.table", 99), "table (an element) = 99 breaks"),
    ("settings a number", fuzz.set_path(["settings"], 3), None, "'settings' = 3 is not a JSON dict"),
    ("values a list", fuzz.set_path(["values"], []), None, "'values' = [] is not a JSON dict"),
    ("ops null", fuzz.set_path(["ops"], None), None, "'ops' = None is not a JSON list"),
    ("an op a number", fuzz.set_path(["ops", 3], 7), None, "an op is 7, not an object"),
    ("a shape a number", fuzz.set_path(["values", "blocks.0.norm1", "shape"], 5), None, "shape = 5 is not a list"),
    ("attrs a list", fuzz.set_path(["ops", 1, "attrs"], [1, 2]), None, "attrs = [1, 2] is not an object"),
    ("abits 10^30", fuzz.set_path(["settings", "abits"], 10 ** 30), None, "abits = an integer of 100 bits"),
    ("exp_frac_bits 10^30", fuzz.set_path(["settings", "exp_frac_bits"], 10 ** 30), None, "exp_frac_bits = an integer of 100 bits"),
    ("gelu_bits 10^30", fuzz.set_path(["settings", "gelu_bits"], 10 ** 30), None, "gelu_bits = an integer of 100 bits"),
    ("prob_bits 10^30", fuzz.set_path(["settings", "prob_bits"], 10 ** 30), None, "prob_bits = an integer of 100 bits"),
    ("mult_bits 10^30", fuzz.set_path(["settings", "mult_bits"], 10 ** 30), None, "mult_bits = an integer of 100 bits"),
    ("mult 10^30", set_attr("blocks.0.add1", "mult", 10 ** 30), None, "mult = an integer of 100 bits"),
    ("zp 10^30", set_attr(CORE, "zp", 10 ** 30), None, "zp = an integer of 100 bits"),
    ("lo 10^30", set_attr("blocks.0.norm1", "lo", 10 ** 30), None, "lo = an integer of 100 bits"),
    ("score_mult 10^30", set_attr(CORE, "score_mult", 10 ** 30), None, "score_mult = an integer of 100 bits"),
    ("score_mult 2^40", set_attr(CORE, "score_mult", 2 ** 40), None, "multiplier outside 0..2^31-1"),
    ("exp_frac_bits -1", set_attr(CORE, "exp_frac_bits", -1), None, "exp_frac_bits = -1 breaks exp_frac_bits == settings"),
    ("heads 0", set_attr(CORE, "heads", 0), None, "heads = 0 breaks 1 <= heads <= 12"),
    ("heads -1", set_attr(CORE, "heads", -1), None, "heads = -1 breaks"),
    ("heads 5", set_attr(CORE, "heads", 5), None, "heads = 5 breaks heads divides the width 12"),
    ("shift 63", set_attr("blocks.0.add1", "shift", 63), None, "shift outside 0..62"),
    ("hi 63", set_attr(CORE, "hi", 63), None, "hi = 63 breaks 0 <= hi <= 15"),
    ("hi below lo", set_attr(CORE, "hi", -1), None, "hi = -1 breaks"),
    ("softmax_quant a string", set_attr(CORE, "softmax_quant", "log2"), None, "softmax_quant = 'log2' is not dict"),
    ("softmax_quant unknown", set_attr(CORE, "softmax_quant", {"type": "nope"}), None, "is not a post-softmax quantizer"),
    ("tokens not all/first", set_attr("norm", "tokens", "some"), None, "tokens = 'some' breaks"),
    ("NaN weight scale", None, fill("blocks.0.attn.q.w_scale", np.nan), "w_scale holds NaN, infinity"),
    ("NaN LayerNorm gamma", None, fill("blocks.0.norm1.gamma", np.nan), "gamma holds NaN, infinity"),
    ("float64 scale above float32", None, fill("blocks.0.attn.q.w_scale", 1e300), "magnitude above float32's"),
    ("head scale NaN", fuzz.set_path(["values", "head", "scale"], float("nan")), None, "non-JSON number NaN"),
    ("head scale inf", fuzz.set_path(["values", "head", "scale"], float("inf")), None, "non-JSON number Infinity"),
    ("head scale 0", fuzz.set_path(["values", "head", "scale"], 0.0), None, "scale = 0.0 breaks 0 < scale < inf"),
    ("head scale negative", fuzz.set_path(["values", "head", "scale"], -1.0), None, "scale = -1.0 breaks"),
    ("image not patches", fuzz.set_path(["values", "image", "shape"], [3, 10, 8]), None, "multiples of patch = 4"),
    ("version true", fuzz.set_path(["version"], True), None, "version True is not supported"),
    ("abits 9", fuzz.set_path(["settings", "abits"], 9), None, "wbits and abits must be in 2..8"),
    ("exp_frac_bits 40", fuzz.set_path(["settings", "exp_frac_bits"], 40), None, "exp_frac_bits (E) must be in 0..12"),
    ("provenance seed a string", fuzz.set_path(["provenance", "seed"], "abc"), None, "provenance.seed = 'abc' is not"),
    ("calibration record a number", fuzz.set_path(["provenance", "calibration"], 5), None, "provenance.calibration = 5"),
    ("exp_bits 31", set_attr(CORE, "exp_bits", 31), None, "exp_bits = 31 breaks exp_bits == settings"),
]


@pytest.mark.parametrize("case", REPRODUCERS, ids=[c[0] for c in REPRODUCERS])
def test_reproducer_exits_2_with_one_line(case, base, tmp_path, capsys):
    _, hfn, tfn, text = case
    path = write(tmp_path, *mutate(base, hfn, tfn))
    t = time.perf_counter()
    with pytest.raises(ProgramError) as e:
        load(path)
    assert time.perf_counter() - t < 2.0             # no 2^(10^30), no huge allocation
    assert text in str(e.value) and "\n" not in str(e.value)
    capsys.readouterr()
    assert cli_main(["inspect", path]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("intsim: error: ") and text in err[0]


def test_run_program_exits_2_before_any_work(base, tmp_path, capsys):
    """The segfault reproducer of the issue: ``intsim run --program`` stops at the loader."""
    path = write(tmp_path, *mutate(base, None, flip_bit(f"{CORE}.exp_table", 0, 62)))
    assert cli_main(["--no-progress", "run", "--program", path, "--images", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"op '{CORE}' (attention): exp_table[0]" in err[0]


def test_program_error_names_file_op_field_and_bound(base, tmp_path):
    path = write(tmp_path, *mutate(base, set_attr(CORE, "hi", 63)))
    with pytest.raises(ProgramError, match=rf"^{path}: op '{CORE}' \(attention\): hi = 63 breaks 0 <= hi <= 15$"):
        load(path)


def test_deep_nesting_and_huge_integers_are_program_errors(base, tmp_path):
    good = fuzz.file_bytes(*base)
    for text, want in (("[" * 100000 + "]" * 100000, f"nested more than {MAX_DEPTH} deep"),
                       ('{"a": 1' + "0" * 1000000 + "}", "not valid JSON"),
                       ("[1, 2]", "not a JSON object"),
                       ("{" * 3, "not valid JSON")):
        p = tmp_path / "deep.intsim"
        p.write_bytes(fuzz._with_header_text(good, text))
        with pytest.raises(ProgramError, match=want):
            load(p)


def test_truncated_file_is_a_program_error(base, tmp_path):
    good = fuzz.file_bytes(*base)
    p = tmp_path / "cut.intsim"
    for cut in (4, 100, len(good) // 2, len(good) - 1):
        p.write_bytes(good[:cut])
        with pytest.raises(ProgramError):
            load(p)


def test_engine_refuses_an_unvalidated_program(base):
    """Defence in depth: the engine validates (semantic checks included) whatever it is given."""
    from intsim.program.program import Program
    h, t = mutate(base, None, fill(f"{CORE}.exp_table", 2 ** 58))
    with pytest.raises(ProgramError, match="exp_table"):
        Engine(Program(h, t))


def test_valid_unusual_program_runs_and_equals_golden(base, tmp_path):
    """A program that is unusual but within every bound (a flat exp table, saturating clamp) runs,
    and the engine equals golden."""
    def flat(t):
        t[f"{CORE}.exp_table"][...] = 1 << 16
    h, t = mutate(base, set_attr("blocks.0.attn.q", "hi", 3), flat)
    path = write(tmp_path, h, t)
    prog = load(path)
    img = np.random.default_rng(0).integers(0, 256, size=(2, 3, 8, 8), dtype=np.uint8)
    assert np.array_equal(Engine(prog).run(img).logits, golden_run(prog, img).logits)


def test_exported_random_programs_still_validate():
    for seed in range(5):
        validate(fuzz.base_program(seed))


def test_fuzz_fast_subset():
    """About 200 structured mutations, each through inspect, load, golden and engine."""
    rep = fuzz.fuzz(200, seed=1)
    assert not rep.failures, fuzz.format_report(rep, 200, 0.0)
    assert rep.counts["rejected"] > 100 and rep.counts["ran"] > 10


@given(prog=programs(), seed=st.integers(0, 2 ** 32 - 1))
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_any_valid_program_loads_and_engine_equals_golden(tmp_path_factory, prog, seed):
    """Programs of drawn shape and settings: saved, loaded (validation passes), and engine == golden
    bit for bit on drawn images; fake-quant runs."""
    path = tmp_path_factory.mktemp("p") / "p.intsim"
    save(prog, path)
    outcome, detail = fuzz.run_one(str(path), seed % 1000)
    assert outcome in ("ran", "spec"), detail


@given(case=corrupted_files())
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_any_corruption_is_rejected_or_runs_clean(tmp_path_factory, case):
    """One drawn corruption of a program file: inspect exits 2 with one line and load raises
    ProgramError, or the program runs with engine == golden (never a traceback or a mismatch)."""
    what, data = case
    path = tmp_path_factory.mktemp("c") / "c.intsim"
    path.write_bytes(data)
    outcome, detail = fuzz.run_one(str(path))
    assert outcome in fuzz.OUTCOMES_OK, f"{what}: {outcome}: {detail}"


@pytest.mark.heavy
def test_fuzz_large():
    """1000 mutations (several minutes): run with ``pytest -m heavy``."""
    rep = fuzz.fuzz(1000, seed=2)
    assert not rep.failures, fuzz.format_report(rep, 1000, 0.0)
