"""Computing from stored values on XLA:CPU, where its fusion would recompute them.

XLA:CPU fuses elementwise producers into every consumer, duplicating them where needed, and
drops optimization barriers before fusion. In a ResNet's backward pass that means a ReLU mask
recomputes the residual stream (BatchNorm, add, ReLU) back through every block of a stage
for each element, and a kernel gradient's operand transpose recomputes BatchNorm and ReLU for
every strided element: many times the cost of reading the stored activation.

`from_storage(fn, *xs)` computes fn(*xs) inside a conditional whose two branches are both fn:
a branch is a fusion boundary, so its operands are read as stored, and the predicate (any
runtime scalar) changes nothing but what the compiler can fuse. `relu` is max(x, 0) whose
gradient, on the CPU, is computed that way from the stored output.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax import lax

__all__ = ["from_storage", "relu"]


def from_storage(fn: Callable[..., jax.Array], *xs: jax.Array) -> jax.Array:
    """fn(*xs), computed from the xs as stored in memory rather than from their producers."""
    return lax.cond(jnp.isnan(xs[0].reshape(-1)[0]), fn, fn, *xs)


def relu(x: jax.Array) -> jax.Array:
    """flax.linen.relu (gradient 0 at 0); on the CPU the gradient masks by the stored output."""
    return lax.platform_dependent(x, cpu=_relu_from_output, default=nn.relu)


@jax.custom_vjp
def _relu_from_output(x: jax.Array) -> jax.Array:
    return jnp.maximum(x, 0)


def _relu_fwd(x: jax.Array):
    y = jnp.maximum(x, 0)
    return y, y


def _relu_bwd(y: jax.Array, g: jax.Array):
    # max(x, 0) > 0 exactly where x > 0: the mask nn.relu's gradient uses.
    return (from_storage(lambda y, g: jnp.where(y > 0, g, jnp.zeros((), g.dtype)), y, g),)


_relu_from_output.defvjp(_relu_fwd, _relu_bwd)
