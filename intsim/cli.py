"""The ``intsim`` command line.

    intsim run         calibrate (or load --program) and compare float, fake-quant, engine and golden
    intsim calibrate   calibrate and write the integer program
    intsim inspect     summarize a program file
    intsim export      the program as a standard ONNX graph (onnxruntime executes it bit for bit)
    intsim vectors     test vectors of one op (npz + hex + FORMAT.md); --check re-runs them on the engine
    intsim plot        sweep accuracy vs cost, post-softmax distribution, per-layer SQNR (PNG)
    intsim sweep / clipping / profile / sensitivity / bench   studies (see each one's --help)
    intsim bundle      (maintainers) rebuild the bundled image set from the CIFAR-10 zip

Bad input (unknown model, bits out of range, unreadable files, unwritable outputs...) prints one
message and exits with code 2, before any long work starts, and leaves no partial output.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from . import options
from .errors import UserError
from .options import check_writable, program_and_model, write_json_atomic
from .program.program import write_atomic

# Sleeping (not spinning) OpenMP workers: on a 2-core machine spinning threads of torch and Numba
# starve each other (torch at batch 1 measured 2 s instead of 0.14 s per image). Must be set
# before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# Commands implemented by a module of their own: ``intsim.<module>`` has ``add_arguments(parser)``
# and ``run(args) -> exit code``; its docstring is the command's --help description.
MODULE_COMMANDS = {
    "sweep": "grid of calibrate-and-evaluate points -> CSV and JSON (resumable)",
    "vectors": "test vectors of one op (npz + hex) for hardware testbenches",
    "plot": "plots: sweep accuracy vs cost, post-softmax distribution, per-layer SQNR",
    "clipping": "zero the post-softmax values nearest 0 or nearest 1: which ones matter?",
    "profile": "post-LayerNorm channel range profile of a float model (max / median)",
    "sensitivity": "engine vs fake-quant gap next to fake-quant's own float64 and int-grid siblings",
    "bench": "speed and memory of every level against torch, as ratios",
    "hw": "cycles, SRAM/DRAM traffic and energy per image on a systolic array (SCALE-Sim)",
}
_MODULE_OF = {"plot": "plots"}     # command -> module, where the names differ


def _module(cmd: str):
    import importlib
    return importlib.import_module(f"intsim.studies.{_MODULE_OF.get(cmd, cmd)}")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser of every command (``only`` None), or of the command ``only`` with the others
    listed by name and help line alone: their options import calib, torch or numba, which a
    command that does not need them (``--help``, ``inspect``, ``export``, ``hw``, ``sweep
    --status``) should not pay for."""
    def wanted(name: str) -> bool:
        return only is None or only == name

    ap = argparse.ArgumentParser(
        prog="intsim",
        description="DopQ-ViT post-training quantization of Vision Transformers and a bit-exact "
                    "integer-only simulator. Run 'intsim run' for the bundled default.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--no-progress", action="store_true", help="hide progress bars")
    sub = ap.add_subparsers(dest="cmd", metavar="COMMAND")

    r = sub.add_parser("run", help="calibrate (or load a program) and compare float, fake-quant, engine and golden",
                       description="Calibrate the model (or load --program) and evaluate four levels on the same "
                                   "images: float (timm), fake-quant (the paper's semantics), engine (Numba, integer "
                                   "only) and golden (plain integer reference, on the first --golden-images). "
                                   "Prints a table; --json writes the same figures.")
    if wanted("run"):
        _add_run_arguments(r)

    c = sub.add_parser("calibrate", help="calibrate and write the integer program",
                       description="Calibrate the model with DopQ-ViT (or a baseline) and write the integer "
                                   "program file (safetensors + JSON header).")
    if wanted("calibrate"):
        options.add_model_args(c)
        options.add_calib_args(c)
        c.add_argument("-o", "--out", required=True, metavar="FILE", help="program file to write")

    i = sub.add_parser("inspect", help="summarize a program file or an exported .onnx graph",
                       description="Print a program's model, settings, provenance and op list; for a file whose "
                                   "name ends in .onnx, the graph's flavour, opsets, node counts per op type and "
                                   "initializer count and bytes.")
    i.add_argument("file", metavar="FILE")
    i.add_argument("--json", metavar="FILE", help="write the summary as JSON")

    x = sub.add_parser("export", help="write the program as a standard ONNX graph (onnxruntime, no custom ops)",
                       description="Export an integer program as an ONNX graph (uint8 image in, int64 logits out) "
                                   "that onnxruntime executes bit for bit like the engine; see docs/onnx.md. "
                                   "Needs the onnx extra: pip install 'intsim[onnx]'.")
    x.add_argument("program", metavar="PROGRAM", help="program file (from 'intsim calibrate')")
    x.add_argument("-o", "--out", required=True, metavar="FILE", help="ONNX file to write")
    x.add_argument("--flavor", choices=("onnx", "qonnx"), default="onnx",
                   help="onnx: standard operators only (default); qonnx: the post-softmax encoders as QONNX "
                        "MultiThreshold nodes (domain qonnx.custom_op.general), the rest as onnx")

    for name, help_line in MODULE_COMMANDS.items():
        if not wanted(name):
            sub.add_parser(name, help=help_line)
            continue
        mod = _module(name)
        mod.add_arguments(sub.add_parser(name, help=help_line, description=mod.__doc__,
                                         formatter_class=argparse.RawDescriptionHelpFormatter))

    b = sub.add_parser("bundle", help="(maintainers) rebuild the bundled CIFAR-10 image set",
                       description="Draw the bundled calibration and evaluation images from the CIFAR-10 zip.")
    b.add_argument("cifar_zip")
    b.add_argument("--calib", type=options.positive, default=1024)
    b.add_argument("--eval", type=options.positive, default=2000)
    return ap


