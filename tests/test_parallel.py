"""Data parallelism: 4 devices with a global batch of 16 compute what 1 device does (float64).

Three ways to run the same pure `train_step`: plain `jax.jit` on one device, the pmapped
wrapper over 4 devices (BatchNorm statistics, gradients and metrics summed across devices),
and `jax.jit` with the batch sharded over a one-axis mesh and the state replicated. The
batches carry an uneven mask (devices hold different numbers of real examples), so the global
mean must be psum(sum) / psum(count), not a mean of per-device means.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_trees_close
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxsft.config import OptimConfig
from jaxsft.models.resnet import BasicBlock, ResNet
from jaxsft.optim import create_optimizer
from jaxsft.state import TrainState
from jaxsft.steps import (
    eval_step,
    pmap_eval_step,
    pmap_train_step,
    replicate,
    train_step,
    unreplicate,
)

DEVICES = 4
BATCH = 16
SIZE = 16
STEPS = 5
CLASSES = 10
MASKED = [3, 6, 7, 15]  # devices hold 3, 2, 4 and 3 real examples


@pytest.fixture(scope="module")
def batches():
    rs = np.random.RandomState(0)
    mask = np.ones(BATCH)
    mask[MASKED] = 0
    return [{"image": rs.randn(BATCH, SIZE, SIZE, 3), "label": rs.randint(0, CLASSES, BATCH),
             "mask": mask} for _ in range(STEPS)]


def initial_state(schedule_cfg: OptimConfig):
    model = ResNet(block=BasicBlock, layers=(1, 1, 1, 1), num_classes=CLASSES,
                   dtype=jnp.float64)
    variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, SIZE, SIZE, 3)))
    tx, schedule = create_optimizer(schedule_cfg, total_steps=STEPS, steps_per_epoch=STEPS,
                                    batch_size=BATCH)
    state = TrainState.create(apply_fn=model.apply, params=variables["params"],
                              batch_stats=variables["batch_stats"], tx=tx)
    return state, schedule


def per_device(batch: dict) -> dict:
    return {k: np.asarray(v).reshape(DEVICES, -1, *np.shape(v)[1:]) for k, v in batch.items()}



def assert_metrics_equal(got: list, want: list) -> None:
    for g, w in zip(got, want, strict=True):
        assert g["loss"] == pytest.approx(w["loss"], rel=1e-10)
        assert g["grad_norm"] == pytest.approx(w["grad_norm"], rel=1e-10)
        for key in ("top1", "top5", "count", "lr", "finite"):
            assert g[key] == w[key], key


def test_pmap_and_sharded_jit_equal_one_device(batches, x64):
    assert jax.local_device_count() == DEVICES  # tests/conftest.py forces 4 CPU devices
    cfg = OptimConfig(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2,
                      schedule="cosine", warmup_epochs=0.4)
    state, schedule = initial_state(cfg)
    options = dict(label_smoothing=0.1, learning_rate_fn=schedule)
    jitted = jax.jit(functools.partial(train_step, **options))

    one, one_metrics = state, []
    for batch in batches:
        one, metrics = jitted(one, batch)
        one_metrics.append(jax.device_get(metrics))
    assert [m["count"] for m in one_metrics] == [BATCH - len(MASKED)] * STEPS

    step = pmap_train_step(**options)
    replicated, pmap_metrics = replicate(state), []
    for batch in batches:
        replicated, metrics = step(replicated, per_device(batch))
        for value in jax.tree.leaves(metrics):  # every device reports the global numbers
            assert (np.asarray(value) == np.asarray(value)[0]).all()
        pmap_metrics.append(jax.device_get(unreplicate(metrics)))
    for leaf in jax.tree.leaves((replicated.params, replicated.batch_stats)):
        assert (np.asarray(leaf) == np.asarray(leaf)[0]).all()  # replicas stay identical
    pmapped = unreplicate(replicated)

    mesh = Mesh(np.array(jax.devices()), ("data",))
    sharded = jax.device_put(state, NamedSharding(mesh, PartitionSpec()))
    data = NamedSharding(mesh, PartitionSpec("data"))
    sharded_metrics = []
    for batch in batches:
        sharded, metrics = jitted(sharded, jax.device_put(batch, data))
        sharded_metrics.append(jax.device_get(metrics))
    assert sharded.params["fc"]["kernel"].sharding.is_fully_replicated

    for final, metrics in [(pmapped, pmap_metrics), (sharded, sharded_metrics)]:
        assert_metrics_equal(metrics, one_metrics)
        assert_trees_close(final.params, one.params)
        assert_trees_close(final.batch_stats, one.batch_stats)
        assert int(final.step) == STEPS
    assert not np.allclose(one.batch_stats["bn1"]["var"], state.batch_stats["bn1"]["var"])


def test_pmap_eval_sums_equal_one_device(batches, x64):
    state, _ = initial_state(OptimConfig())
    want = jax.device_get(jax.jit(eval_step)(state, batches[0]))
    got = pmap_eval_step()(replicate(state), per_device(batches[0]))
    got = jax.device_get(got)
    for key in ("top1", "top5", "count"):
        assert (got[key] == want[key]).all(), key
    np.testing.assert_allclose(got["loss_sum"], want["loss_sum"], rtol=1e-12)
    assert want["count"] == BATCH - len(MASKED)


def test_replicate_and_unreplicate_round_trip():
    tree = {"w": np.arange(6.0, dtype=np.float32).reshape(2, 3), "step": np.int32(7),
            "rng": jax.random.key_data(jax.random.key(3))}
    replicated = replicate(tree)
    assert replicated["w"].shape == (DEVICES, 2, 3)
    assert len(replicated["w"].devices()) == DEVICES
    back = unreplicate(replicated)
    for key, value in tree.items():
        assert back[key].dtype == np.asarray(value).dtype
        np.testing.assert_array_equal(back[key], value)
        assert len(back[key].devices()) == 1


def test_pmap_wrappers_check_their_arguments():
    with pytest.raises(TypeError, match="axis_name"):
        pmap_train_step(axis_name="devices")
    with pytest.raises(ValueError, match="bn_mode"):
        pmap_train_step(bn_mode="eval")
    step = pmap_train_step()
    bad = {"image": np.zeros((2, 8, SIZE, SIZE, 3), np.float32), "label": np.zeros((2, 8))}
    with pytest.raises(ValueError, match="leading axis of 4"):
        step(None, bad)
