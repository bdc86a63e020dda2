"""Observers: what calibration keeps of one block's float activations (memory-bounded, seeded).

A :class:`BlockObserver` is passed as the ``hook`` and ``tap`` of
``reference.vit.block_forward`` while one block runs over the calibration images in chunks.
It never holds a whole activation; per point it keeps

* post-LayerNorm points (``norm1``, ``norm2``): a random subset of token rows, at most
  ``rows`` rows (M, D) in all, for the per-channel calibration and the reparameterization;
* other quantized points (``attn.q/k/v``, ``attn.core``, ``mlp.gelu``): a random sample of at
  most ``elements`` elements (with replacement; all of a chunk's elements when it has fewer)
  for the percentile search;
* post-softmax (``attn.probs``): the probabilities of ``softmax_images`` images at
  ``softmax_rows`` query rows (n, H, r, T) and the same images' v (n, H, T, d);
* integer-valued points (``tap``): the running ``max |x|`` (residual, GELU input).

Every random choice comes from ``numpy.random.default_rng([seed, crc32(point name)])``, so the
kept samples depend only on the seed, the point and the images.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import numpy as np
import torch


def point_rng(seed: int, name: str) -> np.random.Generator:
    """The generator of one point: seeded by the config seed and a stable hash of the name."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, zlib.crc32(name.encode())])


@dataclass
class Budget:
    """Sample sizes over all calibration images."""

    rows: int = 4096            # post-LN token rows kept per point
    elements: int = 1 << 18     # elements kept per point for percentile searches
    softmax_images: int = 8     # images whose attention is kept for the post-softmax search
    softmax_rows: int = 32      # query rows kept per image and head


class BlockObserver:
    """Hook/tap pair collecting the statistics of block ``index`` over ``n_images`` images."""

    def __init__(self, index: int, n_images: int, tokens: int, heads: int, seed: int, budget: Budget | None = None):
        self.prefix = f"blocks.{index}"
        self.n = n_images
        self.heads = heads
        self.seed = seed
        self.budget = budget or Budget()
        self.rows: dict[str, list[np.ndarray]] = {}
        self.samples: dict[str, list[np.ndarray]] = {}
        self.absmax: dict[str, float] = {}
        self._rngs: dict[str, np.random.Generator] = {}
        r = point_rng(seed, f"{self.prefix}.attn.probs")
        k = min(n_images, self.budget.softmax_images)
        self.sm_images = np.sort(r.choice(n_images, size=k, replace=False))
        self.sm_rows = np.sort(r.choice(tokens, size=min(tokens, self.budget.softmax_rows), replace=False))
        self.probs: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self._chunk = (0, 0)
        self._v_chunk: torch.Tensor | None = None

    def _rng(self, name: str) -> np.random.Generator:
        if name not in self._rngs:
            self._rngs[name] = point_rng(self.seed, name)
        return self._rngs[name]

    def start_chunk(self, offset: int, size: int) -> None:
        """Declare that the next forward covers images ``offset .. offset + size - 1``."""
        self._chunk = (offset, size)

    def _share(self, total: int) -> int:
        return int(math.ceil(total * self._chunk[1] / self.n))

    # ---- the hook and the tap -------------------------------------------------------------
    def hook(self, name: str, x: torch.Tensor) -> torch.Tensor:
        short = name[len(self.prefix) + 1:]
        if short in ("norm1", "norm2"):
            flat = x.reshape(-1, x.shape[-1])
            k = min(flat.shape[0], self._share(self.budget.rows))
            idx = np.sort(self._rng(name).choice(flat.shape[0], size=k, replace=False))
            self.rows.setdefault(name, []).append(flat[torch.from_numpy(idx)].numpy().copy())
        elif short == "attn.probs":
            off, size = self._chunk
            local = [i - off for i in self.sm_images if off <= i < off + size]
            if local:
                li = torch.tensor(local)
                self.probs.append(x[li][:, :, torch.from_numpy(self.sm_rows)].clone())
                B, T, D = self._v_chunk.shape
                vh = self._v_chunk.reshape(B, T, self.heads, D // self.heads).transpose(1, 2)
                self.v.append(vh[li].clone())
        else:
            if short == "attn.v":
                self._v_chunk = x
            flat = x.reshape(-1)
            k = self._share(self.budget.elements)
            if k >= flat.shape[0]:      # small tensor: keep it all
                kept = flat.numpy().copy()
            else:
                kept = flat[torch.from_numpy(self._rng(name).integers(0, flat.shape[0], size=k))].numpy().copy()
            self.samples.setdefault(name, []).append(kept)
        return x

    def tap(self, name: str, x: torch.Tensor) -> None:
        lo, hi = torch.aminmax(x)
        self.absmax[name] = max(self.absmax.get(name, 0.0), -float(lo), float(hi))

    # ---- results ----------------------------------------------------------------------
    def rows_of(self, name: str) -> np.ndarray:
        """Kept token rows (M, D) float64 of a post-LN point."""
        return np.concatenate(self.rows[name], axis=0).astype(np.float64)

    def sample_of(self, name: str) -> np.ndarray:
        """Kept elements (1-D float64) of a point."""
        return np.concatenate(self.samples[name]).astype(np.float64)

    def attention(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Kept probabilities (n, H, r, T) and values (n, H, T, d), float32."""
        return torch.cat(self.probs), torch.cat(self.v)
