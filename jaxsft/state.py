"""The training state: one immutable pytree that a step maps to the next.

Like flax's `TrainState`, plus the BatchNorm running statistics and an RNG key. `apply_fn`
(the model's `apply`) and `tx` (the optax transformation) are static: they are part of the
pytree's structure, not leaves, so `jax.jit`/`jax.pmap` treat them as code, and a checkpoint
holds only arrays.

Optional recipe state: `ema_params` / `ema_batch_stats`, an exponential moving average of the
weights and BatchNorm statistics (Polyak & Juditsky 1992; as timm's `ModelEmaV2`), None when
off. A state without EMA has exactly the seed's leaves and checkpoint layout.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax.serialization
import flax.struct
import jax
import jax.numpy as jnp
import optax

EMA_FIELDS = ("ema_params", "ema_batch_stats")


class TrainState(flax.struct.PyTreeNode):
    """step, params, batch_stats, opt_state, rng and optional EMA; `apply_fn`, `tx` static."""

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: optax.OptState
    rng: jax.Array
    apply_fn: Callable[..., Any] = flax.struct.field(pytree_node=False)
    tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)
    ema_params: Any = None
    ema_batch_stats: Any = None

    @classmethod
    def create(
        cls,
        *,
        apply_fn: Callable[..., Any],
        params: Any,
        batch_stats: Any,
        tx: optax.GradientTransformation,
        rng: jax.Array | None = None,
        ema: bool = False,
    ) -> TrainState:
        """A state at step 0 with a fresh optimizer state.

        `rng` defaults to a raw uint32 key of seed 0 (raw keys checkpoint as plain arrays).
        `ema=True` starts an EMA of params and batch_stats at their values (copies), which
        `train_step(..., ema_decay=...)` then updates.
        """
        if rng is None:
            rng = jax.random.key_data(jax.random.key(0))
        batch_stats = batch_stats if batch_stats is not None else {}
        copy = functools.partial(jax.tree.map, lambda x: jnp.array(x, copy=True))
        return cls(
            step=jnp.zeros((), jnp.int32),
            params=params,
            batch_stats=batch_stats,
            opt_state=tx.init(params),
            rng=rng,
            apply_fn=apply_fn,
            tx=tx,
            ema_params=copy(params) if ema else None,
            ema_batch_stats=copy(batch_stats) if ema else None,
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


def ema_state(state: TrainState) -> TrainState:
    """`state` with its EMA as params and batch_stats (for `eval_step`, export, predict)."""
    if state.ema_params is None:
        raise ValueError("this TrainState has no EMA: create it with TrainState.create(..., "
                         "ema=True) and train with train_step(..., ema_decay=...)")
    return state.replace(params=state.ema_params, batch_stats=state.ema_batch_stats)


def update_ema(state: TrainState, decay: float) -> TrainState:
    """ema <- decay * ema + (1 - decay) * current, for params and batch_stats."""
    def mix(ema: Any, new: Any) -> Any:
        return jax.tree.map(lambda e, x: decay * e + (1 - decay) * x.astype(e.dtype), ema, new)

    return state.replace(ema_params=mix(state.ema_params, state.params),
                         ema_batch_stats=mix(state.ema_batch_stats, state.batch_stats))


def _to_state_dict(state: TrainState) -> dict[str, Any]:
    """flax's state dict of the fields, without the EMA ones when they are None: a state
    without EMA checkpoints exactly as before they existed."""
    out = {}
    for field in dataclasses.fields(state):
        value = getattr(state, field.name)
        if field.metadata.get("pytree_node", True) and not (
                field.name in EMA_FIELDS and value is None):
            out[field.name] = flax.serialization.to_state_dict(value)
    return out


def _from_state_dict(target: TrainState, state: dict[str, Any]) -> TrainState:
    updates = {}
    for field in dataclasses.fields(target):
        if not field.metadata.get("pytree_node", True):
            continue
        if field.name in EMA_FIELDS and getattr(target, field.name) is None:
            continue
        if field.name not in state:
            raise ValueError(f"missing field {field.name} in the state dict of a TrainState: "
                             f"restore into a state made with the same options (ema=...)")
        updates[field.name] = flax.serialization.from_state_dict(
            getattr(target, field.name), state[field.name], name=field.name)
    if set(state) - set(updates):
        raise ValueError(f"unexpected field(s) {sorted(set(state) - set(updates))} in the state "
                         f"dict of a TrainState: restore into a state made with ema=True")
    return target.replace(**updates)


flax.serialization.register_serialization_state(TrainState, _to_state_dict, _from_state_dict,
                                                override=True)
