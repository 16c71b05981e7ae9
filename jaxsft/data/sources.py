"""Data-set sources: a TFDS builder or a local folder, behind one small interface.

The TensorFlow side of jaxsft.data: imports types, folder and digits below it, never the
package's API (jaxsft.data), which imports this module when it first reads data.

A source says what the data set is (`info`) and gives records {"data" or "path", "label",
"id"} two ways, which the pipeline (jaxsft.data.pipeline) turns into batches the same way for
both kinds of source. `id` names an example in messages (a TFDS id or a file path).
- Training (`train_access`): the whole split, by global example index, for the index sampler
  (jaxsft.data.sampler) that makes the batch stream independent of the cluster's shape:
  `RandomAccess` (a lookup from a batch of indices to their records) for folders (the file
  list), TFDS data sets prepared as ArrayRecord (`tfds.data_source`), and tfrecord-prepared
  splits small enough to read once into memory (IN_MEMORY_BYTES); otherwise `Sequential`
  (the split in its fixed order, which every process reads whole: logged once, with the fix).
- Evaluation (`shard_sizes`, `reader`): one process's contiguous part of a split, in order.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
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
# A tfrecord-prepared train split up to this size (its metadata's bytes) is read once into
# memory for random access; a larger one is streamed (see Sequential).
IN_MEMORY_BYTES = 1 << 30

log = logging.getLogger(__name__)

@dataclasses.dataclass(frozen=True)
class RandomAccess:
    """A split's records by global index: `lookup(indices [k]) -> {name: [k, ...]}`, usable
    inside a tf.data graph. With `pixels` (--cache), records are decoded: "ok" and the
    "offset" and "shape" of their uint8 image in that flat tensor."""

    size: int
    lookup: Callable[[tf.Tensor], dict[str, tf.Tensor]]
    pixels: tf.Tensor | None = None


@dataclasses.dataclass(frozen=True)
class Sequential:
    """A split without random access: `records()` streams it whole, in its fixed order,
    each record with its "index" (position in that order)."""

    size: int
    records: Callable[[], tf.data.Dataset]


class Source(Protocol):
    info: DatasetInfo

    def train_access(self, split: str) -> RandomAccess | Sequential: ...

    def shard_sizes(self, split: str, process_count: int) -> list[int]: ...

    def holdout(self, split: str, fraction: float) -> tuple[str, str]: ...

    def reader(self, split: str, process_index: int, process_count: int) -> tf.data.Dataset:
        ...


def table_lookup(table: dict[str, np.ndarray]) -> Callable[[tf.Tensor], dict[str, tf.Tensor]]:
    """Random access into in-memory columns (one row per example) by tf.gather."""
    tensors = {k: tf.constant(v) for k, v in table.items()}
    return lambda indices: {k: tf.gather(v, indices) for k, v in tensors.items()}


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


def holdout(split: str, table, fraction: float, dataset: str) -> tuple[str, str]:
    """`split` as two disjoint splits in absolute TFDS syntax: (the rest, the held-out last
    `fraction` of each of its parts, in the source's fixed order). `table` maps split names
    to their sizes, as `ReadInstruction.to_absolute` reads them."""
    rest, held = [], []
    for p in tfds.core.ReadInstruction.from_spec(split).to_absolute(table):
        start = p.from_ or 0
        stop = table[p.splitname].num_examples if p.to is None else p.to
        cut = start + round((stop - start) * (1 - fraction))
        rest += [f"{p.splitname}[{start}:{cut}]"] if cut > start else []
        held += [f"{p.splitname}[{cut}:{stop}]"] if stop > cut else []
    if not rest or not held:
        raise DataError(f"holding out {fraction:g} of split {split!r} of {dataset} leaves one "
                        "side empty: use a larger split or another fraction")
    return "+".join(rest), "+".join(held)


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

    def train_access(self, split: str) -> RandomAccess | Sequential:
        """ArrayRecord (or another random-access format) through tfds.data_source; else a
        small split read once into memory; else the split streamed in its fixed order."""
        n = self._size(split)
        info = self.builder.info
        if info.available_file_formats() & tfds.core.FileFormat.with_random_access():
            return self._data_source(split, n)
        size, name, kind = self._bytes(split), self.builder.name, info.file_format.value
        if size <= IN_MEMORY_BYTES:
            log.info("%s is prepared as %s, which has no random access: reading %s (%.1f MB) "
                     "into memory once", name, kind, split, size / 1e6)
            return self._in_memory(split, n)
        log.warning(
            "%s is prepared as %s, which has no random access, and %s is too large to hold "
            "in memory (%.1f GB): every process reads all of it and shuffles it in a buffer "
            "of --shuffle-buffer examples; prepare it with `tfds build %s --file_format="
            "array_record` for a global shuffle that reads each example once", name,
            kind, split, size / 1e9, name)
        return Sequential(n, lambda: self._ordered(split).enumerate().map(
            lambda i, r: {**r, "index": i}))

    def _bytes(self, split: str) -> float:
        """The prepared size of `split` (a slice such as train[:90%] pro rata)."""
        splits = self.builder.info.splits
        parts = tfds.core.ReadInstruction.from_spec(split).to_absolute(splits)
        total = 0.0
        for p in parts:
            whole = splits[p.splitname]
            n = whole.num_examples
            total += whole.num_bytes * ((n if p.to is None else p.to) - (p.from_ or 0)) / n
        return total

    def _ordered(self, split: str) -> tf.data.Dataset:
        """The split's records {"data", "label", "id"} in its fixed (prepared) order."""
        read_config = tfds.ReadConfig(add_tfds_id=True, try_autocache=False, skip_prefetch=True)
        decoders = tfds.decode.PartialDecoding(
            {self.image_key: True, self.label_key: True},
            decoders={self.image_key: tfds.decode.SkipDecoding()},
        )
        ds = self.builder.as_dataset(
            split=split, shuffle_files=False, decoders=decoders, read_config=read_config
        )
        image_key, label_key = self.image_key, self.label_key
        return ds.map(lambda ex: {"data": ex[image_key], "label": ex[label_key],
                                  "id": ex["tfds_id"]})

    def _in_memory(self, split: str, n: int) -> RandomAccess:
        columns: dict[str, list] = {"data": [], "label": [], "id": []}
        for record in self._ordered(split).as_numpy_iterator():
            for k, column in columns.items():
                column.append(record[k])
        if len(columns["label"]) != n:
            raise DataError(f"split {split!r} of {self.builder.name} holds "
                            f"{len(columns['label'])} examples, its metadata says {n}: "
                            "prepare the data set again")
        return RandomAccess(n, table_lookup({
            "data": np.array(columns["data"], object),
            "label": np.array(columns["label"], np.int64),
            "id": np.array(columns["id"], object)}))

    def _data_source(self, split: str, n: int) -> RandomAccess:
        source = self.builder.as_data_source(
            split, decoders={self.image_key: tfds.decode.SkipDecoding()})
        if len(source) != n:
            raise DataError(f"split {split!r} of {self.builder.name} holds {len(source)} "
                            f"examples, its metadata says {n}: prepare the data set again")
        image_key, label_key = self.image_key, self.label_key
        prefix = f"{self.builder.name}-{split}__"

        def fetch(indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            examples = source.__getitems__([int(i) for i in indices])
            return (np.array([e[image_key] for e in examples], object),
                    np.array([e[label_key] for e in examples], np.int64))

        def lookup(indices: tf.Tensor) -> dict[str, tf.Tensor]:
            data, label = tf.numpy_function(fetch, [indices], (tf.string, tf.int64),
                                            stateful=False)
            ids = tf.strings.join([prefix, tf.strings.as_string(indices)])
            return {"data": tf.ensure_shape(data, indices.shape),
                    "label": tf.ensure_shape(label, indices.shape), "id": ids}

        return RandomAccess(n, lookup)

    def shard_sizes(self, split: str, process_count: int) -> list[int]:
        return [self.builder.info.splits[s].num_examples
                for s in tfds.even_splits(split, n=process_count)]

    def holdout(self, split: str, fraction: float) -> tuple[str, str]:
        """(rest, held out) of `split`: TFDS shuffled the examples when it prepared them, so
        the last part of each split is a seeded random sample of it."""
        self._size(split)  # a bad or empty split: its one error
        return holdout(split, self.builder.info.splits, fraction, self.builder.name)

    def reader(self, split: str, process_index: int, process_count: int) -> tf.data.Dataset:
        return self._ordered(tfds.even_splits(split, n=process_count)[process_index])


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
        self._orders: dict[str, list[folder_lib.Example]] = {}
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

    def _sizes(self) -> dict[str, types.SimpleNamespace]:
        """The split sizes as TFDS's ReadInstruction.to_absolute reads them."""
        return {name: types.SimpleNamespace(num_examples=len(ex), shard_lengths=[len(ex)])
                for name, ex in self.index.splits.items()}

    def _examples(self, split: str) -> list[folder_lib.Example]:
        """The examples of a split in TFDS syntax (train[:50%], train+val, ...); a slice is
        taken in the split's stratified order (jaxsft.data.folder), its examples kept in the
        split's own order."""
        try:
            parts = tfds.core.ReadInstruction.from_spec(split).to_absolute(self._sizes())
        except (ValueError, KeyError, AssertionError) as e:
            raise DataError(f"split {split!r} of {self.name}: {e}; available splits: "
                            f"{', '.join(self.index.splits)}") from None
        examples = []
        for p in parts:
            whole = self.index.splits[p.splitname]
            picked = set(self._stratified(p.splitname)[p.from_:p.to])
            examples += [e for e in whole if e in picked]
        _nonempty(len(examples), split, self.name)
        return examples

    def _stratified(self, name: str) -> list[folder_lib.Example]:
        if name not in self._orders:
            self._orders[name] = folder_lib.stratified_order(self.index.splits[name])
        return self._orders[name]

    def holdout(self, split: str, fraction: float) -> tuple[str, str]:
        """(rest, held out) of `split`: the held-out part is the last `fraction` of each part
        in its stratified, seeded order, so it holds that share of every class."""
        self._examples(split)  # a bad or empty split: its one error
        return holdout(split, self._sizes(), fraction, self.name)

    def train_access(self, split: str) -> RandomAccess:
        """The split's file list, gathered by index (paths and labels in memory)."""
        examples = self._examples(split)
        paths = np.array([path for path, _ in examples], object)
        return RandomAccess(len(examples), table_lookup({
            "path": paths, "label": np.array([label for _, label in examples], np.int64),
            "id": paths}))

    def _shard(self, split: str, process_index: int, process_count: int) -> np.ndarray:
        """Positions of one process's contiguous part (first parts one longer)."""
        n = len(self._examples(split))
        return np.array_split(np.arange(n), process_count)[process_index]

    def shard_sizes(self, split: str, process_count: int) -> list[int]:
        return [len(self._shard(split, p, process_count)) for p in range(process_count)]

    def reader(self, split: str, process_index: int, process_count: int) -> tf.data.Dataset:
        examples = self._examples(split)
        paths = [examples[i][0] for i in self._shard(split, process_index, process_count)]
        labels = [examples[i][1] for i in self._shard(split, process_index, process_count)]
        return tf.data.Dataset.from_tensor_slices({
            "path": tf.constant(paths, tf.string), "label": tf.constant(labels, tf.int64),
            "id": tf.constant(paths, tf.string)})