def _add_run_arguments(r: argparse.ArgumentParser) -> None:
    """The options of ``intsim run``."""
    options.add_model_args(r)
    options.add_calib_args(r)
    g = r.add_argument_group("evaluation")
    g.add_argument("--program", metavar="FILE", help="load this program instead of calibrating")
    g.add_argument("--data", metavar="PATH",
                   help="evaluation images: ImageFolder tree (class folders sorted give labels) or zip; the "
                        "CIFAR-10 zip uses its test/ split (default: the bundled 2,000 CIFAR-10 test images)")
    g.add_argument("--images", type=options.count_or_all, default=None,
                   help="number of evaluation images, or 'all' (default: 2000 for 32-pixel models, 128 for "
                        "224-pixel models)")
    g.add_argument("--golden-images", type=options.count_or_all, default=32,
                   help="run the golden model on the first N evaluation images, or 'all' (default 32)")
    g.add_argument("--batch-size", type=options.positive, default=32, help="batch size of every level (32)")
    g.add_argument("--json", metavar="FILE", help="write the report as JSON")
    g.add_argument("--save-program", metavar="FILE", help="also write the calibrated program here")
    g.add_argument("--logits", metavar="FILE",
                   help="write every level's logits (npz: float, fakequant, engine_int, golden_int, labels, ids)")
    g.add_argument("--onnx", action="store_true",
                   help="fifth level: the program as an ONNX graph (built in memory) run by onnxruntime; "
                        "reports the logits that differ from the engine (needs the onnx extra)")
    g.add_argument("--onnx-images", type=options.count_or_all, default=None,
                   help="with --onnx: run onnxruntime on the first N evaluation images, or 'all' (default: all)")
    from .studies.cluster import add_executor_arguments
    add_executor_arguments(r, run_command=True)


# ---- commands -------------------------------------------------------------------------

