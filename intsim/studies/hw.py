"""``intsim hw``: cycles, memory traffic and energy of a program on a systolic array (per image).

Every GEMM of the program is lowered to SCALE-Sim's GEMM form (M rows of the input operand, K
the reduction, N output columns): each ``linear`` / ``patch_embed`` layer (M = tokens, K = input
features, N = output features), and per head (per window and head for window attention) the two
attention products, the scores Q K^T (M = N = tokens, K = head width) and the decoded
probabilities times V (M = K = tokens, N = head width). SCALE-Sim (the ``scalesim`` package,
install ``intsim[hw]``) simulates each distinct shape once on the array (``--array``,
``--dataflow``, ``--sram-kb`` for the input, filter and output SRAMs) and reports compute and
stall cycles, utilization, SRAM reads / writes per operand and DRAM traffic; a GEMM that occurs
several times is counted that many times, run back to back. SCALE-Sim runs in its
bandwidth-estimation mode: it sizes the DRAM interface so that the array never waits, so stall
cycles are 0 and DRAM traffic is the words that must cross it.

Softmax, LayerNorm, GELU and the residual add (and the token pool of Swin, on the add unit) are
modelled analytically: a unit takes ``--<unit>-epc`` elements per cycle, cycles =
ceil(elements / epc). Patchify and patch merging move data only: no cycles.

Energy per image = MACs x (multiply at the operand widths + add at the accumulator width) + SRAM
and DRAM traffic x energy per bit + unit elements x energy per element, from an editable table
(default: Horowitz, ISSCC 2014, 45 nm: ``intsim/assets/energy_45nm.json``; ``--energy-table``).
Input words are input codes (ifmap), filter words weight codes (or the K / V codes of attention),
output words accumulators at ``acc_bits`` (SCALE-Sim writes every output word the array produces,
partial sums of each reduction fold included, through the output SRAM to DRAM; requantization is
not part of its model). docs/co-design.md has the model and a worked example.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import UserError
from . import energy as en

DATAFLOWS = ("ws", "os", "is")
DATAFLOW_NAMES = {"ws": "weight stationary", "os": "output stationary", "is": "input stationary"}
DEFAULT_EPC = 16
#: the traffic counts of a GEMM, an op and the total (words, per operand)
TRAFFIC = ("sram_reads", "sram_writes", "dram_reads", "dram_writes")

#: results of SCALE-Sim per (array rows, cols, dataflow, SRAM sizes, M, N, K), kept for the process
_SIM_CACHE: dict[tuple, dict[str, Any]] = {}


@dataclass(frozen=True)
class HwConfig:
    """The array and the analytic units (elements per cycle)."""

    rows: int = 32
    cols: int = 32
    dataflow: str = "ws"
    sram_kb: tuple[int, int, int] = (256, 256, 128)      # input (ifmap), filter, output (ofmap)
    softmax_epc: int = DEFAULT_EPC
    layernorm_epc: int = DEFAULT_EPC
    gelu_epc: int = DEFAULT_EPC
    add_epc: int = DEFAULT_EPC
    energy_table: str | None = None

    def __post_init__(self):
        if self.dataflow not in DATAFLOWS:
            raise UserError(f"unknown dataflow '{self.dataflow}' (choose from {', '.join(DATAFLOWS)})")
        for k in ("rows", "cols", "softmax_epc", "layernorm_epc", "gelu_epc", "add_epc"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise UserError(f"{k} must be a positive integer, not {v!r}")
        if len(self.sram_kb) != 3 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in self.sram_kb):
            raise UserError(f"sram_kb must be three positive integers (input, filter, output KB), not {self.sram_kb!r}")

    def epc(self, unit: str) -> int:
        return getattr(self, f"{unit}_epc")


@dataclass(frozen=True)
class Gemm:
    """One GEMM shape of an op, run ``count`` times per image: (M x K) x (K x N)."""

    kind: str          # "gemm" (linear layer), "scores" (Q K^T), "probs_v" (P V)
    m: int
    n: int
    k: int
    count: int
    a_bits: int        # input (ifmap) operand width
    b_bits: int        # filter operand width


@dataclass
class Lowered:
    """An op's GEMMs and analytic-unit elements."""

    op: str
    type: str
    gemms: list[Gemm] = field(default_factory=list)
    units: dict[str, int] = field(default_factory=dict)     # unit -> elements per image


# ---- lowering a program ---------------------------------------------------------------

