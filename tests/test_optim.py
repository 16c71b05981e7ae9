"""The optimizer and schedules against torch.optim: same rates, same trajectories (float64).

Trajectories run on a small quadratic over a parameter tree named like a ResNet's (stem,
four stages, head), so every parameter-group rule (head multiplier, layer decay, weight decay
mask, linear probe) is checked against torch parameter groups written out by hand here.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from jaxsft.config import ConfigError, OptimConfig
from jaxsft.optim import create_optimizer, create_schedule

SPE = 10  # steps per epoch
TOTAL = 100

# name -> shape; a ResNet's layout in miniature (rank >= 2: weights; rank 1: BN and biases)
LEAVES = {
    "conv1/kernel": (3, 3, 2, 4),
    "bn1/scale": (4,),
    "bn1/bias": (4,),
    "layer1_0/conv1/kernel": (3, 3, 4, 4),
    "layer1_0/bn1/scale": (4,),
    "layer2_0/conv1/kernel": (1, 1, 4, 5),
    "layer2_0/downsample_1/bias": (5,),
    "layer3_0/conv2/kernel": (3, 3, 5, 2),
    "layer4_0/conv1/kernel": (2, 6),
    "layer4_1/bn2/scale": (6,),
    "fc/kernel": (6, 3),
    "fc/bias": (3,),
}
STAGE_DEPTH = {"fc": 0, "layer4": 1, "layer3": 2, "layer2": 3, "layer1": 4, "conv1": 5,
               "bn1": 5}


# ------------------------------------------------------------------------- schedules


def torch_lrs(cfg: OptimConfig, batch_size: int = 64) -> list[float]:
    """The lr torch uses at each of TOTAL steps with the scheduler construct we document."""
    base = cfg.lr * (batch_size / 256 if cfg.lr_scaling == "linear" else 1.0)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=base)
    warmup = round(cfg.warmup_epochs * SPE)
    sched = torch.optim.lr_scheduler
    main = {
        "constant": None,
        "step": lambda: sched.StepLR(opt, round(cfg.step_epochs * SPE), cfg.gamma),
        "multistep": lambda: sched.MultiStepLR(opt, [round(m * SPE) for m in cfg.milestones],
                                               cfg.gamma),
        "cosine": lambda: sched.CosineAnnealingLR(opt, T_max=TOTAL - warmup),
        "linear": lambda: sched.LinearLR(opt, 1.0, 0.0, total_iters=TOTAL - warmup),
    }[cfg.schedule]
    parts = []
    if warmup:  # torch's LinearLR cannot start at exactly 0
        parts.append(sched.LinearLR(opt, start_factor=1e-12, end_factor=1.0,
                                    total_iters=warmup))
    if main is not None:
        parts.append(main())
    if len(parts) == 2 and cfg.schedule in ("cosine", "linear"):
        scheduler = sched.SequentialLR(opt, parts, milestones=[warmup])
    elif parts:
        scheduler = sched.ChainedScheduler(parts)
    lrs = []
    for _ in range(TOTAL):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        if parts:
            scheduler.step()
    return lrs


SCHEDULES = {
    "constant": OptimConfig(lr=0.1),
    "constant-warmup-scaled": OptimConfig(lr=0.1, warmup_epochs=1, lr_scaling="linear"),
    "step-warmup": OptimConfig(lr=0.1, schedule="step", step_epochs=3, gamma=0.5,
                               warmup_epochs=0.5),
    "multistep": OptimConfig(lr=0.1, schedule="multistep", milestones=(2, 5.5)),
    "multistep-warmup-overlap": OptimConfig(lr=0.1, schedule="multistep",
                                            milestones=(0.2, 7, 7), warmup_epochs=0.5),
    "cosine": OptimConfig(lr=0.1, schedule="cosine"),
    "cosine-warmup": OptimConfig(lr=0.1, schedule="cosine", warmup_epochs=1),
    "linear-warmup": OptimConfig(lr=0.1, schedule="linear", warmup_epochs=2),
}


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_schedule_matches_torch_lr_scheduler(name, x64):
    cfg = SCHEDULES[name]
    batch_size = 512 if cfg.lr_scaling == "linear" else 64
    schedule = create_schedule(cfg, total_steps=TOTAL, steps_per_epoch=SPE,
                               batch_size=batch_size)
    ours = np.array([float(schedule(jnp.asarray(t, jnp.int32))) for t in range(TOTAL)])
    theirs = np.array(torch_lrs(cfg, batch_size))
    np.testing.assert_allclose(ours, theirs, rtol=1e-9, atol=1e-11)
    if cfg.warmup_epochs:
        assert ours[0] == 0.0  # warmup starts from exactly 0


def test_schedule_runs_jitted_in_float32():
    cfg = OptimConfig(lr=0.1, schedule="cosine", warmup_epochs=1)
    schedule = create_schedule(cfg, total_steps=TOTAL, steps_per_epoch=SPE, batch_size=64)
    got = jax.jit(schedule)(jnp.asarray(55, jnp.int32))
    assert got.dtype == jnp.float32
    assert float(got) == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 45 / 90)), rel=1e-6)


@pytest.mark.parametrize("fields, kwargs, match", [
    ({"warmup_epochs": 10}, {}, "shorten the warmup"),
    ({"schedule": "multistep"}, {}, "--milestones"),
    ({"schedule": "step", "step_epochs": 0}, {}, "--step-epochs"),
    ({"schedule": "step", "gamma": 0}, {}, "--gamma"),
    ({"warmup_epochs": -1}, {}, "--warmup-epochs"),
    ({}, {"total_steps": 0}, "total_steps"),
])
def test_schedule_refuses_bad_settings(fields, kwargs, match):
    """Each fact is refused once: a setting when the OptimConfig is made, the warmup against
    the run's length when the schedule is built."""
    args = {"total_steps": TOTAL, "steps_per_epoch": SPE, "batch_size": 64, **kwargs}
    with pytest.raises(ConfigError, match=match):
        create_optimizer(OptimConfig(**fields), **args)


