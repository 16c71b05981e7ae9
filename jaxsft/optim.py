"""Optimizer and learning-rate schedule from an `OptimConfig`, as a chain of small optax pieces.

SGD follows `torch.optim.SGD` exactly: weight decay is coupled (added to the gradient before
momentum), dampening is 0, the momentum buffer starts as the first gradient (`optax.trace`'s
0 * m + g), and the learning rate multiplies the buffer last. Parameter groups (head
multiplier, layer-wise decay, linear probe) are expressed by path in the parameter tree, with
torchvision's names: the head is `fc`, the stages are `layer{s}_{i}`, the stem `conv1`/`bn1`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxsft.config import ConfigError, OptimConfig

HEAD = "fc"
STEM = ("conv1", "bn1")
ADAM_B2 = 0.999  # torch.optim.Adam's default beta2 and eps
ADAM_EPS = 1e-8
LARS_TRUST_COEFFICIENT = 1e-3  # You et al. (2017)

__all__ = [
    "create_optimizer",
    "create_schedule",
    "decay_mask",
    "freeze_backbone_until",
    "l2sp",
    "lp_ft_bn_mode",
    "lr_multipliers",
    "scale_by_multipliers",
]


def create_optimizer(
    cfg: OptimConfig, *, total_steps: int, steps_per_epoch: int, batch_size: int,
    anchor: Any = None,
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optax transformation for `cfg` and its base learning-rate schedule (for reporting).

    Order of the chain: clip by global norm, then the optimizer (L2-SP and coupled weight
    decay, momentum or Adam moments, learning rate, per-group multipliers). Under
    `recipe="linear-probe"` all of it applies to the head only and every other parameter gets
    an update of exactly zero; under `recipe="lp-ft"` the backbone's updates are zero for
    `probe_steps(cfg, total_steps)` steps (`freeze_backbone_until`). `cfg.l2sp` /
    `cfg.l2sp_head` add L2-SP (see `l2sp`; `anchor` = the pretrained params, default the
    params the optimizer state is initialised with).
    """
    schedule = create_schedule(
        cfg, total_steps=total_steps, steps_per_epoch=steps_per_epoch, batch_size=batch_size
    )
    parts = []
    if cfg.clip_grad_norm is not None:
        parts.append(optax.clip_by_global_norm(cfg.clip_grad_norm))
    parts.extend(_optimizer_parts(cfg, schedule, anchor))
    tx = optax.chain(*parts)
    if cfg.recipe == "linear-probe":
        tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, _probe_labels)
    elif cfg.recipe == "lp-ft":
        tx = freeze_backbone_until(tx, probe_steps(cfg, total_steps))
    return tx, schedule


def probe_steps(cfg: OptimConfig, total_steps: int) -> int:
    """Steps of LP-FT's linear-probe phase: `cfg.probe_steps`, else half the run; 0 for
    the other recipes."""
    if cfg.recipe != "lp-ft":
        return 0
    steps = cfg.probe_steps if cfg.probe_steps is not None else total_steps // 2
    if steps >= total_steps:
        raise ConfigError(f"--probe-steps {steps} leaves no fine-tuning in a {total_steps}-step "
                          "run: shorten the probe or train longer")
    return steps


# ------------------------------------------------------------------------- schedules


def create_schedule(
    cfg: OptimConfig, *, total_steps: int, steps_per_epoch: int, batch_size: int
) -> optax.Schedule:
    """Base learning rate at each step: lr (x batch/256) x warmup x decay.

    Warmup rises linearly from 0 at step 0 to the full rate at `warmup_epochs`. The decay
    factor of `step`/`multistep` counts epochs from the start of training and multiplies the
    warmup (torch's `ChainedScheduler([LinearLR, MultiStepLR])`); `cosine` and `linear` start
    at the end of the warmup and reach 0 at `total_steps` (torch's `SequentialLR([LinearLR,
    CosineAnnealingLR(T_max=total - warmup)])`).
    """
    for name, value in [("total_steps", total_steps), ("steps_per_epoch", steps_per_epoch),
                        ("batch_size", batch_size)]:
        if not isinstance(value, int) or value <= 0:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    base = cfg.lr * (batch_size / 256 if cfg.lr_scaling == "linear" else 1.0)
    warmup = round(cfg.warmup_epochs * steps_per_epoch)
    if warmup >= total_steps and warmup > 0:
        raise ConfigError(
            f"--warmup-epochs {cfg.warmup_epochs} is {warmup} steps but the run has only "
            f"{total_steps}: shorten the warmup or train longer"
        )
    decay = _decay_factor(cfg, total_steps, steps_per_epoch, warmup)

    def schedule(count: jax.Array) -> jax.Array:
        t = jnp.asarray(count).astype(_float())
        factor = decay(t)
        if warmup > 0:
            factor = factor * jnp.minimum(t / warmup, 1.0)
        return base * factor

    return schedule


