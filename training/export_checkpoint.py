"""Export a training run's weights as the bundled checkpoint, with its record next to it.

    python -m training.export_checkpoint runs/cifar [--out intsim/assets] [--note TEXT]

It always reads ``RUN/last.pt`` (the last finished epoch), not ``final.safetensors``.

Writes ``cifar10_vit_d6.safetensors`` (fp16 state dict) and ``cifar10_vit_d6.json`` (recipe,
seed, the ``train_cifar`` command that repeats the run, epochs done of the planned ones,
training time and the per-epoch test accuracy, all read from the run's ``last.pt`` and
``log.jsonl``), both atomically. It states whether the run was
complete: an interim checkpoint is labelled as such.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from intsim.models import cifar_model
from .train_cifar import read_epoch_log, saved_recipe


def train_command(args: dict) -> str:
    """The ``train_cifar`` command line of a run, every recipe option spelled out (options added
    after the run's checkpoint was written take the values that run used)."""
    parts = ["python -m training.train_cifar --data cifar10-jpeg.zip --out runs/cifar"]
    parts += [f"--{k.replace('_', '-')} {v}" for k, v in saved_recipe(args).items()]
    if args.get("threads"):
        parts.append(f"--threads {args['threads']}")
    if args.get("compile"):
        parts.append("--compile")
    if args.get("eval_images"):
        parts.append(f"--eval-images {args['eval_images']}")
    return " ".join(parts)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="training run folder (holds last.pt and log.jsonl)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "intsim" / "assets"))
    ap.add_argument("--note", default=None, help="a remark stored in the record (e.g. how the machine was shared)")
    a = ap.parse_args(argv)
    run, out = Path(a.run), Path(a.out)
    state = torch.load(run / "last.pt", map_location="cpu", weights_only=False)
    planned = state["args"]["epochs"]
    done = state["epoch"]
    log = read_epoch_log(run, upto=done)
    sd = {k: v.detach().half().contiguous() for k, v in state["model"].items()}
    record = {
        "model": cifar_model.NAME,
        "architecture": cifar_model.CONFIG,
        "data_config": cifar_model.DATA_CONFIG,
        "recipe": {k: v for k, v in state["args"].items() if k not in ("data", "out", "cache", "resume", "device")},
        "command": train_command(state["args"]),
        "epochs_done": done,
        "epochs_planned": planned,
        "complete": done >= planned,
        "training_minutes": round(state["elapsed"] / 60, 1),
        "epoch_minutes": [round(b["elapsed_min"] - a_["elapsed_min"], 1)
                          for a_, b in zip([{"elapsed_min": 0.0}] + log[:-1], log)],
        "test_top1_full_10k": log[-1]["test_top1"] if log else None,
        # logs written before --eval-images existed measured every epoch on the whole CIFAR-10 test set
        "final_test_images": log[-1].get("test_images", 10000) if log else None,
        "log": log,
        "weights_dtype": "float16",
    }
    if a.note:
        record["note"] = a.note
    tmp = out / f".{cifar_model.NAME}.safetensors.tmp"
    save_file(sd, str(tmp), metadata={"model": cifar_model.NAME, "epochs_done": str(done)})
    os.chmod(tmp, 0o644)
    os.replace(tmp, out / f"{cifar_model.NAME}.safetensors")
    (out / f".{cifar_model.NAME}.json.tmp").write_text(json.dumps(record, indent=1) + "\n")
    os.replace(out / f".{cifar_model.NAME}.json.tmp", out / f"{cifar_model.NAME}.json")
    state_word = "complete" if record["complete"] else f"INTERIM ({done} of {planned} epochs)"
    print(f"wrote {out / (cifar_model.NAME + '.safetensors')}: {state_word}, "
          f"test top-1 {record['test_top1_full_10k']}, {record['training_minutes']} min of training")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
