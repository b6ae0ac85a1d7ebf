"""Gaussian paths: coefficients against hand-written formulas, exact marginals, scores and flow
maps on every path against independent numpy/scipy/diffrax computations, Tweedie by NUTS."""

import math

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpyro.infer import MCMC, NUTS
from scipy import special, stats

import mcm_prob as mp
from mcm_prob import paths

SIGMA_D = 0.7


def _custom():
    # a VP-like path with a(t) = 1 / (1 + t^2), b(t) = t: noise ratio t (1 + t^2), increasing
    return paths.CustomPath(lambda t: 1.0 / (1.0 + t**2), lambda t: t * 1.0, t_max=2.0)


# (path, a, b, a', b', top time used by the tests): the coefficients written by hand
PATHS = {
    "ou": (
        paths.OU,
        lambda t: np.exp(-t),
        lambda t: np.sqrt(1 - np.exp(-2 * t)),
        lambda t: -np.exp(-t),
        lambda t: np.exp(-2 * t) / np.sqrt(1 - np.exp(-2 * t)),
        3.0,
    ),
    "vp": (
        paths.VP(0.1, 20.0),
        lambda t: np.exp(-0.5 * (0.1 * t + 9.95 * t**2)),
        lambda t: np.sqrt(1 - np.exp(-(0.1 * t + 9.95 * t**2))),
        lambda t: -0.5 * (0.1 + 19.9 * t) * np.exp(-0.5 * (0.1 * t + 9.95 * t**2)),
        lambda t: (
            0.5
            * (0.1 + 19.9 * t)
            * np.exp(-(0.1 * t + 9.95 * t**2))
            / np.sqrt(1 - np.exp(-(0.1 * t + 9.95 * t**2)))
        ),
        1.0,
    ),
    "ve": (
        paths.VE(),
        lambda t: 1.0 + 0 * t,
        lambda t: t,
        lambda t: 0 * t,
        lambda t: 1 + 0 * t,
        5.0,
    ),
    "linear": (
        paths.LinearInterpolant(),
        lambda t: 1 - t,
        lambda t: t,
        lambda t: -1 + 0 * t,
        lambda t: 1 + 0 * t,
        0.95,
    ),
    "trigflow": (
        paths.TrigFlow(SIGMA_D),
        np.cos,
        lambda t: SIGMA_D * np.sin(t),
        lambda t: -np.sin(t),
        lambda t: SIGMA_D * np.cos(t),
        1.45,
    ),
    "custom": (
        _custom(),
        lambda t: 1 / (1 + t**2),
        lambda t: t,
        lambda t: -2 * t / (1 + t**2) ** 2,
        lambda t: 1 + 0 * t,
        2.0,
    ),
}


def _data():
    return {
        "gaussian": mp.data.Gaussian([0.5, -1.0], [[1.5, 0.4], [0.4, 0.6]]),
        "singular": mp.data.Gaussian([0.5, -1.0], [[1.0, 1.0], [1.0, 1.0]]),
        "mixture": mp.data.GaussianMixture(
            [0.3, 0.7], [[-1.0, 0.0], [1.5, 0.5]], [np.eye(2) * 0.3, [[0.5, 0.1], [0.1, 0.2]]]
        ),
        "dirac": mp.data.DiracMixture([[-1.0, 0.5], [1.0, -0.5], [0.2, 1.5]], [0.2, 0.5, 0.3]),
        "box": mp.data.UniformBox([-1.0, 0.0], [1.0, 0.5]),
    }


def _numpy_logpdf(name, data, x, a, b):
    """Independent log p of a X_0 + b Z (scipy), x of shape (n, 2)."""
    if name in ("gaussian", "singular"):
        cov = a**2 * np.asarray(data.cov) + b**2 * np.eye(2)
        return stats.multivariate_normal(a * np.asarray(data.mean), cov).logpdf(x)
    if name == "mixture":
        parts = [
            np.log(w) + stats.multivariate_normal(a * m, a**2 * c + b**2 * np.eye(2)).logpdf(x)
            for w, m, c in zip(data.weights, data.means, np.asarray(data.covs), strict=True)
        ]
        return special.logsumexp(np.stack(parts), axis=0)
    if name == "dirac":
        parts = [
            np.log(w) + stats.multivariate_normal(a * np.asarray(m), b**2 * np.eye(2)).logpdf(x)
            for w, m in zip(data.weights, data.atoms, strict=True)
        ]
        return special.logsumexp(np.stack(parts), axis=0)
    lo, hi = np.asarray(data.low), np.asarray(data.high)
    dens = (stats.norm.cdf((x - a * lo) / b) - stats.norm.cdf((x - a * hi) / b)) / (a * (hi - lo))
    return np.sum(np.log(dens), -1)


