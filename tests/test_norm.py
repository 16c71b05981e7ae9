"""The closed-form batch-norm gradient against autodiff of the textbook formula (float64)."""

import jax
import jax.numpy as jnp
import numpy as np

from jaxsft.models import norm

EPS = 1e-5


def textbook(x, scale, bias, axis_name=None):
    axes = tuple(range(x.ndim - 1))
    mean, sq = x.mean(axes), (x * x).mean(axes)
    if axis_name is not None:
        mean, sq = jax.lax.pmean((mean, sq), axis_name)
    var = sq - mean * mean
    return (x - mean) / jnp.sqrt(var + EPS) * scale + bias


def inputs(shape=(4, 5, 3, 6), seed=0):
    k = jax.random.split(jax.random.key(seed), 4)
    x = 3.0 + 2.0 * jax.random.normal(k[0], shape, jnp.float64)
    scale = 1.0 + 0.3 * jax.random.normal(k[1], shape[-1:], jnp.float64)
    bias = 0.1 * jax.random.normal(k[2], shape[-1:], jnp.float64)
    weight = jax.random.normal(k[3], shape, jnp.float64)  # a loss that is not symmetric
    return x, scale, bias, weight


def test_values_statistics_and_gradients_match_autodiff(x64):
    x, scale, bias, weight = inputs()

    def loss(f):
        return lambda x, s, b: jnp.sum(jnp.tanh(f(x, s, b)) * weight)

    ours = lambda x, s, b: norm.batch_norm_train(x, s, b, EPS)[0]  # noqa: E731
    y, mean, var = norm.batch_norm_train(x, scale, bias, EPS)
    np.testing.assert_allclose(y, textbook(x, scale, bias), rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(mean, x.mean((0, 1, 2)), rtol=1e-14)
    np.testing.assert_allclose(var, x.var((0, 1, 2)), rtol=1e-13)
    got = jax.grad(loss(ours), argnums=(0, 1, 2))(x, scale, bias)
    want = jax.grad(loss(textbook), argnums=(0, 1, 2))(x, scale, bias)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-11, atol=1e-12)


def test_across_devices_dx_uses_global_sums_and_parameter_grads_stay_per_device(x64):
    # 4 devices x 2 examples against one device with all 8: per-device parameter gradients
    # summed over devices (as the train step does) give the single-device ones.
    x, scale, bias, weight = inputs((8, 3, 3, 5), seed=1)

    def grads(f, axis_name=None):
        def loss(x, s, b, w):
            return jnp.sum(jnp.tanh(f(x, s, b, axis_name)) * w)
        return jax.grad(loss, argnums=(0, 1, 2))

    ours = lambda x, s, b, a: norm.batch_norm_train(x, s, b, EPS, a)[0]  # noqa: E731
    split = lambda a: a.reshape(4, 2, *a.shape[1:])  # noqa: E731
    pgrads = jax.pmap(grads(ours, "d"), axis_name="d", in_axes=(0, None, None, 0))(
        split(x), scale, bias, split(weight))
    dx, dscale, dbias = grads(textbook)(x, scale, bias, weight)
    np.testing.assert_allclose(pgrads[0].reshape(x.shape), dx, rtol=1e-11, atol=1e-12)
    np.testing.assert_allclose(pgrads[1].sum(0), dscale, rtol=1e-11, atol=1e-12)
    np.testing.assert_allclose(pgrads[2].sum(0), dbias, rtol=1e-11, atol=1e-12)
