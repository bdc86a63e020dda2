"""Work units on a scheduler through submitit: a SLURM array (``--executor slurm``) or local
processes (``--executor local``, the same code path on a laptop). See docs/cluster.md.

Each unit is a :class:`UnitJob` (a submitit ``Checkpointable``: on preemption or timeout SLURM
requeues it, and since a unit writes its result file only when it has finished, the requeued
unit simply runs again). A unit whose result file exists is never submitted again, so rerunning
the same command resumes. Used by ``intsim sweep --executor`` (units of a sweep folder) and by
``intsim run --shards K --executor`` (image shards of one evaluation, calibrated once).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import shutil
import time
from pathlib import Path

from ..errors import UserError
from ..options import non_negative, positive, write_json_atomic
from . import units

EXECUTORS = ("local", "slurm")
SUBMITTED = "submitted.json"
THREAD_POOLS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")


def add_executor_arguments(p: argparse.ArgumentParser, run_command: bool = False) -> None:
    """The scheduler options (``--executor``, ``--slurm-*``, ``--numba-cache``); with
    ``run_command`` also ``--shards``, ``--jobs`` and ``--work-dir`` of ``intsim run``."""
    g = p.add_argument_group("cluster (submitit; pip install 'intsim[cluster]'; docs/cluster.md)")
    if run_command:
        g.add_argument("--shards", type=positive, default=None, metavar="K",
                       help="split the evaluation images into K shards run as separate jobs (needs --executor); "
                            "calibration runs once, here, and every shard reads the program file")
        g.add_argument("--work-dir", metavar="DIR", default=None,
                       help="folder for the program file, the shard results and the logs (default "
                            "./intsim-shards; on a cluster it must be on a file system every node sees)")
        g.add_argument("--jobs", type=positive, default=None,
                       help="with --executor local: shards running at once (default: the usable cores)")
    g.add_argument("--executor", choices=EXECUTORS, default=None,
                   help="run the units through submitit: 'slurm' submits one SLURM array, 'local' runs them as "
                        "local processes (same code path); rerunning the same command submits only the units "
                        "whose result file is missing")
    g.add_argument("--slurm-partition", metavar="P", help="SLURM partition")
    g.add_argument("--slurm-time", type=positive, default=60, metavar="MIN",
                   help="time limit of one unit in minutes (default 60; also the local executor's limit); a unit "
                        "that reaches it is requeued")
    g.add_argument("--slurm-array-parallelism", type=positive, default=64, metavar="N",
                   help="array tasks running at once (default 64)")
    g.add_argument("--slurm-gpus", type=non_negative, default=0, metavar="N", help="GPUs per unit (default 0)")
    g.add_argument("--slurm-cpus", type=positive, default=8, metavar="N",
                   help="CPUs per unit (default 8); the unit's thread pools use that many")
    g.add_argument("--slurm-mem", metavar="SIZE", help="memory per unit, e.g. 32G (default: the partition's)")
    g.add_argument("--slurm-account", metavar="A", help="SLURM account to charge")
    g.add_argument("--slurm-setup", action="append", default=[], metavar="CMD",
                   help="shell line run before each unit, e.g. 'source ~/venv/bin/activate' (repeatable)")
    g.add_argument("--numba-cache", metavar="DIR",
                   help="NUMBA_CACHE_DIR for the units: a folder every node sees, so that the engine's kernels "
                        "are compiled once and loaded from the cache by the other units")


def require_submitit(executor: str | None):
    """The submitit module, or exit 2 with one line (before any work)."""
    if executor is None:
        raise UserError("this needs --executor local or --executor slurm")
    try:
        import submitit
    except ImportError:
        raise UserError(f"--executor {executor} needs submitit, which is not installed "
                        f"(pip install 'intsim[cluster]')") from None
    return submitit


def check_options(a) -> None:
    """Option checks that need no work (exit 2 before any)."""
    if a.numba_cache is not None:
        d = Path(a.numba_cache)
        if d.exists() and not d.is_dir():
            raise UserError(f"--numba-cache {d} is not a folder")
    if a.executor == "slurm" and not a.slurm_partition:
        raise UserError("--executor slurm needs --slurm-partition P")
    if a.executor == "slurm" and shutil.which("srun") is None:
        raise UserError("--executor slurm: no SLURM here (srun is not on the PATH); submit from a cluster's "
                        "login node, or use --executor local")


# ---- the job --------------------------------------------------------------------------------

def _checkpointable():
    try:
        from submitit.helpers import Checkpointable
        return Checkpointable
    except ImportError:            # only the executors need submitit; the job class exists without it
        return object


class UnitJob(_checkpointable()):
    """One unit as a submitit job: ``target`` ("module:function") called with ``(args, unit)``
    after ``env`` (thread counts, Numba cache) is applied. Requeued unchanged on preemption."""

    def __init__(self, target: str, args: dict, env: dict):
        self.target, self.args, self.env = target, args, env

    def __call__(self, unit):
        os.environ.update(self.env)
        mod, fn = self.target.split(":")
        return getattr(importlib.import_module(mod), fn)(self.args, unit)


def unit_env(a, parallel: int) -> dict:
    """Environment of every unit: its share of the cores for each thread pool, the Numba cache."""
    threads = a.slurm_cpus if a.executor == "slurm" else max(1, units.usable_cores() // max(1, parallel))
    env = {k: str(threads) for k in THREAD_POOLS}
    env["OMP_WAIT_POLICY"] = "PASSIVE"
    if a.numba_cache:
        Path(a.numba_cache).mkdir(parents=True, exist_ok=True)
        env["NUMBA_CACHE_DIR"] = str(Path(a.numba_cache).resolve())
    return env


def _executor(a, folder: Path, parallel: int):
    submitit = require_submitit(a.executor)
    folder.mkdir(parents=True, exist_ok=True)
    if a.executor == "local":
        ex = submitit.LocalExecutor(folder=str(folder))
        ex.update_parameters(timeout_min=a.slurm_time)
        return ex
    ex = submitit.AutoExecutor(folder=str(folder), cluster="slurm")
    params = dict(timeout_min=a.slurm_time, slurm_partition=a.slurm_partition,
                  slurm_array_parallelism=a.slurm_array_parallelism, cpus_per_task=a.slurm_cpus,
                  tasks_per_node=1, nodes=1, name="intsim")
    if a.slurm_gpus:
        params["gpus_per_node"] = a.slurm_gpus
    if a.slurm_mem:
        params["slurm_mem"] = a.slurm_mem
    if a.slurm_account:
        params["slurm_account"] = a.slurm_account
    if a.slurm_setup:
        params["slurm_setup"] = list(a.slurm_setup)
    ex.update_parameters(**params)
    return ex


@contextlib.contextmanager
def environ(updates: dict[str, str]):
    """``os.environ`` with ``updates`` set for the block (child processes inherit them), restored
    afterwards, also on an exception."""
    saved = {k: os.environ.get(k) for k in updates}
    os.environ.update(updates)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def submit_and_wait(a, folder: Path, job: UnitJob, todo: list[tuple[str, object]], parallel: int,
                    record: Path | None = None) -> list[tuple[str, str]]:
    """Run ``job(unit)`` for every ``(key, unit)`` of ``todo``: a SLURM array, or local processes
    ``parallel`` at a time. Waits for all; returns ``[(key, error)]`` of the failed ones."""
    ex = _executor(a, folder, parallel)
    failures: list[tuple[str, str]] = []
    with environ(job.env):           # the local executor's processes inherit it; sbatch exports it
        if a.executor == "slurm":
            jobs = list(zip([k for k, _ in todo], ex.map_array(job, [u for _, u in todo])))
            _record(record, jobs)
            print(f"submitted {len(jobs)} units as SLURM array {jobs[0][1].job_id.split('_')[0]} "
                  f"(logs in {folder}); waiting (Ctrl-C stops waiting, the jobs keep running)")
            try:
                for key, j in jobs:
                    failures += _result(key, j)
            except KeyboardInterrupt:
                print("stopped waiting; the units keep running. Progress: intsim sweep --status DIR")
                raise
            return failures
        pending, running = list(todo), []
        while pending or running:
            while pending and len(running) < parallel:
                key, unit = pending.pop(0)
                j = ex.submit(job, unit)
                _record(record, [(key, j)])
                running.append((key, j))
            time.sleep(0.5)
            still = []
            for key, j in running:
                if j.done():
                    failures += _result(key, j)
                else:
                    still.append((key, j))
            running = still
        return failures


def _result(key: str, j) -> list[tuple[str, str]]:
    try:
        j.result()
        return []
    except Exception as e:  # noqa: BLE001 - a failed unit is reported, the others go on
        return [(key, " ".join(str(e).split())[-300:] + f" (log: {j.paths.stderr})")]


def _read_record(path: Path) -> dict:
    """The job record of a folder (unit key -> job id and log paths); empty when missing or unreadable."""
    try:
        return json.loads(path.read_text()) if path.exists() else {}
    except (OSError, ValueError):
        return {}


def _record(path: Path | None, jobs) -> None:
    """Remember which job runs which unit (for --status: the logs of failed units)."""
    if path is None:
        return
    rec = _read_record(path)
    for key, j in jobs:
        rec[key] = {"job_id": str(j.job_id), "stdout": str(j.paths.stdout), "stderr": str(j.paths.stderr),
                    "submitted": time.time()}
    write_json_atomic(str(path), rec)


# ---- sweep units ----------------------------------------------------------------------------

def run_sweep_units(a, out: Path, plan: dict) -> int:
    """Submit the plan's units that have no result file; 0 when all are done, 1 when some failed."""
    check_options(a)
    todo = [(u["key"], i) for i, u in enumerate(plan["units"]) if not (out / units.UNITS / u["file"]).exists()]
    n = len(plan["units"])
    print(f"sweep: {n} units, {n - len(todo)} already done, {len(todo)} to run ({a.executor} executor)")
    if not todo:
        return 0
    args = {k: v for k, v in vars(a).items() if k != "func"}
    args.update(executor=None, out=str(out.resolve()), jobs=a.jobs, shards=plan["shards"], plan=False, unit=None)
    for k in ("data", "calib_data", "checkpoint"):
        if args.get(k):
            args[k] = str(Path(args[k]).resolve())
    parallel = a.jobs if a.executor == "local" else a.slurm_array_parallelism
    job = UnitJob("intsim.studies.sweep:job_unit", args, unit_env(a, parallel))
    t0 = time.perf_counter()
    failures = submit_and_wait(a, out / "logs", job, todo, parallel, out / SUBMITTED)
    print(f"sweep: {len(todo) - len(failures)} units finished in {time.perf_counter() - t0:.1f} s")
    if failures:
        for key, err in failures:
            print(f"  failed: {key}: {err}")
        print(f"sweep: {len(failures)} units failed; rerun the same command to run only the missing ones "
              f"(intsim sweep --status {out})")
        return 1
    return 0


