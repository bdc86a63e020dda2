"""``intsim hw``: SCALE-Sim cycles against the weight-stationary formula, energy against figures
computed by hand, and bad input.

The tiny random program (intsim.studies.random_program.make_program defaults): 5 tokens (4 patches
+ class token), dim 12, 2 heads of width 6, MLP 48, depth 2, 5 classes, W4A4, decode width 16
(probability codes decoded to 17-bit signed values), accumulator 32 bits.
"""
import json
import math

import numpy as np
import pytest

pytest.importorskip("scalesim")

from intsim.cli import main  # noqa: E402
from intsim.program.format import save  # noqa: E402
from intsim.studies.cost import program_cost  # noqa: E402
from intsim.studies.hw import HwConfig, hw_cost, simulate  # noqa: E402
from intsim.studies.random_program import make_program  # noqa: E402


@pytest.fixture(scope="module")
def tiny():
    return make_program(np.random.default_rng(0))


def ws_cycles_by_hand(m: int, n: int, k: int, rows: int, cols: int) -> int:
    """Weight-stationary GEMM (M x K) x (K x N) on a rows x cols array, one fold after another.

    The filter (K x N) is cut into ceil(K / rows) x ceil(N / cols) folds of rows x cols weights.
    One fold takes
        rows                      cycles to shift its weights into the array (one row per cycle),
      + M + rows + cols - 2       cycles for the M input rows to stream through: the last input row
                                  enters at cycle M - 1, is skewed across the rows - 1 further rows,
                                  and its partial sums leave the last of the cols columns cols - 1
                                  cycles later (+ 1 for the cycle it is written)
      = 2 rows + cols + M - 2.
    cycles = ceil(K / rows) ceil(N / cols) (2 rows + cols + M - 2).
    """
    return math.ceil(k / rows) * math.ceil(n / cols) * (2 * rows + cols + m - 2)


def test_linear_cycles_against_weight_stationary_formula(tiny):
    """blocks.0.mlp.fc1 of the tiny program (M = 5 tokens, K = 12, N = 48) on an 8 x 8 array:
    2 x 6 folds of 2*8 + 8 + 5 - 2 = 27 cycles = 324. SCALE-Sim reports 323: its count is the
    index of the cycle in which the last output is written, counting the first cycle as 0, so it
    is the hand figure minus one, for every shape."""
    res = hw_cost(tiny, HwConfig(rows=8, cols=8, dataflow="ws"))
    fc1 = next(o for o in res["ops"] if o["op"] == "blocks.0.mlp.fc1")
    (g,) = fc1["gemms"]
    assert (g["m"], g["n"], g["k"]) == (5, 48, 12)
    assert ws_cycles_by_hand(5, 48, 12, 8, 8) == 324
    assert g["cycles"] == 324 - 1 and g["stall_cycles"] == 0
    # the same rule on every GEMM of the program, attention products included (count x shape)
    for o in res["ops"]:
        for g in o["gemms"]:
            assert g["cycles"] == g["count"] * (ws_cycles_by_hand(g["m"], g["n"], g["k"], 8, 8) - 1), (o["op"], g)
    # and on the bundled model's q / k / v / proj (65 tokens, 192 -> 192) on 32 x 32: 6 x 6 folds of 159
    (sim,) = simulate(HwConfig(), [(65, 192, 192)]).values()
    assert sim["cycles"] == ws_cycles_by_hand(65, 192, 192, 32, 32) - 1 == 6 * 6 * 159 - 1 == 5723


def test_shapes_simulated_once_and_macs_agree_with_cost_model(tiny):
    res = hw_cost(tiny, {"array": "8x8", "dataflow": "ws"})
    t = res["total"]
    # patch 4x12x48, q/k/v/proj 5x12x12, fc1, fc2, head 1x5x12, scores 5x5x6, probs x V 5x6x5
    assert t["gemm_shapes"] == 7
    assert t["gemm_runs"] == 1 + 2 * (6 + 2 * 2) + 1      # per block 6 linears and 2 heads x 2 products
    assert t["macs_by_width"] == program_cost(tiny)["total"]["macs_by_width"]
    assert t["unit_elements"] == {"layernorm": 2 * 2 * 5 * 12 + 12, "softmax": 2 * 2 * 25, "add": 2 * 2 * 5 * 12,
                                  "gelu": 2 * 5 * 48}


def ws_traffic_by_hand(m, n, k, rows, cols):
    """SCALE-Sim's weight-stationary traffic (words): each input row is read once per column fold,
    each weight once, each output (partial sum) written once per row fold; DRAM holds every
    operand once and takes every output write."""
    rf, cf = math.ceil(k / rows), math.ceil(n / cols)
    return {"sram": (m * k * cf, k * n, m * n * rf), "dram": (m * k, k * n, m * n * rf)}


