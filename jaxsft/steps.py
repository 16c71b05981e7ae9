"""Pure train and eval steps, and their data-parallel (pmap) versions.

`train_step(state, batch, **options)` is a pure function: every option is an argument, nothing
is read from globals, so it runs under `jax.jit`, `jax.pmap` (with `axis_name`) or `jax.jit`
with shardings. Its numbers follow the seed's PyTorch loop (`model.train()`,
`CrossEntropyLoss`, `optimizer.step()`): the loss is the mean over the unmasked examples of the
global batch, and N devices with a global batch B compute what one device does with batch B.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxsft import mixing
from jaxsft.state import TrainState, update_ema

AXIS = "batch"  # the pmap axis name of the wrappers below
BN_MODES = ("train", "frozen")
TRAIN_OPTIONS = ("label_smoothing", "bn_mode", "accum_steps", "learning_rate_fn", "ema_decay",
                 "mixup_alpha", "cutmix_alpha", "mix_switch_prob")

Batch = Mapping[str, jax.Array]
Metrics = dict[str, jax.Array]

__all__ = [
    "AXIS",
    "cross_entropy",
    "eval_step",
    "pmap_eval_step",
    "pmap_train_step",
    "replicate",
    "train_step",
    "unreplicate",
]


def train_step(
    state: TrainState,
    batch: Batch,
    *,
    axis_name: str | None = None,
    label_smoothing: float = 0.0,
    bn_mode: str = "train",
    accum_steps: int = 1,
    learning_rate_fn: optax.Schedule | None = None,
    ema_decay: float | None = None,
    mixup_alpha: float = 0.0,
    cutmix_alpha: float = 0.0,
    mix_switch_prob: float = 0.5,
) -> tuple[TrainState, Metrics]:
    """One optimizer step on `batch` = {"image": NHWC, "label": int, optional "mask": 0/1}.

    bn_mode "train" normalises with batch statistics and updates the running ones (torch's
    `model.train()`; across devices when `axis_name` is set); "frozen" uses and keeps the
    running statistics. `accum_steps` splits the batch into that many micro-batches whose
    gradients are summed before one update (BatchNorm "train" then sees micro-batches).
    Masked examples weigh 0 in the loss and metrics (they still enter BatchNorm batch
    statistics in "train" mode). A non-finite loss or gradient leaves the state unchanged and
    sets metrics["finite"] False, so the loop can stop cleanly.

    Recipes, off by default: `ema_decay` D: ema = D * ema + (1 - D) * new after each finite
    step (state from `TrainState.create(..., ema=True)`). `mixup_alpha`/`cutmix_alpha` > 0:
    Mixup/CutMix batches (CutMix with probability `mix_switch_prob` when both are on), soft
    labels (see `jaxsft.mixing`); top-1/top-5 still count the original labels.

    Metrics: "loss" (mean over unmasked examples), "top1", "top5", "count" (sums over the
    global batch), "grad_norm" (before clipping), "lr" (`learning_rate_fn(step)`, NaN without
    one), "finite".
    """
    _check_options(bn_mode, accum_steps)
    _check_recipes(state, ema_decay, mixup_alpha, cutmix_alpha, mix_switch_prob)
    images, labels, mask = _unpack(batch)
    if images.shape[0] % accum_steps:
        raise ValueError(
            f"batch of {images.shape[0]} examples (per device) is not divisible by "
            f"accum_steps={accum_steps}: pass a batch that splits into accum_steps micro-batches"
        )
    rng = _step_key(state, axis_name)
    axis_name = _collective_axis(axis_name)
    count = _total(mask.sum(), axis_name)
    grads_fn = functools.partial(_micro_grads, state, denominator=jnp.maximum(count, 1),
                                 bn_mode=bn_mode, axis_name=axis_name,
                                 label_smoothing=label_smoothing,
                                 mix=(mixup_alpha, cutmix_alpha, mix_switch_prob))
    if accum_steps == 1:
        grads, batch_stats, sums = grads_fn(state.batch_stats, (images, labels, mask, rng))
    else:
        grads, batch_stats, sums = _accumulate(grads_fn, state, (images, labels, mask), rng,
                                               accum_steps)
    if axis_name is not None:
        grads, sums = jax.lax.psum((grads, sums), axis_name)
    loss = sums["loss_sum"] / jnp.maximum(count, 1)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    new_state = _apply_if(finite, state, grads, batch_stats, ema_decay)
    lr = jnp.nan if learning_rate_fn is None else learning_rate_fn(state.step)
    metrics = {
        "loss": loss,
        "top1": sums["top1"],
        "top5": sums["top5"],
        "count": count,
        "grad_norm": grad_norm,
        "lr": jnp.asarray(lr, jnp.float32),
        "finite": finite,
    }
    return new_state, metrics


def eval_step(state: TrainState, batch: Batch, *, axis_name: str | None = None) -> Metrics:
    """Sums over the (global) batch with running BatchNorm statistics.

    Returns "loss_sum" (plain cross-entropy), "top1", "top5" and "count", all over the
    unmasked examples, so that sums over batches divided by the summed count are exact
    split-level means whatever the padding.
    """
    images, labels, mask = _unpack(batch)
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    logits = state.apply_fn(variables, images, train=False)
    sums = _correct(logits, labels, mask)
    sums["loss_sum"] = cross_entropy(logits, labels, 0.0, mask).sum()
    sums["count"] = mask.sum()
    return _total(sums, axis_name)


def cross_entropy(
    logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0,
    mask: jax.Array | None = None,
) -> jax.Array:
    """Per-example cross-entropy, torch's `CrossEntropyLoss(label_smoothing=...)` before the mean.

    The target is (1 - eps) * one_hot + eps / classes, so the loss is
    (1 - eps) * nll + eps * mean_c(-log p_c). Computed in at least float32; masked examples
    give exactly 0 whatever their label.
    """
    logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
    if mask is not None:
        labels = jnp.where(mask > 0, labels, 0)
    log_p = jax.nn.log_softmax(logits)
    losses = -jnp.take_along_axis(log_p, labels[:, None].astype(jnp.int32), axis=-1)[:, 0]
    if not (isinstance(label_smoothing, (int, float)) and label_smoothing == 0):
        losses = (1 - label_smoothing) * losses - label_smoothing * log_p.mean(axis=-1)
    if mask is not None:
        losses = jnp.where(mask > 0, losses, 0.0)
    return losses


# ------------------------------------------------------------------------- helpers


def _micro_grads(
    state: TrainState, batch_stats: Any, micro: tuple, *, denominator: jax.Array,
    bn_mode: str, axis_name: str | None, label_smoothing: float, mix: tuple = (0.0, 0.0, 0.5),
) -> tuple[Any, Any, Metrics]:
    """Gradients of sum(losses) / denominator on one (micro-)batch, new stats, metric sums.

    The denominator is the global example count: summing these gradients over devices and
    micro-batches gives the gradient of the global mean loss. `mix` = (mixup_alpha,
    cutmix_alpha, switch_prob): the loss is then on the mixed batch, with soft labels.
    """
    images, labels, mask, rng = micro
    mixed = images
    if mix[0] > 0 or mix[1] > 0:  # a key of its own: dropout's stays as without mixing
        mix_rng, rng = jax.random.split(rng)
        mixed, partner, lam = mixing.mix_batch(mix_rng, images, mask, mixup_alpha=mix[0],
                                               cutmix_alpha=mix[1], switch_prob=mix[2])

    def losses(logits: jax.Array) -> jax.Array:
        if mixed is images:
            return cross_entropy(logits, labels, label_smoothing, mask)
        targets = mixing.mix_targets(labels, partner, lam, logits.shape[-1], label_smoothing)
        return mixing.soft_cross_entropy(logits, targets, mask)

    def loss_fn(params: Any) -> tuple[jax.Array, tuple[Any, Metrics]]:
        logits, new_stats = _forward(state.apply_fn, params, batch_stats, mixed, bn_mode,
                                     axis_name, rng)
        sums = _correct(logits, labels, mask)
        sums["loss_sum"] = losses(logits).sum()
        return sums["loss_sum"] / denominator, (new_stats, sums)

    (_, (new_stats, sums)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    return grads, new_stats, sums


def _check_options(bn_mode: str, accum_steps: int) -> None:
    if bn_mode not in BN_MODES:
        raise ValueError(f"bn_mode must be one of {', '.join(BN_MODES)}, got {bn_mode!r}")
    if not isinstance(accum_steps, int) or accum_steps < 1:
        raise ValueError(f"accum_steps must be a positive integer, got {accum_steps!r}")


def _step_key(state: TrainState, axis_name: str | None) -> jax.Array:
    """The state's key folded with the step and, under pmap, the device index."""
    rng = jax.random.fold_in(state.rng, state.step)
    if axis_name is not None:
        rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))
    return rng