def print_status(out: Path) -> int:
    """``--status DIR``: done / running / failed / missing units, with the failed units' last log lines."""
    plan = units.read_plan(out)
    rec = _read_record(out / SUBMITTED)
    states: dict[str, list] = {"done": [], "running": [], "failed": [], "missing": []}
    for u in plan["units"]:
        st, detail = units.unit_state(out / units.UNITS / u["file"])
        states[st].append((u["key"], detail))
    print(f"{out}: {len(plan['units'])} units: " + ", ".join(f"{len(v)} {k}" for k, v in states.items()))
    for key, detail in states["running"]:
        print(f"  running: {key} {detail}")
    for key, detail in states["failed"]:
        print(f"  failed: {key}")
        lines = [x for x in detail.splitlines() if x.strip()]
        log = rec.get(key, {}).get("stderr")
        if log and Path(log).exists():
            lines += [f"[{log}]"] + Path(log).read_text(errors="replace").strip().splitlines()[-5:]
        for x in lines:
            print(f"      {x}")
    for key, _ in states["missing"][:20]:
        job = rec.get(key, {}).get("job_id")
        print(f"  missing: {key}" + (f" (submitted as job {job})" if job else ""))
    if len(states["missing"]) > 20:
        print(f"  ... and {len(states['missing']) - 20} more missing")
    return 0


