"""Training-mode batch normalisation with the closed-form gradient torch and cuDNN use.

Autodiff through `mean` and `var` differentiates each statistic separately and leaves XLA
several passes over every activation (and, on the CPU, the centred input materialised for the
backward pass). The closed form needs two reductions and one elementwise pass:

    xhat = (x - mean) / sqrt(var + eps)
    dbias = sum(g), dscale = sum(g * xhat)
    dx = scale / sqrt(var + eps) * (g - dbias / n - xhat * dscale / n)

with sums over batch and space (and over devices when `axis_name` is set; the parameter
gradients stay per-device sums, as the train step sums gradients across devices itself).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax


def batch_norm_train(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float,
                     axis_name: str | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Normalises x (..., C) with its batch statistics; returns (y, mean, biased var).

    The statistics, and y, are in float32 at least (float64 for float64 input): cast y to
    the compute dtype. Differentiable in x, scale and bias (reverse mode).
    """
    stats_dtype = jnp.promote_types(x.dtype, jnp.float32)
    xs = x.astype(stats_dtype)
    axes = tuple(range(x.ndim - 1))
    mean = _global_mean(xs.mean(axes), axis_name)
    var = _global_mean(jnp.square(xs - mean).mean(axes), axis_name)
    # The statistics enter _normalize as constants; its VJP includes their dependence on x.
    y = _normalize(x, lax.stop_gradient(mean), lax.stop_gradient(var), scale, bias,
                   epsilon, axis_name)
    return y, mean, var


def normalize(x: jax.Array, mean: jax.Array, var: jax.Array, scale: jax.Array,
              bias: jax.Array, epsilon: float) -> jax.Array:
    """(x - mean) * (scale / sqrt(var + eps)) + bias, in the statistics' dtype (plain
    autodiff: the statistics here are constants, e.g. the running ones)."""
    inv = lax.rsqrt(var + epsilon) * scale
    return (x.astype(inv.dtype) - mean) * inv + bias


def _global_mean(v: jax.Array, axis_name: str | None) -> jax.Array:
    return v if axis_name is None else lax.pmean(v, axis_name)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _normalize(x, mean, var, scale, bias, epsilon: float, axis_name: str | None):
    return normalize(x, mean, var, scale, bias, epsilon)


def _normalize_fwd(x, mean, var, scale, bias, epsilon, axis_name):
    return normalize(x, mean, var, scale, bias, epsilon), (x, mean, var, scale, bias)


def _normalize_bwd(epsilon: float, axis_name: str | None, residuals: tuple, g: jax.Array):
    x, mean, var, scale, bias = residuals
    axes = tuple(range(x.ndim - 1))
    rstd = lax.rsqrt(var + epsilon)
    xhat = (x.astype(mean.dtype) - mean) * rstd
    gs = g.astype(mean.dtype)
    dbias, dscale = gs.sum(axes), (gs * xhat).sum(axes)
    count = x.size // x.shape[-1]
    total_dbias, total_dscale = dbias, dscale
    if axis_name is not None:
        count *= lax.psum(1, axis_name)
        total_dbias, total_dscale = lax.psum((dbias, dscale), axis_name)
    dx = (scale * rstd) * (gs - total_dbias / count - xhat * (total_dscale / count))
    return (dx.astype(x.dtype), jnp.zeros_like(mean), jnp.zeros_like(var),
            dscale.astype(scale.dtype), dbias.astype(bias.dtype))


_normalize.defvjp(_normalize_fwd, _normalize_bwd)
