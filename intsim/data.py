"""Images for calibration and evaluation, as uint8 arrays after the model's evaluation transform.

Every level (float, fake-quant, golden, engine) is fed the same ``uint8`` array of shape
(N, 3, H, W): the image after timm's evaluation resize and center crop but *before*
normalization, which the program folds into the patch embedding.

Sources:

* the **bundle** shipped in ``intsim/assets/cifar10_bundle.zip``: a fixed, class-balanced draw
  from CIFAR-10 (``calib/``: 1,024 training images, ``eval/``: 2,000 test images, 200 a class),
  the JPEG bytes as they were, plus ``manifest.json`` naming every source file;
* an **ImageFolder tree** (``DIR/<class>/<image>``, class folders sorted give the label index,
  the ImageNet validation layout);
* a **zip** of such a tree, or the CIFAR-10 zip itself (``train/`` and ``test/`` splits).
"""
from __future__ import annotations

import io
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import UserError

ASSETS = Path(__file__).resolve().parent / "assets"
BUNDLE = ASSETS / "cifar10_bundle.zip"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff", ".jpe")

#: Largest image accepted, in pixels (width x height), checked from the file's header before any
#: pixel is decoded: 64 megapixels (an ImageNet photo is at most about 12); a larger one is
#: refused with a message (a decompression bomb would otherwise take gigabytes).
MAX_PIXELS = 64_000_000
#: Largest image file accepted, in bytes (read into memory before decoding).
MAX_FILE_BYTES = 256 << 20


@dataclass
class ImageSet:
    """Decoded images: ``images`` uint8 (N, 3, H, W), ``labels`` int64 (N,) or None, ``ids`` source names."""

    images: np.ndarray
    labels: np.ndarray | None
    ids: list[str]
    classes: list[str]
    source: str

    def __len__(self) -> int:
        return len(self.ids)

    def chunks(self, size: int, start: int = 0):
        """Yield ``(offset, ImageSet)`` slices of at most ``size`` images (the :class:`ImageStream` interface)."""
        for s in range(start, len(self), size):
            e = min(len(self), s + size)
            yield s, ImageSet(self.images[s:e], None if self.labels is None else self.labels[s:e], self.ids[s:e],
                              self.classes, self.source)

    def take(self, n: int | None) -> "ImageSet":
        if n is None or n >= len(self):
            return self
        return ImageSet(self.images[:n], None if self.labels is None else self.labels[:n], self.ids[:n],
                        self.classes, self.source)


@dataclass(frozen=True)
class Transform:
    """timm evaluation transform without normalization: resize shorter side to
    ``int(size / crop_pct)`` (bicubic by default), center crop ``size``. Identity when the
    image already has the input size and crop_pct is 1."""

    size: int
    crop_pct: float = 1.0
    interpolation: str = "bicubic"

    def __call__(self, im: Image.Image) -> np.ndarray:
        im = im.convert("RGB")
        if not (im.size == (self.size, self.size) and self.crop_pct == 1.0):
            from torchvision.transforms import CenterCrop, InterpolationMode, Resize
            scale = int(self.size / self.crop_pct)
            mode = {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR}[self.interpolation]
            im = CenterCrop(self.size)(Resize(scale, interpolation=mode)(im))
        return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1)


# ---- listing -----------------------------------------------------------------------

def _is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES)


def _list_tree(root: Path) -> tuple[list[tuple[str, int]], list[str]]:
    if not root.is_dir():
        raise UserError(f"data folder not found: {root}")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise UserError(f"data folder {root} has no class folders; expected the ImageFolder layout "
                        f"DIR/<class>/<image> (class folders sorted give the label index)")
    items = []
    for ci, c in enumerate(classes):
        for p in sorted((root / c).iterdir()):
            if p.name.startswith(".") or p.is_dir():
                continue
            if not _is_image_name(p.name):
                raise UserError(f"{p} is not an image file (expected one of {', '.join(IMAGE_SUFFIXES)})")
            items.append((str(p.relative_to(root)), ci))
    if not items:
        raise UserError(f"data folder {root} holds no images in its class folders {classes[:5]}")
    return items, classes