# ---- intsim run --shards --------------------------------------------------------------------

RUN_RECORD = "run.json"


def check_run_options(a) -> None:
    """``intsim run`` cluster options, before any work."""
    if a.shards is None:
        if a.executor is not None:
            raise UserError("--executor needs --shards K (intsim run splits its images into K shards)")
        return
    require_submitit(a.executor)
    check_options(a)
    work = Path(a.work_dir or "intsim-shards")
    if work.exists() and not work.is_dir():
        raise UserError(f"--work-dir {work} exists and is not a folder")
    if work.is_dir() and any(work.iterdir()) and not (work / RUN_RECORD).exists():
        raise UserError(f"--work-dir {work} is not empty and is not an intsim shard folder (no {RUN_RECORD})")


def evaluate_sharded(a, prog, data, n_images, n_golden, chunk: int):
    """The evaluation of ``intsim run`` as ``--shards`` units: the program file is written first
    (every unit reads it), each unit evaluates its images (cut at multiples of the batch size, in
    chunks of ``chunk`` as the unsharded run) and writes its logits; the merged :class:`Evaluation` is returned, so
    the report is built exactly as for an unsharded run."""
    from intsim.program.format import save
    work = Path(a.work_dir or "intsim-shards").resolve()
    work.mkdir(parents=True, exist_ok=True)
    for f in list(work.glob("shard-*")):       # results of an earlier run of this folder
        f.unlink()
    prog_file = work / "program.intsim"
    save(prog, str(prog_file))
    args = {"program_file": str(prog_file), "program": a.program and str(Path(a.program).resolve()),
            "model": a.model, "weights": a.weights, "seed": a.seed,
            "checkpoint": a.checkpoint and str(Path(a.checkpoint).resolve()),
            "data": a.data and str(Path(a.data).resolve()), "n_images": n_images, "total": len(data),
            "golden": n_golden, "batch_size": a.batch_size, "chunk": chunk, "shards": a.shards,
            "work": str(work)}
    write_json_atomic(str(work / RUN_RECORD), args)
    parallel = (a.jobs or units.usable_cores()) if a.executor == "local" else a.slurm_array_parallelism
    job = UnitJob("intsim.studies.cluster:run_shard", args, unit_env(a, parallel))
    todo = [(f"shard {i + 1}/{a.shards}", i) for i in range(a.shards)]
    t0 = time.perf_counter()
    failures = submit_and_wait(a, work / "logs", job, todo, parallel)
    if failures:
        for key, err in failures:
            print(f"intsim: {key} failed: {err}")
        raise SystemExit(1)
    print(f"{a.shards} shards evaluated in {time.perf_counter() - t0:.1f} s ({a.executor} executor, {work})")
    return units.merge_levels([units.load_result(work / f"shard-{i}.npz")[1] for i in range(a.shards)])


