"""Diffusion baselines, sample-based estimators, product-target grid laws, steps to accuracy."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest
from scipy import stats
from scipy.spatial import cKDTree
from scipy.spatial.distance import cdist
from scipy.special import digamma, gammaln

import mcm_prob as mp
from mcm_prob.accuracy import kl_of_steps, smallest_steps, steps_to_accuracy
from mcm_prob.diffusion import baseline_law, sample_ode, sample_ode_adaptive, sample_sde
from mcm_prob.gridlaw import box_factors, grid_law_1d, product_kl

GAUSS = mp.data.Gaussian([1.0, -0.5], [[2.0, 0.6], [0.6, 0.5]])
DELTA = 0.01


# ------------------------------------------------------------------ baselines
@pytest.mark.parametrize(
    "method", ["sde_euler_maruyama", "sde_exponential", "ode_euler", "ode_heun"]
)
def test_baseline_monte_carlo_matches_exact_law(method, key):
    """n = 40,000 draws: mean and covariance within 5 standard errors of `baseline_law`."""
    T, steps, n = 3.0, 6, 40_000
    kind, name = method.split("_", 1)
    fn = sample_sde if kind == "sde" else sample_ode
    out = fn(GAUSS, key, n, T=T, delta=DELTA, steps=steps, method=name)
    assert out.nfe == (2 * steps if method == "ode_heun" else steps)
    law = baseline_law(GAUSS, method, T=T, delta=DELTA, steps=steps)
    x = np.asarray(out.samples)
    cov = np.asarray(law.covariance_matrix)
    assert np.all(np.abs(x.mean(0) - np.asarray(law.mean)) < 5 * np.sqrt(np.diag(cov) / n))
    se_cov = np.sqrt((cov**2 + np.outer(np.diag(cov), np.diag(cov))) / n)
    assert np.all(np.abs(np.cov(x.T) - cov) < 5 * se_cov)


@pytest.mark.parametrize(
    "method,ratio", [("sde_euler_maruyama", 4.0), ("ode_euler", 4.0), ("ode_heun", 16.0)]
)
def test_baseline_kl_convergence_order(method, ratio):
    """KL(law || p_delta) ~ h^(2p) for a method of order p: halving h divides KL by 4 (Euler)
    or 16 (Heun), within 15%, from T = 12 (start-up error ~1e-11, negligible)."""
    target = GAUSS.marginal(DELTA)
    kl = [
        mp.metrics.kl_gaussian(baseline_law(GAUSS, method, T=12.0, delta=DELTA, steps=k), target)
        for k in (400, 800)
    ]
    assert abs(kl[0] / kl[1] / ratio - 1) < 0.15


def test_adaptive_ode_matches_exact_flow(key):
    out = sample_ode_adaptive(GAUSS, key, 64, T=5.0, delta=DELTA, rtol=1e-9, atol=1e-9)
    x = jax.random.normal(key, (64, 2))
    np.testing.assert_allclose(out.samples, mp.flow_map(GAUSS, x, 5.0, DELTA), atol=1e-7)
    assert out.nfe > 6


def test_bad_baseline_arguments(key):
    with pytest.raises(ValueError, match="`method` must be one of"):
        sample_sde(GAUSS, key, 4, T=1.0, delta=DELTA, steps=3, method="heun")
    with pytest.raises(ValueError, match="`T` must be a finite number > 0.01"):
        sample_ode(GAUSS, key, 4, T=0.001, delta=DELTA, steps=3)
    with pytest.raises(ValueError, match="`steps` must be an integer >= 1"):
        sample_ode(GAUSS, key, 4, T=1.0, delta=DELTA, steps=0)
    with pytest.raises(TypeError, match="Gaussian"):
        baseline_law(mp.data.DiracMixture([[0.0]]), "ode_euler", T=1.0, delta=DELTA, steps=2)


# ------------------------------------------------------------------ estimators
def test_kl_knn_on_gaussians(key):
    """k-NN KL estimate (n = 4000, k = 5) against the closed form: within 5 standard errors
    plus 0.02 for the estimator's O(n^{-1/d}) bias; identical laws give 0 within the same band."""
    q = dist.MultivariateNormal(jnp.zeros(2), jnp.eye(2))
    p = dist.MultivariateNormal(jnp.array([0.5, 0.0]), jnp.diag(jnp.array([1.5, 0.8])))
    x = q.sample(key, (4000,))
    est = mp.metrics.kl_knn(x, p.log_prob)
    exact = mp.metrics.kl_gaussian(q, p)
    assert abs(est.value - exact) < 5 * est.stderr + 0.02
    same = mp.metrics.kl_knn(x, q.log_prob)
    assert abs(same.value) < 5 * same.stderr + 0.02
    assert 0 < est.stderr < 0.05


