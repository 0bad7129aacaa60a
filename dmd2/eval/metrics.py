r"""Distribution distances between feature sets: Frechet distance (FID) and kernel inception distance (KID).

Both work on any feature extractor (Inception pool3 for ImageNet / COCO, the small MNIST classifier for the MNIST
recipe) and accept NumPy arrays or torch tensors (any device, any float dtype). All math runs in float64 on
the host; results are Python floats.

**Frechet distance** between Gaussians :math:`N(\mu_1, \Sigma_1)` and :math:`N(\mu_2, \Sigma_2)`
(Dowson & Landau 1982; FID, Heusel et al. 2017):

.. math::
    d^2 = \lVert \mu_1 - \mu_2 \rVert^2 + \operatorname{tr}\Sigma_1 + \operatorname{tr}\Sigma_2
          - 2 \operatorname{tr}\bigl( (\Sigma_1 \Sigma_2)^{1/2} \bigr).

:math:`\Sigma_1 \Sigma_2` is not symmetric, and the usual ``scipy.linalg.sqrtm`` route can return complex values
or fail for singular covariances. Here :math:`\Sigma_1 \Sigma_2` is similar to the symmetric PSD matrix
:math:`M = \Sigma_1^{1/2} \Sigma_2 \Sigma_1^{1/2}` (conjugate by :math:`\Sigma_1^{1/2}`), so
:math:`\operatorname{tr}(\Sigma_1\Sigma_2)^{1/2} = \sum_i \sqrt{\lambda_i(M)}`, computed with symmetric
eigendecompositions only (exact for singular covariances too, always real).

**KID** (Binkowski et al. 2018): the unbiased estimate of the squared MMD with the cubic polynomial kernel
:math:`k(x, y) = (x^\top y / d + 1)^3`, averaged over random subsets of size ``m`` drawn without replacement from
each set (clean-fid and torch-fidelity defaults: 100 subsets of ``min(1000, n_1, n_2)``):

.. math::
    \widehat{\mathrm{MMD}}^2 = \frac{1}{m(m-1)} \sum_{i \ne j} \bigl(k(x_i, x_j) + k(y_i, y_j)\bigr)
                             - \frac{2}{m^2} \sum_{i, j} k(x_i, y_j).
"""
from __future__ import annotations

import numpy as np
import torch

__all__ = [
    "as_float64",
    "feature_statistics",
    "frechet_distance",
    "frechet_distance_from_features",
    "kid",
    "polynomial_kernel",
    "trace_sqrt_product",
]

# Eigenvalues of a covariance below -PSD_RTOL * (largest |eigenvalue|) mean the matrix is not PSD (ValueError);
# those between that and the numerical-rank tolerance d * eps * max are rounding noise and count as 0.
PSD_RTOL = 1e-6
# KID evaluates full kernel matrices only when they hold at most this many float64 entries (400 MB).
_GRAM_MAX_ENTRIES = 50_000_000


