"""Data sets -> numpy batches laid out for the local devices, and onto the devices.

This module is the package's API; the package is layered one way, each layer importing only
the ones below it:
- `types`: DataError, DatasetInfo, SkippedImages, Batches (no TensorFlow, no JAX);
- `runtime`: how TensorFlow runs in this process: `quiet_tensorflow` (environment settings
  a CLI makes before TensorFlow starts) and `tensorflow` (imports it, hidden from the GPUs);
- `folder`: the scan of an image folder (no TensorFlow);
- `sampler`: the index sampler, which examples make each global training batch (numpy only);
- the TensorFlow side: `transforms` (torchvision's preprocessing as TF ops), `digits` (the
  built-in data set), `sources` (TFDS builder or folder behind one interface), `pipeline`
  (tf.data: decode, augment, batch);
- this module: dataset_info, holdout_splits, steps_per_epoch, train_batches, eval_batches,
  load_image, device_prefetch.
Importing it imports neither TensorFlow nor anything that changes the process's state:
TensorFlow is imported, and hidden from every GPU (the accelerators belong to JAX), only
when data is first read.

Sources (`DataConfig.dataset`):
- any TFDS image-classification data set by name (`tf_flowers`, `cifar10`, `imagenet2012`),
  prepared in `--data-dir` (downloaded and prepared on first use where TFDS can), with TFDS
  split syntax (`train[:90%]`) and the Image / ClassLabel features found from the builder
  (or `--image-key` / `--label-key`);
- `folder:/path`, or an existing directory given as is (`/path`, `./images`, `~/images`):
  `root/<split>/<class>/*` or `root/<class>/*` with a seeded `val` split carved out
  (jaxsft/data/folder.py); class names are the folder names; the same split syntax, where a
  slice takes a stratified, seeded part of the split (every class in proportion);
- `digits`: scikit-learn's bundled 8x8 digits as a TFDS data set, 32x32 RGB, offline
  (jaxsft/data/digits.py).

Batches are dicts of numpy arrays: "image" float32 [D, B/D, H, W, 3] (ImageNet-normalised),
"label" int32 [D, B/D] and "mask" float32 [D, B/D] (1 = a real, readable example), where D is
the number of local devices and B the per-process batch (`batch_size / process_count`; each
process reads only its own part of every batch).

Preprocessing is torchvision's (jaxsft/data/transforms.py): train `imagenet` =
RandomResizedCrop(size, (0.08, 1), (3/4, 4/3)) + horizontal flip, `light` = the eval view +
RandomCrop(size, padding=size//8) + flip, `shift` = the same without the flip (symbols),
`none` = the eval view; eval = Resize(size / crop_ratio) + CenterCrop(size); bilinear with
antialiasing; grayscale and RGBA -> RGB.

Reproducibility contract. The global training batch at step k is a function of (data set,
split, preprocessing settings, seed s, global batch size, k) only, never of how many
processes or devices read it (jaxsft.data.sampler):
- epoch e = k // steps_per_epoch visits the split's examples in a permutation seeded by
  (s, e); global batch k is the next `batch_size` of them (the epoch's remainder dropped);
- process p of P reads the contiguous slice [p*B, (p+1)*B) of every global batch (B =
  batch_size / P) and splits it over its local devices in order, so the processes' batches
  concatenated are the global batch, bit for bit, on 1 x 4, 2 x 2 or 1 x 1 devices;
- each example's augmentation is drawn from a stateless key of (s, e, its index in the
  split), never of the process, and decoding does not depend on the batch's neighbours;
- `start_step=k` yields exactly the batches k, k+1, ... of `start_step=0`, whatever the
  process count of either: a checkpoint's data position is the global step, and the steps
  before k are skipped without reading or decoding anything (random-access sources).
Random access: folders (the file list), TFDS data sets prepared as ArrayRecord
(`tfds.data_source`), and tfrecord-prepared train splits up to 1 GiB, read once into memory
(one INFO line). A larger tfrecord split is streamed (one WARNING line naming the fix:
`tfds build NAME --file_format=array_record`): every process reads all of it each epoch, in
its fixed order, through a shuffle buffer of `--shuffle-buffer` examples seeded by (s, e),
batches it globally and keeps its slice; the same guarantee holds, but the shuffle is only
as wide as the buffer, resuming re-reads (not decodes) the epoch's skipped part, and the
reading is P times the split. `--shuffle-buffer` matters only there. `--cache` decodes the
whole train split once per process, keeps its pixels in memory and augments from them (the
same examples and keys; small data sets only). The permutation is NumPy's PCG64
`permutation`, the keys TensorFlow's Philox: the same versions give the same stream.
What is not guaranteed: the trajectory of a run on another topology is the same data, but
the gradient and BatchNorm reductions run in another order; in float32 the rounding
differences grow slowly until runs part; in float64 they stay within 1e-10 relative over the
few steps tests/test_multihost.py runs (exact in that sense).

Unreadable images (corrupt, truncated, not an image) never stop a run: each becomes a
masked example (mask 0, a black image), is logged once by name, and is counted in the
iterator's `skipped` (a `SkippedImages`: `count` occurrences, `ids` the distinct names),
once each time its batch is used: when `next` hands the batch out, or, through
`device_prefetch`, when the batch goes to the step (batches fetched ahead are not counted).
With `--strict-images` the first one raises a DataError naming it. In training, the masked
example still occupies its slot (so the batch stream never shifts); it is excluded from the
loss and metrics by the mask but does enter the BatchNorm batch statistics as a zero input.
"""

