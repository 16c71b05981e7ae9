"""jaxsft.data on named TFDS data sets under tfds.testing.mock_data (offline).

The mock generates the examples from each builder's real features; split sizes come from
metadata written here. References: the builder's own feature info, and torchvision's eval
transform on the very images TFDS serves.
"""

# torchvision first: in this environment, importing it after TensorFlow crashes (triton).
from torchvision import transforms as tvt  # noqa: I001

import io

import numpy as np
import pytest
from helpers import assert_same_batches, global_batches
from PIL import Image

from jaxsft import data
from jaxsft.config import DataConfig

N = 24  # examples the mock serves per split


@pytest.fixture(scope="module")
def tfds():
    import tensorflow_datasets

    return tensorflow_datasets


def write_metadata(tfds, name: str, root, splits: dict[str, int]) -> None:
    """dataset_info.json for `name` in `root` with these split sizes (what the mock reads)."""
    builder = tfds.builder(name, data_dir=str(root))
    infos = [
        tfds.core.SplitInfo(
            name=split, shard_lengths=[n], num_bytes=0,
            filename_template=tfds.core.ShardedFileTemplate(
                data_dir=builder.data_path, dataset_name=builder.name, split=split,
                filetype_suffix="tfrecord"),
        )
        for split, n in splits.items()
    ]
    builder.info.set_splits(tfds.core.SplitDict(infos))
    builder.data_path.mkdir(parents=True, exist_ok=True)
    builder.info.write_to_directory(builder.data_path)


def mocked(tfds, root, **kwargs):
    return tfds.testing.mock_data(num_examples=N, data_dir=str(root),
                                  policy=tfds.testing.MockPolicy.USE_FILES, **kwargs)


@pytest.mark.parametrize("name,splits,eval_split", [
    ("tf_flowers", {"train": N}, "train"),  # tf_flowers has only a train split
    ("cifar10", {"train": N, "test": N}, "test"),
])
def test_named_dataset_end_to_end(tfds, tmp_path, name, splits, eval_split):
    write_metadata(tfds, name, tmp_path, splits)
    cfg = DataConfig(dataset=name, image_size=32, batch_size=8,
                     eval_split=None if name == "cifar10" else "train")
    with mocked(tfds, tmp_path):
        builder = tfds.builder(name)
        info = data.dataset_info(cfg)
        label = builder.info.features["label"]
        assert (info.num_classes, info.class_names) == (label.num_classes, tuple(label.names))
        assert (info.image_key, info.label_key) == ("image", "label")
        assert (info.train_examples, info.eval_split, info.eval_examples) == (N, eval_split, N)

        batches = data.train_batches(cfg, seed=0)
        for _ in range(4):  # 3 steps per epoch: crosses into the second epoch
            b = next(batches)
            assert b["image"].shape == (4, 2, 32, 32, 3) and b["image"].dtype == np.float32
            assert b["label"].dtype == np.int32 and b["mask"].tolist() == [[1, 1]] * 4
            assert np.isfinite(b["image"]).all() and 0.3 < b["image"].std() < 3
            assert ((b["label"] >= 0) & (b["label"] < info.num_classes)).all()

        features = tfds.decode.PartialDecoding(  # the mock draws only the features read
            {"image": True, "label": True}, decoders={"image": tfds.decode.SkipDecoding()})
        served = builder.as_dataset(split=eval_split, decoders=features)
        references, labels = [], []
        for ex in served.as_numpy_iterator():  # the same examples the eval pass reads
            with Image.open(io.BytesIO(ex["image"])) as im:
                references.append(torchvision_eval(im.convert("RGB"), 32))
            labels.append(ex["label"])
        evals = list(data.eval_batches(cfg))
    images = np.concatenate([e["image"].reshape(-1, 32, 32, 3) for e in evals])
    mask = np.concatenate([e["mask"].ravel() for e in evals])
    assert mask.sum() == N and mask[:N].all()
    np.testing.assert_array_equal(np.concatenate([e["label"].ravel() for e in evals])[:N],
                                  labels)
    assert np.abs(images[:N] - np.stack(references)).mean() < 0.02


def torchvision_eval(image: Image.Image, size: int) -> np.ndarray:
    tf = tvt.Compose([tvt.Resize(int(size / 0.875)), tvt.CenterCrop(size), tvt.ToTensor(),
                      tvt.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    return tf(image).numpy().transpose(1, 2, 0)


def test_feature_keys_found_or_given(tfds, tmp_path):
    """oxford_iiit_pet has two Image and two ClassLabel features: 'image'/'label' are
    chosen; --label-key species selects the other (2 classes)."""
    write_metadata(tfds, "oxford_iiit_pet", tmp_path, {"train": N, "test": N})
    with mocked(tfds, tmp_path):
        info = data.dataset_info(DataConfig(dataset="oxford_iiit_pet"))
        assert (info.image_key, info.label_key, info.num_classes) == ("image", "label", 37)
        cfg = DataConfig(dataset="oxford_iiit_pet", label_key="species", image_size=32,
                         batch_size=8)
        info = data.dataset_info(cfg)
        assert (info.label_key, info.class_names) == ("species", ("Cat", "Dog"))
        b = next(data.train_batches(cfg, seed=0))
        assert set(np.unique(b["label"])) <= {0, 1}
        with pytest.raises(data.DataError, match="--image-key 'label' is no Image feature"):
            data.dataset_info(DataConfig(dataset="oxford_iiit_pet", image_key="label"))


def test_labels_outside_the_classes_are_refused(tfds, tmp_path):
    """An unlabelled split (label -1, as in stl10's) stops the run with the example's id."""
    import tensorflow as tf

    png = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 20, 30)).save(png, "PNG")

    def unlabelled(self, split, decoders=None, read_config=None, **kwargs):
        return tf.data.Dataset.from_tensor_slices({
            "image": [png.getvalue()] * N, "label": tf.fill([N], tf.constant(-1, tf.int64)),
            "tfds_id": [f"tf_flowers-unlabelled__{i}" for i in range(N)],
        })

    write_metadata(tfds, "tf_flowers", tmp_path, {"train": N})
    with mocked(tfds, tmp_path, as_dataset_fn=unlabelled):
        cfg = DataConfig(dataset="tf_flowers", image_size=16, batch_size=8)
        with pytest.raises(data.DataError, match=r"label -1 of tf_flowers-unlabelled__\d+ is "
                                                 r"outside \[0, 5\).*labelled split"):
            next(data.train_batches(cfg, seed=0))


def test_the_stream_is_the_same_on_any_topology(tfds, tmp_path):
    """cifar10 (tfrecord metadata: read into memory once), imagenet augmentation, batch 8 of
    24, two epochs: one process of 4 devices, two of 2 and one of 1 read the same global
    batches, bit for bit; a resume on two processes continues the one-process stream. (Fewer
    topologies than test_data's check_topology_invariance: each reader here builds its own
    TFDS pipeline, ~1 s apiece.)"""
    write_metadata(tfds, "cifar10", tmp_path, {"train": N, "test": N})
    cfg = DataConfig(dataset="cifar10", image_size=16, batch_size=8, augment="imagenet")
    with mocked(tfds, tmp_path):
        one = global_batches(cfg, 1, 4, 6, seed=3)
        assert_same_batches(global_batches(cfg, 2, 2, 6, seed=3), one)
        assert_same_batches(global_batches(cfg, 1, 1, 6, seed=3), one)
        assert_same_batches(global_batches(cfg, 2, 2, 2, start=4, seed=3), one[4:])
    assert not np.array_equal(one[0]["image"], one[3]["image"])
