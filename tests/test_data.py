"""jaxsft.data on generated image folders and the built-in digits, against torchvision.

References: torchvision's transforms on the same files (preprocessing), torchvision's
RandomResizedCrop.get_params (crop statistics), scikit-learn's digits (the digits data set),
and the file each pixel came from (coverage, sharding, reproducibility).
"""

# torchvision first: in this environment, importing it after TensorFlow crashes (triton).
import torchvision  # noqa: F401, I001
import torch
from torchvision import transforms as tvt

import dataclasses
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from helpers import assert_same_batches, check_topology_invariance, global_batches
from PIL import Image

from jaxsft import data
from jaxsft.config import DataConfig

MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


def pixels(image: np.ndarray) -> np.ndarray:
    """Normalised model input -> 0..255 pixel values."""
    return (image * STD + MEAN) * 255


def photo(height: int, width: int, seed: int) -> np.ndarray:
    """A photo-like uint8 RGB image: smooth colour fields, edges and mild noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    base = np.stack([np.sin(7 * x + 3 * y), np.cos(5 * y - 2 * x), np.sin(4 * (x + y))], -1)
    edges = (x + 0.3 * np.sin(9 * y) > 0.5)[..., None] * 60
    image = 120 + 70 * base + edges + rng.normal(0, 8, (height, width, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def truncated_jpeg(path: Path) -> None:
    Image.fromarray(photo(120, 160, 99)).save(path, "JPEG")
    path.write_bytes(path.read_bytes()[:700])


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory) -> Path:
    """root/{train,val}/<class>/ with JPEG, PNG, grayscale, RGBA and one corrupt file each."""
    root = tmp_path_factory.mktemp("mixed")
    shapes = iter([(300, 402), (280, 250), (256, 256), (500, 333), (180, 240), (333, 500),
                   (240, 320), (400, 300), (260, 390), (310, 210), (225, 300), (350, 350)])
    for split, per_class in (("train", 4), ("val", 2)):
        for c, name in enumerate(["cat", "dog"]):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                seed = 100 * (split == "val") + 10 * c + i
                h, w = next(shapes) if split == "train" or i == 0 else (200, 300)
                rgb = Image.fromarray(photo(h, w, seed))
                kind = ["rgb.jpg", "gray.png", "rgba.png", "gray.jpg"][(i + c) % 4]
                if kind == "gray.png" or kind == "gray.jpg":
                    rgb = rgb.convert("L")
                if kind == "rgba.png":
                    rgb = rgb.convert("RGBA")
                    rgb.putalpha(Image.fromarray(photo(h, w, seed + 1)[..., 0]))
                rgb.save(folder / f"{i}_{kind}")
            (folder / "notes.txt").write_text("not an image")
        truncated_jpeg(root / split / "dog" / "zz_corrupt.jpg")
    return root


def colour(i: int) -> tuple[int, int, int]:
    """A distinct colour per example index, read back from the pixels."""
    return (i % 16) * 16 + 8, (i // 16) * 16 + 8, 128


def index_of(image: np.ndarray) -> int:
    """The example index of a solid-colour image (after the pipeline)."""
    r, g, _ = np.round(pixels(image).reshape(-1, 3).mean(0)).astype(int)
    return (r - 8) // 16 + 16 * ((g - 8) // 16)


def colour_folder(root: Path, counts: dict[str, int], classes: int = 3) -> Path:
    """root/<split>/<class>/ of 16x16 PNGs, each a solid colour naming its example index."""
    first = 0
    for split, n in counts.items():
        for i in range(first, first + n):
            folder = root / split / f"class{i % classes}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (16, 16), colour(i)).save(folder / f"{i:04d}.png")
        first += n
    return root


def colour_cfg(root: Path, **kw) -> DataConfig:
    return DataConfig(dataset=f"folder:{root}", image_size=16, crop_ratio=1.0, augment="none",
                      **kw)


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("tfds"))
    data.dataset_info(DataConfig(dataset="digits", data_dir=path))  # prepares it once
    return path


# ---------------------------------------------------------------------- preprocessing


def torchvision_eval(path: Path, size: int = 224) -> np.ndarray:
    tf = tvt.Compose([tvt.Resize(int(size / 0.875)), tvt.CenterCrop(size), tvt.ToTensor(),
                      tvt.Normalize(MEAN.tolist(), STD.tolist())])
    with Image.open(path) as image:
        return tf(image.convert("RGB")).numpy().transpose(1, 2, 0)


def test_eval_preprocessing_matches_torchvision(mixed_folder):
    """Resize(256)+CenterCrop(224)+ToTensor+Normalize, through the eval pipeline and
    load_image, on JPEG/PNG/grayscale/RGBA files of several shapes; the corrupt one masked."""
    cfg = DataConfig(dataset=f"folder:{mixed_folder}", eval_split="train", batch_size=4)
    files = sorted((mixed_folder / "train").glob("*/*.*"))
    files = [f for f in files if f.suffix != ".txt"]  # sorted by class, then name
    batches = list(data.eval_batches(cfg))
    images = np.concatenate([b["image"].reshape(-1, 224, 224, 3) for b in batches])
    mask = np.concatenate([b["mask"].ravel() for b in batches])
    labels = np.concatenate([b["label"].ravel() for b in batches])
    readable = [f.name != "zz_corrupt.jpg" for f in files]
    assert len(mask) == 12 and mask.tolist() == readable + [0] * 3
    for f, image, m, label in zip(files, images, mask, labels, strict=False):
        assert label == ["cat", "dog"].index(f.parent.name)
        if m:
            ref = torchvision_eval(f)
            assert np.abs(image - ref).mean() < 0.02, f
            assert np.abs(image - ref).mean() < 0.006, f  # what it is: kernels differ a little
            np.testing.assert_array_equal(data.load_image(str(f), cfg), image)


def test_decoding_is_bit_exact_with_pil(mixed_folder):
    """JPEG (libjpeg's accurate DCT, as PIL), PNG, grayscale and RGBA -> RGB, as .convert."""
    import tensorflow as tf

    from jaxsft.data.transforms import decode

    files = [f for f in sorted(mixed_folder.glob("*/*/*")) if f.suffix in (".jpg", ".png")]
    assert {f.name.split("_", 1)[1] for f in files} == {"rgb.jpg", "gray.jpg", "gray.png",
                                                       "rgba.png", "corrupt.jpg"}
    for f in files:
        if "corrupt" not in f.name:
            with Image.open(f) as im:
                ref = np.asarray(im.convert("RGB"))
            np.testing.assert_array_equal(decode(tf.io.read_file(str(f))).numpy(), ref)


def test_train_crop_windows_follow_torchvision():
    """The window of RandomResizedCrop: in bounds, scale in [0.08, 1], aspect in [3/4, 4/3],
    the same distribution as torchvision's get_params, and the same fallback box."""
    import tensorflow as tf

    import jaxsft.data.transforms as T

    def ours(height, width, n):
        keys = [T.fold_in(tf.constant([7, 0], tf.int64), i) for i in range(n)]
        fn = tf.function(lambda k: T.imagenet_window(k)(tf.constant([height, width])))
        return np.array([fn(k).numpy() for k in keys])

    def theirs(height, width, n):
        torch.manual_seed(0)
        img = torch.zeros(3, height, width)
        return np.array([tvt.RandomResizedCrop.get_params(img, [0.08, 1.0], [3 / 4, 4 / 3])
                         for _ in range(n)])

    height, width, n = 375, 500, 1500
    a, b = ours(height, width, n), theirs(height, width, n)
    top, left, h, w = a.T
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + h <= height).all() and (left + w <= width).all()
    scale, aspect = h * w / (height * width), w / h
    assert scale.min() >= 0.08 * 0.97 and scale.max() <= 1.0
    assert aspect.min() >= 0.75 * 0.97 and aspect.max() <= 4 / 3 * 1.03
    for mine, ref in ((scale, b[:, 2] * b[:, 3] / (height * width)), (aspect, b[:, 3] / b[:, 2]),
                      (top / height, b[:, 0] / height), (left / width, b[:, 1] / width)):
        grid = np.sort(np.concatenate([mine, ref]))
        ks = np.abs(np.searchsorted(np.sort(mine), grid, "right") / n
                    - np.searchsorted(np.sort(ref), grid, "right") / n).max()
        assert ks < 0.07  # two-sample KS, 1500 each: p ~ 0.001 at 0.07
    # An image too flat for any attempt: torchvision's centre-crop fallback, exactly.
    np.testing.assert_array_equal(ours(10, 400, 3), theirs(10, 400, 3))


