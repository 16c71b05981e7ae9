"""Local image folders: find the splits, classes and files of `folder:/path` (or `/path`).

No TensorFlow: a plain scan of the file system, below the TensorFlow side in jaxsft.data.
Two layouts, as torchvision's ImageFolder users keep them:
- `root/<split>/<class>/**/*.jpg` with splits among train, val, validation, test;
- `root/<class>/**/*.jpg`, from which a validation split `val` is carved out.
`root/train/<class>/...` alone (no val/test folder) is carved the same way. The carved split
takes a stratified `val_fraction` of each class (at least one image of every class with two
or more) by a permutation seeded with a fixed seed, not the run's: every run, whatever its
--seed, evaluates on the same images. Classes are the sorted names of the class folders of
all splits together, so a class missing from one split keeps its index. Files are listed
sorted, so the index is the same on every machine; unreadable files are found later, when
decoded (see jaxsft.data.pipeline).

A slice of a split (`train[:80%]`, `train[80%:]`, in TFDS's split syntax) is taken in
`stratified_order`: the same seeded permutations, the classes interleaved, so that every
slice holds its share of each class and complementary slices are disjoint; the examples it
picks keep the split's order.

Symbolic links are followed (images kept on another disk are common), except a link that
would make a split hold itself or another split's images: one that resolves to the split, to
a folder above it, or into another split's folder is skipped with a warning. (Links to folders
below a class folder are not followed at all, as pathlib's rglob does not.)
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np

from jaxsft.data.types import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
SPLIT_DIRS = ("train", "val", "validation", "test")
CARVED_SPLIT = "val"
CARVE_SEED = 0

log = logging.getLogger(__name__)

Example = tuple[str, int]  # (path, label)

PREFIX = "folder:"
PATH_STARTS = ("/", "~", "./", "../")


def folder_root(dataset: str) -> str | None:
    """The folder that `dataset` names for sure: `folder:ROOT`, or a path written as one
    (`/abs`, `~/x`, `./rel`, `../rel`, `.`); None for a name, which may still be a relative
    directory when TFDS does not know it (jaxsft.data.sources decides)."""
    if dataset.startswith(PREFIX):
        return dataset[len(PREFIX):]
    if dataset.startswith(PATH_STARTS) or dataset in (".", "..", "~"):
        return dataset
    return None


@dataclasses.dataclass(frozen=True)
class FolderIndex:
    """Every split's examples, sorted by class then path."""

    root: str
    class_names: tuple[str, ...]
    splits: dict[str, list[Example]]


def scan(root: str, val_fraction: float) -> FolderIndex:
    """Lists `root` in either layout; DataError when it holds no images."""
    path = Path(root).expanduser()
    if not path.is_dir():
        raise DataError(f"folder data set {root!r}: no such directory; give the path of a "
                        "directory of images, as /path/to/images or folder:/path/to/images")
    split_dirs = [d for d in _subdirs(path) if d.name in SPLIT_DIRS and _subdirs(d)]
    by_split = ({d.name: _class_files(d, [o for o in split_dirs if o != d]) for d in split_dirs}
                or {"train": _class_files(path, [])})
    classes = tuple(sorted({c for files in by_split.values() for c, f in files.items() if f}))
    if not classes:
        raise DataError(
            f"folder data set {root!r} holds no images: expected {root}/<class>/*.jpg or "
            f"{root}/<split>/<class>/*.jpg with extensions {', '.join(IMAGE_EXTENSIONS)}"
        )
    label = {name: i for i, name in enumerate(classes)}
    splits = {
        split: [(f, label[c]) for c in sorted(files) if files[c] for f in files[c]]
        for split, files in by_split.items()
    }
    if set(splits) == {"train"}:
        splits["train"], splits[CARVED_SPLIT] = _carve(splits["train"], val_fraction)
    return FolderIndex(str(path), classes, splits)


def _subdirs(path: Path) -> list[Path]:
    return sorted(d for d in path.iterdir() if d.is_dir() and not d.name.startswith("."))


def _class_files(path: Path, other_splits: list[Path]) -> dict[str, list[str]]:
    """{class folder name: its image files, recursively, sorted}; links that leave the split
    (see the module's docstring) are skipped."""
    split, others = path.resolve(), [o.resolve() for o in other_splits]
    out = {}
    for d in _subdirs(path):
        if d.is_symlink() and _leaks(d, split, others):
            continue
        out[d.name] = sorted(
            str(f) for f in d.rglob("*")
            if f.suffix.lower() in IMAGE_EXTENSIONS and not f.name.startswith(".") and f.is_file()
            and not (f.is_symlink() and _leaks(f, split, others))
        )
        if not out[d.name]:
            log.warning("class folder %s holds no images; ignored", d)
    return out


def _leaks(link: Path, split: Path, others: list[Path]) -> bool:
    """Whether a link resolves to its split, a folder above it, or into another split."""
    target = link.resolve()
    if split.is_relative_to(target):
        where = "its own split or a folder above it"
    elif any(target.is_relative_to(o) for o in others):
        where = "another split"
    else:
        return False
    log.warning("skipped %s: the link leads to %s (%s), whose images would be counted "
                "twice or leak between training and evaluation", link, where, target)
    return True


def _class_order(label: int, size: int) -> np.ndarray:
    """The fixed, seeded order of a class's `size` examples (not the run's seed)."""
    return np.random.default_rng([CARVE_SEED, int(label)]).permutation(size)


def _carve(examples: list[Example], fraction: float) -> tuple[list[Example], list[Example]]:
    """Stratified, seeded split of `examples` into (train, val)."""
    labels = np.array([label for _, label in examples])
    held_out = np.zeros(len(examples), bool)
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        n_val = min(max(round(len(members) * fraction), 1), len(members) - 1)
        held_out[members[_class_order(label, len(members))[:n_val]]] = True
    train = [e for e, out in zip(examples, held_out, strict=True) if not out]
    val = [e for e, out in zip(examples, held_out, strict=True) if out]
    return train, val


def stratified_order(examples: list[Example]) -> list[Example]:
    """`examples` in a fixed, seeded order that spreads every class evenly, so that any
    contiguous slice holds about its share of each class: the k-th of a class of n (in its
    seeded order) sits at (k + 1/2) / n of the way, ties by label. A folder's split is
    sorted by class, where a slice would take whole classes."""
    labels = np.array([label for _, label in examples], np.int64)
    position = np.zeros(len(examples))
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        position[members[_class_order(label, len(members))]] = (
            (np.arange(len(members)) + 0.5) / len(members))
    return [examples[i] for i in np.lexsort((labels, position))]
