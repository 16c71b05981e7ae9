"""jaxsft.cpu.stored: the ReLU whose gradient reads the stored output, against nn.relu."""

import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from helpers import fusion_operand_counts

from jaxsft.cpu.stored import from_storage, relu


def test_relu_value_and_gradients_match_flax_in_float64(x64):
    x = jnp.asarray([-2.0, -0.0, 0.0, 1e-300, 3.0, np.inf, -np.inf])
    np.testing.assert_array_equal(relu(x), nn.relu(x))
    g = jnp.arange(1.0, 8.0)
    ours = jax.vjp(relu, x)[1](g)[0]
    np.testing.assert_array_equal(ours, jax.vjp(nn.relu, x)[1](g)[0])  # 0 at 0, as flax
    np.testing.assert_array_equal(ours, [0, 0, 0, 4, 5, 6, 0])
    assert np.isnan(relu(jnp.asarray(np.nan)))

    def second_order(act):  # reverse over reverse through the custom VJP
        return jax.grad(lambda s: jnp.sum(jax.grad(lambda s: jnp.sum(act(x * s) ** 3))(s) ** 2))

    np.testing.assert_allclose(second_order(relu)(1.5), second_order(nn.relu)(1.5), rtol=1e-15)


def test_from_storage_computes_fn_of_its_operands():
    x, y = jnp.arange(6.0).reshape(2, 3), jnp.ones((2, 3))
    np.testing.assert_array_equal(from_storage(lambda a, b: a * 2 + b, x, y), x * 2 + y)


def mask_fusion_operands(act, depth: int = 4) -> list[int]:
    """Operand counts of the compiled fusions that compare activations (ReLU masks) in the
    gradient of a residual chain y <- act(y * s + y)."""
    def loss(x, s):
        y = x
        for i in range(depth):
            y = act(y * s[i] + y)
        return jnp.sum(y * y)

    args = (jnp.ones((4, 8, 8, 16)), jnp.ones((depth, 16)))
    text = jax.jit(jax.grad(loss, 1)).lower(*args).compile().as_text()
    return fusion_operand_counts(text, r" compare\(", re.escape("f32[4,8,8,16]"))


def test_relu_masks_read_the_stored_output_instead_of_recomputing_it():
    # flax's ReLU: XLA:CPU recomputes each block's y * s + y inside the mask (3 operands).
    assert max(mask_fusion_operands(nn.relu)) > 2
    counts = mask_fusion_operands(relu)
    assert counts and max(counts) == 2  # the stored output and the cotangent
