"""Imprinted heads: a new head whose class vectors are the normalised class means of the
training set's features, so fine-tuning starts from a nearest-class-mean classifier instead
of chance (weight imprinting, Qi et al., CVPR 2018, with SimpleShot's centring and L2
normalisation, Wang et al. 2019).

Logits are `scale * (f - mu) . w_k / r`: `mu` the mean feature, `w_k` the unit-length mean
of class k's centred, unit-length features, `r` the mean norm of the centred features. Their
argmax is the cosine nearest-class-mean rule; `scale` sets the start's confidence (10: a
logit gap of ~1 between classes whose cosines differ by 0.1).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from jaxsft.config import DataConfig

SCALE = 10.0
MAX_EXAMPLES = 10_000  # a seeded sample of a larger training split: class means settle fast


def class_mean_head(features: np.ndarray, labels: np.ndarray, num_classes: int,
                    scale: float = SCALE, total: Callable = lambda x: x) -> dict[str, np.ndarray]:
    """{"kernel" [D, K], "bias" [K]} (float64) of the imprinted head. A class without an
    example gets a zero vector: logit 0, below the others' while they agree with the input.
    `total` sums a statistic over processes (the identity on one), so that every process's
    examples count and all processes get the same head."""
    f = np.asarray(features, np.float64)
    count = total(np.float64(len(f)))
    mu = total(f.sum(axis=0)) / count
    centred = f - mu
    norms = np.linalg.norm(centred, axis=1, keepdims=True)
    sums = np.zeros((num_classes, f.shape[1]))
    np.add.at(sums, np.asarray(labels), centred / np.maximum(norms, 1e-12))
    sums = total(sums)
    w = sums / np.maximum(np.linalg.norm(sums, axis=1, keepdims=True), 1e-12)
    kernel = scale * w.T / max(float(total(norms.sum()) / count), 1e-12)
    return {"kernel": kernel, "bias": -mu @ kernel}


def imprinter(model: Any, cfg: DataConfig, *, train_examples: int, seed: int,
              max_examples: int = MAX_EXAMPLES) -> Callable[[dict], dict]:
    """variables (backbone loaded) -> the imprinted `fc` params, for `load_weights`'s
    `head_init`. The features are the backbone's as loaded (eval mode: its running
    statistics); on several processes each computes its share of the examples."""
    import jax
    import jax.numpy as jnp

    from jaxsft import features

    def total(x: np.ndarray) -> np.ndarray:
        if jax.process_count() == 1:
            return x
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x)).sum(axis=0)

    def head(variables: dict) -> dict:
        got = features.penultimate(features.forward(model), variables, cfg, seed=seed,
                                   train_examples=train_examples, max_examples=max_examples)
        num_classes = int(variables["params"]["fc"]["bias"].shape[0])
        dtype = variables["params"]["fc"]["kernel"].dtype
        params = class_mean_head(got["features"], got["labels"], num_classes, total=total)
        return {k: jnp.asarray(v, dtype) for k, v in params.items()}

    return head
