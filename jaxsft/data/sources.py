"""Data-set sources: a TFDS builder or a local folder, behind one small interface.

The TensorFlow side of jaxsft.data: imports types, folder and digits below it, never the
package's API (jaxsft.data), which imports this module when it first reads data.

A source says what the data set is (`info`), how large each process's part of a split is
(`shard_sizes`), and streams one part as records {"data" or "path", "label", "id", "index"}
(`reader`): a function, usable inside a tf.data graph, from an order key to the records in
an order that depends on that key alone (a folder's files are permuted by it; a TFDS split
is read in its fixed, already shuffled file order whatever the key). The pipeline
(jaxsft.data.pipeline) turns records into batches the same way for both sources. `id`
names an example in messages (a TFDS id or a file path); `index` is its position in the
shard, a key of its augmentation.
"""

from __future__ import annotations

import difflib
import types
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

import jaxsft.data.folder as folder_lib
from jaxsft.config import DataConfig
from jaxsft.data.types import DataError, DatasetInfo

EVAL_SPLIT_ORDER = ("validation", "val", "test")


Reader = Callable[[tf.Tensor | None], tf.data.Dataset]  # order key (None: fixed) -> records


class Source(Protocol):
    info: DatasetInfo

    def shard_sizes(self, split: str, process_count: int) -> list[int]: ...

    def reader(self, split: str, process_index: int, process_count: int) -> Reader: ...


def open_source(cfg: DataConfig) -> Source:
    """The source `cfg.dataset` names; every user mistake is one DataError.

    `folder:ROOT` and paths (`/abs`, `~/x`, `./rel`) are image folders; any other name is a
    TFDS data set (or `digits`), or else a relative directory, as ImageFolder(root) takes it.
    """
    root = folder_lib.folder_root(cfg.dataset)
    if root is not None:
        return FolderSource(cfg, root)
    try:
        builder = _builder(cfg)
    except DataError:
        if Path(cfg.dataset).is_dir():
            return FolderSource(cfg, cfg.dataset)
        raise
    return TfdsSource(cfg, builder)


def resolve_eval_split(cfg: DataConfig, available: list[str], dataset: str) -> str | None:
    """cfg.eval_split, or the first of validation/val/test the data set has; 'none' = None."""
    if cfg.eval_split is not None:
        return None if cfg.eval_split.lower() == "none" else cfg.eval_split
    return next((s for s in EVAL_SPLIT_ORDER if s in available), None)


def _nonempty(n: int, split: str, dataset: str) -> int:
    if n <= 0:
        raise DataError(f"split {split!r} of {dataset} has no examples; choose another split")
    return n


# ---------------------------------------------------------------------- TFDS


class TfdsSource:
    """Any TFDS image-classification data set (and the built-in `digits`)."""

    def __init__(self, cfg: DataConfig, builder: tfds.core.DatasetBuilder):
        self.builder = builder
        _prepare(self.builder)
        features = self.builder.info.features
        self.image_key = _feature_key(features, cfg.image_key, tfds.features.Image, "image")
        self.label_key = _feature_key(features, cfg.label_key, tfds.features.ClassLabel, "label")
        available = list(self.builder.info.splits.keys())
        eval_split = resolve_eval_split(cfg, available, cfg.dataset)
        self.info = DatasetInfo(
            name=cfg.dataset,
            num_classes=features[self.label_key].num_classes,
            class_names=tuple(features[self.label_key].names),
            train_examples=self._size(cfg.train_split),
            eval_examples=None if eval_split is None else self._size(eval_split),
            eval_split=eval_split,
            image_key=self.image_key,
            label_key=self.label_key,
        )

    def _size(self, split: str | tfds.core.ReadInstruction) -> int:
        try:
            n = self.builder.info.splits[split].num_examples
        except (KeyError, ValueError, AssertionError) as e:
            raise DataError(
                f"split {split!r} of {self.builder.name}: {e}; available splits: "
                f"{', '.join(self.builder.info.splits.keys())} (TFDS syntax: train[:90%])"
            ) from None
        return _nonempty(n, str(split), self.builder.name)

    def shard_sizes(self, split: str, process_count: int) -> list[int]:
        return [self.builder.info.splits[s].num_examples
                for s in tfds.even_splits(split, n=process_count)]

    def reader(self, split: str, process_index: int, process_count: int) -> Reader:
        shard = tfds.even_splits(split, n=process_count)[process_index]
        read_config = tfds.ReadConfig(add_tfds_id=True, try_autocache=False, skip_prefetch=True)
        decoders = tfds.decode.PartialDecoding(
            {self.image_key: True, self.label_key: True},
            decoders={self.image_key: tfds.decode.SkipDecoding()},
        )
        ds = self.builder.as_dataset(
            split=shard, shuffle_files=False, decoders=decoders, read_config=read_config
        )
        image_key, label_key = self.image_key, self.label_key

        def record(index: tf.Tensor, ex: dict) -> dict:
            return {"data": ex[image_key], "label": ex[label_key], "id": ex["tfds_id"],
                    "index": index}

        records = ds.enumerate().map(record)
        return lambda order_key: records


DATASET_FORMS = ("give a TFDS name (see tfds.list_builders()), a directory of images "
                 "(/path/to/images or folder:/path/to/images) or the built-in 'digits'")


