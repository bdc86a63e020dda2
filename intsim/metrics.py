"""Comparison figures between two sets of logits (B, C): top-1 accuracy and agreement, cosine, SQNR."""
from __future__ import annotations

import numpy as np


def top1(logits: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of rows whose argmax equals the label."""
    return float((np.argmax(logits, axis=1) == labels).mean())


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Fraction of rows where the two argmaxes agree."""
    return float((np.argmax(a, axis=1) == np.argmax(b, axis=1)).mean())


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over rows of the cosine similarity of the logit vectors."""
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    num = (a * b).sum(1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return float(np.mean(np.where(den > 0, num / np.where(den > 0, den, 1.0), 1.0)))


def sqnr_db(ref: np.ndarray, test: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio of ``test`` against ``ref`` in dB, over all elements."""
    ref = ref.astype(np.float64)
    noise = float(((test.astype(np.float64) - ref) ** 2).sum())
    signal = float((ref ** 2).sum())
    if noise == 0.0:
        return float("inf")
    return 10.0 * np.log10(signal / noise)