def _list_zip(z: zipfile.ZipFile, prefix: str) -> tuple[list[tuple[str, int]], list[str]]:
    names = [n for n in z.namelist() if n.startswith(prefix) and not n.endswith("/")]
    rel = [n[len(prefix):] for n in names]
    classes = sorted({r.split("/")[0] for r in rel if "/" in r})
    if not classes:
        raise UserError(f"{z.filename}: no class folders under '{prefix or '/'}'")
    items = []
    for n, r in zip(names, rel):
        if "/" not in r or r.split("/")[-1].startswith("."):
            continue
        if not _is_image_name(r):
            raise UserError(f"{z.filename}: member {n} is not an image file")
        items.append((n, classes.index(r.split("/")[0])))
    items.sort()
    if not items:
        raise UserError(f"{z.filename}: no images under '{prefix or '/'}'")
    return items, classes


def _decode(data: bytes, name: str, transform: Transform) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            if w * h > MAX_PIXELS:
                raise UserError(f"{name}: {w}x{h} pixels is more than the limit of {MAX_PIXELS:,} "
                                "(intsim.data.MAX_PIXELS); refusing to decode it")
            return transform(im)
    except Image.DecompressionBombError as e:      # PIL's own, larger limit, raised while opening
        raise UserError(f"{name}: refusing to decode it: {e}") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise UserError(f"{name} could not be read as an image: {e}") from None


def _read_bytes(zf: zipfile.ZipFile | None, name: str) -> bytes:
    """The bytes of image ``name`` (a zip member or a file), at most ``MAX_FILE_BYTES``."""
    try:
        size = zf.getinfo(name).file_size if zf is not None else Path(name).stat().st_size
        if size > MAX_FILE_BYTES:
            raise UserError(f"{name}: {size:,} bytes is more than the limit of {MAX_FILE_BYTES:,} for one image")
        return zf.read(name) if zf is not None else Path(name).read_bytes()
    except (OSError, zipfile.BadZipFile, KeyError) as e:
        raise UserError(f"{name} could not be read: {e}") from None


def _pick(items: list[tuple[str, int]], n: int | None, seed: int) -> list[tuple[str, int]]:
    """A class-balanced subset of ``n`` items (round-robin over classes in a seeded order), or all."""
    if n is None or n >= len(items):
        return items
    rng = np.random.default_rng(seed)
    by_class: dict[int, list[tuple[str, int]]] = {}
    for it in items:
        by_class.setdefault(it[1], []).append(it)
    queues = {c: [v[i] for i in rng.permutation(len(v))] for c, v in sorted(by_class.items())}
    out: list[tuple[str, int]] = []
    while len(out) < n:
        for c in sorted(queues):
            if queues[c] and len(out) < n:
                out.append(queues[c].pop(0))
    return out


@dataclass
class ImageStream:
    """Listed (not yet decoded) images: read them all (:meth:`read`) or in chunks (:meth:`chunks`),
    so that evaluating many images keeps memory flat. ``labels`` int64 (N,), ``ids`` source names."""

    items: list[tuple[str, int]]
    classes: list[str]
    source: str
    transform: Transform
    split: str
    _zip: zipfile.ZipFile | None

    def __len__(self) -> int:
        return len(self.items)

    @property
    def labels(self) -> np.ndarray:
        return np.array([c for _, c in self.items], dtype=np.int64)

    @property
    def ids(self) -> list[str]:
        return [name for name, _ in self.items]

    def _decode_range(self, start: int, stop: int) -> np.ndarray:
        t = self.transform
        imgs = np.empty((stop - start, 3, t.size, t.size), dtype=np.uint8)
        for i, (name, _) in enumerate(self.items[start:stop]):
            data = _read_bytes(self._zip, name)
            imgs[i] = _decode(data, name, t)
        return imgs

    def chunks(self, size: int, start: int = 0):
        """Yield ``(offset, ImageSet)`` of at most ``size`` decoded images each, in order."""
        for s in range(start, len(self.items), size):
            e = min(len(self.items), s + size)
            yield s, ImageSet(self._decode_range(s, e), self.labels[s:e], self.ids[s:e], self.classes, self.source)

    def read(self, progress: bool = False) -> ImageSet:
        """Every image, decoded into one array."""
        from tqdm import tqdm
        t = self.transform
        imgs = np.empty((len(self.items), 3, t.size, t.size), dtype=np.uint8)
        step = 64
        with tqdm(total=len(self.items), desc=f"reading {self.split} images", unit="img", disable=not progress,
                  leave=False) as bar:
            for s in range(0, len(self.items), step):
                e = min(len(self.items), s + step)
                imgs[s:e] = self._decode_range(s, e)
                bar.update(e - s)
        return ImageSet(imgs, self.labels, self.ids, self.classes, self.source)