def test_train_crops_in_pipeline(tmp_path):
    """End to end: a coordinate-coded image (R = column, G = row) shows each crop's window."""
    y, x = np.mgrid[0:256, 0:256]
    coded = np.stack([x, y, np.zeros_like(x)], -1).astype(np.uint8)
    (tmp_path / "a").mkdir()
    for i in range(20):  # 18 train, 2 carved out
        Image.fromarray(coded).save(tmp_path / "a" / f"{i}.png")
    cfg = DataConfig(dataset=f"folder:{tmp_path}", image_size=64, batch_size=16)
    batches = data.train_batches(cfg, seed=3)
    crops = np.concatenate([next(batches)["image"].reshape(-1, 64, 64, 3) for _ in range(4)])
    r, g = pixels(crops)[..., 0], pixels(crops)[..., 1]
    width = (r.max((1, 2)) - r.min((1, 2))) * 64 / 63 + 1
    height = (g.max((1, 2)) - g.min((1, 2))) * 64 / 63 + 1
    scale, aspect = width * height / 256**2, width / height
    assert scale.min() > 0.08 * 0.8 and scale.max() < 1.05
    assert aspect.min() > 0.75 * 0.9 and aspect.max() < 4 / 3 / 0.9
    assert 0.3 < scale.mean() < 0.75  # torchvision's mean for this image is ~0.53
    flipped = r[:, :, 0].mean(1) > r[:, :, -1].mean(1)
    assert 0.2 < flipped.mean() < 0.8
    rows_monotone = np.diff(g.mean(2), axis=1) >= -1  # never flipped vertically
    assert rows_monotone.all()


