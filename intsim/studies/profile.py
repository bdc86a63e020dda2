"""``intsim profile``: the post-LayerNorm channel range profile of a float model.

For every post-LayerNorm point (``blocks.i.norm1`` -> qkv, ``blocks.i.norm2`` -> fc1, the final
``norm`` -> head) the range of each channel (max - min over all tokens of the images; the class
token for the final norm) is measured, and the table reports the widest channel's range, the
median channel's range and their ratio. A ratio near 1 means a per-tensor quantizer loses little
to a per-channel one; large ratios are the inter-channel variation that MOSF and the mean rule
address (``intsim.models.stress.channel_range_profile``).
"""
from __future__ import annotations

import numpy as np


def add_arguments(p) -> None:
    from ..options import add_model_args, count_or_all
    add_model_args(p)
    p.add_argument("--data", metavar="PATH", help="images (default: the bundled calibration images)")
    p.add_argument("--images", type=count_or_all, default=256, help="number of images (default 256)")
    p.add_argument("--json", metavar="FILE", help="also write the profile as JSON")


def run(a) -> int:
    import torch

    from intsim.models.stress import channel_range_profile
    from calib import archs
    from intsim.models.zoo import DEFAULT_MODEL, load_model

    from ..options import transform_for, check_writable, print_report
    from ..data import load_images
    from ..errors import UserError

    check_writable(a.json, "JSON profile")
    model, spec, info = load_model(a.model or DEFAULT_MODEL, weights=a.weights or "pretrained",
                                   checkpoint=a.checkpoint, seed=a.seed)
    arch = archs.for_model(model)
    if not arch.supports("profile"):
        raise UserError(f"intsim profile covers {archs.supporting('profile')} models (blocks with norm1 / norm2), "
                        f"not {arch.title}")
    tf, dc = transform_for(spec)
    data = load_images(a.data, tf, a.images, split="calib", seed=a.seed, progress=not a.no_progress)
    x = torch.from_numpy(data.images).float().div_(255.0)
    x = (x - torch.tensor(dc["mean"]).view(1, 3, 1, 1)) / torch.tensor(dc["std"]).view(1, 3, 1, 1)
    prof = channel_range_profile(model.eval(), x)
    ratios = np.array([v["max_over_median"] for v in prof.values()])
    report = {"model": spec.name, "weights": info.get("weights"), "images": len(data), "source": data.source,
              "points": prof, "max_over_median": {"min": float(ratios.min()), "median": float(np.median(ratios)),
                                                  "max": float(ratios.max())}}
    title = f"model {spec.name}, post-LayerNorm channel ranges over {len(data)} images from {data.source}"
    return print_report(title, format_table(report), report, a.json)


def format_table(report: dict) -> str:
    rows = [("point", "widest channel", "median channel", "widest / median")]
    for name, v in report["points"].items():
        rows.append((name, f"{v['max']:.3f}", f"{v['median']:.3f}", f"{v['max_over_median']:.1f}"))
    from ..options import text_table
    m = report["max_over_median"]
    return (text_table(rows)
            + f"\n\nwidest / median over the points: min {m['min']:.1f}, median {m['median']:.1f}, max {m['max']:.1f}")
