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


def paired_top1_difference(a: np.ndarray, b: np.ndarray, labels: np.ndarray) -> dict:
    """Top-1 of ``a`` minus top-1 of ``b`` on the same images, with its sampling uncertainty.

    Only the images that exactly one of the two gets right move the difference: ``only_a`` of
    them favour ``a``, ``only_b`` favour ``b``, and ``diff = (only_a - only_b) / N``. Treating the
    N images as a sample, the standard error of ``diff`` is
    ``sqrt(only_a + only_b - (only_a - only_b)^2 / N) / N`` (the paired, McNemar-style variance), so
    ``ci95 = 1.96 * se`` is the half-width of a normal-approximation 95% interval. Two models that
    disagree on many images can differ by several tenths of a point by chance alone; a gap inside
    ``ci95`` is not evidence that one model is less accurate than the other.
    """
    ra = np.argmax(a, axis=1) == labels
    rb = np.argmax(b, axis=1) == labels
    n = int(labels.shape[0])
    only_a = int((ra & ~rb).sum())
    only_b = int((rb & ~ra).sum())
    if n == 0:
        return {"diff": 0.0, "only_a": 0, "only_b": 0, "se": 0.0, "ci95": 0.0}
    d = only_a - only_b
    var = max(only_a + only_b - d * d / n, 0.0)
    se = float(np.sqrt(var) / n)
    return {"diff": d / n, "only_a": only_a, "only_b": only_b, "se": se, "ci95": 1.96 * se}
