"""Model-selection scores: how well will a pretrained model transfer to a labelled data set?

Each score is a pure function of a model's features (or source-head probabilities) on the
target's examples and their labels, computed in float64 with numpy (scikit-learn for the
learned probes), so ranking candidates costs one forward pass each, no fine-tuning.
Higher is better for every score. None depends on the order of the feature columns.

- `logme`: LogME (You et al., "LogME: Practical Assessment of Pre-trained Models for
  Transfer Learning", ICML 2021): the maximised log marginal likelihood (evidence) of a
  Bayesian linear regression from the features to each class's one-hot column, averaged over
  classes and divided by N. Written for rank-deficient features (N < D), see `logme_evidences`.
- `leep`: LEEP (Nguyen et al., "LEEP: A New Measure to Evaluate Transferability of Learned
  Representations", ICML 2020): the log-likelihood of the target labels under the source
  head's softmax composed with the empirical P(target | source class). Needs a source head.
- `nleep`: N-LEEP (Li et al., "Ranking Neural Checkpoints", CVPR 2021): LEEP with the source
  head replaced by a Gaussian mixture fitted to the PCA-reduced features.
- `sfda`: SFDA (Shao et al., "Not All Models Are Equal: Predicting Model Transferability
  in a Self-challenging Fisher Space", ECCV 2022): the mean probability of the true class under
  a Fisher discriminant with a shrunk within-class scatter, refitted after each example is
  pulled towards the other classes by its confidence ("ConfMix").
- `linear_probe_accuracy`: k-fold cross-validated accuracy of an L2-regularised logistic
  regression on the standardised features (Kornblith et al., "Do Better ImageNet Models
  Transfer Better?", CVPR 2019, use this probe): slower, usually the most faithful.
- `knn_accuracy`: leave-one-out k-nearest-neighbour accuracy with cosine similarity.
"""

from __future__ import annotations

import numpy as np

__all__ = ["knn_accuracy", "leep", "linear_probe_accuracy", "logme", "logme_evidences",
           "nleep", "sfda", "softmax"]