def cmd_calibrate(a) -> int:
    from intsim.program.format import save
    from intsim.models.zoo import DEFAULT_MODEL, load_model
    check_writable(a.out, "program file")
    options.calib_config(a)
    progress = not a.no_progress
    model, spec, info = load_model(a.model or DEFAULT_MODEL, weights=a.weights or "pretrained",
                                   checkpoint=a.checkpoint, seed=a.seed)
    cal = options.load_calib_images(a, spec, progress)
    prog, secs = options.calibrate_from_args(a, model, spec, info, cal, progress)
    save(prog, a.out)
    print(f"wrote {a.out} ({Path(a.out).stat().st_size / 1e6:.2f} MB) in {secs:.1f} s of calibration")
    return 0


def cmd_run(a) -> int:
    from intsim.program.format import save
    from reference.golden import run as golden_run
    from reference.fakequant import FakeQuantModel

    from . import evaluate as ev
    from .data import open_images
    from .engine import Engine, compile_stats

    t_start = time.perf_counter()                 # after the imports
    check_writable(a.json, "JSON report")
    check_writable(a.save_program, "program file")
    check_writable(a.logits, "logits file")
    if a.onnx_images is not None and not a.onnx:
        raise UserError("--onnx-images needs --onnx")
    if a.onnx:
        from .onnx_run import require
        require(what="intsim run --onnx")
    from .studies.cluster import check_run_options
    check_run_options(a)
    if a.shards and a.onnx:
        raise UserError("--onnx cannot be combined with --shards (the shards run float, fake-quant, engine and golden)")
    if not a.program:
        options.calib_config(a)
    progress = not a.no_progress
    calib_s = None
    prog, model, spec, info = program_and_model(a)
    tf, dc = options.transform_for(spec)
    n_images = a.images if a.images is not None else (2000 if tf.size <= 64 else 128)
    if a.images is None and a.data is not None:
        n_images = None
    # List every input (and decode the first image) before the long work, so bad data fails in
    # seconds; the images themselves are decoded chunk by chunk during the evaluation.
    data = open_images(a.data, tf, n_images, split="eval", seed=a.seed)
    labels = data.labels
    if not a.program:
        cal = options.load_calib_images(a, spec, progress)
        prog, calib_s = options.calibrate_from_args(a, model, spec, info, cal, progress)
        if a.save_program:
            save(prog, a.save_program)
    n_golden = len(data) if a.golden_images is None else min(a.golden_images, len(data))

    fq = FakeQuantModel(prog)
    scale = float(prog.values[prog.output]["scale"])
    t0 = time.perf_counter()
    engine = Engine(prog)
    engine_setup_s = time.perf_counter() - t0
    bs = a.batch_size
    levels = {
        "float": lambda x: ev.run_float(model, x, dc["mean"], dc["std"], bs, False),
        "fakequant": lambda x: ev.run_fakequant(fq, x, bs, False),
        "engine": lambda x: ev.run_integer(lambda y: engine.run(y, batch_size=bs), x, scale, bs, "engine", False),
        "golden": lambda x: ev.run_integer(lambda y: golden_run(prog, y), x, scale, bs, "golden", False),
    }
    limits = {"golden": n_golden}
    if a.onnx:
        from .onnx_run import OnnxLevel
        onnx_level = OnnxLevel(prog, bs)
        levels["onnx"] = lambda x: ev.run_integer(onnx_level, x, scale, bs, "onnxruntime", False)
        limits["onnx"] = len(data) if a.onnx_images is None else min(a.onnx_images, len(data))
    setup_s = time.perf_counter() - t_start
    if a.shards:        # the same evaluation as image shards on a scheduler, merged (intsim.studies.cluster)
        from .studies.cluster import evaluate_sharded
        evaluation = evaluate_sharded(a, prog, data, n_images, n_golden, chunk=max(bs, 256))
    else:
        evaluation = ev.evaluate_stream(data, levels, chunk=max(bs, 256), limits=limits, progress=progress)
    cs = compile_stats()
    if n_golden == 0:
        evaluation.levels.pop("golden", None)
    report = ev.compare(evaluation, labels if len(data.classes) == prog.model.get("num_classes") else None)
    if a.onnx:
        from .onnx_run import engine_vs_onnx
        report["engine_vs_onnx"] = engine_vs_onnx(evaluation, onnx_level)
    s = prog.settings
    report["config"] = {
        "model": spec.name, "timm_name": spec.timm_name, "weights": info.get("weights"),
        "training": info.get("training"),
        "random_weights": info.get("weights") == "random",
        "wbits": s["wbits"], "abits": s["abits"],
        "softmax_quant": options.calibration_info(prog).get("softmax_quant"),
        "ln_rule": options.calibration_info(prog).get("ln_rule"),
        "settings": s, "program": a.program, "seed": a.seed,
        "eval_source": data.source, "eval_images": len(data), "golden_images": n_golden,
        "onnx_images": limits.get("onnx"),
        "labels": report["levels"]["float"].get("top1") is not None,
    }
    report["timing"] = {"calibration_s": calib_s, "engine_setup_s": engine_setup_s, "setup_s": setup_s,
                        "numba_compiled": cs["misses"], "numba_cache_hits": cs["hits"],
                        "numba_compiled_kernels": cs["compiled"]}

    print(f"model {spec.name} ({spec.timm_name}), weights: {info.get('weights')}"
          + ("  [RANDOM WEIGHTS: structural study, accuracy is meaningless]" if info.get("weights") == "random"
             else ""))
    print(f"W{s['wbits']}A{s['abits']}, post-softmax {report['config']['softmax_quant']}, post-LN rule "
          f"{report['config']['ln_rule']}; {len(data)} images from {data.source}"
          + (f"; calibration {calib_s:.1f} s" if calib_s is not None else f"; program {a.program}"))
    tr = info.get("training")
    if tr and not tr.get("complete"):
        print(f"note: the bundled checkpoint is INTERIM: {tr['epochs_done']} of {tr['epochs_planned']} training "
              f"epochs, {100 * tr['test_top1_full_10k']:.2f}% top-1 on the full CIFAR-10 test set")
    if report["config"]["labels"] is False:
        print("(the data's classes do not match the model's classifier: top-1 is not reported)")
    print()
    print(ev.format_table(report))
    if report.get("engine_vs_onnx"):
        from .onnx_run import format_engine_vs_onnx
        print(format_engine_vs_onnx(report["engine_vs_onnx"]))
    if a.json:
        write_json_atomic(a.json, report)
        print(f"\nwrote {a.json}")
    if a.logits:
        _write_logits(a.logits, evaluation, labels, data.ids, scale)
        print(f"wrote {a.logits}")
    return 0