def _e_abs_normal(mu, s):
    return s * math.sqrt(2 / math.pi) * math.exp(-(mu**2) / (2 * s**2)) + mu * (
        1 - 2 * stats.norm.cdf(-mu / s)
    )


def test_energy_distance_closed_form(key):
    """1-d N(0, 1) vs N(0.5, 1.5^2): 2E|X-Y| - E|X-X'| - E|Y-Y'| in closed form; estimate
    (n = m = 2000) within 5 jackknife standard errors; identical laws within 5 SE of 0."""
    k1, k2, k3 = jax.random.split(key, 3)
    x = jax.random.normal(k1, (2000, 1))
    y = 0.5 + 1.5 * jax.random.normal(k2, (2000, 1))
    exact = (
        2 * _e_abs_normal(0.5, math.sqrt(1 + 1.5**2))
        - _e_abs_normal(0, math.sqrt(2))
        - _e_abs_normal(0, 1.5 * math.sqrt(2))
    )
    est = mp.metrics.energy_distance(x, y)
    assert abs(est.value - exact) < 5 * est.stderr
    same = mp.metrics.energy_distance(x, jax.random.normal(k3, (2000, 1)))
    assert abs(same.value) < 5 * same.stderr


def test_mmd2_closed_form(key):
    """Gaussian-kernel MMD^2 between 1-d Gaussians with bandwidth l:
    E k(X, Y) = l / sqrt(l^2 + s_x^2 + s_y^2) exp(-(m_x - m_y)^2 / (2 (l^2 + s_x^2 + s_y^2)))."""
    k1, k2 = jax.random.split(key)
    x = jax.random.normal(k1, (2000, 1))
    y = 0.5 + 1.5 * jax.random.normal(k2, (2000, 1))
    ell = 1.0

    def ek(m, s2):
        v = ell**2 + s2
        return ell / math.sqrt(v) * math.exp(-(m**2) / (2 * v))

    exact = ek(0, 2.0) + ek(0, 2 * 2.25) - 2 * ek(0.5, 1 + 2.25)
    est = mp.metrics.mmd2(x, y, bandwidth=ell)
    assert abs(est.value - exact) < 5 * est.stderr
    assert mp.metrics.mmd2(x, y).stderr > 0  # median heuristic path


def _kl_knn_numpy(x, logp, k=5):
    """The k-NN KL estimate on scipy's k-d tree (the reference the JAX program must equal)."""
    n, d = x.shape
    eps = cKDTree(x).query(x, k + 1)[0][:, k]
    terms = -d * np.log(eps) - logp(x)
    const = -(digamma(n) - digamma(k) + 0.5 * d * np.log(np.pi) - gammaln(0.5 * d + 1))
    return const + terms.mean(), terms.std(ddof=1) / np.sqrt(n)


def _energy_numpy(x, y):
    """The energy-distance U-statistic and its jackknife SE on scipy's cdist matrices."""
    kxx, kyy, kxy = -cdist(x, x), -cdist(y, y), -cdist(x, y)
    n, m = kxy.shape
    rxx, ryy = kxx.sum(1) - np.diag(kxx), kyy.sum(1) - np.diag(kyy)
    sxx, syy, sxy = rxx.sum(), ryy.sum(), kxy.sum()
    value = sxx / (n * (n - 1)) + syy / (m * (m - 1)) - 2 * sxy / (n * m)
    loo_x = (sxx - 2 * rxx) / ((n - 1) * (n - 2)) + syy / (m * (m - 1))
    loo_x -= 2 * (sxy - kxy.sum(1)) / ((n - 1) * m)
    loo_y = sxx / (n * (n - 1)) + (syy - 2 * ryy) / ((m - 1) * (m - 2))
    loo_y -= 2 * (sxy - kxy.sum(0)) / (n * (m - 1))
    var = (n - 1) / n * np.sum((loo_x - loo_x.mean()) ** 2)
    var += (m - 1) / m * np.sum((loo_y - loo_y.mean()) ** 2)
    return value, np.sqrt(var)