def open_images(source: str | Path | None, transform: Transform, n: int | None = None, *, split: str = "eval",
                seed: int = 0) -> ImageStream:
    """List ``n`` images (all when None) of ``split`` ("eval" or "calib") from ``source``, decoding none.

    ``source`` None means the bundle. A folder is an ImageFolder tree; a ``.zip`` is either the
    CIFAR-10 zip / a zip with ``train/`` and ``test/`` (calib reads train, eval reads test) or a zip
    of a class-folder tree. From the bundle, images are taken in the bundle's order (the first
    ``n`` of its class-interleaved order); from other sources a seeded class-balanced subset.
    The first image is decoded as a check, so that unreadable data fails at once.
    """
    if source is None:
        if not BUNDLE.is_file():
            raise UserError(f"the bundled images are missing ({BUNDLE}); reinstall intsim or pass --data")
        z = zipfile.ZipFile(BUNDLE)
        manifest = json.loads(z.read("manifest.json"))
        names = manifest[split]
        classes = manifest["classes"]
        items = [(f"{split}/{m}", classes.index(m.split("/")[0])) for m in names]
        if n is not None:
            items = items[:n]
        label = f"bundled CIFAR-10 {split} set"
    else:
        src = Path(source)
        if src.is_file() and src.suffix.lower() == ".zip":
            try:
                z = zipfile.ZipFile(src)
            except zipfile.BadZipFile:
                raise UserError(f"{src} is not a readable zip file") from None
            tops = {n.split("/")[0] for n in z.namelist() if "/" in n}
            prefix = ""
            if {"train", "test"} <= tops:
                prefix = ("train/" if split == "calib" else "test/")
            items, classes = _list_zip(z, prefix)
        elif src.is_dir():
            z = None
            root = src
            if (src / "train").is_dir() and (src / "test").is_dir():
                root = src / ("train" if split == "calib" else "test")
            items, classes = _list_tree(root)
            items = [(str(root / r), c) for r, c in items]
        elif not src.exists():
            raise UserError(f"data path not found: {src}")
        else:
            raise UserError(f"--data must be a folder or a .zip, not {src}")
        items = _pick(items, n, seed)
        label = str(src)
    stream = ImageStream(items, classes, label, transform, split, z)
    if items:
        stream._decode_range(0, 1)
    return stream


def load_images(source: str | Path | None, transform: Transform, n: int | None = None, *, split: str = "eval",
                seed: int = 0, progress: bool = False) -> ImageSet:
    """:func:`open_images` and read every image (uint8 (N, 3, H, W) in memory)."""
    return open_images(source, transform, n, split=split, seed=seed).read(progress)


# ---- building the bundle (maintainers) --------------------------------------------------

def make_bundle(cifar_zip: str | Path, out: str | Path = BUNDLE, n_calib: int = 1024, n_eval: int = 2000,
                seed: int = 0) -> dict:
    """Write the bundle zip from the CIFAR-10 zip: a seeded class-balanced draw, stored uncompressed
    (the JPEG bytes as they are), in class-interleaved order so that any prefix is balanced."""
    src = zipfile.ZipFile(cifar_zip)
    manifest: dict = {"source": Path(cifar_zip).name, "seed": seed}
    files: dict[str, bytes] = {}
    for split, from_split, n in (("calib", "train/", n_calib), ("eval", "test/", n_eval)):
        items, classes = _list_zip(src, from_split)
        chosen = _pick(items, n, seed)
        manifest["classes"] = classes
        manifest[split] = [name[len(from_split):] for name, _ in chosen]
        for name, _ in chosen:
            files[f"{split}/{name[len(from_split):]}"] = src.read(name)
    out = Path(out)
    tmp = out.with_suffix(".tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as z:
        z.writestr(zipfile.ZipInfo("manifest.json", date_time=(2026, 1, 1, 0, 0, 0)),
                   json.dumps(manifest, indent=1, sort_keys=True))
        for name in sorted(files):
            z.writestr(zipfile.ZipInfo(name, date_time=(2026, 1, 1, 0, 0, 0)), files[name])
    tmp.replace(out)
    return manifest