def _apply_if(finite: jax.Array, state: TrainState, grads: Any, batch_stats: Any,
              ema_decay: float | None) -> TrainState:
    """The updated state (and EMA) if `finite`, else `state`: a skipped step changes nothing,
    not even the step. cond rather than a select per leaf: it skips the update's work and
    the copies (~9% of a small CPU step)."""
    def update() -> TrainState:
        new = state.apply_gradients(grads=grads, batch_stats=batch_stats)
        return new if not ema_decay else update_ema(new, ema_decay)

    return jax.lax.cond(finite, update, lambda: state)


def _check_recipes(state: TrainState, ema_decay: float | None, mixup_alpha: float,
                   cutmix_alpha: float, switch_prob: float) -> None:
    if ema_decay and not 0 < ema_decay < 1:
        raise ValueError(f"ema_decay must be in (0, 1) (e.g. 0.999), got {ema_decay!r}")
    if ema_decay and state.ema_params is None:
        raise ValueError("ema_decay needs a state with an EMA: TrainState.create(..., ema=True)")
    if mixup_alpha < 0 or cutmix_alpha < 0:
        raise ValueError(f"mixup_alpha and cutmix_alpha must be >= 0 (0 = off), got "
                         f"{mixup_alpha!r} and {cutmix_alpha!r}")
    if not 0 <= switch_prob <= 1:
        raise ValueError(f"mix_switch_prob must be in [0, 1], got {switch_prob!r}")