def _check(features: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float64 [N, D] features and int [N] labels in [0, C), validated."""
    f = np.asarray(features, np.float64)
    y = np.asarray(labels)
    if f.ndim != 2 or y.ndim != 1 or len(f) != len(y):
        raise ValueError(f"expected features [N, D] and labels [N], got {f.shape} and {y.shape}")
    if len(y) < 2:
        raise ValueError(f"a score needs at least 2 examples, got {len(y)}")
    if not np.all(np.isfinite(f)):
        raise ValueError("the features hold NaN or infinity")
    if not np.issubdtype(y.dtype, np.integer) or y.min() < 0:
        raise ValueError("labels must be non-negative integers (class indices)")
    return f, y.astype(np.int64)


# ---------------------------------------------------------------------------- LogME


def _log_evidence(u: np.ndarray, x2: np.ndarray, rest: float, sigma: np.ndarray,
                  n: int) -> np.ndarray:
    """log p(y | F, alpha, beta) / N at t = alpha / beta = exp(u), with beta at its optimum
    for that t, for each u (vectorised).

    Write F = U diag(s) V^T with its k nonzero singular values s (sigma = s^2), x = U^T y and
    `rest` = ||y||^2 - ||x||^2 (the part of y outside F's column space). The marginal
    y ~ N(0, I / beta + F F^T / alpha) has covariance eigenvalues 1/beta + sigma_i/alpha on
    the k singular directions and 1/beta on the other N - k, so
        log p = k/2 log alpha + N/2 log beta - 1/2 sum log(alpha + beta sigma)
                - beta/2 Q(t) - N/2 log 2 pi,   Q(t) = sum x^2 t / (t + sigma) + rest
    (Q = ||y - F m||^2 + t ||m||^2 at the posterior mean m): k/2 log alpha, where the
    reference implementation writes D/2 log alpha, the same only when rank F = D. Setting
    d/d beta = 0 gives beta = N / Q(t); with alpha = t beta the log beta terms cancel:
        log p = k/2 log t - 1/2 sum log(t + sigma) + N/2 log(N / Q(t)) - N/2 (1 + log 2 pi).
    """
    u = np.asarray(u, np.float64)[..., None]
    log_t_plus_sigma = np.logaddexp(u, np.log(sigma))
    log_s = np.log(np.sum(x2 * np.exp(-log_t_plus_sigma), axis=-1))  # log sum x^2/(t+sigma)
    log_q = np.logaddexp(u[..., 0] + log_s, np.log(rest) if rest > 0 else -np.inf)
    k = len(sigma)
    value = (k / 2 * u[..., 0] - 0.5 * np.sum(log_t_plus_sigma, axis=-1)
             + n / 2 * (np.log(n) - log_q) - n / 2 * (1 + np.log(2 * np.pi)))
    return value / n


def golden_section(fun, lo: float, hi: float, tol: float) -> float:
    """The argmax, to `tol`, of a function of one float that is unimodal on [lo, hi]: each
    step keeps the better of two interior points and reuses it (the golden ratio's job)."""
    ratio = (np.sqrt(5) - 1) / 2
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = fun(a), fun(b)
    while hi - lo > tol:
        if fa >= fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = fun(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = fun(b)
    return (lo + hi) / 2


def _maximise(fun, lo: float, hi: float, points: int = 513) -> float:
    """The maximum of a smooth 1-D function (vectorised over points) on [lo, hi]: the best of
    a grid, then a golden-section search between that point's neighbours."""
    grid = np.linspace(lo, hi, points)
    i = int(np.argmax(fun(grid)))
    a, b = grid[max(i - 1, 0)], grid[min(i + 1, points - 1)]
    best = golden_section(lambda u: float(fun(np.array([u]))[0]), a, b, 1e-12)
    return float(max(fun(np.array([best, grid[i]]))))


def _spectrum(f: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(U [N, k], sigma [k]): F's left singular vectors and squared singular values for its
    k = numerical rank nonzero ones, from the eigendecomposition of the smaller Gram matrix
    (F F^T or F^T F: much faster than an SVD of F for N, D in the thousands). Directions with
    sigma below 10 max(N, D) eps sigma_max (the eigensolver's rounding; s / s_max ~ 1e-6 for
    thousands of features, below what float32 features resolve) are dropped: with them F is
    rank-deficient, and their share of the evidence vanishes."""
    if f.shape[0] <= f.shape[1]:
        sigma, u = np.linalg.eigh(f @ f.T)
    else:
        sigma, v = np.linalg.eigh(f.T @ f)
        u = None
    keep = sigma > max(sigma.max(initial=0.0), 0.0) * 10 * max(f.shape) * np.finfo(np.float64).eps
    if not keep.any():
        raise ValueError("the features are all zero: LogME needs a nonzero feature")
    sigma = sigma[keep]
    if u is None:
        u = (f @ v[:, keep]) / np.sqrt(sigma)
    else:
        u = u[:, keep]
    return u, sigma


def logme_evidences(features: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """LogME's per-class maximised log evidence / N, for each class present, in order
    (a class without examples has no evidence to weigh: its all-zero column is skipped).

    For each class c, y = 1[labels == c] is modelled as y = F w + noise, w ~ N(0, I / alpha),
    noise ~ N(0, I / beta), and log p(y | F, alpha, beta) is maximised over alpha and beta
    (You et al., ICML 2021). F is used as given (no centring, as the paper). The evidence is
    exact for any rank of F: only its k nonzero singular values enter (k = the numerical rank,
    see `_spectrum` and `_log_evidence`), so N < D (fewer images than features) is right;
    the reference implementation's D/2 log alpha adds (D - k)/2 log alpha there, which
    favours wider models.

    The maximum is found exactly rather than by the paper's fixed-point iteration: beta has a
    closed form given t = alpha / beta, and t is searched over a log grid spanning F's
    spectrum by 30 e-folds each side, then refined. When rank F = N (N <= D) the supremum can
    lie at beta -> infinity (the features interpolate y without noise), where the fixed point
    diverges; the profile's limit there is finite and is what this returns.
    """
    f, y = _check(features, labels)
    n = len(y)
    u, sigma = _spectrum(f)
    lo, hi = np.log(sigma.min()) - 30.0, np.log(sigma.max()) + 30.0
    out = []
    for c in np.unique(y):
        target = (y == c).astype(np.float64)
        x = u.T @ target
        # y's part outside F's column space; none when F's columns span R^N (its rounding
        # would otherwise decide the limit beta -> infinity)
        rest = 0.0 if len(sigma) == n else max(float(target @ target - x @ x), 0.0)
        x2 = x * x
        out.append(_maximise(lambda v, x2=x2, rest=rest: _log_evidence(v, x2, rest, sigma, n),
                             lo, hi))
    return np.array(out)


def logme(features: np.ndarray, labels: np.ndarray) -> float:
    """LogME (You et al., ICML 2021): the mean over classes of `logme_evidences`."""
    return float(np.mean(logme_evidences(features, labels)))


# ---------------------------------------------------------------------------- LEEP family


def leep(source_probs: np.ndarray, labels: np.ndarray) -> float:
    """LEEP (Nguyen et al., ICML 2020) from the source head's probabilities [N, Z] (softmax).

    P(y, z) = (1/N) sum_i theta(x_i)_z 1[y_i = y]; P(y | z) = P(y, z) / P(z);
    LEEP = (1/N) sum_i log sum_z P(y_i | z) theta(x_i)_z.
    """
    p, y = _check(source_probs, labels)
    if np.any(p < 0) or not np.allclose(p.sum(1), 1.0, atol=1e-6):
        raise ValueError("source_probs must be probabilities (rows of a softmax)")
    joint = np.zeros((int(y.max()) + 1, p.shape[1]))
    np.add.at(joint, y, p / len(y))
    marginal = joint.sum(0)
    conditional = np.divide(joint, marginal, out=np.zeros_like(joint), where=marginal > 0)
    eep = np.sum(p * conditional[y], axis=1)  # sum_z P(y_i | z) theta(x_i)_z
    return float(np.mean(np.log(eep)))


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64 (for `leep` from a head's logits)."""
    z = np.asarray(logits, np.float64)
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def nleep(features: np.ndarray, labels: np.ndarray, *, seed: int = 0,
          components_per_class: int = 5, variance: float = 0.8) -> float:
    """N-LEEP (Li et al., CVPR 2021): LEEP with the source head replaced by the posterior of a
    Gaussian mixture (components_per_class x classes, full covariance, seeded) fitted to the
    features reduced by PCA to `variance` of their energy (both as the paper)."""
    from sklearn.decomposition import PCA
    from sklearn.mixture import GaussianMixture

    f, y = _check(features, labels)
    reduced = PCA(n_components=variance, svd_solver="full").fit_transform(f)
    classes = int(y.max()) + 1
    components = max(1, min(components_per_class * classes, len(y) - 1))
    gmm = GaussianMixture(components, covariance_type="full", reg_covar=1e-4,
                          random_state=seed).fit(reduced)
    return leep(gmm.predict_proba(reduced), y)


# ---------------------------------------------------------------------------- SFDA


def _top_eigenvalue(a: np.ndarray, iterations: int = 3) -> float:
    """The reference's estimate of a symmetric PSD matrix's largest eigenvalue (its
    `utils.iterative_A`): power iteration from the row sums, two products per step, and
    x^T A y of the last two unit iterates. Three steps are not converged: this is the value
    the reference's shrinkage is a function of, kept as it is."""
    x = a.sum(axis=1)
    if not np.any(x):  # rows summing to zero (the reference divides 0 by 0: NaN)
        return float(np.linalg.eigvalsh(a)[-1])  # the value the iteration estimates
    for _ in range(iterations):
        y = a @ x
        y /= np.linalg.norm(y)
        x = a @ y
        x /= np.linalg.norm(x)
    return float(x @ a @ y)


def _class_means(f: np.ndarray, y: np.ndarray) -> np.ndarray:
    """[C, D]: each class's mean feature (y: class indices 0..C-1, every class present)."""
    counts = np.bincount(y)
    means = np.zeros((len(counts), f.shape[1]))
    np.add.at(means, y, f)
    return means / counts[:, None]


def _fisher_posterior(f: np.ndarray, y: np.ndarray, means: np.ndarray, priors: np.ndarray,
                      shrinkage: float | None) -> tuple[np.ndarray, float]:
    """(P(class | x) [N, C] of every example, the shrinkage used): the reference's
    `SFDA.fit(f, y).predict_proba(f)`, `means` = `_class_means(f, y)`; `shrinkage` None picks
    it from the scatter.

    S_w = sum_c prior_c Cov_c (biased covariances) is shrunk towards its mean eigenvalue,
    S = (1 - s) S_w + s tr(S_w) / D I, with s = max(exp(-5 lambda_max(S_w)), 1e-10) (the
    reference's adaptive strength; it depends on the features' scale). The reference solves
    the generalised eigenproblem S_b v = lambda S v and classifies with all D eigenvectors V:
    coef = means V V^T. V^T S V = I makes V V^T = S^{-1}, so its "Fisher space" classifier is
    linear discriminant analysis with the shrunk scatter, and its S_b (and the C - 1
    components of the paper's projection) never reach the probabilities; one Cholesky solve
    gives the same numbers."""
    from scipy.linalg import cho_factor, cho_solve

    n, d = f.shape
    centred = f - means[y]
    within = centred.T @ centred / n  # sum_c (n_c / N) Cov_c, biased
    mean_eigenvalue = np.trace(within) / d
    if not mean_eigenvalue > 0:
        raise ValueError("SFDA needs features that vary within a class; every class's "
                         "examples have identical features")
    if shrinkage is None:
        shrinkage = max(float(np.exp(-5.0 * _top_eigenvalue(within))), 1e-10)
    shrunk = (1.0 - shrinkage) * within
    shrunk.flat[:: d + 1] += shrinkage * mean_eigenvalue
    coef = cho_solve(cho_factor(shrunk), means.T).T  # means S^{-1}, [C, D]
    logits = f @ coef.T - 0.5 * np.sum(means * coef, axis=1) + np.log(priors)
    return softmax(logits), shrinkage


def sfda(features: np.ndarray, labels: np.ndarray) -> float:
    """SFDA (Shao et al., ECCV 2022), as the reference implementation (TencentARC/SFDA,
    `metrics.SFDA_Score`) computes it; deterministic (no randomness to seed).

    1. Fit the shrunk-scatter Fisher discriminant (`_fisher_posterior`, shrinkage chosen from
       the within-class scatter) and take each example's class probabilities.
    2. ConfMix, the "self-challenging" step: soften those probabilities by a second softmax
       (the reference's softmax of probabilities, so the true class's weight p_i lies in
       [1 / (e + C - 1), e / (e + C - 1)]) and replace every example x_i of class c by
       p_i x_i + (1 - p_i) m_{-c}, m_{-c} the unweighted mean of the other classes' means:
       every example is pulled towards the other classes, the less confident ones more.
    3. Refit the discriminant on the mixed features with the first fit's shrinkage; the
       score is the mean over examples of its probability of the true class (the reference
       leaves out the log, "in case of instability").

    Quirks kept: the shrinkage depends on the features' scale; with N < D + C examples the
    within-class scatter is singular, and a shrinkage at its floor 1e-10 multiplies the class
    means' part outside its range by ~1e10 D / tr(S_w), driving the probabilities to 0 or 1.
    The reference indexes classes by label value (labels 0..C-1 assumed): here labels are
    mapped to their rank among the labels present, the same for 0..C-1.
    """
    f, y = _check(features, labels)
    classes, y = np.unique(y, return_inverse=True)
    if len(classes) < 2:
        raise ValueError(f"SFDA needs at least 2 classes, got {len(classes)}")
    priors = np.bincount(y) / len(y)
    means = _class_means(f, y)
    probs, shrinkage = _fisher_posterior(f, y, means, priors, None)
    confidence = softmax(probs)[np.arange(len(y)), y][:, None]
    others = (means.sum(axis=0) - means) / (len(classes) - 1)
    # the reference overwrites its input here; a copy keeps the caller's features intact
    mixed = confidence * f + (1.0 - confidence) * others[y]
    probs, _ = _fisher_posterior(mixed, y, _class_means(mixed, y), priors, shrinkage)
    return float(np.mean(probs[np.arange(len(y)), y]))


# ---------------------------------------------------------------------------- probes


def _folds(labels: np.ndarray, folds: int) -> int:
    """The fold count a stratified split allows: at most the smallest class's size."""
    smallest = np.bincount(labels)[np.bincount(labels) > 0].min()
    if smallest < 2:
        raise ValueError("a cross-validated probe needs at least 2 examples of every class")
    return int(min(folds, smallest))


def linear_probe_accuracy(features: np.ndarray, labels: np.ndarray, *, folds: int = 5,
                          seed: int = 0, l2: float = 1.0, max_iter: int = 1000) -> float:
    """Mean accuracy of a logistic regression (L-BFGS, inverse L2 strength `l2`) on the
    standardised features over `folds` stratified folds shuffled with `seed`."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    f, y = _check(features, labels)
    split = StratifiedKFold(_folds(y, folds), shuffle=True, random_state=seed)
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=l2, max_iter=max_iter))
    return float(np.mean(cross_val_score(probe, f, y, cv=split)))


def knn_accuracy(features: np.ndarray, labels: np.ndarray, *, k: int = 10) -> float:
    """Leave-one-out accuracy of a k-nearest-neighbour vote (cosine similarity; ties go to
    the lower class index). Deterministic: no seed."""
    f, y = _check(features, labels)
    norms = np.linalg.norm(f, axis=1, keepdims=True)
    unit = f / np.where(norms > 0, norms, 1.0)
    similarity = unit @ unit.T
    np.fill_diagonal(similarity, -np.inf)
    k = min(k, len(y) - 1)
    neighbours = np.argsort(-similarity, axis=1, kind="stable")[:, :k]
    votes = np.zeros((len(y), int(y.max()) + 1))
    np.add.at(votes, (np.repeat(np.arange(len(y)), k), y[neighbours].ravel()), 1.0)
    return float(np.mean(votes.argmax(1) == y))