@pytest.mark.parametrize("augment", ["shift", "light"])
def test_pad_and_crop_views_are_shifts_of_the_image(tmp_path, augment):
    """shift and light: each view is the image zero-padded by size//8 and cropped at a random
    offset (torchvision's RandomCrop(size, padding)); light also flips half of them, shift
    never (a flipped digit or letter is another symbol)."""
    y, x = np.mgrid[0:16, 0:16]
    coded = np.stack([16 + 14 * x, 16 + 14 * y, np.full_like(x, 200)], -1).astype(np.uint8)
    (tmp_path / "a").mkdir()
    for i in range(20):
        Image.fromarray(coded).save(tmp_path / "a" / f"{i}.png")
    cfg = DataConfig(dataset=f"folder:{tmp_path}", image_size=16, crop_ratio=1.0,
                     batch_size=16, augment=augment)
    batches = data.train_batches(cfg, seed=5)
    views = np.concatenate([np.round(pixels(next(batches)["image"])).reshape(-1, 16, 16, 3)
                            for _ in range(4)])
    padded = np.pad(coded.astype(np.float32), ((2, 2), (2, 2), (0, 0)))
    windows = {(dy, dx, flip): padded[dy:dy + 16, dx:dx + 16, :][:, ::-1 if flip else 1]
               for dy in range(5) for dx in range(5) for flip in (False, True)}
    found = [next(k for k, w in windows.items() if np.array_equal(v, w)) for v in views]
    assert len({(dy, dx) for dy, dx, _ in found}) > 10  # the offsets vary
    flips = np.mean([flip for *_, flip in found])
    assert (flips == 0) if augment == "shift" else (0.2 < flips < 0.8)


# ---------------------------------------------------------------------- folders


def test_folder_info_and_formats(mixed_folder):
    info = data.dataset_info(DataConfig(dataset=f"folder:{mixed_folder}"))
    assert info.class_names == ("cat", "dog") and info.num_classes == 2
    assert (info.train_examples, info.eval_examples, info.eval_split) == (9, 5, "val")


def test_a_directory_is_a_folder_data_set(mixed_folder, tmp_path, monkeypatch):
    """As ImageFolder(root) takes it: absolute, relative (with or without ./) and ~ paths."""
    expected = data.dataset_info(DataConfig(dataset=f"folder:{mixed_folder}"))
    monkeypatch.chdir(mixed_folder.parent)
    monkeypatch.setenv("HOME", str(mixed_folder.parent))
    for given in (str(mixed_folder), mixed_folder.name, f"./{mixed_folder.name}",
                  f"~/{mixed_folder.name}"):
        info = data.dataset_info(DataConfig(dataset=given))
        assert dataclasses.replace(info, name=expected.name) == expected, given
    with pytest.raises(data.DataError, match="no such directory; give the path of a directory"):
        data.dataset_info(DataConfig(dataset=str(tmp_path / "missing")))


def test_corrupt_images_are_skipped_counted_or_fatal(mixed_folder):
    corrupt = str(mixed_folder / "train" / "dog" / "zz_corrupt.jpg")
    cfg = DataConfig(dataset=f"folder:{mixed_folder}", batch_size=8, image_size=32)
    batches = data.train_batches(cfg, seed=0)
    first = next(batches)  # 9 train files, batch 8: one epoch = one batch
    masks = [first["mask"]] + [next(batches)["mask"] for _ in range(3)]
    readable_seen = sum(m.sum() for m in masks)
    assert readable_seen == 32 - batches.skipped.count
    assert batches.skipped.ids == [corrupt] or batches.skipped.count == 0
    assert set(np.unique(first["mask"])) <= {0.0, 1.0}
    evals = data.eval_batches(dataclasses.replace(cfg, batch_size=4))
    assert sum(b["mask"].sum() for b in evals) == 4
    assert evals.skipped.count == 1
    assert evals.skipped.ids == [str(mixed_folder / "val" / "dog" / "zz_corrupt.jpg")]
    strict = DataConfig(dataset=f"folder:{mixed_folder}", batch_size=4, strict_images=True)
    with pytest.raises(data.DataError, match="zz_corrupt.jpg.*--strict-images"):
        list(data.eval_batches(strict))


