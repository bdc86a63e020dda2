"""``intsim bench``: the integer engine's speed next to torch, on the same inputs, in one process.

Per model (``--models``, short names of ``intsim.models.zoo``; random weights: the speed does not
depend on them) and batch size (``--batch-sizes``) it times, in interleaved rounds (each round
runs every row once, so slow drifts of a shared machine hit all rows alike):

* ``torch f32``   the timm model, eager, under ``torch.inference_mode`` (the reference row);
* ``torch int8``  ``torch.ao.quantization.quantize_dynamic`` on every ``nn.Linear``;
* ``fake-quant``  ``reference.fakequant.FakeQuantModel(program)`` on the uint8 images;
* ``golden``      ``reference.golden.run`` (numpy int64), on ``--golden-images`` images only;
* ``engine``      ``intsim.engine.Engine(program).run`` (bit-exact integer engine).

Reported: images/s and ms per image from the median round, and the engine's speed relative to
torch f32 as the median over rounds of the paired ratio ``t_torch / t_engine`` (> 1: engine
faster); with the int8 row, the same paired ratio of the engine against torch int8 as well.
Besides: the program's source (``calib.calibrate`` with CalibConfig(wbits, abits), timed; or a
random program of the same shape when calib is unavailable), whether the engine equals the
golden model bit for bit, peak RSS of one batch of the largest size in a fresh process (engine and
torch f32), and a fresh process's time to its first result with the warm Numba cache (import,
program load, Engine construction, first and second batch, and the number of Numba compilations,
which must be 0). ``--cold-compile`` adds the same fresh process with an empty cache (everything
compiles). ``--json FILE`` writes every number.

Threads: ``--threads`` for torch and Numba. ``--omp-wait-policy passive`` (default) sets
``OMP_WAIT_POLICY=PASSIVE`` for this process (when torch is not imported yet) and the fresh
processes: with spinning OpenMP workers a machine shared with other busy processes slows every
torch operator (and the engine's kernels) by orders of magnitude at small batches.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable

from ..errors import UserError
from ..options import bits, positive

REPO = Path(__file__).resolve().parents[2]
DEFAULT_MODELS = ("deit_t", "deit_s", "cifar10_vit_d6")
ROWS = ("torch f32", "torch int8", "fake-quant", "engine")
SKIPPABLE = ("int8", "fakequant", "golden", "rss", "fresh")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", default=None,
                   help=f"comma-separated model short names (default {','.join(DEFAULT_MODELS)}; --quick: deit_t)")
    p.add_argument("--batch-sizes", default=None, help="comma-separated batch sizes (default 1,8,32; --quick: 1,8)")
    p.add_argument("--threads", type=positive, default=2, help="threads for torch and Numba (default 2)")
    p.add_argument("--repeats", type=positive, default=None, help="timed rounds per batch size (default 5; --quick: 3)")
    p.add_argument("--json", default=None, metavar="FILE", help="write all results as JSON")
    p.add_argument("--quick", action="store_true", help="deit_t, batch 1 and 8, fewer rounds, small calibration")
    p.add_argument("--wbits", type=bits, default=4)
    p.add_argument("--abits", type=bits, default=4)
    p.add_argument("--program-source", choices=("calib", "random"), default="calib",
                   help="calibrate the program (timed), or build a random one of the model's shape")
    p.add_argument("--calib-images", type=positive, default=None, help="calibration images (default 8; --quick: 2)")
    p.add_argument("--golden-images", type=positive, default=1, help="images for the golden model (slow; default 1)")
    p.add_argument("--cold-compile", action="store_true",
                   help="also time a fresh process with an empty Numba cache (compiles every kernel; slow)")
    p.add_argument("--omp-wait-policy", choices=("passive", "active", "inherit"), default="passive")
    p.add_argument("--skip", default="",
                   help="comma-separated parts to skip: int8, fakequant, golden, rss, fresh")


# ---- helpers ------------------------------------------------------------------------------------


def _csv(s: str | None, default: tuple) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()] if s else list(default)


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # (Linux: KiB)


def _positive_ints(s: str | None, default: tuple, what: str) -> list[int]:
    """Comma-separated positive integers (``UserError`` otherwise)."""
    out = []
    for x in _csv(s, default):
        try:
            v = int(x)
        except ValueError:
            v = 0
        if v < 1:
            raise UserError(f"{what} must be positive integers, got '{x}'")
        out.append(v)
    return out


def _options(a: argparse.Namespace) -> tuple[list[str], list[int], int, set[str]]:
    """(models, batch sizes, repeats, skipped parts) from the options, checked before any work."""
    from intsim.models.zoo import resolve
    models = _csv(a.models, ("deit_t",) if a.quick else DEFAULT_MODELS)
    for name in models:
        resolve(name)                           # UserError naming the known models
    batch_sizes = _positive_ints(a.batch_sizes, ("1", "8") if a.quick else ("1", "8", "32"), "--batch-sizes")
    repeats = a.repeats if a.repeats is not None else (3 if a.quick else 5)
    skip = set(_csv(a.skip, ()))
    unknown = sorted(skip - set(SKIPPABLE))
    if unknown:
        raise UserError(f"--skip: unknown part(s) {', '.join(unknown)} (known: {', '.join(SKIPPABLE)})")
    return models, batch_sizes, repeats, skip


def _median(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def _timeit(f: Callable[[], Any]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process: all its threads)."""
    t, c = time.perf_counter(), time.process_time()
    f()
    return time.perf_counter() - t, time.process_time() - c


