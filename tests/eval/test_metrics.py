"""Frechet distance and KID against direct NumPy / SciPy computations, plus their defining properties."""
import numpy as np
import pytest
import scipy.linalg
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dmd2.eval import metrics
from dmd2.eval.metrics import (
    feature_statistics,
    frechet_distance,
    frechet_distance_from_features,
    kid,
    trace_sqrt_product,
)


def _features(rng, n, d, shift=0.0):
    """Correlated, anisotropic Gaussian features (n, d)."""
    mix = rng.standard_normal((d, d)) / np.sqrt(d)
    return rng.standard_normal((n, d)) @ mix + rng.standard_normal(d) + shift


def _fd_scipy(mu1, s1, mu2, s2):
    """The textbook computation (as in the original FID code): scipy.linalg.sqrtm of the non-symmetric product."""
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    if np.iscomplexobj(covmean):
        assert np.max(np.abs(covmean.imag)) < 1e-6, "reference sqrtm went complex"
        covmean = covmean.real
    diff = mu1 - mu2
    return diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), d=st.integers(1, 24), extra=st.integers(2, 60))
def test_frechet_distance_matches_scipy_sqrtm(seed, d, extra):
    rng = np.random.default_rng(seed)
    n = d + extra  # full-rank covariances (where scipy's sqrtm is reliable)
    f1, f2 = _features(rng, n, d), _features(rng, n + 7, d)
    mu1, s1 = np.mean(f1, 0), np.cov(f1, rowvar=False).reshape(d, d)
    mu2, s2 = np.mean(f2, 0), np.cov(f2, rowvar=False).reshape(d, d)
    ref = _fd_scipy(mu1, s1, mu2, s2)
    got = frechet_distance(mu1, s1, mu2, s2)
    assert got == pytest.approx(ref, rel=1e-7, abs=1e-9 * (np.trace(s1) + np.trace(s2)))
    assert frechet_distance_from_features(f1, f2) == pytest.approx(ref, rel=1e-7, abs=1e-9 * (np.trace(s1) + np.trace(s2)))


def test_feature_statistics_is_numpy_mean_and_unbiased_cov():
    f = _features(np.random.default_rng(0), 50, 6)
    mu, sigma = feature_statistics(torch.from_numpy(f).float())
    f32 = f.astype(np.float32).astype(np.float64)
    np.testing.assert_allclose(mu, f32.mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(f32, rowvar=False), rtol=1e-10, atol=1e-13)
    assert mu.dtype == sigma.dtype == np.float64


def test_product_of_covariances_is_non_symmetric_and_trace_sqrt_is_real():
    rng = np.random.default_rng(1)
    d = 12
    s1 = np.cov(_features(rng, 40, d), rowvar=False)
    s2 = np.cov(_features(rng, 40, d), rowvar=False)
    prod = s1 @ s2
    assert np.max(np.abs(prod - prod.T)) > 1e-2 * np.max(np.abs(prod))  # genuinely non-symmetric
    ref = np.trace(scipy.linalg.sqrtm(prod)).real
    got = trace_sqrt_product(s1, s2)
    assert isinstance(got, float)
    assert got == pytest.approx(ref, rel=1e-9)
    # tr sqrt(S1 S2) = tr sqrt(S2 S1) (similar matrices)
    assert trace_sqrt_product(s2, s1) == pytest.approx(got, rel=1e-9)


def test_singular_rank_one_covariances_have_closed_form():
    # S1 = u u^T, S2 = v v^T: S1 S2 = (u.v) u v^T has one non-zero eigenvalue (u.v)^2, so tr sqrt = |u.v| and
    # FD (equal means) = |u|^2 + |v|^2 - 2 |u.v|; the product is singular and non-symmetric.
    rng = np.random.default_rng(2)
    u, v = rng.standard_normal(9), rng.standard_normal(9)
    mu = rng.standard_normal(9)
    expected = u @ u + v @ v - 2 * abs(u @ v)
    got = frechet_distance(mu, np.outer(u, u), mu, np.outer(v, v))
    assert got == pytest.approx(expected, rel=1e-9, abs=1e-9)


