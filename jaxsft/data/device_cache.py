"""A decoded-once image cache and torchvision's training augmentation on the device, in JAX.

For data sets that fit in memory after decoding: each image is decoded once, resized to a
fixed `stored` x `stored` square of uint8 (the whole image, aspect ratio not kept) and kept
with its original (height, width), in host memory (numpy) or on the device. Every training
batch is then made on the accelerator: gather the batch's images, RandomResizedCrop(size,
scale=(0.08, 1), ratio=(3/4, 4/3)) with torchvision's sampling (ten attempts, then the
centre-crop fallback, vectorised), horizontal flip with probability 1/2, and ImageNet
normalisation, in one jitted function. No JPEG decoding, no host CPU work per step.

Geometry. The crop window is drawn in the *original* image's pixel coordinates, exactly as
`RandomResizedCrop.get_params` draws it (so the crop area and aspect statistics are
torchvision's), then mapped into the stored square by the per-axis scale stored / original,
and resampled to size x size with PIL's antialiased bilinear (triangle) filter. Because the
crop is resized to a square anyway, the anisotropic stored square loses no field of view; what
it loses is resolution on the longer axis, for crops smaller than stored / size of it (choose
`stored` larger to keep more: 256 for 224 keeps a full-image crop at 1.14x oversampling).
`eval_batch` makes the eval view (Resize(size / crop_ratio) + CenterCrop(size)) the same way,
as one resampling of the stored square.

Randomness is stateless: example i of global step s draws from
`fold_in(fold_in(key(seed), s), i)`, i its index in the data set, so a batch depends on
(seed, step, its examples) only: resuming at step k gives exactly the batches of an
uninterrupted run, and the global batch (its indices from `jaxsft.data.sampler`) is the same
however many devices or processes compute it. The draws are JAX's, not TensorFlow's Philox:
the distribution is the tf.data path's, the individual crops are not.

No TensorFlow: numpy, PIL (to build the cache) and JAX only.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Iterable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# The same constants as jaxsft.data.transforms (which imports TensorFlow, so they are not
# imported from there; tests/test_device_cache.py checks that they agree).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RRC_SCALE = (0.08, 1.0)
RRC_RATIO = (3 / 4, 4 / 3)
ATTEMPTS = 10


@dataclasses.dataclass(frozen=True)
class ImageCache:
    """Decoded images as uint8 squares, their original sizes and labels."""

    images: Any  # uint8 [N, stored, stored, 3]: numpy (host memory) or jax.Array (device)
    sizes: Any  # int32 [N, 2]: original (height, width)
    labels: Any  # int32 [N]

    @property
    def stored(self) -> int:
        return int(self.images.shape[1])

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def on_device(self) -> bool:
        return isinstance(self.images, jax.Array)


def stored_size(size: int, oversample: float = 8 / 7) -> int:
    """The stored square's side for crops of `size`: size * 8/7 (256 for 224), the shorter
    side torchvision's eval view resizes to."""
    return int(round(size * oversample))


def to_square(image: np.ndarray, stored: int) -> np.ndarray:
    """One decoded uint8 [h, w, 3] image resized (PIL bilinear, antialiased) to a square."""
    from PIL import Image

    if image.shape[:2] == (stored, stored):
        return np.ascontiguousarray(image, dtype=np.uint8)
    resized = Image.fromarray(image).resize((stored, stored), Image.Resampling.BILINEAR)
    return np.asarray(resized, dtype=np.uint8)


def build_cache(images: Iterable[np.ndarray], labels: Iterable[int], stored: int,
                device: jax.Device | None = None) -> ImageCache:
    """The cache of decoded uint8 RGB images [h, w, 3]: in host memory, or on `device`."""
    squares, sizes = [], []
    for image in images:
        sizes.append(image.shape[:2])
        squares.append(to_square(image, stored))
    cache = ImageCache(np.stack(squares), np.asarray(sizes, np.int32),
                       np.asarray(list(labels), np.int32))
    if len(cache.labels) != len(cache):
        raise ValueError(f"{len(cache)} images but {len(cache.labels)} labels")
    return to_device(cache, device) if device is not None else cache


def to_device(cache: ImageCache, device: jax.Device | Any) -> ImageCache:
    """The cache placed on a device (or a sharding): images, sizes and labels."""
    return ImageCache(*(jax.device_put(np.asarray(a), device)
                        for a in (cache.images, cache.sizes, cache.labels)))


# ------------------------------------------------------------------------- sampling