def test_corrupt_train_image_counted_every_epoch(mixed_folder, tmp_path):
    """With a batch that covers the whole train split, the corrupt file is in every epoch."""
    root = tmp_path / "all"
    for f in (mixed_folder / "train").glob("*/*"):
        target = root / "train" / f.parent.name / f.name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(f.read_bytes())
    (root / "train" / "cat" / "0_rgb.jpg").unlink()  # 8 files left: batch 8 = all of them
    colour_folder(root, {"val": 2}, classes=2)  # a val split: nothing carved out of train
    cfg = DataConfig(dataset=f"folder:{root}", batch_size=8, image_size=32, eval_split="none")
    batches = data.train_batches(cfg, seed=1)
    masks = [next(batches)["mask"] for _ in range(3)]
    assert [m.sum() for m in masks] == [7, 7, 7]
    assert batches.skipped.count == 3
    assert batches.skipped.ids == [str(root / "train" / "dog" / "zz_corrupt.jpg")]
    # Batches fetched ahead by device_prefetch count only once used.
    batches = data.train_batches(cfg, seed=1, num_devices=1)
    ahead = data.device_prefetch(batches, size=3, devices=jax.local_devices()[:1])
    next(ahead)
    assert batches.skipped.count == 1
    next(ahead)
    assert batches.skipped.count == 2


def test_carved_validation_split(tmp_path):
    """root/<class>/: a stratified, fixed val split; the same whatever the training seed."""
    colour_folder(tmp_path / "flat", {"train": 60}, classes=3)
    flat = tmp_path / "flat" / "train"  # root/<class>/*.png
    cfg = colour_cfg(flat, val_fraction=0.2, batch_size=4)
    info = data.dataset_info(cfg)
    assert (info.train_examples, info.eval_examples, info.eval_split) == (48, 12, "val")
    seen = [(index_of(img), lab) for b in data.eval_batches(cfg)
            for img, lab, m in zip(b["image"].reshape(-1, 16, 16, 3), b["label"].ravel(),
                                   b["mask"].ravel(), strict=True) if m]
    assert len(seen) == 12
    assert all(i % 3 == label for i, label in seen)  # class{i % 3} -> label i % 3
    assert np.bincount([label for _, label in seen]).tolist() == [4, 4, 4]
    again = [index_of(img) for b in data.eval_batches(cfg)
             for img, m in zip(b["image"].reshape(-1, 16, 16, 3), b["mask"].ravel(),
                               strict=True) if m]
    assert again == [i for i, _ in seen]
    whole_epoch = next(data.train_batches(dataclasses.replace(cfg, batch_size=48), seed=5))
    train = {index_of(img) for img in whole_epoch["image"].reshape(-1, 16, 16, 3)}
    assert train | {i for i, _ in seen} == set(range(60)) and not train & {i for i, _ in seen}


def eval_examples(cfg: DataConfig) -> list[tuple[int, int]]:
    """(example index, label) of every real example of the eval split, in order."""
    return [(index_of(img), int(lab)) for b in data.eval_batches(cfg)
            for img, lab, m in zip(b["image"].reshape(-1, 16, 16, 3), b["label"].ravel(),
                                   b["mask"].ravel(), strict=True) if m]


def test_folder_slices_are_stratified_and_complementary(tmp_path):
    """A slice of a folder split takes its share of every class (the split is sorted by
    class, where a plain slice would take whole classes); complementary slices partition it,
    each kept in the split's order; the whole split is unchanged."""
    root = colour_folder(tmp_path, {"train": 61, "test": 9})  # class0 has 21 examples
    head = eval_examples(colour_cfg(root, batch_size=4, eval_split="train[:75%]"))
    tail = eval_examples(colour_cfg(root, batch_size=4, eval_split="train[75%:]"))
    assert (len(head), len(tail)) == (46, 15)
    assert np.bincount([label for _, label in tail]).tolist() == [5, 5, 5]
    assert sorted(i for i, _ in head + tail) == list(range(61))
    whole = eval_examples(colour_cfg(root, batch_size=4, eval_split="train"))
    assert eval_examples(colour_cfg(root, batch_size=4, eval_split="train[:100%]")) == whole
    assert [e for e in whole if e in tail] == tail  # the split's order (class, then path)
    assert eval_examples(colour_cfg(root, batch_size=4, eval_split="train[75%:]")) == tail


