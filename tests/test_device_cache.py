"""jaxsft.data.device_cache: the decoded-once cache and the on-device augmentation."""

from __future__ import annotations

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsft.data import device_cache as dc

SHAPES = ((30, 40), (40, 30), (24, 60), (36, 36))


def smooth(height: int, width: int, seed: int) -> np.ndarray:
    """A smooth colour field (resampling differences stay small on it, unlike on noise)."""
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    f = np.random.default_rng(seed).uniform(1, 4, 3)
    rgb = np.stack([np.sin(f[0] * x + 2 * y), np.cos(f[1] * y - x), np.sin(f[2] * (x + y))], -1)
    return np.clip(128 + 100 * rgb, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def cache() -> dc.ImageCache:
    images = [smooth(*SHAPES[i % 4], seed=i) for i in range(12)]
    return dc.build_cache(images, [i % 5 for i in range(12)], stored=36)


def test_importing_it_imports_no_tensorflow():
    code = ("import sys, jaxsft.data.device_cache\n"
            "assert 'tensorflow' not in sys.modules, 'imported tensorflow'\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_constants_are_the_tf_paths():
    transforms = pytest.importorskip("jaxsft.data.transforms")
    assert dc.IMAGENET_MEAN == transforms.IMAGENET_MEAN
    assert dc.IMAGENET_STD == transforms.IMAGENET_STD
    assert dc.RRC_SCALE == transforms.RRC_SCALE and dc.RRC_RATIO == transforms.RRC_RATIO


def test_cache_layout(cache):
    assert cache.images.shape == (12, 36, 36, 3) and cache.images.dtype == np.uint8
    assert cache.sizes.tolist()[:4] == [list(s) for s in SHAPES]
    assert cache.stored == 36 and len(cache) == 12 and not cache.on_device
    assert dc.stored_size(224) == 256
    device = dc.to_device(cache, jax.devices()[0])
    assert device.on_device and np.array_equal(np.asarray(device.images), cache.images)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_train_batch_shapes_dtype_and_range(cache, dtype):
    idx = np.array([3, 0, 7, 11, 5])
    batch = dc.train_batch(cache, idx, step=2, seed=1, size=32, dtype=dtype)
    assert batch["image"].shape == (5, 32, 32, 3) and batch["image"].dtype == dtype
    assert batch["label"].tolist() == [i % 5 for i in idx]
    x = np.asarray(batch["image"], np.float32)
    lo = (0 - np.array(dc.IMAGENET_MEAN)) / np.array(dc.IMAGENET_STD)
    hi = (1 - np.array(dc.IMAGENET_MEAN)) / np.array(dc.IMAGENET_STD)
    tol = 0.02 if dtype == jnp.bfloat16 else 1e-5
    assert (x >= lo - tol).all() and (x <= hi + tol).all()
    pixels = x * np.array(dc.IMAGENET_STD) + np.array(dc.IMAGENET_MEAN)
    if dtype == jnp.float32:  # whole 8-bit levels, as PIL's output
        assert np.allclose(pixels * 255, np.round(pixels * 255), atol=1e-3)


def test_identity_window_and_flip():
    image = smooth(32, 32, seed=3)
    window = jnp.array([0.0, 0.0, 32.0, 32.0])
    original = jnp.array([32, 32])
    same = dc.resample(jnp.asarray(image), window, original, 32)
    assert np.array_equal(np.asarray(same), image.astype(np.float32))
    flipped = dc.resample(jnp.asarray(image), window, original, 32, flip=True)
    assert np.array_equal(np.asarray(flipped), image[:, ::-1].astype(np.float32))


def test_batches_resume_exactly_and_do_not_depend_on_the_split(cache):
    run = dc.train_batches(cache, global_batch=4, seed=7, size=32)
    batches = [next(run) for _ in range(5)]  # 3 steps per epoch: crosses an epoch
    resumed = next(dc.train_batches(cache, global_batch=4, seed=7, size=32, start_step=4))
    assert np.array_equal(np.asarray(resumed["image"]), np.asarray(batches[4]["image"]))
    assert np.array_equal(np.asarray(resumed["label"]), np.asarray(batches[4]["label"]))
    # The examples come from the tf.data path's sampler.
    from jaxsft.data.sampler import IndexSampler

    idx = IndexSampler(12, 4, 7).global_batch_indices(4)
    assert np.asarray(batches[4]["label"]).tolist() == [i % 5 for i in idx]
    # Two halves computed apart (two processes, or devices) are the global batch.
    halves = [dc.train_batch(cache, part, step=4, seed=7, size=32)["image"]
              for part in (idx[:2], idx[2:])]
    whole = np.asarray(batches[4]["image"])
    assert np.allclose(np.concatenate(halves), whole, atol=1e-6)
    # A cache on the device gives the same batch as one in host memory.
    device = dc.to_device(cache, jax.devices()[0])
    on_device = dc.train_batch(device, idx, step=4, seed=7, size=32)["image"]
    assert np.array_equal(np.asarray(on_device), whole)
    # Other steps and seeds draw other crops.
    other = dc.train_batch(cache, idx, step=5, seed=7, size=32)["image"]
    assert not np.array_equal(np.asarray(other), whole)


def test_eval_view_matches_resize_and_centre_crop_of_the_original():
    """Resize(floor(32 / 0.875) = 36) + CenterCrop(32) with PIL on the original, against one
    resampling of the stored square (which is itself a resize: within a few 8-bit levels)."""
    from PIL import Image

    images = [smooth(h, w, seed=i) for i, (h, w) in enumerate(((60, 80), (80, 60), (45, 90)))]
    cache = dc.build_cache(images, [0, 1, 2], stored=48)
    got = np.asarray(dc.eval_batch(cache, np.arange(3), 32, 0.875))
    got = (got * np.array(dc.IMAGENET_STD) + np.array(dc.IMAGENET_MEAN)) * 255
    for image, view in zip(images, got):
        h, w = image.shape[:2]
        nh, nw = (36 * h // w, 36) if w <= h else (36, 36 * w // h)
        resized = np.asarray(Image.fromarray(image).resize((nw, nh), Image.Resampling.BILINEAR))
        top, left = round((nh - 32) / 2), round((nw - 32) / 2)
        want = resized[top:top + 32, left:left + 32].astype(np.float64)
        diff = np.abs(view - want)
        assert diff.mean() < 1.5 and np.quantile(diff, 0.99) < 6, (diff.mean(), diff.max())


def ks_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic."""
    grid = np.union1d(a, b)
    cdf_a = np.searchsorted(np.sort(a), grid, side="right") / len(a)
    cdf_b = np.searchsorted(np.sort(b), grid, side="right") / len(b)
    return float(np.abs(cdf_a - cdf_b).max())


@pytest.mark.parametrize("height, width", [(375, 500), (100, 500)])
def test_crop_statistics_match_the_tf_paths_sampler(height, width):
    """Area fraction and aspect ratio of 4,000 RandomResizedCrop windows from each sampler.

    The draws differ (JAX's threefry, TF's Philox), the distributions must not. With
    n = m = 4000, the two-sample KS statistic exceeds 1.95 * sqrt(2 / 4000) = 0.044 with
    probability 0.001 when the distributions are equal; the means agree within 5 standard
    errors. 100x500 (aspect 5) sends a share of draws to the centre-crop fallback: its rate
    is compared too (binomial standard error at most 0.008)."""
    tf = pytest.importorskip("tensorflow")
    from jaxsft.data import transforms

    n = 4000
    keys = jax.random.split(jax.random.key(0), n)
    h_, w_ = jnp.full((n,), height), jnp.full((n,), width)
    ours = np.asarray(jax.vmap(dc.crop_window)(keys, h_, w_), np.float64)

    @tf.function
    def windows(seeds):
        return tf.map_fn(lambda k: transforms.imagenet_window(k)(tf.constant([height, width])),
                         seeds, fn_output_signature=tf.int32)

    seeds = tf.constant(np.stack([np.arange(n), np.full(n, 11)], 1), tf.int64)
    theirs = windows(seeds).numpy().astype(np.float64)
    for w in (ours, theirs):
        assert (w[:, 0] >= 0).all() and (w[:, 0] + w[:, 2] <= height).all()
        assert (w[:, 1] >= 0).all() and (w[:, 1] + w[:, 3] <= width).all()

    def stats(w):
        area = w[:, 2] * w[:, 3] / (height * width)
        aspect = np.log(w[:, 3] / w[:, 2])
        fallback = (w[:, 2] == height) | (w[:, 3] == width)
        return area, aspect, fallback

    for a, b in zip(stats(ours)[:2], stats(theirs)[:2]):
        assert ks_distance(a, b) < 1.95 * np.sqrt(2 / n)
        se = np.sqrt(a.var() / n + b.var() / n)
        assert abs(a.mean() - b.mean()) < 5 * se
    rate_ours, rate_theirs = stats(ours)[2].mean(), stats(theirs)[2].mean()
    assert abs(rate_ours - rate_theirs) < 5 * 0.008
    if width / height > 4 / 3:
        assert rate_ours > 0.05  # the fallback is exercised