def _subprocess_env(threads: int, policy: str) -> dict[str, str]:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = str(threads)
    env["MKL_NUM_THREADS"] = str(threads)
    if policy != "inherit":
        env["OMP_WAIT_POLICY"] = policy.upper()
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


def _run_json(code: str, env: dict[str, str], timeout: float = 1800) -> dict[str, Any]:
    """Run ``python -c code`` (which prints one JSON line last) and parse it; errors as {"error": ...}."""
    t = time.perf_counter()
    try:
        r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout,
                           cwd=str(REPO))
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    wall = time.perf_counter() - t
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    if r.returncode != 0 or not lines:
        return {"error": (r.stderr or r.stdout).strip().splitlines()[-1:] or [f"exit code {r.returncode}"]}
    out = json.loads(lines[-1])
    out["process_wall_s"] = wall
    return out


_PRELUDE = """
import json, os, resource, sys, time
t_start = time.perf_counter()
threads = {threads}
def rss():
    # VmHWM: the peak RSS of this process image (ru_maxrss would include the parent's at fork)
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
"""

_ENGINE_PROCESS = _PRELUDE + """
import numpy as np
import numba
from intsim.program.format import load
from intsim.engine import Engine, compile_stats
numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
t_import = time.perf_counter()
import torch
torch.set_num_threads(threads)
t_torch = time.perf_counter()
prog = load({path!r})
t_load = time.perf_counter()
eng = Engine(prog)
t_build = time.perf_counter()
shape = prog.values[prog.header["inputs"][0]]["shape"]
imgs = np.random.default_rng(0).integers(0, 256, ({batch}, *shape), dtype=np.uint8)
rss_before = rss()
t0 = time.perf_counter(); eng.run(imgs, batch_size={batch}); t_first = time.perf_counter() - t0
rss_after = rss()
t0 = time.perf_counter(); eng.run(imgs, batch_size={batch}); t_second = time.perf_counter() - t0
cs = compile_stats()
print(json.dumps(dict(import_s=t_import - t_start, import_torch_s=t_torch - t_import, load_s=t_load - t_torch,
                      build_s=t_build - t_load,
                      first_batch_s=t_first, second_batch_s=t_second, batch={batch},
                      rss_setup_mb=rss_before, rss_peak_mb=max(rss_after, rss()), compiled=cs["misses"],
                      compiled_kernels=cs["compiled"], cache_hits=cs["hits"])))
"""