# ------------------------------------------------------------------------- trajectories


def make_problem(seed: int = 0):
    """Initial values, quadratic curvatures and targets per leaf (float64 numpy)."""
    rs = np.random.RandomState(seed)
    init = {k: rs.randn(*s) for k, s in LEAVES.items()}
    curv = {k: rs.uniform(0.5, 2.0, s) for k, s in LEAVES.items()}
    target = {k: rs.randn(*s) for k, s in LEAVES.items()}
    return init, curv, target


def nest(flat: dict) -> dict:
    tree: dict = {}
    for key, value in flat.items():
        *parents, leaf = key.split("/")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def flatten(tree: dict) -> dict:
    return {"/".join(str(k.key) for k in path): np.asarray(v)
            for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def loss_terms(p, curv, target, xp):
    """Separable quadratic plus a small coupling, so every gradient sees every parameter."""
    total = sum(xp.sum(p[k]) for k in LEAVES)
    return sum(0.5 * xp.sum(curv[k] * (p[k] - target[k]) ** 2) for k in LEAVES) + 0.05 * total**2


def run_optax(cfg: OptimConfig, steps: int, batch_size: int = 256):
    init, curv, target = make_problem()
    tx, _ = create_optimizer(cfg, total_steps=steps, steps_per_epoch=SPE, batch_size=batch_size)
    params = nest({k: jnp.asarray(v) for k, v in init.items()})
    opt_state = tx.init(params)

    def loss(p):
        return loss_terms(flatten_jax(p), curv, target, jnp)

    @jax.jit
    def update(params, opt_state):
        grads = jax.grad(loss)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, updates

    for _ in range(steps):
        params, opt_state, updates = update(params, opt_state)
    return flatten(params), flatten(updates), opt_state


def flatten_jax(tree: dict) -> dict:
    return {"/".join(str(k.key) for k in path): v
            for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def torch_groups(cfg: OptimConfig, tensors: dict, base_lr: float) -> list[dict]:
    """torch parameter groups spelled out: one group per tensor with its lr and decay."""
    groups = []
    for key, t in tensors.items():
        top = key.split("/")[0]
        if cfg.recipe == "linear-probe" and top != "fc":
            continue
        depth = STAGE_DEPTH[top.split("_")[0]]
        mult = cfg.layer_decay**depth * (cfg.head_lr_mult if top == "fc" else 1.0)
        decays = cfg.decay_bn_and_bias or t.ndim >= 2
        groups.append({"params": [t], "lr": base_lr * mult,
                       "weight_decay": cfg.weight_decay if decays else 0.0})
    return groups


def run_torch(cfg: OptimConfig, steps: int, batch_size: int = 256):
    init, curv, target = make_problem()
    tensors = {k: torch.tensor(v, requires_grad=True) for k, v in init.items()}
    curv_t = {k: torch.tensor(v) for k, v in curv.items()}
    target_t = {k: torch.tensor(v) for k, v in target.items()}
    base = cfg.lr * (batch_size / 256 if cfg.lr_scaling == "linear" else 1.0)
    groups = torch_groups(cfg, tensors, base)
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(groups, lr=base, momentum=cfg.momentum, nesterov=cfg.nesterov)
    elif cfg.optimizer == "adam":
        opt = torch.optim.Adam(groups, lr=base, betas=(cfg.momentum, 0.999), eps=1e-8)
    else:
        opt = torch.optim.AdamW(groups, lr=base, betas=(cfg.momentum, 0.999), eps=1e-8)
    scheduler = None
    if cfg.schedule == "cosine":
        warmup = round(cfg.warmup_epochs * SPE)
        sched = torch.optim.lr_scheduler
        scheduler = sched.SequentialLR(opt, [
            sched.LinearLR(opt, start_factor=1e-12, end_factor=1.0, total_iters=warmup),
            sched.CosineAnnealingLR(opt, T_max=steps - warmup)], milestones=[warmup])
    else:
        assert cfg.schedule == "constant" and not cfg.warmup_epochs
    for _ in range(steps):
        opt.zero_grad()
        loss_terms(tensors, curv_t, target_t, torch).backward()
        if cfg.clip_grad_norm is not None:
            trained = [p for g in groups for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(trained, cfg.clip_grad_norm)
        opt.step()
        if scheduler is not None:
            scheduler.step()
    return {k: t.detach().numpy() for k, t in tensors.items()}


RECIPES = {
    "sgd-momentum": OptimConfig(lr=0.05, momentum=0.9),
    "sgd-nesterov-wd": OptimConfig(lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-2),
    "sgd-no-momentum": OptimConfig(lr=0.05, momentum=0.0, weight_decay=1e-2),
    "sgd-wd-skip-bn-bias": OptimConfig(lr=0.05, weight_decay=5e-2, decay_bn_and_bias=False),
    "head-mult-layer-decay-cosine": OptimConfig(
        lr=0.05, weight_decay=1e-2, head_lr_mult=10, layer_decay=0.5, schedule="cosine",
        warmup_epochs=0.3),
    "linear-probe": OptimConfig(lr=0.05, weight_decay=5e-2, recipe="linear-probe",
                                head_lr_mult=2.0),
    "adam-coupled-wd": OptimConfig(optimizer="adam", lr=1e-2, weight_decay=1e-2),
    "adamw": OptimConfig(optimizer="adamw", lr=1e-2, weight_decay=0.1,
                         decay_bn_and_bias=False),
}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_trajectory_matches_torch_optim(name, x64):
    cfg = RECIPES[name]
    ours, _, _ = run_optax(cfg, steps=8)
    theirs = run_torch(cfg, steps=8)
    for key in LEAVES:
        # 1e-10, not 1e-15: torch's warmup starts at 1e-12 x lr, ours at exactly 0
        np.testing.assert_allclose(ours[key], theirs[key], rtol=1e-10, atol=1e-10,
                                   err_msg=key)
    init = make_problem()[0]
    if cfg.recipe == "linear-probe":
        for key in LEAVES:
            changed = not np.array_equal(ours[key], init[key])
            assert changed == key.startswith("fc/"), key


def test_clipping_matches_torch_clip_grad_norm(x64):
    """optax clips to max/norm, torch to max/(norm + 1e-6): equal to ~1e-6 relative."""
    cfg = OptimConfig(lr=0.05, momentum=0.9, weight_decay=1e-2, clip_grad_norm=1.0)
    ours, _, _ = run_optax(cfg, steps=8)
    theirs = run_torch(cfg, steps=8)
    unclipped, _, _ = run_optax(cfg.__class__(lr=0.05, momentum=0.9, weight_decay=1e-2), 8)
    for key in LEAVES:
        np.testing.assert_allclose(ours[key], theirs[key], rtol=1e-5, atol=1e-6, err_msg=key)
    assert max(np.abs(ours[k] - unclipped[k]).max() for k in LEAVES) > 1e-2  # clipping bit


def test_linear_probe_updates_backbone_by_exact_zero_and_keeps_no_state_for_it(x64):
    _, updates, opt_state = run_optax(RECIPES["linear-probe"], steps=2)
    for key, u in updates.items():
        assert (np.count_nonzero(u) > 0) == key.startswith("fc/"), key
    momentum_leaves = [x for x in jax.tree.leaves(opt_state) if np.ndim(x) > 0]
    assert sorted(x.shape for x in momentum_leaves) == [(3,), (6, 3)]


def test_lars_matches_optax_lars(x64):
    cfg = OptimConfig(optimizer="lars", lr=0.5, momentum=0.9, weight_decay=1e-3,
                      decay_bn_and_bias=False)
    ours, _, _ = run_optax(cfg, steps=5)
    init, curv, target = make_problem()
    is_weight = lambda tree: jax.tree.map(lambda x: x.ndim >= 2, tree)  # noqa: E731
    tx = optax.lars(0.5, weight_decay=1e-3, weight_decay_mask=is_weight, trust_coefficient=1e-3,
                    trust_ratio_mask=is_weight, momentum=0.9)
    params = nest({k: jnp.asarray(v) for k, v in init.items()})
    state = tx.init(params)

    @jax.jit
    def update(params, state):
        grads = jax.grad(lambda p: loss_terms(flatten_jax(p), curv, target, jnp))(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    for _ in range(5):
        params, state = update(params, state)
    ref = flatten(params)
    for key in LEAVES:
        np.testing.assert_allclose(ours[key], ref[key], rtol=1e-12, atol=1e-14, err_msg=key)


def test_layer_decay_refuses_unknown_parameter_names():
    tx, _ = create_optimizer(OptimConfig(layer_decay=0.7), total_steps=10, steps_per_epoch=10,
                             batch_size=8)
    params = {"fc": {"kernel": jnp.ones((2, 2))}, "encoder": {"kernel": jnp.ones((2, 2))}}
    with pytest.raises(ConfigError, match="encoder"):
        tx.update(params, tx.init(params), params)


def test_linear_probe_needs_a_head_named_fc():
    tx, _ = create_optimizer(OptimConfig(recipe="linear-probe"), total_steps=10,
                             steps_per_epoch=10, batch_size=8)
    with pytest.raises(ConfigError, match="'fc'"):
        tx.init({"head": {"kernel": jnp.ones((2, 2))}})