def test_commuting_diagonal_covariances_closed_form_with_zero_variances():
    a = np.array([4.0, 0.0, 1.0, 9.0, 0.0])
    b = np.array([1.0, 2.0, 0.0, 9.0, 0.0])
    mu1, mu2 = np.arange(5.0), np.arange(5.0)[::-1].copy()
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-12)


def test_fd_of_a_set_with_itself_is_zero_and_fd_is_symmetric():
    rng = np.random.default_rng(3)
    f = _features(rng, 30, 64)  # n < d: singular covariance
    mu, s = feature_statistics(f)
    assert abs(frechet_distance(mu, s, mu, s)) < 1e-9 * np.trace(s)
    g = _features(rng, 80, 64)
    assert frechet_distance_from_features(f, g) == pytest.approx(frechet_distance_from_features(g, f), rel=1e-9)
    assert frechet_distance_from_features(f, g) > 0


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), scale=st.floats(0.01, 10.0))
def test_mean_shift_adds_exactly_squared_norm(seed, scale):
    rng = np.random.default_rng(seed)
    f = _features(rng, 100, 10)
    delta = scale * rng.standard_normal(10)
    expected = float(delta @ delta)
    got = frechet_distance_from_features(f + delta, f)
    assert got == pytest.approx(expected, rel=1e-7, abs=1e-9 * np.trace(np.cov(f, rowvar=False)))


def test_torch_inputs_equal_numpy_inputs():
    rng = np.random.default_rng(4)
    f1, f2 = _features(rng, 50, 8), _features(rng, 60, 8)
    ref = frechet_distance_from_features(f1, f2)
    assert frechet_distance_from_features(torch.from_numpy(f1), torch.from_numpy(f2)) == pytest.approx(ref, rel=1e-12)
    mu1, s1 = feature_statistics(f1)
    mu2, s2 = feature_statistics(f2)
    t = [torch.from_numpy(a) for a in (mu1, s1, mu2, s2)]
    assert frechet_distance(*t) == pytest.approx(ref, rel=1e-12)
    k_np = kid(f1, f2, num_subsets=5, subset_size=20, seed=3)
    k_t = kid(torch.from_numpy(f1).float(), torch.from_numpy(f2).float(), num_subsets=5, subset_size=20, seed=3)
    assert k_t[0] == pytest.approx(k_np[0], rel=1e-5, abs=1e-7)


def test_fd_errors():
    rng = np.random.default_rng(5)
    with pytest.raises(ValueError, match="feature dimensions"):
        frechet_distance_from_features(rng.standard_normal((10, 3)), rng.standard_normal((10, 4)))
    with pytest.raises(ValueError, match="at least 2"):
        frechet_distance_from_features(rng.standard_normal((1, 3)), rng.standard_normal((10, 3)))
    with pytest.raises(ValueError, match="2 dimension"):
        frechet_distance_from_features(rng.standard_normal(10), rng.standard_normal((10, 1)))
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance_from_features(np.full((5, 2), np.nan), rng.standard_normal((5, 2)))
    eye = np.eye(3)
    with pytest.raises(ValueError, match="mean dimensions"):
        frechet_distance(np.zeros(3), eye, np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match=r"shape \(3, 3\)"):
        frechet_distance(np.zeros(3), eye, np.zeros(3), np.eye(2))
    with pytest.raises(ValueError, match="symmetric"):
        frechet_distance(np.zeros(3), np.triu(np.ones((3, 3))), np.zeros(3), eye)
    with pytest.raises(ValueError, match="positive semi-definite"):
        frechet_distance(np.zeros(3), np.diag([1.0, -0.5, 1.0]), np.zeros(3), eye)


def _mmd2_unbiased_direct(x, y):
    """Explicit unbiased MMD^2 with k(a, b) = (a.b / d + 1)^3, diagonal terms masked out."""
    d = x.shape[1]
    k = lambda a, b: (a @ b.T / d + 1.0) ** 3  # noqa: E731
    m = x.shape[0]
    off = ~np.eye(m, dtype=bool)
    return k(x, x)[off].mean() + k(y, y)[off].mean() - 2.0 * k(x, y).mean()