def crop_window(key: jax.Array, height: jax.Array, width: jax.Array,
                scale: tuple[float, float] = RRC_SCALE,
                ratio: tuple[float, float] = RRC_RATIO) -> jax.Array:
    """torchvision's `RandomResizedCrop.get_params` for one image: float32 [top, left, h, w]
    in its pixels; ten attempts drawn at once, the first that fits wins, else the centre
    crop with the aspect clamped to `ratio`."""
    k_area, k_ratio, k_top, k_left = jax.random.split(key, 4)
    height, width = height.astype(jnp.float32), width.astype(jnp.float32)
    area = height * width * jax.random.uniform(k_area, (ATTEMPTS,), minval=scale[0],
                                               maxval=scale[1])
    aspect = jnp.exp(jax.random.uniform(k_ratio, (ATTEMPTS,), minval=math.log(ratio[0]),
                                        maxval=math.log(ratio[1])))
    w = jnp.round(jnp.sqrt(area * aspect))
    h = jnp.round(jnp.sqrt(area / aspect))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    top = jnp.floor(jax.random.uniform(k_top, (ATTEMPTS,)) * (height - h + 1))
    left = jnp.floor(jax.random.uniform(k_left, (ATTEMPTS,)) * (width - w + 1))
    first = jnp.argmax(fits)
    found = jnp.stack([top[first], left[first], h[first], w[first]])
    in_ratio = width / height
    fw = jnp.where(in_ratio > ratio[1], jnp.round(height * ratio[1]), width)
    fh = jnp.where(in_ratio < ratio[0], jnp.round(width / ratio[0]), height)
    fallback = jnp.stack([jnp.floor((height - fh) / 2), jnp.floor((width - fw) / 2), fh, fw])
    return jnp.where(jnp.any(fits), found, fallback)