def test_holdout_splits_of_a_folder_and_of_tfds(tmp_path, digits_dir):
    """A validation split carved from the train split only: disjoint from the rest and from
    the eval split, the same in every run; TFDS's by its prepared (shuffled) order."""
    root = colour_folder(tmp_path, {"train": 60, "test": 9})
    cfg = colour_cfg(root, batch_size=4)
    rest, held = data.holdout_splits(cfg, 0.2)
    assert (rest, held) == ("train[0:48]", "train[48:60]")
    carved = colour_cfg(root, batch_size=4, train_split=rest, eval_split=held)
    info = data.dataset_info(carved)
    assert (info.train_examples, info.eval_examples, info.eval_split) == (48, 12, held)
    seen = eval_examples(carved)
    assert np.bincount([label for _, label in seen]).tolist() == [4, 4, 4]
    assert all(i < 60 for i, _ in seen)  # none of the test split's (60..68)
    epoch = next(data.train_batches(dataclasses.replace(carved, batch_size=48), seed=3))
    train = {index_of(img) for img in epoch["image"].reshape(-1, 16, 16, 3)}
    assert train | {i for i, _ in seen} == set(range(60)) and not train & {i for i, _ in seen}

    digits = DataConfig(dataset="digits", data_dir=digits_dir)
    assert data.holdout_splits(digits, 0.2) == ("train[0:1150]", "train[1150:1438]")
    both = dataclasses.replace(digits, train_split="train[:50%]+test[10:20]")
    assert data.holdout_splits(both, 0.2) == ("train[0:575]+test[10:18]",
                                               "train[575:719]+test[18:20]")
    with pytest.raises(data.DataError, match="leaves one side empty"):
        data.holdout_splits(dataclasses.replace(digits, train_split="train[:1]"), 0.2)
    with pytest.raises(data.DataError, match=r"must be in \(0, 1\)"):
        data.holdout_splits(digits, 1.0)


# ---------------------------------------------------------------------- coverage, sharding


def eval_indices(cfg: DataConfig, process_index: int, process_count: int) -> tuple[list, int]:
    batches = list(data._eval_batches(cfg, num_devices=4, process_index=process_index,
                                      process_count=process_count))
    for b in batches:
        assert b["image"].shape[:2] == b["mask"].shape == b["label"].shape
    seen = [index_of(img) for b in batches
            for img, m in zip(b["image"].reshape(-1, 16, 16, 3), b["mask"].ravel(), strict=True)
            if m]
    return seen, len(batches)


@pytest.mark.parametrize("process_count", [1, 2, 3])
def test_every_eval_example_exactly_once(tmp_path, process_count):
    """37 val examples, 4 devices, 1-3 processes: each example once, equal batch counts."""
    root = colour_folder(tmp_path, {"train": 8, "val": 37})
    cfg = colour_cfg(root, batch_size=4 * process_count * 2)
    results = [eval_indices(cfg, p, process_count) for p in range(process_count)]
    seen = sorted(i for indices, _ in results for i in indices)
    assert seen == list(range(8, 45))
    counts = {n for _, n in results}
    assert counts == {math.ceil(math.ceil(37 / process_count) / 8)}


def test_digits_eval_over_two_processes_covers_the_test_split(digits_dir):
    """The TFDS path with real slicing: two processes' masks sum to the split, label counts
    equal scikit-learn's test labels."""
    from sklearn.datasets import load_digits

    from jaxsft.data.digits import split_indices

    cfg = DataConfig(dataset="digits", data_dir=digits_dir, image_size=32, batch_size=24)
    labels = []
    for p in range(2):
        for b in data._eval_batches(cfg, num_devices=4, process_index=p, process_count=2):
            labels += b["label"].ravel()[b["mask"].ravel() > 0].tolist()
    expected = load_digits().target[split_indices()["test"]]
    assert np.bincount(labels).tolist() == np.bincount(expected).tolist()


def test_processes_read_disjoint_parts_of_every_global_batch_and_epochs_reshuffle(tmp_path):
    """A class-sorted folder: each process's part of a global batch is its slice, the parts
    are disjoint, every process sees every class, and an epoch covers the split once."""
    root = colour_folder(tmp_path, {"train": 40, "val": 3}, classes=2)
    cfg = colour_cfg(root, batch_size=8)
    its = [data._train_batches(cfg, seed=0, start_step=0, num_devices=2, process_index=p,
                               process_count=2) for p in range(2)]
    epochs = [[], []]
    for step in range(10):
        parts = [[index_of(img) for img in next(it)["image"].reshape(-1, 16, 16, 3)]
                 for it in its]
        assert not set(parts[0]) & set(parts[1])
        assert {i % 2 for i in parts[0] + parts[1]} == {0, 1}
        epochs[step // 5] += parts[0] + parts[1]
    assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(40))
    assert epochs[0] != epochs[1]  # a new order each epoch