@pytest.mark.parametrize("name", list(PATHS))
def test_coefficients_against_hand_formulas(name):
    path, a, b, da, db, top = PATHS[name]
    t = np.linspace(0.02, top, 9)
    for got, want in ((path.a, a), (path.b, b), (path.a_dot, da), (path.b_dot, db)):
        np.testing.assert_allclose(got(jnp.asarray(t)), want(t), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(path.rho(t), b(t) / a(t), rtol=1e-12)
    np.testing.assert_allclose(path.time_of_rho(b(t) / a(t)), t, rtol=1e-10)
    np.testing.assert_allclose(path.ou_time(t), 0.5 * np.log1p((b(t) / a(t)) ** 2), rtol=1e-12)
    np.testing.assert_allclose(path.time_of_ou(path.ou_time(t)), t, rtol=1e-10)
    np.testing.assert_allclose(path.scale(t), np.hypot(a(t), b(t)), rtol=1e-12)
    prior = path.prior(3, top)
    np.testing.assert_allclose(prior.variance, np.full(3, float(path.prior_std(top)) ** 2))
    # transition: x_t | x_s ~ N((a_t/a_s) x_s, b_t^2 - (a_t/a_s)^2 b_s^2)
    s = 0.3 * t
    ratio, std = path.transition_coefficients(jnp.asarray(s[3]), jnp.asarray(t[3]))
    want_ratio = a(t[3]) / a(s[3])
    np.testing.assert_allclose(ratio, want_ratio, rtol=1e-12)
    np.testing.assert_allclose(std**2, b(t[3]) ** 2 - want_ratio**2 * b(s[3]) ** 2, rtol=1e-10)
    assert paths.from_spec(path.to_spec()) == path if path.to_spec() else True


def test_specs_and_refusals():
    vp = paths.from_spec({"path": "vp", "beta_min": 0.2, "beta_max": 10.0})
    assert vp.to_spec() == {"path": "vp", "beta_min": 0.2, "beta_max": 10.0}
    assert paths.from_spec("trigflow") == paths.TrigFlow()
    with pytest.raises(ValueError, match="'path' must be one of"):
        paths.from_spec({"path": "edm2"})
    with pytest.raises(ValueError, match="unknown key"):
        paths.from_spec({"path": "ve", "sigma_max": 80})
    with pytest.raises(ValueError, match=r"time range \[0, 1\]"):
        mp.data.Gaussian([0.0], [[1.0]]).marginal(1.5, paths.VP())
    with pytest.raises(ValueError, match="b\\(t\\) / a\\(t\\)"):
        paths.CustomPath(lambda t: 1.0 + 0 * t, lambda t: -t, t_max=1.0)
    with pytest.raises(TypeError, match="AbstractPath"):
        mp.flow_map(mp.data.Gaussian([0.0], [[1.0]]), jnp.zeros((1, 1)), 1.0, 0.5, path="vp")


def test_prior_is_exact_at_the_top_of_the_interpolants():
    data = mp.data.GaussianMixture([0.5, 0.5], [[-2.0], [2.0]], [[[0.1]], [[0.1]]])
    x = jnp.linspace(-3, 3, 7)[:, None]
    for path, std in ((paths.LinearInterpolant(), 1.0), (paths.TrigFlow(SIGMA_D), SIGMA_D)):
        top = path.t_max
        np.testing.assert_allclose(
            data.marginal(top, path).log_prob(x), stats.norm(0, std).logpdf(x[:, 0]), rtol=1e-13
        )
        np.testing.assert_allclose(data.score(x, top, path), -x / std**2, rtol=1e-13)
        np.testing.assert_allclose(path.prior_std(top), std, rtol=1e-15)


@pytest.mark.parametrize("path_name", list(PATHS))
def test_marginals_and_scores_against_scipy(path_name, key):
    path, a_fn, b_fn, *_, top = PATHS[path_name]
    for name, data in _data().items():
        for t in (0.05 * top, 0.5 * top, top):
            x = np.asarray(data.marginal(t, path).sample(key, (6,)))
            a, b = float(a_fn(t)), float(b_fn(t))
            want = _numpy_logpdf(name, data, x, a, b)
            got = np.asarray(data.marginal(t, path).log_prob(jnp.asarray(x)))
            np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-10)
            # score: central differences of the scipy log density
            h = 1e-5 * max(1.0, b)
            fd = np.stack(
                [
                    (
                        _numpy_logpdf(name, data, x + h * e, a, b)
                        - _numpy_logpdf(name, data, x - h * e, a, b)
                    )
                    / (2 * h)
                    for e in np.eye(2)
                ],
                -1,
            )
            np.testing.assert_allclose(data.score(x, t, path), fd, rtol=1e-5, atol=1e-5 / b)


