"""Real target tasks that ship offline, as image folders with a fixed held-out test set.

- digits: scikit-learn's 1,797 handwritten digits (8x8, upscaled to 32x32 as
  jaxsft/data/digits.py does), 10 classes; 50 images per class are the fixed test set (500),
  the rest (about 130 per class) the pool the labelled subsets are drawn from.
- lfw: scikit-image's LFW subset (`skimage.data.lfw_subset()`: 100 faces, 100 non-faces,
  25x25), 2 classes; 50 per class test, the other 50 per class the pool.
- surfaces: six photographs that ship with scikit-image (brick, grass, gravel, the moon's
  surface, stained tissue, the Hubble deep field), each cut into 100 non-overlapping 50x50
  tiles, 6 classes; every tile's contrast normalised, so that a tile's class is in its
  texture, not in its brightness; 50 per class test, the other 50 per class the pool.

`write_target(name, root, labels_per_class, seed)` writes root/{train,test}/<class>/*.png:
the first `labels_per_class` images of each class in a permutation of the pool seeded by
`seed` (None: the whole pool), and the same test set for every budget and seed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

IMAGE_SIZE = 32
TEST_PER_CLASS = 50
SPLIT_SEED = 1234  # the pool/test split, the same for every budget and seed


def load_digits_target() -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(uint8 images (N, 8, 8), labels (N,), class names): ink bright on black."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.images * (255 / 16)).astype(np.uint8), d.target.astype(int), \
        [f"digit_{k}" for k in range(10)]


def load_lfw_target() -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(uint8 images (200, 25, 25), labels, class names): the first 100 are faces."""
    from skimage.data import lfw_subset  # scikit-image, the dev extra

    images = (lfw_subset() * 255).round().astype(np.uint8)
    return images, np.repeat([0, 1], 100), ["face", "non_face"]


SURFACES = {"brick": "brick.png", "grass": "grass.png", "gravel": "gravel.png",
            "moon": "moon.png", "tissue": "ihc.png", "deep_field": "hubble_deep_field.jpg"}
TILE, GRID = 50, 10  # 50x50-pixel tiles, GRID x GRID of them from each photograph's centre


def normalise_contrast(tile: np.ndarray) -> np.ndarray:
    """uint8 tile at mean 128 and standard deviation 48 (clipped): brightness and contrast
    no longer tell the photographs apart."""
    t = tile.astype(np.float64)
    t = (t - t.mean()) / max(t.std(), 1.0) * 48 + 128
    return np.clip(t, 0, 255).round().astype(np.uint8)


def load_surfaces_target() -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(uint8 tiles (600, 50, 50), labels, class names): 100 tiles of each photograph."""
    from skimage import data, io  # scikit-image, the dev extra
    from skimage.color import rgb2gray

    folder = Path(data.__file__).parent  # the photographs in the wheel: no download
    tiles, labels = [], []
    for k, file in enumerate(SURFACES.values()):
        photo = io.imread(folder / file)
        if photo.ndim == 3:
            photo = (rgb2gray(photo) * 255).round().astype(np.uint8)
        top, left = ((s - GRID * TILE) // 2 for s in photo.shape)
        for r in range(GRID):
            for c in range(GRID):
                y, x = top + r * TILE, left + c * TILE
                tiles.append(normalise_contrast(photo[y:y + TILE, x:x + TILE]))
                labels.append(k)
    return np.stack(tiles), np.array(labels), list(SURFACES)


LOADERS = {"digits": load_digits_target, "lfw": load_lfw_target,
           "surfaces": load_surfaces_target}


def split_pool(labels: np.ndarray) -> tuple[dict[int, np.ndarray], np.ndarray]:
    """({class: pool indices in a fixed order}, test indices): TEST_PER_CLASS of each class
    held out once, by SPLIT_SEED."""
    rng = np.random.default_rng(SPLIT_SEED)
    pool, test = {}, []
    for k in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == k))
        test.append(idx[:TEST_PER_CLASS])
        pool[int(k)] = idx[TEST_PER_CLASS:]
    return pool, np.sort(np.concatenate(test))


def subset(pool: dict[int, np.ndarray], labels_per_class: int | None, seed: int) -> np.ndarray:
    """The labelled training indices: per class, the first `labels_per_class` of a permutation
    of its pool seeded by (seed, class); None takes the whole pool."""
    chosen = []
    for k, idx in pool.items():
        order = np.random.default_rng([seed, k]).permutation(idx)
        chosen.append(order if labels_per_class is None else order[:labels_per_class])
    return np.sort(np.concatenate(chosen))


def write_target(name: str, root: str | Path, labels_per_class: int | None,
                 seed: int) -> Path:
    """root/{train,test}/<class>/<index>.png for one budget and seed; returns root."""
    from PIL import Image

    images, labels, classes = LOADERS[name]()
    pool, test = split_pool(labels)
    root = Path(root)
    for split, indices in (("train", subset(pool, labels_per_class, seed)), ("test", test)):
        for i in indices:
            folder = root / split / classes[labels[i]]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i], mode="L").resize(
                (IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR).save(folder / f"{i:04d}.png")
    return root
