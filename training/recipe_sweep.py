"""Run several full ``train_cifar`` recipes side by side (meant for a GPU) and rank them.

Each line of ``--runs`` is a run name followed by ``train_cifar`` options, e.g.::

    e22   --epochs 22
    pd75  --epochs 39 --patch-drop 0.75
    # comment lines and blank lines are skipped

Every run trains in its own process (``--threads`` CPU threads each) into ``OUT/<name>`` with
``--resume``, so a sweep that was stopped (``--minutes`` ran out, the machine went away) picks up
every unfinished run where its last epoch ended when it is started again, and finished runs are
not trained twice. At most ``--parallel`` runs train at once; the rest wait for a free slot.
Small models on one GPU are limited by kernel-launch overhead, so several processes share it well.

The sweep decodes the data into the shared cache once before the runs start, prints one progress
line a minute and, at the end, a table ranked by final full-test top-1, and writes
``OUT/sweep.json`` (per run: options, state, epochs done, final top-1, training minutes, the
per-epoch top-1 curve). Exit status 0 when every run finished, 1 when any failed, was stopped or
did not start. ``train_cifar --resume`` refuses a checkpoint of another recipe, so editing a
run's line after it started fails that run (rename it to start afresh).

    python -m training.recipe_sweep --data cifar10-jpeg.zip --runs runs.txt --out sweep --minutes 7

Measured on one NVIDIA H200 with a first, throwaway version of this sweep (same design: one
process per run, one CPU thread each): with 12 runs at once about 19 s an epoch per run, alone
about 10 s (its data pipeline runs on one CPU thread). The earlier 18-epoch recipe reached 71.60%
there against 71.76% on the CPU.
"""
from __future__ import annotations

import argparse
import json
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from .train_cifar import DEFAULT_CACHE, cached_split, read_epoch_log

RESERVED = ("--data", "--out", "--resume", "--threads", "--device", "--cache")   # set by the sweep


def parse_runs(text: str) -> list[tuple[str, list[str]]]:
    """``(name, options)`` pairs from the runs file's text; duplicate names are an error."""
    runs, seen = [], set()
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            words = shlex.split(line, comments=True)
        except ValueError as e:
            raise ValueError(f"line {n}: {e}") from None
        if not words:
            continue
        name, *opts = words
        if name.startswith("-") or "/" in name or name in (".", ".."):
            raise ValueError(f"line {n}: a run line starts with the run's name, not {name!r}")
        clash = [o for o in opts if o.split("=")[0] in RESERVED]
        if clash:
            raise ValueError(f"line {n}: {', '.join(clash)} is set by the sweep, not per run")
        if name in seen:
            raise ValueError(f"line {n}: run name {name!r} used twice")
        seen.add(name)
        runs.append((name, opts))
    if not runs:
        raise ValueError("the runs file names no run")
    return runs


def rank(rows: list[dict]) -> list[dict]:
    """Finished runs by final top-1, best first, then the others in their given order."""
    return sorted(rows, key=lambda r: (r["final_top1"] is None, -(r["final_top1"] or 0.0)))


def summary(name: str, opts: list[str], run_dir: Path, state: str) -> dict:
    """One run's record; it counts as finished only when its process of this sweep exited 0."""
    log = read_epoch_log(run_dir)
    final = state == "finished" and (run_dir / "final.safetensors").exists()
    return {"name": name, "options": opts, "state": state,
            "epochs_done": log[-1]["epoch"] if log else 0,
            "final_top1": log[-1]["test_top1"] if final and log else None,
            "train_minutes": log[-1]["elapsed_min"] if log else 0.0,
            "curve": [r["test_top1"] for r in log]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="cifar10-jpeg.zip or an extracted train/ test/ tree")
    ap.add_argument("--runs", required=True, help="text file: one run per line, name then train_cifar options")
    ap.add_argument("--out", required=True, help="sweep folder; run NAME trains in OUT/NAME")
    ap.add_argument("--device", default=None, help="passed to every run (default: train_cifar's own default)")
    ap.add_argument("--parallel", type=int, default=0, help="runs training at once (0 = all)")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads per run")
    ap.add_argument("--minutes", type=float, default=0.0,
                    help="stop every run still training after this many minutes (0 = no limit); "
                         "running the sweep again resumes them")
    ap.add_argument("--cache", default=DEFAULT_CACHE, help="decoded-array cache shared by the runs")
    a = ap.parse_args(argv)
    try:
        runs = parse_runs(Path(a.runs).read_text())
    except (OSError, ValueError) as e:
        ap.error(f"--runs: {e}")
    if a.parallel < 0 or a.threads < 1 or a.minutes < 0:
        ap.error("--parallel must be >= 0, --threads >= 1 and --minutes >= 0")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):                   # decode once, before the runs share the cache
        cached_split(Path(a.data), split, Path(a.cache))
    slots = a.parallel or len(runs)
    t0 = time.time()
    waiting, live, state = list(runs), {}, {}
    last_print = 0.0

    def stop_all(label: str) -> None:
        for p, _ in live.values():
            p.terminate()
        for name, (p, fh) in live.items():
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            fh.close()
            state[name] = "finished" if p.returncode == 0 else label
        live.clear()

    def on_term(signum, frame):
        raise KeyboardInterrupt
    old_term = signal.signal(signal.SIGTERM, on_term)
    try:
        while waiting or live:
            while waiting and len(live) < slots:
                name, opts = waiting.pop(0)
                d = out / name
                d.mkdir(exist_ok=True)
                cmd = [sys.executable, "-m", "training.train_cifar", "--data", a.data, "--out", str(d), "--resume",
                       "--threads", str(a.threads), "--cache", a.cache] + (["--device", a.device] if a.device else [])
                fh = open(d / "stdout.txt", "a")
                live[name] = (subprocess.Popen(cmd + opts, stdout=fh, stderr=subprocess.STDOUT), fh)
            time.sleep(1.0)
            for name in [n for n, (p, _) in live.items() if p.poll() is not None]:
                p, fh = live.pop(name)
                fh.close()
                state[name] = "finished" if p.returncode == 0 else \
                    f"failed (exit {p.returncode}, see {out / name}/stdout.txt)"
            if a.minutes and time.time() - t0 > a.minutes * 60:
                stop_all("stopped")
                for name, _ in waiting:
                    state[name] = "not started"
                waiting = []
            if time.time() - last_print >= 60 or not (waiting or live):
                last_print = time.time()
                done = {n: (read_epoch_log(out / n) or [{}])[-1].get("epoch", 0) for n, _ in runs}
                print(f"[{(time.time() - t0) / 60:5.1f} min] " + "  ".join(f"{n}:{e}" for n, e in done.items()),
                      flush=True)
    finally:                                          # never leave trainers running behind the sweep
        stop_all("stopped")
        signal.signal(signal.SIGTERM, old_term)
    rows = rank([summary(name, opts, out / name, state.get(name, "not started")) for name, opts in runs])
    (out / "sweep.json").write_text(json.dumps(rows, indent=1) + "\n")
    print(f"{'run':12s} {'top-1':>7s} {'epochs':>6s} {'minutes':>7s}  state / options")
    for r in rows:
        top = f"{100 * r['final_top1']:6.2f}%" if r["final_top1"] is not None else "      -"
        print(f"{r['name']:12s} {top} {r['epochs_done']:6d} {r['train_minutes']:7.1f}  {r['state']}: "
              f"{' '.join(r['options'])}")
    return 0 if all(r["state"] == "finished" for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