def _numel(shape) -> int:
    return int(math.prod(int(s) for s in shape))


def lower(prog) -> list[Lowered]:
    """Every op of the program as GEMM shapes and analytic-unit elements (batch of one image).
    Operand widths are those of ``intsim.studies.cost`` (the op modules' cost sections)."""
    s, vals = prog.settings, prog.values
    out: list[Lowered] = []
    for op in prog.ops:
        t = op["type"]
        lo = Lowered(op["name"], t)
        if t in ("linear", "patch_embed"):
            n, k = prog.t(op, "w").shape
            m = vals[op["output"]]["shape"][0] - (1 if t == "patch_embed" else 0)
            lo.gemms.append(Gemm("gemm", int(m), int(n), int(k), 1, int(vals[op["inputs"][0]]["bits"]), int(s["wbits"])))
        elif t in ("attention", "window_attention"):
            at = op["attrs"]
            tokens, d_model = (int(v) for v in vals[op["inputs"][0]]["shape"])
            heads = int(at["heads"])
            d = d_model // heads
            count, n_tok = heads, tokens
            if t == "window_attention":
                n_win, n_tok = (int(v) for v in prog.t(op, "tokens").shape)
                count = n_win * heads
            ab = int(s["abits"])
            lo.gemms.append(Gemm("scores", n_tok, n_tok, d, count, ab, ab))
            lo.gemms.append(Gemm("probs_v", n_tok, d, n_tok, count, int(at["decode_bits"]) + 1, ab))
            lo.units["softmax"] = count * n_tok * n_tok
        elif t == "layernorm":
            rows, d = (int(v) for v in vals[op["inputs"][0]]["shape"])
            lo.units["layernorm"] = (1 if op["attrs"]["tokens"] == "first" else rows) * d
        elif t == "gelu":
            lo.units["gelu"] = _numel(vals[op["inputs"][0]]["shape"])
        elif t == "add":
            lo.units["add"] = _numel(vals[op["output"]]["shape"])
        elif t == "token_pool":
            lo.units["add"] = _numel(vals[op["inputs"][0]]["shape"])
        elif t in ("patchify", "patch_merge"):
            pass                                    # data movement only
        else:
            raise UserError(f"intsim hw does not model op type '{t}' (op {op['name']})")
        out.append(lo)
    return out


# ---- SCALE-Sim ------------------------------------------------------------------------

def _import_scalesim():
    try:
        from scalesim.layout_utils import layouts
        from scalesim.memory.double_buffered_scratchpad_mem import double_buffered_scratchpad
        from scalesim.scale_config import scale_config
        from scalesim.single_layer_sim import single_layer_sim
        from scalesim.topology_utils import topologies
    except ImportError as e:
        raise UserError(f"intsim hw needs SCALE-Sim: pip install 'intsim[hw]' (or pip install scalesim) ({e})") from None
    return layouts, double_buffered_scratchpad, scale_config, single_layer_sim, topologies


def _config_text(cfg: HwConfig) -> str:
    i, f, o = cfg.sram_kb
    return f"""[general]
run_name = intsim_hw

[architecture_presets]
ArrayHeight = {cfg.rows}
ArrayWidth = {cfg.cols}
IfmapSramSzkB = {i}
FilterSramSzkB = {f}
OfmapSramSzkB = {o}
IfmapOffset = 0
FilterOffset = 10000000
OfmapOffset = 20000000
Dataflow = {cfg.dataflow}
Bandwidth = 10
ReadRequestBuffer = 32
WriteRequestBuffer = 32

[layout]
IfmapCustomLayout = False
IfmapSRAMBankBandwidth = 10
IfmapSRAMBankNum = 10
IfmapSRAMBankPort = 2
FilterCustomLayout = False
FilterSRAMBankBandwidth = 10
FilterSRAMBankNum = 10
FilterSRAMBankPort = 2

[sparsity]
SparsitySupport = false
SparseRep = ellpack_block
OptimizedMapping = false
BlockSize = 8
RandomNumberGeneratorSeed = 40

[run_presets]
InterfaceBandwidth = CALC
UseRamulatorTrace = False
"""


def _sim_key(cfg: HwConfig, shape: tuple[int, int, int]) -> tuple:
    return (cfg.rows, cfg.cols, cfg.dataflow, tuple(cfg.sram_kb), *shape)