def as_float64(a, name: str, ndim: int | None = None) -> np.ndarray:
    """A NumPy float64 copy-or-view of ``a`` (ndarray, torch tensor, or nested sequence); checks ndim and finiteness."""
    if isinstance(a, torch.Tensor):
        a = a.detach().to("cpu", torch.float64).numpy()
    arr = np.asarray(a, dtype=np.float64)
    if ndim is not None and arr.ndim != ndim:
        raise ValueError(f"expected {name} with {ndim} dimension(s), got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return arr


def _check_features(feats1, feats2) -> tuple[np.ndarray, np.ndarray]:
    f1 = as_float64(feats1, "feats1", ndim=2)
    f2 = as_float64(feats2, "feats2", ndim=2)
    if f1.shape[1] != f2.shape[1]:
        raise ValueError(f"feature dimensions differ: feats1 is (N, {f1.shape[1]}), feats2 is (N, {f2.shape[1]})")
    return f1, f2


def feature_statistics(feats) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``(d,)`` and unbiased covariance ``(d, d)`` (divides by ``n - 1``) of features ``(n, d)``, float64.

    Raises:
        ValueError: fewer than 2 samples, or non-finite values.
    """
    f = as_float64(feats, "feats", ndim=2)
    if f.shape[0] < 2:
        raise ValueError(f"need at least 2 feature vectors for a covariance, got {f.shape[0]}")
    mu = f.mean(axis=0)
    centred = f - mu
    sigma = centred.T @ centred / (f.shape[0] - 1)
    return mu, sigma


def _psd_eigh(sigma: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Eigendecomposition ``(w, V)`` of a symmetric PSD ``(d, d)`` matrix, eigenvalues at its numerical rank.

    Eigenvalues within ``d * eps * max|w|`` of 0 (the numerical-rank tolerance of ``numpy.linalg.matrix_rank``)
    are rounding noise and are set to 0: their square roots would otherwise add ~sqrt(eps)-sized errors.
    Eigenvalues below ``-PSD_RTOL * max|w|`` mean the matrix is not PSD: ValueError.
    """
    w, v = np.linalg.eigh(sigma)
    scale = float(np.max(np.abs(w))) if w.size else 0.0
    if w.size and w.min() < -PSD_RTOL * scale:
        raise ValueError(
            f"{name} must be positive semi-definite; smallest eigenvalue {w.min():.3e} (largest |eigenvalue| {scale:.3e})"
        )
    tol = w.size * np.finfo(np.float64).eps * scale
    return np.where(w > tol, w, 0.0), v


def _check_covariance(sigma, name: str, d: int) -> np.ndarray:
    s = as_float64(sigma, name, ndim=2)
    if s.shape != (d, d):
        raise ValueError(f"expected {name} of shape ({d}, {d}) to match the mean's dimension, got {s.shape}")
    asym = float(np.max(np.abs(s - s.T))) if d else 0.0
    if asym > 1e-6 * max(float(np.max(np.abs(s))) if d else 0.0, 1e-30):
        raise ValueError(f"{name} must be symmetric (a covariance); max |S - S^T| = {asym:.3e}")
    return 0.5 * (s + s.T)


def trace_sqrt_product(sigma1, sigma2) -> float:
    r""":math:`\operatorname{tr}\bigl((\Sigma_1 \Sigma_2)^{1/2}\bigr) = \sum_i \sqrt{\lambda_i(\Sigma_1^{1/2}\Sigma_2\Sigma_1^{1/2})}`
    for symmetric PSD ``(d, d)`` matrices (see the module docstring)."""
    w1, v1 = _psd_eigh(np.asarray(sigma1, dtype=np.float64), "sigma1")
    root1 = (v1 * np.sqrt(w1)) @ v1.T  # Sigma1^{1/2}, symmetric PSD
    m = root1 @ np.asarray(sigma2, dtype=np.float64) @ root1
    w, _ = _psd_eigh(0.5 * (m + m.T), "sigma1^1/2 sigma2 sigma1^1/2")
    return float(np.sum(np.sqrt(w)))


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    r"""Squared Frechet (2-Wasserstein) distance between :math:`N(\mu_1, \Sigma_1)` and :math:`N(\mu_2, \Sigma_2)`.

    Args:
        mu1, mu2: means ``(d,)``.
        sigma1, sigma2: covariances ``(d, d)``, symmetric positive semi-definite (singular is fine).

    Returns:
        :math:`\lVert\mu_1-\mu_2\rVert^2 + \operatorname{tr}(\Sigma_1 + \Sigma_2 - 2(\Sigma_1\Sigma_2)^{1/2})`, a float
        (FID when the statistics are of Inception features). Mathematically >= 0; may be -1e-12-ish by rounding.

    Raises:
        ValueError: shape mismatch, non-finite values, non-symmetric or non-PSD covariance.
    """
    m1 = as_float64(mu1, "mu1", ndim=1)
    m2 = as_float64(mu2, "mu2", ndim=1)
    d = m1.shape[0]
    if m2.shape[0] != d:
        raise ValueError(f"mean dimensions differ: mu1 is ({d},), mu2 is ({m2.shape[0]},)")
    s1 = _check_covariance(sigma1, "sigma1", d)
    s2 = _check_covariance(sigma2, "sigma2", d)
    diff = m1 - m2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * trace_sqrt_product(s1, s2))


def frechet_distance_from_features(feats1, feats2) -> float:
    """Frechet distance between the Gaussian fits (:func:`feature_statistics`) of features ``(n1, d)`` and ``(n2, d)``."""
    f1, f2 = _check_features(feats1, feats2)
    return frechet_distance(*feature_statistics(f1), *feature_statistics(f2))


def polynomial_kernel(x: np.ndarray, y: np.ndarray, degree: int = 3, coef0: float = 1.0) -> np.ndarray:
    r""":math:`k(x_i, y_j) = (x_i^\top y_j / d + c)^{p}` for ``x`` ``(n, d)``, ``y`` ``(m, d)`` -> ``(n, m)`` float64."""
    return (x @ y.T / x.shape[1] + coef0) ** degree


