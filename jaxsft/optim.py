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
from typing import Any

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
    "lr_multipliers",
    "scale_by_multipliers",
]


def create_optimizer(
    cfg: OptimConfig, *, total_steps: int, steps_per_epoch: int, batch_size: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optax transformation for `cfg` and its base learning-rate schedule (for reporting).

    Order of the chain: clip by global norm, then the optimizer (weight decay, momentum or
    Adam moments, learning rate, per-group multipliers). Under `recipe="linear-probe"` all of
    it applies to the head only and every other parameter gets an update of exactly zero.
    """
    schedule = create_schedule(
        cfg, total_steps=total_steps, steps_per_epoch=steps_per_epoch, batch_size=batch_size
    )
    parts = []
    if cfg.clip_grad_norm is not None:
        parts.append(optax.clip_by_global_norm(cfg.clip_grad_norm))
    parts.extend(_optimizer_parts(cfg, schedule))
    tx = optax.chain(*parts)
    if cfg.recipe == "linear-probe":
        tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, _probe_labels)
    return tx, schedule


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


def _optimizer_parts(cfg: OptimConfig, schedule: optax.Schedule) -> list:
    decay = _weight_decay(cfg)
    lr = [optax.scale_by_learning_rate(schedule)]
    mults = lr_multipliers(cfg)
    if mults is not None:
        lr.append(scale_by_multipliers(mults))
    if cfg.optimizer == "sgd":
        momentum = [optax.trace(cfg.momentum, nesterov=cfg.nesterov)] if cfg.momentum else []
        return decay + momentum + lr
    if cfg.optimizer == "adam":  # torch.optim.Adam: L2 added to the gradient
        return decay + [optax.scale_by_adam(b1=cfg.momentum, b2=ADAM_B2, eps=ADAM_EPS)] + lr
    if cfg.optimizer == "adamw":  # torch.optim.AdamW: decoupled, scaled by the lr
        return [optax.scale_by_adam(b1=cfg.momentum, b2=ADAM_B2, eps=ADAM_EPS)] + decay + lr
    # lars (OptimConfig admits no other): optax.lars, with the trust ratio on weights only
    trust = optax.masked(
        optax.scale_by_trust_ratio(trust_coefficient=LARS_TRUST_COEFFICIENT), _is_weight_tree)
    return decay + [trust] + lr + [optax.trace(cfg.momentum, nesterov=cfg.nesterov)]


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