def run_shard(args: dict, shard: int) -> None:
    """One image shard of ``intsim run``: read the program file, evaluate the shard's images on every
    level, write ``shard-<i>.npz`` atomically."""
    result = Path(args["work"]) / f"shard-{shard}.npz"
    units.run_marked(result, lambda: _shard_body(args, shard, result))


def _shard_body(args: dict, shard: int, result: Path) -> None:
    import torch
    from intsim.program.format import load
    from intsim.models.zoo import DEFAULT_MODEL, load_model
    from reference.golden import run as golden_run
    from reference.fakequant import FakeQuantModel

    from .. import evaluate as ev
    from .. import options
    from ..data import open_images
    from ..engine import Engine
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    pf = Path(args["program_file"])
    if not pf.is_file():
        raise UserError(f"the program file {pf} is missing; it is written by intsim run --shards before the "
                        f"units start (was the work folder removed or not shared with this node?)")
    prog = load(str(pf))
    a = argparse.Namespace(model=args["model"], weights=args["weights"], checkpoint=args["checkpoint"],
                           seed=args["seed"], program=args["program"])
    if a.program:
        model, spec, _ = options.model_for_program(a, prog)
    else:
        model, spec, _ = load_model(a.model or DEFAULT_MODEL, weights=a.weights or "pretrained",
                                    checkpoint=a.checkpoint, seed=a.seed)
    tf, dc = options.transform_for(spec)
    data = open_images(args["data"], tf, args["n_images"], split="eval", seed=args["seed"])
    if len(data) != args["total"]:
        raise UserError(f"the data now lists {len(data)} images, not {args['total']} as when the run started")
    start, stop = units.shard_range(len(data), args["batch_size"], shard, args["shards"])
    part = units.sub_stream(data, start, stop)
    fq = FakeQuantModel(prog)
    scale = float(prog.values[prog.output]["scale"])
    engine = Engine(prog)
    bs = args["batch_size"]
    levels = {
        "float": lambda x: ev.run_float(model, x, dc["mean"], dc["std"], bs, False),
        "fakequant": lambda x: ev.run_fakequant(fq, x, bs, False),
        "engine": lambda x: ev.run_integer(lambda y: engine.run(y, batch_size=bs), x, scale, bs, "engine", False),
        "golden": lambda x: ev.run_integer(lambda y: golden_run(prog, y), x, scale, bs, "golden", False),
    }
    evaluation = ev.evaluate_stream(part, levels, chunk=args["chunk"],
                                    limits={"golden": max(0, args["golden"] - start)})
    units.save_result(result, {"shard": shard, "shards": args["shards"], "start": start, "stop": stop,
                               "total": len(data), "logit_scale": scale}, evaluation, None)
