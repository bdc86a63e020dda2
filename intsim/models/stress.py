"""Stress variants: ImageNet-like outlier channels after LayerNorm, by a function-preserving rescale.

For every post-LayerNorm input (norm1 -> qkv, norm2 -> fc1, final norm -> head) the LayerNorm
gamma and beta of channel c are multiplied by k_c and input column c of the next linear layer is
divided by k_c. The float model computes the same function (up to float rounding), but the
post-LayerNorm activations now have a few channels 10-50x wider than the rest, the pathology that
MOSF addresses and that a short CIFAR-10 training does not produce.

Profile of k (seeded, one draw per LayerNorm): ``k_c = exp(sigma * z_c)`` with z standard normal
(most channels near 1), then a fraction ``frac`` of the channels, chosen at random, gets
``k_c`` uniform in ``[kmin, kmax]``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class StressProfile:
    frac: float = 0.03      # fraction of outlier channels per LayerNorm
    kmin: float = 10.0      # outlier factor range
    kmax: float = 50.0
    sigma: float = 0.25     # spread of the other channels' factors (log-normal)
    seed: int = 0

    def draw(self, d: int, g: torch.Generator) -> torch.Tensor:
        k = torch.exp(self.sigma * torch.randn(d, generator=g, dtype=torch.float64))
        n = max(1, round(self.frac * d))
        idx = torch.randperm(d, generator=g)[:n]
        k[idx] = self.kmin + (self.kmax - self.kmin) * torch.rand(n, generator=g, dtype=torch.float64)
        return k

    def as_dict(self) -> dict:
        return asdict(self)


def _rescale(norm: torch.nn.LayerNorm, linear: torch.nn.Linear, k: torch.Tensor) -> None:
    norm.weight.mul_(k.to(norm.weight.dtype))
    norm.bias.mul_(k.to(norm.bias.dtype))
    linear.weight.div_(k.to(linear.weight.dtype)[None, :])


@torch.no_grad()
def apply_stress(model: torch.nn.Module, profile: StressProfile = StressProfile()) -> dict[str, torch.Tensor]:
    """Rescale ``model`` (a timm VisionTransformer) in place; returns the factors per LayerNorm."""
    g = torch.Generator().manual_seed(profile.seed)
    factors = {}
    for i, blk in enumerate(model.blocks):
        for norm_name, lin in (("norm1", blk.attn.qkv), ("norm2", blk.mlp.fc1)):
            norm = getattr(blk, norm_name)
            k = profile.draw(norm.weight.numel(), g)
            _rescale(norm, lin, k)
            factors[f"blocks.{i}.{norm_name}"] = k
    k = profile.draw(model.norm.weight.numel(), g)
    _rescale(model.norm, model.head, k)
    factors["norm"] = k
    return factors


@torch.no_grad()
def channel_range_profile(model: torch.nn.Module, images: torch.Tensor) -> dict[str, dict[str, float]]:
    """Per post-LayerNorm point: max over channels and median over channels of the channel range
    (max - min over the given normalized images), and their ratio."""
    out: dict[str, dict[str, float]] = {}
    hooks = []

    def hook(name):
        def fn(_m, _i, y):
            y = y.reshape(-1, y.shape[-1]) if name != "norm" else y[:, 0]
            r = (y.amax(0) - y.amin(0)).double()
            out[name] = {"max": float(r.max()), "median": float(r.median()), "max_over_median": float(r.max() / r.median())}
        return fn
    for i, blk in enumerate(model.blocks):
        hooks.append(blk.norm1.register_forward_hook(hook(f"blocks.{i}.norm1")))
        hooks.append(blk.norm2.register_forward_hook(hook(f"blocks.{i}.norm2")))
    hooks.append(model.norm.register_forward_hook(hook("norm")))
    try:
        model(images)
    finally:
        for h in hooks:
            h.remove()
    return out
