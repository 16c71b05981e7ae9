"""tf.data pipelines: records of one process's shard -> decoded, augmented, batched examples.

The top of the TensorFlow side of jaxsft.data: it imports sources, transforms and types,
and only jaxsft.data's API imports it (after `runtime.tensorflow()` hid the GPUs).

Every element carries "ok" (False for an image that could not be read or decoded: it is
replaced by a black image, and the caller masks it out and counts it) and "id" (to name it).
Decoding runs inside a guard: each record is decoded in a one-element dataset whose errors
are ignored, followed by a fallback element, of which the first is taken. So a corrupt file
costs one masked example, never the run, and the batch structure (hence exact resumption)
does not depend on which files are corrupt.

Train epochs are exactly reproducible: the shard's records come in an order keyed by
(seed, process, epoch) (a permutation of a folder's files; a TFDS split's fixed order, which
TFDS shuffled when it prepared the data), pass a shuffle buffer seeded the same way (the
whole shard when it fits in --shuffle-buffer, or with --cache), are skipped to the resume
point *before* decoding (cheap), and each example's augmentation is keyed by (seed, process,
epoch, index). No state carries from one epoch to the next.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import tensorflow as tf

import jaxsft.data.transforms as T
from jaxsft.config import DataConfig
from jaxsft.data.sources import Source
from jaxsft.data.types import DataError

AUTOTUNE = tf.data.AUTOTUNE


@dataclasses.dataclass(frozen=True)
class Shard:
    """Which part of which split this process reads, and how it batches it."""

    split: str
    process_index: int
    process_count: int
    local_batch: int


def _options() -> tf.data.Options:
    options = tf.data.Options()
    options.deterministic = True
    options.threading.max_intra_op_parallelism = 1  # parallel over examples, not inside ops
    return options


def _read(record: dict) -> tf.Tensor:
    return tf.io.read_file(record["path"]) if "path" in record else record["data"]


def _guarded_map(
    ds: tf.data.Dataset, decode: Callable[[dict], tf.Tensor], finish: Callable[[dict], dict]
) -> tf.data.Dataset:
    """ds.map(decode then finish) in parallel, order kept; a decode error gives ok=False."""

    def meta(record: dict) -> dict:
        return {k: record[k] for k in ("label", "id", "index", "key") if k in record}

    @tf.autograph.experimental.do_not_convert
    def decoded(record: dict) -> dict:
        return {**meta(record), "image": decode(record), "ok": tf.constant(True)}

    @tf.autograph.experimental.do_not_convert
    def failed(record: dict) -> dict:
        return {**meta(record), "image": tf.zeros([1, 1, 3], tf.uint8), "ok": tf.constant(False)}

    @tf.autograph.experimental.do_not_convert
    def one(record: dict) -> tf.data.Dataset:
        single = tf.data.Dataset.from_tensors(record)
        good = single.map(decoded).ignore_errors()
        return good.concatenate(single.map(failed)).take(1).map(finish)

    return ds.interleave(one, block_length=1, num_parallel_calls=AUTOTUNE, deterministic=True)


def _finish_fn(cfg: DataConfig, train: bool, cropped: bool) -> Callable[[dict], dict]:
    """Decoded uint8 image -> the model's float32 input: augmentation, resize, normalise."""
    size, ratio = cfg.image_size, cfg.crop_ratio
    augment = cfg.augment if train else "none"

    @tf.autograph.experimental.do_not_convert
    def finish(ex: dict) -> dict:
        image = ex["image"]
        if augment == "imagenet":
            crop_key, flip_key = T.subkeys(ex["key"], 2)
            if not cropped:
                image = T.apply_window(image, T.imagenet_window(crop_key)(tf.shape(image)[:2]))
            image = T.random_flip(flip_key, T.crop_and_resize(image, size))
        elif augment == "light":
            crop_key, flip_key = T.subkeys(ex["key"], 2)
            view = T.eval_view(image, size, ratio)
            image = T.random_flip(flip_key, T.pad_and_crop(crop_key, view, size))
        else:
            image = T.eval_view(image, size, ratio)
        image = T.normalize(image) * tf.cast(ex["ok"], tf.float32)
        return {"image": image, "label": tf.cast(ex["label"], tf.int32), "ok": ex["ok"],
                "id": ex["id"]}

    return finish


