"""Fine-tuning recipes as library pieces: L2-SP, EMA, Mixup/CutMix, LP-FT, zero head.

A toy network named like a ResNet (a conv `conv1`, BatchNorm `bn1`, head `fc`) at 8x8, batch
8: the recipes depend on parameter names and the step's plumbing, not on the architecture.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import serialization

from jaxsft import checkpoint, mixing
from jaxsft.config import OptimConfig
from jaxsft.optim import L2SPState, create_optimizer, freeze_backbone_until, l2sp, lp_ft_bn_mode
from jaxsft.state import TrainState, ema_state
from jaxsft.steps import cross_entropy, train_step

CLASSES = 5
BATCH = 8


class Toy(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(4, (3, 3), use_bias=False, name="conv1", param_dtype=x.dtype)(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, name="bn1",
                         param_dtype=x.dtype)(x)
        x = nn.relu(x).mean(axis=(1, 2))
        return nn.Dense(CLASSES, name="fc", param_dtype=x.dtype)(x)


MODEL = Toy()
STATIC = ("bn_mode", "ema_decay", "mixup_alpha", "cutmix_alpha", "mix_switch_prob",
          "label_smoothing")
step_fn = jax.jit(train_step, static_argnames=STATIC)


def batch(i: int, dtype=jnp.float32) -> dict:
    rs = np.random.RandomState(i)
    return {"image": jnp.asarray(rs.randn(BATCH, 8, 8, 3), dtype),
            "label": jnp.asarray(rs.randint(0, CLASSES, BATCH))}


def variables(dtype=jnp.float32) -> dict:
    v = MODEL.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3), dtype))
    stats = jax.tree.map(lambda x: x + 0.1, v["batch_stats"])  # not the trivial 0/1
    return jax.tree.map(lambda x: x.astype(dtype), {"params": v["params"], "batch_stats": stats})


def new_state(tx, dtype=jnp.float32, ema=False) -> TrainState:
    v = variables(dtype)
    return TrainState.create(apply_fn=MODEL.apply, params=v["params"],
                             batch_stats=v["batch_stats"], tx=tx, ema=ema)


def leaves(tree) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def assert_equal(a, b) -> None:
    la, lb = leaves(a), leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(x, y)


def sgd(**fields):
    """SGD(lr=0.1, momentum=0.9) from create_optimizer, as the CLI builds it (a 20-step run);
    `probe_steps` makes it LP-FT."""
    recipe = {"recipe": "lp-ft"} if fields.get("probe_steps") else {}
    cfg = OptimConfig(lr=0.1, momentum=0.9, **recipe, **fields)
    return create_optimizer(cfg, total_steps=20, steps_per_epoch=10, batch_size=BATCH)[0]


# ------------------------------------------------------------------------- L2-SP


def test_l2sp_adds_alpha_times_distance_to_anchor_and_head_alpha_times_w(x64):
    params = jax.tree.map(lambda x: x.astype(jnp.float64) + 0.3, variables()["params"])
    anchor = jax.tree.map(lambda x: x.astype(jnp.float64), variables()["params"])
    tx = l2sp(0.01, 0.003, anchor)
    state = tx.init(params)
    zeros = jax.tree.map(jnp.zeros_like, params)
    out, _ = tx.update(zeros, state, params)
    for name in ("conv1", "bn1"):
        for key, w in params[name].items():
            np.testing.assert_array_equal(out[name][key], 0.01 * (w - anchor[name][key]))
    for key, w in params["fc"].items():
        np.testing.assert_array_equal(out["fc"][key], 0.003 * w)
        np.testing.assert_array_equal(state.anchor["fc"][key], 0.0)


def test_l2sp_anchor_defaults_to_the_initial_params_and_is_a_copy():
    params = variables()["params"]
    state = l2sp(0.1, 0.0).init(params)
    assert_equal(state.anchor["conv1"], params["conv1"])
    assert state.anchor["conv1"]["kernel"] is not params["conv1"]["kernel"]


def test_l2sp_through_create_optimizer_and_its_anchor_survives_checkpoints(tmp_path):
    tx = sgd(weight_decay=0.0, l2sp=0.1, l2sp_head=0.01)
    state = new_state(tx)
    anchor = variables()["params"]
    for i in range(2):
        state, _ = step_fn(state, batch(i))
    assert_equal(state.opt_state[0].anchor["conv1"], anchor["conv1"])
    again = serialization.from_bytes(new_state(tx), serialization.to_bytes(state))
    assert_equal(again, state)
    with checkpoint.create_manager(tmp_path, keep=1) as m:
        checkpoint.save(m, state, {})
        m.wait_until_finished()
        restored, _ = checkpoint.restore(m, new_state(tx))
    assert_equal(restored, state)
    # off (the default), the chain is today's: no anchor in the state
    assert not any(isinstance(s, L2SPState) for s in sgd().init(anchor))


# ------------------------------------------------------------------------- EMA


def test_ema_update_formula_and_ema_state(x64):
    tx = optax.sgd(0.1, momentum=0.9)
    state = new_state(tx, jnp.float64, ema=True)
    decay = 0.75
    new, _ = step_fn(state, batch(0, jnp.float64), ema_decay=decay)
    for ema, old, cur in [(new.ema_params, state.ema_params, new.params),
                          (new.ema_batch_stats, state.ema_batch_stats, new.batch_stats)]:
        for e, o, c in zip(leaves(ema), leaves(old), leaves(cur)):
            # to 1 ulp: XLA:CPU may fuse the multiply-add (one rounding, not two)
            np.testing.assert_array_max_ulp(e, decay * o + (1 - decay) * c, maxulp=1)
    assert_equal(ema_state(new).params, new.ema_params)
    assert_equal(ema_state(new).batch_stats, new.ema_batch_stats)
    with pytest.raises(ValueError, match="ema=True"):
        ema_state(new_state(tx))
    with pytest.raises(ValueError, match="ema=True"):
        train_step(new_state(tx), batch(0), ema_decay=0.9)


def test_ema_unchanged_by_a_non_finite_step():
    state = new_state(optax.sgd(0.1), ema=True)
    bad = batch(0)
    bad["image"] = bad["image"].at[0, 0, 0, 0].set(jnp.nan)
    new, metrics = step_fn(state, bad, ema_decay=0.9)
    assert not bool(metrics["finite"])
    assert_equal(new, state)


def test_ema_off_is_todays_step_bit_for_bit():
    tx = optax.sgd(0.1, momentum=0.9)
    plain, with_ema = new_state(tx), new_state(tx, ema=True)
    seed_fields = (plain.step, plain.params, plain.batch_stats, plain.opt_state, plain.rng)
    assert len(jax.tree.leaves(plain)) == len(jax.tree.leaves(seed_fields))  # no EMA leaves
    assert set(serialization.to_state_dict(plain)) == {"step", "params", "batch_stats",
                                                         "opt_state", "rng"}
    for i in range(2):
        plain, m1 = step_fn(plain, batch(i))
        with_ema, m2 = step_fn(with_ema, batch(i), ema_decay=None)
    assert_equal((plain.params, plain.batch_stats, plain.opt_state, m1),
                 (with_ema.params, with_ema.batch_stats, with_ema.opt_state, m2))
    assert_equal(with_ema.ema_params, variables()["params"])  # never updated


# ------------------------------------------------------------------------- Mixup / CutMix


def test_mixed_targets_rows_sum_to_one_and_partners_skip_masked_examples():
    mask = jnp.array([1, 1, 0, 1, 1, 0, 1, 1.0])
    partner = mixing.mix_partners(mask)
    valid = [0, 1, 3, 4, 6, 7]
    assert [int(partner[i]) for i in valid] == valid[::-1]
    assert int(partner[2]) == 2 and int(partner[5]) == 5
    assert [int(p) for p in mixing.mix_partners(jnp.ones(4))] == [3, 2, 1, 0]
    labels = jnp.arange(BATCH) % CLASSES
    targets = mixing.mix_targets(labels, partner, jnp.asarray(0.3), CLASSES, 0.1)
    np.testing.assert_allclose(targets.sum(-1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(targets[0, labels[0]], 0.3 * 0.9 + 0.1 / CLASSES, rtol=1e-6)


def test_cutmix_lambda_is_the_area_left_to_each_image():
    images = jnp.asarray(np.arange(BATCH, dtype=np.float32)[:, None, None, None]
                         * np.ones((1, 16, 12, 3), np.float32))
    partner = mixing.mix_partners(jnp.ones(BATCH))
    for seed in range(5):
        mixed, lam = mixing.cutmix(jax.random.key(seed), images, partner, 1.0)
        pasted = np.mean(np.asarray(mixed[0, :, :, 0]) == BATCH - 1)
        np.testing.assert_allclose(float(lam), 1 - pasted, rtol=1e-6)


def test_mixup_and_switch_draw_from_the_step_key():
    images, mask = batch(0)["image"], jnp.ones(BATCH)
    mixed, partner, lam = mixing.mix_batch(jax.random.key(1), images, mask, mixup_alpha=0.4,
                                           cutmix_alpha=0.0, switch_prob=0.5)
    np.testing.assert_allclose(mixed, lam * images + (1 - lam) * images[::-1], rtol=1e-5,
                               atol=1e-6)
    kinds = set()
    for seed in range(12):
        mixed, _, lam = mixing.mix_batch(jax.random.key(seed), images, mask, mixup_alpha=0.4,
                                         cutmix_alpha=1.0, switch_prob=0.5)
        kinds.add(bool(jnp.any(mixed == images[::-1]) & jnp.any(mixed == images)))
    assert kinds == {True, False}  # both CutMix (pixels copied) and Mixup batches occur


def test_mixing_step_loss_is_soft_cross_entropy_and_masked_examples_stay_out():
    state = new_state(optax.sgd(0.1))
    b = dict(batch(0), mask=jnp.array([1, 1, 1, 1, 1, 1, 0, 0.0]))
    _, metrics = step_fn(state, b, mixup_alpha=0.4, label_smoothing=0.1)
    # the same mix, by hand: the step's key for step 0, then the split the step makes
    mix_rng, _ = jax.random.split(jax.random.fold_in(state.rng, state.step))
    mixed, partner, lam = mixing.mix_batch(mix_rng, b["image"], b["mask"], mixup_alpha=0.4,
                                           cutmix_alpha=0.0, switch_prob=0.5)
    logits, _ = MODEL.apply({"params": state.params, "batch_stats": state.batch_stats}, mixed,
                            train=True, mutable=["batch_stats"])
    targets = mixing.mix_targets(b["label"], partner, lam, CLASSES, 0.1)
    want = mixing.soft_cross_entropy(logits, targets)[:6].mean()
    np.testing.assert_allclose(float(metrics["loss"]), float(want), rtol=1e-5)
    assert float(metrics["count"]) == 6
    # a masked example changes nothing (with frozen BatchNorm: in "train" mode it enters the
    # batch statistics, as without mixing)
    other = dict(b, image=b["image"].at[7].set(100.0), label=b["label"].at[7].set(0))
    _, one = step_fn(state, b, mixup_alpha=0.4, bn_mode="frozen")
    _, two = step_fn(state, other, mixup_alpha=0.4, bn_mode="frozen")
    assert float(one["loss"]) == float(two["loss"])


def test_mixing_off_is_todays_step_and_soft_ce_equals_hard_ce_at_lam_one():
    state = new_state(optax.sgd(0.1, momentum=0.9))
    a, ma = step_fn(state, batch(0))
    b, mb = step_fn(state, batch(0), mixup_alpha=0.0, cutmix_alpha=0.0)
    assert_equal((a, ma), (b, mb))
    logits = jax.random.normal(jax.random.key(0), (BATCH, CLASSES))
    labels = jnp.arange(BATCH) % CLASSES
    targets = mixing.mix_targets(labels, jnp.arange(BATCH), jnp.asarray(1.0), CLASSES, 0.2)
    np.testing.assert_allclose(mixing.soft_cross_entropy(logits, targets),
                               cross_entropy(logits, labels, 0.2), rtol=1e-6)


# ------------------------------------------------------------------------- LP-FT


def run(state, start, stop, probe_steps, ema_decay=None):
    for i in range(start, stop):
        state, metrics = step_fn(state, batch(i), bn_mode=lp_ft_bn_mode(i, probe_steps, "train"),
                                 ema_decay=ema_decay)
        assert bool(metrics["finite"])
    return state


def test_lp_ft_probe_phase_then_full_fine_tuning_with_fresh_backbone_momentum():
    tx = sgd(weight_decay=1e-2, probe_steps=3)
    start = new_state(tx)
    probed = run(start, 0, 3, 3)
    assert_equal((probed.params["conv1"], probed.params["bn1"], probed.batch_stats),
                 (start.params["conv1"], start.params["bn1"], start.batch_stats))
    assert not np.array_equal(probed.params["fc"]["kernel"], start.params["fc"]["kernel"])
    after = run(probed, 3, 4, 3)
    for name in ("conv1", "bn1"):
        assert all(np.any(x != y) for x, y in zip(leaves(after.params[name]),
                                                  leaves(probed.params[name])))
    assert np.any(np.asarray(after.batch_stats["bn1"]["mean"])
                  != np.asarray(probed.batch_stats["bn1"]["mean"]))
    # The backbone's momentum restarts at the boundary: its buffer after the first
    # fine-tuning step is exactly a fresh SGD's first buffer (gradient + decay) from the
    # probed weights; the head's buffer carries on from the probe.
    fresh = TrainState.create(apply_fn=MODEL.apply, params=probed.params,
                              batch_stats=probed.batch_stats, tx=sgd(weight_decay=1e-2))
    fresh, _ = step_fn(fresh, batch(3))
    ours, theirs = after.opt_state.inner[1].trace, fresh.opt_state[1].trace  # [decay, trace, lr]
    assert_equal((ours["conv1"], ours["bn1"]), (theirs["conv1"], theirs["bn1"]))
    assert_equal((after.params["conv1"], after.params["bn1"]),
                 (fresh.params["conv1"], fresh.params["bn1"]))
    assert not np.array_equal(ours["fc"]["kernel"], theirs["fc"]["kernel"])
    assert [lp_ft_bn_mode(s, 3, "train") for s in (0, 2, 3, 9)] == ["frozen"] * 2 + ["train"] * 2


def test_lp_ft_resume_at_the_boundary_is_bit_exact_with_ema(tmp_path):
    tx = sgd(weight_decay=1e-2, probe_steps=2, l2sp=0.05, l2sp_head=0.01)
    through = run(new_state(tx, ema=True), 0, 4, 2, ema_decay=0.9)
    first = run(new_state(tx, ema=True), 0, 2, 2, ema_decay=0.9)
    with checkpoint.create_manager(tmp_path, keep=1) as m:
        checkpoint.save(m, first, {})
        m.wait_until_finished()
        restored, _ = checkpoint.restore(m, new_state(tx, ema=True))
    assert int(restored.opt_state.count) == 2
    resumed = run(restored, 2, 4, 2, ema_decay=0.9)
    assert_equal(resumed, through)


def test_freeze_backbone_until_zero_is_the_wrapped_optimizer():
    # Op by op: the two steps are different programs, and once XLA optimises (fusion, fused
    # multiply-adds) two programs may round the same sum differently, by 1e-8 here at
    # --xla_backend_optimization_level=1. Eager, the wrapper's selects are the only difference.
    tx = optax.sgd(0.1, momentum=0.9)
    with jax.disable_jit():
        a = run(new_state(tx), 0, 2, 0)
        b = run(new_state(freeze_backbone_until(tx, 0)), 0, 2, 0)
    assert_equal(a.params, b.params)
    with pytest.raises(ValueError, match="probe_steps"):
        freeze_backbone_until(tx, -1)

