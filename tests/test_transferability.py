"""Model-selection scores (jaxsft.transferability) against direct computations."""

import numpy as np
import pytest
import scipy.optimize

from jaxsft import transferability as T


def _task(n: int, d: int, classes: int = 3, signal: float = 1.5, seed: int = 0):
    """Features with some class signal, and their labels."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes
    rng.shuffle(y)
    f = rng.normal(size=(n, d)) + signal * np.eye(classes)[y] @ rng.normal(size=(classes, d))
    return f, y


def _direct_max_evidence(f: np.ndarray, y: np.ndarray) -> float:
    """max over (alpha, beta) of log N(y | 0, C) / N, C = I / beta + F F^T / alpha, computed
    directly (an N x N matrix, slogdet and solve; no SVD) and maximised by Nelder-Mead from
    several starts, over log alpha and log beta. C = (I + (beta / alpha) F F^T) / beta keeps
    it well conditioned however large beta grows."""
    n = len(y)

    def negative(p):
        alpha, beta = np.exp(p)
        inner = np.eye(n) + (beta / alpha) * (f @ f.T)
        _, logdet = np.linalg.slogdet(inner)
        quad = beta * (y @ np.linalg.solve(inner, y))
        if not quad > 0:  # beyond float64's reach (beta / alpha ~ 1e16 and more)
            return np.inf
        return (n / 2 * np.log(2 * np.pi) - n / 2 * np.log(beta) + logdet / 2 + quad / 2) / n

    options = dict(xatol=1e-10, fatol=1e-14, maxiter=20000, maxfev=20000)
    runs = [scipy.optimize.minimize(negative, start, method="Nelder-Mead", options=options)
            for start in ([0.0, 0.0], [3.0, 1.0], [-2.0, 2.0])]
    return -min(r.fun for r in runs)


@pytest.mark.parametrize("n,d", [(60, 20), (30, 80)], ids=["N>D", "N<D"])
def test_logme_is_the_maximised_evidence_in_both_regimes(n, d):
    f, y = _task(n, d)
    per_class = T.logme_evidences(f, y)
    direct = np.array([_direct_max_evidence(f, (y == c).astype(np.float64)) for c in range(3)])
    np.testing.assert_allclose(per_class, direct, rtol=0, atol=1e-7)
    assert T.logme(f, y) == pytest.approx(direct.mean(), abs=1e-7)


def test_logme_rank_deficient_features_count_only_nonzero_directions():
    """Duplicated and all-zero columns change neither F F^T nor the evidence (the reference's
    D/2 log alpha would change with D); nor does N < D with rank below N."""
    f, y = _task(40, 12)
    widened = np.concatenate([f, np.zeros((40, 30)), f[:, :5]], axis=1)
    scale = np.ones(widened.shape[1])  # duplicated columns double their share of F F^T:
    scale[-5:] = scale[:5] = np.sqrt(0.5)  # rescale so that F F^T is exactly the same
    np.testing.assert_allclose(T.logme_evidences(widened * scale, y), T.logme_evidences(f, y),
                               atol=1e-9)
    low_rank = f[:, :4] @ np.random.default_rng(1).normal(size=(4, 100))  # rank 4, D = 100
    direct = [_direct_max_evidence(low_rank, (y == c).astype(np.float64)) for c in range(3)]
    np.testing.assert_allclose(T.logme_evidences(low_rank, y), direct, atol=1e-7)


def test_leep_matches_a_hand_computed_example():
    # 4 examples, 2 source classes, 2 target classes.
    p = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    y = np.array([0, 1, 0, 1])
    # P(y, z) = sum over examples of class y of p / 4:
    #   y=0: (0.9 + 0.6, 0.1 + 0.4) / 4 = (0.375, 0.125); y=1: (0.5, 1.5) / 4 = (0.125, 0.375)
    # P(z) = (0.5, 0.5); P(y | z) = [[0.75, 0.25], [0.25, 0.75]]
    # EEP: ex0 0.9*0.75 + 0.1*0.25 = 0.7; ex1 0.2*0.25 + 0.8*0.75 = 0.65;
    #      ex2 0.6*0.75 + 0.4*0.25 = 0.55; ex3 0.3*0.25 + 0.7*0.75 = 0.6
    want = np.mean(np.log([0.7, 0.65, 0.55, 0.6]))
    assert T.leep(p, y) == pytest.approx(want, abs=1e-15)
    assert T.leep(T.softmax(np.log(p) + 3.0), y) == pytest.approx(want, abs=1e-12)
    with pytest.raises(ValueError, match="probabilities"):
        T.leep(p * 2, y)


def test_scores_rank_separable_features_above_noise():
    signal, y = _task(60, 16, signal=3.0)
    noise = np.random.default_rng(5).normal(size=signal.shape)
    for score in (T.logme, T.nleep, T.linear_probe_accuracy, T.knn_accuracy):
        assert score(signal, y) > score(noise, y), score.__name__
    assert T.linear_probe_accuracy(signal, y) > 0.9


@pytest.mark.parametrize("score", [T.logme, T.nleep, T.linear_probe_accuracy, T.knn_accuracy],
                         ids=lambda s: s.__name__)
def test_every_feature_score_ignores_the_order_of_feature_columns(score):
    f, y = _task(45, 10, signal=1.0, seed=3)
    order = np.random.default_rng(0).permutation(f.shape[1])
    assert score(f[:, order], y) == pytest.approx(score(f, y), abs=1e-9)


def test_leep_ignores_the_order_of_source_classes():
    f, y = _task(30, 6, seed=4)
    p = T.softmax(f)
    order = np.random.default_rng(0).permutation(6)
    assert T.leep(p[:, order], y) == pytest.approx(T.leep(p, y), abs=1e-12)


@pytest.mark.parametrize("score", [T.logme, T.sfda], ids=["logme", "sfda"])
def test_bad_inputs_are_one_clear_error(score):
    f, y = _task(10, 4)
    with pytest.raises(ValueError, match=r"features \[N, D\] and labels \[N\]"):
        score(f, y[:-1])
    with pytest.raises(ValueError, match="NaN"):
        score(np.full_like(f, np.nan), y)
    with pytest.raises(ValueError, match="integers"):
        score(f, y - 1)
    if score is T.logme:
        with pytest.raises(ValueError, match="all zero"):
            score(np.zeros_like(f), y)
    else:
        with pytest.raises(ValueError, match="at least 2 classes"):
            score(f, np.zeros_like(y))
        with pytest.raises(ValueError, match="vary within a class"):
            score(np.eye(3)[y] @ np.arange(12.0).reshape(3, 4), y)  # constant per class


# ---------------------------------------------------------------------------- SFDA


def _direct_sfda(f: np.ndarray, y: np.ndarray) -> float:
    """SFDA as the reference's formulas read (TencentARC/SFDA, metrics.SFDA_Score), the long
    way: per-class covariance matrices, a 3-step power iteration, the shrunk total and within
    scatters, the generalised eigenproblem S_b v = lambda S_w v (scipy.linalg.eigh) with all
    D eigenvectors, explicit exponentials, ConfMix example by example."""
    import scipy.linalg

    classes = list(np.unique(y))
    n, d = f.shape
    priors = np.array([np.mean(y == c) for c in classes])

    def posterior(x, shrinkage):
        means = np.array([x[y == c].mean(axis=0) for c in classes])
        within = sum(p * np.cov(x[y == c].T, bias=True) for p, c in zip(priors, classes))
        if shrinkage is None:
            v = within.sum(axis=1)
            for _ in range(3):
                u = within @ v / np.linalg.norm(within @ v)
                v = within @ u / np.linalg.norm(within @ u)
            shrinkage = max(np.exp(-5 * (v @ within @ u)), 1e-10)

        def shrunk(m):
            return (1 - shrinkage) * m + shrinkage * np.trace(m) / d * np.eye(d)

        total, within = shrunk(np.cov(x.T, bias=True)), shrunk(within)
        values, vectors = scipy.linalg.eigh(total - within, within)
        vectors = vectors[:, np.argsort(values)[::-1]]
        coef = means @ vectors @ vectors.T
        logits = x @ coef.T - 0.5 * np.diag(means @ coef.T) + np.log(priors)
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True), shrinkage

    probs, shrinkage = posterior(f, None)
    soft = np.exp(probs) / np.exp(probs).sum(axis=1, keepdims=True)
    means = [f[y == c].mean(axis=0) for c in classes]
    mixed = f.copy()
    for i in range(n):
        k = classes.index(y[i])
        others = np.mean([m for j, m in enumerate(means) if j != k], axis=0)
        mixed[i] = soft[i, k] * f[i] + (1 - soft[i, k]) * others
    probs, _ = posterior(mixed, shrinkage)
    return float(np.mean([probs[i, classes.index(y[i])] for i in range(n)]))


@pytest.mark.parametrize("n,d,scale,signal", [(60, 20, 0.3, 0.4), (30, 80, 0.02, 0.2)],
                         ids=["N>D", "N<D"])
def test_sfda_matches_a_direct_computation_of_the_reference_formulas(n, d, scale, signal):
    # scaled so that the shrinkage is above its floor and the probabilities unsaturated, and
    # classes of unequal sizes (half of class 0 dropped): every step of the formula counts
    f, y = _task(n, d, signal=signal)
    keep = (y > 0) | (np.arange(n) < n // 2)
    f, y = f[keep] * scale, y[keep]
    assert np.bincount(y)[0] < np.bincount(y)[1] == np.bincount(y)[2]
    want = _direct_sfda(f, y)
    assert 0.4 < want < 0.95
    assert T.sfda(f, y) == pytest.approx(want, rel=1e-10, abs=0)


def test_sfda_ignores_the_order_of_examples_and_of_feature_columns():
    f, y = _task(45, 10, signal=0.5, seed=3)
    f = f * 0.2
    rng = np.random.default_rng(0)
    rows, columns = rng.permutation(len(y)), rng.permutation(f.shape[1])
    base = T.sfda(f, y)
    assert 0.4 < base < 0.95
    assert T.sfda(f[rows], y[rows]) == pytest.approx(base, rel=1e-12)
    assert T.sfda(f[:, columns], y) == pytest.approx(base, rel=1e-12)
    assert T.sfda(f, 2 * y + 1) == pytest.approx(base, rel=1e-12)  # only the partition counts


@pytest.mark.parametrize("n,d,scale", [(60, 20, 0.1), (30, 80, 0.05)], ids=["N>D", "N<D"])
def test_sfda_scores_separated_classes_above_the_same_features_with_shuffled_labels(n, d, scale):
    f, y = _task(n, d, signal=1.0)
    f = f * scale
    shuffled = np.random.default_rng(1).permutation(y)
    assert T.sfda(f, y) > T.sfda(f, shuffled) + 0.1