def simulate(cfg: HwConfig, shapes: list[tuple[int, int, int]], progress: bool = False) -> dict[tuple, dict]:
    """SCALE-Sim figures of each distinct GEMM shape (M, N, K) on the array, from the cache where
    already simulated; the others are run in a temporary folder with SCALE-Sim's output silenced."""
    todo = sorted({s for s in shapes if _sim_key(cfg, s) not in _SIM_CACHE})
    if todo:
        layouts, scratchpad, scale_config, single_layer_sim, topologies = _import_scalesim()

        class Scratchpad(scratchpad):
            """SCALE-Sim 3.0.0's memory model ends with ``int(max(list of 1-element arrays))``,
            which NumPy >= 2.3 refuses; everything before it has run, so the same figure (the
            last cycle an output word is written) is read off the trace it has just built."""

            def service_memory_requests(self, ifmap_demand_mat, filter_demand_mat, ofmap_demand_mat):
                try:
                    super().service_memory_requests(ifmap_demand_mat, filter_demand_mat, ofmap_demand_mat)
                except TypeError:
                    if getattr(self, "ofmap_trace_matrix", None) is None:
                        raise
                    self.total_cycles = int(self.ofmap_trace_matrix[:, 0].max())
                    self.traces_valid = True

        from tqdm import tqdm
        with tempfile.TemporaryDirectory(prefix="intsim-hw-") as tmp:
            conf_path, topo_path, layout_path = (os.path.join(tmp, n) for n in ("array.cfg", "gemms.csv", "layout.csv"))
            with open(conf_path, "w") as fh:
                fh.write(_config_text(cfg))
            with open(topo_path, "w") as fh:
                fh.write("Layer, M, N, K,\n")
                for j, (m, n, k) in enumerate(todo):
                    fh.write(f"g{j}, {m}, {n}, {k},\n")
            with open(layout_path, "w") as fh:
                fh.write("Layer,\n")
            quiet = io.StringIO()
            with contextlib.redirect_stdout(quiet):
                conf = scale_config()
                conf.read_conf_file(conf_path)
                topo = topologies()
                topo.load_arrays(topofile=topo_path, mnk_inputs=True)
                lay = layouts()
                lay.load_arrays(layoutfile=layout_path, mnk_inputs=True)
            bar = tqdm(todo, desc=f"SCALE-Sim {cfg.rows}x{cfg.cols} {cfg.dataflow}", unit="GEMM",
                       disable=not progress, leave=False)
            for j, shape in enumerate(bar):
                with contextlib.redirect_stdout(quiet):
                    sim = single_layer_sim()
                    sim.set_params(layer_id=j, config_obj=conf, topology_obj=topo, layout_obj=lay, verbose=False)
                    sim.memory_system = Scratchpad()
                    sim.run()
                    with_dram, total, stall, util, mapping, _ = sim.get_compute_report_items()
                _SIM_CACHE[_sim_key(cfg, shape)] = {
                    "cycles": int(total), "stall_cycles": int(stall), "compute_cycles": int(total) - int(stall),
                    "cycles_with_dram": int(with_dram),
                    "util_pct": float(util), "mapping_eff_pct": float(mapping),
                    "sram_reads": {"ifmap": int(sim.ifmap_sram_reads), "filter": int(sim.filter_sram_reads)},
                    "sram_writes": {"ofmap": int(sim.ofmap_sram_writes)},
                    "dram_reads": {"ifmap": int(sim.ifmap_dram_reads), "filter": int(sim.filter_dram_reads)},
                    "dram_writes": {"ofmap": int(sim.ofmap_dram_writes)},
                }
    return {s: _SIM_CACHE[_sim_key(cfg, s)] for s in shapes}


# ---- cycles and energy ----------------------------------------------------------------