_TORCH_PROCESS = _PRELUDE + """
import torch
torch.set_num_threads(threads)
from intsim.models.zoo import load_model, data_config
model, spec, info = load_model({model!r}, weights="random")
size = data_config(spec)["input_size"]
x = torch.randn({batch}, *size)
rss_before = rss()
with torch.inference_mode():
    t0 = time.perf_counter(); model(x); t_first = time.perf_counter() - t0
print(json.dumps(dict(first_batch_s=t_first, batch={batch}, rss_setup_mb=rss_before, rss_peak_mb=rss())))
"""


def _model_shape(model: Any) -> dict[str, int]:
    if not hasattr(model, "blocks"):       # Swin: stages of blocks, no single width
        return dict(embed_dim=int(model.embed_dim), depth=sum(len(stage.blocks) for stage in model.layers),
                    classes=int(model.num_classes))
    blk = model.blocks[0]
    D = int(model.embed_dim)
    return dict(embed_dim=D, heads=int(blk.attn.num_heads), depth=len(model.blocks),
                img=int(model.patch_embed.img_size[0]), patch=int(model.patch_embed.patch_size[0]),
                classes=int(model.num_classes), mlp_ratio=int(blk.mlp.fc1.out_features) // D)


def _random_program(model: Any, wbits: int, abits: int) -> Any:
    from .random_program import make_program
    return make_program(0, wbits=wbits, abits=abits, **_model_shape(model))


def _route_summary(engine: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in engine.routes():
        if "[" in line:
            r = line.rsplit("[", 1)[1].split("]")[0]
            out[r] = out.get(r, 0) + 1
    return out


# ---- one model ----------------------------------------------------------------------------------


def bench_model(name: str, a: argparse.Namespace, batch_sizes: list[int], repeats: int, skip: set[str],
                log: Callable[[str], None]) -> dict[str, Any]:
    import numpy as np
    import torch

    from intsim.engine import Engine
    from intsim.program.format import save
    from intsim.models.zoo import data_config, load_model

    res: dict[str, Any] = {"model": name, "notes": []}
    model, spec, _ = load_model(name, weights="random")
    model.eval()
    dc = data_config(spec)
    size = tuple(dc["input_size"])
    res["input_size"] = list(size)
    res["shape"] = _model_shape(model)
    nb = max(batch_sizes)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (nb, *size), dtype=np.uint8)
    mean = torch.tensor(dc["mean"], dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(dc["std"], dtype=torch.float32).view(1, 3, 1, 1)
    x_float = ((torch.from_numpy(images).float() / 255.0) - mean) / std

    # ---- the program
    prog = None
    if a.program_source == "calib":
        try:
            from calib import CalibConfig, calibrate
            ncal = a.calib_images if a.calib_images is not None else (2 if a.quick else 8)
            cal = np.random.default_rng(1).integers(0, 256, (ncal, *size), dtype=np.uint8)
            log(f"  calibrating {name} on {ncal} images ...")
            t = time.perf_counter()
            prog = calibrate(model, cal, dc["mean"], dc["std"], CalibConfig(wbits=a.wbits, abits=a.abits),
                             progress=False)
            res["calibration_s"] = time.perf_counter() - t
            res["program"] = f"calibrated w{a.wbits}a{a.abits} on {ncal} random images"
        except Exception as e:  # calib is developed in parallel: fall back, say so
            res["notes"].append(f"calibration unavailable ({type(e).__name__}: {str(e)[:160]}); random program used")
            res["calibration_s"] = None
    if prog is None:
        prog = _random_program(model, a.wbits, a.abits)
        res.setdefault("program", f"random program (intsim/studies/random_program.py) w{a.wbits}a{a.abits}, model's shape")
    tmpdir = tempfile.mkdtemp(prefix="intsim-bench-")
    prog_path = os.path.join(tmpdir, f"{name}.safetensors")
    save(prog, prog_path)

    t = time.perf_counter()
    engine = Engine(prog)
    res["engine_build_s"] = time.perf_counter() - t
    res["routes"] = _route_summary(engine)

    # ---- rows
    fns: dict[str, Callable[[int], Any]] = {}

    def f32(B: int) -> Any:
        with torch.inference_mode():
            return model(x_float[:B])
    fns["torch f32"] = f32
    if "int8" not in skip:
        try:
            import copy
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                qmodel = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear},
                                                                dtype=torch.qint8)

            def int8(B: int) -> Any:
                with torch.inference_mode():
                    return qmodel(x_float[:B])
            fns["torch int8"] = int8
        except Exception as e:
            res["notes"].append(f"torch int8 row skipped ({type(e).__name__}: {str(e)[:120]})")
    if "fakequant" not in skip:
        try:
            from reference.fakequant import FakeQuantModel
            fq = FakeQuantModel(prog)

            def fakequant(B: int) -> Any:
                with torch.inference_mode():
                    return fq(images[:B])
            fns["fake-quant"] = fakequant
        except Exception as e:
            res["notes"].append(f"fake-quant row skipped ({type(e).__name__}: {str(e)[:120]})")
    fns["engine"] = lambda B: engine.run(images[:B], batch_size=B)

    rows: dict[str, dict[str, Any]] = {r: {} for r in fns}
    for B in batch_sizes:
        log(f"  {name}: batch {B} ...")
        for f in fns.values():             # warm-up (first calls allocate, load kernels, pack weights)
            f(B)
        times: dict[str, list[float]] = {r: [] for r in fns}
        cpu: dict[str, list[float]] = {r: [] for r in fns}
        order = list(fns)
        for rnd in range(repeats):
            for r in order[rnd % len(order):] + order[:rnd % len(order)]:
                w, c = _timeit(lambda: fns[r](B))
                times[r].append(w)
                cpu[r].append(c)
        for r in fns:
            med = _median(times[r])
            rows[r][str(B)] = {"median_s": med, "images_per_s": B / med, "ms_per_image": 1000 * med / B,
                               "cpu_ms_per_image": 1000 * _median(cpu[r]) / B,
                               "times_s": times[r], "cpu_s": cpu[r],
                               "speed_vs_torch_f32": _median([tf / tr for tf, tr in zip(times["torch f32"], times[r])]),
                               "cpu_speed_vs_torch_f32": _median([tf / tr for tf, tr in zip(cpu["torch f32"], cpu[r])])}
        if "torch int8" in times:            # the stretch target: the engine against torch's dynamic int8
            rows["engine"][str(B)]["speed_vs_torch_int8"] = _median(
                [ti / te for ti, te in zip(times["torch int8"], times["engine"])])
    res["rows"] = rows

    # ---- golden (and bit-exactness of the engine on the same images)
    if "golden" not in skip:
        try:
            from reference import golden
            ng = max(1, a.golden_images)
            log(f"  {name}: golden model on {ng} image(s) ...")
            t = time.perf_counter()
            g = golden.run(prog, images[:ng])
            tg = time.perf_counter() - t
            e = engine.run(images[:ng])
            res["golden"] = {"images": ng, "s_per_image": tg / ng, "images_per_s": ng / tg}
            res["engine_equals_golden"] = bool(np.array_equal(e.logits, np.asarray(g.logits))
                                               and e.counts == {k: {kk: int(v) for kk, v in c.items()}
                                                                for k, c in g.counts.items()})
        except Exception as e:
            res["notes"].append(f"golden skipped ({type(e).__name__}: {str(e)[:160]})")

    # ---- fresh processes
    env = _subprocess_env(a.threads, a.omp_wait_policy)
    if "fresh" not in skip:
        log(f"  {name}: fresh process, warm Numba cache ...")
        res["fresh_process"] = _run_json(_ENGINE_PROCESS.format(threads=a.threads, path=prog_path, batch=1), env)
        if a.cold_compile:
            log(f"  {name}: fresh process, empty Numba cache (compiles everything) ...")
            with tempfile.TemporaryDirectory(prefix="intsim-numba-cold-") as cold:
                env_cold = dict(env, NUMBA_CACHE_DIR=cold)
                res["cold_compile_process"] = _run_json(
                    _ENGINE_PROCESS.format(threads=a.threads, path=prog_path, batch=1), env_cold)
    if "rss" not in skip:
        log(f"  {name}: peak memory at batch {nb} (fresh processes) ...")
        res["rss_engine"] = _run_json(_ENGINE_PROCESS.format(threads=a.threads, path=prog_path, batch=nb), env)
        res["rss_torch_f32"] = _run_json(_TORCH_PROCESS.format(threads=a.threads, model=name, batch=nb), env)
    try:
        os.remove(prog_path)
        os.rmdir(tmpdir)
    except OSError:
        pass
    return res