def _unpack(batch: Batch) -> tuple[jax.Array, jax.Array, jax.Array]:
    missing = [k for k in ("image", "label") if k not in batch]
    if missing:
        raise KeyError(f"batch needs keys 'image' and 'label' (and optional 'mask'); "
                       f"missing {missing}, got {sorted(batch)}")
    images, labels = batch["image"], batch["label"]
    if images.ndim != 4 or labels.shape != images.shape[:1]:
        raise ValueError(
            f"batch['image'] must be [batch, H, W, C] and batch['label'] [batch], got "
            f"{images.shape} and {labels.shape} (under pmap: per device)"
        )
    dtype = jnp.promote_types(jnp.result_type(float), jnp.float32)
    mask = batch.get("mask")
    mask = jnp.ones(labels.shape, dtype) if mask is None else mask.astype(dtype)
    return images, labels, mask


def _forward(
    apply_fn: Callable[..., Any], params: Any, batch_stats: Any, images: jax.Array,
    bn_mode: str, axis_name: str | None, rng: jax.Array,
) -> tuple[jax.Array, Any]:
    """Logits and the new running statistics (unchanged when BatchNorm is frozen)."""
    variables = {"params": params, "batch_stats": batch_stats}
    rngs = {"dropout": rng}
    if bn_mode == "frozen":
        return apply_fn(variables, images, train=False, rngs=rngs), batch_stats
    sync = {} if axis_name is None else {"axis_name": axis_name}
    logits, updates = apply_fn(variables, images, train=True, mutable=["batch_stats"],
                               rngs=rngs, **sync)
    return logits, updates.get("batch_stats", batch_stats)


