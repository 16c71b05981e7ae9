"""The zoo's source tasks besides the printed characters, all generated offline as image
folders (root/{train,val}/<class>/*.png, 32x32, white on black like the digits target):

- `letters_only`: the characters without the 10 digit glyphs (52 classes): the same domain
  with the target's own shapes removed.
- `shuffled_labels`: the characters with their training labels permuted across images (the
  validation labels kept): a network that can only memorise, whose features should be poor.
- `write_textures`: 10 classes of periodic and random textures (gratings, checkers, dots,
  rings, noise): a mismatched source with no strokes or objects at all.

The derived folders hold hard links to the characters' files (a copy where linking fails),
so they cost no rendering and little disk.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np

from jaxsft.data.characters import IMAGE_SIZE

TEXTURES = ("grating_0", "grating_45", "grating_90", "grating_135", "plaid", "checker",
            "dots", "rings", "blobs", "noise")


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def letters_only(chars: Path, root: Path) -> Path:
    """root/{train,val}/<class>: every character class of `chars` except the digits."""
    for path in sorted(chars.glob("*/*/*.png")):
        if not path.parent.name.startswith("digit_"):
            _link(path, root / path.relative_to(chars))
    return root


def shuffled_labels(chars: Path, root: Path, seed: int = 0) -> Path:
    """`chars` with each training image moved to the class of a seeded permutation of the
    training labels (class sizes kept); validation as it was, so its top-1 stays honest."""
    train = sorted((chars / "train").glob("*/*.png"))
    labels = np.random.default_rng(seed).permutation([p.parent.name for p in train])
    for path, label in zip(train, labels):
        _link(path, root / "train" / label / path.name.replace(".png", f"_{path.parent.name}.png"))
    for path in sorted((chars / "val").glob("*/*.png")):
        _link(path, root / path.relative_to(chars))
    return root


def _grid() -> tuple[np.ndarray, np.ndarray]:
    return np.meshgrid(np.arange(IMAGE_SIZE, dtype=np.float64),
                       np.arange(IMAGE_SIZE, dtype=np.float64), indexing="xy")


def _grating(rng: np.random.Generator, degrees: float) -> np.ndarray:
    x, y = _grid()
    theta = np.deg2rad(degrees + rng.uniform(-10, 10))
    period = rng.uniform(3.0, 9.0)
    return np.sin(2 * np.pi * (x * np.cos(theta) + y * np.sin(theta)) / period
                  + rng.uniform(0, 2 * np.pi))


def _smooth_noise(rng: np.random.Generator, cells: int) -> np.ndarray:
    """Random values on a coarse grid, upsampled bilinearly: blobs of size 32/cells."""
    from PIL import Image

    coarse = rng.uniform(-1, 1, (cells, cells)).astype(np.float32)
    return np.asarray(Image.fromarray(coarse, mode="F").resize(
        (IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR), np.float64)


def texture(kind: str, rng: np.random.Generator) -> np.ndarray:
    """One 32x32 uint8 texture of class `kind`, with random phase, scale, contrast, noise."""
    x, y = _grid()
    if kind.startswith("grating_"):
        z = _grating(rng, float(kind.split("_")[1]))
    elif kind == "plaid":
        z = 0.5 * (_grating(rng, 0) + _grating(rng, 90))
    elif kind == "checker":
        size = rng.uniform(3.0, 8.0)
        z = np.where((np.floor((x + rng.uniform(0, size)) / size)
                      + np.floor((y + rng.uniform(0, size)) / size)) % 2, 1.0, -1.0)
    elif kind == "dots":
        step, radius = rng.uniform(5.0, 9.0), rng.uniform(1.0, 2.2)
        dx, dy = (x + rng.uniform(0, step)) % step - step / 2, (y + rng.uniform(0, step)) % step
        z = np.where(dx ** 2 + (dy - step / 2) ** 2 < radius ** 2, 1.0, -1.0)
    elif kind == "rings":
        cx, cy = rng.uniform(0, IMAGE_SIZE, 2)
        z = np.sin(2 * np.pi * np.hypot(x - cx, y - cy) / rng.uniform(3.0, 8.0))
    elif kind == "blobs":
        z = np.sign(_smooth_noise(rng, int(rng.integers(3, 7))))
    elif kind == "noise":
        z = rng.uniform(-1, 1, x.shape)
    else:
        raise ValueError(f"unknown texture {kind!r}; known: {', '.join(TEXTURES)}")
    contrast, level = rng.uniform(60, 127), rng.uniform(-40, 40)
    z = 128 + level + contrast * z + rng.normal(0, rng.uniform(0, 12), z.shape)
    return np.clip(z, 0, 255).astype(np.uint8)


def write_textures(root: Path, *, train_per_class: int = 600, val_per_class: int = 50,
                   seed: int = 0) -> Path:
    """root/{train,val}/<texture>/*.png, seeded per (split, class): deterministic bytes."""
    from PIL import Image

    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for c, kind in enumerate(TEXTURES):
            folder = root / split / kind
            folder.mkdir(parents=True, exist_ok=True)
            rng = np.random.default_rng([seed, split == "val", c])
            for k in range(count):
                Image.fromarray(texture(kind, rng), mode="L").save(folder / f"{k:04d}.png")
    return root
