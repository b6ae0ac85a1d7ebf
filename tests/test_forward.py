"""The OU forward process: coefficients, transitions and the joint NumPyro program."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import pytest
from numpyro.infer import Predictive

import mcm_prob as mp


def test_alpha_sigma_closed_form_and_extremes():
    t = np.array([0.0, 1e-12, 1e-6, 0.3, 1.0, 5.0, 50.0])
    np.testing.assert_allclose(mp.alpha(t), np.exp(-t), rtol=1e-15)
    expected = np.sqrt(-np.expm1(-2 * t))
    np.testing.assert_allclose(mp.sigma(t), expected, rtol=1e-15)
    # small t: sigma_t = sqrt(2t) (1 - t/2 + ...) to relative accuracy, not 0 or noise
    np.testing.assert_allclose(mp.sigma(1e-12), np.sqrt(2e-12) * (1 - 0.5e-12), rtol=1e-14)
    assert float(mp.sigma(50.0)) == 1.0
    assert float(mp.sigma(0.0)) == 0.0
    # variance preservation alpha^2 + sigma^2 = 1
    np.testing.assert_allclose(mp.alpha(t) ** 2 + mp.sigma(t) ** 2, 1.0, rtol=1e-15)


def test_transition_composes_to_marginal():
    s, t = 0.4, 1.3
    a_st, s_st = mp.OU.transition_coefficients(s, t)
    np.testing.assert_allclose(mp.alpha(s) * a_st, mp.alpha(t), rtol=1e-15)
    np.testing.assert_allclose(a_st**2 * mp.sigma(s) ** 2 + s_st**2, mp.sigma(t) ** 2, rtol=1e-14)
    kernel = mp.OU.transition(jnp.array([1.0, -2.0]), s, t)
    np.testing.assert_allclose(kernel.mean, np.exp(-(t - s)) * np.array([1.0, -2.0]), rtol=1e-15)
    np.testing.assert_allclose(kernel.variance, 1 - np.exp(-2 * (t - s)), rtol=1e-14)


def test_joint_model_moments_match_alpha_sigma(key):
    """Predictive samples of (x0, xt): the regression of xt on x0 has slope alpha_t and residual
    variance sigma_t^2; xt has mean alpha_t m and covariance Sigma_t. Tolerances are 5 standard
    errors for n = 40,000 draws (false-failure probability < 1e-5 per check)."""
    n, t = 40_000, 0.7
    data = mp.data.Gaussian([1.0, -0.5], [[2.0, 0.6], [0.6, 0.5]])
    draws = Predictive(mp.joint_model, num_samples=1)(key, data, t, n=n)
    x0, xt = np.asarray(draws["x0"][0]), np.asarray(draws["xt"][0])
    assert x0.shape == xt.shape == (n, 2)
    a, s = float(mp.alpha(t)), float(mp.sigma(t))
    # regression per coordinate: xt_i = a x0_i + s eps_i
    for i in range(2):
        slope = np.cov(x0[:, i], xt[:, i])[0, 1] / np.var(x0[:, i], ddof=1)
        resid = xt[:, i] - slope * x0[:, i]
        se_slope = s / (np.std(x0[:, i]) * np.sqrt(n))
        assert abs(slope - a) < 5 * se_slope
        assert abs(np.var(resid) / s**2 - 1) < 5 * np.sqrt(2 / n)
    # marginal moments
    cov_t = a**2 * np.asarray(data.cov) + s**2 * np.eye(2)
    se_mean = np.sqrt(np.diag(cov_t) / n)
    assert np.all(np.abs(xt.mean(0) - a * np.asarray(data.mean)) < 5 * se_mean)
    emp = np.cov(xt.T)
    se_cov = np.sqrt((cov_t**2 + np.outer(np.diag(cov_t), np.diag(cov_t))) / n)
    assert np.all(np.abs(emp - cov_t) < 5 * se_cov)


def test_joint_model_with_handlers_and_t0(key):
    data = mp.data.UniformBox([0.0, -1.0], [1.0, 2.0])
    tr = numpyro.handlers.trace(numpyro.handlers.seed(mp.joint_model, key)).get_trace(data, 0.0, 7)
    assert tr["x0"]["value"].shape == (7, 2)
    np.testing.assert_array_equal(tr["xt"]["value"], tr["x0"]["value"])  # t = 0: point mass
    # conditioning xt and scoring the trace: log density of xt | x0 is the Gaussian kernel
    x0 = jnp.array([[0.5, 0.5]])
    xt = jnp.array([[0.1, 0.2]])
    cond = numpyro.handlers.condition(mp.joint_model, {"x0": x0, "xt": xt})
    tr = numpyro.handlers.trace(numpyro.handlers.seed(cond, key)).get_trace(data, 0.5, 1)
    lp = tr["xt"]["fn"].log_prob(xt)
    a, s = np.exp(-0.5), np.sqrt(1 - np.exp(-1.0))
    expected = np.sum(-0.5 * ((xt - a * x0) / s) ** 2 - np.log(s) - 0.5 * np.log(2 * np.pi))
    np.testing.assert_allclose(lp, expected, rtol=1e-13)


def test_ou_sample_explicit_key(key):
    x0 = jnp.ones((50_000, 1))
    xt = mp.OU.sample(key, x0, 2.0)
    assert abs(float(xt.mean()) - np.exp(-2.0)) < 5 * np.sqrt(1 / 50_000)
    np.testing.assert_array_equal(xt, mp.OU.sample(key, x0, 2.0))


@pytest.mark.parametrize("bad", [-1.0, np.nan, np.inf])
def test_bad_times_raise(bad):
    with pytest.raises(ValueError, match="`t`"):
        mp.OU.model(jnp.zeros(2), bad)
    with pytest.raises(ValueError, match="`t`"):
        mp.joint_model(mp.data.Gaussian([0.0], [[1.0]]), bad)


def test_transition_order_checked():
    with pytest.raises(ValueError, match="s <= t"):
        mp.OU.transition_coefficients(1.0, 0.5)
    with pytest.raises(ValueError, match="x_s"):
        mp.OU.transition(jnp.array(1.0), 0.0, 1.0)


def test_jit_compatible(key):
    f = jax.jit(lambda t: mp.OU.sample(key, jnp.ones(3), t))
    np.testing.assert_allclose(f(0.5), mp.OU.sample(key, jnp.ones(3), 0.5), rtol=1e-14)