def _builder(cfg: DataConfig) -> tfds.core.DatasetBuilder:
    if cfg.dataset == "digits":
        from jaxsft.data.digits import Digits

        return Digits(data_dir=cfg.data_dir)
    try:
        return tfds.builder(cfg.dataset, data_dir=cfg.data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        # Community data sets left out: listing them reads gs://, whose failed log-in logs
        # "All attempts to get a Google authentication bearer token failed" offline.
        names = tfds.list_builders(with_community_datasets=False)
        close = difflib.get_close_matches(cfg.dataset, names, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise DataError(f"unknown data set {cfg.dataset!r}{hint}: {DATASET_FORMS}") from None
    except (ValueError, AssertionError) as e:  # a bad version or config in the name
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"data set {cfg.dataset!r}: {first} {DATASET_FORMS}") from None


def _prepare(builder: tfds.core.DatasetBuilder) -> None:
    """Downloads and prepares the data set if it is not yet, or names the fix."""
    if builder.is_prepared():
        return
    name, root = builder.name, builder.data_dir_root
    manual_dir = root / "downloads" / "manual"
    if builder.MANUAL_DOWNLOAD_INSTRUCTIONS and not (manual_dir.exists() and any(
            manual_dir.iterdir())):
        raise DataError(
            f"{name} is not prepared in {root} and TFDS cannot download it: download it by "
            f"hand into {manual_dir} ({' '.join(builder.MANUAL_DOWNLOAD_INSTRUCTIONS.split())})"
            f", then run again, or give --data-dir where {name} is already prepared"
        )
    try:
        builder.download_and_prepare()
    except Exception as e:  # noqa: BLE001 - downloads fail in many ways; all mean one thing
        raise DataError(
            f"{name} is not prepared in {root} and could not be downloaded "
            f"({type(e).__name__}: {e}); prepare it where there is network access "
            f"(`tfds build {name} --data_dir DIR`) and give --data-dir DIR"
        ) from None


def _feature_key(features, given: str | None, kind: type, usual: str) -> str:
    """The image (label) feature: the one given, the only one of its kind, or `usual`."""
    flag = f"--{usual}-key"
    if given is not None:
        if given not in features or not isinstance(features[given], kind):
            raise DataError(
                f"{flag} {given!r} is no {kind.__name__} feature of this data set; its "
                f"features: {', '.join(f'{k} ({type(v).__name__})' for k, v in features.items())}"
            )
        return given
    candidates = [k for k, v in features.items() if isinstance(v, kind)]
    if len(candidates) == 1:
        return candidates[0]
    if usual in candidates:
        return usual
    if not candidates:
        raise DataError(
            f"this data set has no {kind.__name__} feature (features: {', '.join(features)}): "
            "jaxsft reads image-classification data sets"
        )
    raise DataError(f"several {kind.__name__} features ({', '.join(candidates)}): pick one "
                    f"with {flag}")


# ---------------------------------------------------------------------- folders


class FolderSource:
    """`folder:/path` or a directory: image files in class folders (see jaxsft.data.folder)."""

    def __init__(self, cfg: DataConfig, root: str):
        self.index = folder_lib.scan(root, cfg.val_fraction)
        eval_split = resolve_eval_split(cfg, list(self.index.splits), cfg.dataset)
        self.name = cfg.dataset
        self.info = DatasetInfo(
            name=cfg.dataset,
            num_classes=len(self.index.class_names),
            class_names=self.index.class_names,
            train_examples=len(self._examples(cfg.train_split)),
            eval_examples=None if eval_split is None else len(self._examples(eval_split)),
            eval_split=eval_split,
            image_key="image",
            label_key="label",
        )

    def _examples(self, split: str) -> list[folder_lib.Example]:
        """The examples of a split in TFDS syntax (train[:50%], train+val, ...)."""
        sizes = {name: types.SimpleNamespace(num_examples=len(ex), shard_lengths=[len(ex)])
                 for name, ex in self.index.splits.items()}
        try:
            parts = tfds.core.ReadInstruction.from_spec(split).to_absolute(sizes)
        except (ValueError, KeyError, AssertionError) as e:
            raise DataError(f"split {split!r} of {self.name}: {e}; available splits: "
                            f"{', '.join(self.index.splits)}") from None
        examples = [e for p in parts for e in self.index.splits[p.splitname][p.from_:p.to]]
        _nonempty(len(examples), split, self.name)
        return examples

    def _shard(self, split: str, process_index: int, process_count: int) -> np.ndarray:
        """Positions of one process's contiguous part (first parts one longer)."""
        n = len(self._examples(split))
        return np.array_split(np.arange(n), process_count)[process_index]

    def shard_sizes(self, split: str, process_count: int) -> list[int]:
        return [len(self._shard(split, p, process_count)) for p in range(process_count)]

    def reader(self, split: str, process_index: int, process_count: int) -> Reader:
        examples = self._examples(split)
        positions = self._shard(split, process_index, process_count)
        paths = tf.constant([examples[i][0] for i in positions], tf.string)
        labels = tf.constant([examples[i][1] for i in positions], tf.int64)
        index = tf.constant(positions, tf.int64)

        def records(order_key: tf.Tensor | None) -> tf.data.Dataset:
            order = tf.range(len(positions), dtype=tf.int64)
            if order_key is not None:
                order = tf.random.experimental.stateless_shuffle(order, order_key, alg="philox")
            return tf.data.Dataset.from_tensor_slices({
                "path": tf.gather(paths, order), "label": tf.gather(labels, order),
                "id": tf.gather(paths, order), "index": tf.gather(index, order),
            })

        return records