# ---- report -------------------------------------------------------------------------------------


def _fmt_table(res: dict[str, Any], batch_sizes: list[int]) -> str:
    lines = []
    name = res["model"]
    sz = res["input_size"]
    lines.append(f"{name} ({sz[1]}x{sz[2]} px, {res['shape']['depth']} blocks, dim {res['shape']['embed_dim']}): "
                 f"{res['program']}")
    if res.get("calibration_s") is not None:
        lines.append(f"  calibration: {res['calibration_s']:.1f} s")
    lines.append(f"  engine construction {res['engine_build_s'] * 1000:.0f} ms; GEMM routes {res['routes']}")
    head = f"  {'':<12}" + "".join(f" | B={B:<3} {'img/s':>6} {'ms/img':>7} {'vs f32':>6} {'cpu':>5}"
                                       for B in batch_sizes)
    lines.append(head)
    for r, per in res["rows"].items():
        cells = ""
        for B in batch_sizes:
            c = per.get(str(B))
            if c is None:
                cells += f" | {'':<5} {'-':>6} {'-':>7} {'-':>6} {'-':>5}"
            else:
                cells += (f" | {'':<5} {c['images_per_s']:6.2f} {c['ms_per_image']:7.1f} {c['speed_vs_torch_f32']:5.2f}x"
                          f" {c['cpu_speed_vs_torch_f32']:4.2f}x")
        lines.append(f"  {r:<12}" + cells)
    vs8 = [(B, res["rows"]["engine"].get(str(B), {}).get("speed_vs_torch_int8")) for B in batch_sizes]
    if any(v is not None for _, v in vs8):
        lines.append("  engine vs torch int8 (median of paired rounds, > 1: engine faster): "
                     + ", ".join(f"B={B} {v:.2f}x" for B, v in vs8 if v is not None))
    if "golden" in res:
        g = res["golden"]
        lines.append(f"  {'golden':<12} | {g['s_per_image']:.2f} s per image ({g['images']} image(s)); "
                     f"engine equals golden: {res.get('engine_equals_golden')}")
    fp = res.get("fresh_process")
    if fp:
        if "error" in fp:
            lines.append(f"  fresh process: error {fp['error']}")
        else:
            lines.append(f"  fresh process (warm cache): import engine {fp['import_s']:.2f} s + torch "
                         f"{fp['import_torch_s']:.2f} s, load {fp['load_s']:.2f} s, "
                         f"Engine() {fp['build_s']:.2f} s, first batch of 1 {fp['first_batch_s']:.2f} s, "
                         f"second {fp['second_batch_s']:.2f} s, Numba compilations {fp['compiled']}; "
                         f"process total {fp['process_wall_s']:.1f} s")
    cp = res.get("cold_compile_process")
    if cp:
        if "error" in cp:
            lines.append(f"  cold compile: error {cp['error']}")
        else:
            lines.append(f"  fresh process (empty cache): first batch {cp['first_batch_s']:.1f} s "
                         f"({cp['compiled']} compilations), process total {cp['process_wall_s']:.1f} s")
    for key, label in (("rss_engine", "engine"), ("rss_torch_f32", "torch f32")):
        rr = res.get(key)
        if rr:
            if "error" in rr:
                lines.append(f"  peak RSS {label}: error {rr['error']}")
            else:
                lines.append(f"  peak RSS {label} (fresh process, batch {rr['batch']}): {rr['rss_peak_mb']:.0f} MB "
                             f"(after setup {rr['rss_setup_mb']:.0f} MB, +{rr['rss_peak_mb'] - rr['rss_setup_mb']:.0f} "
                             f"MB for the batch)")
    for n in res.get("notes", []):
        lines.append(f"  note: {n}")
    return "\n".join(lines)


