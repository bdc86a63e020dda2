"""Work units: a sweep's points (or point x image-shard pieces) and a big evaluation's image shards,
each run by any scheduler and each written to a file of its own.

A sweep folder holds ``sweep.json`` (the configuration it was made with: data, image count, every
non-grid option, the grid), optionally ``plan.json`` (the units, in order, with stable keys) and
``units/<name>.npz``, one per finished unit, written atomically (a temporary file, then a rename:
never an append to a shared file, safe on NFS). A unit's file keeps the logits of every level on
its images (float64 for float and fake-quant, the integer logits for engine and golden) and the
engine's saturation counts, so merging the shards of a point gives exactly the figures (paired
95% intervals, agreements, cosines, SQNRs, top-1) of the same point run whole: the metrics are
computed once, on the concatenated logits.

Image shards are cut at multiples of the batch size (the evaluation chunks are multiples of it too),
so every batch holds the same images as in the whole run and even the float levels' logits are
identical bit for bit.

Unit keys: a point's key (``W4A4|tanq|mosf|``) or, with K shards, ``<point key>#<i>/<K>`` (i from
1). They depend on the point and the shard only, not on the grid's size or order, so a grown grid
keeps every finished unit. ``--unit-index I`` is the I-th unit of the current ``plan.json`` (0-based,
as ``$SLURM_ARRAY_TASK_ID``).
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import re
import socket
import time
import traceback
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..options import write_json_atomic
from ..program.program import json_default, write_atomic

CONFIG = "sweep.json"
PLAN = "plan.json"
UNITS = "units"
FORMAT = 1


# ---- keys, files, shards ---------------------------------------------------------------

def unit_key(point_key: str, shard: int, shards: int) -> str:
    """Stable key of shard ``shard`` (0-based) of ``shards`` of a point."""
    return point_key if shards <= 1 else f"{point_key}#{shard + 1}/{shards}"


def unit_file(key: str) -> str:
    """A file name for a unit key: its readable part plus a hash of the key (no collisions)."""
    safe = re.sub(r"[^A-Za-z0-9=._-]+", "_", key).strip("_") or "unit"
    return f"{safe}-{hashlib.sha256(key.encode()).hexdigest()[:10]}.npz"


def shard_range(n: int, chunk: int, shard: int, shards: int) -> tuple[int, int]:
    """Images ``[start, stop)`` of shard ``shard`` of ``shards`` over ``n`` images, cut at multiples
    of ``chunk`` (the batch size; shards beyond the number of batches are empty)."""
    chunks = -(-n // chunk)
    c0, c1 = shard * chunks // shards, (shard + 1) * chunks // shards
    return min(n, c0 * chunk), min(n, c1 * chunk)


def sub_stream(stream, start: int, stop: int):
    """The images ``[start, stop)`` of an :class:`intsim.data.ImageStream` (labels, classes kept)."""
    return dataclasses.replace(stream, items=stream.items[start:stop])


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity, e.g. under ``taskset``), not all the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:                              # no sched_getaffinity (macOS, Windows)
        return os.cpu_count() or 1


def read_plan(out: Path) -> dict:
    f = out / PLAN
    if not f.exists():
        raise UserError(f"{out} has no unit plan ({PLAN}); write one with: intsim sweep <options> --plan -o {out}")
    try:
        plan = json.loads(f.read_text())
        if not isinstance(plan, dict) or plan.get("intsim_sweep_plan") != 1 or not isinstance(plan.get("units"), list):
            raise ValueError("not a sweep plan")
    except (OSError, ValueError) as e:
        raise UserError(f"{f} is not a readable sweep plan ({e})") from None
    return plan


# ---- one unit's result file ----------------------------------------------------------------

def save_result(path: Path, meta: dict, evaluation, labels) -> None:
    """Write one unit's result atomically: ``meta`` (JSON), every level's logits, the labels."""
    arrays = {}
    levels = {}
    for name, r in evaluation.levels.items():
        integer = r.int_logits is not None
        arrays[f"level.{name}"] = r.int_logits if integer else r.logits
        levels[name] = {"seconds": r.seconds, "images": r.images, "integer": integer, "counts": r.counts}
    if labels is not None:
        arrays["labels"] = np.asarray(labels, dtype=np.int64)
    meta = dict(meta, levels=levels, format=FORMAT)
    arrays["meta"] = np.frombuffer(json.dumps(meta, default=json_default).encode(), np.uint8)
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    write_atomic(path, buf.getvalue())


def load_result(path: Path) -> tuple[dict, dict, np.ndarray | None]:
    """``(meta, {level: LevelResult}, labels or None)`` of a unit's result file."""
    from ..evaluate import LevelResult
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(bytes(z["meta"]).decode())
            labels = z["labels"] if "labels" in z.files else None
            levels = {}
            for name, info in meta["levels"].items():
                x = z[f"level.{name}"]
                if info["integer"]:
                    levels[name] = LevelResult(x.astype(np.float64) * meta["logit_scale"], info["seconds"],
                                               info["images"], int_logits=x, counts=info["counts"])
                else:
                    levels[name] = LevelResult(x, info["seconds"], info["images"], counts=info["counts"])
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"unit result {path} is unreadable ({type(e).__name__}: {e}); delete it and run "
                        f"that unit again") from None
    return meta, levels, labels