def test_index_sampler_global_batches_and_local_slices():
    from jaxsft.data.sampler import IndexSampler

    sampler = IndexSampler(num_examples=23, global_batch=6, seed=3)
    assert sampler.steps_per_epoch == 3
    assert sorted(sampler.epoch_order(1)) == list(range(23))
    assert not np.array_equal(sampler.epoch_order(0), sampler.epoch_order(1))
    for processes in (1, 2, 3):
        streams = [sampler.local_batches(2, p, processes) for p in range(processes)]
        for step in range(2, 8):
            parts = [next(s) for s in streams]
            assert {epoch for epoch, _ in parts} == {step // 3}
            np.testing.assert_array_equal(np.concatenate([i for _, i in parts]),
                                          sampler.global_batch_indices(step))


@pytest.mark.parametrize("augment,cache", [("imagenet", False), ("light", True)])
def test_folder_stream_is_the_same_on_any_topology(tmp_path, augment, cache):
    """Augmented, batch 8 of 26 (3 steps per epoch), two epochs and a step of the third."""
    rng = np.random.default_rng(0)
    for i in range(26):
        folder = tmp_path / "train" / f"c{i % 3}"  # sorted by class on disk
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (30 + i, 40, 3), np.uint8)).save(
            folder / f"{i:02d}.png")
    colour_folder(tmp_path, {"val": 2})
    cfg = DataConfig(dataset=f"folder:{tmp_path}", image_size=16, batch_size=8,
                     augment=augment, cache=cache)
    one = check_topology_invariance(cfg, 7)
    assert not np.array_equal(one[0]["image"], one[3]["image"])


@pytest.fixture(scope="module")
def digits_array_record(tmp_path_factory) -> str:
    """digits prepared as ArrayRecord: read through tfds.data_source (random access)."""
    from jaxsft.data.digits import Digits

    path = str(tmp_path_factory.mktemp("tfds_ar"))
    Digits(data_dir=path, file_format="array_record").download_and_prepare()
    return path


@pytest.mark.parametrize("prepared", ["tfrecord in memory", "array_record", "streamed"])
def test_tfds_stream_is_the_same_on_any_topology(digits_dir, digits_array_record, prepared,
                                                 monkeypatch, caplog):
    """digits, light augmentation, batch 64 of 200 (3 steps per epoch), two epochs and a
    step: through tfds.data_source, a tfrecord split read into memory (the same stream), and
    the streamed fallback for a tfrecord split too large for memory."""
    import jaxsft.data.sources as sources

    if prepared == "streamed":
        monkeypatch.setattr(sources, "IN_MEMORY_BYTES", 0)
    cfg = DataConfig(dataset="digits", train_split="train[:200]", image_size=16,
                     batch_size=64, augment="light",
                     data_dir=digits_array_record if prepared == "array_record" else digits_dir)
    with caplog.at_level("INFO", logger="jaxsft.data.sources"):
        one = check_topology_invariance(cfg, 7)
    said = {"tfrecord in memory": "reading train[:200] (0.2 MB) into memory once",
            "streamed": "too large to hold in memory", "array_record": None}[prepared]
    messages = [r.getMessage() for r in caplog.records if r.name == "jaxsft.data.sources"]
    assert (said is None and not messages) or all(said in m for m in messages), messages
    if prepared != "streamed":  # random access by the same index: one stream
        monkeypatch.setattr(sources, "IN_MEMORY_BYTES", 1 << 30)
        other = digits_array_record if prepared != "array_record" else digits_dir
        assert_same_batches(global_batches(dataclasses.replace(cfg, data_dir=other), 1, 4, 2),
                            one[:2])


# ---------------------------------------------------------------------- reproducibility


def stream(cfg: DataConfig, start: int, n: int) -> list[dict]:
    it = data._train_batches(cfg, seed=11, start_step=start, num_devices=4, process_index=0,
                             process_count=1)
    return [next(it) for _ in range(n)]


@pytest.mark.parametrize("augment,cache", [("imagenet", False), ("light", False),
                                           ("imagenet", True)])
def test_resume_from_any_step_is_bit_exact(digits_dir, augment, cache):
    """start_step=k yields exactly the batches k, k+1, ... of start_step=0 (5 steps/epoch)."""
    cfg = DataConfig(dataset="digits", data_dir=digits_dir, image_size=32, batch_size=256,
                     augment=augment, cache=cache, shuffle_buffer=500)
    full = stream(cfg, 0, 8)
    for start in (2, 5, 6):
        for got, want in zip(stream(cfg, start, 8 - start), full[start:], strict=True):
            for key in ("image", "label", "mask"):
                np.testing.assert_array_equal(got[key], want[key])
    assert not np.array_equal(full[0]["label"], full[5]["label"])  # epoch 1 reshuffled
    other_seed = data._train_batches(cfg, seed=12, start_step=0, num_devices=4,
                                     process_index=0, process_count=1)
    assert not np.array_equal(next(other_seed)["image"], full[0]["image"])