def run(a: argparse.Namespace) -> int:
    if a.omp_wait_policy != "inherit":
        if "torch" in sys.modules or "numba.np.ufunc.omppool" in sys.modules:
            policy_note = f"OMP_WAIT_POLICY not set (OpenMP may already be loaded); inherited {os.environ.get('OMP_WAIT_POLICY')}"
        else:
            os.environ["OMP_WAIT_POLICY"] = a.omp_wait_policy.upper()
            policy_note = f"OMP_WAIT_POLICY={a.omp_wait_policy.upper()}"
    else:
        policy_note = f"OMP_WAIT_POLICY inherited ({os.environ.get('OMP_WAIT_POLICY')})"
    models, batch_sizes, repeats, skip = _options(a)
    import numba
    import numpy as np
    import torch

    torch.set_num_threads(a.threads)
    numba.set_num_threads(min(a.threads, numba.config.NUMBA_NUM_THREADS))

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    env_info = {
        "python": platform.python_version(), "numpy": np.__version__, "torch": torch.__version__,
        "numba": numba.__version__, "cpu_count": os.cpu_count(), "threads": a.threads,
        "numba_threads": numba.get_num_threads(), "numba_threading_layer": None, "omp": policy_note,
        "load_average_start": os.getloadavg(), "machine": platform.machine(),
    }
    results: dict[str, Any] = {"env": env_info, "batch_sizes": batch_sizes, "repeats": repeats,
                               "wbits": a.wbits, "abits": a.abits, "models": {}}
    for name in models:
        log(f"benchmarking {name} ...")
        try:
            results["models"][name] = bench_model(name, a, batch_sizes, repeats, skip, log)
        except Exception as e:
            results["models"][name] = {"model": name, "error": f"{type(e).__name__}: {e}"}
            log(f"  {name} failed: {type(e).__name__}: {e}")
    try:
        env_info["numba_threading_layer"] = numba.threading_layer()
    except Exception:
        pass
    env_info["load_average_end"] = os.getloadavg()
    env_info["peak_rss_mb_this_process"] = _rss_mb()

    print(f"intsim bench: threads {a.threads} (numba {env_info['numba_threads']}, layer "
          f"{env_info['numba_threading_layer']}), {policy_note}, load average "
          f"{env_info['load_average_start'][0]:.1f} -> {env_info['load_average_end'][0]:.1f}\n"
          f"'vs f32' = median over rounds of wall time t(torch f32) / t(row), > 1 is faster than torch f32; "
          f"'cpu' = the same ratio of process CPU time (all threads), steadier on a shared machine")
    for name, res in results["models"].items():
        if "error" in res:
            print(f"{name}: error {res['error']}")
        else:
            print(_fmt_table(res, batch_sizes))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))
        print(f"results written to {a.json}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="intsim bench", description=__doc__.split("\n")[0])
    add_arguments(p)
    try:
        return run(p.parse_args(argv))
    except UserError as e:
        print(f"intsim bench: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