def test_kid_on_whole_sets_equals_direct_unbiased_mmd():
    rng = np.random.default_rng(6)
    x, y = _features(rng, 40, 5), _features(rng, 40, 5, shift=0.3)
    mean, std = kid(x, y, num_subsets=7, subset_size=1000)  # m = 40 = n: every subset is the whole set
    assert mean == pytest.approx(_mmd2_unbiased_direct(x, y), rel=1e-10)
    assert std == pytest.approx(0.0, abs=1e-12 * abs(mean))


@pytest.mark.parametrize("n1,n2,m", [(30, 45, 12), (60, 25, 25)])
def test_kid_subsets_match_direct_computation(n1, n2, m):
    rng = np.random.default_rng(7)
    x, y = _features(rng, n1, 6), _features(rng, n2, 6, shift=0.2)
    num_subsets, seed = 9, 11
    draw = np.random.default_rng(seed)  # the documented draw order: all subsets of feats1, then of feats2
    idx1 = [draw.choice(n1, m, replace=False) for _ in range(num_subsets)]
    idx2 = [draw.choice(n2, m, replace=False) for _ in range(num_subsets)]
    vals = np.array([_mmd2_unbiased_direct(x[a], y[b]) for a, b in zip(idx1, idx2)])
    mean, std = kid(x, y, num_subsets=num_subsets, subset_size=m, seed=seed)
    assert mean == pytest.approx(vals.mean(), rel=1e-10)
    assert std == pytest.approx(vals.std(), rel=1e-8)
    # both evaluation strategies (full Gram matrices, per-subset kernels) agree
    i1, i2 = np.stack(idx1), np.stack(idx2)
    np.testing.assert_allclose(metrics._kid_subsets_gram(x, y, i1, i2, 3, 1.0), vals, rtol=1e-9)
    np.testing.assert_allclose(metrics._kid_subsets_loop(x, y, i1, i2, 3, 1.0), vals, rtol=1e-9)


def test_kid_is_deterministic_given_seed():
    rng = np.random.default_rng(8)
    x, y = _features(rng, 50, 4), _features(rng, 50, 4)
    assert kid(x, y, num_subsets=10, subset_size=20, seed=1) == kid(x, y, num_subsets=10, subset_size=20, seed=1)
    assert kid(x, y, num_subsets=10, subset_size=20, seed=1) != kid(x, y, num_subsets=10, subset_size=20, seed=2)


def test_kid_unbiased_for_same_distribution_and_positive_for_shift():
    rng = np.random.default_rng(9)
    d, n = 8, 40
    mix = rng.standard_normal((d, d)) / np.sqrt(d)
    draws = [kid(rng.standard_normal((n, d)) @ mix, rng.standard_normal((n, d)) @ mix, num_subsets=1)[0] for _ in range(300)]
    draws = np.array(draws)
    # mean over 300 independent pairs is within 4 standard errors of 0 (a biased estimator with the diagonal
    # included would sit at ~2 (E k(x,x) - E k(x,x')) / n, many standard errors away)
    assert abs(draws.mean()) < 4 * draws.std() / np.sqrt(draws.size)
    biased_gap = 2 * (np.mean(((rng.standard_normal((n, d)) @ mix) ** 2).sum(1) / d + 1) ** 3 - 1) / n
    assert biased_gap > 10 * draws.std() / np.sqrt(draws.size)
    shifted = kid(rng.standard_normal((200, d)) @ mix + 1.0, rng.standard_normal((200, d)) @ mix, num_subsets=20, subset_size=100)
    assert shifted[0] > 10 * draws.std()


def test_kid_errors():
    rng = np.random.default_rng(10)
    with pytest.raises(ValueError, match="feature dimensions"):
        kid(rng.standard_normal((10, 3)), rng.standard_normal((10, 4)))
    with pytest.raises(ValueError, match="at least 2"):
        kid(rng.standard_normal((1, 3)), rng.standard_normal((10, 3)))
    with pytest.raises(ValueError, match="num_subsets"):
        kid(rng.standard_normal((10, 3)), rng.standard_normal((10, 3)), num_subsets=0)