@pytest.mark.parametrize("d, n", [(1, 600), (3, 513), (8, 257), (64, 40)])
def test_grid_estimators_equal_scipy(d, n):
    """kl_knn and energy_distance over a (2, 3) grid of sample sets (one compiled program
    each; n not a multiple of the row block) equal the scipy k-d tree / cdist computations of
    each set to 1e-12, and a single set gives floats equal to its grid entry."""
    rng = np.random.default_rng(d)
    x = rng.standard_normal((2, 3, n, d))
    y = 0.3 + rng.standard_normal((3, n + 7, d))  # broadcast over the first axis
    logp = lambda z: -0.5 * np.sum(np.asarray(z) ** 2, -1)  # noqa: E731
    kl, en = mp.metrics.kl_knn(x, logp), mp.metrics.energy_distance(x, y)
    assert kl.value.shape == kl.stderr.shape == en.value.shape == (2, 3)
    for i, j in np.ndindex(2, 3):
        np.testing.assert_allclose(
            (kl.value[i, j], kl.stderr[i, j]), _kl_knn_numpy(x[i, j], logp), rtol=0, atol=1e-12
        )
        np.testing.assert_allclose(
            (en.value[i, j], en.stderr[i, j]), _energy_numpy(x[i, j], y[j]), rtol=0, atol=1e-12
        )
    one = mp.metrics.kl_knn(x[1, 2], logp)
    assert isinstance(one.value, float) and one.value == pytest.approx(kl.value[1, 2], abs=1e-12)


def test_kl_knn_counts_tied_neighbours():
    """On a lattice every point has 4 neighbours at distance 1 and 4 at sqrt 2: the k-th
    neighbour counts ties with their multiplicity, as the k-d tree does (k = 4, 5, 8)."""
    g = np.arange(12.0)
    x = np.stack(np.meshgrid(g, g), -1).reshape(-1, 2) + 0.25
    logp = lambda z: np.zeros(np.shape(z)[:-1])  # noqa: E731
    for k in (4, 5, 8):
        assert mp.metrics.kl_knn(x, logp, k=k).value == pytest.approx(
            _kl_knn_numpy(x, logp, k)[0], abs=1e-12
        )


def test_bad_estimator_arguments():
    x = np.zeros((10, 2))
    with pytest.raises(ValueError, match="duplicate points"):
        mp.metrics.kl_knn(x, lambda z: jnp.zeros(z.shape[0]))
    with pytest.raises(ValueError, match="`y` must have dimension 2"):
        mp.metrics.energy_distance(np.ones((5, 2)), np.ones((5, 3)))
    with pytest.raises(ValueError, match=r"`x` must have shape \(n, dim\)"):
        mp.metrics.mmd2(np.ones(5), np.ones((5, 1)))
    with pytest.raises(ValueError, match="`bandwidth`"):
        mp.metrics.mmd2(np.ones((5, 1)), np.zeros((5, 1)), bandwidth=0.0)


# ------------------------------------------------------------------ product targets
@pytest.mark.parametrize("tau", [0.0, 0.3, math.inf])
def test_grid_law_reproduces_exact_gaussian_kl(tau):
    g1 = mp.data.Gaussian([0.7], [[0.4]])
    gl = grid_law_1d(g1, delta=DELTA, h=0.5, steps=4, tau=tau)
    exact = mp.metrics.kl_gaussian(
        mp.sampler_law(g1, delta=DELTA, h=0.5, steps=4, tau=tau), g1.marginal(DELTA)
    )
    np.testing.assert_allclose(gl.kl, exact, rtol=1e-3)
    assert abs(gl.mass - 1) < 1e-4


@pytest.mark.heavy(30)
@pytest.mark.parametrize(
    "data,tau",
    [
        (mp.data.DiracMixture([[-1.0], [0.5], [2.0]], [0.3, 0.3, 0.4]), 0.3),
        (mp.data.UniformBox([-1.0], [1.5]), math.inf),
    ],
    ids=["dirac", "box"],
)
def test_grid_law_matches_monte_carlo_histogram(data, tau, key):
    """Bin probabilities of the grid law against n = 40,000 draws of `sample` with the exact
    flow: every bin within 5 binomial standard errors (plus 1e-3 for the grid interpolation)."""
    kw = dict(delta=0.02, h=0.5, steps=3, tau=tau)
    gl = grid_law_1d(data, **kw)
    n = 40_000
    x = np.asarray(mp.sample(mp.ExactFlow(data), key, n, dim=1, **kw).samples)[:, 0]
    edges = np.linspace(-3, 3, 31)
    counts = np.histogram(x, edges)[0] / n
    cdf = np.concatenate([[0.0], np.cumsum(0.5 * (gl.q[1:] + gl.q[:-1]) * np.diff(gl.x))])
    probs = np.diff(np.interp(edges, gl.x, cdf))
    se = np.sqrt(probs * (1 - probs) / n)
    assert np.all(np.abs(counts - probs) < 5 * se + 1e-3)


