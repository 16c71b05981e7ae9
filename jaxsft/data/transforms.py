"""Image decoding and torchvision-equivalent preprocessing, as TensorFlow ops.

Each function reproduces one torchvision transform on a PIL image:
- `decode`: `PIL.Image.open(f).convert("RGB")`. JPEGs are decoded with libjpeg's accurate
  integer DCT, which is PIL's, so the pixels are bit-identical; grayscale is replicated into
  three channels and alpha dropped, as `.convert("RGB")` does.
- `eval_view`: `Resize(floor(size / crop_ratio))` + `CenterCrop(size)`: the shorter side is
  resized with antialiased bilinear interpolation (PIL's BILINEAR), the longer one to
  `int(new_short * long / short)`, the result rounded to 8 bits as PIL's is, and the crop
  offset rounded half to even as Python's `round` does.
- `imagenet_window` + `crop_and_resize`: `RandomResizedCrop(size, scale, ratio)`: the same
  ten attempts and the same centre-crop fallback.
- `random_flip`: `RandomHorizontalFlip()`; `pad_and_crop`: `RandomCrop(size, padding=size//8)`.
- `normalize`: `ToTensor()` + `Normalize(IMAGENET_MEAN, IMAGENET_STD)`.
Randomness is stateless: every draw is a function of a `[2]` int64 key, so an example's
augmentation depends on its key alone, never on what ran before (exact resumption).

The lowest module of the TensorFlow side of jaxsft.data: it imports TensorFlow and nothing
of jaxsft.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import tensorflow as tf

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RRC_SCALE = (0.08, 1.0)
RRC_RATIO = (3 / 4, 4 / 3)
_ALG = "philox"  # fixed, so the draws never depend on which device TF picks

Window = Callable[[tf.Tensor], tf.Tensor]  # [height, width] -> [top, left, height, width]


def fold_in(key: tf.Tensor, data: tf.Tensor | int) -> tf.Tensor:
    """A new key from `key` and an integer: how per-epoch and per-example keys are made."""
    return tf.random.experimental.stateless_fold_in(key, tf.cast(data, tf.int64), alg=_ALG)


def _uniform(key: tf.Tensor, n: int, low: float = 0.0, high: float = 1.0) -> tf.Tensor:
    return tf.random.stateless_uniform([n], key, low, high, dtype=tf.float64, alg=_ALG)


def subkeys(key: tf.Tensor, n: int) -> list[tf.Tensor]:
    return tf.unstack(tf.random.experimental.stateless_split(key, n, alg=_ALG))


def decode(encoded: tf.Tensor, window: Window | None = None) -> tf.Tensor:
    """Encoded JPEG/PNG/GIF/BMP/WebP bytes -> uint8 RGB [h, w, 3], cropped to `window`.

    A JPEG with a window decodes only that window (much faster for small crops). Raises
    InvalidArgumentError on bytes that are no decodable image (the caller skips those).
    """

    def jpeg() -> tf.Tensor:
        if window is None:
            return tf.io.decode_jpeg(encoded, channels=3, dct_method="INTEGER_ACCURATE")
        box = window(tf.image.extract_jpeg_shape(encoded)[:2])
        return tf.image.decode_and_crop_jpeg(
            encoded, box, channels=3, dct_method="INTEGER_ACCURATE"
        )

    def other() -> tf.Tensor:
        image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
        return image if window is None else apply_window(image, window(tf.shape(image)[:2]))

    image = tf.cond(tf.io.is_jpeg(encoded), jpeg, other)
    return tf.ensure_shape(image, [None, None, 3])


def apply_window(image: tf.Tensor, box: tf.Tensor) -> tf.Tensor:
    """The crop `box` = [top, left, height, width] of an [h, w, c] image."""
    return tf.slice(image, tf.stack([box[0], box[1], 0]), tf.stack([box[2], box[3], -1]))


def imagenet_window(
    key: tf.Tensor, scale: tuple[float, float] = RRC_SCALE, ratio: tuple[float, float] = RRC_RATIO
) -> Window:
    """torchvision's `RandomResizedCrop.get_params` as a window function of the image shape."""

    def window(shape: tf.Tensor) -> tf.Tensor:
        height, width = tf.cast(shape[0], tf.float64), tf.cast(shape[1], tf.float64)
        k_area, k_ratio, k_top, k_left = subkeys(key, 4)
        attempts = 10
        area = height * width * _uniform(k_area, attempts, scale[0], scale[1])
        aspect = tf.exp(_uniform(k_ratio, attempts, math.log(ratio[0]), math.log(ratio[1])))
        w = tf.round(tf.sqrt(area * aspect))
        h = tf.round(tf.sqrt(area / aspect))
        fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
        top = tf.floor(_uniform(k_top, attempts) * (height - h + 1))
        left = tf.floor(_uniform(k_left, attempts) * (width - w + 1))
        first = tf.argmax(tf.cast(fits, tf.int32))
        found = tf.stack([top[first], left[first], h[first], w[first]])
        return tf.cast(tf.where(tf.reduce_any(fits), found, _fallback(height, width, ratio)),
                       tf.int32)

    return window