def _add_counts(into: dict, counts: dict | None) -> None:
    for op, c in (counts or {}).items():
        acc = into.setdefault(op, {})
        for k, v in c.items():
            acc[k] = acc.get(k, 0) + int(v)


def merge_levels(parts: list[dict]):
    """The levels of consecutive shards (in image order) as one :class:`intsim.evaluate.Evaluation`."""
    from ..evaluate import Evaluation, LevelResult
    ev = Evaluation()
    names: list[str] = []
    for p in parts:
        names += [n for n in p if n not in names]
    for name in names:
        rs = [p[name] for p in parts if name in p and p[name].images > 0]
        if not rs:
            continue
        counts = None
        if rs[0].counts is not None:
            counts = {}
            for r in rs:
                _add_counts(counts, r.counts)
        il = None if rs[0].int_logits is None else np.concatenate([r.int_logits for r in rs])
        ev.levels[name] = LevelResult(np.concatenate([r.logits for r in rs]), sum(r.seconds for r in rs),
                                      sum(r.images for r in rs), int_logits=il, counts=counts)
    return ev


# ---- progress markers (for --status) -------------------------------------------------------

def marker(result: Path, kind: str) -> Path:
    return result.with_name(result.name[:-len(".npz")] + f".{kind}")


def run_marked(result: Path, fn) -> None:
    """Run ``fn()`` (which writes ``result``) with a ``.running`` marker beside it; on an error a
    ``.failed`` marker keeps the traceback's last lines."""
    result.parent.mkdir(parents=True, exist_ok=True)
    run_m, fail_m = marker(result, "running"), marker(result, "failed")
    write_json_atomic(str(run_m), {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(),
                                   "slurm_job": os.environ.get("SLURM_JOB_ID")})
    try:
        fn()
    except BaseException as e:
        tail = traceback.format_exc().strip().splitlines()[-12:]
        write_json_atomic(str(fail_m), {"error": f"{type(e).__name__}: {e}", "traceback": tail,
                                        "host": socket.gethostname(), "time": time.time()})
        raise
    finally:
        run_m.unlink(missing_ok=True)
    fail_m.unlink(missing_ok=True)


def unit_state(result: Path) -> tuple[str, str]:
    """``(state, detail)``: done, running, failed or missing."""
    if result.exists():
        return "done", ""
    fail_m, run_m = marker(result, "failed"), marker(result, "running")
    if run_m.exists():
        try:
            info = json.loads(run_m.read_text())
        except (OSError, ValueError):
            info = {}
        if info.get("host") == socket.gethostname() and info.get("slurm_job") is None:
            try:
                os.kill(int(info.get("pid", -1)), 0)
            except ProcessLookupError:
                return "failed", f"process {info.get('pid')} on {info.get('host')} is gone (killed?)"
            except (PermissionError, ValueError, OverflowError):
                pass
        started = info.get("started")
        since = f" for {(time.time() - started) / 60:.1f} min" if isinstance(started, (int, float)) else ""
        return "running", f"on {info.get('host')}{since}"
    if fail_m.exists():
        try:
            info = json.loads(fail_m.read_text())
            return "failed", "\n".join(info.get("traceback", [])[-6:]) or info.get("error", "")
        except (OSError, ValueError):
            return "failed", ""
    return "missing", ""
