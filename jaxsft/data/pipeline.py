"""tf.data pipelines: a process's part of each batch -> decoded, augmented, batched examples.

The top of the TensorFlow side of jaxsft.data: it imports sampler, sources, transforms and types,
and only jaxsft.data's API imports it (after `runtime.tensorflow()` hid the GPUs).

Every element carries "ok" (False for an image that could not be read or decoded: it is
replaced by a black image, and the caller masks it out and counts it) and "id" (to name it).
Decoding runs inside a guard: each record is decoded in a one-element dataset whose errors
are ignored, followed by a fallback element, of which the first is taken. So a corrupt file
costs one masked example, never the run, and the batch structure (hence exact resumption)
does not depend on which files are corrupt.

Training batches follow the index sampler (jaxsft.data.sampler) over the source's random
access, or, for a split without it, a seeded shuffle buffer that every process fills alike
(`_streamed`); either way a process keeps its slice of every global batch, and each
example's augmentation is keyed by (seed, epoch, its index in the split). The contract is
in jaxsft.data's docstring.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import tensorflow as tf

import jaxsft.data.transforms as T
from jaxsft.config import DataConfig
from jaxsft.data.sampler import IndexSampler
from jaxsft.data.sources import RandomAccess, Sequential, Source, table_lookup
from jaxsft.data.types import DataError

AUTOTUNE = tf.data.AUTOTUNE


@dataclasses.dataclass(frozen=True)
class Shard:
    """A split, this process of how many, and its batch: in training its slice of every
    global batch, in evaluation its contiguous part of the split."""

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
        elif augment in ("light", "shift"):
            crop_key, flip_key = T.subkeys(ex["key"], 2)
            image = T.pad_and_crop(crop_key, T.eval_view(image, size, ratio), size)
            if augment == "light":
                image = T.random_flip(flip_key, image)
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
    """This process's part of global batches start_step, start_step+1, ..., epoch after epoch.

    Random-access sources follow the index sampler (jaxsft.data.sampler): nothing is read for
    the steps before start_step. Sequential ones are shuffled in a buffer seeded by (seed,
    epoch) that every process fills alike, then batched globally and sliced (_streamed).
    Either way each example's augmentation is keyed by (seed, epoch, its index in the split),
    never by the process, and the global batch does not depend on the cluster's shape.
    """
    access = source.train_access(shard.split)
    if cfg.cache:
        access = _cached(access)
    if isinstance(access, Sequential):
        records = _streamed(access, cfg, shard, seed, start_step, steps_per_epoch)
    else:
        records = _sampled(access, cfg, shard, seed, start_step)
    run_key = tf.constant([seed, 0], tf.int64)
    records = records.map(lambda r: {**r, "key": T.fold_in(T.fold_in(run_key, r["epoch"]),
                                                               r["index"])})
    if isinstance(access, RandomAccess) and access.pixels is not None:
        finish = _finish_fn(cfg, train=True, cropped=False)
        with_image = _cached_image(access.pixels)
        examples = records.map(lambda r: finish(with_image(r)), num_parallel_calls=AUTOTUNE,
                               deterministic=True)
    else:
        crop = cfg.augment == "imagenet"
        examples = _guarded_map(records, _decode_fn(cfg, crop),
                                _finish_fn(cfg, train=True, cropped=crop))
    return (examples.batch(shard.local_batch, drop_remainder=True).prefetch(AUTOTUNE)
            .with_options(_options()))


def _sampled(
    access: RandomAccess, cfg: DataConfig, shard: Shard, seed: int, start_step: int
) -> tf.data.Dataset:
    """Records of the sampler's local batches, one example at a time, with epoch and index."""
    sampler = IndexSampler(access.size, cfg.batch_size, seed)
    b = shard.local_batch

    def steps():
        for epoch, indices in sampler.local_batches(start_step, shard.process_index,
                                                    shard.process_count):
            yield np.full(b, epoch, np.int64), indices

    spec = tf.TensorSpec([b], tf.int64)
    batches = tf.data.Dataset.from_generator(steps, output_signature=(spec, spec))
    return batches.map(lambda epoch, index: {**access.lookup(index), "epoch": epoch,
                                             "index": index},
                       num_parallel_calls=AUTOTUNE, deterministic=True).unbatch()


