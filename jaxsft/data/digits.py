"""`digits`: scikit-learn's bundled 8x8 handwritten digits as a TFDS data set, fully offline.

1,797 images of 10 classes (the UCI "Optical Recognition of Handwritten Digits" test set,
shipped inside scikit-learn, so preparing it downloads nothing). Each 8x8 image of 17 grey
levels (0..16) is scaled to 0..255 and upscaled to 32x32 RGB with bilinear interpolation:
32x32 is the smallest input a ResNet's five stride-2 stages reduce to a non-degenerate map,
and bilinear upscaling gives the smooth strokes the crop-and-resize augmentations expect
(a nearest-neighbour 8x8 block image aliases under them). The split is fixed: a stratified
20% of each class (seeded permutation, seed 0) is `test` (359 images), the rest `train`
(1,438), so every run and every machine sees the same images in each split.

Part of the TensorFlow side of jaxsft.data (it imports TFDS); jaxsft.data.sources builds it.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

SIZE = 32
TEST_FRACTION = 0.2
SPLIT_SEED = 0


def split_indices() -> dict[str, np.ndarray]:
    """Indices into sklearn's digits of each split: stratified, seeded, sorted."""
    from sklearn.datasets import load_digits

    labels = load_digits().target
    test = []
    for digit in range(10):
        members = np.flatnonzero(labels == digit)
        order = np.random.default_rng([SPLIT_SEED, digit]).permutation(len(members))
        test.extend(members[order[: round(len(members) * TEST_FRACTION)]])
    is_test = np.zeros(len(labels), bool)
    is_test[test] = True
    return {"train": np.flatnonzero(~is_test), "test": np.flatnonzero(is_test)}


def to_rgb(image: np.ndarray) -> np.ndarray:
    """An 8x8 image of levels 0..16 -> uint8 RGB [SIZE, SIZE, 3]."""
    grey = Image.fromarray(np.round(image * (255 / 16)).astype(np.uint8), mode="L")
    return np.asarray(grey.resize((SIZE, SIZE), Image.BILINEAR).convert("RGB"))


class Digits(tfds.core.GeneratorBasedBuilder):
    """scikit-learn's 8x8 digits, upscaled to 32x32 RGB; splits train (1,438) / test (359)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(SIZE, SIZE, 3)),
                "label": tfds.features.ClassLabel(names=[str(d) for d in range(10)]),
            }),
            supervised_keys=("image", "label"),
            homepage="https://scikit-learn.org/stable/datasets/toy_dataset.html#digits-dataset",
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict:
        del dl_manager  # nothing to download: the data ship with scikit-learn
        return {name: self._generate_examples(idx) for name, idx in split_indices().items()}

    def _generate_examples(self, indices: np.ndarray) -> Iterator[tuple[int, dict]]:
        from sklearn.datasets import load_digits

        digits = load_digits()
        for i in indices:
            yield int(i), {"image": to_rgb(digits.images[i]), "label": int(digits.target[i])}