def kid(
    feats1,
    feats2,
    num_subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 0,
    degree: int = 3,
    coef0: float = 1.0,
) -> tuple[float, float]:
    r"""Kernel inception distance: unbiased MMD^2 (module docstring) averaged over random subsets.

    Each of ``num_subsets`` subsets draws ``m = min(subset_size, n1, n2)`` rows of ``feats1`` and, independently,
    ``m`` rows of ``feats2``, without replacement, from ``numpy.random.default_rng(seed)``.

    Args:
        feats1, feats2: features ``(n1, d)`` and ``(n2, d)``.
        num_subsets: number of subsets (clean-fid / torch-fidelity: 100).
        subset_size: largest subset size (clean-fid / torch-fidelity: 1000); clipped to ``min(n1, n2)``.
        seed: seed of the subset draws (fixed: the result is deterministic).
        degree, coef0: the polynomial kernel :math:`(x^\top y / d + c_0)^{p}` (KID: 3 and 1).

    Returns:
        ``(mean, std)`` of the per-subset MMD^2 estimates (std with ``ddof=0``, as torch-fidelity reports it).
        Unbiased: its expectation is 0 when both sets come from the same distribution (so it can be negative).

    Raises:
        ValueError: feature dimensions differ, fewer than 2 samples in a set, ``num_subsets < 1``.
    """
    f1, f2 = _check_features(feats1, feats2)
    n1, n2 = f1.shape[0], f2.shape[0]
    if min(n1, n2) < 2:
        raise ValueError(f"KID needs at least 2 feature vectors in each set, got {n1} and {n2}")
    if num_subsets < 1 or subset_size < 2:
        raise ValueError(f"need num_subsets >= 1 and subset_size >= 2, got {num_subsets} and {subset_size}")
    m = min(subset_size, n1, n2)
    rng = np.random.default_rng(seed)
    idx1 = np.stack([rng.choice(n1, m, replace=False) for _ in range(num_subsets)])
    idx2 = np.stack([rng.choice(n2, m, replace=False) for _ in range(num_subsets)])
    # Two equivalent evaluations; pick the cheaper. Gram: the full kernel matrices once, subset sums as w^T K w
    # with 0/1 membership vectors w (cost ~ n^2 (d + S)). Per subset: m x m kernels of each subset (~ 3 S m^2 d).
    d = f1.shape[1]
    gram_entries = n1 * n1 + n2 * n2 + n1 * n2
    if gram_entries <= _GRAM_MAX_ENTRIES and gram_entries * (d + num_subsets) <= 3 * num_subsets * m * m * d:
        vals = _kid_subsets_gram(f1, f2, idx1, idx2, degree, coef0)
    else:
        vals = _kid_subsets_loop(f1, f2, idx1, idx2, degree, coef0)
    return float(vals.mean()), float(vals.std())


def _mmd2_unbiased(kxx_offdiag_sum, kyy_offdiag_sum, kxy_sum, m: int):
    return (kxx_offdiag_sum + kyy_offdiag_sum) / (m * (m - 1)) - 2.0 * kxy_sum / (m * m)


def _kid_subsets_loop(f1, f2, idx1, idx2, degree, coef0) -> np.ndarray:
    m = idx1.shape[1]
    out = np.empty(idx1.shape[0])
    for s in range(idx1.shape[0]):
        x, y = f1[idx1[s]], f2[idx2[s]]
        kxx = polynomial_kernel(x, x, degree, coef0)
        kyy = polynomial_kernel(y, y, degree, coef0)
        kxy = polynomial_kernel(x, y, degree, coef0)
        out[s] = _mmd2_unbiased(kxx.sum() - np.trace(kxx), kyy.sum() - np.trace(kyy), kxy.sum(), m)
    return out


def _kid_subsets_gram(f1, f2, idx1, idx2, degree, coef0) -> np.ndarray:
    num_subsets, m = idx1.shape
    rows = np.arange(num_subsets)[:, None]
    w1 = np.zeros((num_subsets, f1.shape[0]))
    w1[rows, idx1] = 1.0
    w2 = np.zeros((num_subsets, f2.shape[0]))
    w2[rows, idx2] = 1.0
    kxx = polynomial_kernel(f1, f1, degree, coef0)
    kyy = polynomial_kernel(f2, f2, degree, coef0)
    kxy = polynomial_kernel(f1, f2, degree, coef0)
    sxx = np.einsum("sn,sn->s", w1 @ kxx, w1) - w1 @ np.diag(kxx)
    syy = np.einsum("sn,sn->s", w2 @ kyy, w2) - w2 @ np.diag(kyy)
    sxy = np.einsum("sn,sn->s", w1 @ kxy, w2)
    return _mmd2_unbiased(sxx, syy, sxy, m)