from __future__ import annotations

import collections
import itertools
import math
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from jaxsft.config import DataConfig
from jaxsft.data.runtime import quiet_tensorflow
from jaxsft.data.types import Batches, DataError, DatasetInfo, SkippedImages

if TYPE_CHECKING:
    import jax

__all__ = [
    "Batches", "DataError", "DatasetInfo", "SkippedImages", "dataset_info", "device_prefetch",
    "eval_batches", "holdout_splits", "load_image", "local_batch", "quiet_tensorflow",
    "steps_per_epoch", "train_batches",
]


def _source(cfg: DataConfig):
    """The data set's source (TensorFlow side), TensorFlow first imported off the GPUs."""
    from jaxsft.data.runtime import tensorflow

    tensorflow()
    from jaxsft.data.sources import open_source

    return open_source(cfg)


def dataset_info(cfg: DataConfig) -> DatasetInfo:
    """Classes, class names and split sizes; prepares a TFDS data set on first use."""
    return _source(cfg).info


def holdout_splits(cfg: DataConfig, fraction: float) -> tuple[str, str]:
    """`cfg.train_split` as (rest, held out), two disjoint splits in the data set's split
    syntax, the held-out one `fraction` of it: a validation split carved from the training
    data, never from the eval split (Kornblith et al. 2019's protocol), to pass as
    --train-split and --eval-split. The same examples in every run, whatever its seed: of a
    TFDS data set the last examples of each part (TFDS shuffled them once, when it prepared
    the data set), of a folder a stratified slice (every class in proportion)."""
    if not 0 < fraction < 1:
        raise DataError(f"the held-out fraction must be in (0, 1), got {fraction}")
    return _source(cfg).holdout(cfg.train_split, fraction)


def steps_per_epoch(info: DatasetInfo, cfg: DataConfig) -> int:
    """Train batches per epoch: train_examples // batch_size (the remainder is dropped)."""
    steps = info.train_examples // cfg.batch_size
    if steps == 0:
        raise DataError(
            f"the train split of {info.name} has {info.train_examples} examples, fewer than "
            f"--batch-size {cfg.batch_size}: use a smaller batch size or a larger split"
        )
    return steps