def test_product_kl_sums_factors():
    box = mp.data.UniformBox([-1.0, 0.0], [1.0, 2.0])
    kw = dict(delta=0.02, h=0.6, steps=3)
    factors = box_factors(box)
    separate = [grid_law_1d(f, **kw).kl for f in factors]
    np.testing.assert_allclose(product_kl(factors, **kw), sum(separate), rtol=1e-12)
    one = mp.data.UniformBox([-1.0], [1.0])
    np.testing.assert_allclose(product_kl([one] * 5, **kw), 5 * separate[0], rtol=1e-12)


# ------------------------------------------------------------------ steps to accuracy
def test_smallest_steps_exact_answer():
    for eps in (0.3, 1e-2, 1e-4):
        expected = math.ceil(-2 * math.log(eps))
        assert smallest_steps(lambda k: math.exp(-k), eps) == expected
    assert smallest_steps(lambda k: 1.0, 0.1, max_steps=50) is None


@pytest.mark.heavy(30)
def test_steps_to_accuracy_gaussian_matches_linear_scan():
    h, eps = 0.4, 1e-3
    kl = kl_of_steps(GAUSS, delta=DELTA, h=h)
    scan = next(k for k in range(1, 200) if kl(k) <= eps**2)
    res = steps_to_accuracy(GAUSS, eps, delta=DELTA, h=h)
    assert res["steps"] == scan and res["nfe"] == scan and res["kl"] <= eps**2
    # tau = 0: KL(N(0, I) || p_T) with T = delta + K h
    start = dist.MultivariateNormal(jnp.zeros(2), jnp.eye(2))
    assert mp.metrics.kl_gaussian(start, GAUSS.marginal(DELTA + scan * h)) <= eps**2
    # at eps = 1e-2 (measured: consistency 11 NFE, Heun 180, Euler 823)
    heun = steps_to_accuracy(GAUSS, 1e-2, sampler="ode_heun", delta=DELTA, T=8.0)
    euler = steps_to_accuracy(GAUSS, 1e-2, sampler="ode_euler", delta=DELTA, T=8.0)
    consistency = steps_to_accuracy(GAUSS, 1e-2, delta=DELTA, h=h)
    assert consistency["nfe"] < heun["nfe"] < euler["nfe"]


def test_steps_to_accuracy_bad_arguments():
    with pytest.raises(ValueError, match="needs `h`, `T`"):
        kl_of_steps(GAUSS, delta=DELTA)
    with pytest.raises(ValueError, match="`T` is required"):
        kl_of_steps(GAUSS, sampler="ode_euler", delta=DELTA)
    with pytest.raises(ValueError, match="exact laws exist"):
        kl_of_steps(mp.data.DiracMixture([[0.0, 1.0]]), delta=DELTA, h=0.1)
    with pytest.raises(ValueError, match="`eps` must be"):
        smallest_steps(lambda k: 0.0, -1.0)


def test_kl_knn_calls_log_p_on_bounded_blocks():
    """A grid of sample sets is estimated with `log_p` called on at most 2048 points at a time
    (all points at once made a mixture's log-density allocate 82 GiB in the digits study on an
    H100); each set's estimate equals that of the set alone."""
    x = np.random.default_rng(3).standard_normal((5, 700, 2))  # 3,500 points: two calls
    seen = []

    def log_p(z):
        seen.append(z.shape)
        return -0.5 * jnp.sum(z**2, -1) - jnp.log(2 * jnp.pi)

    grid = mp.metrics.kl_knn(x, log_p)
    assert seen == [(2048, 2), (2048, 2)]
    for i in range(5):
        one = mp.metrics.kl_knn(x[i], log_p)
        np.testing.assert_allclose(grid.value[i], one.value, rtol=1e-12)
        np.testing.assert_allclose(grid.stderr[i], one.stderr, rtol=1e-12)
    assert np.all(np.abs(grid.value) < 4 * grid.stderr + 0.1)  # q = p: KL 0 up to the k-NN bias
