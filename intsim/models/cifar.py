"""CIFAR-10 as uint8 arrays, read from the JPEG zip or an ImageFolder tree.

The zip (``cifar10-jpeg.zip``) holds ``train/<class>/NNNN.jpg`` and ``test/<class>/NNNN.jpg``;
an extracted tree has the same layout. Classes sorted alphabetically give the label index.
Images come back as ``uint8`` arrays of shape (N, 32, 32, 3) (HWC, RGB) with ``int64`` labels.
"""
from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)


def _decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8)


def list_split(source: str | Path, split: str) -> list[tuple[str, int]]:
    """Sorted ``(member path, label)`` pairs of one split ("train" or "test")."""
    source = Path(source)
    out = []
    if source.is_file():
        with zipfile.ZipFile(source) as z:
            names = z.namelist()
        for n in names:
            parts = n.split("/")
            if len(parts) == 3 and parts[0] == split and parts[2].lower().endswith((".jpg", ".jpeg", ".png")):
                out.append((n, CLASSES.index(parts[1])))
    else:
        root = source / split
        if not root.is_dir():
            raise FileNotFoundError(f"{root} is not a folder; expected {split}/<class>/*.jpg under {source}")
        for ci, c in enumerate(CLASSES):
            for p in sorted((root / c).glob("*")):
                out.append((f"{split}/{c}/{p.name}", ci))
    out.sort()
    return out


def load_split(source: str | Path, split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Decode a whole split: images (N, 32, 32, 3) uint8, labels (N,) int64, member names."""
    source = Path(source)
    items = list_split(source, split)
    if not items:
        raise FileNotFoundError(f"no {split} images found in {source}")
    imgs = np.empty((len(items), 32, 32, 3), dtype=np.uint8)
    if source.is_file():
        with zipfile.ZipFile(source) as z:
            for i, (n, _) in enumerate(items):
                imgs[i] = _decode(z.read(n))
    else:
        for i, (n, _) in enumerate(items):
            imgs[i] = _decode((source / n).read_bytes())
    labels = np.array([c for _, c in items], dtype=np.int64)
    return imgs, labels, [n for n, _ in items]