def centre_window(height: jax.Array, width: jax.Array, size: int,
                  crop_ratio: float) -> jax.Array:
    """Resize(floor(size / crop_ratio)) + CenterCrop(size) as a window [top, left, h, w] in
    the original image's pixels (torchvision's integer sizes, offsets rounded half to even)."""
    short = math.floor(size / crop_ratio + 1e-6)
    portrait = width <= height
    new_w = jnp.where(portrait, short, short * width // height)
    new_h = jnp.where(portrait, short * height // width, short)
    top = jnp.round((new_h - size) / 2)
    left = jnp.round((new_w - size) / 2)
    sy, sx = height / new_h, width / new_w  # original pixels per resized pixel
    return jnp.stack([top * sy, left * sx, size * sy, size * sx]).astype(jnp.float32)


# ------------------------------------------------------------------------- resampling


def _taps(start: jax.Array, length: jax.Array, out: int, stored: int,
          k: int) -> tuple[jax.Array, jax.Array]:
    """PIL's antialiased bilinear filter along one axis: for each of `out` output pixels, the
    `k` stored pixels it reads and their weights (window [start, start + length) in stored
    pixels; pixels outside it or the image weigh 0)."""
    scale = length / out
    support = jnp.maximum(scale, 1.0)
    centre = start + (jnp.arange(out, dtype=jnp.float32) + 0.5) * scale
    first = jnp.floor(centre - support + 0.5)
    idx = first[:, None] + jnp.arange(k, dtype=jnp.float32)
    weight = jnp.maximum(0.0, 1.0 - jnp.abs(idx + 0.5 - centre[:, None]) / support)
    lo = jnp.maximum(jnp.floor(start), 0.0)
    hi = jnp.minimum(jnp.ceil(start + length), stored)
    weight = jnp.where((idx >= lo) & (idx < hi), weight, 0.0)
    weight = weight / jnp.maximum(weight.sum(axis=1, keepdims=True), 1e-12)
    return jnp.clip(idx, 0, stored - 1).astype(jnp.int32), weight


def resample(image: jax.Array, window: jax.Array, original: jax.Array, size: int,
             flip: jax.Array | bool = False) -> jax.Array:
    """The `window` [top, left, h, w] of the original image (pixels; `original` = its
    [height, width]), read from its stored uint8 square and resized to [size, size, 3]
    float32 in 0..255, rounded as PIL's 8-bit output; mirrored left-right when `flip`."""
    stored = image.shape[0]
    per_px = stored / original.astype(jnp.float32)  # stored pixels per original pixel
    k = math.ceil(2 * max(stored / size, 1.0)) + 1  # taps at the largest downscale
    rows, wy = _taps(window[0] * per_px[0], window[2] * per_px[0], size, stored, k)
    cols, wx = _taps(window[1] * per_px[1], window[3] * per_px[1], size, stored, k)
    cols = jnp.where(flip, cols[::-1], cols)
    wx = jnp.where(flip, wx[::-1], wx)
    # Both passes gather whole rows along the leading axis (contiguous copies; ~15% faster
    # on XLA:CPU than gathering columns), the first pass's output laid out for the second.
    x = jnp.take(image, rows, axis=0, mode="clip").astype(jnp.float32)  # [size, k, stored, 3]
    x = jnp.einsum("okwc,ok->wco", x, wy)  # [stored, 3, size]
    x = jnp.take(x, cols, axis=0, mode="clip")  # [size, k, 3, size]
    x = jnp.einsum("pkco,pk->opc", x, wx)  # [size, size, 3]
    return jnp.clip(jnp.round(x), 0.0, 255.0)


def normalize(x: jax.Array, dtype: Any = jnp.float32) -> jax.Array:
    """0..255 RGB -> ImageNet-normalised (ToTensor + Normalize), in `dtype`."""
    mean = jnp.asarray(IMAGENET_MEAN, jnp.float32)
    std = jnp.asarray(IMAGENET_STD, jnp.float32)
    return ((x / 255.0 - mean) / std).astype(dtype)


# ------------------------------------------------------------------------- batches


def example_keys(seed: int | jax.Array, step: int | jax.Array, indices: jax.Array) -> jax.Array:
    """One key per example: fold_in(fold_in(key(seed), step), index in the data set)."""
    base = jax.random.fold_in(jax.random.key(seed), step)
    return jax.vmap(lambda i: jax.random.fold_in(base, i))(indices)


def augment(images: jax.Array, sizes: jax.Array, keys: jax.Array, size: int,
            dtype: Any = jnp.float32) -> jax.Array:
    """RandomResizedCrop + horizontal flip + normalisation of a batch of stored squares."""

    def one(image, original, key):
        k_crop, k_flip = jax.random.split(key)
        window = crop_window(k_crop, original[0], original[1])
        flip = jax.random.uniform(k_flip) < 0.5
        return resample(image, window, original, size, flip)

    return normalize(jax.vmap(one)(images, sizes, keys), dtype)


@functools.partial(jax.jit, static_argnames=("size", "dtype", "gather"))
def _train_batch(images, sizes, labels, indices, seed, step, size, dtype, gather):
    if gather:  # the whole cache is on the device: take the batch's examples there
        images, sizes, labels = images[indices], sizes[indices], labels[indices]
    keys = example_keys(seed, step, indices)
    return {"image": augment(images, sizes, keys, size, dtype), "label": labels}


def train_batch(cache: ImageCache, indices: np.ndarray, step: int, seed: int, size: int,
                dtype: Any = jnp.float32) -> dict[str, jax.Array]:
    """The augmented batch of examples `indices` (their indices in the data set) at `step`:
    {"image": [B, size, size, 3] normalised `dtype`, "label": int32 [B]}. A cache on the
    device is gathered there; a host cache is gathered in numpy and sent as uint8."""
    indices = np.asarray(indices, np.int32)
    if cache.on_device:
        return _train_batch(cache.images, cache.sizes, cache.labels, indices, seed, step,
                            size, jnp.dtype(dtype), True)
    return _train_batch(cache.images[indices], cache.sizes[indices], cache.labels[indices],
                        indices, seed, step, size, jnp.dtype(dtype), False)


@functools.partial(jax.jit, static_argnames=("size", "crop_ratio", "dtype"))
def _eval_batch(images, sizes, size, crop_ratio, dtype):
    def one(image, original):
        window = centre_window(original[0], original[1], size, crop_ratio)
        return resample(image, window, original, size)

    return normalize(jax.vmap(one)(images, sizes), dtype)


def eval_batch(cache: ImageCache, indices: np.ndarray, size: int, crop_ratio: float = 0.875,
               dtype: Any = jnp.float32) -> jax.Array:
    """Resize(floor(size / crop_ratio)) + CenterCrop(size) + normalisation of `indices`."""
    indices = np.asarray(indices, np.int32)
    images, sizes = cache.images[indices], cache.sizes[indices]
    return _eval_batch(images, sizes, size, crop_ratio, jnp.dtype(dtype))


def train_batches(cache: ImageCache, global_batch: int, seed: int, size: int,
                  start_step: int = 0, dtype: Any = jnp.float32) -> Iterator[dict[str, Any]]:
    """Global batches start_step, start_step + 1, ... forever, their examples chosen by
    jaxsft.data.sampler (the tf.data path's permutation), augmented on the device."""
    from jaxsft.data.sampler import IndexSampler

    sampler = IndexSampler(len(cache), global_batch, seed)
    step = start_step
    while True:
        yield train_batch(cache, sampler.global_batch_indices(step), step, seed, size, dtype)
        step += 1
