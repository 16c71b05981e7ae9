"""jaxsft.cpu.onednn: oneDNN's convolution through XLA:CPU's custom call.

oneDNN has no float64 convolution, so its float32 results are checked against XLA's
convolution of the same values in float64: its error must be float32 rounding, of the size of
XLA's own float32 error, not a wrong window, padding or flip (those are O(1)).
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jaxsft.cpu import onednn
from jaxsft.cpu.conv import Algorithms, choose_algorithms, conv2d

DN = ("NHWC", "HWIO", "NHWC")
# (batch, height, width, in, out, kernel, stride, padding): ResNet's 3x3 and 7x7 stem, stride 2,
# odd and non-square maps, asymmetric and zero padding, wide channels.
SHAPES = [
    (2, 9, 7, 16, 8, 3, 1, ((1, 1), (1, 1))),
    (2, 12, 12, 8, 16, 3, 2, ((1, 1), (1, 1))),
    (2, 10, 11, 6, 5, 3, 1, ((0, 2), (2, 0))),
    (2, 8, 8, 5, 7, 3, 1, ((0, 0), (0, 0))),
    (2, 32, 30, 3, 16, 7, 2, ((3, 3), (3, 3))),
    (2, 7, 7, 256, 128, 3, 1, ((1, 1), (1, 1))),
]


def case(shape, seed=0):
    b, h, w, cin, cout, k, stride, padding = shape
    rng = np.random.RandomState(seed)
    x = jnp.asarray(rng.standard_normal((b, h, w, cin)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((k, k, cin, cout)), jnp.float32)
    return x, kernel, (stride, stride), padding


def xla(x, kernel, strides, padding):
    return lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=DN)


def float64_error(got, x, kernel, fn):
    """Max |got - fn(x, kernel) in float64|, relative to the largest exact value."""
    with jax.enable_x64(True):
        exact = np.asarray(fn(jnp.asarray(x, jnp.float64), jnp.asarray(kernel, jnp.float64)))
    return np.max(np.abs(np.asarray(got, np.float64) - exact)) / np.max(np.abs(exact))


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_and_input_gradient_are_xlas_up_to_float32_rounding(shape):
    x, kernel, strides, padding = case(shape)
    forward = jax.jit(lambda x, k: onednn.conv(x, k, strides, padding))
    errors = {"onednn": float64_error(forward(x, kernel), x, kernel,
                                      lambda x, k: xla(x, k, strides, padding)),
              "xla": float64_error(xla(x, kernel, strides, padding), x, kernel,
                                   lambda x, k: xla(x, k, strides, padding))}
    if strides == (1, 1):
        g = xla(x, kernel, strides, padding)  # any cotangent of the output's shape

        def exact_dx(g, k):
            return jax.vjp(lambda x: xla(x, k, strides, padding), jnp.zeros(x.shape, g.dtype))[
                1](g)[0]

        errors["onednn dx"] = float64_error(
            jax.jit(lambda g, k: onednn.input_grad(g, k, padding))(g, kernel), g, kernel, exact_dx)
        errors["xla dx"] = float64_error(jax.jit(exact_dx)(g, kernel), g, kernel, exact_dx)
    # float32 epsilon is 1.2e-7; sums of up to 7*7*256 products keep errors near 1e-6.
    assert max(errors.values()) < 2e-6, errors
    assert errors["onednn"] <= 8 * max(errors["xla"], 1.2e-7), errors


def test_default_choice_puts_large_float32_maps_on_onednn_and_compiles_its_call():
    shape = (32, 56, 56, 64)
    strides, padding = (1, 1), ((1, 1), (1, 1))
    assert choose_algorithms(shape, (3, 3, 64, 64), strides, padding, dtype=jnp.float32) == (
        Algorithms("onednn", "onednn", "xla-stored"))
    assert choose_algorithms(shape, (3, 3, 64, 128), (2, 2), padding, dtype=jnp.float32) == (
        Algorithms("onednn", "xla", "xla-stored"))  # a strided input gradient is not a conv
    assert choose_algorithms(shape, (3, 3, 64, 64), strides, padding, dtype=jnp.float64) == (
        Algorithms("xla", "xla", "xla-stored"))  # oneDNN has no float64 convolution

    def grads(x, kernel):
        return jax.grad(lambda x, k: (conv2d(x, k, 1, 1) ** 2).sum(), (0, 1))(x, kernel)

    x, kernel, _, _ = case((2, 8, 8, 4, 4, 3, 1, ((1, 1), (1, 1))))
    text = jax.jit(grads).lower(x, kernel).compile().as_text()
    assert text.count('custom_call_target="__onednn$convolution"') == 2  # forward, dx
    with jax.enable_x64(True):
        x64 = jnp.asarray(x, jnp.float64), jnp.asarray(kernel, jnp.float64)
        assert "__onednn$" not in jax.jit(grads).lower(*x64).compile().as_text()


def test_a_jaxlib_whose_runtime_was_not_tested_keeps_xla(monkeypatch):
    monkeypatch.setattr(onednn.xla_flags, "jaxlib_version", lambda: "0.11.0")
    onednn._runtime_tested.cache_clear()
    try:
        assert not onednn.available(jnp.float32)
        assert choose_algorithms((32, 56, 56, 64), (3, 3, 64, 64), (1, 1), ((1, 1),) * 2,
                                 dtype=jnp.float32) == Algorithms("xla", "xla", "xla-stored")
        with pytest.raises(ValueError, match="jaxlib 0.10.2"):
            conv2d(jnp.zeros((1, 4, 4, 2)), jnp.zeros((3, 3, 2, 2)), 1, 1,
                   algorithms=("onednn", "xla", "xla"))
    finally:
        monkeypatch.undo()
        onednn._runtime_tested.cache_clear()
    assert onednn.available(jnp.float32)


def test_jaxsft_onednn_off_keeps_xla(monkeypatch):
    shape, kernel = (32, 56, 56, 64), (3, 3, 64, 64)
    monkeypatch.setenv("JAXSFT_ONEDNN", "off")
    assert choose_algorithms(shape, kernel, (1, 1), ((1, 1),) * 2, dtype=jnp.float32) == (
        Algorithms("xla", "xla", "xla-stored"))
    with pytest.raises(ValueError, match="JAXSFT_ONEDNN not 'off'"):
        conv2d(jnp.zeros((1, 4, 4, 2)), jnp.zeros((3, 3, 2, 2)), 1, 1,
               algorithms=("onednn", "xla", "xla"))
    monkeypatch.setenv("JAXSFT_ONEDNN", "on")
    assert choose_algorithms(shape, kernel, (1, 1), ((1, 1),) * 2,
                             dtype=jnp.float32).forward == "onednn"


def test_vmap_and_second_order_gradients_work_through_the_custom_vjp():
    x, kernel, strides, padding = case(SHAPES[0])
    algorithms = Algorithms("onednn", "onednn", "xla-stored")

    def conv(x, k):
        return conv2d(x, k, strides, padding, algorithms=algorithms)

    xs = jnp.stack([x, 2 * x])
    batched = jax.vmap(conv, in_axes=(0, None))(xs, kernel)
    np.testing.assert_allclose(batched[1], 2 * xla(x, kernel, strides, padding), rtol=2e-5,
                               atol=2e-4)
    # grad of a gradient: the input gradient's own VJP goes through oneDNN again.
    def grad_norm(conv):
        return lambda k: jnp.sum(jax.grad(lambda x: jnp.sum(conv(x, k) ** 2))(x) ** 2)

    np.testing.assert_allclose(jax.grad(grad_norm(conv))(kernel),
                               jax.grad(grad_norm(lambda x, k: xla(x, k, strides, padding)))(
                                   kernel), rtol=1e-4)


def test_onednn_where_it_cannot_compute_is_refused_with_the_fix():
    x, kernel = jnp.zeros((1, 6, 6, 4)), jnp.zeros((3, 3, 4, 4))
    with pytest.raises(ValueError, match="stride-1 input gradients only: use 'xla'"):
        conv2d(x, kernel, 2, 1, algorithms=("onednn", "onednn", "xla"))
    with pytest.raises(ValueError, match="ungrouped"):
        conv2d(x, jnp.zeros((3, 3, 2, 4)), 1, 1, 2, algorithms=("onednn", "xla", "xla"))
    with jax.enable_x64(True), pytest.raises(ValueError, match="float32"):
        conv2d(jnp.zeros((1, 6, 6, 4), jnp.float64), jnp.zeros((3, 3, 4, 4), jnp.float64), 1, 1,
               algorithms=("onednn", "xla", "xla"))


def test_the_backend_config_is_the_one_xla_parses():
    # The forward pass of a 7x7/2 stem: window, strides and padding reach the custom call.
    x, kernel, strides, padding = case(SHAPES[4])
    text = jax.jit(lambda x, k: onednn.conv(x, k, strides, padding)).lower(
        x, kernel).compile().as_text()
    config = re.search(r'custom_call_target="__onednn\$convolution".*backend_config=(\{.*\})',
                       text).group(1)
    assert '"strides":[2,2]' in config and '"pad_left":[3,3]' in config
    assert '"size":[7,7]' in config
