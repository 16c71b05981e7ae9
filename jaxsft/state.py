"""The training state: one immutable pytree that a step maps to the next.

Like flax's `TrainState`, plus the BatchNorm running statistics and an RNG key. `apply_fn`
(the model's `apply`) and `tx` (the optax transformation) are static: they are part of the
pytree's structure, not leaves, so `jax.jit`/`jax.pmap` treat them as code, and a checkpoint
holds only arrays.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax


class TrainState(flax.struct.PyTreeNode):
    """step, params, batch_stats, opt_state and rng; `apply_fn` and `tx` are static."""

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: optax.OptState
    rng: jax.Array
    apply_fn: Callable[..., Any] = flax.struct.field(pytree_node=False)
    tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)

    @classmethod
    def create(
        cls,
        *,
        apply_fn: Callable[..., Any],
        params: Any,
        batch_stats: Any,
        tx: optax.GradientTransformation,
        rng: jax.Array | None = None,
    ) -> TrainState:
        """A state at step 0 with a fresh optimizer state.

        `rng` defaults to a raw uint32 key of seed 0 (raw keys checkpoint as plain arrays).
        """
        if rng is None:
            rng = jax.random.key_data(jax.random.key(0))
        return cls(
            step=jnp.zeros((), jnp.int32),
            params=params,
            batch_stats=batch_stats if batch_stats is not None else {},
            opt_state=tx.init(params),
            rng=rng,
            apply_fn=apply_fn,
            tx=tx,
        )

    def apply_gradients(self, *, grads: Any, batch_stats: Any = None) -> TrainState:
        """One optimizer update; `batch_stats`, when given, replaces the running statistics."""
        updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
        return self.replace(
            step=self.step + 1,
            params=optax.apply_updates(self.params, updates),
            opt_state=opt_state,
            batch_stats=self.batch_stats if batch_stats is None else batch_stats,
        )