def _decay_factor(
    cfg: OptimConfig, total_steps: int, steps_per_epoch: int, warmup: int
) -> Callable[[jax.Array], jax.Array]:
    """The schedule's factor after warmup (the OptimConfig was validated when it was made)."""
    if cfg.schedule == "constant":
        return jnp.ones_like
    if cfg.schedule == "step":
        size = max(1, round(cfg.step_epochs * steps_per_epoch))
        return lambda t: cfg.gamma ** (t // size)
    if cfg.schedule == "multistep":
        bounds = np.array([round(m * steps_per_epoch) for m in cfg.milestones])
        return lambda t: cfg.gamma ** jnp.sum(t >= bounds).astype(t.dtype)
    length = total_steps - warmup
    if cfg.schedule == "cosine":
        return lambda t: 0.5 * (1 + jnp.cos(math.pi * _progress(t, warmup, length)))
    return lambda t: 1 - _progress(t, warmup, length)  # linear


def _float() -> Any:
    """float64 under JAX's x64 mode (exact comparisons with torch), else float32."""
    return jax.dtypes.canonicalize_dtype(jnp.float64)


def _progress(t: jax.Array, start: int, length: int) -> jax.Array:
    """Fraction of the post-warmup phase done at step t, clipped to [0, 1]."""
    return jnp.clip((t - start) / length, 0.0, 1.0)


# ------------------------------------------------------------------------- optimizers


def _optimizer_parts(cfg: OptimConfig, schedule: optax.Schedule, anchor: Any = None) -> list:
    decay = _weight_decay(cfg)
    l2 = _l2sp(cfg, anchor)  # coupled (added to the gradient) whatever the optimizer
    lr = [optax.scale_by_learning_rate(schedule)]
    mults = lr_multipliers(cfg)
    if mults is not None:
        lr.append(scale_by_multipliers(mults))
    adam = [optax.scale_by_adam(b1=cfg.momentum, b2=ADAM_B2, eps=ADAM_EPS)]
    if cfg.optimizer == "sgd":
        momentum = [optax.trace(cfg.momentum, nesterov=cfg.nesterov)] if cfg.momentum else []
        return decay + l2 + momentum + lr
    if cfg.optimizer == "adam":  # torch.optim.Adam: L2 added to the gradient
        return decay + l2 + adam + lr
    if cfg.optimizer == "adamw":  # torch.optim.AdamW: decoupled, scaled by the lr
        return l2 + adam + decay + lr
    # lars (OptimConfig admits no other): optax.lars, with the trust ratio on weights only
    trust = optax.masked(
        optax.scale_by_trust_ratio(trust_coefficient=LARS_TRUST_COEFFICIENT), _is_weight_tree)
    return decay + l2 + [trust] + lr + [optax.trace(cfg.momentum, nesterov=cfg.nesterov)]


def _l2sp(cfg: OptimConfig, anchor: Any) -> list:
    if cfg.l2sp == 0 and cfg.l2sp_head == 0:
        return []
    return [l2sp(cfg.l2sp, cfg.l2sp_head, anchor, mask=decay_mask(cfg))]


def _weight_decay(cfg: OptimConfig) -> list:
    if cfg.weight_decay == 0:
        return []
    return [optax.add_decayed_weights(cfg.weight_decay, mask=decay_mask(cfg))]


def decay_mask(cfg: OptimConfig) -> Callable[[Any], Any] | None:
    """None (decay everything, torch's default) or a mask that decays weights only.

    Weights are the leaves of rank >= 2 (conv and dense kernels); BatchNorm scales and biases
    and every bias are rank 1.
    """
    return None if cfg.decay_bn_and_bias else _is_weight_tree


def _is_weight_tree(tree: Any) -> Any:
    return jax.tree.map(lambda x: jnp.ndim(x) >= 2, tree)


# ------------------------------------------------------------------------- parameter groups


def lr_multipliers(cfg: OptimConfig) -> Callable[[Any], Any] | None:
    """Per-leaf learning-rate factors (head multiplier x layer decay), or None when all are 1.

    Stage k from the top trains at decay^k: the head k=0, layer4 k=1, ..., the stem (conv1,
    bn1) k=5 on a four-stage ResNet. The head also gets `head_lr_mult`.
    """
    if cfg.head_lr_mult == 1 and cfg.layer_decay == 1:
        return None

    def multipliers(tree: Any) -> Any:
        names = _top_level_names(tree)
        _require_head(names, "--head-lr-mult / --layer-decay")
        stages = max((_stage_of(n) or 0 for n in names), default=0)

        def factor(path: tuple, _: Any) -> float:
            name = _key_name(path[0])
            depth = _depth(name, stages)
            return cfg.layer_decay**depth * (cfg.head_lr_mult if name == HEAD else 1.0)

        return jax.tree_util.tree_map_with_path(factor, tree)

    return multipliers


def scale_by_multipliers(multipliers: Callable[[Any], Any]) -> optax.GradientTransformation:
    """Stateless: multiplies each update leaf by the factor `multipliers(updates)` gives it.

    Placed after the learning rate, this is torch's parameter groups with different `lr`.
    """

    def init_fn(params: Any) -> optax.EmptyState:
        del params
        return optax.EmptyState()

    def update_fn(updates: Any, state: optax.EmptyState, params: Any = None) -> tuple:
        del params
        factors = multipliers(updates)
        scaled = jax.tree.map(lambda u, f: u * jnp.asarray(f, u.dtype), updates, factors)
        return scaled, state

    return optax.GradientTransformation(init_fn, update_fn)


def _probe_labels(tree: Any) -> Any:
    """"train" for the head's leaves, "frozen" for the rest (linear probe)."""
    _require_head(_top_level_names(tree), "--recipe linear-probe")
    return jax.tree_util.tree_map_with_path(
        lambda path, _: "train" if _key_name(path[0]) == HEAD else "frozen", tree
    )


def _depth(name: str, stages: int) -> int:
    if name == HEAD:
        return 0
    stage = _stage_of(name)
    if stage is not None:
        return stages + 1 - stage
    if name in STEM:
        return stages + 1
    raise ConfigError(
        f"--layer-decay cannot place parameter group {name!r}: expected torchvision ResNet "
        f"names ({HEAD}, layer<s>_<i>, {', '.join(STEM)}); use --layer-decay 1 for this model"
    )


def _stage_of(name: str) -> int | None:
    match = re.fullmatch(r"layer(\d+)_\d+", name)
    return int(match.group(1)) if match else None


def _top_level_names(tree: Any) -> list[str]:
    paths = jax.tree_util.tree_flatten_with_path(tree)[0]
    return sorted({_key_name(path[0]) for path, _ in paths if path})


def _require_head(names: list[str], option: str) -> None:
    if HEAD not in names:
        raise ConfigError(
            f"{option} needs a classifier head named {HEAD!r} in the parameters; found "
            f"{names}: use a jaxsft.create_model model"
        )


def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


# ------------------------------------------------------------------------- fine-tuning recipes


class L2SPState(NamedTuple):
    """The anchor: the pretrained weights (zeros for the head), a params-shaped tree."""

    anchor: Any


def l2sp(
    alpha: float, head_alpha: float, anchor: Any = None, *,
    mask: Callable[[Any], Any] | Any | None = None, head: str = HEAD,
) -> optax.GradientTransformation:
    """L2-SP (Li, Grandvalet & Davoine, ICML 2018): decay toward the pretrained weights.

    Adds alpha * (w - w0) to the gradient of every backbone leaf and head_alpha * w to the
    leaves under `head` (a new head has no pretrained value: plain weight decay, as in the
    paper). Place it where coupled weight decay goes, before momentum (torch SGD's
    `weight_decay`). `anchor` (w0) defaults to the params the state is initialised with,
    i.e. the pretrained weights when `TrainState.create` is given them. The anchor lives in
    the optimizer state, so it is checkpointed and restored with it. `mask` (a tree or a
    function of the params, like optax's) picks the leaves penalised (default: all).
    """

    def coefficients(params: Any) -> Any:
        chosen = mask(params) if callable(mask) else mask
        chosen = jax.tree.map(lambda _: True, params) if chosen is None else chosen
        return jax.tree_util.tree_map_with_path(
            lambda path, _, on: (head_alpha if _key_name(path[0]) == head else alpha) * on,
            params, chosen)

    def init_fn(params: Any) -> L2SPState:
        source = params if anchor is None else anchor
        return L2SPState(jax.tree_util.tree_map_with_path(
            lambda path, a, p: (jnp.zeros_like(p) if _key_name(path[0]) == head
                                else jnp.array(a, dtype=p.dtype, copy=True)),
            source, params))

    def update_fn(updates: Any, state: L2SPState, params: Any = None) -> tuple:
        if params is None:
            raise ValueError("l2sp needs the params: call tx.update(grads, state, params)")
        updates = jax.tree.map(
            lambda g, c, p, a: g if c == 0 else g + c * (p - a).astype(g.dtype),
            updates, coefficients(params), params, state.anchor)
        return updates, state

    return optax.GradientTransformation(init_fn, update_fn)


class FreezeBackboneState(NamedTuple):
    """Steps taken (the phase) and the wrapped transformation's state."""

    count: jax.Array
    inner: optax.OptState


def freeze_backbone_until(
    tx: optax.GradientTransformation, probe_steps: int, *, head: str = HEAD
) -> optax.GradientTransformation:
    """LP-FT (Kumar et al., ICLR 2022): a linear probe for `probe_steps`, then fine-tuning.

    While fewer than `probe_steps` updates have been made, the backbone's gradients enter
    `tx` as exact zeros and its updates leave as exact zeros, so only the head (`head`)
    trains. At the boundary the backbone's per-parameter state in `tx` (momentum buffers,
    Adam moments: every subtree shaped like the params) is re-initialised with `tx.init`, so
    fine-tuning starts from fresh buffers, as a separate fine-tuning run would, with no
    weight decay gathered while the weights were frozen; scalar state (schedule and Adam
    counts) is shared with the head and continues. The count is in the state: a resume on
    either side of the boundary is exact. Pair with `lp_ft_bn_mode` for BatchNorm.
    """
    if not isinstance(probe_steps, int) or probe_steps < 0:
        raise ValueError(f"probe_steps must be a non-negative int, got {probe_steps!r}")

    def is_head(tree: Any) -> Any:
        _require_head(_top_level_names(tree), "LP-FT (probe_steps)")
        return jax.tree_util.tree_map_with_path(lambda p, _: _key_name(p[0]) == head, tree)

    def init_fn(params: Any) -> FreezeBackboneState:
        return FreezeBackboneState(jnp.zeros((), jnp.int32), tx.init(params))

    def update_fn(updates: Any, state: FreezeBackboneState, params: Any = None) -> tuple:
        heads = is_head(updates)
        probing = state.count < probe_steps

        def gate(tree: Any) -> Any:
            return jax.tree.map(lambda u, h: u if h else jnp.where(probing, 0, u).astype(u.dtype),
                                tree, heads)

        inner = jax.lax.cond(state.count == probe_steps,
                             lambda s: _reset_backbone(s, tx.init(params), heads),
                             lambda s: s, state.inner)
        updates, inner = tx.update(gate(updates), inner, params)
        return gate(updates), FreezeBackboneState(optax.safe_increment(state.count), inner)

    return optax.GradientTransformation(init_fn, update_fn)


def _reset_backbone(state: Any, fresh: Any, heads: Any) -> Any:
    """`state` with the backbone leaves of each params-shaped subtree taken from `fresh`."""
    shape = jax.tree.structure(heads)

    def params_shaped(node: Any) -> bool:
        return jax.tree.structure(node) == shape

    def merge(old: Any, new: Any) -> Any:
        if not params_shaped(old):
            return old
        return jax.tree.map(lambda o, n, h: o if h else n, old, new, heads)

    return jax.tree.map(merge, state, fresh, is_leaf=params_shaped)


def lp_ft_bn_mode(step: int, probe_steps: int, bn_mode: str) -> str:
    """The step's BatchNorm mode under LP-FT: "frozen" during the probe, `bn_mode` after.

    `bn_mode` is a static option of `train_step`, so the loop compiles two steps and
    switches at `step == probe_steps` (a host-side int, e.g. `int(state.step)`).
    """
    return "frozen" if step < probe_steps else bn_mode