def local_batch(batch: int, flag: str, num_devices: int, process_count: int) -> int:
    """The per-process batch, checked to split evenly over processes and local devices (the
    one check of that fact: the trainer's plan asks it before anything compiles)."""
    if batch % process_count:
        raise DataError(f"{flag} {batch} is not divisible by the {process_count} processes: "
                        f"use a multiple of {process_count * num_devices}")
    local = batch // process_count
    if local % num_devices:
        raise DataError(
            f"{flag} {batch} does not split evenly over {num_devices} devices"
            + (f" in each of {process_count} processes" if process_count > 1 else "")
            + f": use a multiple of {process_count * num_devices}"
        )
    return local


def train_batches(
    cfg: DataConfig, *, seed: int, start_step: int = 0, num_devices: int | None = None
) -> Batches:
    """Infinite training batches, epoch after epoch, exactly reproducible from `start_step`."""
    import jax

    return _train_batches(
        cfg, seed=seed, start_step=start_step,
        num_devices=num_devices or jax.local_device_count(),
        process_index=jax.process_index(), process_count=jax.process_count(),
    )


def _train_batches(
    cfg: DataConfig, *, seed: int, start_step: int, num_devices: int, process_index: int,
    process_count: int,
) -> Batches:
    """train_batches with the process given explicitly (tests simulate several)."""
    if start_step < 0:
        raise DataError(f"start_step must be >= 0, got {start_step}")
    local = local_batch(cfg.batch_size, "--batch-size", num_devices, process_count)
    source = _source(cfg)
    from jaxsft.data.pipeline import Shard, train_stream

    spe = steps_per_epoch(source.info, cfg)
    shard = Shard(cfg.train_split, process_index, process_count, local)

    def stream() -> Iterator[tuple[dict[str, np.ndarray], list[str]]]:
        ds = train_stream(source, cfg, shard, seed=seed, start_step=start_step,
                          steps_per_epoch=spe)
        for raw in ds.as_numpy_iterator():
            yield _assemble(raw, cfg, source.info, num_devices)

    return Batches(stream)


def eval_batches(cfg: DataConfig, num_devices: int | None = None) -> Batches:
    """One pass over the eval split: every example once, over all devices and processes."""
    import jax

    return _eval_batches(
        cfg, num_devices=num_devices or jax.local_device_count(),
        process_index=jax.process_index(), process_count=jax.process_count(),
    )


def _eval_batches(
    cfg: DataConfig, *, num_devices: int, process_index: int, process_count: int
) -> Batches:
    """eval_batches with the process given explicitly. Every process yields the same number
    of batches (collectives need it): the last real one is padded, then empty ones follow."""
    batch = cfg.eval_batch_size or cfg.batch_size
    flag = "--eval-batch-size" if cfg.eval_batch_size else "--batch-size"
    local = local_batch(batch, flag, num_devices, process_count)
    source = _source(cfg)
    from jaxsft.data.pipeline import Shard, eval_pass

    split = source.info.eval_split
    if split is None:
        raise DataError(f"{cfg.dataset} has no validation or test split: give --eval-split")
    shard = Shard(split, process_index, process_count, local)
    num_batches = math.ceil(max(source.shard_sizes(split, process_count)) / local)

    def stream() -> Iterator[tuple[dict[str, np.ndarray], list[str]]]:
        seen = 0
        for raw in eval_pass(source, cfg, shard).as_numpy_iterator():
            seen += 1
            if seen > num_batches:  # every process must run the same number of eval steps
                raise DataError(f"the {split} split of {cfg.dataset} holds more examples than "
                                "its metadata says: prepare the data set again")
            yield _assemble(_pad(raw, local), cfg, source.info, num_devices)
        for _ in range(num_batches - seen):
            yield _assemble(_pad(None, local, cfg.image_size), cfg, source.info, num_devices)

    return Batches(stream)