def _gemm_figures(g: Gemm, sim: dict, table: dict, acc_bits: int) -> dict[str, Any]:
    """Per-image figures of one GEMM shape times its count."""
    c = g.count
    sr, sw, dr, dw = sim["sram_reads"], sim["sram_writes"], sim["dram_reads"], sim["dram_writes"]
    macs = g.m * g.n * g.k * c
    sram_bits = c * (sr["ifmap"] * g.a_bits + sr["filter"] * g.b_bits + sw["ofmap"] * acc_bits)
    dram_bits = c * (dr["ifmap"] * g.a_bits + dr["filter"] * g.b_bits + dw["ofmap"] * acc_bits)
    return {
        **asdict(g),
        "macs": macs, "macs_width": f"{g.a_bits}x{g.b_bits}",
        "cycles": c * sim["cycles"], "compute_cycles": c * sim["compute_cycles"], "stall_cycles": c * sim["stall_cycles"],
        "cycles_with_dram": c * sim["cycles_with_dram"],
        "util_pct": sim["util_pct"], "mapping_eff_pct": sim["mapping_eff_pct"],
        "sram_reads": {k: c * v for k, v in sr.items()}, "sram_writes": {k: c * v for k, v in sw.items()},
        "dram_reads": {k: c * v for k, v in dr.items()}, "dram_writes": {k: c * v for k, v in dw.items()},
        "sram_bits": sram_bits, "dram_bits": dram_bits,
        "energy_pj": {"mac": macs * en.mac_pj(table, g.a_bits, g.b_bits, acc_bits),
                      "sram": en.sram_pj(table, sram_bits), "dram": en.dram_pj(table, dram_bits)},
    }


