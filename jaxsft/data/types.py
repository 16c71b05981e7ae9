"""What the rest of `jaxsft.data` shares, and nothing else: errors and plain records.

The bottom layer of the package: no TensorFlow, no JAX, no import from the layers above, so
the folder scan, the TensorFlow side and the numpy/device API all import it and never each
other upwards.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable, Iterable, Iterator

import numpy as np

log = logging.getLogger(__name__)

MAX_SKIPPED_IDS = 1000


class DataError(ValueError):
    """A data set, split, file or batch setting is unusable; the message names the fix."""


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What the trainer needs to know of a data set before reading it."""

    name: str
    num_classes: int
    class_names: tuple[str, ...]
    train_examples: int
    eval_examples: int | None
    eval_split: str | None  # resolved: the split eval_batches reads, None if there is none
    image_key: str
    label_key: str


@dataclasses.dataclass
class SkippedImages:
    """Unreadable images met so far: `count` occurrences, `ids` their distinct names."""

    count: int = 0
    ids: list[str] = dataclasses.field(default_factory=list)

    def add(self, ids: Iterable[str]) -> None:
        for name in ids:
            self.count += 1
            if name not in self.ids and len(self.ids) < MAX_SKIPPED_IDS:
                self.ids.append(name)
                log.warning("skipped unreadable image %s (%d skipped so far; "
                            "--strict-images stops instead)", name, self.count)


class Batches(Iterator[dict[str, np.ndarray]]):
    """An iterator of batches that also reports the unreadable images it skipped: `skipped`
    counts each unreadable example once per batch that was used (handed out by `next`, or
    by `staged` when its `use()` is called), never in batches fetched ahead and not used."""

    def __init__(self, make: Callable[[], Iterator[tuple[dict[str, np.ndarray], list[str]]]]):
        self.skipped = SkippedImages()
        self._batches = make()  # (batch, ids of its unreadable images)

    def __next__(self) -> dict[str, np.ndarray]:
        batch, unreadable = next(self._batches)
        self.skipped.add(unreadable)
        return batch

    def staged(self) -> Iterator[tuple[dict[str, np.ndarray], Callable[[], None]]]:
        """(batch, use) pairs for a consumer that fetches ahead of use (device_prefetch):
        the batch's unreadable images are counted when it calls `use()`."""
        for batch, unreadable in self._batches:
            yield batch, functools.partial(self.skipped.add, unreadable)