def _write_logits(path: str, evaluation, labels, ids, scale: float) -> None:
    import numpy as np
    arrays = {"labels": labels, "ids": np.array(ids), "logit_scale": np.float64(scale)}
    for name, r in evaluation.levels.items():
        if r.int_logits is not None:
            arrays[f"{name}_int"] = r.int_logits
        else:
            arrays[name] = r.logits

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:          # a file object: savez would append .npz to a name
            np.savez(f, **arrays)
    write_atomic(path, write)


def cmd_inspect(a) -> int:
    import numpy as np

    from intsim.program.format import load
    from .onnx_run import is_onnx_path
    if is_onnx_path(a.file):
        return _inspect_onnx(a)
    prog = load(a.file)
    h = prog.header
    m, s = h["model"], h["settings"]
    print(f"{a.file}: intsim program v{h['version']}, model {m.get('name')} ({m.get('arch')}), "
          f"{m.get('depth')} blocks, dim {m.get('embed_dim')}, {m.get('num_heads')} heads, "
          f"{m.get('num_tokens')} tokens, {m.get('num_classes')} classes")
    print("settings: " + ", ".join(f"{k}={v}" for k, v in s.items()))
    cal = options.calibration_info(prog)
    if cal:
        print("calibration: " + ", ".join(f"{k}={v}" for k, v in cal.items() if not isinstance(v, (list, dict))))
        options.print_reconstruction(prog)
    prov = h["provenance"]
    print("provenance: " + ", ".join(f"{k}={v}" for k, v in prov.items()
                                     if k not in ("calib_images", "recon_images", "versions", "calibration")))
    if "versions" in prov:
        print("versions: " + ", ".join(f"{k} {v}" for k, v in prov["versions"].items()))
    rows = []
    for op in prog.ops:
        out = prog.values[op["output"]]
        ints = sum(int(np.prod(v.shape)) for k, v in prog.tensors.items()
                   if k.startswith(op["name"] + ".") and v.dtype.kind in "iu")
        rows.append((op["name"], op["type"], ",".join(op["inputs"]), f"{out['kind']}{out['bits']}",
                     "x".join(map(str, out["shape"])), str(ints)))
    cols = ("op", "type", "inputs", "out", "shape", "int params")
    w = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
    print()
    print("  ".join(c.ljust(x) for c, x in zip(cols, w)))
    for r in rows:
        print("  ".join(v.ljust(x) for v, x in zip(r, w)))
    from .studies.cost import format_cost, program_cost
    cost = program_cost(prog)
    print()
    print(format_cost(cost))
    if a.json:
        check_writable(a.json, "JSON summary")
        write_json_atomic(a.json, {"header": {k: v for k, v in h.items() if k != "ops"}, "ops": h["ops"],
                                   "cost": cost})
    return 0


