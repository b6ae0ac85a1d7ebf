"""Exact flow maps: closed form vs independent ODE solves, semigroup, inverse, pushforward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate, optimize, stats
from scipy.integrate import solve_ivp

import mcm_prob as mp
from mcm_prob.data import DiracMixture, Gaussian, GaussianMixture, UniformBox

MEAN = np.array([1.0, -0.5])
COV = np.array([[2.0, 0.6], [0.6, 0.5]])
MIX = GaussianMixture(
    [0.3, 0.7], [[-2.0, 0.0], [2.0, 1.0]], [[[1.0, 0.3], [0.3, 0.5]], [[0.4, 0.0], [0.0, 2.0]]]
)
DIRAC = DiracMixture([[0.0, 0.0], [2.0, 2.0], [-1.0, 1.0]], [0.2, 0.5, 0.3])
BOX = UniformBox([0.0, -1.0], [1.0, 2.0])


def scipy_gaussian_flow(mean, cov, x, t, s):
    """Independent PF-ODE solve in the original (x, t) variables with numpy linear algebra."""

    def rhs(tau, y):
        a, sg2 = np.exp(-tau), -np.expm1(-2 * tau)
        cov_t = a**2 * cov + sg2 * np.eye(len(mean))
        return -y + np.linalg.solve(cov_t, y - a * mean)

    sol = solve_ivp(rhs, (t, s), x, method="DOP853", rtol=1e-13, atol=1e-13)
    return sol.y[:, -1]


@pytest.mark.parametrize("t,s", [(3.0, 0.5), (1.0, 0.0), (6.0, 0.01), (0.5, 0.5)])
def test_gaussian_closed_form_matches_ode_solves(t, s, key):
    data = Gaussian(MEAN, COV)
    x = data.marginal(t).sample(key, (8,))
    closed = mp.flow_map(data, x, t, s)
    ref = np.stack([scipy_gaussian_flow(MEAN, COV, np.asarray(xi), t, s) for xi in x])
    np.testing.assert_allclose(closed, ref, rtol=0, atol=1e-8)
    ode = mp.flow_map(data, x, t, s, method="ode")
    np.testing.assert_allclose(ode, closed, rtol=0, atol=1e-8)


def test_singular_gaussian_closed_form_matches_ode(key):
    data = Gaussian(MEAN, [[1.0, 2.0], [2.0, 4.0]])
    x = data.marginal(2.0).sample(key, (8,))
    closed = mp.flow_map(data, x, 2.0, 1e-3)
    np.testing.assert_allclose(mp.flow_map(data, x, 2.0, 1e-3, method="ode"), closed, atol=1e-8)
    # to s = 0 the closed form projects onto the support: x0 - mean is parallel to (1, 2)
    x0 = np.asarray(mp.flow_map(data, x, 2.0, 0.0))
    np.testing.assert_allclose((x0 - MEAN) @ np.array([2.0, -1.0]), 0.0, atol=1e-12)


def test_gaussian_flow_pushes_marginals_exactly():
    """Phi_{t->s} is linear: it maps N(m_t, Sigma_t) to N(m_s, Sigma_s) exactly."""
    data = Gaussian(MEAN, COV)
    t, s = 2.0, 0.3
    m_t = np.exp(-t) * MEAN
    lin = np.asarray(jax.jacfwd(lambda x: mp.flow_map(data, x, t, s))(jnp.asarray(m_t)))
    np.testing.assert_allclose(lin @ data.cov_t(t) @ lin.T, data.cov_t(s), rtol=1e-12)
    np.testing.assert_allclose(mp.flow_map(data, m_t, t, s), np.exp(-s) * MEAN, rtol=1e-13)


@pytest.mark.parametrize("data,s", [(MIX, 0.0), (MIX, 0.05), (DIRAC, 1e-3), (BOX, 1e-3)])
def test_semigroup_and_inverse(data, s, key):
    t, u = 2.0, 0.4
    x = data.marginal(t).sample(key, (32,))
    direct = mp.flow_map(data, x, t, s)
    composed = mp.flow_map(data, mp.flow_map(data, x, t, u), u, s)
    np.testing.assert_allclose(composed, direct, rtol=0, atol=1e-6)
    back = mp.pf_flow(data, mp.flow_map(data, x, t, u), u, t)
    np.testing.assert_allclose(back, x, rtol=0, atol=1e-6)
    assert np.all(np.isfinite(direct))


def _mixture_cdf(x, t, weights, means, variances):
    a, s2 = np.exp(-t), -np.expm1(-2 * t)
    sd = np.sqrt(a**2 * np.asarray(variances) + s2)
    return np.sum(np.asarray(weights) * stats.norm.cdf((x - a * np.asarray(means)) / sd))


def _box_cdf(x, t, low, high):
    a, s = np.exp(-t), np.sqrt(-np.expm1(-2 * t))
    return integrate.quad(
        lambda u: stats.norm.cdf((x - a * u) / s) / (high - low), low, high, epsabs=0, epsrel=1e-13
    )[0]


@pytest.mark.parametrize("kind", ["mixture", "dirac", "box"])
def test_1d_flow_is_the_quantile_map(kind):
    """In 1-d the flow map is the monotone transport F_s^{-1} o F_t: F_s(Phi(x)) = F_t(x)."""
    t, s = 1.5, 0.05
    if kind == "mixture":
        w, m, v = [0.4, 0.6], [-1.0, 1.5], [0.2, 0.5]
        data = GaussianMixture(w, [[mi] for mi in m], [[[vi]] for vi in v])
        cdf = lambda x, tau: _mixture_cdf(x, tau, w, m, v)  # noqa: E731
    elif kind == "dirac":
        w, m = [0.2, 0.3, 0.5], [-1.0, 0.0, 2.0]
        data = DiracMixture([[mi] for mi in m], w)
        cdf = lambda x, tau: _mixture_cdf(x, tau, w, m, [0.0] * 3)  # noqa: E731
    else:
        data = UniformBox([-1.0], [2.0])
        cdf = lambda x, tau: _box_cdf(x, tau, -1.0, 2.0)  # noqa: E731
    x = np.array([-1.5, -0.4, 0.0, 0.3, 1.1])
    y = np.asarray(mp.flow_map(data, x[:, None], t, s))[:, 0]
    # independent quantile map by root finding on the exact CDFs
    ref = [
        optimize.brentq(lambda z, xi=xi: cdf(z, s) - cdf(xi, t), -20, 20, xtol=1e-14) for xi in x
    ]
    np.testing.assert_allclose(y, ref, rtol=0, atol=1e-7)


def test_pushforward_two_sample_with_power(key):
    """Phi_{t->s} maps p_t-samples to p_s-samples (2-d mixture).

    Statistics: both coordinates and log p_s(Y), each compared by a two-sample KS test with exact
    samples of p_s (n = 2000 each); the map passes when every p-value exceeds 1e-3 (family-wise
    level <= 3e-3). Power: the same test rejects the map to a wrong time, Phi_{t->0.3}, and the
    identity with min p-value < 1e-6, so a broken flow map is caught at this sample size.
    """
    t, s, n = 1.0, 0.1, 2000
    k1, k2 = jax.random.split(key)
    x = MIX.marginal(t).sample(k1, (n,))
    ref = np.asarray(MIX.marginal(s).sample(k2, (n,)))
    logp = MIX.marginal(s).log_prob

    def min_pvalue(y):
        y = np.asarray(y)
        stats_y = [y[:, 0], y[:, 1], np.asarray(logp(y))]
        stats_ref = [ref[:, 0], ref[:, 1], np.asarray(logp(ref))]
        return min(stats.ks_2samp(a, b).pvalue for a, b in zip(stats_y, stats_ref, strict=True))

    assert min_pvalue(mp.flow_map(MIX, x, t, s)) > 1e-3
    assert min_pvalue(mp.flow_map(MIX, x, t, 0.3)) < 1e-6
    assert min_pvalue(x) < 1e-6
    # first moment within 5 standard errors
    y = np.asarray(mp.flow_map(MIX, x, t, s))
    mean_s = np.exp(-s) * (0.3 * np.array([-2.0, 0.0]) + 0.7 * np.array([2.0, 1.0]))
    assert np.all(np.abs(y.mean(0) - mean_s) < 5 * y.std(0) / np.sqrt(n))


def test_exact_flow_callable_and_jit(key):
    f = mp.ExactFlow(MIX)
    x = MIX.marginal(1.0).sample(key, (4, 3))
    out = f(x, 1.0, 0.2)
    assert out.shape == (4, 3, 2)
    np.testing.assert_allclose(out, mp.flow_map(MIX, x, 1.0, 0.2), rtol=1e-14)
    jitted = jax.jit(lambda x, t, s: f(x, t, s))
    np.testing.assert_allclose(jitted(x, 1.0, 0.2), out, atol=1e-12)
    np.testing.assert_array_equal(f(x, 0.7, 0.7), x)
    v = mp.pf_ode_velocity(MIX, x, 1.0)
    np.testing.assert_allclose(v, -x - MIX.score(x, 1.0), rtol=1e-14)


def test_bad_flow_arguments():
    x = jnp.zeros((3, 2))
    with pytest.raises(ValueError, match="s <= t"):
        mp.flow_map(MIX, x, 0.5, 1.0)
    with pytest.raises(ValueError, match="`s` must be >= 0"):
        mp.flow_map(MIX, x, 0.5, -0.1)
    with pytest.raises(ValueError, match="non-smooth.*`t1` > 0"):
        mp.flow_map(DIRAC, x, 0.5, 0.0)
    with pytest.raises(ValueError, match="trailing dimension 2"):
        mp.flow_map(MIX, jnp.zeros(3), 0.5, 0.1)
    with pytest.raises(ValueError, match="`method` must be one of"):
        mp.flow_map(MIX, x, 0.5, 0.1, method="rk4")
    with pytest.raises(ValueError, match="needs Gaussian data"):
        mp.flow_map(MIX, x, 0.5, 0.1, method="closed_form")
    with pytest.raises(ValueError, match="`rtol` must be a finite number > 0"):
        mp.flow_map(MIX, x, 0.5, 0.1, rtol=0.0)
    with pytest.raises(ValueError, match="`max_steps`"):
        mp.flow_map(MIX, x, 0.5, 0.1, max_steps=0)