def _diffrax_flow(path_name, data, x, t, s):
    """Phi_{t->s} by a diffrax solve of the path's own PF-ODE in its own time, with the
    hand-written derivatives: dx/dt = (a'/a) x - (b b' - b^2 a'/a) score (vmapped over x)."""
    path = PATHS[path_name][0]

    def field(u, y, args):
        au, bu = path.a(u), path.b(u)
        dau, dbu = _jnp_derivative(path_name, "a", u), _jnp_derivative(path_name, "b", u)
        score = data.unchecked_score(y, u, path)
        return (dau / au) * y - (bu * dbu - bu**2 * dau / au) * score

    def one(y0):
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(field),
            diffrax.Dopri8(),
            t0=t,
            t1=s,
            dt0=None,
            y0=y0,
            stepsize_controller=diffrax.PIDController(rtol=1e-12, atol=1e-12),
            max_steps=100_000,
        )
        return sol.ys[-1]

    return np.asarray(jax.jit(jax.vmap(one))(jnp.asarray(x)))


def _jnp_derivative(path_name, which, u):
    """The hand-written derivatives of PATHS, in jax.numpy (for the diffrax field)."""
    if path_name == "ou":
        return -jnp.exp(-u) if which == "a" else jnp.exp(-2 * u) / jnp.sqrt(-jnp.expm1(-2 * u))
    if path_name == "vp":
        big, beta = 0.1 * u + 9.95 * u**2, 0.1 + 19.9 * u
        if which == "a":
            return -0.5 * beta * jnp.exp(-0.5 * big)
        return 0.5 * beta * jnp.exp(-big) / jnp.sqrt(-jnp.expm1(-big))
    if path_name == "ve":
        return 0.0 * u if which == "a" else 1.0 + 0 * u
    if path_name == "linear":
        return -1.0 + 0 * u if which == "a" else 1.0 + 0 * u
    if path_name == "trigflow":
        return -jnp.sin(u) if which == "a" else SIGMA_D * jnp.cos(u)
    return -2 * u / (1 + u**2) ** 2 if which == "a" else 1.0 + 0 * u


@pytest.mark.heavy(20)
@pytest.mark.parametrize("path_name", list(PATHS))
def test_flow_maps_equal_a_diffrax_solve_of_the_path_ode(path_name, key):
    """float64, 1e-8: closed form (Gaussians) and the OU-time solve (others) both equal a
    diffrax solve of the path's PF-ODE in its own time; and the DDIM identity
    Phi^path_{t->s}(x) = a_s Phi^VE_{rho_t->rho_s}(x / a_t) holds."""
    path, *_, top = PATHS[path_name]
    t, s = 0.8 * top, 0.1 * top
    data_sets = _data()
    for name, data in data_sets.items():
        x = data.marginal(t, path).sample(jax.random.fold_in(key, len(name)), (3,))
        got = np.asarray(mp.flow_map(data, x, t, s, path=path))
        want = _diffrax_flow(path_name, data, x, t, s)
        np.testing.assert_allclose(got, want, rtol=1e-8, atol=1e-8, err_msg=name)
        a_t, a_s = float(path.a(t)), float(path.a(s))
        ve = mp.flow_map(data, x / a_t, float(path.rho(t)), float(path.rho(s)), path=paths.VE())
        np.testing.assert_allclose(got, a_s * np.asarray(ve), rtol=1e-8, atol=1e-8, err_msg=name)


@pytest.mark.parametrize("path_name", list(PATHS))
def test_joint_model_under_nuts_gives_tweedie(path_name, key):
    """NUTS on x_0 | x_t of `joint_model(..., path=)`: the posterior mean equals Tweedie's
    E[x_0 | x_t] = (x_t + b_t^2 score) / a_t within 5 Monte Carlo standard errors."""
    path, *_, top = PATHS[path_name]
    t = 0.5 * top
    data = mp.data.GaussianMixture([0.4, 0.6], [[-1.0], [1.2]], [[[0.3]], [[0.2]]])
    x_obs = jnp.array([0.4])
    import numpyro

    model = numpyro.handlers.condition(mp.joint_model, {"xt": x_obs})
    mcmc = MCMC(NUTS(model), num_warmup=400, num_samples=3000, progress_bar=False)
    mcmc.run(key, data, t, path=path)
    draws = np.asarray(mcmc.get_samples()["x0"])[:, 0]
    a, b = float(path.a(t)), float(path.b(t))
    tweedie = float((x_obs + b**2 * data.score(x_obs, t, path))[0] / a)
    ess = float(numpyro.diagnostics.effective_sample_size(draws[None]))
    assert abs(draws.mean() - tweedie) < 5 * draws.std() / math.sqrt(ess)