def _correct(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> Metrics:
    """Masked counts of top-1 and top-5 hits (ties count as hits)."""
    labels = jnp.where(mask > 0, labels, 0).astype(jnp.int32)
    true = jnp.take_along_axis(logits, labels[:, None], axis=-1)
    rank = jnp.sum(logits > true, axis=-1)
    return {"top1": jnp.sum((rank < 1) * mask), "top5": jnp.sum((rank < 5) * mask)}


def _accumulate(
    grads_fn: Callable, state: TrainState, arrays: tuple, rng: jax.Array, accum_steps: int
) -> tuple[Any, Any, Metrics]:
    """Sums grads_fn's gradients and metric sums over micro-batches with lax.scan; the
    running statistics thread through them in order, as torch's do."""
    micro = jax.tree.map(lambda a: a.reshape(accum_steps, -1, *a.shape[1:]), arrays)
    keys = jax.vmap(lambda i: jax.random.fold_in(rng, i))(jnp.arange(accum_steps))

    def body(carry: tuple, xs: tuple) -> tuple[tuple, None]:
        grads_sum, stats, sums_sum = carry
        grads, stats, sums = grads_fn(stats, xs)
        return (_add(grads_sum, grads), stats, _add(sums_sum, sums)), None

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    dtype = arrays[2].dtype
    sums0 = {k: jnp.zeros((), dtype) for k in ("top1", "top5", "loss_sum")}
    (grads, stats, sums), _ = jax.lax.scan(body, (zeros, state.batch_stats, sums0),
                                           (*micro, keys))
    return grads, stats, sums


def _add(a: Any, b: Any) -> Any:
    return jax.tree.map(jnp.add, a, b)


def _collective_axis(axis_name: str | None) -> str | None:
    """None when the axis has one device: its all-reduces would only copy (~7% of a CPU step)."""
    return None if axis_name is None or jax.lax.axis_size(axis_name) == 1 else axis_name


def _total(tree: Any, axis_name: str | None) -> Any:
    return tree if axis_name is None else jax.lax.psum(tree, axis_name)


# ------------------------------------------------------------------------- data parallel


def pmap_train_step(**options: Any) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
    """`train_step` pmapped over the local devices (axis "batch"), the state donated.

    Takes a replicated state (see `replicate`) and a batch shaped [devices, per_device, ...];
    returns the new replicated state and metrics (identical on every device). Options are
    those of `train_step` except `axis_name`.
    """
    _check_names(options, TRAIN_OPTIONS)
    _check_options(options.get("bn_mode", "train"), options.get("accum_steps", 1))
    step = functools.partial(train_step, axis_name=AXIS, **options)
    return _device_checked(jax.pmap(step, axis_name=AXIS, donate_argnums=(0,)))


def pmap_eval_step(**options: Any) -> Callable[[TrainState, Batch], Metrics]:
    """`eval_step` pmapped over the local devices; metrics are global sums on every device."""
    _check_names(options, ())
    step = functools.partial(eval_step, axis_name=AXIS, **options)
    return _device_checked(jax.pmap(step, axis_name=AXIS))


def replicate(tree: Any, devices: list[jax.Device] | None = None) -> Any:
    """One copy of every leaf on each local device, stacked on a leading device axis."""
    devices = list(devices or jax.local_devices())
    sharding = jax.sharding.NamedSharding(jax.sharding.Mesh(np.array(devices), (AXIS,)),
                                          jax.sharding.PartitionSpec(AXIS))

    def put(x: Any) -> jax.Array:
        x = x if isinstance(x, jax.Array) else np.asarray(x)
        shards = [jax.device_put(x[None], d) for d in devices]
        return jax.make_array_from_single_device_arrays((len(devices), *x.shape), sharding,
                                                        shards)

    return jax.tree.map(put, tree)


def unreplicate(tree: Any) -> Any:
    """The first device's copy of every leaf of a replicated tree (a single-device array)."""
    def first(x: Any) -> Any:
        if isinstance(x, jax.Array) and len(x.addressable_shards) > 1:
            return x.addressable_shards[0].data[0]  # no gather across devices
        return x[0]

    return jax.tree.map(first, tree)


def _check_names(options: Mapping[str, Any], allowed: tuple[str, ...]) -> None:
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        hint = " (the wrappers set axis_name='batch' themselves)" if "axis_name" in unknown else ""
        raise TypeError(f"unknown step option(s) {unknown}{hint}; allowed: {list(allowed)}")


def _device_checked(fn: Callable) -> Callable:
    """Wraps a pmapped step with a clear error when the batch's device axis is wrong."""

    @functools.wraps(fn)
    def run(state: TrainState, batch: Batch) -> Any:
        devices = jax.local_device_count()
        for key, value in batch.items():
            if np.ndim(value) < 1 or np.shape(value)[0] != devices:
                raise ValueError(
                    f"pmapped step: batch[{key!r}] has shape {np.shape(value)}, expected a "
                    f"leading axis of {devices} (local devices): reshape to [devices, "
                    f"batch // devices, ...], with a batch size divisible by {devices}"
                )
        return fn(state, batch)

    return run
