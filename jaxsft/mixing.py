"""Mixup and CutMix: mixed inputs and soft labels, pure functions of a JAX key.

Mixup (Zhang et al., ICLR 2018) blends two images, lam * x_i + (1 - lam) * x_j; CutMix (Yun
et al., ICCV 2019) pastes a box of x_j into x_i and sets lam to the area left to x_i. One lam
per batch, drawn from Beta(alpha, alpha), and x_j the batch in reverse order, as timm's
`Mixup` (mode "batch"); with both on, one of the two per batch (timm's `switch_prob`).
Examples with mask 0 (padding) are paired only with themselves, so they never leak into a
real example, and their loss stays masked out.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["cutmix", "mix_batch", "mix_partners", "mix_targets", "mixup", "soft_cross_entropy"]


def mix_partners(mask: jax.Array) -> jax.Array:
    """Index of each example's partner: the unmasked examples in reverse order (timm's
    `x.flip(0)` when none is masked); a masked example is its own partner."""
    n = mask.shape[0]
    valid = mask > 0
    order = jnp.argsort(~valid, stable=True)  # unmasked first, in batch order
    rank = jnp.zeros(n, jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32))
    count = valid.sum().astype(jnp.int32)
    partner = order[jnp.clip(count - 1 - rank, 0, n - 1)]
    return jnp.where(valid, partner, jnp.arange(n))


def mixup(rng: jax.Array, images: jax.Array, partner: jax.Array,
          alpha: float) -> tuple[jax.Array, jax.Array]:
    """(lam * x + (1 - lam) * x[partner], lam), lam ~ Beta(alpha, alpha)."""
    lam = jax.random.beta(rng, alpha, alpha)
    mixed = lam.astype(images.dtype) * images + (1 - lam).astype(images.dtype) * images[partner]
    return mixed, lam


def cutmix(rng: jax.Array, images: jax.Array, partner: jax.Array,
           alpha: float) -> tuple[jax.Array, jax.Array]:
    """(x with a box of x[partner] pasted in, lam = 1 - box area / image area).

    The box has sides sqrt(1 - lam0) x (H, W) for lam0 ~ Beta(alpha, alpha), a uniform
    centre, and is clipped to the image (timm's `rand_bbox`); lam is corrected to the area
    actually pasted.
    """
    lam_rng, y_rng, x_rng = jax.random.split(rng, 3)
    height, width = images.shape[1:3]
    cut = jnp.sqrt(1 - jax.random.beta(lam_rng, alpha, alpha))
    cut_h, cut_w = (cut * height).astype(jnp.int32), (cut * width).astype(jnp.int32)
    cy = jax.random.randint(y_rng, (), 0, height)
    cx = jax.random.randint(x_rng, (), 0, width)
    y0, y1 = jnp.clip(cy - cut_h // 2, 0, height), jnp.clip(cy + cut_h // 2, 0, height)
    x0, x1 = jnp.clip(cx - cut_w // 2, 0, width), jnp.clip(cx + cut_w // 2, 0, width)
    rows, cols = jnp.arange(height)[:, None], jnp.arange(width)[None, :]
    box = (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)
    mixed = jnp.where(box[None, :, :, None], images[partner], images)
    lam = 1 - ((y1 - y0) * (x1 - x0)).astype(cut.dtype) / (height * width)
    return mixed, lam


def mix_batch(rng: jax.Array, images: jax.Array, mask: jax.Array, *, mixup_alpha: float,
              cutmix_alpha: float, switch_prob: float) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(mixed images, partner indices, lam): Mixup, CutMix, or one of them per batch
    (CutMix with probability `switch_prob`) when both alphas are positive."""
    choice_rng, rng = jax.random.split(rng)
    partner = mix_partners(mask)
    if cutmix_alpha <= 0:
        mixed, lam = mixup(rng, images, partner, mixup_alpha)
    elif mixup_alpha <= 0:
        mixed, lam = cutmix(rng, images, partner, cutmix_alpha)
    else:
        mixed, lam = jax.lax.cond(jax.random.uniform(choice_rng) < switch_prob,
                                  lambda: cutmix(rng, images, partner, cutmix_alpha),
                                  lambda: mixup(rng, images, partner, mixup_alpha))
    return mixed, partner, lam


def mix_targets(labels: jax.Array, partner: jax.Array, lam: jax.Array, classes: int,
                label_smoothing: float = 0.0) -> jax.Array:
    """Soft targets lam * t(y) + (1 - lam) * t(y[partner]), t the label-smoothed one-hot
    (1 - eps) * one_hot + eps / classes (timm's `mixup_target`); each row sums to one."""
    def smooth(y: jax.Array) -> jax.Array:
        one_hot = jax.nn.one_hot(y, classes, dtype=lam.dtype)
        return (1 - label_smoothing) * one_hot + label_smoothing / classes

    return lam * smooth(labels) + (1 - lam) * smooth(labels[partner])


def soft_cross_entropy(logits: jax.Array, targets: jax.Array,
                       mask: jax.Array | None = None) -> jax.Array:
    """Per-example -sum_c target_c log p_c in at least float32; masked examples give 0."""
    logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
    losses = -jnp.sum(targets.astype(logits.dtype) * jax.nn.log_softmax(logits), axis=-1)
    return losses if mask is None else jnp.where(mask > 0, losses, 0.0)