def _streamed(
    access: Sequential, cfg: DataConfig, shard: Shard, seed: int, start_step: int,
    steps_per_epoch: int,
) -> tf.data.Dataset:
    """Without random access: each epoch, every process reads the whole split in its fixed
    order through the same seeded shuffle buffer, batches it globally and keeps its slice.
    Resuming skips the batches before start_step after the buffer (read, not decoded)."""
    size, spe, b = cfg.batch_size, steps_per_epoch, shard.local_batch
    first = shard.process_index * b
    start_epoch, skip = divmod(start_step, spe)
    buffer = max(1, min(cfg.shuffle_buffer, access.size))
    buffer_root = tf.constant([seed, 1], tf.int64)

    @tf.autograph.experimental.do_not_convert
    def epoch_records(epoch: tf.Tensor) -> tf.data.Dataset:
        buffer_seed = tf.random.stateless_uniform(
            [], T.fold_in(buffer_root, epoch), minval=None, maxval=None, dtype=tf.int64,
            alg="philox")
        batches = (access.records().shuffle(buffer, seed=buffer_seed,
                                            reshuffle_each_iteration=False)
                   .batch(size, drop_remainder=True).take(spe))
        batches = batches.skip(tf.where(epoch == start_epoch, tf.constant(skip, tf.int64), 0))
        part = batches.map(lambda r: {k: v[first:first + b] for k, v in r.items()})
        return part.unbatch().map(lambda r: {**r, "epoch": epoch})

    return tf.data.Dataset.range(start_epoch, 2**62).flat_map(epoch_records)


def _decoded(records: tf.data.Dataset) -> tf.data.Dataset:
    """Records with their full decoded image (uint8) and "ok", for caching."""
    return _guarded_map(records, lambda r: T.decode(_read(r)), lambda ex: ex)


def _cached(access: RandomAccess | Sequential) -> RandomAccess:
    """--cache: every example of the split decoded once, its pixels kept in memory (one
    flat uint8 array), then read by index like any random-access source."""
    if isinstance(access, Sequential):
        records = access.records()
    else:
        records = (tf.data.Dataset.range(access.size).batch(256)
                   .map(lambda i: {**access.lookup(i), "index": i}).unbatch())
    images: list = [None] * access.size
    columns: dict[str, list] = {"label": [None] * access.size, "id": [None] * access.size,
                                "ok": [None] * access.size}
    for ex in _decoded(records).with_options(_options()).as_numpy_iterator():
        images[ex["index"]] = ex["image"]
        for k, column in columns.items():
            column[ex["index"]] = ex[k]
    shapes = np.array([im.shape for im in images], np.int64)
    ends = np.cumsum(shapes.prod(1))
    table = {"offset": ends - shapes.prod(1), "shape": shapes,
             "label": np.array(columns["label"], np.int64),
             "id": np.array(columns["id"], object), "ok": np.array(columns["ok"], bool)}
    pixels = tf.constant(np.concatenate([im.ravel() for im in images]))
    return RandomAccess(access.size, table_lookup(table), pixels=pixels)


def _cached_image(pixels: tf.Tensor) -> Callable[[dict], dict]:
    """A cached record (offset and shape of its pixels) -> the record with its "image"."""

    def with_image(record: dict) -> dict:
        begin, shape = record["offset"], record["shape"]
        image = tf.reshape(pixels[begin:begin + tf.reduce_prod(shape)], shape)
        return {**record, "image": tf.ensure_shape(image, [None, None, 3])}

    return with_image


def eval_pass(source: Source, cfg: DataConfig, shard: Shard) -> tf.data.Dataset:
    """One pass over this process's part of the eval split, in order; last batch partial."""
    records = source.reader(shard.split, shard.process_index, shard.process_count)
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