def _sum_dicts(items: list[dict[str, int]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for d in items:
        for k, v in d.items():
            out[k] = out.get(k, 0) + v
    return out


def hw_cost(prog, config: HwConfig | dict | None = None, progress: bool = False,
            table: dict[str, Any] | None = None) -> dict[str, Any]:
    """Cycles, traffic and energy of ``prog`` per image on the array ``config`` (an ``HwConfig``,
    or a dict of its fields, ``array: "RxC"`` accepted): ``{"config", "energy_table", "ops",
    "total"}``; ``total`` carries flat columns for sweeps (``cycles``, ``energy_uj``, ...)."""
    if config is None:
        cfg = HwConfig()
    elif isinstance(config, HwConfig):
        cfg = config
    else:
        d = dict(config)
        if "array" in d:
            d["rows"], d["cols"] = parse_array(d.pop("array"))
        if "sram_kb" in d:
            d["sram_kb"] = tuple(parse_sram(d["sram_kb"]) if isinstance(d["sram_kb"], str) else d["sram_kb"])
        try:
            cfg = HwConfig(**d)
        except TypeError as e:
            raise UserError(f"hw config: {e}") from None
    table = table if table is not None else en.load_table(cfg.energy_table)
    acc_bits = int(prog.settings["acc_bits"])
    lowered = lower(prog)
    sims = simulate(cfg, [(g.m, g.n, g.k) for lo in lowered for g in lo.gemms], progress)
    pe = cfg.rows * cfg.cols
    ops = []
    for lo in lowered:
        gs = [_gemm_figures(g, sims[(g.m, g.n, g.k)], table, acc_bits) for g in lo.gemms]
        units = {u: {"elements": e, "epc": cfg.epc(u), "cycles": -(-e // cfg.epc(u)),
                     "energy_pj": e * table["unit_pj_per_element"][u]} for u, e in lo.units.items()}
        gemm_cycles = sum(g["cycles"] for g in gs)
        unit_cycles = sum(u["cycles"] for u in units.values())
        macs = sum(g["macs"] for g in gs)
        e_pj = {"mac": sum(g["energy_pj"]["mac"] for g in gs), "sram": sum(g["energy_pj"]["sram"] for g in gs),
                "dram": sum(g["energy_pj"]["dram"] for g in gs), "units": sum(u["energy_pj"] for u in units.values())}
        e_pj["total"] = sum(e_pj.values())
        ops.append({
            "op": lo.op, "type": lo.type, "gemms": gs, "units": units, "macs": macs,
            "gemm_cycles": gemm_cycles, "unit_cycles": unit_cycles, "cycles": gemm_cycles + unit_cycles,
            "cycles_with_dram": sum(g["cycles_with_dram"] for g in gs) + unit_cycles,
            "stall_cycles": sum(g["stall_cycles"] for g in gs),
            "array_util_pct": 100.0 * macs / (gemm_cycles * pe) if gemm_cycles else None,
            **{k: _sum_dicts([g[k] for g in gs]) for k in TRAFFIC},
            "energy_pj": e_pj,
        })
    tot_e = {k: sum(o["energy_pj"][k] for o in ops) for k in ("mac", "sram", "dram", "units", "total")}
    gemm_cycles = sum(o["gemm_cycles"] for o in ops)
    macs = sum(o["macs"] for o in ops)
    total = {
        "macs": macs,
        "macs_by_width": dict(sorted(_sum_dicts([{g["macs_width"]: g["macs"]} for o in ops for g in o["gemms"]]).items())),
        "gemm_cycles": gemm_cycles, "unit_cycles": sum(o["unit_cycles"] for o in ops),
        "cycles": sum(o["cycles"] for o in ops), "stall_cycles": sum(o["stall_cycles"] for o in ops),
        "cycles_with_dram": sum(o["cycles_with_dram"] for o in ops),
        "array_util_pct": 100.0 * macs / (gemm_cycles * pe) if gemm_cycles else None,
        "gemm_shapes": len({(g["m"], g["n"], g["k"]) for o in ops for g in o["gemms"]}),
        "gemm_runs": sum(g["count"] for o in ops for g in o["gemms"]),
        **{k: _sum_dicts([o[k] for o in ops]) for k in TRAFFIC},
        "unit_elements": _sum_dicts([{u: v["elements"] for u, v in o["units"].items()} for o in ops]),
        "energy_pj": tot_e, "energy_uj": tot_e["total"] / 1e6,
    }
    total["dram_words"] = sum(total["dram_reads"].values()) + sum(total["dram_writes"].values())
    return {"config": {**asdict(cfg), "array": f"{cfg.rows}x{cfg.cols}", "scalesim_mode": "CALC (bandwidth estimated)"},
            "energy_table": dict(table), "ops": ops, "total": total}


# ---- report ---------------------------------------------------------------------------

def format_hw(res: dict) -> str:
    from ..options import text_table
    def row(name: str, typ: str, o: dict) -> list[str]:
        util = "" if o["array_util_pct"] is None else f"{o['array_util_pct']:.1f}"
        return [name, typ, f"{o['macs']:,}", f"{o['cycles']:,}", f"{o['stall_cycles']:,}", util,
                *(f"{sum(o[k].values()):,}" for k in TRAFFIC), f"{o['energy_pj']['total'] / 1e3:,.1f}"]

    rows = [["op", "type", "MACs", "cycles", "stall", "util %", "SRAM rd", "SRAM wr", "DRAM rd", "DRAM wr", "energy nJ"]]
    rows += [row(o["op"], o["type"], o) for o in res["ops"] if o["cycles"]]
    t = res["total"]
    rows.append(row("total", "", t))
    e = t["energy_pj"]
    c = res["config"]
    lines = [text_table(rows), "",
             f"cycles per image: {t['cycles']:,} ({t['gemm_cycles']:,} on the array, {t['stall_cycles']:,} of them stalls; "
             f"{t['unit_cycles']:,} in the softmax / LayerNorm / GELU / add units at "
             f"{c['softmax_epc']} / {c['layernorm_epc']} / {c['gelu_epc']} / {c['add_epc']} elements per cycle); "
             f"{t['cycles_with_dram']:,} if no GEMM's DRAM prefetch and write-back overlaps another's",
             f"array: {t['gemm_runs']:,} GEMM runs of {t['gemm_shapes']} distinct shapes, "
             f"utilization {t['array_util_pct']:.1f}% over the array cycles" if t["array_util_pct"] is not None else "array: no GEMM",
             "traffic (words): SRAM reads " + ", ".join(f"{k} {v:,}" for k, v in t["sram_reads"].items())
             + f"; SRAM writes ofmap {t['sram_writes'].get('ofmap', 0):,}; DRAM reads "
             + ", ".join(f"{k} {v:,}" for k, v in t["dram_reads"].items())
             + f"; DRAM writes ofmap {t['dram_writes'].get('ofmap', 0):,}",
             f"energy per image: {t['energy_uj']:.3f} uJ (MACs {e['mac'] / 1e6:.3f}, SRAM {e['sram'] / 1e6:.3f}, "
             f"DRAM {e['dram'] / 1e6:.3f}, units {e['units'] / 1e6:.3f}) with table {res['energy_table']['name']}"]
    return "\n".join(lines)


# ---- command line ---------------------------------------------------------------------

def parse_array(v: str) -> tuple[int, int]:
    parts = str(v).lower().split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise UserError(f"--array expects ROWSxCOLS with positive integers (e.g. 32x32), not '{v}'")
    r, c = (int(p) for p in parts)
    if r < 1 or c < 1:
        raise UserError(f"--array expects positive rows and columns, not '{v}'")
    return r, c


def hw_spec(v: str) -> str:
    """argparse type of ``intsim sweep --hw``: ``RxC`` or ``RxC:DATAFLOW`` (default ws), returned
    normalized as ``"RxC:df"`` (a string, so that the sweep folder records it as it is)."""
    arr, _, df = str(v).partition(":")
    df = (df or "ws").strip().lower()
    try:
        r, c = parse_array(arr)
    except UserError as e:
        raise argparse.ArgumentTypeError(str(e).replace("--array", "--hw")) from None
    if df not in DATAFLOWS:
        raise argparse.ArgumentTypeError(f"--hw dataflow must be one of {', '.join(DATAFLOWS)}, not '{df}'")
    return f"{r}x{c}:{df}"


def sweep_columns(prog, spec: str) -> dict[str, Any]:
    """The ``hw.*`` columns of a sweep row: cycles, energy, DRAM words and utilization per image of
    ``prog`` on the array ``spec`` (from :func:`hw_spec`; default SRAM sizes, units and energy table)."""
    arr, _, df = spec.partition(":")
    t = hw_cost(prog, {"array": arr, "dataflow": df or "ws"})["total"]
    return {"array": spec, "cycles": t["cycles"], "energy_uj": t["energy_uj"], "dram_words": t["dram_words"],
            "array_util_pct": t["array_util_pct"]}


def parse_sram(v: str) -> tuple[int, int, int]:
    parts = str(v).split(",")
    if len(parts) != 3 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise UserError(f"--sram-kb expects three positive integers INPUT,FILTER,OUTPUT in KB (e.g. 256,256,128), not '{v}'")
    return tuple(int(p) for p in parts)  # type: ignore[return-value]


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..options import positive
    p.add_argument("program", metavar="PROGRAM", help="program file (intsim calibrate -o ...)")
    g = p.add_argument_group("array (SCALE-Sim)")
    g.add_argument("--array", default="32x32", metavar="RxC", help="systolic array rows x columns (default 32x32)")
    g.add_argument("--dataflow", default="ws", metavar="DF",
                   help="ws (weight stationary), os (output stationary) or is (input stationary); default ws")
    g.add_argument("--sram-kb", default="256,256,128", metavar="I,F,O",
                   help="input, filter and output SRAM sizes in KB (default 256,256,128)")
    u = p.add_argument_group("analytic units: elements per cycle (cycles = ceil(elements / epc))")
    u.add_argument("--softmax-epc", type=positive, default=DEFAULT_EPC,
                   help=f"integer softmax unit: scores per cycle (default {DEFAULT_EPC})")
    u.add_argument("--layernorm-epc", type=positive, default=DEFAULT_EPC,
                   help=f"LayerNorm unit: elements per cycle (default {DEFAULT_EPC})")
    u.add_argument("--gelu-epc", type=positive, default=DEFAULT_EPC,
                   help=f"GELU table unit: elements per cycle (default {DEFAULT_EPC})")
    u.add_argument("--add-epc", type=positive, default=DEFAULT_EPC,
                   help=f"residual add (and token pool) unit: elements per cycle (default {DEFAULT_EPC})")
    o = p.add_argument_group("energy and output")
    o.add_argument("--energy-table", metavar="FILE",
                   help="energy table JSON (default: Horowitz ISSCC 2014, 45 nm, intsim/assets/energy_45nm.json)")
    o.add_argument("--json", metavar="FILE", help="also write every figure as JSON")


def run(a) -> int:
    from ..options import check_writable, print_report
    from intsim.program.format import load
    rows, cols = parse_array(a.array)
    cfg = HwConfig(rows=rows, cols=cols, dataflow=a.dataflow, sram_kb=parse_sram(a.sram_kb),
                   softmax_epc=a.softmax_epc, layernorm_epc=a.layernorm_epc, gelu_epc=a.gelu_epc,
                   add_epc=a.add_epc, energy_table=a.energy_table)
    table = en.load_table(cfg.energy_table)               # a bad table fails before the program loads
    check_writable(a.json, "JSON report")
    prog = load(a.program)
    res = hw_cost(prog, cfg, progress=not getattr(a, "no_progress", False), table=table)
    title = (f"{a.program}: {rows}x{cols} array, {DATAFLOW_NAMES[cfg.dataflow]}, SRAM "
             f"{'/'.join(str(v) for v in cfg.sram_kb)} KB (input/filter/output), batch 1")
    return print_report(title, format_hw(res), {"program": a.program, **res}, a.json)