def test_resume_folder_source_is_bit_exact(mixed_folder):
    cfg = DataConfig(dataset=f"folder:{mixed_folder}", batch_size=4, image_size=32)
    full = stream(cfg, 0, 5)  # 2 steps per epoch
    for got, want in zip(stream(cfg, 3, 2), full[3:], strict=True):
        np.testing.assert_array_equal(got["image"], want["image"])
        np.testing.assert_array_equal(got["label"], want["label"])


# ---------------------------------------------------------------------- digits


def test_digits_is_sklearn_digits(digits_dir):
    """Splits partition sklearn's 1,797 digits (20% of each class in test); the images are
    sklearn's, scaled and upscaled; labels match."""
    from sklearn.datasets import load_digits

    from jaxsft.data.digits import split_indices, to_rgb

    digits = load_digits()
    cfg = DataConfig(dataset="digits", data_dir=digits_dir, image_size=32, crop_ratio=1.0,
                     batch_size=32)
    info = data.dataset_info(cfg)
    assert info.class_names == tuple("0123456789") and info.num_classes == 10
    assert info.eval_split == "test" and info.train_examples + info.eval_examples == 1797
    idx = split_indices()
    assert not set(idx["train"]) & set(idx["test"])
    per_class = np.bincount(digits.target)
    assert np.bincount(digits.target[idx["test"]]).tolist() == [round(0.2 * n)
                                                               for n in per_class]
    def spec(image):  # levels 0..16 -> 0..255, PIL bilinear to 32x32, grey -> RGB
        grey = Image.fromarray(np.round(image * 255 / 16).astype(np.uint8))
        return np.asarray(grey.resize((32, 32), Image.BILINEAR), np.float32)

    references = np.stack([spec(digits.images[i]) for i in idx["test"]])
    np.testing.assert_array_equal(to_rgb(digits.images[0])[..., 1], spec(digits.images[0]))
    seen = 0
    for b in data.eval_batches(cfg):
        for image, label, m in zip(b["image"].reshape(-1, 32, 32, 3), b["label"].ravel(),
                                   b["mask"].ravel(), strict=True):
            if m:
                seen += 1
                rgb = pixels(image)
                np.testing.assert_allclose(rgb[..., 0], rgb[..., 2], atol=1e-3)
                dist = np.abs(references - rgb[..., 0]).max((1, 2))
                assert dist.min() < 0.01
                assert label == digits.target[idx["test"][dist.argmin()]]
    assert seen == info.eval_examples


# ---------------------------------------------------------------------- errors


def test_error_batch_not_divisible(digits_dir):
    cfg = DataConfig(dataset="digits", data_dir=digits_dir, batch_size=6)
    with pytest.raises(data.DataError, match="--batch-size 6 does not split evenly over 4 "
                                             "devices: use a multiple of 4"):
        data.train_batches(cfg, seed=0)
    with pytest.raises(data.DataError, match="not divisible by the 4 processes"):
        data._train_batches(cfg, seed=0, start_step=0, num_devices=1, process_index=0,
                            process_count=4)
    with pytest.raises(data.DataError, match="--eval-batch-size 10 does not split evenly"):
        data.eval_batches(DataConfig(dataset="digits", data_dir=digits_dir, eval_batch_size=10))
    with pytest.raises(data.DataError, match="fewer than --batch-size 4096"):
        data.train_batches(DataConfig(dataset="digits", data_dir=digits_dir, batch_size=4096),
                           seed=0)


def test_error_empty_and_unknown_splits(digits_dir, tmp_path):
    with pytest.raises(data.DataError, match=r"split 'train\[:0\]' of digits has no examples"):
        data.dataset_info(DataConfig(dataset="digits", data_dir=digits_dir,
                                     train_split="train[:0]"))
    with pytest.raises(data.DataError, match="split 'validation' of digits.*splits: .*test"):
        data.dataset_info(DataConfig(dataset="digits", data_dir=digits_dir,
                                     eval_split="validation"))
    root = colour_folder(tmp_path, {"train": 4})
    with pytest.raises(data.DataError, match=r"split 'val\[:0\]' .* has no examples"):
        data.dataset_info(colour_cfg(root, eval_split="val[:0]"))
    none = DataConfig(dataset="digits", data_dir=digits_dir, eval_split="none")
    assert data.dataset_info(none).eval_split is None
    with pytest.raises(data.DataError, match="no validation or test split: give --eval-split"):
        data.eval_batches(none)


def test_error_folder_without_images(tmp_path):
    (tmp_path / "cats").mkdir()
    (tmp_path / "cats" / "readme.txt").write_text("no images here")
    with pytest.raises(data.DataError, match="holds no images: expected"):
        data.dataset_info(DataConfig(dataset=f"folder:{tmp_path}"))
    with pytest.raises(data.DataError, match="no such directory"):
        data.dataset_info(DataConfig(dataset=f"folder:{tmp_path}/missing"))