def _inspect_onnx(a) -> int:
    from .onnx_run import format_inspect, inspect_onnx, require
    require(what="intsim inspect of an .onnx file")
    check_writable(a.json, "JSON summary")
    info = inspect_onnx(a.file)
    print(format_inspect(info))
    if a.json:
        write_json_atomic(a.json, info)
    return 0


def cmd_export(a) -> int:
    from intsim.program.format import load
    from .onnx_run import require
    check_writable(a.out, "ONNX file")
    require(what="intsim export")
    from .onnx_export import export_onnx
    prog = load(a.program)
    t0 = time.perf_counter()
    info = export_onnx(prog, a.out, flavor=a.flavor)
    print(f"wrote {a.out} ({Path(a.out).stat().st_size / 1e6:.2f} MB, flavour {a.flavor}) in "
          f"{time.perf_counter() - t0:.1f} s: "
          f"{sum(info['nodes'].values())} nodes, {info['initializers']} initializers "
          f"({info['initializer_bytes']} bytes)")
    for op_type, n in info["nodes"].items():
        print(f"  {op_type:16s} {n}")
    return 0


def cmd_bundle(a) -> int:
    from .data import BUNDLE, make_bundle
    m = make_bundle(a.cifar_zip, BUNDLE, a.calib, a.eval)
    print(f"wrote {BUNDLE}: {len(m['calib'])} calibration and {len(m['eval'])} evaluation images")
    return 0


COMMANDS = {"run": cmd_run, "calibrate": cmd_calibrate, "inspect": cmd_inspect, "export": cmd_export, "bundle": cmd_bundle,
            **{name: (lambda a, _n=name: _module(_n).run(a)) for name in MODULE_COMMANDS}}


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 done; 1 checked and found different (``vectors --check``); 2 bad input (one
    line on stderr, no traceback, no partial output); 130 interrupted (Ctrl-C)."""
    try:
        args = sys.argv[1:] if argv is None else list(argv)
        command = next((x for x in args if not x.startswith("-")), "")     # top-level options take no value
        ap = build_parser(command if command in COMMANDS else "")
        a = ap.parse_args(args)
        if not a.cmd:
            ap.print_help()
            return 2
        from intsim.program.fixedpoint import ExportError
        from intsim.program.format import ProgramError
        from reference.golden import SpecViolation
        try:
            return COMMANDS[a.cmd](a)
        except (UserError, ProgramError, SpecViolation, ExportError) as e:
            # bad input: one line (a program file is untrusted input, docs/integer-spec.md section 8;
            # an ExportError is a setting the model's bounds cannot meet)
            print(f"intsim: error: {' '.join(str(e).split())}", file=sys.stderr)
            return 2
    except KeyboardInterrupt:
        print("intsim: interrupted; no partial output was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
