"""Imprinted heads: a new head whose class vectors are the normalised class means of the
training set's features, so fine-tuning starts from a nearest-class-mean classifier instead
of chance (weight imprinting, Qi et al., CVPR 2018, with SimpleShot's centring and L2
normalisation, Wang et al. 2019).

Logits are `scale * (f - mu) . w_k / r`: `mu` the mean feature, `w_k` the unit-length mean
of class k's centred, unit-length features, `r` the mean norm of the centred features. Their
argmax is the cosine nearest-class-mean rule; `scale` sets the start's confidence. By default
it is fitted: the scale whose leave-one-out predictions on the training examples have the
least cross-entropy (temperature scaling, Guo et al. 2017, on held-out predictions the
training set itself provides). Where the source's features separate the classes poorly, a
fixed scale makes the start confidently wrong: on the transfer benchmark's LFW target, scale
10 had a held-out cross-entropy above chance's, the fitted one under it (experiments/transfer,
protocol 4).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from jaxsft.config import DataConfig
from jaxsft.transferability import golden_section

SCALE = 10.0  # where no class has two examples to leave one out (1 label per class)
SCALE_MIN, SCALE_MAX = 0.1, 100.0  # the fitted scale's range: a separable set has no optimum
MAX_EXAMPLES = 10_000  # a seeded sample of a larger training split: class means settle fast


def class_mean_head(features: np.ndarray, labels: np.ndarray, num_classes: int,
                    scale: float | None = None,
                    total: Callable = lambda x: x) -> dict[str, np.ndarray]:
    """{"kernel" [D, K], "bias" [K]} (float64) of the imprinted head; `scale` None: fitted
    (`fitted_scale`). A class without an example gets a zero vector: logit 0, below the
    others' while they agree with the input. `total` sums a statistic over processes (the
    identity on one), so that every process's examples count and all get the same head."""
    f, labels = np.asarray(features, np.float64), np.asarray(labels)
    count = total(np.float64(len(f)))
    mu = total(f.sum(axis=0)) / count
    centred = f - mu
    norms = np.linalg.norm(centred, axis=1, keepdims=True)
    units = centred / np.maximum(norms, 1e-12)
    sums = np.zeros((num_classes, f.shape[1]))
    np.add.at(sums, labels, units)
    sums = total(sums)
    radius = max(float(total(norms.sum()) / count), 1e-12)
    if scale is None:
        scale = fitted_scale(centred / radius, units, labels, sums, total)
    kernel = scale * _unit_rows(sums).T / radius
    return {"kernel": kernel, "bias": -mu @ kernel}


def fitted_scale(x: np.ndarray, units: np.ndarray, labels: np.ndarray, sums: np.ndarray,
                 total: Callable = lambda x: x) -> float:
    """The scale in [SCALE_MIN, SCALE_MAX] with the least mean cross-entropy of the
    leave-one-out logits `x_i . w_k`, where an example's own class vector is its class's
    unit-length mean without it (`x`: centred features over the mean radius; `units`: the
    centred unit features whose per-class `sums` make the class vectors). The cross-entropy
    is convex in the scale, so a golden-section search in log-scale finds it to 0.1%. Examples
    of single-example classes have nothing to leave out and do not count; SCALE where none
    is left."""
    logits = x @ _unit_rows(sums).T
    own = np.arange(len(labels)), labels
    logits[own] = np.einsum("ij,ij->i", x, _unit_rows(sums[labels] - units))
    kept = total(np.bincount(labels, minlength=len(sums)).astype(np.float64))[labels] >= 2
    if total(np.float64(kept.sum())) == 0:
        return SCALE
    margins = logits - logits[own][:, None]  # another class's logit minus the own class's
    margins[own] = -np.inf
    margins = margins[kept]

    def loss(log_scale: float) -> float:
        # log(1 + sum exp(scale * margin)), with log1p: exact where every margin is negative
        d = np.exp(log_scale) * margins
        top = np.maximum(d.max(axis=1, initial=-np.inf), 0.0)
        nll = top + np.log1p(np.exp(d - top[:, None]).sum(axis=1) + np.expm1(-top))
        return float(total(nll.sum()))

    return float(np.exp(golden_section(lambda u: -loss(u), np.log(SCALE_MIN),
                                       np.log(SCALE_MAX), tol=1e-3)))  # 0.1%


def _unit_rows(a: np.ndarray) -> np.ndarray:
    return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)


def imprinter(model: Any, cfg: DataConfig, *, train_examples: int, seed: int,
              scale: float | None = None,
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
        params = class_mean_head(got["features"], got["labels"], num_classes, scale, total)
        return {k: jnp.asarray(v, dtype) for k, v in params.items()}

    return head