def test_energy_totals_by_hand(tiny, tmp_path):
    """A round table: an a x b multiply costs a*b pJ (64 pJ at 8 x 8 bits, scaled by a*b / 64), a
    w-bit add w pJ, SRAM 1 pJ per bit, DRAM 2 pJ per bit, units 1 / 2 / 3 / 4 pJ per element."""
    table = {"name": "round", "mult_pj": {"8": 64}, "add_pj": {"32": 32}, "sram_pj_per_32_bits": 32,
             "dram_pj_per_32_bits": 64, "unit_pj_per_element": {"softmax": 1, "layernorm": 2, "gelu": 3, "add": 4}}
    path = tmp_path / "round.json"
    path.write_text(json.dumps(table))
    res = hw_cost(tiny, HwConfig(rows=8, cols=8, energy_table=str(path)))
    # MACs: patch 4x12x48 at 8x4, every other linear and the scores at 4x4, probs x V at 17x4; add 32 bits
    patch, lin = 4 * 12 * 48, 2 * (4 * 5 * 12 * 12 + 5 * 48 * 12 + 5 * 12 * 48) + 5 * 12
    scores = pv = 2 * 2 * 5 * 5 * 6
    mac = patch * (32 + 32) + (lin + scores) * (16 + 32) + pv * (68 + 32)
    # traffic: (shape, count, input bits, filter bits); outputs are 32-bit accumulators
    gemms = [((4, 12, 48), 1, 8, 4), ((5, 12, 12), 8, 4, 4), ((5, 48, 12), 2, 4, 4), ((5, 12, 48), 2, 4, 4),
             ((1, 5, 12), 1, 4, 4), ((5, 5, 6), 4, 4, 4), ((5, 6, 5), 4, 17, 4)]
    sram = dram = 0
    for (m, n, k), c, a, b in gemms:
        t = ws_traffic_by_hand(m, n, k, 8, 8)
        sram += c * (t["sram"][0] * a + t["sram"][1] * b + t["sram"][2] * 32) * 1
        dram += c * (t["dram"][0] * a + t["dram"][1] * b + t["dram"][2] * 32) * 2
    units = 100 * 1 + 252 * 2 + 480 * 3 + 240 * 4
    e = res["total"]["energy_pj"]
    assert e["mac"] == pytest.approx(mac) and mac == 1_068_576
    assert e["sram"] == pytest.approx(sram) and e["dram"] == pytest.approx(dram)
    assert e["units"] == pytest.approx(units) == 3004
    assert e["total"] == pytest.approx(mac + sram + dram + units)
    assert res["total"]["energy_uj"] == pytest.approx((mac + sram + dram + units) / 1e6)
    # analytic unit cycles: ceil(elements / epc) per op, default 16 elements per cycle
    assert res["total"]["unit_cycles"] == 2 * (2 * math.ceil(60 / 16) + math.ceil(50 / 16) + 2 * math.ceil(60 / 16)
                                               + math.ceil(240 / 16)) + 1


def test_cli_table_and_json(tiny, tmp_path, capsys):
    prog = tmp_path / "tiny.intsim"
    save(tiny, prog)
    out = tmp_path / "hw.json"
    assert main(["--no-progress", "hw", str(prog), "--array", "8x8", "--dataflow", "os", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "output stationary" in text and "blocks.0.mlp.fc1" in text and "energy per image" in text
    rep = json.loads(out.read_text())
    assert rep["config"]["array"] == "8x8" and rep["total"]["cycles"] > 0 and rep["total"]["energy_uj"] > 0


@pytest.mark.parametrize("args, message", [
    (["--dataflow", "rs"], "unknown dataflow 'rs'"),
    (["--array", "0x32"], "--array expects positive"),
    (["--array", "abc"], "--array expects ROWSxCOLS"),
    (["--sram-kb", "256,256"], "--sram-kb expects three"),
])
def test_bad_options_exit_2(tiny, tmp_path, capsys, args, message):
    prog = tmp_path / "tiny.intsim"
    save(tiny, prog)
    assert main(["--no-progress", "hw", str(prog), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_missing_program_exit_2(tmp_path, capsys):
    assert main(["--no-progress", "hw", str(tmp_path / "none.intsim")]) == 2
    err = capsys.readouterr().err.strip()
    assert "program file not found" in err and "\n" not in err


GOOD = {"mult_pj": {"8": 0.2}, "add_pj": {"32": 0.1}, "sram_pj_per_32_bits": 5, "dram_pj_per_32_bits": 640,
        "unit_pj_per_element": {"softmax": 1, "layernorm": 1, "gelu": 1, "add": 1}}


@pytest.mark.parametrize("text, message", [
    ("{", "is not valid JSON"),
    (json.dumps({k: v for k, v in GOOD.items() if k != "dram_pj_per_32_bits"}), "missing key 'dram_pj_per_32_bits'"),
    (json.dumps({**GOOD, "mult_pj": {"8": -0.2}}), "mult_pj[8] must be >= 0"),
    (json.dumps({**GOOD, "sram_pj_per_32_bits": "5"}), "sram_pj_per_32_bits must be a number"),
    (json.dumps({**GOOD, "unit_pj_per_element": {"softmax": 1}}), "missing key 'unit_pj_per_element.layernorm'"),
    (json.dumps({**GOOD, "add_pj": {"wide": 1}}), "width 'wide' is not an integer"),
])
def test_malformed_energy_table_exit_2(tiny, tmp_path, capsys, text, message):
    prog = tmp_path / "tiny.intsim"
    save(tiny, prog)
    bad = tmp_path / "bad.json"
    bad.write_text(text)
    assert main(["--no-progress", "hw", str(prog), "--energy-table", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