def _pad(raw: dict[str, np.ndarray] | None, size: int, image_size: int = 0) -> dict:
    """A batch padded to `size` examples; "real" marks the ones that are not padding."""
    if raw is None:
        raw = {"image": np.zeros((0, image_size, image_size, 3), np.float32),
               "label": np.zeros(0, np.int32), "ok": np.zeros(0, bool),
               "id": np.zeros(0, object)}
    n = len(raw["label"])
    out = {k: np.concatenate([v, np.zeros((size - n, *v.shape[1:]), v.dtype)])
           for k, v in raw.items()}
    out["real"] = np.arange(size) < n
    return out


def _assemble(
    raw: dict[str, np.ndarray], cfg: DataConfig, info: DatasetInfo, num_devices: int
) -> tuple[dict[str, np.ndarray], list[str]]:
    """Checks a host batch (labels, unreadable images) and lays it out as [D, B/D, ...];
    returns it with the ids of its unreadable images (counted when the batch is used)."""
    real = raw.get("real", np.ones(len(raw["label"]), bool))
    ids = [i.decode(errors="replace") if isinstance(i, bytes) else str(i) for i in raw["id"]]
    labels = raw["label"]
    bad = np.flatnonzero(real & ((labels < 0) | (labels >= info.num_classes)))
    if bad.size:
        raise DataError(
            f"label {labels[bad[0]]} of {ids[bad[0]]} is outside [0, {info.num_classes}) "
            f"of {info.name}: this split has unlabelled or mislabelled examples; choose a "
            "labelled split (--train-split/--eval-split) or the right --label-key"
        )
    unreadable = [ids[i] for i in np.flatnonzero(real & ~raw["ok"])]
    if unreadable and cfg.strict_images:
        raise DataError(f"cannot read or decode image {unreadable[0]}: remove or replace it, "
                        "or drop --strict-images to skip unreadable images")
    mask = (real & raw["ok"]).astype(np.float32)
    batch = {"image": raw["image"], "label": labels.astype(np.int32), "mask": mask}
    return {k: v.reshape(num_devices, -1, *v.shape[1:]) for k, v in batch.items()}, unreadable


def load_image(path: str, cfg: DataConfig) -> np.ndarray:
    """One image file with the eval preprocessing: float32 [H, W, 3], for prediction."""
    if not Path(path).is_file():
        raise DataError(f"no such image file: {path}")
    from jaxsft.data.runtime import tensorflow

    tensorflow()
    from jaxsft.data.pipeline import preprocess_file

    return preprocess_file(path, cfg)


def device_prefetch(
    batches: Iterable[dict[str, Any]], size: int = 2, devices: list | None = None
) -> Iterator[dict[str, jax.Array]]:
    """Puts [D, ...] host batches onto the local devices `size` batches ahead of use.

    Transfers are asynchronous, so while the accelerator runs step k the host already copies
    batch k+1 (and reads batch k+2): the device waits on the host only if the host is slower.
    Each array is sharded along its leading axis, one slice per device, as pmap expects.
    """
    import jax

    if size < 1:
        raise DataError(f"device_prefetch needs size >= 1, got {size}")
    devices = list(devices or jax.local_devices())
    shardings: dict[int, jax.sharding.NamedSharding] = {}

    def put(batch: dict[str, Any]) -> dict[str, jax.Array]:
        d = len(next(iter(batch.values())))
        if d > len(devices):
            raise DataError(f"a batch for {d} devices, but only {len(devices)} are local")
        if d not in shardings:
            mesh = jax.sharding.Mesh(np.array(devices[:d]), ("batch",))
            shardings[d] = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("batch"))
        return jax.device_put(batch, shardings[d])

    # A Batches counts a batch's unreadable images when the batch is used, not when fetched.
    it = batches.staged() if isinstance(batches, Batches) else ((b, None) for b in batches)
    queue = collections.deque((put(b), use) for b, use in itertools.islice(it, size))
    while queue:
        batch, use = queue.popleft()
        if use is not None:
            use()
        yield batch
        queue.extend((put(b), use) for b, use in itertools.islice(it, 1))
