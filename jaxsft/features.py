"""Penultimate features of a training split: the globally average-pooled activations that
`fc` reads, under the eval preprocessing, batched and data-parallel over the local devices.

Shared by model selection (`jaxsft.select`, which scores them) and imprinted heads
(`jaxsft.imprint`, which builds a head from their class means).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable
from typing import Any

import numpy as np

from jaxsft.config import DataConfig


def forward(model: Any) -> Callable:
    """pmapped (backbone variables, images [D, B, H, W, 3]) -> the features before `fc`.

    The head is not applied: method interception hands its input back as the model's output,
    the model left as it is. So one compiled forward pass serves every head size of an
    architecture (`penultimate` applies the head on the host)."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    def apply(variables, images):
        def skip_fc(next_fun, args, kwargs, context):
            if context.method_name == "__call__" and context.module.name == "fc":
                return args[0]
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(skip_fc):
            return model.apply(variables, images, train=False).astype(jnp.float32)

    return jax.pmap(apply, axis_name="batch")


def _backbone(variables: Any) -> Any:
    """The variables without the head: what `forward` reads, the same tree for every head."""
    return {**variables, "params": {k: v for k, v in variables["params"].items() if k != "fc"}}


def _batches(cfg: DataConfig, max_examples: int | None, seed: int, train_examples: int):
    """(batches of the train split with the eval preprocessing, how many to take, subset).

    A seeded subset of `max_examples` is the first examples of the index sampler's seeded
    permutation (the training stream of epoch 0 with augmentation "none" = the eval view)
    when one epoch holds that many; otherwise one eval pass over the whole split, subsampled
    afterwards with the same seed."""
    from jaxsft import data

    batch = cfg.batch_size
    if max_examples is not None and max_examples < train_examples:
        full_batches = train_examples // batch
        if max_examples <= full_batches * batch:
            stream = data.train_batches(dataclasses.replace(cfg, augment="none"), seed=seed)
            return stream, -(-max_examples // batch), None
        subset = np.sort(np.random.default_rng(seed).permutation(train_examples)[:max_examples])
    else:
        subset = None
    one_pass = dataclasses.replace(cfg, eval_split=cfg.train_split, eval_batch_size=None)
    return data.eval_batches(one_pass), None, subset


def penultimate(apply: Callable, variables: Any, cfg: DataConfig, *, train_examples: int,
                max_examples: int | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    """{"features" [N, D], "labels" [N], and where `variables` has a head "logits" [N, Z]}
    of this process's examples of the train split (all of them on one host), `apply` being
    `forward(model)`; the logits are the head applied to the features in float32."""
    from jaxsft import data, steps

    replicated = steps.replicate(_backbone(variables))
    stream, count, subset = _batches(cfg, max_examples, seed, train_examples)
    parts: dict[str, list[np.ndarray]] = {"features": [], "labels": []}
    for batch in data.device_prefetch(itertools.islice(stream, count)):
        features = apply(replicated, batch["image"])
        keep = np.asarray(batch["mask"]).reshape(-1) > 0
        parts["features"].append(np.asarray(features).reshape(keep.size, -1)[keep])
        parts["labels"].append(np.asarray(batch["label"]).reshape(-1)[keep])
    out = {k: np.concatenate(v) for k, v in parts.items()}
    head = variables["params"].get("fc")
    if head is not None:
        kernel, bias = (np.asarray(head[k], np.float32) for k in ("kernel", "bias"))
        out["logits"] = out["features"] @ kernel + bias
    if count is not None:
        out = {k: v[:max_examples] for k, v in out.items()}
    if subset is not None:
        subset = subset[subset < len(out["labels"])]
        out = {k: v[subset] for k, v in out.items()}
    if not len(out["labels"]):
        raise data.DataError(f"no readable example in {cfg.train_split!r} of {cfg.dataset}")
    return out