def _fallback(height: tf.Tensor, width: tf.Tensor, ratio: tuple[float, float]) -> tf.Tensor:
    """RandomResizedCrop's central crop when ten attempts fail (aspect clamped to `ratio`)."""
    in_ratio = width / height
    w = tf.where(in_ratio < ratio[0], width,
                 tf.where(in_ratio > ratio[1], tf.round(height * ratio[1]), width))
    h = tf.where(in_ratio < ratio[0], tf.round(width / ratio[0]), height)
    return tf.stack([tf.floor((height - h) / 2), tf.floor((width - w) / 2), h, w])


def resize(image: tf.Tensor, height: tf.Tensor | int, width: tf.Tensor | int) -> tf.Tensor:
    """PIL's antialiased bilinear resize, rounded to 8 bits like PIL's output; float32."""
    shape = tf.cast(tf.stack([height, width]), tf.int32)
    out = tf.image.resize(tf.cast(image, tf.float32), shape,
                          method="bilinear", antialias=True)
    return tf.clip_by_value(tf.round(out), 0.0, 255.0)


def crop_and_resize(image: tf.Tensor, size: int) -> tf.Tensor:
    """The already-cropped window resized to [size, size] (RandomResizedCrop's last step)."""
    return tf.ensure_shape(resize(image, size, size), [size, size, 3])


def resize_size(size: int, crop_ratio: float) -> int:
    """The shorter side before the centre crop: floor(size / ratio), as timm and torchvision."""
    return math.floor(size / crop_ratio + 1e-6)


def eval_view(image: tf.Tensor, size: int, crop_ratio: float) -> tf.Tensor:
    """Resize(floor(size / crop_ratio)) + CenterCrop(size), torchvision's arithmetic."""
    short_target = tf.constant(resize_size(size, crop_ratio), tf.int64)
    shape = tf.cast(tf.shape(image)[:2], tf.int64)
    height, width = shape[0], shape[1]
    portrait = width <= height
    new_w = tf.where(portrait, short_target, short_target * width // height)
    new_h = tf.where(portrait, short_target * height // width, short_target)
    resized = resize(image, new_h, new_w)
    top = tf.round(tf.cast(new_h - size, tf.float64) / 2)  # tf.round: half to even
    left = tf.round(tf.cast(new_w - size, tf.float64) / 2)
    box = tf.cast(tf.stack([top, left, size, size]), tf.int32)
    return tf.ensure_shape(apply_window(resized, box), [size, size, 3])


def random_flip(key: tf.Tensor, image: tf.Tensor) -> tf.Tensor:
    """Horizontal flip with probability 1/2."""
    flip = _uniform(key, 1)[0] < 0.5
    return tf.cond(flip, lambda: tf.reverse(image, axis=[1]), lambda: image)


def pad_and_crop(key: tf.Tensor, image: tf.Tensor, size: int) -> tf.Tensor:
    """torchvision's RandomCrop(size, padding=size // 8): zero (black) padding, random crop."""
    pad = max(size // 8, 1)
    padded = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]])
    offsets = tf.cast(tf.floor(_uniform(key, 2) * (2 * pad + 1)), tf.int32)
    box = tf.stack([offsets[0], offsets[1], size, size])
    return tf.ensure_shape(apply_window(padded, box), [size, size, 3])


def normalize(image: tf.Tensor) -> tf.Tensor:
    """0..255 RGB -> ImageNet-normalised float32, ToTensor + Normalize."""
    mean = tf.constant(IMAGENET_MEAN, tf.float32)
    std = tf.constant(IMAGENET_STD, tf.float32)
    return (tf.cast(image, tf.float32) / 255.0 - mean) / std