def test_error_unknown_dataset_and_features(digits_dir):
    with pytest.raises(data.DataError, match="unknown data set 'tf_flowerz' .did you mean "
                                             "tf_flowers"):
        data.dataset_info(DataConfig(dataset="tf_flowerz"))
    for name in ("no_such_set", "not a name!", "cifar10:9.9.9"):  # neither TFDS nor a directory
        with pytest.raises(data.DataError) as e:
            data.dataset_info(DataConfig(dataset=name))
        assert "\n" not in str(e.value), str(e.value)
        assert "/path/to/images or folder:/path/to/images" in str(e.value)
    with pytest.raises(data.DataError, match="--label-key 'digit' is no ClassLabel feature"):
        data.dataset_info(DataConfig(dataset="digits", data_dir=digits_dir, label_key="digit"))


def test_error_manual_download_dataset(tmp_path):
    with pytest.raises(data.DataError, match="imagenet2012 is not prepared in .* download it "
                                             "by hand into .*downloads/manual"):
        data.dataset_info(DataConfig(dataset="imagenet2012", data_dir=str(tmp_path)))


def test_error_dataset_cannot_be_downloaded(tmp_path, monkeypatch):
    import tensorflow_datasets as tfds

    def offline(self, *args, **kwargs):
        raise ConnectionError("Network is unreachable")

    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", offline)
    with pytest.raises(data.DataError, match=f"cifar10 is not prepared in {tmp_path} and could "
                                             "not be downloaded .ConnectionError"):
        data.dataset_info(DataConfig(dataset="cifar10", data_dir=str(tmp_path)))


def test_load_image_errors(mixed_folder):
    cfg = DataConfig()
    with pytest.raises(data.DataError, match="no such image file"):
        data.load_image(str(mixed_folder / "nope.jpg"), cfg)
    with pytest.raises(data.DataError, match="cannot read image .*zz_corrupt.jpg"):
        data.load_image(str(mixed_folder / "val" / "dog" / "zz_corrupt.jpg"), cfg)


# ---------------------------------------------------------------------- devices, imports


def test_device_prefetch_shards_over_local_devices():
    import jax

    batches = [{"image": np.full((4, 2, 3), i, np.float32), "label": np.arange(8).reshape(4, 2)}
               for i in range(5)]
    out = list(data.device_prefetch(iter(batches), size=2))
    assert len(out) == 5
    for i, b in enumerate(out):
        assert isinstance(b["image"], jax.Array)
        np.testing.assert_array_equal(np.asarray(b["image"]), batches[i]["image"])
        shards = sorted(b["label"].addressable_shards, key=lambda s: s.index[0].start)
        assert [s.device for s in shards] == jax.local_devices()[:4]
        assert [s.data.tolist() for s in shards] == [[[0, 1]], [[2, 3]], [[4, 5]], [[6, 7]]]
    summed = jax.pmap(lambda b: b["image"].sum(), axis_name="batch")(out[3])
    np.testing.assert_array_equal(np.asarray(summed), [18.0] * 4)


def test_importing_jaxsft_data_changes_nothing():
    """No TensorFlow (nor JAX) import and no os.environ edit: TF starts when data is read.
    Measured after `import jaxsft`, whose own import is jaxsft/__init__.py's business."""
    code = ("import os, sys, jaxsft; before = dict(os.environ)\n"
            "import jaxsft.data, jaxsft.data.folder, jaxsft.data.types, jaxsft.data.runtime\n"
            "assert dict(os.environ) == before, set(os.environ.items()) ^ set(before.items())\n"
            "assert 'tensorflow' not in sys.modules, 'tensorflow imported'\n"
            "assert 'jax' not in sys.modules, 'jax imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_quiet_tensorflow_sets_defaults_only():
    environ = {"TF_CPP_MIN_LOG_LEVEL": "0"}
    data.quiet_tensorflow(environ)
    assert environ == {"TF_CPP_MIN_LOG_LEVEL": "0", "TF_ENABLE_ONEDNN_OPTS": "0"}


def test_cli_stderr_has_no_tensorflow_noise(tmp_path):
    """A short CLI run that starts TF and TFDS (an unknown name, whose hint lists the TFDS
    builders): its stderr is our one error line, without TF's oneDNN banner or the failed
    Google bearer-token lookup of a gs:// listing."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("TF_CPP_MIN_LOG_LEVEL", "TF_ENABLE_ONEDNN_OPTS")}
    run = subprocess.run(
        [sys.executable, "-m", "jaxsft.train", "--dataset", "tf_flowerz", "--steps", "1",
         "--workdir", str(tmp_path / "wd"), "--data-dir", str(tmp_path / "tfds")],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 2, run.stderr
    assert "unknown data set 'tf_flowerz'" in run.stderr
    assert "oneDNN custom operations" not in run.stderr, run.stderr
    assert "bearer token" not in run.stderr, run.stderr