def _decode_fn(cfg: DataConfig, crop: bool) -> Callable[[dict], tf.Tensor]:
    """Record -> uint8 image; with `crop`, only the RandomResizedCrop window (fast for JPEG)."""

    def decode(record: dict) -> tf.Tensor:
        if not crop:
            return T.decode(_read(record))
        crop_key = T.subkeys(record["key"], 2)[0]
        return T.decode(_read(record), T.imagenet_window(crop_key))

    return decode


def train_stream(
    source: Source, cfg: DataConfig, shard: Shard, *, seed: int, start_step: int,
    steps_per_epoch: int,
) -> tf.data.Dataset:
    """Batches start_step, start_step+1, ... of this process's shard, epoch after epoch.

    One pipeline for all epochs: `range(epochs).flat_map(epoch)`, so epoch boundaries cost
    nothing. Epoch e reads its records in an order keyed by (seed, process, e), passes a
    shuffle buffer seeded the same way, and takes steps_per_epoch full batches (the rest is
    dropped); the first epoch first skips the batches before start_step, before decoding.
    """
    b, spe = shard.local_batch, steps_per_epoch
    start_epoch, skip = divmod(start_step, spe)
    read = source.reader(shard.split, shard.process_index, shard.process_count)
    n = source.shard_sizes(shard.split, shard.process_count)[shard.process_index]
    run_key = tf.constant([seed, shard.process_index], tf.int64)
    cached = _decoded(read(None)).cache() if cfg.cache else None

    @tf.autograph.experimental.do_not_convert
    def epoch_records(epoch: tf.Tensor) -> tf.data.Dataset:
        order_key, buffer_key, augment_key = T.subkeys(T.fold_in(run_key, epoch), 3)
        buffer_seed = tf.random.stateless_uniform(
            [], buffer_key, minval=None, maxval=None, dtype=tf.int64, alg="philox")
        if cached is not None:  # decoded once, in memory: a full shuffle is cheap
            records = cached.shuffle(n, seed=buffer_seed, reshuffle_each_iteration=False)
        else:
            records = read(order_key).shuffle(max(1, min(cfg.shuffle_buffer, n)),
                                              seed=buffer_seed, reshuffle_each_iteration=False)
        first = tf.where(epoch == start_epoch, tf.constant(skip * b, tf.int64), 0)
        records = records.skip(first).take(spe * b - first)
        return records.map(lambda r: {**r, "key": T.fold_in(augment_key, r["index"])})

    records = tf.data.Dataset.range(start_epoch, 2**62).flat_map(epoch_records)
    if cached is not None:
        examples = records.map(_finish_fn(cfg, train=True, cropped=False),
                               num_parallel_calls=AUTOTUNE, deterministic=True)
    else:
        crop = cfg.augment == "imagenet"
        examples = _guarded_map(records, _decode_fn(cfg, crop),
                                _finish_fn(cfg, train=True, cropped=crop))
    return examples.batch(b, drop_remainder=True).prefetch(AUTOTUNE).with_options(_options())


def _decoded(records: tf.data.Dataset) -> tf.data.Dataset:
    """Records with their full decoded image (uint8) and "ok", for caching."""
    return _guarded_map(records, lambda r: T.decode(_read(r)), lambda ex: ex)


def eval_pass(source: Source, cfg: DataConfig, shard: Shard) -> tf.data.Dataset:
    """One pass over this process's part of the eval split, in order; last batch partial."""
    records = source.reader(shard.split, shard.process_index, shard.process_count)(None)
    examples = _guarded_map(records, _decode_fn(cfg, crop=False),
                            _finish_fn(cfg, train=False, cropped=False))
    return examples.batch(shard.local_batch).prefetch(AUTOTUNE).with_options(_options())


def preprocess_file(path: str, cfg: DataConfig) -> np.ndarray:
    """One image file with the eval preprocessing, float32 [size, size, 3]."""
    try:
        image = T.decode(tf.io.read_file(path))
        return T.normalize(T.eval_view(image, cfg.image_size, cfg.crop_ratio)).numpy()
    except tf.errors.OpError as e:
        raise DataError(f"cannot read image {path}: {e.message.splitlines()[0]}") from None
